"""Folding a per-channel affine (BatchNorm after a ReLU) into a chain's first 1x1 conv: exact, and refused
where it would not be (negative scales through a MaxPool, tensors with other readers, padded first convs)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker import compress
from onnx_tucker.runtime import make_session


def affine_model(scale_sign=1.0, pool=False, extra_reader=False, seed=0):
    """x -> conv -> relu -> Mul(a) -> Add(b) [-> MaxPool] -> conv(3x3) -> y"""
    rng = np.random.default_rng(seed)
    c = 16
    a = (np.abs(rng.standard_normal((1, c, 1, 1))) + 0.5) * scale_sign
    inits = [numpy_helper.from_array((rng.standard_normal((c, 8, 3, 3)) / 5).astype(np.float32), "W1"),
             numpy_helper.from_array(a.astype(np.float32), "A"),
             numpy_helper.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), "B"),
             numpy_helper.from_array((rng.standard_normal((32, c, 3, 3)) / 8).astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "A"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "B"], ["bn"], name="bn_add")]
    feed = "bn"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["bn"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        feed = "p"
    nodes.append(helper.make_node("Conv", [feed, "W2"], ["y"], name="conv2", pads=[1] * 4))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("bn", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def outputs(model, x):
    return make_session(model).run(None, {"x": x})


@pytest.mark.parametrize("pool", [False, True])
def test_affine_before_a_chain_is_folded_exactly(pool):
    model = affine_model(pool=pool)
    x = np.random.default_rng(1).standard_normal((4, 8, 12, 12)).astype(np.float32)
    folded, report = compress(model, ratio=0.5)
    kept, _ = compress(model, ratio=0.5, fold_affine=False)
    assert {n.op_type for n in folded.graph.node} == {"Conv", "Relu"} | ({"MaxPool"} if pool else set())
    assert {"Mul", "Add"} <= {n.op_type for n in kept.graph.node}
    np.testing.assert_allclose(outputs(folded, x)[0], outputs(kept, x)[0], rtol=1e-4, atol=1e-5)
    chain = next(c for c in report.chains if c.layer == "conv2")
    assert chain.extra["folded_affine"]["through_maxpool"] is pool and chain.extra["folded_affine"]["bias"] in chain.trainable()
    assert any("folded" in n for n in report.notes)


@pytest.mark.parametrize("kwargs", [dict(scale_sign=-1.0, pool=True), dict(extra_reader=True)], ids=["negative-scale-maxpool", "shared-tensor"])
def test_affine_is_left_where_folding_would_change_the_result(kwargs):
    model = affine_model(**kwargs)
    x = np.random.default_rng(2).standard_normal((4, 8, 12, 12)).astype(np.float32)
    new, report = compress(model, ratio=0.5)
    assert {"Mul", "Add"} <= {n.op_type for n in new.graph.node}
    assert not any("folded_affine" in c.extra for c in report.chains)
    kept, _ = compress(model, ratio=0.5, fold_affine=False)
    for a, b in zip(outputs(new, x), outputs(kept, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

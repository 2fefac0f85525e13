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


# --- after a chain's last conv ---------------------------------------------------------------------

def after_model(ops=("Mul", "Add"), bias=True, extra_reader=False, seed=0):
    """x -> conv(3x3, 16 -> 32) -> per-channel ops (Mul, Add, Sub, BatchNormalization) -> relu -> y"""
    rng = np.random.default_rng(seed)
    c = 32
    inits = [numpy_helper.from_array((rng.standard_normal((c, 16, 3, 3)) / 12).astype(np.float32), "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "Wb"))
        conv_inputs.append("Wb")
    nodes = [helper.make_node("Conv", conv_inputs, ["t0"], name="conv", pads=[1] * 4)]
    for i, op in enumerate(ops):
        src, dst = f"t{i}", f"t{i + 1}"
        if op == "BatchNormalization":
            stats = [np.abs(rng.standard_normal(c)) + 0.5, rng.standard_normal(c), rng.standard_normal(c), np.abs(rng.standard_normal(c)) + 0.1]
            names = [f"bn{i}_{k}" for k in ("scale", "B", "mean", "var")]
            inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(stats, names)]
            nodes.append(helper.make_node("BatchNormalization", [src] + names, [dst], name=f"op{i}", epsilon=1e-3))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), f"k{i}"))
            nodes.append(helper.make_node(op, [src, f"k{i}"], [dst], name=f"op{i}"))
    nodes.append(helper.make_node("Relu", [f"t{len(ops)}"], ["y"], name="relu"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "after", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 10, 10])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("ops, bias", [(("Mul", "Add"), True), (("Mul", "Add"), False), (("BatchNormalization",), True),
                                       (("Sub", "Mul"), True), (("Add",), False)])
def test_affine_after_a_chain_is_folded_exactly(ops, bias):
    model = after_model(ops, bias)
    x = np.random.default_rng(3).standard_normal((4, 16, 10, 10)).astype(np.float32)
    folded, report = compress(model, ranks={"conv": (12, 8)})
    kept, _ = compress(model, ranks={"conv": (12, 8)}, fold_affine=False)
    assert {n.op_type for n in folded.graph.node} == {"Conv", "Relu"}
    assert set(ops) <= {n.op_type for n in kept.graph.node}
    np.testing.assert_allclose(outputs(folded, x)[0], outputs(kept, x)[0], rtol=1e-4, atol=1e-4)
    (chain,) = report.chains
    assert chain.extra["folded_after"]["ops"] == list(ops) and chain.bias == chain.extra["folded_after"]["bias"]
    assert chain.output == f"t{len(ops)}"  # the chain now writes what the last op wrote; its readers are untouched
    assert any("after 1 chain(s)" in n for n in report.notes)
    # the record in the written model names the conv that writes the chain's output
    from onnx_tucker.chain import chains_of
    last = {n.name: n for n in folded.graph.node}[chains_of(folded)[0].nodes[chain.last_role]]
    assert last.output[0] == chain.output and last.input[2] == chain.bias


def test_affine_after_a_two_conv_chain_goes_into_its_kxk_core():
    model = after_model(("Mul", "Add"))
    x = np.random.default_rng(4).standard_normal((2, 16, 10, 10)).astype(np.float32)
    folded, report = compress(model, ranks={"conv": (32, 6)})  # R_out = C_out: 1x1 -> 3x3, the core is last
    kept, _ = compress(model, ranks={"conv": (32, 6)}, fold_affine=False)
    (chain,) = report.chains
    assert chain.last_role == "core" and "folded_after" in chain.extra
    np.testing.assert_allclose(outputs(folded, x)[0], outputs(kept, x)[0], rtol=1e-4, atol=1e-4)


def test_affine_after_is_left_when_another_node_reads_the_chain_output():
    new, report = compress(after_model(extra_reader=True), ranks={"conv": (12, 8)})
    assert {"Mul", "Add"} <= {n.op_type for n in new.graph.node}
    assert "folded_after" not in report.chains[0].extra


def test_unfolded_batchnorm_of_a_torch_export_is_folded_after_the_chain(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
    for m in net:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    net.eval()
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 12, 12), str(path), dynamo=False, do_constant_folding=False, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})
    model = onnx.load(str(path))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 2  # the exporter left them unfolded
    folded, report = compress(model, ratio=0.5)
    chain = next(c for c in report.chains if "folded_after" in c.extra)
    assert chain.extra["folded_after"]["ops"] == ["BatchNormalization"]
    x = np.random.default_rng(5).standard_normal((3, 3, 12, 12)).astype(np.float32)
    kept, _ = compress(model, ratio=0.5, fold_affine=False)
    np.testing.assert_allclose(outputs(folded, x)[0], outputs(kept, x)[0], rtol=1e-4, atol=1e-4)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1  # the stem's stays: it is left whole
    read = {i for n in folded.graph.node for i in n.input} | {o.name for o in folded.graph.output}
    assert all(o in read for n in folded.graph.node for o in n.output)  # no Identity left feeding the removed BatchNorm


# --- overridable initializers (also graph inputs) ----------------------------------------------------

def overridable(model):
    """``model`` with every initializer also listed as a graph input (IR >= 4), as torch.onnx.export writes it
    with keep_initializers_as_inputs=True: each is a default the user may override at run time."""
    model.ir_version = 8
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer)
    return model


@pytest.mark.parametrize("build, shape", [(lambda: affine_model(), (4, 8, 12, 12)),
                                          (lambda: affine_model(pool=True), (4, 8, 12, 12)),
                                          (lambda: after_model(("BatchNormalization", "Mul")), (4, 16, 10, 10)),
                                          (lambda: after_model(("Mul", "Add"), bias=False), (4, 16, 10, 10))],
                         ids=["before", "before-maxpool", "after-batchnorm", "after-mul-add"])
def test_overridable_initializers_are_not_folded_and_the_inputs_stay_as_they_were(build, shape):
    from onnx_tucker.validate import compare_models, verdict

    model = overridable(build())
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    folded, report = compress(model, ratio=0.5)
    kept, _ = compress(model, ratio=0.5, fold_affine=False)
    assert report.chains and not any({"folded_affine", "folded_after"} & set(c.extra) for c in report.chains)
    assert [o.op_type for o in folded.graph.node] == [o.op_type for o in kept.graph.node]
    inits = {i.name for i in folded.graph.initializer}
    assert all(i.name in inits for i in folded.graph.input if i.name != "x")  # no input left without its default
    result = verdict(compare_models(model, folded, {"x": x}))  # the CLI's self-check: feeds only "x"
    assert result.passed, result.reason
    np.testing.assert_allclose(outputs(folded, x)[0], outputs(kept, x)[0], rtol=1e-6, atol=1e-6)

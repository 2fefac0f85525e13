"""keras_fold: what tf2onnx leaves behind on Keras 3 models, folded or refused.

A tiny Keras model holds the three leftovers found on the Keras applications (each in seconds, not
minutes): a Normalization layer with given mean/variance (captured constants: EfficientNetV2), a grouped
Conv2D (Keras's TensorFlow backend wraps it in an XLA-compiled tf.function: ConvNeXt) and exact GELU
(TensorFlow's Erfc: ConvNeXt).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.errors import ModelError
from onnx_tucker.keras_fold import check_leftovers, unknown_ops


def tiny_leftover_model():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 4))
    x = keras.layers.Normalization(mean=[10.0, 20.0, 30.0, 40.0], variance=[4.0, 9.0, 16.0, 25.0])(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=2)(x)  # grouped: Keras runs it through XLA
    x = keras.layers.Activation("gelu")(x)  # exact GELU: 0.5 * x * erfc(-x / sqrt(2))
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny():
    from onnx_tucker.convert import keras_to_onnx

    model = tiny_leftover_model()
    return model, keras_to_onnx(model, output_name="probs")


def test_tiny_model_converts_without_leftovers(tiny):
    model, onnx_model = tiny
    onnx.checker.check_model(onnx_model)
    ops = {n.op_type for n in onnx_model.graph.node}
    assert not ops & {"StatefulPartitionedCall", "PartitionedCall", "Erfc"}
    assert unknown_ops(onnx_model) == []
    assert [i.name for i in onnx_model.graph.input] == [model.inputs[0].name]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in onnx_model.graph.node if n.op_type == "Conv"]
    assert sorted(groups) == [1, 2]
    assert "Erf" in ops


def test_tiny_model_agrees_with_keras(tiny):
    from onnx_tucker.runtime import make_session

    model, onnx_model = tiny
    x = np.random.default_rng(0).uniform(0, 50, (5, 12, 12, 4)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    got = make_session(onnx_model).run(None, {onnx_model.graph.input[0].name: x})[0]
    assert got.shape == (5, 10)
    assert np.max(np.abs(expected - got)) < 1e-5


def test_tiny_model_compresses(tiny):
    import onnx_tucker

    _, onnx_model = tiny
    new, report = onnx_tucker.compress(onnx_model, ratio=0.5, force=True)
    onnx.checker.check_model(new)
    reasons = " ".join(r.reason for r in report.layers)
    assert "grouped conv (group=2)" in reasons
    assert len(report.decomposed) == 1


def test_plain_from_function_leaves_what_is_folded():
    """The regression: tf2onnx's own from_function on the same model keeps the three leftovers."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    model = tiny_leftover_model()
    signature = (tf.TensorSpec([None, 12, 12, 4], tf.float32, name="x"),)

    @tf.function(input_signature=signature)
    def serve(x):
        return {"output": model(x, training=False)}

    raw, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=17)
    assert "StatefulPartitionedCall" in unknown_ops(raw)
    assert len([i for i in raw.graph.input if i.name not in {t.name for t in raw.graph.initializer}]) == 3  # x, mean, variance
    with pytest.raises(ModelError, match="could not convert these TensorFlow ops: .*StatefulPartitionedCall"):
        check_leftovers(raw, expected_inputs=["x"])


def _graph(nodes, inputs, initializers=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in inputs]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, *extra], [y], list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model


def test_unknown_tensorflow_op_is_refused_in_one_line():
    model = _graph([helper.make_node("Erfc", ["x"], ["y"])], [])
    assert unknown_ops(model) == ["Erfc"]
    with pytest.raises(ModelError) as err:
        check_leftovers(model, expected_inputs=["x"])
    assert "\n" not in str(err.value) and "Erfc" in str(err.value)


def test_ops_inside_subgraphs_and_other_domains_are_seen():
    body = helper.make_graph([helper.make_node("StatefulPartitionedCall", ["x"], ["z"])], "body", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    model = _graph([cond, helper.make_node("Foo", ["x"], ["w"], domain="my.domain")], [])
    assert unknown_ops(model) == ["StatefulPartitionedCall", "my.domain.Foo"]


def test_known_ops_pass_and_inputs_backed_by_initializers_are_fine():
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    model = _graph([helper.make_node("Add", ["x", "w"], ["y"])], ["w"], [w])
    check_leftovers(model, expected_inputs=["x"])


def test_graph_input_without_value_is_refused():
    model = _graph([helper.make_node("Sub", ["x", "mean:0"], ["y"])], ["mean:0"])
    with pytest.raises(ModelError, match=r"inputs with no value \(mean:0\)"):
        check_leftovers(model, expected_inputs=["x"])


def test_a_tf2onnx_failure_is_one_model_error_line(monkeypatch):
    pytest.importorskip("tf2onnx")
    from onnx_tucker import keras_fold
    from onnx_tucker.convert import keras_to_onnx

    def broken(*args, **kwargs):
        raise ValueError("some_tensor:0 missing\nsecond line")

    monkeypatch.setattr(keras_fold, "_convert_graph_def", broken)
    keras = pytest.importorskip("keras")
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inputs)))
    with pytest.raises(ModelError, match=r"^tf2onnx could not convert the model: ValueError: some_tensor:0 missing$"):
        keras_to_onnx(model)


def test_onnxruntime_contrib_ops_are_not_leftovers():
    model = _graph([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")], [])
    assert unknown_ops(model) == []


def test_optimizers_collect_garbage_first_and_keep_their_order(monkeypatch):
    import gc

    from onnx_tucker.keras_fold import _collecting

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc") or 0)
    wrapped = _collecting({"a": lambda: calls.append("a") or "A", "b": lambda: calls.append("b") or "B"})
    assert list(wrapped) == ["a", "b"]
    assert wrapped["b"]() == "B" and wrapped["a"]() == "A"
    assert calls == ["gc", "b", "gc", "a"]

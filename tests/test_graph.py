"""The graph module: initializer ownership, exposed tensors with their types, metadata edits."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.graph import Initializers, expose, infer_shapes, set_metadata, tensor_types, with_outputs
from onnx_tucker.runtime import make_session

from conftest import residual_model


def shared_weight_model():
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1"), helper.make_node("Conv", ["a", "W"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_shared_initializer_is_copied_before_one_node_changes_it():
    model = shared_weight_model()
    inits = Initializers(model)
    c2 = model.graph.node[1]
    owned = inits.owned(c2, 1, "c2_W")
    assert owned.name == "c2_W" and c2.input[1] == "c2_W" and model.graph.node[0].input[1] == "W"
    inits.set("c2_W", np.zeros((4, 4, 1, 1), np.float32))
    assert inits.array("W").sum() == 16 and inits.array("c2_W").sum() == 0
    assert inits.owned(c2, 1, "again") is owned  # now it has one user: no second copy


def test_a_missing_bias_is_created_as_zeros_and_wired_in():
    model = shared_weight_model()
    inits = Initializers(model)
    bias = inits.bias(model.graph.node[0], 4, np.float32, "c1_B")
    assert list(model.graph.node[0].input) == ["x", "W", "c1_B"] and not inits.array(bias.name).any()
    x = np.ones((1, 4, 3, 3), np.float32)
    assert np.allclose(make_session(model).run(None, {"x": x})[0], 16.0)


def test_exposed_tensors_become_outputs_with_their_inferred_types():
    model = residual_model()
    exposed = with_outputs(model, ["a_r", "s"], tensor_types(model))
    assert [o.name for o in exposed.graph.output] == ["logits", "a_r", "s"] and len(model.graph.output) == 1
    x = np.zeros((2, 3, 10, 10), np.float32)
    assert make_session(exposed).run(["s"], {"x": x})[0].shape == (2, 16, 10, 10)
    expose(exposed, ["s"])  # already there: not twice
    assert [o.name for o in exposed.graph.output].count("s") == 1
    assert infer_shapes(model)["d"] == (1, 32, 5, 5)


def test_metadata_entries_are_set_replaced_and_removed_in_place():
    model = residual_model()
    model.metadata_props.add(key="user", value="kept")
    set_metadata(model, {"onnx_tucker.a": "1", "onnx_tucker.b": "2"})
    set_metadata(model, {"onnx_tucker.a": "3", "onnx_tucker.b": ""})
    assert [(p.key, p.value) for p in model.metadata_props] == [("user", "kept"), ("onnx_tucker.a", "3")]


def test_prefix_model_computes_the_named_tensor_with_only_the_nodes_it_needs():
    from onnx_tucker.graph import prefix_model, with_outputs

    model = residual_model()
    tensor = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    prefix = prefix_model(model, [tensor])
    assert len(prefix.graph.node) < len(model.graph.node) and [o.name for o in prefix.graph.output] == [tensor]
    used = {t for n in prefix.graph.node for t in n.input}
    assert all(i.name in used for i in prefix.graph.initializer)
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    full = make_session(with_outputs(model, [tensor])).run([tensor], x)[0]
    np.testing.assert_array_equal(make_session(prefix).run([tensor], x)[0], full)


def test_a_prefix_drops_the_input_entries_of_the_initializers_it_no_longer_holds():
    """An initializer also listed as a graph input (IR >= 4: torch.onnx.export(..., keep_initializers_as_inputs=True))
    that the prefix does not need goes with its input entry, else onnxruntime wants it fed; the real inputs stay."""
    from onnx_tucker.graph import prefix_model

    model = residual_model()
    model.ir_version = 8
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer)
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))  # a real input, not read
    tensor = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    prefix = prefix_model(model, [tensor])
    held = {i.name for i in prefix.graph.initializer}
    assert held and len(held) < len(model.graph.initializer)
    assert [i.name for i in prefix.graph.input] == [i.name for i in model.graph.input
                                                    if i.name in held or i.name in ("x", "unused")]
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32), "unused": np.zeros(1, np.float32)}
    full = make_session(with_outputs(model, [tensor])).run([tensor], x)[0]
    np.testing.assert_array_equal(make_session(prefix).run([tensor], x)[0], full)


def test_initializers_made_after_export_are_listed_as_inputs_under_ir_3(tmp_path):
    """IR 3 lists every initializer among the graph inputs: the refit's new bias (a conv without one) was not, and the
    written model failed onnx.checker although the tool said PASSED."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_tucker import compress

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1, n) for n in ("W1", "W2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="conv1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 8, 8])]
        + [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    out, _ = compress(model, calibration={"x": rng.standard_normal((64, 32, 8, 8)).astype(np.float32)})
    onnx.checker.check_model(out)
    assert {i.name for i in out.graph.initializer} <= {i.name for i in out.graph.input}

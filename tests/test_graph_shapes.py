"""Graph shapes that tf2onnx, torch.onnx and quantizers really produce, built with onnx.helper.

Each model is run before and after ``compress`` in onnxruntime: decomposed convs reproduce the
outputs at full rank, and convs the tool cannot handle are left alone with their reason and
the model still valid and runnable.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tucker
from conftest import relative_error, run_model

FLOAT = TensorProto.FLOAT
RNG_SEED = 0


def _reference_export(graph, template):
    """The export as it was before issue 5's memory work: gs.export_onnx, then the template's fields."""
    import onnx_graphsurgeon as gs

    from onnx_tucker.graph import copy_template_fields

    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    copy_template_fields(model, template)  # shared: the graph export is what is compared
    return model


@pytest.fixture(autouse=True)
def export_matches_graphsurgeon(monkeypatch):
    """Every export in these tests is byte-identical to onnx-graphsurgeon's own export route."""
    from onnx_tucker import graph as graph_module
    from onnx_tucker import pipeline

    def checked(graph, template):
        model = graph_module.export(graph, template)
        reference = _reference_export(graph, template)
        assert model.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
        return model

    monkeypatch.setattr(pipeline, "export", checked)


def _w(rng, shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _model(nodes, inits, outputs=("y",), inputs=None, opset=17, ir_version=None, c_in=8, spatial=(10, 10), out_shape=None):
    inputs = inputs or [helper.make_tensor_value_info("x", FLOAT, ["N", c_in, *spatial])]
    outs = [helper.make_tensor_value_info(o, FLOAT, out_shape) for o in outputs]
    graph = helper.make_graph(nodes, "shapes", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    if ir_version is not None:
        model.ir_version = ir_version
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _feeds(c_in=8, spatial=(10, 10), batch=2):
    return {"x": np.random.default_rng(1).standard_normal((batch, c_in, *spatial)).astype(np.float32)}


def _assert_full_rank_exact(model, feeds=None, decomposed=None):
    feeds = feeds or _feeds()
    new, report = onnx_tucker.compress(model, ratio=1.0, force=True)
    onnx.checker.check_model(new)
    before, after = run_model(model, feeds), run_model(new, feeds)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert relative_error(a, b) <= 1e-4
    if decomposed is not None:
        assert sorted(r.layer for r in report.decomposed) == sorted(decomposed)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    return new, report


def _reasons(report):
    return {r.layer: r.reason for r in report.layers}


# --- weights behind Identity / Transpose / Constant ------------------------------------------


def test_weight_behind_identity_is_decomposed():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Identity", ["W_raw"], ["W"], name="w_identity"),
        helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W_raw"), numpy_helper.from_array(_w(rng, (16, 1)).ravel(), "B")]
    new, _ = _assert_full_rank_exact(_model(nodes, inits), decomposed=["conv"])
    assert "Identity" not in {n.op_type for n in new.graph.node}  # the dead weight path is cleaned up
    assert "W_raw" not in {i.name for i in new.graph.initializer}


def test_weight_behind_chained_identities_is_decomposed():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Identity", ["W_raw"], ["W1"], name="id1"),
        helper.make_node("Identity", ["W1"], ["W"], name="id2"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    _assert_full_rank_exact(_model(nodes, [numpy_helper.from_array(_w(rng, (12, 8, 3, 3)), "W_raw")]), decomposed=["conv"])


@pytest.mark.parametrize("perm", [[3, 2, 0, 1], None], ids=["hwio_to_oihw", "default_reverse"])
def test_weight_behind_transpose_is_decomposed(perm):
    """tf2onnx keeps Keras's HWIO kernel and inserts Transpose(perm=[3,2,0,1]) when it cannot fold it."""
    rng = np.random.default_rng(RNG_SEED)
    oihw = _w(rng, (16, 8, 3, 5))
    if perm is None:  # Transpose without perm reverses the axes: store the weight as WHIO
        stored = np.transpose(oihw, (3, 2, 1, 0))
        attrs = {}
    else:
        stored = np.transpose(oihw, (2, 3, 1, 0))  # HWIO
        attrs = {"perm": perm}
    nodes = [
        helper.make_node("Transpose", ["W_hwio"], ["W"], name="w_transpose", **attrs),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 2, 1, 2]),
    ]
    new, report = _assert_full_rank_exact(_model(nodes, [numpy_helper.from_array(stored, "W_hwio")]), decomposed=["conv"])
    assert report.layers[0].kernel == [16, 8, 3, 5]
    assert "Transpose" not in {n.op_type for n in new.graph.node}


def test_weight_behind_transpose_of_identity_of_constant_node():
    rng = np.random.default_rng(RNG_SEED)
    hwio = np.transpose(_w(rng, (16, 8, 3, 3)), (2, 3, 1, 0))
    nodes = [
        helper.make_node("Constant", [], ["W_c"], name="w_const", value=numpy_helper.from_array(hwio, "W_value")),
        helper.make_node("Identity", ["W_c"], ["W_i"], name="w_identity"),
        helper.make_node("Transpose", ["W_i"], ["W"], name="w_transpose", perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    _assert_full_rank_exact(_model(nodes, []), decomposed=["conv"])


def test_transposed_weight_also_used_elsewhere_keeps_the_other_consumer():
    """The Transpose output feeds the Conv and another op: the other op must still get its value."""
    rng = np.random.default_rng(RNG_SEED)
    hwio = np.transpose(_w(rng, (8, 8, 3, 3)), (2, 3, 1, 0))
    nodes = [
        helper.make_node("Transpose", ["W_hwio"], ["W"], name="w_transpose", perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceSum", ["W"], ["wsum"], name="wsum", keepdims=0),
        helper.make_node("Add", ["c", "wsum"], ["y"], name="add"),
    ]
    new, _ = _assert_full_rank_exact(_model(nodes, [numpy_helper.from_array(hwio, "W_hwio")]), decomposed=["conv"])
    assert "Transpose" in {n.op_type for n in new.graph.node}


def test_weight_from_constant_node_with_bias_from_constant_node():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="w_const", value=numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "Wv")),
        helper.make_node("Constant", [], ["B"], name="b_const", value=numpy_helper.from_array(_w(rng, (16, 1)).ravel(), "Bv")),
        helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", strides=[2, 2]),
    ]
    new, _ = _assert_full_rank_exact(_model(nodes, []), decomposed=["conv"])
    assert "w_const" not in {n.name for n in new.graph.node}


def test_weight_computed_at_run_time_is_left_alone_with_reason():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Mul", ["W_raw", "scale"], ["W"], name="w_scale"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W_raw"), numpy_helper.from_array(np.float32(2.0), "scale")]
    with pytest.raises(onnx_tucker.ModelError, match="Mul"):
        onnx_tucker.compress(_model(nodes, inits), ratio=1.0, force=True)


def test_weight_that_is_a_real_graph_input_is_left_alone():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="dynamic", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "W2"], ["y"], name="static", pads=[1, 1, 1, 1]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, ["N", 8, 10, 10]),
        helper.make_tensor_value_info("W", FLOAT, [8, 8, 3, 3]),
    ]
    model = _model(nodes, [numpy_helper.from_array(_w(rng, (8, 8, 3, 3)), "W2")], inputs=inputs)
    feeds = dict(_feeds(), W=_w(rng, (8, 8, 3, 3)))
    new, report = _assert_full_rank_exact(model, feeds, decomposed=["static"])
    assert "computed at run time" in _reasons(report)["dynamic"]
    assert [i.name for i in new.graph.input] == ["x", "W"]


# --- initializers that are also graph inputs ------------------------------------------------


@pytest.mark.parametrize("ir_version", [3, 8])
def test_initializer_also_graph_input_is_decomposed_and_inputs_stay_valid(ir_version):
    rng = np.random.default_rng(RNG_SEED)
    w, b = _w(rng, (16, 8, 3, 3)), _w(rng, (16, 1)).ravel()
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, ["N", 8, 10, 10]),
        helper.make_tensor_value_info("W", FLOAT, [16, 8, 3, 3]),
        helper.make_tensor_value_info("B", FLOAT, [16]),
    ]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = _model(nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")], inputs=inputs,
                   opset=9 if ir_version == 3 else 17, ir_version=ir_version)
    new, _ = _assert_full_rank_exact(model, decomposed=["conv"])
    inits = {i.name for i in new.graph.initializer}
    listed = {i.name for i in new.graph.input}
    assert new.ir_version == ir_version
    assert listed - inits == {"x"}  # the only input to feed is still x
    if ir_version < 4:
        assert inits <= listed  # IR 3 requires every initializer to be a graph input


# --- quantized weights ----------------------------------------------------------------------


def test_dequantize_linear_weight_is_left_alone_with_reason():
    rng = np.random.default_rng(RNG_SEED)
    wq = rng.integers(-127, 128, size=(16, 8, 3, 3), dtype=np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["W"], name="w_dq"),
        helper.make_node("Conv", ["x", "W"], ["q_out"], name="qconv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["q_out", "W2"], ["y"], name="fconv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(np.float32(0.01), "w_scale"),
        numpy_helper.from_array(np.int8(0), "w_zero"), numpy_helper.from_array(_w(rng, (16, 16, 3, 3)), "W2"),
    ]
    model = _model(nodes, inits)
    new, report = _assert_full_rank_exact(model, decomposed=["fconv"])
    assert "quantized" in _reasons(report)["qconv"]
    assert "DequantizeLinear" in {n.op_type for n in new.graph.node}
    assert "Wq" in {i.name for i in new.graph.initializer}


def test_only_quantized_convs_is_a_one_line_model_error():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "w_scale"], ["W"], name="w_dq"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="qconv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8, 3, 3), dtype=np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.01), "w_scale")]
    with pytest.raises(onnx_tucker.ModelError, match="quantized") as info:
        onnx_tucker.compress(_model(nodes, inits), ratio=0.5)
    assert "\n" not in str(info.value)


def test_int8_weight_initializer_is_left_alone_with_reason():
    """ConvInteger-style int8 weights fed straight to a Conv are invalid ONNX for Conv; a
    QLinearConv is not a Conv at all. Either way the tool must not touch the node."""
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"], ["yq"], name="qlinear", pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="ydq"),
    ]
    inits = [
        numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
        numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8, 3, 3), dtype=np.int8), "Wq"),
        numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
        numpy_helper.from_array(np.float32(0.05), "ys"), numpy_helper.from_array(np.uint8(128), "yz"),
    ]
    with pytest.raises(onnx_tucker.ModelError, match="no Conv"):
        onnx_tucker.compress(_model(nodes, inits), ratio=0.5)


# --- outputs and consumers ------------------------------------------------------------------


def test_conv_output_that_is_a_graph_output_keeps_its_name_and_value():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["feat"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["feat", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W1"), numpy_helper.from_array(_w(rng, (16, 16, 3, 3)), "W2"),
             numpy_helper.from_array(_w(rng, (16, 1)).ravel(), "B2")]
    model = _model(nodes, inits, outputs=("feat", "y"))
    new, _ = _assert_full_rank_exact(model, decomposed=["conv1", "conv2"])
    assert [o.name for o in new.graph.output] == ["feat", "y"]
    producers = {o: n for n in new.graph.node for o in n.output}
    assert producers["feat"].name == "conv1_tucker_out" and producers["y"].name == "conv2_tucker_out"


def test_conv_output_with_several_consumers_feeds_them_all():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["r", "m"], ["y"], name="add"),
    ]
    model = _model(nodes, [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W1")])
    new, _ = _assert_full_rank_exact(model, decomposed=["conv"])
    consumers = [n.name for n in new.graph.node if "c" in n.input]
    assert sorted(consumers) == ["mul", "relu", "sigmoid"]


def test_unnamed_conv_nodes_get_unique_derived_names():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "W2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W1"), numpy_helper.from_array(_w(rng, (16, 16, 3, 3)), "W2")]
    new, report = _assert_full_rank_exact(_model(nodes, inits))
    names = [n.name for n in new.graph.node]
    assert len(names) == len(set(names)) == 6 and all(names)
    assert len(report.decomposed) == 2


def test_generated_names_do_not_collide_with_existing_ones():
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_tucker_in_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_tucker_in_out"], ["conv_tucker_core_W"], name="conv_tucker_in"),
        helper.make_node("Identity", ["conv_tucker_core_W"], ["y"], name="conv_tucker_out"),
    ]
    _assert_full_rank_exact(_model(nodes, [numpy_helper.from_array(_w(rng, (16, 8, 3, 3)), "W")]), decomposed=["conv"])


# --- subgraphs ------------------------------------------------------------------------------


def _conv_body_graph(rng, name, out_name, x_name="x"):
    w = numpy_helper.from_array(_w(rng, (8, 8, 3, 3)), f"{name}_W")
    node = helper.make_node("Conv", [x_name, f"{name}_W"], [out_name], name=f"{name}_conv", pads=[1, 1, 1, 1])
    return node, w


def test_convs_inside_if_branches_are_left_alone_and_model_runs():
    rng = np.random.default_rng(RNG_SEED)
    then_node, then_w = _conv_body_graph(rng, "then", "then_y", x_name="top")
    else_node, else_w = _conv_body_graph(rng, "else", "else_y", x_name="top")
    then_g = helper.make_graph([then_node], "then", [], [helper.make_tensor_value_info("then_y", FLOAT, None)], [then_w])
    else_g = helper.make_graph([else_node], "else", [], [helper.make_tensor_value_info("else_y", FLOAT, None)], [else_w])
    nodes = [
        helper.make_node("Conv", ["x", "W_top"], ["top"], name="top_conv", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["N", 8, 10, 10]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    model = _model(nodes, [numpy_helper.from_array(_w(rng, (8, 8, 3, 3)), "W_top")], inputs=inputs)
    for cond in (True, False):
        feeds = dict(_feeds(), cond=np.array(cond))
        new, report = _assert_full_rank_exact(model, feeds, decomposed=["top_conv"])
    body_ops = [[n.op_type for n in attr.g.node] for n in new.graph.node if n.op_type == "If" for attr in n.attribute]
    assert body_ops == [["Conv"], ["Conv"]]
    assert [r.layer for r in report.layers] == ["top_conv"]


def test_only_convs_inside_a_loop_body_is_a_clean_model_error_and_never_broken():
    rng = np.random.default_rng(RNG_SEED)
    body_node, body_w = _conv_body_graph(rng, "body", "state_out", x_name="state_in")
    cond_copy = helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_copy")
    body = helper.make_graph(
        [body_node, cond_copy], "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", FLOAT, ["N", 8, 10, 10])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("state_out", FLOAT, ["N", 8, 10, 10])],
        [body_w],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)]
    model = _model(nodes, [numpy_helper.from_array(np.int64(2), "trip")], out_shape=["N", 8, 10, 10])
    run_model(model, _feeds())
    with pytest.raises(onnx_tucker.ModelError, match="no Conv"):
        onnx_tucker.compress(model, ratio=0.5, force=True)


def test_loop_body_conv_beside_top_level_conv_keeps_running():
    rng = np.random.default_rng(RNG_SEED)
    body_node, body_w = _conv_body_graph(rng, "body", "state_out", x_name="state_in")
    # the body also reads an outer-scope tensor produced by the top-level conv
    add = helper.make_node("Add", ["state_out", "top"], ["state_sum"], name="body_add")
    cond_copy = helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_copy")
    body = helper.make_graph(
        [body_node, add, cond_copy], "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", FLOAT, ["N", 8, 10, 10])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("state_sum", FLOAT, ["N", 8, 10, 10])],
        [body_w],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W_top"], ["top"], name="top_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Loop", ["trip", "", "top"], ["y"], name="loop", body=body),
    ]
    inits = [numpy_helper.from_array(_w(rng, (8, 8, 3, 3)), "W_top"), numpy_helper.from_array(np.int64(2), "trip")]
    new, report = _assert_full_rank_exact(_model(nodes, inits, out_shape=["N", 8, 10, 10]), decomposed=["top_conv"])
    new_half, _ = onnx_tucker.compress(_model(nodes, inits, out_shape=["N", 8, 10, 10]), ratio=0.5, force=True)
    onnx.checker.check_model(new_half)
    run_model(new_half, _feeds())


def test_pads_computed_from_constants_are_folded_so_macs_are_known():
    """torch's ZeroPad2d writes its pads as Constant -> Concat -> Reshape -> Cast: shape inference stops at the Pad
    (its pads are not an initializer), so the conv after it had no size. The sizes come from a folded copy."""
    from onnx_tucker.graph import infer_shapes

    rng = np.random.default_rng(RNG_SEED)
    half = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))  # noqa: E731
    nodes = [half("a", [0, 0, 1, 2]), half("b", [0, 0, 2, 1]),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=0),
             helper.make_node("Reshape", ["ab", "shape"], ["pads2"]),
             helper.make_node("Cast", ["pads2"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["padded"]),
             helper.make_node("Conv", ["padded", "w"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(np.array([8], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "zero_pad", [helper.make_tensor_value_info("x", FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert infer_shapes(model)["padded"] == (1, 8, 15, 15)
    new, report = onnx_tucker.compress(model, ratio=0.5)
    assert report.totals()["macs_known"] and report.decomposed[0].macs_before == 16 * 8 * 9 * 13 * 13
    x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
    assert run_model(new, {"x": x})[0].shape == run_model(model, {"x": x})[0].shape == (1, 16, 13, 13)


def test_a_dynamic_batch_channel_shuffle_keeps_the_sizes_known():
    """ShuffleNetV2's channel split and shuffle (chunk, view, transpose, reshape) with a dynamic batch: the reshape
    reads C, H and W off a tensor inside the graph (Shape -> Gather), which onnx-graphsurgeon folds only where those
    dims are known. Folding ran on a graph without inferred shapes, so every conv after the split was `unknown*`,
    even with --input-shape, and a MAC target met parameter counts. Shapes are inferred before folding now."""
    torch = pytest.importorskip("torch")
    import io

    from onnx_tucker.graph import infer_shapes
    from onnx_tucker.pipeline import factorable_sites

    class Shuffle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b = torch.nn.Conv2d(3, 16, 3, 1, 1), torch.nn.Conv2d(8, 8, 3, 1, 1)
            self.c = torch.nn.Conv2d(16, 32, 3, 2, 1)

        def forward(self, x):
            a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
            x = torch.cat([a, torch.relu(self.b(b))], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.c(x).mean((2, 3))

    buffer = io.BytesIO()
    torch.onnx.export(Shuffle().eval(), torch.zeros(1, 3, 16, 16), buffer, dynamo=False, opset_version=14, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load_from_string(buffer.getvalue())
    for shapes in (None, {"x": [1, 3, 16, 16]}):
        _, sites = factorable_sites(model, input_shapes=shapes)
        assert all(s.shape.known for s in sites), [s.name for s in sites if not s.shape.known]
        assert next(s for s in sites if s.name.startswith("/c/")).shape.macs() == 32 * 16 * 9 * 8 * 8
    assert None not in infer_shapes(model)[next(n.input[0] for n in model.graph.node if n.name.startswith("/c/"))][1:]
    _, report = onnx_tucker.compress(model, ratio=0.5)
    assert report.totals()["macs_known"]


@pytest.mark.parametrize("opset", [9, 13])
def test_a_static_torch_export_with_a_computed_flatten_counts_its_dense_macs(opset):
    """torch writes flatten(2) as a Reshape to a Concat of Shape slices; inference then gives the Reshape's output
    (and everything after it) no shape at all, so folding never ran (it ran only for dims that were None), and
    the dense layers' MACs were "unknown" although the input is static."""
    torch = pytest.importorskip("torch")
    import io

    from onnx_tucker.pipeline import factorable_sites

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16, 64), torch.nn.Linear(64, 10)

        def forward(self, x):
            tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
            return self.fc2(torch.relu(self.fc1(tokens)).mean(1))

    buffer = io.BytesIO()
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 16, 16),), buffer, opset_version=opset, dynamo=False,
                      input_names=["x"], output_names=["y"])
    _, sites = factorable_sites(onnx.load_from_string(buffer.getvalue()), layers=("kxk", "dense"))
    macs = {s.name: (s.shape.macs() if s.shape.known else None) for s in sites}
    assert macs["/fc1/MatMul"] == 256 * 16 * 64 and macs["/fc2/Gemm"] == 64 * 10, macs


def test_a_flatten_that_reads_a_free_batch_counts_its_dense_macs():
    """Keras's Flatten at opset <= 13 reshapes to Concat(Slice(Shape(x), batch), -1) through a Cast: with the batch
    free nothing folds, and the dense layer's MACs were "unknown" although every other size is fixed. The folding
    takes a free batch as 1, where the cost model counts."""
    from onnx_tucker.pipeline import factorable_sites

    rng = np.random.default_rng(0)
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4),
             helper.make_node("Shape", ["y"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], name="cast_f", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["sf"], ["si"], name="cast_i", to=TensorProto.INT64),
             helper.make_node("Slice", ["si", "zero", "one"], ["batch"], name="slice"),
             helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["y", "target"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "fc"], ["out"], name="fc")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((288, 10)).astype(np.float32), "fc"),
             ints("zero", [0]), ints("one", [1]), ints("minus_one", [-1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    _, sites = factorable_sites(model, layers=("kxk", "dense"))
    fc = next(s for s in sites if s.name == "fc")
    assert fc.shape.known and fc.shape.macs() == 288 * 10

"""The torch executor against onnxruntime: every operator and attribute variant, real models, errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import residual_model, run_model, torch_basic_block
from onnx_tucker.errors import ModelError, UsageError

torch = pytest.importorskip("torch")
from onnx_tucker.torch_exec import SUPPORTED_OPS, TorchGraph  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT = TensorProto.FLOAT


def _run_torch(model, feeds, **kwargs):
    module = TorchGraph(model, **kwargs)
    with torch.no_grad():
        outs = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [o.numpy() for o in outs]


def _assert_matches(model, feeds, rtol=1e-5):
    want = run_model(model, feeds)
    got = _run_torch(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "op_test", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 10
    # no onnx.checker: outputs are left without shapes; onnxruntime validates the graph
    return model


def _single(op, shapes, attrs=None, inits=None, opset=17, outputs=1, out_type=FLOAT, extra_inputs=()):
    """One ``op`` node fed by float inputs x0.. of ``shapes`` and the named initializers (in order)."""
    inits = inits or {}
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in zip(names, shapes)]
    node_inputs = names + list(inits) + list(extra_inputs)
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, node_inputs, outs, name=f"{op.lower()}_node", **(attrs or {}))
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    model = _model([node], inputs, [helper.make_tensor_value_info(o, out_type, None) for o in outs], tensors, opset)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    return model, feeds


def _w(*shape, seed=1):
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


# --- Conv -----------------------------------------------------------------------------------------

CONV_CASES = {
    "plain": ((2, 4, 9, 9), (6, 4, 3, 3), {}),
    "bias": ((2, 4, 9, 9), (6, 4, 3, 3), {"bias": True}),
    "strides_pads": ((2, 4, 11, 10), (6, 4, 3, 3), {"strides": [2, 3], "pads": [1, 1, 1, 1]}),
    "asymmetric_pads": ((1, 4, 8, 9), (5, 4, 3, 2), {"pads": [0, 2, 1, 0]}),
    "dilations": ((1, 4, 12, 12), (5, 4, 3, 3), {"dilations": [2, 3], "pads": [2, 3, 2, 3]}),
    "group": ((2, 8, 7, 7), (6, 4, 3, 3), {"group": 2, "pads": [1, 1, 1, 1], "bias": True}),
    "depthwise": ((2, 8, 7, 7), (8, 1, 3, 3), {"group": 8, "pads": [1, 1, 1, 1]}),
    "same_upper": ((1, 3, 10, 9), (4, 3, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "same_lower": ((1, 3, 10, 9), (4, 3, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "valid": ((1, 3, 10, 9), (4, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}),
    "kernel_shape_attr": ((1, 3, 6, 6), (4, 3, 3, 3), {"kernel_shape": [3, 3]}),
    "1d": ((2, 3, 17), (5, 3, 4), {"strides": [2], "pads": [1, 2], "dilations": [2], "bias": True}),
    "3d": ((1, 3, 6, 7, 5), (4, 3, 3, 2, 3), {"pads": [1, 0, 1, 1, 1, 0], "strides": [1, 2, 1]}),
    "1x1": ((2, 8, 5, 5), (3, 8, 1, 1), {"bias": True}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv(case):
    x_shape, w_shape, attrs = CONV_CASES[case]
    attrs = dict(attrs)
    inits = {"W": _w(*w_shape)}
    if attrs.pop("bias", False):
        inits["B"] = np.random.default_rng(2).standard_normal(w_shape[0]).astype(np.float32)
    _assert_matches(*_single("Conv", [x_shape], attrs, inits))


CONV_TRANSPOSE_CASES = {
    "stride2": ((2, 4, 5, 5), (4, 6, 2, 2), {"strides": [2, 2], "bias": True}),  # a U-Net's upsampling
    "pads": ((1, 4, 6, 7), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "asymmetric_pads_output_padding": ((1, 4, 6, 5), (4, 3, 3, 3), {"strides": [2, 3], "pads": [0, 1, 1, 0],
                                                                     "output_padding": [1, 2], "bias": True}),
    "dilations_group": ((1, 4, 5, 5), (4, 2, 3, 3), {"dilations": [2, 1], "group": 2}),
    "valid": ((1, 3, 4, 4), (3, 5, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}),
    "1d": ((2, 3, 9), (3, 4, 4), {"strides": [2], "pads": [1, 1], "bias": True}),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES))
def test_conv_transpose(case):
    x_shape, w_shape, attrs = CONV_TRANSPOSE_CASES[case]
    attrs = dict(attrs)
    inits = {"W": _w(*w_shape)}
    if attrs.pop("bias", False):
        inits["B"] = np.random.default_rng(2).standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32)
    _assert_matches(*_single("ConvTranspose", [x_shape], attrs, inits))


RESIZE_CASES = {  # (x shape, attrs, scales, sizes, opset): what torch.onnx writes for nn.Upsample and interpolate
    "nearest_asymmetric_floor_x2": ((1, 3, 4, 5), {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                   "nearest_mode": "floor"}, [1, 1, 2, 2], None, 17),
    "nearest_sizes": ((2, 2, 3, 4), {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                     "nearest_mode": "floor"}, None, [2, 2, 7, 9], 17),
    "bilinear_pytorch_half_pixel": ((1, 3, 4, 5), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                    [1, 1, 2, 2], None, 17),
    "bilinear_half_pixel_sizes": ((1, 2, 5, 4), {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
                                  None, [1, 2, 10, 12], 13),
    "bilinear_align_corners": ((1, 2, 4, 4), {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
                               [1, 1, 2.5, 2], None, 17),
    "linear_1d": ((2, 3, 6), {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, [1, 1, 2], None, 17),
    # pytorch_half_pixel maps an output axis of length 1 to input coordinate 0 (onnxruntime: the first row), not the centre
    "bilinear_pytorch_half_pixel_to_one_row": ((1, 1, 5, 7), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                               None, [1, 1, 1, 7], 13),
    "bilinear_pytorch_half_pixel_to_one_pixel": ((2, 3, 5, 6), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                                 None, [2, 3, 1, 1], 17),
    "bilinear_pytorch_half_pixel_one_column_scales": ((1, 2, 4, 5), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                                      [1, 1, 2, 0.2], None, 17),
    "linear_1d_pytorch_half_pixel_to_one": ((2, 3, 6), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                            None, [2, 3, 1], 17),
    "bilinear_half_pixel_to_one_row": ((1, 2, 5, 7), {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
                                       None, [1, 2, 1, 14], 17),  # half_pixel keeps the centre
}


@pytest.mark.parametrize("case", list(RESIZE_CASES))
def test_resize(case):
    x_shape, attrs, scales, sizes, opset = RESIZE_CASES[case]
    inits = {"roi": np.zeros(0, np.float32), "scales": np.asarray(scales or [], np.float32)}
    if sizes is not None:
        inits["sizes"] = np.asarray(sizes, np.int64)
    _assert_matches(*_single("Resize", [x_shape], attrs, inits, opset=opset))


def test_upsample_opset9():
    _assert_matches(*_single("Upsample", [(1, 2, 3, 4)], {"mode": "nearest"}, {"scales": np.array([1, 1, 2, 3], np.float32)}, opset=9))


def test_resize_modes_torch_cannot_match_are_one_line_errors():
    model, _ = _single("Resize", [(1, 2, 4, 4)], {"mode": "cubic"}, {"roi": np.zeros(0, np.float32),
                                                                      "scales": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(ModelError, match="Resize mode 'cubic' with coordinate_transformation_mode 'half_pixel' is not supported"):
        TorchGraph(model)(torch.zeros(1, 2, 4, 4))


# --- Gemm, MatMul, elementwise ---------------------------------------------------------------------

GEMM_CASES = {
    "plain": ((4, 5), (5, 3), None, {}),
    "transA": ((5, 4), (5, 3), None, {"transA": 1}),
    "transB": ((4, 5), (3, 5), (3,), {"transB": 1}),
    "both_alpha_beta": ((5, 4), (3, 5), (4, 3), {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "scalar_c": ((4, 5), (5, 3), (1,), {"beta": -1.5}),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm(case):
    a, b, c, attrs = GEMM_CASES[case]
    inits = {"B": _w(*b)}
    if c is not None:
        inits["C"] = np.random.default_rng(3).standard_normal(c).astype(np.float32)
    _assert_matches(*_single("Gemm", [a], attrs, inits))


@pytest.mark.parametrize("shapes", [[(4, 5), (5, 3)], [(2, 3, 4, 5), (5, 6)], [(2, 1, 4, 5), (3, 5, 2)]])
def test_matmul(shapes):
    _assert_matches(*_single("MatMul", shapes))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", [[(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (4,)], [(2, 1, 4), (3, 1)]])
def test_binary(op, shapes):
    model, feeds = _single(op, shapes)
    if op == "Div":
        feeds["x1"] = np.where(np.abs(feeds["x1"]) < 0.1, 0.5, feeds["x1"]).astype(np.float32)
    _assert_matches(model, feeds)


def test_binary_with_initializer_constant():
    _assert_matches(*_single("Mul", [(2, 3, 4)], inits={"k": np.float32(2.5)}))


@pytest.mark.parametrize(
    "op,attrs",
    [
        ("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("HardSwish", {}),
        ("HardSigmoid", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("LeakyRelu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Identity", {}),
        ("Exp", {}), ("Neg", {}), ("Abs", {}), ("Erf", {}),
    ],
)
def test_unary(op, attrs):
    model, feeds = _single(op, [(2, 3, 5, 4)], attrs)
    feeds["x0"] *= 4  # reach the flat parts of HardSigmoid and HardSwish
    _assert_matches(model, feeds)


@pytest.mark.parametrize("bounds", [("lo", "hi"), ("lo",), ("", "hi"), ()])
def test_clip_inputs(bounds):
    values = {"lo": np.float32(-0.5), "hi": np.float32(0.7)}
    inits = {b: values[b] for b in bounds if b}
    model, feeds = _single("Clip", [(3, 4, 5)], inits=inits)
    if bounds and bounds[0] == "":  # an empty name skips ``min``
        node = model.graph.node[0]
        del node.input[:]
        node.input.extend(["x0", "", "hi"])
    _assert_matches(model, feeds)


def test_clip_attributes_opset6():
    _assert_matches(*_single("Clip", [(3, 4, 5)], {"min": -0.2, "max": 0.3}, opset=6))


# --- pools -----------------------------------------------------------------------------------------

POOL_CASES = {
    "plain": ((2, 3, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "overlapping": ((2, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2]}),
    "pads": ((1, 3, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "asymmetric_pads": ((1, 3, 7, 8), {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}),
    "ceil": ((1, 3, 9, 10), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "ceil_pads": ((1, 3, 9, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "ceil_drop_last": ((1, 2, 6, 6), {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "same_upper": ((1, 3, 9, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower": ((1, 3, 9, 10), {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "valid": ((1, 3, 9, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    "1d": ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    "3d": ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "strides": [2, 1, 2], "pads": [0, 1, 0, 1, 1, 1]}),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_maxpool(case):
    shape, attrs = POOL_CASES[case]
    _assert_matches(*_single("MaxPool", [shape], attrs))


@pytest.mark.parametrize("case", ["plain", "pads", "ceil_pads"])
def test_maxpool_dilations(case):
    shape, attrs = POOL_CASES[case]
    _assert_matches(*_single("MaxPool", [(1, 3, 13, 12)], {**attrs, "dilations": [2, 2]}))


@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_average_pool(case, include):
    shape, attrs = POOL_CASES[case]
    _assert_matches(*_single("AveragePool", [shape], {**attrs, "count_include_pad": include}))


@pytest.mark.parametrize("include", [0, 1])
def test_average_pool_dilations_opset19(include):
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2], "count_include_pad": include}
    _assert_matches(*_single("AveragePool", [(1, 3, 13, 12)], attrs, opset=19))


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 3, 7), (1, 2, 3, 4, 5)])
def test_global_pool(op, shape):
    _assert_matches(*_single(op, [shape]))


# --- shapes, layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1, 4])
def test_flatten(axis):
    _assert_matches(*_single("Flatten", [(2, 3, 4, 5)], {"axis": axis}))


@pytest.mark.parametrize(
    "shape,allowzero,out",
    [([6, -1], 0, None), ([0, -1], 0, None), ([0, 3, 0, 5], 0, None), ([2, 0, 4], 1, [2, 0, 4]), ([-1], 0, None)],
)
def test_reshape(shape, allowzero, out):
    in_shape = (2, 0, 3) if allowzero else (2, 3, 4, 5)
    if allowzero:
        shape = [0, 2, 3]
    model, feeds = _single("Reshape", [in_shape], {"allowzero": allowzero}, {"shape": np.array(shape, np.int64)}, opset=18)
    _assert_matches(model, feeds)


@pytest.mark.parametrize("perm", [[0, 3, 1, 2], [0, 2, 3, 1], [3, 2, 1, 0], None])
def test_transpose(perm):
    _assert_matches(*_single("Transpose", [(2, 3, 4, 5)], {"perm": perm} if perm else {}))


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_concat(axis):
    _assert_matches(*_single("Concat", [(2, 3, 4), (2, 3, 4), (2, 3, 4)], {"axis": axis}))


@pytest.mark.parametrize("epsilon", [1e-5, 1e-3])
def test_batchnorm(epsilon):
    rng = np.random.default_rng(4)
    inits = {
        "scale": rng.uniform(0.5, 1.5, 6).astype(np.float32), "bias": rng.standard_normal(6).astype(np.float32),
        "mean": rng.standard_normal(6).astype(np.float32), "var": rng.uniform(0.5, 2, 6).astype(np.float32),
    }
    _assert_matches(*_single("BatchNormalization", [(2, 6, 5, 4)], {"epsilon": epsilon}, inits))


@pytest.mark.parametrize("opset,attrs", [(13, {}), (13, {"axis": 1}), (11, {}), (11, {"axis": 2}), (17, {"axis": -2})])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, opset, attrs):
    model, feeds = _single(op, [(2, 3, 4)], attrs, opset=opset)
    feeds["x0"] *= 5
    _assert_matches(model, feeds)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
    inits = {"pads": pads}
    if mode == "constant":
        inits["value"] = np.array(1.5, np.float32)
    _assert_matches(*_single("Pad", [(2, 3, 5, 6)], {"mode": mode}, inits, opset=13))


def test_pad_constant_axes_opset18_and_negative():
    inits = {"pads": np.array([2, -1, 1, 3], np.int64), "value": np.array(-2.0, np.float32), "axes": np.array([1, -1], np.int64)}
    _assert_matches(*_single("Pad", [(2, 3, 5, 6)], {}, inits, opset=18))


def test_pad_attributes_opset2():
    _assert_matches(*_single("Pad", [(2, 3, 5, 6)], {"pads": [0, 1, 1, 0, 0, 0, 2, 1], "value": 0.5}, opset=2))


def test_constant_variants():
    nodes = [
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32))),
        helper.make_node("Constant", [], ["c2"], value_float=2.0),
        helper.make_node("Constant", [], ["c3"], value_floats=[1.0, -1.0, 0.5, 3.0]),
        helper.make_node("Add", ["x0", "c1"], ["a"]),
        helper.make_node("Mul", ["a", "c2"], ["b"]),
        helper.make_node("Sub", ["b", "c3"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x0", FLOAT, [3, 4])], [helper.make_tensor_value_info("y", FLOAT, None)])
    _assert_matches(model, {"x0": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)})


def _flatten_by_shape(opset):
    """torch.onnx's x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    unsq = (helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]) if opset < 13
            else helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]))
    nodes = [
        helper.make_node("Shape", ["x0"], ["s"]),
        helper.make_node("Constant", [], ["i0"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        unsq,
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x0", "shape"], ["y"]),
        helper.make_node("Cast", ["s"], ["y_shape"], to=TensorProto.FLOAT),
    ]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "minus1"), numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    if opset < 13:
        inits = inits[:1]
    return _model(
        nodes, [helper.make_tensor_value_info("x0", FLOAT, ["N", 3, 4, 5])],
        [helper.make_tensor_value_info("y", FLOAT, None), helper.make_tensor_value_info("y_shape", FLOAT, None)], inits, opset,
    )


@pytest.mark.parametrize("opset", [11, 17])
def test_shape_gather_unsqueeze_concat_reshape_cast(opset):
    _assert_matches(_flatten_by_shape(opset), {"x0": np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)})


def test_shape_start_end():
    _assert_matches(*_single("Shape", [(2, 3, 4, 5)], {"start": 1, "end": -1}, opset=15, out_type=TensorProto.INT64))


@pytest.mark.parametrize("indices", [np.array([2, 0, -1], np.int64), np.array([[1, 0], [3, 3]], np.int64), np.array(1, np.int64)])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather(indices, axis):
    _assert_matches(*_single("Gather", [(4, 5, 6)], {"axis": axis}, {"idx": indices}))


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("shape,axes", [((2, 1, 3), [1]), ((1, 3, 1, 4, 1), [0, -1]), ((1, 3, 1, 4, 1), None)])
def test_squeeze(opset, shape, axes):
    if axes is None:
        model, feeds = _single("Squeeze", [shape], opset=opset)
    elif opset < 13:
        model, feeds = _single("Squeeze", [shape], {"axes": axes}, opset=opset)
    else:
        model, feeds = _single("Squeeze", [shape], inits={"axes": np.array(axes, np.int64)}, opset=opset)
    _assert_matches(model, feeds)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [[0], [1, -1], [3, 0]])
def test_unsqueeze(opset, axes):
    if opset < 13:
        model, feeds = _single("Unsqueeze", [(3, 4)], {"axes": axes}, opset=opset)
    else:
        model, feeds = _single("Unsqueeze", [(3, 4)], inits={"axes": np.array(axes, np.int64)}, opset=opset)
    _assert_matches(model, feeds)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes,keepdims", [([2, 3], 1), ([-1], 0), (None, 1), (None, 0)])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
def test_reduce(op, opset, axes, keepdims):
    since = 13 if op == "ReduceSum" else 18
    if axes is None:
        model, feeds = _single(op, [(2, 3, 4, 5)], {"keepdims": keepdims}, opset=opset)
    elif opset < since:
        model, feeds = _single(op, [(2, 3, 4, 5)], {"axes": axes, "keepdims": keepdims}, opset=opset)
    else:
        model, feeds = _single(op, [(2, 3, 4, 5)], {"keepdims": keepdims}, {"axes": np.array(axes, np.int64)}, opset=opset)
    _assert_matches(model, feeds)


def test_cast_float_to_int_and_back():
    nodes = [
        helper.make_node("Mul", ["x0", "ten"], ["m"]),
        helper.make_node("Cast", ["m"], ["i"], to=TensorProto.INT64),
        helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x0", FLOAT, [3, 4])], [helper.make_tensor_value_info("y", FLOAT, None)],
                   [numpy_helper.from_array(np.array(10, np.float32), "ten")])
    _assert_matches(model, {"x0": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)})


# --- whole models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10_cnn.onnx", "cifar10_resnet.onnx"])
def test_shipped_models(name):
    model = onnx.load(str(MODELS / name))
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    _assert_matches(model, {model.graph.input[0].name: x})


def test_shipped_model_on_real_images():
    model = onnx.load(str(MODELS / "cifar10_cnn.onnx"))
    with np.load(MODELS / "cifar10_test_sample.npz") as data:
        x = data["x_test"][:32].astype(np.float32)
    want = run_model(model, {"pixels": x})[0]
    got = _run_torch(model, {"pixels": x})[0]
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conftest_residual_model():
    model = residual_model()
    _assert_matches(model, {"x": np.random.default_rng(0).standard_normal((3, 3, 10, 10)).astype(np.float32)})


def _torch_small_net():
    nn = torch.nn

    Block = torch_basic_block(torch)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.MaxPool2d(3, 2, 1, ceil_mode=True))
            self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
            self.side = nn.Sequential(nn.Conv2d(32, 8, 1), nn.Hardswish(), nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))
            self.head = nn.Linear(32 + 8, 10)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            s = self.side(x).mean(dim=(2, 3))
            f = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return torch.softmax(self.head(torch.cat([f, s], 1)), dim=1)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("folding", [True, False])
def test_torch_exported_small_resnet(folding):
    net = _torch_small_net()
    buf = io.BytesIO()
    kwargs = {} if folding else {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
    torch.onnx.export(net, (torch.randn(1, 3, 20, 20),), buf, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["probs"], dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}}, **kwargs)
    model = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Clip", "MaxPool", "HardSwish", "AveragePool", "ReduceMean", "Gemm", "Concat", "Softmax"} <= ops
    if not folding:
        assert "BatchNormalization" in ops
    x = np.random.default_rng(0).standard_normal((4, 3, 20, 20)).astype(np.float32)
    _assert_matches(model, {"images": x})
    with torch.no_grad():  # and the executor agrees with the torch module itself
        np.testing.assert_allclose(_run_torch(model, {"images": x})[0], net(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


# --- parameters, outputs, errors ------------------------------------------------------------------------


def test_float16_trainables_are_float32_masters_read_as_float16():
    """Adam on float16 values writes NaN on its first step (its epsilon is 0 in float16): a float16 initializer
    trains as a float32 master; the graph still computes in float16, and it goes back as float16."""
    from conftest import conv_model

    model = conv_model(dtype=np.float16)
    module = TorchGraph(model, trainable=["W"])
    (param,) = module.onnx_parameters().values()
    assert param.dtype == torch.float32
    x = np.random.default_rng(0).standard_normal((4, 8, 12, 12)).astype(np.float16)
    _assert_matches(model, {"x": x}, rtol=1e-2)  # float16 out, as onnxruntime computes it
    optimizer = torch.optim.Adam([param], lr=1e-3)
    for _ in range(3):
        (y,) = module(torch.from_numpy(x))
        assert y.dtype == torch.float16
        loss = (y.float() - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(param).all()
    trained = module.trained_arrays()["W"]
    assert trained.dtype == np.float16 and np.all(np.isfinite(trained))
    out = module.write_back(model)
    w = {i.name: i for i in out.graph.initializer}["W"]
    assert w.data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(w), trained)
    assert not np.array_equal(trained, numpy_helper.to_array({i.name: i for i in model.graph.initializer}["W"]))


def test_trainable_parameters_get_gradients_and_write_back():
    model = residual_model()
    module = TorchGraph(model, trainable=["W2", "B2"])
    params = module.onnx_parameters()
    assert set(params) == {"W2", "B2"}
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())
    assert len(list(module.parameters())) == 2
    assert len(list(module.buffers())) == len(model.graph.initializer) - 2
    (y,) = module(torch.randn(2, 3, 10, 10))
    y.square().sum().backward()
    assert params["W2"].grad is not None and params["W2"].grad.abs().sum() > 0
    with torch.no_grad():
        params["W2"].mul_(2)
    out = module.write_back(model)
    new = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    old = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(new["W2"], 2 * old["W2"])
    for name in old:
        if name != "W2":
            np.testing.assert_array_equal(new[name], old[name])
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]


def test_intermediate_outputs_run_only_what_they_need():
    model = residual_model()
    module = TorchGraph(model, outputs=["s", "logits"])
    assert [s[4] for s in module._steps] == ["Conv", "Relu", "Conv", "Add", "Conv", "Conv", "Conv", "GlobalAveragePool", "Flatten"]
    early = TorchGraph(model, outputs=["a_r"])
    assert len(early._steps) == 2
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    with torch.no_grad():
        s, logits = module(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_positional_and_named_inputs_agree():
    model = residual_model()
    module = TorchGraph(model)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(module(x)[0], module(x=x)[0])
    with pytest.raises(UsageError, match="missing graph input 'x'"):
        module()


def test_unsupported_op_is_one_line_model_error():
    node = helper.make_node("Einsum", ["x0", "x0"], ["y"], name="my_einsum", equation="ij,ij->i")
    model = _model([node], [helper.make_tensor_value_info("x0", FLOAT, [2, 3])], [helper.make_tensor_value_info("y", FLOAT, None)])
    with pytest.raises(ModelError) as info:
        TorchGraph(model)
    text = str(info.value)
    assert "\n" not in text
    assert "'Einsum'" in text and "my_einsum" in text


def test_custom_domain_op_is_refused():
    node = helper.make_node("FusedConv", ["x0"], ["y"], name="fused", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x0", FLOAT, [2, 3])], [helper.make_tensor_value_info("y", FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ModelError, match="unsupported op 'com.microsoft.FusedConv' \\(node 'fused'\\)"):
        TorchGraph(model)


def test_maxpool_indices_output_is_refused():
    node = helper.make_node("MaxPool", ["x0"], ["y", "idx"], name="mp", kernel_shape=[2, 2])
    model = _model([node], [helper.make_tensor_value_info("x0", FLOAT, [1, 1, 4, 4])],
                   [helper.make_tensor_value_info("y", FLOAT, None), helper.make_tensor_value_info("idx", TensorProto.INT64, None)])
    with pytest.raises(ModelError, match="MaxPool"):
        TorchGraph(model)


def test_trainable_must_be_a_float_initializer():
    with pytest.raises(UsageError, match="'nope' is not an initializer"):
        TorchGraph(residual_model(), trainable=["nope"])
    model, _ = _single("Reshape", [(2, 3)], inits={"shape": np.array([-1], np.int64)})
    with pytest.raises(UsageError, match="not a float tensor"):
        TorchGraph(model, trainable=["shape"])


def test_supported_ops_cover_the_brief():
    brief = {
        "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
        "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Concat", "BatchNormalization",
        "Softmax", "Pad", "Identity", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "ReduceMean",
    }
    assert brief <= SUPPORTED_OPS


def test_inputs_cut_the_graph_there():
    """Fed the skip and the stem's output, the cut graph runs only what follows and matches onnxruntime."""
    import torch

    model = residual_model()
    x = np.random.default_rng(3).standard_normal((2, 3, 10, 10)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in ("a_r", "s"):
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    _, a_r, s = run_model(probe, {"x": x})
    cut = TorchGraph(model, ["W2"], outputs=["s"], inputs=["a_r"])
    assert [step[5] for step in cut._steps] == ["block_conv", "skip_add"]  # the stem does not run
    got = cut(torch.from_numpy(a_r))[0].detach().numpy()
    np.testing.assert_allclose(got, s, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="missing graph input 'a_r'"):
        cut(x=torch.from_numpy(x))


def test_a_model_fixed_to_batch_1_runs_any_batch_in_slices(tmp_path):
    """torch.onnx bakes batch 1 into a flatten's Reshape: a batch of 5 at once would be wrong (or fail), so the
    executor runs the graph a sample at a time and the result equals onnxruntime's, sample by sample."""
    from conftest import torch_fixed_batch_net

    model = onnx.load(torch_fixed_batch_net(tmp_path / "fixed.onnx"))
    assert [n.op_type for n in model.graph.node].count("Reshape") == 1
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    want = np.concatenate([run_model(model, {"input": x[i : i + 1]})[0] for i in range(5)])
    module = TorchGraph(model)
    assert module.fixed_batch == 1
    got = module(torch.from_numpy(x))[0]
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    trained = TorchGraph(model, [i.name for i in model.graph.initializer if i.name.endswith("weight")][:1])
    trained(torch.from_numpy(x))[0].sum().backward()  # the slices keep the autograd graph
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.parameters())


@pytest.mark.parametrize("axis, shapes", [(-1, ((2, 5, 8), (8,), (8,))), (1, ((2, 3, 4, 5), (3, 4, 5), (3, 4, 5))),
                                          (-2, ((2, 3, 6, 4), (6, 4), None))])
def test_layer_normalization(axis, shapes):
    x_shape, scale_shape, bias_shape = shapes
    inits = {"scale": np.random.default_rng(3).standard_normal(scale_shape).astype(np.float32)}
    if bias_shape is not None:
        inits["bias"] = np.random.default_rng(4).standard_normal(bias_shape).astype(np.float32)
    _assert_matches(*_single("LayerNormalization", [x_shape], {"axis": axis, "epsilon": 1e-4}, inits, opset=17), rtol=1e-4)


# --- Slice, Split, ConstantOfShape, Gelu (torch's chunk and x.shape slicing, ZeroPad2d's pads, the dynamo exporter) --

SLICE_CASES = {
    "basic": ([1, 0], [3, 4], [0, 2], None),
    "negative_and_clamped": ([-3, 0], [2**62, -1], [1, -1], None),
    "steps": ([0, 1], [5, 6], [1, 2], [2, 3]),
    "reverse": ([-1, 4], [-2**62, 0], [0, 2], [-1, -2]),
    "empty": ([3], [1], [1], None),
    "empty_steps": ([3, 4], [1, 5], [1, 2], [2, -1]),
    "reverse_to_int64_max": ([-1, 5], [2**63 - 1, 2**31 - 1], [2, 1], [-1, -2]),  # onnxruntime: through the first element
}


@pytest.mark.parametrize("case", list(SLICE_CASES))
def test_slice(case):
    starts, ends, axes, steps = SLICE_CASES[case]
    inits = {"starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64), "axes": np.array(axes, np.int64)}
    if steps is not None:
        inits["steps"] = np.array(steps, np.int64)
    _assert_matches(*_single("Slice", [(4, 5, 6)], inits=inits, opset=13))


def test_slice_attributes_opset9():
    _assert_matches(*_single("Slice", [(4, 5, 6)], {"starts": [1, -4], "ends": [100, -1], "axes": [0, 2]}, opset=9))


@pytest.mark.parametrize("opset, attrs, inits, outputs", [
    (11, {"axis": 1, "split": [2, 3]}, None, 2),
    (13, {"axis": -1}, {"split": np.array([1, 4, 1], np.int64)}, 3),
    (13, {"axis": 1}, None, 5),
    (18, {"axis": 2, "num_outputs": 4}, None, 4),
])
def test_split(opset, attrs, inits, outputs):
    shape = (2, 5, 7) if opset == 18 else (2, 5, 6)  # opset 18: 7 in 4 parts of ceil(7/4) = 2: 2, 2, 2, 1
    _assert_matches(*_single("Split", [shape], attrs, inits, opset=opset, outputs=outputs))


@pytest.mark.parametrize("value", [None, np.array([1.5], np.float32), np.array([3], np.int64)])
def test_constant_of_shape(value):
    """ZeroPad2d's torch export builds its pads with it; fed by a Shape here, as there."""
    attrs = {"value": numpy_helper.from_array(value)} if value is not None else {}
    out_type = TensorProto.INT64 if value is not None and value.dtype == np.int64 else FLOAT
    nodes = [helper.make_node("Shape", ["x0"], ["s"], start=1), helper.make_node("ConstantOfShape", ["s"], ["y0"], **attrs)]
    model = _model(nodes, [helper.make_tensor_value_info("x0", FLOAT, [2, 3, 4])], [helper.make_tensor_value_info("y0", out_type, None)])
    _assert_matches(model, {"x0": np.zeros((2, 3, 4), np.float32)})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    _assert_matches(*_single("Gelu", [(3, 7)], {"approximate": approximate}, opset=20), rtol=1e-5)


@pytest.mark.parametrize("fmod, dtype", [(0, np.int64), (1, np.int64), (1, np.float32)])
def test_mod(fmod, dtype):
    """torch's attention export computes head counts with it (integers); fmod=1 also on floats."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)
    model = _model([node], [helper.make_tensor_value_info("a", elem, [6]), helper.make_tensor_value_info("b", elem, [6])],
                   [helper.make_tensor_value_info("y", elem, None)])
    feeds = {"a": np.array([7, -7, 7, -7, 0, 5], dtype), "b": np.array([3, 3, -3, -3, 2, 5], dtype)}
    _assert_matches(model, feeds)


def test_a_graph_whose_nodes_are_not_in_order_runs():
    """onnxruntime's float16 converter appends its input Casts after their readers: a TorchGraph of such a model (the
    CUDA teacher of --distill) failed with KeyError on the Cast's output. The executor sorts a copy first."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_tucker.torch_exec import TorchGraph

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["xr", "w"], ["y"], name="conv", pads=[1] * 4),  # reads what the next node makes
             helper.make_node("Relu", ["x"], ["xr"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    want = np.einsum("oihw,nihw->no", numpy_helper.to_array(w), np.pad(np.maximum(x, 0), ((0, 0), (0, 0), (1, 1), (1, 1)))[:, :, 0:3, 0:3])
    got = TorchGraph(model)(torch.from_numpy(x))[0].detach().numpy()
    assert got.shape == (2, 8, 6, 6) and np.allclose(got[:, :, 0, 0], want, atol=1e-4)
    assert [n.name for n in model.graph.node] == ["conv", "relu"]  # the caller's model is left as it was

"""Sites and the one Conv geometry parser: defaults, explicit pads, SAME_* resolved, bad attributes refused."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.pipeline import factorable_sites
from onnx_tucker.site import Geometry, GeometryError, conv_geometry


def test_defaults_fill_in_strides_dilations_and_zero_pads():
    g = conv_geometry({}, (8, 4, 3, 3))
    assert g == Geometry(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), group=1, auto_pad="NOTSET")
    assert g.output_spatial((10, 12)) == (8, 10) and g.as_2d() == ([3, 3], [1, 1], [0, 0, 0, 0], [1, 1])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("size, stride, dilation", [((9, 10), (2, 2), (1, 1)), ((7, 8), (1, 3), (2, 1)), ((5, 5), (3, 1), (1, 2))])
def test_auto_pad_resolves_to_the_padding_onnxruntime_uses(auto_pad, size, stride, dilation):
    """SAME_* is resolved from the input size; the explicit pads give onnxruntime's own output, value for value."""
    if auto_pad != "VALID" and dilation != (1, 1):
        pytest.skip("onnxruntime has no dilated SAME_* Conv to compare with")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    x = rng.standard_normal((1, 3, *size)).astype(np.float32)
    attrs = {"auto_pad": auto_pad, "strides": list(stride), "dilations": list(dilation)}
    g = conv_geometry({k: (v.encode() if isinstance(v, str) else v) for k, v in attrs.items()}, w.shape, size)

    def run(**conv_attrs):
        node = helper.make_node("Conv", ["x", "W"], ["y"], **conv_attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    expected = run(**attrs)
    got = run(pads=list(g.pads), strides=list(stride), dilations=list(dilation))
    assert got.shape[2:] == g.output_spatial(size) == expected.shape[2:]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_same_padding_without_input_size_is_unknown_not_guessed():
    g = conv_geometry({"auto_pad": b"SAME_UPPER"}, (8, 4, 3, 3), None)
    assert g.pads is None and g.as_2d() is None
    with pytest.raises(GeometryError):
        g.output_spatial((8, 8))


@pytest.mark.parametrize("attrs, needle", [
    ({"strides": [0, 1]}, "invalid strides"), ({"dilations": [1]}, "invalid dilations"),
    ({"pads": [1, 1, -1, 1]}, "invalid pads"), ({"pads": [1, 1]}, "invalid pads"),
    ({"kernel_shape": [5, 5]}, "does not match weight"), ({"auto_pad": b"SOMETIMES"}, "invalid auto_pad"),
])
def test_bad_attributes_are_refused_with_the_reason(attrs, needle):
    with pytest.raises(GeometryError, match=needle):
        conv_geometry(attrs, (8, 4, 3, 3), (8, 8))


def _model_with(nodes, inits, c_in=8):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 8, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sites_are_typed_records_with_names_shapes_geometry_and_kind():
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    model = _model_with([
        helper.make_node("Conv", ["x", "A"], ["a"], name="kxk", pads=[1] * 4),
        helper.make_node("Conv", ["a", "B"], ["b"], name="pointwise"),
        helper.make_node("Conv", ["b", "D"], ["c"], name="dw", group=16, pads=[1] * 4, strides=[2, 2]),
    ], [w("A", (16, 8, 3, 3)), w("B", (16, 16, 1, 1)), w("D", (16, 1, 3, 3))])
    _, sites = factorable_sites(model)
    kxk, pointwise, dw = sites
    assert (kxk.kind, pointwise.kind, dw.kind) == ("conv", "conv1x1", "depthwise")
    assert kxk.eligible and kxk.form == "tucker2" and kxk.weight.shape == (16, 8, 3, 3)
    assert (kxk.input_name, kxk.output_name, kxk.input_shape, kxk.output_shape) == ("x", "a", (1, 8, 8, 8), (1, 16, 8, 8))
    assert dw.geometry.strides == (2, 2) and dw.geometry.group == 16 and dw.shape.out_spatial == (4, 4)
    assert "1x1 conv" in pointwise.reason and "depthwise conv (group=16)" in dw.reason
    assert pointwise.weight is None and dw.weight is None  # no form takes them: their weights are not held


def test_attention_projections_count_every_token():
    """torch's nn.MultiheadAttention runs its input projection on a sequence-first (L, N, E) tensor and its output one
    on (L*N, E): taking axis 0 as the batch counted them for one token of 64. Rows are every axis but the features',
    over the model's batch, as for the (N, L, E) MLP."""
    torch = pytest.importorskip("torch")
    import io

    import onnx

    from onnx_tucker.pipeline import factorable_sites

    class Block(torch.nn.Module):
        def __init__(self, dim=32):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, dim, 4, 4)
            self.attn = torch.nn.MultiheadAttention(dim, 4, batch_first=True)
            self.mlp = torch.nn.Linear(dim, dim)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 32)
            return self.mlp(x + self.attn(x, x, x, need_weights=False)[0]).mean(1)

    for batch, dynamic in ((1, True), (2, False)):
        buffer = io.BytesIO()
        torch.onnx.export(Block().eval(), torch.zeros(batch, 3, 16, 16), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
        model = onnx.load_from_string(buffer.getvalue())
        _, sites = factorable_sites(model, layers=("dense",), input_shapes={"x": [batch, 3, 16, 16]} if dynamic else None)
        macs = {s.name: s.shape.macs() for s in sites if s.shape is not None}
        per_token = {"/attn/MatMul": 32 * 96, "/attn/Gemm": 32 * 32, "/mlp/MatMul": 32 * 32}
        assert {k: macs.get(k) for k in per_token} == {k: 16 * v for k, v in per_token.items()}, (batch, macs)


def test_dense_macs_are_per_sample_whatever_batch_the_input_shape_gives():
    """`--input-shape 8x32x32x3` on a dynamic-batch model multiplied its dense layers' MACs by 8 (the rows were
    divided by the graph's batch, 1 where dynamic, not by the batch the shapes were inferred at); conv MACs were not."""
    from pathlib import Path

    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models/cifar10_cnn.onnx"))
    name = model.graph.input[0].name

    def macs(batch):
        _, sites = factorable_sites(model, layers=("kxk", "dense"), input_shapes={name: [batch, 32, 32, 3]})
        return {s.name: s.shape.macs() for s in sites if s.shape is not None}

    one, eight = macs(1), macs(8)
    assert any("MatMul" in k for k in one) and one == eight


@pytest.mark.parametrize("producer", ["Identity", "Constant"])
@pytest.mark.parametrize("options", [{"ratio": 0.5}, {"ratio": 1.0, "force": True}, {"ratio": 0.5, "calibrate": True},
                                     {"ratio": 0.5, "layers": ("kxk", "1x1"), "calibrate": True}],
                         ids=["plain", "full", "calibrated", "1x1"])
def test_a_bias_made_by_a_node_is_folded_and_refitted_like_an_initializer(producer, options):
    """A conv bias from an Identity (torch's shared parameters) or a Constant node crashed the affine folding
    (KeyError) and the refit ("bias ... is not a constant"): the chain now owns it as an initializer."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)  # noqa: E731
    bias_node = (helper.make_node("Identity", ["b0"], ["b"], name="ib") if producer == "Identity" else
                 helper.make_node("Constant", [], ["b"], name="cb", value=init("v", 32)))
    nodes = [bias_node, helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c0", pads=[1] * 4),
             helper.make_node("Add", ["y", "a"], ["y2"], name="add"), helper.make_node("Relu", ["y2"], ["r"], name="relu"),
             helper.make_node("Identity", ["b1"], ["pb"], name="ipb"), helper.make_node("Conv", ["r", "p", "pb"], ["z"], name="pw")]
    inits = [init("w", 32, 16, 3, 3), init("b0", 32), init("a", 32, 1, 1), init("p", 32, 32, 1, 1), init("b1", 32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 10, 10])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = dict(options)
    x = rng.standard_normal((64, 16, 10, 10)).astype(np.float32)
    if options.pop("calibrate", False):
        options["calibration"] = {"x": x}  # what the refit lowers the error on
    from onnx_tucker import compress

    new, report = compress(model, **options)
    assert report.chains
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    error = lambda m: np.linalg.norm(run(m) - run(model)) / np.linalg.norm(run(model))  # noqa: E731
    if options.get("force"):
        assert error(new) < 1e-5
    elif "calibration" in options:  # the refit changed the chains' biases and lowered the error
        plain = {k: v for k, v in options.items() if k != "calibration"}
        assert error(new) < error(compress(model, **plain)[0])
    else:  # the folded Add lives in the chain's bias now: the same model as without folding
        unfolded, _ = compress(model, fold_affine=False, **options)
        assert np.abs(run(new) - run(unfolded)).max() < 1e-4 * np.abs(run(unfolded)).max()

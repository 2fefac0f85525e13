"""compress(): exact at full rank for every Conv attribute combination, shapes by the rank rule at 0.5."""
import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import conv_model, relative_error, residual_model, run_model
from onnx_tucker import ModelError, UsageError, compress
from onnx_tucker.runtime import random_inputs


def assert_exact(model, batch=2, tol=1e-4):
    new, report = compress(model, ratio=1.0, force=True)
    onnx.checker.check_model(new)
    feeds = random_inputs(model, batch=batch, seed=1)
    for a, b in zip(run_model(model, feeds), run_model(new, feeds)):
        assert a.shape == b.shape
        assert relative_error(a, b) <= tol
    return new, report


NAMED_2D = {
    "default": {},
    "pads_symmetric": {"pads": [1, 1, 1, 1]},
    "pads_asymmetric": {"pads": [0, 1, 2, 1]},
    "auto_pad_same_upper": {"auto_pad": "SAME_UPPER"},
    "auto_pad_same_lower_stride": {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    "auto_pad_valid": {"auto_pad": "VALID"},
    "auto_pad_notset": {"auto_pad": "NOTSET", "pads": [1, 0, 1, 0]},
    "strides": {"strides": [2, 3], "pads": [1, 1, 1, 1]},
    "dilations": {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "dilation_stride_mix": {"dilations": [1, 2], "strides": [2, 1]},
    "explicit_kernel_shape": {"kernel_shape": [3, 3]},
}


@pytest.mark.parametrize("attrs", NAMED_2D.values(), ids=NAMED_2D.keys())
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_reproduces_outputs_2d(attrs, bias):
    assert_exact(conv_model(attrs=attrs, bias=bias))


@pytest.mark.parametrize("kernel", [(1, 3), (5, 2), (3, 1)])
def test_full_rank_non_square_kernels(kernel):
    assert_exact(conv_model(kernel=kernel, attrs={"pads": [1, 1, 1, 1]}))


def test_full_rank_conv1d():
    assert_exact(conv_model(kernel=(5,), spatial=(20,), attrs={"pads": [2, 1], "strides": [2]}))


def test_full_rank_conv3d():
    assert_exact(conv_model(c_in=4, c_out=6, kernel=(3, 3, 3), spatial=(6, 7, 5), attrs={"pads": [1] * 6}))


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_full_rank_across_opsets(opset):
    new, _ = assert_exact(conv_model(opset=opset))
    assert new.opset_import[0].version == opset


@pytest.mark.parametrize("ir_version", [3, 4, 7, 10])
def test_full_rank_keeps_ir_version(ir_version):
    model = conv_model(opset=9, ir_version=ir_version, weight_as_input=ir_version < 4)
    new, _ = assert_exact(model)
    assert new.ir_version == ir_version


def test_initializer_listed_as_input_in_new_ir_is_decomposed():
    model = conv_model(weight_as_input=True)
    new, report = assert_exact(model)
    assert report.decomposed


def test_weight_from_constant_node():
    new, report = assert_exact(conv_model(weight_via_constant=True))
    assert len(report.decomposed) == 1


def test_dynamic_batch_stays_dynamic():
    model = conv_model(batch="N")
    new, _ = compress(model, ratio=0.5, force=True)
    assert new.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 5):
        feeds = random_inputs(new, batch=batch)
        assert run_model(new, feeds)[0].shape[0] == batch


def test_residual_chain_full_rank():
    new, report = assert_exact(residual_model())
    reasons = {r.layer: r.reason for r in report.layers}
    assert "grouped conv" in reasons["grouped"]
    assert "1x1" in reasons["pointwise"]


def test_float16_weights_keep_their_dtype_and_outputs():
    model = conv_model(dtype=np.float16)
    new, report = compress(model, ratio=1.0, force=True)
    assert {i.data_type for i in new.graph.initializer} == {onnx.TensorProto.FLOAT16}
    feeds = random_inputs(model, batch=2)
    a, b = run_model(model, feeds)[0], run_model(new, feeds)[0]
    assert relative_error(a, b) <= 1e-2  # float16 storage of the factors


def test_float64_weights_keep_their_dtype_and_reconstruct():
    from onnx_tucker.decompose import reconstruct

    model = conv_model(dtype=np.float64)  # onnxruntime has no float64 Conv: check the weights instead
    new, _ = compress(model, ratio=1.0, force=True)
    onnx.checker.check_model(new)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    assert all(v.dtype == np.float64 for v in inits.values())
    w = reconstruct(inits["conv_tucker_in_W"][:, :, 0, 0], inits["conv_tucker_core_W"], inits["conv_tucker_out_W"][:, :, 0, 0])
    original = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert np.allclose(w, original, atol=1e-12)


def test_ratio_half_rank_rule_and_three_convs(residual):
    new, report = compress(residual, ratio=0.5, force=True)  # force: the 3-channel stem too
    convs = [n for n in new.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in new.graph.initializer}
    decomposed = {r.layer: r for r in report.decomposed}
    assert set(decomposed) == {"stem", "block_conv", "down"}  # grouped/1x1: left alone
    for layer, (c_out, c_in) in {"stem": (16, 3), "block_conv": (16, 16), "down": (32, 16)}.items():
        chain = [n for n in convs if n.name.startswith(layer + "_tucker_")]
        assert [n.name for n in chain] == [f"{layer}_tucker_in", f"{layer}_tucker_core", f"{layer}_tucker_out"]
        shapes = [tuple(inits[n.input[1]].dims) for n in chain]
        r_out, r_in = max(1, int(0.5 * c_out)), max(1, int(0.5 * c_in))
        assert shapes == [(r_in, c_in, 1, 1), (r_out, r_in, 3, 3), (c_out, r_out, 1, 1)]
        assert decomposed[layer].ranks == (r_out, r_in)
    assert {"grouped", "pointwise"} <= {n.name for n in convs}  # untouched originals
    t = report.totals()
    assert t["macs_after"] < t["macs_before"]


def test_explicit_ranks_are_used_as_given_by_name_or_index(residual):
    """``ranks`` override the rule for their layers only, unrounded by rank_multiple; a key may be the index."""
    for key in ("block_conv", "1", 1):
        new, report = compress(residual, ratio=0.5, rank_multiple=4, ranks={key: (5, 3)})
        ranks = {r.layer: r.ranks for r in report.decomposed}
        assert ranks["block_conv"] == (5, 3) and ranks["down"] == (16, 8)  # the rule's (16, 8), a multiple of 4 already
        inits = {i.name: i for i in new.graph.initializer}
        core = next(n for n in new.graph.node if n.name == "block_conv_tucker_core")
        assert tuple(inits[core.input[1]].dims) == (5, 3, 3, 3)
        onnx.checker.check_model(new)


def test_explicit_ranks_pick_the_form_by_their_length(residual):
    """With both kxk forms enabled one rank asks for spatial SVD (K), two for Tucker-2."""
    new, report = compress(residual, forms=("tucker2", "spatial"), ranks={"block_conv": (7,), "down": (8, 4)})
    forms = {r.layer: (r.form, r.ranks) for r in report.decomposed}
    assert forms["block_conv"] == ("spatial", (7,)) and forms["down"] == ("tucker2", (8, 4))
    assert [n.op_type for n in new.graph.node if n.name.startswith("block_conv_spatial")] == ["Conv", "Conv"]


@pytest.mark.parametrize("options, needle", [
    ({"ranks": {"nope": (4, 4)}}, "names no layer of this model: nope"),
    ({"ranks": {"9": (4, 4)}}, "names no layer"),
    ({"ranks": {"grouped": (4, 4)}}, "grouped: the layer is not factored"),
    ({"ranks": {"block_conv": (4, 4)}, "exclude": ("block_conv",)}, "excluded by the user"),
    ({"ranks": {"block_conv": (4,)}}, "1 rank(s) given, this layer takes 2 for tucker2"),
    ({"ranks": {"block_conv": (4, 4, 4)}}, "expected NAME=R"),
    ({"ranks": {"block_conv": (0, 4)}}, "whole numbers >= 1"),
    ({"ranks": {"block_conv": (17, 4)}}, "17,4 exceeds tucker2's limits 16,16"),
    ({"ranks": {"block_conv": (99,)}, "forms": ("spatial",)}, "99 exceeds spatial's limits 48"),
    ({"ranks": {"block_conv": (4, 4), "1": (4, 4)}}, "block_conv twice"),
    ({"ranks": {"block_conv": (4, 4)}, "target_macs": 0.5}, "give one"),
    ({"ranks": [4, 4]}, "ranks must be a dict"),
])
def test_explicit_ranks_refused_with_the_reason(residual, options, needle):
    with pytest.raises(UsageError) as info:
        compress(residual, **options)
    assert needle in str(info.value), str(info.value)


def test_core_carries_stride_pads_and_last_carries_bias(residual):
    new, _ = compress(residual, ratio=0.5)
    nodes = {n.name: n for n in new.graph.node}
    core = {a.name: onnx.helper.get_attribute_value(a) for a in nodes["down_tucker_core"].attribute}
    assert core["strides"] == [2, 2] and core["pads"] == [1, 1, 1, 1]
    first = {a.name: onnx.helper.get_attribute_value(a) for a in nodes["down_tucker_in"].attribute}
    assert first == {"kernel_shape": [1, 1]}
    assert len(nodes["block_conv_tucker_out"].input) == 3 and nodes["block_conv_tucker_out"].input[2] == "B2"
    assert len(nodes["block_conv_tucker_in"].input) == 2


def test_output_is_valid_sorted_and_clean(residual):
    new, _ = compress(residual, ratio=0.5)
    onnx.checker.check_model(new, full_check=True)
    produced = {i.name for i in new.graph.input} | {i.name for i in new.graph.initializer}
    for node in new.graph.node:  # topological order
        assert all(name in produced or name == "" for name in node.input)
        produced.update(node.output)
    used = {name for n in new.graph.node for name in n.input}
    assert all(i.name in used for i in new.graph.initializer)  # no dangling initializers
    assert [i.name for i in new.graph.input] == ["x"] and [o.name for o in new.graph.output] == ["logits"]


def test_image_stem_is_not_cut_to_one_or_two_channels_by_default(residual):
    """No gamble for crumbs: the 3-channel stem at R_in = 1 is left whole unless forced."""
    _, report = compress(residual, ratio=0.5)
    stem = next(r for r in report.layers if r.layer == "stem")
    assert not stem.decomposed and "3-channel input to rank 1" in stem.reason
    assert {r.layer for r in report.decomposed} == {"block_conv", "down"}


def test_a_chain_saving_a_negligible_share_of_the_macs_is_left_whole():
    from onnx_tucker.factorization import CRUMBS, not_worth_it
    from onnx_tucker.pipeline import factorable_sites

    _, sites = factorable_sites(residual_model())
    site = next(s for s in sites if s.name == "block_conv")
    cost = type("Cost", (), {"macs": site.shape.macs() - 10, "params": 0})()
    assert "negligible" not in not_worth_it(site, (8, 8), cost, total_macs=10**4)
    assert "saves only" in not_worth_it(site, (8, 8), cost, total_macs=int(20 / CRUMBS))


def test_metadata_records_version_ratio_and_ranks(residual):
    new, _ = compress(residual, ratio=0.5, force=True)
    meta = {p.key: p.value for p in new.metadata_props}
    assert meta["onnx_tucker.ratio"] == "0.5"
    assert json.loads(meta["onnx_tucker.ranks"]) == {"stem": [8, 1], "block_conv": [8, 8], "down": [16, 8]}
    assert "onnx_tucker.version" in meta


def test_unprofitable_layer_left_alone_unless_forced():
    model = conv_model(c_in=3, c_out=64)  # the seed's first layer: a chain costs more MACs
    _, report = compress(model, ratio=0.5, force=True)
    assert report.decomposed


def test_nothing_pays_returns_the_input_unchanged_with_the_reason():
    """A model where no layer pays is not an error (a folder of models must not break a script):
    the output is the input, with the tool's metadata, and the table says why."""
    model = conv_model(c_in=3, c_out=64)
    new, report = compress(model, ratio=0.5)
    assert not report.decomposed and not report.chains
    assert "chain would not reduce MACs" in report.layers[0].reason
    assert any("output is the input model unchanged" in n for n in report.notes)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [i.SerializeToString() for i in new.graph.initializer] == [i.SerializeToString() for i in model.graph.initializer]
    meta = {p.key: p.value for p in new.metadata_props}
    assert json.loads(meta["onnx_tucker.ranks"]) == {} and "onnx_tucker.chains" not in meta


def test_shared_weight_decomposed_once_and_correct():
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W")
    nodes = [
        onnx.helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Conv", ["a", "W"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    g = onnx.helper.make_graph(
        nodes, "shared", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 6, 6])], [w],
    )
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    new, report = assert_exact(model)
    assert len(new.graph.initializer) == 3  # one set of factors, shared by both chains
    assert len(report.decomposed) == 2


def test_conv_output_that_is_graph_output_and_has_two_consumers():
    model = conv_model()
    model.graph.output.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 16, 10, 10]))
    model.graph.node.append(onnx.helper.make_node("Sigmoid", ["c"], ["z"], name="second_consumer"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 16, 10, 10]))
    new, _ = assert_exact(model)
    assert [o.name for o in new.graph.output] == ["y", "c", "z"]


def test_no_conv_is_a_model_error():
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(ModelError, match="no Conv"):
        compress(onnx.helper.make_model(g), ratio=0.5)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, "abc", float("nan")])
def test_bad_ratio_is_a_usage_error(residual, ratio):
    with pytest.raises(UsageError, match="ratio"):
        compress(residual, ratio=ratio)


def test_input_model_not_modified(residual):
    before = residual.SerializeToString()
    compress(residual, ratio=0.5)
    assert residual.SerializeToString() == before


def test_input_model_with_constant_nodes_not_modified():
    """torch writes Clip's bounds (ReLU6) as Constant nodes whose tensors have no name; onnx-graphsurgeon's export used
    to name the caller's own TensorProto ("")."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    bound = lambda name, v: helper.make_node("Constant", [], [name], value=helper.make_tensor("", TensorProto.FLOAT, [], [v]))  # noqa: E731
    nodes = [bound("lo", 0.0), bound("hi", 6.0)]
    nodes[0].attribute[0].t.ClearField("name")
    nodes[1].attribute[0].t.ClearField("name")
    nodes += [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
              helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not model.graph.node[0].attribute[0].t.HasField("name")
    before = model.SerializeToString()
    new, report = compress(model, ratio=0.5)
    assert report.decomposed and model.SerializeToString() == before


def test_same_options_byte_identical(residual):
    a, _ = compress(residual, ratio=0.5)
    b, _ = compress(residual_model(), ratio=0.5)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nd=st.integers(1, 3), c_in=st.integers(1, 6), c_out=st.integers(1, 6), data=st.data(), bias=st.booleans(),
)
def test_full_rank_exact_on_random_configurations(nd, c_in, c_out, data, bias):
    kernel = tuple(data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    if all(k == 1 for k in kernel):
        kernel = (2,) + kernel[1:]
    strides = data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    dilations = data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    spatial = tuple(max(6, (k - 1) * d + 2) for k, d in zip(kernel, dilations))
    mode = data.draw(st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"strides": strides, "dilations": dilations}
    if mode == "pads":
        attrs["pads"] = data.draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    else:
        attrs["auto_pad"] = mode
        if mode != "VALID":  # onnxruntime: no dilation with SAME_* padding
            attrs["dilations"] = [1] * nd
    assert_exact(conv_model(c_in=c_in, c_out=c_out, kernel=kernel, spatial=spatial, attrs=attrs, bias=bias), batch=1)


def test_a_weight_read_by_a_matmul_and_a_transposing_gemm_gets_factors_of_each_layout():
    """One 64x64 weight read by x @ W and by Gemm(transB=1) (h @ W^T): the Gemm got the MatMul's factors (and SVD),
    transposed; at full rank the output was 0.5 off and the self-check on random inputs said PASSED."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_tucker import compress

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((64, 64)).astype(np.float32) * 0.1, rng.standard_normal(64).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W", "b"], ["y"], transB=1, name="gemm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((16, 64)).astype(np.float32)
    full, _ = compress(model, ratio=1.0, force=True, layers=("dense",))
    assert relative_error(run_model(model, {"x": x})[0], run_model(full, {"x": x})[0]) < 1e-5
    half, report = compress(model, ratio=0.5, force=True, layers=("dense",))
    assert report.totals()["decomposed"] == 2
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    low = (u[:, :32] * s[:32]) @ vt[:32]  # rank 32 of the (in, out) matrix: the same matrix either way round
    expected = np.maximum(x @ low, 0) @ low.T + b
    assert relative_error(expected, run_model(half, {"x": x})[0]) < 1e-4


def test_api_calibration_is_checked_and_cast_like_the_clis_files():
    """uint8 pixels, float64 arrays, a wrong input name or layout all reached onnxruntime, whose type error came back as
    ModelError('onnxruntime cannot run the model'); an all-zero set silently ruined the model (top-1 0.11)."""
    from onnx_tucker import compress
    from onnx_tucker.errors import DataError

    model = residual_model()
    x = np.random.default_rng(0).uniform(0, 255, (48, 3, 10, 10))
    cast, _ = compress(model, calibration={"x": x.astype(np.uint8)})
    same, _ = compress(model, calibration={"x": x.astype(np.uint8).astype(np.float32)})
    assert cast.SerializeToString() == same.SerializeToString()
    assert compress(model, calibration={"x": x})[0].SerializeToString() == compress(model, calibration={"x": x.astype(np.float32)})[0].SerializeToString()
    for calibration, needle in (({"input": x}, "no array for the model input 'x'"), ({"x": x.transpose(0, 2, 3, 1)}, "have shape"),
                                ({"x": np.zeros((48, 3, 10, 10), np.float32)}, "all identical"), ({"x": x, "y": x}, "names no model input")):
        with pytest.raises(DataError, match=needle):
            compress(model, calibration=calibration)


def test_api_refuses_unloaded_external_data_and_empty_layers_and_reads_float32_ratios_as_printed(tmp_path):
    """A model loaded without its external data failed with onnx's ValidationError (or read the weights relative to the
    working directory); layers=() factored nothing and recorded the default; np.float32(0.7) gave ranks of 0.6999999."""
    from onnx_tucker import compress
    from onnx_tucker.errors import ModelError, UsageError

    model = residual_model()
    onnx.save(residual_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    with pytest.raises(ModelError, match="external data file that is not loaded"):
        compress(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    with pytest.raises(UsageError, match="name at least one kind"):
        compress(model, layers=())
    _, report = compress(model, ratio=np.float32(0.7), force=True)
    _, plain = compress(model, ratio=0.7, force=True)
    assert report.ratio == 0.7 and [c.ranks for c in report.chains] == [c.ranks for c in plain.chains]


def test_api_exclude_takes_numpy_indices_as_ranks_does():
    """exclude=np.array([1]) was refused ('got np.int64(1)') while ranks={np.int64(1): ...} was accepted."""
    from onnx_tucker import compress

    _, by_numpy = compress(residual_model(), exclude=np.array([1]), force=True)
    _, by_int = compress(residual_model(), exclude=[1], force=True)
    assert [c.layer for c in by_numpy.chains] == [c.layer for c in by_int.chains] and len(by_int.chains) >= 1


def test_the_chains_fits_on_many_threads_give_the_same_bytes(monkeypatch):
    """The chains' fits go side by side on threads (a 16-core GPU machine fitted a ResNet50's 45 one after another);
    each fit is its own and names are made in the layers' order after, so the model is the same bytes."""
    import onnx_tucker.runtime as runtime

    model = residual_model()
    outputs = []
    for threads in (1, 4):
        monkeypatch.setattr(runtime, "worker_threads", lambda threads=threads: threads)
        new, report = compress(model, ratio=0.5)
        assert len(report.chains) >= 2
        outputs.append(new.SerializeToString())
    assert outputs[0] == outputs[1]

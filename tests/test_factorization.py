"""The Factorization protocol and registry: every form is complete, a new form is one module plus one entry.

The SVD form for 1x1 convs (``forms/svd.py``) was added as that one module: these tests prove it works
through the unchanged pipeline, budget, sensitivity, calibration and per-layer bench.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker import UsageError, compress
from onnx_tucker.chain import chains_of
from onnx_tucker.factorization import DEFAULT_FORMS, FORMS, Factorization, get_form
from onnx_tucker.runtime import make_session

from conftest import residual_model


def pointwise_model(c_in=24, c_out=32, strides=(1, 1), pads=(0, 0, 0, 0), bias=True, seed=0):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32) / 5, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B"))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="pw", strides=list(strides), pads=list(pads)),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    return make_session(model).run(None, {"x": x})[0]


def test_every_registered_form_implements_the_protocol():
    assert set(DEFAULT_FORMS) <= set(FORMS) and DEFAULT_FORMS == ("tucker2",)
    for name, form in FORMS.items():
        assert isinstance(form, Factorization) and form.name == name
        assert form.roles[0] == "first" and form.roles[-1] == "last" and "last" in form.refits
    with pytest.raises(UsageError, match="unknown factorization"):
        get_form("cp")


def test_default_forms_leave_1x1_convs_whole_as_before():
    _, report = compress(pointwise_model(), ratio=0.25)
    assert not report.decomposed and "1x1 conv" in report.layers[0].reason


@pytest.mark.parametrize("strides, pads, bias", [((1, 1), (0, 0, 0, 0), True), ((2, 2), (1, 0, 1, 0), False)])
def test_svd_full_rank_reproduces_the_original(strides, pads, bias):
    model = pointwise_model(strides=strides, pads=pads, bias=bias)
    x = np.random.default_rng(1).standard_normal((4, 24, 9, 9)).astype(np.float32)
    new, report = compress(model, ratio=1.0, force=True, forms=("svd",))
    assert [c.form for c in report.chains] == ["svd"] and report.chains[0].ranks == (24,)
    a, b = run(model, x), run(new, x)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5


def test_svd_chain_at_a_real_rank_equals_the_layer_with_the_composed_weight():
    """At rank 6 (not the identity case) the two convs equal one conv with weight last @ first."""
    model = pointwise_model(strides=(2, 2))
    x = np.random.default_rng(2).standard_normal((4, 24, 9, 9)).astype(np.float32)
    new, report = compress(model, ratio=0.25, forms=("svd",))
    [chain] = chains_of(new)
    assert chain.ranks == (6,)
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    first, last = inits[chain.weights["first"]], inits[chain.weights["last"]]
    composed = (last[:, :, 0, 0] @ first[:, :, 0, 0])[:, :, None, None]
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    w = next(i for i in reference.graph.initializer if i.name == "W")
    w.CopyFrom(numpy_helper.from_array(composed.astype(np.float32), "W"))
    np.testing.assert_allclose(run(new, x), run(reference, x), rtol=1e-4, atol=1e-5)
    assert report.layers[0].macs_after == 6 * (24 + 32) * 25 < report.layers[0].macs_before == 24 * 32 * 25


def test_svd_takes_the_1x1_convs_tucker_the_kxk_ones_under_one_budget_with_calibration():
    """The unchanged budget, sensitivity and refit code handle the new form: a measured MAC budget over
    kxk and 1x1 convs together, refitted on calibration data, and the per-layer bench finds both chains."""
    from onnx_tucker import bench

    model = residual_model()
    feeds = {"x": np.random.default_rng(3).standard_normal((256, 3, 10, 10)).astype(np.float32)}
    new, report = compress(model, target_macs=0.6, calibration=feeds, forms=("tucker2", "svd"))
    t = report.totals()
    assert t["macs_after"] <= 0.6 * t["macs_before"]
    assert set(report.sensitivity["curves"]) >= {"pointwise", "block_conv"}
    assert any(len(r) == 1 for _, _, r, _ in report.sensitivity["curves"]["pointwise"])
    times = {n.name: 1.0 for n in new.graph.node}
    rows = bench.layer_rows(model, new, {n.name: 10.0 for n in model.graph.node}, times)
    assert {r["layer"] for r in rows} == {c.layer for c in report.chains}
    x = feeds["x"][:16]
    a, b = run(model, x), run(new, x)
    assert np.isfinite(b).all() and b.shape == a.shape


# --- dense layers: Gemm and MatMul (issue 11) ------------------------------------------------------

def dense_model(op="Gemm", trans_b=0, alpha=1.0, beta=1.0, bias="vector", k=24, n=16, lead=(), relu=True, seed=0):
    """x (N, *lead, K) -> Gemm/MatMul -> [Relu] -> y."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32) / 4
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    attrs = {}
    if op == "Gemm":
        attrs = {"transB": trans_b, "alpha": alpha, "beta": beta}
        if bias:
            c = rng.standard_normal(n if bias == "vector" else 1).astype(np.float32)
            inits.append(numpy_helper.from_array(c, "C"))
            inputs.append("C")
    nodes = [helper.make_node(op, inputs, ["h"], name="dense", **attrs)]
    nodes.append(helper.make_node("Relu" if relu else "Identity", ["h"], ["y"], name="act"))
    graph = helper.make_graph(nodes, "d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *lead, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


DENSE_CASES = [
    dict(op="Gemm"), dict(op="Gemm", trans_b=1), dict(op="Gemm", alpha=0.5, beta=2.0), dict(op="Gemm", trans_b=1, alpha=1.5, beta=0.25),
    dict(op="Gemm", bias=None), dict(op="Gemm", bias="scalar"), dict(op="MatMul"), dict(op="MatMul", lead=(5,)), dict(op="MatMul", lead=(3, 2)),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dense_svd_full_rank_reproduces_the_original_for_every_attribute(case):
    model = dense_model(**case)
    x = np.random.default_rng(5).standard_normal((6, *case.get("lead", ()), 24)).astype(np.float32)
    new, report = compress(model, ratio=1.0, force=True, layers=("dense",))
    [chain] = report.chains
    assert chain.form == "svd" and chain.ranks == (16,) and chain.channel_axis == -1
    assert [n.op_type for n in new.graph.node if n.name in chain.nodes.values()] == [case["op"]] * 2
    a, b = run(model, x), run(new, x)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5


@pytest.mark.parametrize("case", [dict(op="Gemm", trans_b=1, alpha=0.5, beta=2.0), dict(op="MatMul", lead=(5,))], ids=["gemm", "matmul"])
def test_dense_chain_at_a_real_rank_equals_the_composed_weight(case):
    model = dense_model(relu=False, **case)
    x = np.random.default_rng(6).standard_normal((6, *case.get("lead", ()), 24)).astype(np.float32)
    new, report = compress(model, ratio=0.25, force=True, layers=("dense",))
    [chain] = report.chains
    assert chain.ranks == (4,)
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    first, last = inits[chain.weights["first"]], inits[chain.weights["last"]]
    composed = last @ first if case.get("trans_b") else first @ last  # back in the original's layout
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    next(i for i in reference.graph.initializer if i.name == "W").CopyFrom(numpy_helper.from_array(composed, "W"))
    np.testing.assert_allclose(run(new, x), run(reference, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [dict(op="Gemm", trans_b=1, beta=2.0), dict(op="MatMul", lead=(4,))], ids=["gemm", "matmul"])
def test_dense_calibration_refit_lowers_the_held_out_error(case):
    rng = np.random.default_rng(7)
    model = dense_model(**case)
    shape = (*case.get("lead", ()), 24)
    mix = rng.standard_normal((24, 24)).astype(np.float32)  # correlated features: whitening matters
    cal = {"x": (rng.standard_normal((512, *shape)).astype(np.float32) @ mix)}
    held = (rng.standard_normal((128, *shape)).astype(np.float32) @ mix)
    plain, _ = compress(model, ratio=0.25, force=True, layers=("dense",))
    fitted, report = compress(model, ratio=0.25, force=True, layers=("dense",), calibration=cal, refit="last")
    a = run(model, held)
    assert np.linalg.norm(run(fitted, held) - a) < np.linalg.norm(run(plain, held) - a)
    assert all(v["output_error_after"] <= v["output_error_before"] + 1e-9 for v in report.calibration["layers"].values())


def test_dense_layers_join_the_measured_budget_with_the_convs():
    """One knapsack over kxk convs, 1x1 convs and a classifier Gemm, with measured curves for each."""
    rng = np.random.default_rng(8)
    model = residual_model()
    # add a Gemm classifier after the network's logits: logits (N,10) -> Gemm(10 -> 64) -> Relu -> Gemm(64 -> 10)
    w1 = numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32) / 3, "fc1_W")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "fc2_W")
    model.graph.initializer.extend([w1, w2])
    model.graph.node.extend([helper.make_node("Gemm", ["logits", "fc1_W"], ["f1"], name="fc1"),
                             helper.make_node("Relu", ["f1"], ["f1r"], name="fc1_relu"),
                             helper.make_node("Gemm", ["f1r", "fc2_W"], ["out"], name="fc2")])
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 64]))
    feeds = {"x": rng.standard_normal((256, 3, 10, 10)).astype(np.float32)}
    new, report = compress(model, target_macs=0.7, calibration=feeds, layers=("kxk", "1x1", "dense"))
    assert report.totals()["macs_after"] <= 0.7 * report.totals()["macs_before"]
    assert "fc2" in report.sensitivity["curves"] and report.sensitivity["curves"]["fc2"]
    out = run(new, feeds["x"][:8])
    assert np.isfinite(out).all() and out.shape == (8, 64)


# --- two-conv Tucker shapes (issue 11): a full-size factor folded into the core -----------------------

from conftest import conv_model  # noqa: E402


def _composed_reference(model, w):
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    init = next(i for i in reference.graph.initializer if i.name == "W")
    init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    return reference


TWO_CONV_ATTRS = [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 1, 0]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
]


@pytest.mark.parametrize("attrs", TWO_CONV_ATTRS)
@pytest.mark.parametrize("ranks, roles", [((16, 3), ["first", "core"]), ((5, 8), ["core", "last"])])
@pytest.mark.parametrize("bias", [True, False])
def test_two_conv_chain_equals_the_layer_with_the_composed_low_rank_weight(attrs, ranks, roles, bias):
    """R_out = C_out folds the output factor (1x1 -> kxk), R_in = C_in the input factor (kxk -> 1x1): two
    convs that equal one conv whose weight is the Tucker reconstruction at those ranks (not an identity)."""
    from onnx_tucker.decompose import reconstruct, tucker2

    model = conv_model(c_in=8, c_out=16, spatial=(11, 11), attrs=attrs, bias=bias)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))
    new, report = compress(model, ranks={"conv": ranks}, force=True)
    [chain] = chains_of(new)
    assert list(chain.nodes) == roles and chain.ranks == ranks and chain.form == "tucker2"
    assert len([n for n in new.graph.node if n.op_type == "Conv"]) == 2
    assert (chain.bias is not None) == bias
    factors = tucker2(w, *ranks)
    x = np.random.default_rng(5).standard_normal((3, 8, 11, 11)).astype(np.float32)
    low_rank = run(_composed_reference(model, reconstruct(factors.first, factors.core, factors.last)), x)
    np.testing.assert_allclose(run(new, x), low_rank, rtol=1e-4, atol=1e-5)
    assert relative(run(model, x), run(new, x)) > 1e-3  # a real rank: the chain is not the layer itself


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_both_ranks_full_keeps_three_convs_and_is_exact():
    model = conv_model(c_in=8, c_out=16, attrs={"pads": [1, 1, 1, 1]})
    new, _ = compress(model, ranks={"conv": (16, 8)}, force=True)
    assert list(chains_of(new)[0].nodes) == ["first", "core", "last"]
    x = np.random.default_rng(6).standard_normal((2, 8, 12, 12)).astype(np.float32)
    assert relative(run(model, x), run(new, x)) < 1e-5


@pytest.mark.parametrize("ranks", [(16, 3), (5, 8), (5, 3)])
def test_cost_model_counts_the_emitted_convs(ranks):
    """The budget's MACs and parameters for a shape are those of the convs actually written."""
    model = conv_model(c_in=8, c_out=16, spatial=(12, 12), attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]})
    new, report = compress(model, ranks={"conv": ranks}, force=True)
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    sizes = {"conv_tucker_in": 12 * 12, "conv_tucker_core": 6 * 6, "conv_tucker_out": 6 * 6}  # output pixels
    macs = sum(inits[n.input[1]].size * sizes[n.name] for n in new.graph.node if n.op_type == "Conv")
    params = sum(inits[n.input[1]].size for n in new.graph.node if n.op_type == "Conv")
    assert report.layers[0].macs_after == macs and report.layers[0].params_after == params


def test_measured_budget_offers_the_two_conv_shapes():
    from onnx_tucker.site import find_sites
    from onnx_tucker.pipeline import factorable_sites

    _, sites = factorable_sites(conv_model(c_in=32, c_out=64))
    options = get_form("tucker2").rank_options(sites[0])
    assert (64, 8) in options and (16, 32) in options  # R_out = C_out with R_in = C_in / 4, and the mirror
    assert all(get_form("tucker2").cost(sites[0], r).macs < sites[0].shape.macs() for r in options)
    assert find_sites  # imported for the site records the options are built on


@pytest.mark.parametrize("refit", ["last", "core"])
@pytest.mark.parametrize("ranks", [(16, 4), (6, 8)])
def test_calibration_refits_both_two_conv_shapes(refit, ranks):
    """1x1 -> kxk refits its kxk last conv on im2col rows; kxk -> 1x1 its last 1x1 (and the core with
    ``refit="core"``): the held-out output error falls against the data-free fit."""
    rng = np.random.default_rng(7)
    model = conv_model(c_in=8, c_out=16, spatial=(10, 10), attrs={"pads": [1, 1, 1, 1]})
    base = rng.standard_normal((224, 1, 10, 10)).astype(np.float32)
    data = (0.8 * base + 0.4 * rng.standard_normal((224, 8, 10, 10)) + 0.5).astype(np.float32)
    cal, held = {"x": data[:192]}, data[192:]
    plain, _ = compress(model, ranks={"conv": ranks}, force=True)
    calibrated, report = compress(model, ranks={"conv": ranks}, force=True, calibration=cal, refit=refit)
    [entry] = report.calibration["layers"].values()
    assert entry["output_error_after"] < entry["output_error_before"]
    reference = run(model, held)
    assert relative(reference, run(calibrated, held)) < relative(reference, run(plain, held))
    assert [n.op_type for n in calibrated.graph.node].count("Conv") == 2


def test_a_dense_layer_holding_the_parameters_is_not_crumbs():
    """A classifier with few MACs but most of the parameters (VGG16's fc layers) is factored at --ratio;
    the MAC-crumbs rule alone would leave it whole (0.09% of the MACs here, 78% of the parameters)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) / 10, "W"),
             numpy_helper.from_array(rng.standard_normal((32, 1024)).astype(np.float32) / 10, "D")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "D"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = compress(model, ratio=0.25, layers=("kxk", "dense"))
    fc = next(r for r in report.layers if r.layer == "fc")
    assert fc.decomposed and fc.params_after == 8 * (32 + 1024)


def test_layers_with_forms_keep_the_default_form_for_kinds_no_named_form_takes():
    """``--layers kxk,1x1,dense --forms tucker2,spatial``: the named forms take the kxk convs; the 1x1 convs and dense
    layers asked for keep their SVD form (they were left whole, noted 'nothing to factor spatially'). A kind a named
    form takes gets no default added: ``--forms spatial --layers kxk`` stays spatial alone."""
    from onnx_tucker.factorization import layer_plan

    assert layer_plan(("kxk", "1x1", "dense"), ("tucker2", "spatial"))[0] == ("tucker2", "spatial", "svd")
    assert layer_plan(("kxk",), ("spatial",))[0] == ("spatial",)
    assert layer_plan(("kxk", "1x1"), ("svd",))[0] == ("svd", "tucker2")
    model = residual_model(channels=16, spatial=(10, 10))
    _, report = compress(model, ratio=0.5, layers=("kxk", "1x1"), forms=("tucker2", "spatial"), force=True)
    forms = {r.layer: r.form for r in report.layers}
    assert forms["pointwise"] == "svd" and forms["block_conv"] in ("tucker2", "spatial"), forms


def test_the_image_stem_rule_looks_at_the_tucker_input_rank_not_the_smallest():
    """A 3-channel stem at (R_out, R_in) = (2, 3) keeps its whole input; the rule (cut an input of 1-4 channels to
    rank 1 or 2) used min(ranks) for Tucker-2 and refused it with "would cut a 3-channel input to rank 2"."""
    from onnx_tucker.factorization import not_worth_it
    from onnx_tucker.pipeline import factorable_sites

    _, (site,) = factorable_sites(conv_model(c_in=3, c_out=64, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]}))
    form = get_form("tucker2")
    assert not_worth_it(site, (2, 3), form.cost(site, (2, 3)), site.shape.macs()) == ""
    assert "image stem" in not_worth_it(site, (8, 2), form.cost(site, (8, 2)), site.shape.macs())


def test_ranks_by_hand_are_held_only_to_saving_macs():
    """`--ranks 0=10,2` on a 3-channel stem was left whole by the image-stem rule, exit 0, although the README says the
    layers named there get exactly these ranks. The default rules (stem, crumbs) no longer overrule them; a chain
    that saves no MACs is still left whole without --force."""
    model = conv_model(c_in=3, c_out=64, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]})
    _, report = compress(model, ranks={"conv": (8, 2)})
    assert report.layers[0].decomposed and report.layers[0].ranks == (8, 2)
    _, report = compress(model, ranks={"conv": (27, 3)})  # full rank: the chain costs more than the layer
    assert not report.layers[0].decomposed and "would not reduce MACs" in report.layers[0].reason


@pytest.mark.parametrize("opset", [7, 9, 10, 11])
def test_a_gemm_svd_chain_is_valid_at_the_models_opset(opset):
    """Before opset 11 Gemm's C is required: the chain's first Gemm had none, so `--layers dense` wrote a model the
    checker refuses (and onnxruntime cannot load). Its first Gemm adds a zero C there; the ranks are real."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
             for n, s in (("cw", (8, 4, 3, 3)), ("gw", (64, 512)), ("gb", (64,)))]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1] * 4),
                               helper.make_node("Flatten", ["c"], ["f"], name="flat"),
                               helper.make_node("Gemm", ["f", "gw", "gb"], ["out"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 8 else 4
    if opset < 8:  # IR 3 lists every initializer among the graph inputs
        model.graph.input.extend(helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits)
    onnx.checker.check_model(model, full_check=True)
    new, report = compress(model, ranks={"fc": (16,)}, layers=("dense",))
    onnx.checker.check_model(new, full_check=True)
    (chain,) = chains_of(new)
    inits_new = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    composed = inits_new[chain.weights["last"]] @ inits_new[chain.weights["first"]]  # transB: (out, in) = (out, r)(r, in)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    next(i for i in reference.graph.initializer if i.name == "gw").CopyFrom(numpy_helper.from_array(composed.astype(np.float32), "gw"))
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = lambda m: make_session(m).run(None, {"x": x})[0]  # noqa: E731
    assert np.abs(run(new) - run(reference)).max() < 1e-5 and np.abs(run(new) - run(model)).max() > 1e-3

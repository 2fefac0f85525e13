"""The spatial SVD form (kh x 1 -> 1 x kw): exactness, the composed weight at real ranks, cost, refits, budget."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import conv_model, residual_model, run_model
from onnx_tucker import compress
from onnx_tucker.chain import chains_of
from onnx_tucker.factorization import get_form
from onnx_tucker.pipeline import factorable_sites

SPATIAL = get_form("spatial")

ATTRS = [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 1, 0]},  # asymmetric pads: top/bottom go to the first conv, left/right to the second
    {"strides": [1, 2], "pads": [0, 1, 2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {},  # no padding
]


def run(model, x):
    return run_model(model, {"x": x})[0]


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def weight_of(model) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))


def with_weight(model, w) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    next(i for i in out.graph.initializer if i.name == "W").CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    return out


def site_of(model):
    _, [site] = factorable_sites(model, ("spatial",))
    return site


@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("kernel", [(3, 3), (5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_reproduces_the_layer(attrs, kernel, bias):
    model = conv_model(c_in=6, c_out=10, kernel=kernel, spatial=(11, 13), attrs=attrs, bias=bias)
    full = min(6 * kernel[0], 10 * kernel[1])
    new, _ = compress(model, ranks={"conv": (full,)}, forms=("spatial",), force=True)
    [chain] = chains_of(new)
    assert chain.form == "spatial" and chain.ranks == (full,) and list(chain.nodes) == ["first", "last"]
    kernels = [next(a.ints for a in n.attribute if a.name == "kernel_shape") for n in new.graph.node if n.op_type == "Conv"]
    assert [list(k) for k in kernels] == [[kernel[0], 1], [1, kernel[1]]]
    x = np.random.default_rng(1).standard_normal((2, 6, 11, 13)).astype(np.float32)
    assert relative(run(model, x), run(new, x)) < 1e-5


@pytest.mark.parametrize("attrs", ATTRS)
def test_chain_at_a_real_rank_equals_the_layer_with_the_composed_weight(attrs):
    """Two convs equal one conv whose weight is sum_k H[o,k,w] V[k,i,h] (not the layer itself)."""
    model = conv_model(c_in=8, c_out=12, spatial=(10, 9), attrs=attrs)
    site = site_of(model)
    factors = SPATIAL.fit(site, (5,), n_iter_max=0)
    new, _ = compress(model, ranks={"conv": (5,)}, forms=("spatial",), force=True)
    x = np.random.default_rng(2).standard_normal((3, 8, 10, 9)).astype(np.float32)
    low_rank = run(with_weight(model, SPATIAL.compose(site, factors)), x)
    np.testing.assert_allclose(run(new, x), low_rank, rtol=1e-4, atol=1e-5)
    assert relative(run(model, x), run(new, x)) > 1e-2
    assert factors.relative_error == pytest.approx(relative(weight_of(model), SPATIAL.compose(site, factors)), rel=1e-6)


def test_the_probes_map_before_the_last_conv_composes_to_the_layer():
    """The measured budget refits the last conv through ``compose(upto_last=True)``: the (K*kw, C_in*kh*kw)
    map times the last conv's weight, read as (C_out, K*kw), is the composed layer."""
    model = conv_model(c_in=5, c_out=7, kernel=(3, 5), spatial=(9, 9), attrs={"pads": [1, 2, 1, 2]})
    site = site_of(model)
    factors = SPATIAL.fit(site, (4,), n_iter_max=0)
    inner = SPATIAL.compose(site, factors, upto_last=True)
    last = factors.last.reshape(7, -1)  # (C_out, K*kw), rows (k, w)
    np.testing.assert_allclose((last @ inner).reshape(site.weight.shape), SPATIAL.compose(site, factors), atol=1e-12)


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, {"strides": [1, 2]}])
def test_cost_model_counts_the_emitted_convs(attrs):
    model = conv_model(c_in=8, c_out=16, spatial=(12, 12), attrs=attrs)
    new, report = compress(model, ranks={"conv": (6,)}, forms=("spatial",), force=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in onnx.shape_inference.infer_shapes(new).graph.value_info}
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    macs = sum(inits[n.input[1]].size * int(np.prod(shapes[n.output[0]][2:])) for n in new.graph.node if n.op_type == "Conv")
    params = sum(inits[n.input[1]].size for n in new.graph.node if n.op_type == "Conv")
    assert report.layers[0].macs_after == macs and report.layers[0].params_after == params


def test_eligibility_says_why_a_conv_is_left_alone():
    def reason(**kwargs):
        _, sites = factorable_sites(conv_model(**kwargs), ("spatial",))
        return sites[0].reason if sites else "no site"

    assert reason() == ""
    assert "1x1" in reason(kernel=(1, 1))
    assert "group" in reason(c_in=8, c_out=8, attrs={"group": 8})
    assert "one-dimensional" in reason(kernel=(1, 3), attrs={"pads": [0, 1, 0, 1]})


def test_rank_options_are_profitable_and_ratio_buys_the_tucker_macs():
    site = site_of(conv_model(c_in=32, c_out=64, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]}))
    options = SPATIAL.rank_options(site)
    assert len(options) >= 10 and len(set(options)) == len(options)
    assert all(SPATIAL.cost(site, r).macs < site.shape.macs() for r in options)
    tucker = get_form("tucker2")
    tucker_macs = tucker.cost(site, tucker.rule_ranks(site, "ratio", 0.5, 1.0)).macs
    (k,) = SPATIAL.rule_ranks(site, "ratio", 0.5, 1.0)
    assert SPATIAL.cost(site, (k,)).macs <= tucker_macs < SPATIAL.cost(site, (k + 1,)).macs
    assert all(k % 8 == 0 or k == SPATIAL.max_ranks(site)[0] for (k,) in SPATIAL.rank_options(site, rank_multiple=8))
    # --rank-method energy: the whole spectrum keeps every rank, half of it far fewer
    assert SPATIAL.rule_ranks(site, "energy", 0.5, 1.0) == SPATIAL.max_ranks(site)
    assert 1 <= SPATIAL.rule_ranks(site, "energy", 0.5, 0.5)[0] < SPATIAL.max_ranks(site)[0] // 2


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (16, 16), (3, 24)])
def test_each_form_gives_its_largest_ranks_within_a_mac_budget(shape):
    """What a form choice under a rule compares: each form at the most it can spend within the first form's MACs
    (--forms spatial,tucker2 puts Tucker-2 second)."""
    from onnx_tucker.ranks import ratio_ranks

    c_out, c_in = shape
    site = site_of(conv_model(c_in=c_in, c_out=c_out, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]}))
    tucker = get_form("tucker2")
    for fraction in (0.1, 0.3, 0.5):
        budget = fraction * site.shape.macs()
        (k,) = SPATIAL.ranks_for_macs(site, budget)
        assert SPATIAL.cost(site, (k,)).macs <= budget < SPATIAL.cost(site, (k + 1,)).macs or k == 1
        ranks = tucker.ranks_for_macs(site, budget)
        assert tucker.cost(site, ranks).macs <= budget or ranks == (1, 1)
        bigger = [ratio_ranks(c_out, c_in, r) for r in np.linspace(0.01, 1, 400)]
        assert all(tucker.cost(site, r).macs > budget for r in bigger if r[0] >= ranks[0] and r[1] >= ranks[1] and r != ranks)
    model = conv_model(c_in=16, c_out=16, spatial=(12, 12), attrs={"pads": [1, 1, 1, 1]})
    _, report = compress(model, ratio=0.5, forms=("spatial", "tucker2"))
    assert any("the spatial ratio rule gives the layer" in n for n in report.notes)


def test_whitened_fit_and_the_last_conv_refit_lower_the_held_out_error():
    """On channel-correlated inputs the input-whitened SVD beats the plain one, and the calibration refit of
    the 1 x kw last conv (im2col rows of its real input) lowers the error again; all on held-out inputs."""
    rng = np.random.default_rng(3)
    model = conv_model(c_in=8, c_out=16, spatial=(10, 10), attrs={"pads": [1, 1, 1, 1]})
    mix = rng.standard_normal((8, 8)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.1, 0.1])
    data = (np.einsum("ij,njhw->nihw", mix, rng.standard_normal((256, 8, 10, 10))) + 0.3).astype(np.float32)
    cal, held = {"x": data[:224]}, data[224:]
    plain, _ = compress(model, ranks={"conv": (6,)}, forms=("spatial",), force=True)
    whitened, _ = compress(model, ranks={"conv": (6,)}, forms=("spatial",), force=True, calibration=cal, refit=False)
    refitted, report = compress(model, ranks={"conv": (6,)}, forms=("spatial",), force=True, calibration=cal, refit="last")
    [entry] = report.calibration["layers"].values()
    assert "kxk last conv" in entry["refit"] and entry["output_error_after"] < entry["output_error_before"]
    reference = run(model, held)
    errors = [relative(reference, run(m, held)) for m in (plain, whitened, refitted)]
    assert errors[0] > errors[1] > errors[2], errors


def _moments(p3, target):
    mean_p, mean_t = p3.mean(0), target.mean(0)
    pc = (p3 - mean_p).reshape(len(p3), -1)
    d, kw = mean_p.shape
    return pc, mean_p, mean_t, (pc.T @ pc).reshape(d, kw, d, kw), pc.T @ (target - mean_t)


def test_the_joint_refits_two_steps_are_the_least_squares_they_claim():
    """From the patches' moments alone: H given V equals least squares with an intercept on the first conv's outputs
    at the kw columns; V given H equals the dense ridge least squares over the (K*D) unknowns, built row by row."""
    from onnx_tucker.calibrate import _spatial_h_step, _spatial_v_step

    rng = np.random.default_rng(11)
    n, d, kw, k, c_out = 400, 6, 3, 2, 5
    p3 = rng.standard_normal((n, d, kw)) @ np.diag(np.linspace(0.5, 2, kw)) + 0.4
    target = rng.standard_normal((n, c_out)) + 1.0
    pc, mean_p, mean_t, gram, cross = _moments(p3, target)
    v = rng.standard_normal((k, d))
    h, bias = _spatial_h_step(v, gram, cross, mean_p, mean_t, np.zeros((k * kw, c_out)), 1e-12)
    z = np.einsum("ndw,kd->nkw", p3, v).reshape(n, k * kw)
    expected, *_ = np.linalg.lstsq(np.hstack([z, np.ones((n, 1))]), target, rcond=None)
    assert np.allclose(h, expected[:-1], atol=1e-8) and np.allclose(bias, expected[-1], atol=1e-8)

    prior = rng.standard_normal((k, d))
    hm = rng.standard_normal((k, kw, c_out))
    lam_scale = 1e-3
    got = _spatial_v_step(hm.reshape(k * kw, c_out), gram, cross, prior, lam_scale, iterations=200)
    # the output at each row is sum_w H_w V pc_w: linear in vec(V); one (c_out x K*D) block of rows per sample
    jac = np.einsum("awo,ndw->noad", hm, pc.reshape(n, d, kw)).reshape(n * c_out, k * d)
    q = np.einsum("awo,bvo->wvab", hm, hm)
    diag = sum(np.trace(q[w, w]) * np.trace(gram[:, w, :, w]) for w in range(kw)) / (k * d)
    lam = lam_scale * diag
    normal = jac.T @ jac + lam * np.eye(k * d)
    dense = np.linalg.solve(normal, jac.T @ (target - mean_t).reshape(-1) + lam * prior.reshape(-1)).reshape(k, d)
    assert np.allclose(got, dense, rtol=1e-6, atol=1e-8), np.abs(got - dense).max()


@pytest.mark.parametrize("attrs", ATTRS)
def test_the_joint_refit_lowers_the_held_out_error_and_the_chain_is_its_composed_conv(attrs):
    """The default refit fits both convs of a spatial chain on the data, for every padding, stride and dilation case
    (asymmetric pads, SAME_UPPER): the held-out output (after the ReLU) is
    closer to the original's than with the last conv refitted alone, the first conv did move, and the written chain
    computes exactly one conv with its composed weight (the rewrite is still a rank-K spatial factorisation)."""
    rng = np.random.default_rng(3)
    model = conv_model(c_in=8, c_out=16, spatial=(10, 10), attrs=attrs)
    # correlated down the rows and across the columns (feature maps are): the vertical whitening models only the first
    noise = rng.standard_normal((320, 8, 13, 13))
    smooth = sum(noise[:, :, i : i + 10, j : j + 10] for i in range(4) for j in range(4)) / 4
    data = (np.einsum("ij,njhw->nihw", rng.standard_normal((8, 8)), smooth) + 0.2).astype(np.float32)
    cal, held = {"x": data[:256]}, data[256:]
    last_only, _ = compress(model, ranks={"conv": (5,)}, forms=("spatial",), force=True, calibration=cal, refit="last")
    joint, report = compress(model, ranks={"conv": (5,)}, forms=("spatial",), force=True, calibration=cal)
    [entry] = report.calibration["layers"].values()
    assert "first + last conv, joint" in entry["refit"] and entry["output_error_after"] < entry["output_error_before"]
    reference = run(model, held)
    assert relative(reference, run(joint, held)) < 0.98 * relative(reference, run(last_only, held))
    [chain] = chains_of(joint)
    first_of = lambda m: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == chains_of(m)[0].weights["first"]))  # noqa: E731
    assert not np.allclose(first_of(joint), first_of(last_only), atol=1e-4)
    inits = {i.name: numpy_helper.to_array(i) for i in joint.graph.initializer}
    composed = np.tensordot(inits[chain.weights["first"]][..., 0], inits[chain.weights["last"]][:, :, 0, :], axes=(0, 1)).transpose(2, 0, 1, 3)
    single = with_weight(model, composed.astype(np.float32))
    single.graph.initializer[[i.name for i in single.graph.initializer].index("B")].CopyFrom(numpy_helper.from_array(inits[chain.bias], "B"))
    assert relative(run(single, held), run(joint, held)) < 1e-5


def test_the_joint_refit_keeps_full_rank_exact_and_steps_aside_when_too_costly(monkeypatch):
    """At full rank the jointly refitted chain still reproduces the layer; with too few rows for V's unknowns, or above
    ``SPATIAL_JOINT_WORK``, the refit is the last conv's alone, as before."""
    import onnx_tucker.calibrate as calibrate

    rng = np.random.default_rng(4)
    model = conv_model(c_in=6, c_out=8, spatial=(8, 8), attrs={"pads": [1, 1, 1, 1]})
    data = {"x": rng.standard_normal((200, 6, 8, 8)).astype(np.float32)}
    full, report = compress(model, ratio=1.0, forms=("spatial",), force=True, calibration=data)
    [entry] = report.calibration["layers"].values()
    assert "joint" in entry["refit"]
    x = rng.standard_normal((4, 6, 8, 8)).astype(np.float32)
    assert relative(run(model, x), run(full, x)) < 1e-4
    # too few rows for V's unknowns (K*C_in*kh = 4*48 shared by 2 outputs: 20 rows each needs 1920; 8 images of 8x8
    # give 512), though enough for the last conv's 13 per output channel: the last conv alone
    narrow = conv_model(c_in=16, c_out=2, spatial=(8, 8), attrs={"pads": [1, 1, 1, 1]})
    _, report = compress(narrow, ranks={"conv": (4,)}, forms=("spatial",), force=True,
                         calibration={"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)})
    [entry] = report.calibration["layers"].values()
    assert entry["refit"].startswith("kxk last conv"), entry["refit"]
    monkeypatch.setattr(calibrate, "SPATIAL_JOINT_WORK", 1.0)
    _, report = compress(model, ranks={"conv": (4,)}, forms=("spatial",), force=True, calibration=data)
    [entry] = report.calibration["layers"].values()
    assert entry["refit"].startswith("kxk last conv")


@pytest.mark.parametrize("bias", [True, False])
def test_the_probes_joint_refit_takes_the_calibrations_steps_from_uncentred_moments(bias):
    """The measured budget has only the uncentred moments of the patches (with a ones column where the layer has a
    bias); from them :func:`spatial_first_from_moments` takes the same steps as the calibration's joint refit does
    on the centred patches: H given V, then V given H, each round."""
    from onnx_tucker.calibrate import _spatial_h_step, _spatial_v_step, spatial_first_from_moments

    rng = np.random.default_rng(12)
    n, c_in, kh, kw, k, c_out = 500, 3, 3, 3, 4, 5
    d = c_in * kh
    p3 = rng.standard_normal((n, d, kw)) @ np.diag(np.linspace(0.5, 2, kw)) + 0.4
    target = p3.reshape(n, -1) @ rng.standard_normal((d * kw, c_out)) + rng.standard_normal((n, c_out)) + 1.0
    rows = np.hstack([p3.reshape(n, -1), np.ones((n, 1))]) if bias else p3.reshape(n, -1)
    first, last = rng.standard_normal((k, c_in, kh)), rng.standard_normal((c_out, k, kw))
    got = spatial_first_from_moments(first, last, rows.T @ rows, rows.T @ target, bias, rounds=2, shrink=1e-2)
    if bias:
        _, mean_p, mean_t, gram, cross = _moments(p3, target)
    else:
        mean_p, mean_t = np.zeros((d, kw)), np.zeros(c_out)
        gram, cross = (p3.reshape(n, -1).T @ p3.reshape(n, -1)).reshape(d, kw, d, kw), p3.reshape(n, -1).T @ target
    v, h = first.reshape(k, d), last.transpose(1, 2, 0).reshape(k * kw, c_out)
    for _ in range(2):
        h, _b = _spatial_h_step(v, gram, cross, mean_p, mean_t, h, 1e-2)
        v = _spatial_v_step(h, gram, cross, v, 1e-2)
    assert got.shape == first.shape and np.allclose(got.reshape(k, d), v, rtol=1e-7, atol=1e-9)
    assert not np.allclose(got, first)


def _probe_options(monkeypatch, module, constant: str, forms=("tucker2",), **kwargs) -> dict:
    """{on: {ranks: (distortion, layer error)}} of one 3x3 layer's options, every one probed, on inputs correlated down
    the rows and across the columns, with ``module.constant`` (a probe's refit work cap) at 0 (off) and as it is (on)."""
    from onnx_tucker.sensitivity import distortion_curves

    rng = np.random.default_rng(5)
    model = conv_model(c_in=8, c_out=16, spatial=(10, 10), attrs={"pads": [1, 1, 1, 1]})
    noise = rng.standard_normal((320, 8, 13, 13))
    smooth = sum(noise[:, :, i : i + 10, j : j + 10] for i in range(4) for j in range(4)) / 4
    data = {"x": (np.einsum("ij,njhw->nihw", rng.standard_normal((8, 8)), smooth) + 0.2).astype(np.float32)}
    _, sites = factorable_sites(model, forms)
    sites = [s for s in sites if s.eligible]
    curves = {}
    for work in (0.0, getattr(module, constant)):
        monkeypatch.setattr(module, constant, work)
        [curve] = distortion_curves(model, sites, data, None, probes="all", progress=False, **kwargs)["curves"].values()
        curves[work > 0] = {tuple(ranks): (distortion, error) for _, distortion, ranks, _, error in curve}
    return curves


def _assert_rated_lower(refitted: dict, last_only: dict) -> None:
    """No option's layer error higher, most lower by 1 % or more, and the distortions lower in sum."""
    assert all(refitted[r][1] <= last_only[r][1] + 1e-9 for r in refitted)
    assert sum(refitted[r][1] < 0.99 * last_only[r][1] for r in refitted) >= len(refitted) // 2
    assert sum(refitted[r][0] for r in refitted) < sum(last_only[r][0] for r in refitted)


@pytest.mark.parametrize("forms", [("spatial",), ("tucker2", "spatial")])
def test_the_measured_budget_rates_spatial_options_with_the_first_conv_refitted(monkeypatch, forms):
    """The probes fit a spatial option as the calibration will (both convs, from the layer's moments), not the last
    conv alone: every option's layer-output error is no higher and most are lower, and so are the distortions the
    knapsack reads; above ``PROBE_JOINT_WORK`` the probes refit the last conv alone, as before. Offered beside
    Tucker-2, the spatial options gain the same and Tucker-2's stay as they were."""
    import onnx_tucker.forms.spatial as spatial_module

    curves = _probe_options(monkeypatch, spatial_module, "PROBE_JOINT_WORK", forms)
    last_only, joint = curves[False], curves[True]
    assert joint.keys() == last_only.keys()
    tucker = [r for r in joint if len(r) == 2]
    assert (len(tucker) > 0) == (forms[0] == "tucker2") and all(joint[r] == last_only[r] for r in tucker)
    joint = {r: v for r, v in joint.items() if len(r) == 1}
    assert len(joint) >= 5
    _assert_rated_lower(joint, last_only)


def test_the_measured_budget_rates_tucker2_options_with_the_core_refitted(monkeypatch):
    """Likewise for Tucker-2: the probes refit the core given the input factor (the calibration's reduced-rank
    regression, from the layer's moments) before the last factor; no option's layer error is higher, most are
    lower, and so are the distortions; the ``R_out = C_out`` shape (the core is the last node) is as before, and so
    is every option where the calibration will refit the last factor alone (``refit="last"``)."""
    import onnx_tucker.forms.tucker2 as tucker2_module

    curves = _probe_options(monkeypatch, tucker2_module, "PROBE_CORE_WORK")
    last_only, refitted = curves[False], curves[True]
    assert _probe_options(monkeypatch, tucker2_module, "PROBE_CORE_WORK", refit="last")[True] == last_only
    assert refitted.keys() == last_only.keys() and len(refitted) >= 10
    core_last = [r for r in refitted if r[0] == 16]
    assert core_last and all(refitted[r] == last_only[r] for r in core_last)
    _assert_rated_lower(refitted, last_only)


def test_measured_budget_meets_the_target_with_the_spatial_form():
    model = residual_model(channels=16, spatial=(10, 10))
    data = np.random.default_rng(4).standard_normal((160, 3, 10, 10)).astype(np.float32)
    new, report = compress(model, target_macs=0.5, calibration={"x": data}, forms=("spatial",))
    chains = chains_of(new)
    assert chains and all(c.form == "spatial" for c in chains)
    assert report.totals()["macs_after"] <= 0.5 * report.totals()["macs_before"] * 1.001
    x = data[:4]
    assert relative(run(model, x), run(new, x)) < 0.5


def test_tucker_and_spatial_together_let_the_measured_budget_pick_the_form_per_layer():
    """``forms=("tucker2", "spatial")``: every kxk layer is offered both forms' options; the chains name the
    form the knapsack chose; explicit ranks pick the form by their length."""
    from onnx_tucker.factorization import FormChoice

    model = residual_model(channels=16, spatial=(10, 10))
    _, sites = factorable_sites(model, ("tucker2", "spatial"))
    kxk = [s for s in sites if s.eligible and s.kind == "conv"]
    assert kxk and all(s.form == "tucker2|spatial" for s in kxk)
    choice = get_form(kxk[0].form)
    assert isinstance(choice, FormChoice)
    options = choice.rank_options(kxk[0])
    assert {len(r) for r in options} == {1, 2}
    assert choice.cost(kxk[0], options[-1]) == SPATIAL.cost(kxk[0], options[-1])
    data = np.random.default_rng(4).standard_normal((160, 3, 10, 10)).astype(np.float32)
    new, report = compress(model, target_macs=0.5, calibration={"x": data}, forms=("tucker2", "spatial"))
    decomposed = {r.layer: r for r in report.layers if r.decomposed}
    assert decomposed and {c.form for c in chains_of(new)} <= {"tucker2", "spatial"}
    for chain in chains_of(new):
        assert decomposed[chain.layer].form == chain.form and len(chain.ranks) == (1 if chain.form == "spatial" else 2)
    assert report.totals()["macs_after"] <= 0.5 * report.totals()["macs_before"] * 1.001
    explicit, _ = compress(model, ranks={"block_conv": (6,)}, forms=("tucker2", "spatial"), force=True)
    assert [c.form for c in chains_of(explicit) if c.layer == "block_conv"] == ["spatial"]


def test_an_image_stem_is_not_squeezed_below_three_channels_worth():
    """The image-stem rule counts K in input channels' worth (K / kh): a 3-channel stem at K <= 6 stays whole."""
    from onnx_tucker.factorization import not_worth_it

    site = site_of(conv_model(c_in=3, c_out=16, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]}))
    assert "image stem" in not_worth_it(site, (6,), SPATIAL.cost(site, (6,)), site.shape.macs())
    assert not_worth_it(site, (7,), SPATIAL.cost(site, (7,)), site.shape.macs()) == ""


def test_distillation_and_reconstruction_train_the_spatial_chain():
    """--distill's engine trains a spatial chain (both convs and the bias) like a Tucker one: only its
    initializers change, and the distilled model matches the original better on fresh inputs."""
    pytest.importorskip("torch")
    from test_distill import _distill, _net, _weights, feeds_for, fresh_kl, init_arrays

    w = _weights()
    original = _net([onnx.helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])], w)
    compressed, _ = compress(original, ranks={"conv2": (3,)}, forms=("spatial",), force=True, exclude=["conv1"])
    [chain] = chains_of(compressed)
    assert chain.form == "spatial"
    model, stats = _distill(original, compressed, feeds_for(original), steps=120, reconstruct_steps=60)
    assert stats["returned"] in ("distilled", "reconstructed")
    before, after = init_arrays(compressed), init_arrays(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and changed <= set(chain.weights.values()) | {chain.bias}
    assert fresh_kl(original, model) < 0.8 * fresh_kl(original, compressed)


def test_the_latency_budget_times_and_picks_either_form(tmp_path, monkeypatch):
    """--target-latency with both forms: each option is timed as the chain its own form writes (keyed by the
    choice and its ranks), and what is written is the form the plan picked."""
    import onnx_tucker.latency_table as latency_table
    import onnx_tucker.pipeline as pipeline

    monkeypatch.setattr(latency_table, "RUNS", 3)
    monkeypatch.setattr(latency_table, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(pipeline, "FEEDBACK_SLACK", 1.0)
    model = residual_model(channels=32, spatial=(16, 16))
    data = np.random.default_rng(5).standard_normal((96, 3, 16, 16)).astype(np.float32)
    new, report = compress(model, target_latency=0.95, calibration={"x": data}, latency_table=str(tmp_path / "t.json"),
                           latency_batch=1, forms=("tucker2", "spatial"))
    import json

    keys = list(json.loads((tmp_path / "t.json").read_text())["entries"])
    # keyed by the form that writes each chain, so a later run with either form alone reuses the timings
    assert any(k.endswith("|spatial 12") for k in keys) and any("|tucker2 " in k for k in keys)
    assert not any("tucker2|spatial" in k for k in keys)
    for chain in chains_of(new):
        assert chain.form in ("tucker2", "spatial")
        assert [r for r in report.layers if r.layer == chain.layer][0].form == chain.form


def test_ratio_1_with_force_reproduces_the_model_in_the_spatial_form_too():
    """--ratio buys Tucker-2's MACs at R; at 1.0 that was K = 234 of a 128x128x3x3 layer's 384, and the 'exact' model
    was 22 % off. Full rank now, as for Tucker-2."""
    model = conv_model(c_in=128, c_out=128, spatial=(8, 8))
    new, report = compress(model, ratio=1.0, force=True, forms=("spatial",))
    (site,) = [s for s in factorable_sites(model)[1] if s.eligible]
    assert report.decomposed[0].ranks == tuple(get_form("spatial").max_ranks(site)) == (384,)
    x = np.random.default_rng(0).standard_normal((2, 128, 8, 8)).astype(np.float32)
    a, b = run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4


def _two_conv_model(w_a: np.ndarray, w_b: np.ndarray, spatial=(12, 12)) -> onnx.ModelProto:
    """x -> conv_a -> Relu -> conv_b -> y, no biases, 'same' padding."""
    from onnx import TensorProto, helper

    c = w_a.shape[1]
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "Wb"], ["y"], name="conv_b", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "two_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w_a.astype(np.float32), "Wa"), numpy_helper.from_array(w_b.astype(np.float32), "Wb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def test_a_ratio_with_both_forms_writes_each_layer_in_the_form_that_fits_it_at_equal_macs():
    """``--ratio`` with ``--forms tucker2,spatial``: each layer costs what Tucker-2's ratio rule gives it, and the
    form with the smaller error there writes it. conv_a is exactly a spatial product of rank 2 and conv_b exactly a
    Tucker-2 of ranks (4, 4): at ratio 0.25 each is exact only in its own form, and each is chosen; the model then
    reproduces the original, so both chains are the layers' composed weights."""
    from onnx_tucker.factorization import composed_error

    rng = np.random.default_rng(0)
    c = 16
    w_a = np.tensordot(rng.standard_normal((2, c, 3)), rng.standard_normal((c, 2, 3)), axes=(0, 1)).transpose(2, 0, 1, 3)
    core = rng.standard_normal((4, 4, 3, 3))
    w_b = np.einsum("oa,abhw,bi->oihw", rng.standard_normal((c, 4)), core, rng.standard_normal((4, c)))
    model = _two_conv_model(w_a / np.linalg.norm(w_a), w_b / np.linalg.norm(w_b))
    new, report = compress(model, ratio=0.25, forms=("tucker2", "spatial"), force=True)
    forms = {c.layer: (c.form, c.ranks) for c in chains_of(new)}
    assert forms == {"conv_a": ("spatial", (2,)), "conv_b": ("tucker2", (4, 4))}
    x = rng.standard_normal((2, c, 12, 12)).astype(np.float32)
    assert relative(run(model, x), run(new, x)) < 1e-5
    _, sites = factorable_sites(model, ("tucker2", "spatial"))
    tucker_macs = {s.name: get_form("tucker2").cost(s, (4, 4)).macs for s in sites}
    for record in report.decomposed:
        assert record.macs_after <= tucker_macs[record.layer]
    for site in sites:  # the losing form really leaves an error at its ranks
        loser = "tucker2" if site.name == "conv_a" else "spatial"
        ranks = (4, 4) if loser == "tucker2" else (2,)
        assert composed_error(get_form(loser), site, ranks) > 0.1
    assert any("each layer's form is the one with the least error (relative to the weight)" in n and "tucker2 1, spatial 1" in n
               for n in report.notes)


def test_the_choices_error_is_the_expected_output_error_under_the_calibration_statistics():
    """With calibration statistics the choice compares ``||(W - W') S^(1/2)|| / ||W S^(1/2)||``: the relative output
    error of the conv on inputs with channel second moment S, independent across positions (Monte Carlo here)."""
    import torch

    from onnx_tucker.factorization import composed_error

    rng = np.random.default_rng(1)
    model = conv_model(c_in=12, c_out=16, spatial=(16, 16), attrs={})
    site = site_of(model)
    mix = rng.standard_normal((12, 12)) * np.linspace(0.1, 3, 12)
    cov = mix @ mix.T
    for form, ranks in ((get_form("tucker2"), (5, 4)), (SPATIAL, (6,))):
        predicted = composed_error(form, site, ranks, cov)
        approx = form.compose(site, form.fit(site, ranks, n_iter_max=0, method="eig", input_covariance=cov))
        x = np.einsum("ij,njhw->nihw", mix, rng.standard_normal((64, 12, 16, 16)))
        y, y_low = (torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w.astype(np.float64))).numpy()
                    for w in (site.weight, approx))
        assert predicted == pytest.approx(relative(y, y_low), rel=0.05)
        assert predicted != pytest.approx(composed_error(form, site, ranks), rel=0.05)  # the statistics matter


def test_a_ratio_with_both_forms_and_calibration_picks_the_lower_whitened_error(monkeypatch):
    """The pipeline passes the calibration statistics to the choice (the channels' for Tucker-2, the vertical patches'
    for spatial SVD): every chain is the form with the lower whitened error at its layer, the note says so, and at
    ratio 1.0 the first form writes every layer at full rank."""
    import onnx_tucker.calibrate as calibrate
    from onnx_tucker.factorization import composed_error
    from onnx_tucker.ranks import round_to_multiple

    measured = []
    original = calibrate.input_covariances
    monkeypatch.setattr(calibrate, "input_covariances", lambda *a, **k: measured.append(original(*a, **k)) or measured[-1])
    model = residual_model(channels=16, spatial=(10, 10))
    data = np.random.default_rng(4).standard_normal((96, 3, 10, 10)).astype(np.float32)
    new, report = compress(model, ratio=0.5, calibration={"x": data}, forms=("tucker2", "spatial"), refit=False, force=True)
    assert any("input-whitened by the calibration statistics" in n for n in report.notes)
    [covs] = measured
    _, sites = factorable_sites(model, ("tucker2", "spatial"))
    chains = {c.layer: c for c in chains_of(new)}
    checked = 0
    for site in sites:
        if site.form != "tucker2|spatial" or site.name not in chains:
            continue
        site.extra["patch_covariance"] = covs[("patch", site.name)]
        assert covs[("patch", site.name)].shape == (3 * site.shape.c_in,) * 2
        choice = get_form(site.form)
        ranks, errors = choice.choose(site, choice.rule_ranks(site, "ratio", 0.5, 0.9), covariance=covs[site.input_name])
        assert chains[site.name].form == min(errors, key=errors.get) and chains[site.name].ranks == ranks
        assert errors[chains[site.name].form] == pytest.approx(composed_error(choice.resolve(site, ranks), site, ranks, covs[site.input_name]))
        checked += 1
    assert checked >= 2
    # a uniform MAC budget (no calibration) chooses the same way, within the budget; so does --rank-multiple
    uniform, uniform_report = compress(model, target_macs=0.5, forms=("tucker2", "spatial"))
    totals = uniform_report.totals()
    assert totals["macs_after"] <= 0.5 * totals["macs_before"] + 1
    assert any("the tucker2 uniform budget gives the layer" in n for n in uniform_report.notes)
    big = residual_model(channels=32, spatial=(10, 10))
    rounded, rounded_report = compress(big, ratio=0.5, forms=("tucker2", "spatial"), rank_multiple=8, force=True)
    _, big_sites = factorable_sites(big, ("tucker2", "spatial"))
    tucker = get_form("tucker2")
    tucker_macs = {s.name: tucker.cost(s, tuple(round_to_multiple(min(r, m), 8, m) for r, m in zip(tucker.rule_ranks(s, "ratio", 0.5, 1.0),
                                                                                               tucker.max_ranks(s)))).macs
                   for s in big_sites if s.form == "tucker2|spatial"}
    for chain in chains_of(rounded):
        if chain.layer in tucker_macs:
            assert all(r % 8 == 0 or r == m for r, m in zip(chain.ranks, get_form(chain.form).max_ranks(
                next(s for s in big_sites if s.name == chain.layer))))
            assert [r.macs_after for r in rounded_report.layers if r.layer == chain.layer][0] <= tucker_macs[chain.layer]
    full, full_report = compress(model, ratio=1.0, forms=("tucker2", "spatial"), force=True)
    assert {c.form for c in chains_of(full)} == {"tucker2"}
    assert not any("least error" in n for n in full_report.notes)
    x = data[:4]
    assert relative(run_model(model, {"x": x})[0], run_model(full, {"x": x})[0]) < 1e-4


def _row_correlated(rng, n, c, h, w, mix):
    """Inputs whose channels mix by ``mix`` and whose rows are strongly correlated (a running mean down each
    column), independent across columns: what the vertical patch statistic models exactly."""
    noise = rng.standard_normal((n, c, h + 3, w))
    smooth = (noise[:, :, :-3] + noise[:, :, 1:-2] + noise[:, :, 2:-1] + noise[:, :, 3:]) / 2
    return np.einsum("ij,njhw->nihw", mix, smooth)


def test_the_patch_statistic_whitens_the_fit_and_measures_its_output_error():
    """With the vertical patches' second moment (``site.extra["patch_covariance"]``) the spatial fit leaves less output
    error than with the channels' alone on row-correlated inputs."""
    import torch

    from onnx_tucker.calibrate import input_covariances

    rng = np.random.default_rng(3)
    model = conv_model(c_in=12, c_out=16, spatial=(16, 16), attrs={"pads": [1, 1, 1, 1]})
    site = site_of(model)
    mix = rng.standard_normal((12, 12)) * np.linspace(0.2, 2, 12)
    x = _row_correlated(rng, 96, 12, 16, 16, mix).astype(np.float32)
    stats = input_covariances(model, {"x": x}, ["x"], vertical={"p": ("x", *SPATIAL.patch_statistic(site))})

    def output_error(factors, data):
        t = torch.from_numpy(data.astype(np.float64))
        y, y_low = (torch.nn.functional.conv2d(t, torch.from_numpy(w), padding=1).numpy()
                    for w in (site.weight.astype(np.float64), SPATIAL.compose(site, factors)))
        return relative(y, y_low)

    fresh = _row_correlated(rng, 64, 12, 16, 16, mix)
    channel = SPATIAL.fit(site, (8,), input_covariance=stats["x"])
    site.extra["patch_covariance"] = stats["p"]
    patch = SPATIAL.fit(site, (8,), input_covariance=stats["x"])
    assert output_error(patch, fresh) < 0.8 * output_error(channel, fresh)
    assert np.array_equal(SPATIAL.fit(site, (8,)).first, SPATIAL.fit(site_of(model), (8,)).first)  # data-free: no statistic


def test_the_pipeline_fits_spatial_chains_on_the_patch_statistic(monkeypatch):
    """compress(--calibrate, spatial) measures the patch moments in the statistics pass and fits with them: the written
    first conv (not refitted with ``refit="last"``) is the patch-whitened fit's, not the channel-whitened one's."""
    import onnx_tucker.calibrate as calibrate

    measured = []
    original = calibrate.input_covariances
    monkeypatch.setattr(calibrate, "input_covariances", lambda *a, **k: measured.append(original(*a, **k)) or measured[-1])
    rng = np.random.default_rng(5)
    model = conv_model(c_in=12, c_out=16, spatial=(16, 16), attrs={"strides": [2, 2], "pads": [1, 0, 1, 0]})
    x = _row_correlated(rng, 64, 12, 16, 16, rng.standard_normal((12, 12))).astype(np.float32)
    new, _ = compress(model, ranks={"conv": (8,)}, forms=("spatial",), calibration={"x": x}, force=True, refit="last")
    [stats] = measured
    site = site_of(model)
    assert stats[("patch", "conv")].shape == (36, 36)
    channel = SPATIAL.fit(site, (8,), input_covariance=stats["x"])
    site.extra["patch_covariance"] = stats[("patch", "conv")]
    patch = SPATIAL.fit(site, (8,), input_covariance=stats["x"])
    [chain] = chains_of(new)
    written = numpy_helper.to_array(next(i for i in new.graph.initializer if i.name == chain.weights["first"]))[..., 0]
    assert np.allclose(written, patch.first, atol=1e-5) and not np.allclose(written, channel.first, atol=1e-3)


def test_the_form_choice_note_counts_the_chains_written_not_the_layers_left_whole():
    """The choice runs before the rules that leave a layer whole (the image stem): the note counts the chains the
    model got, and the report's ``form_choice`` keeps every layer's errors."""
    import json

    model = residual_model(channels=16, spatial=(10, 10))
    new, report = compress(model, ratio=0.5, forms=("tucker2", "spatial"))
    choice = report.form_choice
    assert "stem" in choice["layers"] and set(choice["layers"]["stem"]["errors"]) == {"tucker2", "spatial"}
    assert not next(r for r in report.layers if r.layer == "stem").decomposed
    stem = choice["layers"]["stem"]
    assert stem["written"] is False and "image stem" in stem["left_whole"]
    assert all(entry["written"] for name, entry in choice["layers"].items() if name != "stem")
    written = {c.form for c in chains_of(new)}
    [note] = [n for n in report.notes if "least error" in n]
    counts = {f: sum(c.form == f for c in chains_of(new)) for f in ("tucker2", "spatial")}
    assert f"tucker2 {counts['tucker2']}, spatial {counts['spatial']} chains" in note and written
    assert json.loads(json.dumps(report.to_dict()))["form_choice"]["rule"] == "ratio rule"


def test_no_choice_is_made_where_the_first_forms_chain_is_no_cheaper_than_the_layer():
    """A 3-channel stem whose Tucker-2 chain at the ratio costs more than the conv: it is left whole whatever the forms,
    and the report named 'spatial' for it, with a 0.0 error from a full-rank chain dearer than the layer itself."""
    model = conv_model(c_in=3, c_out=64, spatial=(12, 12), attrs={"pads": [1, 1, 1, 1]})
    site = site_of(model)
    tucker = get_form("tucker2")
    assert tucker.cost(site, tucker.rule_ranks(site, "ratio", 0.5, 1.0)).macs >= site.shape.macs()
    _, report = compress(model, ratio=0.5, forms=("tucker2", "spatial"))
    assert not report.decomposed and report.form_choice is None


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_a_same_padded_conv_keeps_its_padding_mode_so_any_input_size_stays_right(auto_pad):
    """The chain wrote explicit pads worked out for the one size the shapes were inferred at (here --input-shape 11):
    a model with dynamic H, W then computed wrong values, silently, at 12. Each conv of the chain keeps the mode."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c0", auto_pad=auto_pad, strides=[2, 2])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    new, _ = compress(model, ratio=1.0, force=True, forms=("spatial",), input_shapes={"x": [1, 16, 11, 11]})
    assert [c.form for c in chains_of(new)] == ["spatial"]
    for side in (11, 12, 13):
        x = rng.standard_normal((2, 16, side, side + 1)).astype(np.float32)
        want, got = run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * np.abs(want).max(), side

"""Data-aware Tucker: whitening and refits reduce held-out output error; budgets meet the MAC target."""
import numpy as np
import onnx
import pytest

from conftest import conv_model, relative_error, residual_model, run_model
from onnx_tucker import UsageError, compress
from onnx_tucker.calibrate import input_covariances
from onnx_tucker.graph import with_outputs
from onnx_tucker.decompose import tucker2


def samples(n, seed, shape=(3, 10, 10)):
    rng = np.random.default_rng(seed)
    # Correlated channels and a non-zero mean, like real activations.
    base = rng.standard_normal((n, 1, *shape[1:])).astype(np.float32)
    return (0.8 * base + 0.4 * rng.standard_normal((n, *shape)) + 0.5).astype(np.float32)


def layer_error(model, compressed, tensor, feeds):
    a = run_model(with_outputs(model, [tensor]), feeds)[-1]
    b = run_model(with_outputs(compressed, [tensor]), feeds)[-1]
    return relative_error(a, b)


@pytest.mark.parametrize("refit", ["last", "core"])
def test_calibration_reduces_held_out_layer_error(refit):
    model = residual_model()
    calibration = {"x": samples(64, seed=1)}
    held_out = {"x": samples(32, seed=2)}
    plain, _ = compress(model, ratio=0.5)
    calibrated, report = compress(model, ratio=0.5, calibration=calibration, refit=refit)
    onnx.checker.check_model(calibrated)
    for tensor in ("b", "d"):  # outputs of block_conv and down (the 3-channel stem is left whole at ratio 0.5)
        assert layer_error(model, calibrated, tensor, held_out) < layer_error(model, plain, tensor, held_out)
    final_plain = relative_error(run_model(model, held_out)[0], run_model(plain, held_out)[0])
    final_cal = relative_error(run_model(model, held_out)[0], run_model(calibrated, held_out)[0])
    assert final_cal < final_plain
    layers = report.calibration["layers"]
    assert all(v["output_error_after"] <= v["output_error_before"] + 1e-9 for v in layers.values())


def test_refit_adds_a_bias_when_the_conv_had_none():
    model = conv_model(bias=False, attrs={"pads": [1, 1, 1, 1]})
    cal = {"x": np.random.default_rng(0).standard_normal((16, 8, 12, 12)).astype(np.float32) + 1.0}
    new, _ = compress(model, ratio=0.5, calibration=cal)
    last = next(n for n in new.graph.node if n.name == "conv_tucker_out")
    assert len(last.input) == 3 and last.input[2] == "conv_tucker_out_B"
    onnx.checker.check_model(new)


def test_full_rank_stays_exact_with_calibration():
    model = residual_model()
    cal = {"x": samples(32, seed=3)}
    new, _ = compress(model, ratio=1.0, force=True, calibration=cal)
    feeds = {"x": samples(8, seed=4)}
    assert relative_error(run_model(model, feeds)[0], run_model(new, feeds)[0]) < 1e-4


def test_whitened_decomposition_lowers_expected_output_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12, 3, 3))
    mixing = rng.standard_normal((12, 12)) * np.linspace(0.05, 2.0, 12)
    cov = mixing @ mixing.T
    plain, white = tucker2(w, 6, 4), tucker2(w, 6, 4, input_covariance=cov)

    def expected_error(t):
        d = (w - t.reconstruct()).transpose(0, 2, 3, 1).reshape(-1, 12)
        return float(np.einsum("ij,jk,ik->", d, cov, d))

    assert expected_error(white) < expected_error(plain)
    assert tucker2(w, 16, 12, input_covariance=cov).relative_error < 1e-10


def test_input_covariances_are_channel_second_moments(monkeypatch):
    monkeypatch.setattr("onnx_tucker.calibrate.COV_POSITIONS", 144)  # every position of the 12x12 map
    model = conv_model(c_in=4, c_out=6)
    x = np.random.default_rng(0).standard_normal((5, 4, 12, 12)).astype(np.float32)
    cov = input_covariances(model, {"x": x}, ["x"])["x"]
    flat = x.transpose(1, 0, 2, 3).reshape(4, -1).astype(np.float64)
    assert np.allclose(cov, flat @ flat.T / flat.shape[1], rtol=1e-5)


def test_input_covariances_subsample_large_maps_without_bias():
    model = conv_model(c_in=4, c_out=6)
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((4, 4))
    x = np.einsum("ij,njhw->nihw", mix, rng.standard_normal((256, 4, 12, 12))).astype(np.float32)
    cov = input_covariances(model, {"x": x}, ["x"])["x"]
    flat = x.transpose(1, 0, 2, 3).reshape(4, -1).astype(np.float64)
    exact = flat @ flat.T / flat.shape[1]
    assert np.linalg.norm(cov - exact) < 0.05 * np.linalg.norm(exact)


@pytest.mark.parametrize("kh, stride, dilation, top, bottom", [(3, 1, 1, 1, 1), (3, 2, 1, 1, 0), (3, 1, 2, 2, 2), (5, 1, 1, 0, 0)])
def test_vertical_patch_moments_are_those_of_the_patches_the_conv_reads(kh, stride, dilation, top, bottom):
    """``vertical=``: the (C*kh)^2 second moment of the kh x 1 patches, rows (channel, tap), zero where the conv reads
    padding: on a map small enough for every position, exactly torch's unfold with the same geometry."""
    torch = pytest.importorskip("torch")
    model = conv_model(c_in=4, c_out=6, spatial=(9, 7))
    x = np.random.default_rng(2).standard_normal((3, 4, 9, 7)).astype(np.float32)
    stats = input_covariances(model, {"x": x}, ["x"], vertical={("patch", "conv"): ("x", kh, stride, dilation, top, bottom)})
    padded = torch.nn.functional.pad(torch.from_numpy(x).double(), (0, 0, top, bottom))
    patches = torch.nn.functional.unfold(padded, (kh, 1), dilation=(dilation, 1), stride=(stride, 1))  # (N, C*kh, L)
    flat = patches.permute(1, 0, 2).reshape(4 * kh, -1).numpy()
    assert patches.shape[2] <= 64  # every position sampled
    assert np.allclose(stats[("patch", "conv")], flat @ flat.T / flat.shape[1], rtol=1e-5, atol=1e-6)
    assert np.allclose(stats["x"], input_covariances(model, {"x": x}, ["x"])["x"])  # the channels' moment as before


@pytest.mark.parametrize("kernel, strides, pads, dilations", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((3, 5), (2, 1), (0, 2, 1, 2), (1, 1)), ((3, 3), (1, 2), (2, 0, 2, 1), (2, 1)),
    ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1))])
def test_patches_at_are_the_rows_an_onnxruntime_conv_multiplies(kernel, strides, pads, dilations):
    """``patches_at``'s rows (channel-major like OIHW, zero where a tap reads padding) times the flattened weight are the
    conv's outputs at those positions: asymmetric pads, strides, dilations, a non-square kernel, every position."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx_tucker.calibrate import patches_at

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 5, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=[pads[0], pads[1], pads[2], pads[3]], dilations=list(dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    y = run_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), {"x": x})[0]
    n_idx, oh, ow = (a.ravel() for a in np.meshgrid(np.arange(2), np.arange(y.shape[2]), np.arange(y.shape[3]), indexing="ij"))
    geometry = (kernel, strides, pads, dilations)  # pads (top, left, bottom, right)
    rows = patches_at(x, n_idx, oh, ow, geometry)
    assert rows.shape == (len(n_idx), 5 * kernel[0] * kernel[1]) and rows.dtype == np.float32
    np.testing.assert_allclose(rows @ w.reshape(4, -1).T, y[n_idx, :, oh, ow], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", [0.6, 0.4, 0.25])
def test_budget_meets_the_mac_target_by_the_cost_model(target):
    model = residual_model(channels=32)
    new, report = compress(model, target_macs=target)
    t = report.totals()
    assert t["macs_after"] <= target * t["macs_before"]
    assert report.settings["rank_method"] == "target_macs"


@pytest.mark.parametrize("target", [0.6, 0.35])
def test_measured_budget_meets_the_target_and_records_its_curves(target):
    model = residual_model(channels=32)
    new, report = compress(model, target_macs=target, calibration={"x": samples(48, seed=5)})
    t = report.totals()
    assert t["macs_after"] <= target * t["macs_before"]
    curves = report.sensitivity["curves"]
    assert set(curves) == {"stem", "block_conv", "down"}
    assert all(d >= 0 for curve in curves.values() for _, d, _, _ in curve)
    chosen = {r.layer: tuple(r.ranks) for r in report.decomposed}
    for layer, ranks in chosen.items():
        assert list(ranks) in [c[2] for c in curves[layer]]
    onnx.checker.check_model(new)


def test_measured_distortion_falls_as_ranks_grow():
    model = residual_model(channels=32)
    _, report = compress(model, target_macs=0.5, calibration={"x": samples(48, seed=6)}, probes="all")
    for curve in filter(None, report.sensitivity["curves"].values()):  # the stem has no option worth measuring
        assert all(measured for *_, measured in curve)
        distortions = [d for _, d, _, _ in sorted(curve)]
        assert distortions[-1] < distortions[0]


def test_knapsack_finds_the_least_total_distortion():
    from itertools import product
    from types import SimpleNamespace

    from onnx_tucker.budget import allocate_measured
    from onnx_tucker.ranks import ConvShape

    rng = np.random.default_rng(0)
    cands, curves = [], {}
    for i in range(4):
        shape = ConvShape(c_out=64, c_in=64, kernel=(3, 3), in_spatial=(8, 8), out_spatial=(8, 8))
        cands.append(SimpleNamespace(name=f"c{i}", shape=shape))
        macs = sorted(rng.integers(1, shape.macs(), 5), reverse=True)
        dist = np.sort(rng.random(5))
        curves[f"c{i}"] = [(int(m), float(d), (i, j)) for j, (m, d) in enumerate(zip(macs, dist))]
    opts = SimpleNamespace(target_macs=0.45, fixed_macs=0)
    planned = allocate_measured(cands, curves, opts)
    total = sum(c.shape.macs() for c in cands)
    best = None
    for combo in product(*[[(c.shape.macs(), 0.0, None)] + curves[c.name] for c in cands]):
        if sum(o[0] for o in combo) <= 0.45 * total:
            score = sum(o[1] for o in combo)
            best = score if best is None else min(best, score)
    got = [next(o for o in [(c.shape.macs(), 0.0, None)] + curves[c.name] if o[2] == planned[c.name]) for c in cands]
    assert sum(o[0] for o in got) <= 0.45 * total
    assert sum(o[1] for o in got) <= best + 1e-3  # exact up to the MAC-bin rounding


def test_a_budget_every_layer_fits_whole_leaves_every_layer_whole():
    """Target 1.0: leaving each layer whole costs exactly the budget and nothing in distortion. The knapsack used to
    round every cost up to a bin, so 'all whole' looked over budget and a lossy chain was forced in."""
    from types import SimpleNamespace

    from onnx_tucker.budget import allocate_latency, allocate_measured

    class Shape:
        def __init__(self, macs):
            self._macs = macs

        def macs(self):
            return self._macs

    cands = [SimpleNamespace(name=n, shape=Shape(m)) for n, m in (("a", 1000003), ("b", 777777), ("c", 333331))]
    curves = {c.name: [(c.shape.macs() // 2, d, (4, 4))] for c, d in zip(cands, (0.3, 0.4, 0.5))}
    assert allocate_measured(cands, curves, SimpleNamespace(target_macs=1.0)) == {"a": None, "b": None, "c": None}
    costs = {"a": (101.3, {(4, 4): 50.0}), "b": (77.7, {(4, 4): 40.0}), "c": (33.3, {(4, 4): 20.0})}
    planned, predicted = allocate_latency(cands, curves, costs, 1.0, whole_us=212.3)
    assert planned == {"a": None, "b": None, "c": None} and predicted["predicted_ratio"] == pytest.approx(1.0)
    # just under 1.0, by exactly the smallest layer's saving: that chain fits (no rounding loses it), yet the
    # least distortion there is the biggest layer's chain
    just_under = 1 - 0.5 * 333331 / (1000003 + 777777 + 333331)
    assert allocate_measured(cands, curves, SimpleNamespace(target_macs=just_under)) == {"a": (4, 4), "b": None, "c": None}


def test_a_target_just_above_the_smallest_reachable_is_met_on_a_deep_model():
    """The knapsack's bins must be fine where the budget is small: counting savings against the saving needed (the
    whole model, nearly) refused targets 0.05-0.2 % above the smallest reachable on 30 layers ('cannot be met at
    this budget resolution') after the check had said they were reachable."""
    from types import SimpleNamespace

    from onnx_tucker.budget import allocate_measured

    rng = np.random.default_rng(0)
    fractions = np.array([1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4])
    cands, curves = [], {}
    for i in range(30):
        whole = int(rng.integers(200_000, 3_000_000))
        cands.append(SimpleNamespace(name=f"c{i}", shape=SimpleNamespace(macs=lambda w=whole: w)))
        costs = (whole * fractions * rng.uniform(0.8, 1.2)).astype(int)
        curves[f"c{i}"] = [(int(m), float(rng.uniform(0.1, 2) * (1 - f) ** 2), (k,)) for k, (m, f) in enumerate(zip(costs, fractions))]
    total = sum(c.shape.macs() for c in cands)
    smallest = sum(min(e[0] for e in curves[c.name]) for c in cands) / total
    for extra in (0.0005, 0.001, 0.002):
        plan = allocate_measured(cands, curves, SimpleNamespace(target_macs=smallest + extra))
        used = sum(next(e[0] for e in curves[c.name] if e[2] == plan[c.name]) if plan[c.name] is not None else c.shape.macs()
                   for c in cands)
        assert used <= (smallest + extra) * total


def test_measured_budget_needs_calibration():
    with pytest.raises(UsageError, match="calibration"):
        compress(residual_model(channels=32), target_macs=0.5, budget_rule="measured")


def test_relu_aware_refit_lowers_post_relu_error_on_held_out_rows():
    from onnx_tucker.calibrate import relu_solve

    rng = np.random.default_rng(0)
    z = rng.standard_normal((6000, 6))
    true = rng.standard_normal((7, 4))
    target = np.hstack([z[:, :3], z[:, 3:] ** 2, np.ones((len(z), 1))]) @ true  # not linear in z
    design = np.hstack([z, np.ones((len(z), 1))])
    fit, held = slice(0, 4000), slice(4000, None)
    linear = np.linalg.lstsq(design[fit], target[fit], rcond=None)[0]
    relu = relu_solve(design[fit], target[fit], linear, 1e-6)

    def post_relu_error(solution):
        return np.linalg.norm(np.maximum(design[held] @ solution, 0) - np.maximum(target[held], 0))

    assert post_relu_error(relu) < post_relu_error(linear)


def test_unreachable_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot be met"):
        compress(residual_model(), target_macs=0.01)


def test_cli_measured_budget_writes_curves_and_refuses_without_calibration(tmp_path, capsys):
    from onnx_tucker.cli import main

    model_path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(residual_model(channels=32), str(model_path))
    np.savez(tmp_path / "train.npz", x_train=samples(48, seed=7))
    assert main(["compress", str(model_path), str(out), "--target-macs", "0.4", "--budget-rule", "measured",
                 "--calibrate", str(tmp_path / "train.npz"), "--report", str(report), "-q"]) == 0
    import json

    data = json.loads(report.read_text())
    assert set(data["sensitivity"]["curves"]) == {"stem", "block_conv", "down"}
    assert data["totals"]["macs_after"] <= 0.4 * data["totals"]["macs_before"]
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    assert main(["compress", str(model_path), str(bad), "--target-macs", "0.4", "--budget-rule", "measured"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration" in err and not bad.exists()


def test_measured_budget_falls_back_to_the_uniform_ratio_for_1d_convs():
    model = conv_model(c_in=16, c_out=32, kernel=(3,), spatial=(20,), attrs={"pads": [1, 1]})
    cal = {"x": np.random.default_rng(0).standard_normal((24, 16, 20)).astype(np.float32)}
    new, report = compress(model, target_macs=0.5, calibration=cal)
    assert any("uniform ratio used" in note for note in report.notes)
    assert report.totals()["macs_after"] <= 0.5 * report.totals()["macs_before"]


def test_suffix_from_a_layer_on_reproduces_the_whole_model():
    """Options are evaluated on the model from the changed layer on: same output as the whole model."""
    from onnx_tucker.graph import cut as _cut, probe_model as _probe_model, suffix_model as _suffix_model
    from onnx_tucker.pipeline import factorable_sites
    from onnx_tucker.runtime import make_session
    from onnx_tucker.sensitivity import _bias_of

    model = residual_model(channels=16)
    cands = [c for c in factorable_sites(model)[1] if c.eligible]
    probe, names = _probe_model(model, cands)
    weights = {}
    for c in cands:
        weights[names[c.name][0]], weights[names[c.name][1]] = c.weight, _bias_of(c)
    feeds = {"x": samples(6, seed=9)}
    full = make_session(probe)
    out_name = model.graph.output[0].name
    for c in cands:
        cut = _cut(probe, c.node.name)
        known = {**feeds, **weights}
        activations = [t for t in cut if t not in known]
        values = dict(zip(activations, full.run(activations, known))) if activations else {}
        values.update({t: known[t] for t in cut if t in known})
        changed = {names[c.name][0]: (c.weight * 0.5).astype(np.float32)}
        expected = full.run([out_name], {**feeds, **weights, **changed})[0]
        suffix = make_session(_suffix_model(probe, c.node.name, out_name, values))
        got = suffix.run([out_name], {**values, **changed})[0]
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_measured_budget_feeds_skip_branches_at_the_cut():
    """A skip tensor computed before a conv and used after it (not a conv input or output) is fed to the suffix."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), "w2")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "two"], ["skip"], name="mul"),
        helper.make_node("Conv", ["r", "w1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "w2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "skip"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w1, w2, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cal = {"x": rng.standard_normal((40, 16, 8, 8)).astype(np.float32)}
    new, report = compress(model, target_macs=0.6, calibration=cal)
    assert set(report.sensitivity["curves"]) == {"conv_a", "conv_b"}
    assert report.totals()["macs_after"] <= 0.6 * report.totals()["macs_before"]


def test_refit_rows_from_an_image_subset_line_up_with_their_targets(monkeypatch):
    """Each layer's rows come from a seeded subset of the images (its input is captured on those only):
    at full rank the compressed rows must equal the original's at the same positions (error ~0), and the
    refit at a real rank still lowers the held-out error."""
    import onnx_tucker.calibrate as calibrate

    monkeypatch.setattr(calibrate, "MIN_IMAGES", 8)
    monkeypatch.setattr(calibrate, "MAX_ROWS", 300)
    monkeypatch.setattr(calibrate, "ROW_SPREAD", 2)
    model, cal = residual_model(), {"x": samples(64, seed=7)}
    _, exact = compress(model, ratio=1.0, force=True, calibration=cal, refit="last")
    assert all(v["output_error_before"] < 1e-4 for v in exact.calibration["layers"].values())
    plain, _ = compress(model, ratio=0.5)
    calibrated, _ = compress(model, ratio=0.5, calibration=cal, refit="last")
    held_out = {"x": samples(32, seed=8)}
    assert layer_error(model, calibrated, "b", held_out) < layer_error(model, plain, "b", held_out)


def test_an_unreachable_measured_budget_is_refused_before_any_probe(monkeypatch):
    """The measured budget checks its options' smallest MACs first: no curve is measured for a target
    it cannot meet (a ResNet50 used to measure for 8 minutes, then refuse)."""
    import onnx_tucker.sensitivity as sensitivity

    def never(*args, **kwargs):
        raise AssertionError("curves measured for an unreachable target")

    monkeypatch.setattr(sensitivity, "distortion_curves", never)
    with pytest.raises(UsageError, match="cannot be met"):
        compress(residual_model(), target_macs=0.01, calibration={"x": samples(48, seed=9)})


def _refit_weights(model, cal, **kwargs):
    from onnx import numpy_helper

    new, report = compress(model, calibration=cal, **kwargs)
    return {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}, report.calibration


@pytest.mark.parametrize("refit", ["last", "core"])
def test_refit_in_one_segmented_pass_equals_a_prefix_model_per_chain(monkeypatch, refit):
    """The refit runs the compressed model forward once, a segment per chain (issue 15); each chain's
    input must be what the old prefix model per chain computed with the earlier refits in place."""
    import onnx_tucker.calibrate as calibrate

    monkeypatch.setattr(calibrate, "MIN_IMAGES", 8)
    monkeypatch.setattr(calibrate, "MAX_ROWS", 300)
    monkeypatch.setattr(calibrate, "ROW_SPREAD", 2)  # layers then take different image subsets
    model, cal = residual_model(), {"x": samples(64, seed=7)}
    segmented, info = _refit_weights(model, cal, ratio=0.5, refit=refit)
    assert info["capture"] == "one forward pass, a segment per chain"
    monkeypatch.setattr(calibrate._Forward, "_advance", lambda self, index, tensor: None)  # the old way
    prefixed, old = _refit_weights(model, cal, ratio=0.5, refit=refit)
    assert old["capture"] == "a prefix model per chain"
    assert set(segmented) == set(prefixed)
    for name, value in prefixed.items():
        np.testing.assert_allclose(segmented[name], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(), err_msg=name)
    assert [v["refit"] for v in info["layers"].values()] == [v["refit"] for v in old["layers"].values()]


def test_refit_falls_back_to_prefix_models_when_a_shape_tensor_crosses_a_cut():
    """A tensor that is not one row per image (a Shape output read after a chain) cannot be batched:
    the refit then computes each chain's input with a prefix model, as before."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32), "W1")
    w2 = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32), "W2")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Conv", ["x", "W1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu"),
        helper.make_node("Conv", ["ar", "W2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["b", "shape_flat"], ["flat"], name="reshape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"], name="slice"),
        helper.make_node("Concat", ["n", "minus_one"], ["shape_flat"], name="concat", axis=0),
    ]
    consts = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("zero", [0]), ("one", [1]), ("minus_one", [-1]))]
    order = [nodes[0], nodes[5], nodes[6], nodes[1], nodes[2], nodes[3], nodes[4]]
    graph = helper.make_graph(order, "shape_cut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 1600])], [w1, w2, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    new, report = compress(model, ratio=0.5, force=True, calibration={"x": samples(48, seed=4)}, refit="last")
    assert report.calibration["capture"] == "a prefix model per chain"
    assert len(report.calibration["layers"]) == 2


def test_relu_solve_is_skipped_where_it_would_cost_too_much(monkeypatch):
    """Above RELU_WORK multiply-adds an iteration (a ResNet50's conv5: 1.2e12) the linear solution is kept."""
    import onnx_tucker.calibrate as calibrate

    rng = np.random.default_rng(0)
    design = np.hstack([rng.standard_normal((2000, 8)), np.ones((2000, 1))])
    target = np.abs(design @ rng.standard_normal((9, 4))) - 0.5  # not linear in the design
    linear = np.linalg.lstsq(design, target, rcond=None)[0]
    assert not calibrate.relu_too_costly(design, target)
    assert not np.allclose(calibrate.relu_solve(design, target, linear, 1e-6), linear)
    monkeypatch.setattr(calibrate, "RELU_WORK", 2000 * 4 * 9 * 9 - 1)
    assert calibrate.relu_too_costly(design, target)
    assert np.array_equal(calibrate.relu_solve(design, target, linear, 1e-6), linear)


def test_the_report_says_when_the_relu_aware_solve_was_skipped(monkeypatch):
    import onnx_tucker.calibrate as calibrate

    def labels():
        model = conv_model(c_in=16, c_out=32, spatial=(10, 10))  # conv -> Relu: the refit is ReLU-aware
        feeds = {"x": np.random.default_rng(3).standard_normal((48, 16, 10, 10)).astype(np.float32)}
        _, report = compress(model, ratio=0.5, calibration=feeds)
        return [entry["refit"] for entry in report.calibration["layers"].values() if "ReLU" in str(entry.get("refit"))]

    assert labels() and not any("skipped" in label for label in labels())
    monkeypatch.setattr(calibrate, "RELU_WORK", 0)
    skipped = labels()
    assert skipped and all("ReLU-aware solve skipped: too costly" in label for label in skipped)


def test_refit_goes_through_the_graph_in_order_whatever_order_the_chains_come_in():
    """Chains are refitted in the compressed graph's order (a ResNet's shortcut conv is a later site but an
    earlier node): given in reverse, the one forward pass still serves every chain, with the same result."""
    import copy

    from onnx import numpy_helper

    from onnx_tucker.calibrate import refit_chains

    model, cal = residual_model(), {"x": samples(64, seed=7)}
    new, report = compress(model, ratio=0.5, force=True, calibration=cal, refit=False)
    assert len(report.chains) >= 2
    results = []
    for chains in (report.chains, report.chains[::-1]):
        target = copy.deepcopy(new)
        info = refit_chains(model, target, cal, copy.deepcopy(chains), mode="core")
        assert info["capture"] == "one forward pass, a segment per chain"
        results.append(({i.name: numpy_helper.to_array(i) for i in target.graph.initializer}, list(info["layers"])))
    (first, order), (second, reverse_order) = results
    assert reverse_order == order[::-1]  # the report lists the chains as given
    for name, value in first.items():
        np.testing.assert_allclose(second[name], value, rtol=1e-6, atol=1e-7)


def test_reference_rows_spilled_to_files_give_the_same_refit(monkeypatch, tmp_path):
    """Past SPILL_BYTES the original layers' rows go to a temporary folder (a ResNet50's: 2.1 GB), read back
    a layer at a time: the same weights as in memory, and the folder is gone afterwards."""
    import tempfile

    import onnx_tucker.calibrate as calibrate

    model, cal = residual_model(), {"x": samples(64, seed=7)}
    in_memory, _ = _refit_weights(model, cal, ratio=0.5, refit="core")
    monkeypatch.setattr(calibrate, "SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spilled, _ = _refit_weights(model, cal, ratio=0.5, refit="core")
    assert not list(tmp_path.glob("onnx_tucker_rows_*"))
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    _refit_weights(model, cal, ratio=0.5, refit="core")
    assert made and not any(__import__("os").path.exists(p) for p in made)  # it did spill, and cleaned up
    for name, value in in_memory.items():
        np.testing.assert_array_equal(spilled[name], value, err_msg=name)


def _two_block_model(seed=0):
    """x -> convP -> Relu -> h; h -> convA -> Add(h, .) -> Relu -> y: convA's chain feeds a residual Add
    whose other input carries convP's compression error."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)  # noqa: E731
    inits = [w("WP", (16, 8, 3, 3)), w("BP", (16,)), w("WA", (16, 16, 3, 3)), w("BA", (16,))]
    nodes = [
        helper.make_node("Conv", ["x", "WP", "BP"], ["p"], name="convP", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["p"], ["h"], name="reluP"),
        helper.make_node("Conv", ["h", "WA", "BA"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h", "a"], ["s"], name="merge"),
        helper.make_node("Relu", ["s"], ["y"], name="reluS"),
    ]
    graph = helper.make_graph(nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_residual_merge_finds_the_other_branch_and_not_a_bias():
    from onnx import helper, numpy_helper

    from onnx_tucker.calibrate import residual_merge

    model = _two_block_model()
    assert residual_merge(model, "a") == ("s", "h")
    assert residual_merge(model, "p") is None  # into a Relu
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 16, 1, 1), np.float32), "bias"))
    model.graph.node[3].CopyFrom(helper.make_node("Add", ["a", "bias"], ["s"], name="merge"))
    assert residual_merge(model, "a") is None  # a constant addend is a bias, not a branch


def test_residual_target_fits_what_the_add_must_give(monkeypatch):
    """With the residual target, the chain before the Add is fitted to what the block must output: the
    original Add's output less the compressed other branch (which carries convP's error), through the ReLU
    that follows the Add. The block's output is then closer to the original's than when the chain copies
    its own conv, on the calibration inputs and on fresh ones."""
    from onnx_tucker import calibrate

    model = _two_block_model()
    x = np.random.default_rng(1).standard_normal((96, 8, 12, 12)).astype(np.float32)
    fresh = np.random.default_rng(2).standard_normal((96, 8, 12, 12)).astype(np.float32)
    errors = {}
    for flag in (False, True):
        monkeypatch.setattr(calibrate, "RESIDUAL_TARGET", flag)
        new, report = compress(model, ratio=0.5, force=True, calibration={"x": x})
        errors[flag] = [relative_error(run_model(new, {"x": v})[0], run_model(model, {"x": v})[0]) for v in (x, fresh)]
        layer = report.calibration["layers"]["convA"]
        assert ("residual Add 's'" in layer.get("target", "")) == flag, layer
        assert ("after the ReLU" in layer["refit"]) == flag, layer  # the ReLU follows the Add, not the conv
    assert errors[True][0] < 0.97 * errors[False][0] and errors[True][1] < 0.97 * errors[False][1], errors


def test_constant_nodes_crossing_a_cut_keep_the_one_pass_refit(monkeypatch):
    """torch.onnx writes Clip's bounds (ReLU6) as Constant nodes, often long before the Clip. Their values are
    not one row per image; they are copied into the segment that reads them, so the refit still runs forward
    once (MobileNetV2 fell back to a prefix model per chain), with the same weights as the prefix models."""
    from onnx import TensorProto, helper, numpy_helper

    import onnx_tucker.calibrate as calibrate

    rng = np.random.default_rng(5)
    w = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)  # noqa: E731
    const = lambda name, v: helper.make_node("Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(np.array(v, np.float32), name))  # noqa: E731
    nodes = [
        const("lo", 0.0), const("hi", 6.0),
        helper.make_node("Conv", ["x", "W1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["ac"], name="clip_a"),
        helper.make_node("Conv", ["ac", "W2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["b", "lo", "hi"], ["bc"], name="clip_b"),
        helper.make_node("Conv", ["bc", "W3"], ["y"], name="conv_c", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "clip_consts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 10, 10])],
                              [w("W1", (16, 8, 3, 3)), w("W2", (16, 16, 3, 3)), w("W3", (16, 16, 3, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    cal = {"x": (3 * rng.standard_normal((48, 8, 10, 10))).astype(np.float32)}
    segmented, info = _refit_weights(model, cal, ratio=0.5, force=True, refit="last")
    assert info["capture"] == "one forward pass, a segment per chain"
    monkeypatch.setattr(calibrate._Forward, "_advance", lambda self, index, tensor: None)  # the old way
    prefixed, old = _refit_weights(model, cal, ratio=0.5, force=True, refit="last")
    assert old["capture"] == "a prefix model per chain"
    for name, value in prefixed.items():
        np.testing.assert_allclose(segmented[name], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(), err_msg=name)


def test_calibration_passes_run_on_the_fastest_provider_with_cudnn_heuristics(monkeypatch):
    """The covariance pass, the reference rows and the refit's forward segments run where the probes do (CUDA
    when present), asking cuDNN for heuristic algorithms: each is a new session that would otherwise time
    every conv algorithm. Observed here on the CPU EP; the weights must equal a plain CPU run's."""
    from onnx import numpy_helper

    import onnx_tucker.calibrate as calibrate
    from onnx_tucker.runtime import make_session

    model, cal = residual_model(), {"x": samples(64, seed=7)}
    plain, _ = compress(model, ratio=0.5, calibration=cal)
    asked = []

    def observed(m, provider="cpu", threads=None, provider_options=None, **kw):
        asked.append((provider, provider_options))
        return make_session(m, "cpu", threads, **kw)

    monkeypatch.setattr(calibrate, "fastest_available", lambda: "cuda")
    monkeypatch.setattr(calibrate, "make_session", observed)
    routed, report = compress(model, ratio=0.5, calibration=cal)
    assert len(asked) >= 3 and report.calibration["capture"] == "one forward pass, a segment per chain"
    assert all(p == "cuda" and o["cudnn_conv_algo_search"] == "HEURISTIC" for p, o in asked), asked
    for a, b in zip(plain.graph.initializer, routed.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b), err_msg=a.name)


def test_a_relu_after_a_residual_add_gets_a_lower_cost_cap():
    """Through a residual Add the ReLU-aware solve is kept for work below RESIDUAL_RELU_WORK (the CIFAR
    ResNets' 1x1 last convs), linear above it (a ResNet50's 512-channel expansions), where plain chains
    still get the ReLU-aware solve up to RELU_WORK."""
    from onnx_tucker.calibrate import RELU_WORK, RESIDUAL_RELU_WORK, relu_too_costly

    design, target = np.zeros((16_000, 81)), np.zeros((16_000, 512))  # 5.4e10 multiply-adds an iteration
    assert RESIDUAL_RELU_WORK < 16_000 * 512 * 81 ** 2 < RELU_WORK
    assert not relu_too_costly(design, target)
    assert relu_too_costly(design, target, offset=np.zeros((1, 512)))
    small = np.zeros((16_000, 65))
    assert not relu_too_costly(small, np.zeros((16_000, 64)), offset=np.zeros((1, 64)))


def test_core_refit_spends_its_rank_on_what_the_relu_lets_through(monkeypatch):
    """With a ReLU after the layer, the reduced-rank core refit aims the rows both sides cut at the fit's own
    value (majorize-minimize on the post-ReLU error): lower post-ReLU error, on the fit rows and held out."""
    from onnx_tucker import calibrate

    model = conv_model(c_in=16, c_out=32, attrs={"pads": [1, 1, 1, 1]})  # conv -> relu, biases ~ N(0, 1)
    rng = np.random.default_rng(5)
    cal = {"x": rng.standard_normal((64, 16, 12, 12)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 16, 12, 12)).astype(np.float32)}
    held_error, fit_error = {}, {}
    for rounds in (0, 3):
        monkeypatch.setattr(calibrate, "CORE_RELU_ITERATIONS", rounds)
        new, report = compress(model, ratio=0.5, calibration=cal, refit="core")
        layer = report.calibration["layers"]["conv"]
        assert layer["refit"].startswith("core + last conv (after the ReLU")
        fit_error[rounds] = layer["output_error_after"]
        held_error[rounds] = relative_error(run_model(model, held)[0], run_model(new, held)[0])
    # 2.5 % lower here (random weights: the rank cut dominates); the CIFAR models: docs/core_relu.jsonl
    assert fit_error[3] < 0.99 * fit_error[0] and held_error[3] < 0.99 * held_error[0], (fit_error, held_error)


def test_covariances_buffered_across_batches_equal_the_batch_by_batch_sums(monkeypatch):
    """The positions are buffered (``FLUSH_COLUMNS``) before each Gram product: a model fixed to batch 1 gave one
    column per image and a 4096-wide layer a 4096^2 product per image (44 s against 3 s, 256 images). The moments are
    the same sums either way."""
    import onnx_tucker.calibrate as calibrate

    model = conv_model(c_in=6, c_out=4)
    x = np.random.default_rng(3).standard_normal((50, 6, 12, 12)).astype(np.float32)
    vertical = {"v": ("x", 3, 1, 1, 1, 1)}
    buffered = input_covariances(model, {"x": x}, ["x"], batch_size=4, vertical=vertical)
    monkeypatch.setattr(calibrate, "FLUSH_COLUMNS", 1)
    each = input_covariances(model, {"x": x}, ["x"], batch_size=4, vertical=vertical)
    for key in ("x", "v"):
        np.testing.assert_allclose(buffered[key], each[key], rtol=1e-5, atol=1e-7)


def test_unnamed_nodes_go_through_the_measured_budget_like_named_ones():
    """Node names are optional in ONNX; the probes and cuts found nodes by name, so with every name "" each layer got
    the first node's tensors and the solve failed on mismatched shapes (an internal error)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((32, 16, 3, 3), (32, 32, 3, 3)))

    def model(named):
        name = (lambda n: {"name": n}) if named else (lambda n: {})
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1] * 4, **name("Conv_y")), helper.make_node("Relu", ["y"], ["r"], **name("Relu_r")),
             helper.make_node("Conv", ["r", "w2"], ["z"], pads=[1] * 4, **name("Conv_z"))], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    cal = {"x": rng.standard_normal((64, 16, 10, 10)).astype(np.float32)}
    unnamed = model(False)
    (new, report), (_, named_report) = (compress(m, target_macs=0.5, calibration=cal) for m in (unnamed, model(True)))
    assert [(c.layer, c.ranks) for c in report.chains] == [(c.layer, c.ranks) for c in named_report.chains] and report.chains
    assert all(not n.name for n in unnamed.graph.node)  # the caller's model is left as it was


def test_a_tensor_named_like_a_probe_input_does_not_break_the_measured_budget():
    """The probe model fed each weight as the input `onnx_tucker_probe_W<i>`, unchecked: a model tensor of that name
    made onnxruntime refuse the probe ("Duplicate definition")."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n)
             for n, s in (("w", (32, 16, 3, 3)), ("b", (32,)), ("w2", (32, 32, 3, 3)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c0", pads=[1] * 4),
         helper.make_node("Relu", ["y"], ["onnx_tucker_probe_W1"], name="r"),
         helper.make_node("Conv", ["onnx_tucker_probe_W1", "w2"], ["z"], name="c1", pads=[1] * 4)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    cal = {"x": rng.standard_normal((64, 16, 10, 10)).astype(np.float32)}
    new, report = compress(model, target_macs=0.5, calibration=cal)
    assert report.chains and np.isfinite(run_model(new, {"x": cal["x"][:1]})[0]).all()


def test_calibration_data_that_overflows_the_statistics_is_one_data_error():
    """Finite but huge inputs (1e20) overflowed the float32 moments: numpy warnings, then 'weight contains NaN or Inf'
    blamed the weights. Now one DataError naming the tensor and the inputs' scale, and no warning."""
    import warnings

    from onnx_tucker.errors import DataError

    model = residual_model(channels=16)
    name = model.graph.input[0].name
    dims = [d.dim_value or 40 for d in model.graph.input[0].type.tensor_type.shape.dim]
    huge = {name: np.full(dims, 1e20, dtype=np.float32) * np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="overflows the statistics"):
            compress(model, ratio=0.5, calibration=huge)


def test_relu_solve_gives_the_same_numbers_on_one_thread_or_many(monkeypatch):
    """The per-channel solves go side by side on threads (issue 15: a 16-core GPU machine); each channel is
    computed alone, so the solution is the same bytes whatever the thread count."""
    from onnx_tucker import calibrate

    rng = np.random.default_rng(3)
    design = np.hstack([rng.standard_normal((4000, 12)), np.ones((4000, 1))])
    target = design @ rng.standard_normal((13, 9)) + 0.3 * rng.standard_normal((4000, 9))
    linear = np.linalg.lstsq(design, target, rcond=None)[0]
    results = {}
    for threads in (1, 4):
        monkeypatch.setattr(calibrate, "worker_threads", lambda threads=threads: threads)
        results[threads] = calibrate.relu_solve(design, target, linear, 1e-6)
    assert not np.allclose(results[1], linear)  # the solve did move the fit
    assert np.array_equal(results[1], results[4])



@pytest.mark.parametrize("bias", [True, False])
def test_the_probes_core_refit_is_the_calibrations_reduced_rank_regression_from_uncentred_moments(bias):
    """From the uncentred moments of the raw kxk patches (a ones column where the layer has a bias), the core that
    :func:`core_from_moments` gives spans the same fitted map as the calibration's reduced-rank regression on the
    input factor's real output (the patches it projects), shrunk towards the same Tucker solution."""
    import scipy.linalg

    from onnx_tucker.calibrate import _reduced_rank, core_from_moments

    rng = np.random.default_rng(21)
    n, c_in, c_out, taps, r_in, r_out = 600, 5, 6, 4, 3, 2
    p = rng.standard_normal((n, c_in * taps)) * np.linspace(0.5, 2, c_in * taps) + 0.3
    target = p @ rng.standard_normal((c_in * taps, c_out)) + 0.5 * rng.standard_normal((n, c_out)) + (1.0 if bias else 0.0)
    first, core, last = (rng.standard_normal((r_in, c_in)), rng.standard_normal((r_out, r_in, 2, 2)),
                         rng.standard_normal((c_out, r_out)))
    rows = np.hstack([p, np.ones((n, 1))]) if bias else p
    got = core_from_moments(first, core, last, rows.T @ rows, rows.T @ target, bias, shrink=1e-2)
    assert got.shape == core.shape
    # the calibration's way: the patches of the input factor's output, (channel, tap) rows
    projected = np.einsum("rc,nct->nrt", first, p.reshape(n, c_in, taps)).reshape(n, r_in * taps)
    mean_p, mean_t = (projected.mean(0), target.mean(0)) if bias else (np.zeros(r_in * taps), np.zeros(c_out))
    pc, tc = projected - mean_p, target - mean_t
    gram = pc.T @ pc
    lam = 1e-2 * np.trace(gram) / len(gram) + 1e-12
    prior = (last @ core.reshape(r_out, -1)).T
    full, _, v, _ = _reduced_rank(pc, mean_p, scipy.linalg.cho_factor(gram + lam * np.eye(len(gram))), tc, mean_t, lam * prior, r_out)
    mine = got.reshape(r_out, -1).T  # (R_in*taps, R_out): the new core's map, up to each column's sign
    assert np.allclose(mine @ mine.T, (full @ v) @ (full @ v).T, rtol=1e-7, atol=1e-9)
    assert not np.allclose(got, core)


def test_relu_solve_is_the_least_squares_on_the_rows_each_channel_lets_through():
    """Each channel's solve is ridge least squares on its rows that the ReLU lets through (original or fit positive),
    aimed at the clipped target, whether its Gram matrix is summed over those rows or taken from the whole less the
    cut rows (channels with most rows passing, and with few)."""
    from onnx_tucker.calibrate import RELU_RIDGE, relu_solve

    rng = np.random.default_rng(8)
    n, p = 3000, 6
    design = np.hstack([rng.standard_normal((n, p - 1)), np.ones((n, 1))])
    truth = rng.standard_normal((p, 4))
    truth[-1] = [2.0, 0.5, -0.5, -2.0]  # biases: most rows pass on the first channels, few on the last
    target = design @ truth + 0.3 * rng.standard_normal((n, 4))
    start = truth + 0.2 * rng.standard_normal(truth.shape)
    got = relu_solve(design, target, start, 1e-6, iterations=1)
    active = (target > 0) | (design @ start > 0)
    fractions = active.mean(0)
    assert fractions.max() > 0.6 and fractions.min() < 0.4
    for c in range(4):
        rows = design[active[:, c]]
        gram = rows.T @ rows
        lam = RELU_RIDGE * np.trace(gram) / p
        expected = np.linalg.solve(gram + lam * np.eye(p), rows.T @ np.maximum(target[active[:, c], c], 0) + lam * start[:, c])
        assert np.allclose(got[:, c], expected, rtol=1e-4, atol=1e-5), c

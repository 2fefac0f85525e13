"""Hidden-channel pruning (``--layers hidden``, onnx_tucker/prune.py) on a BatchNorm-folded torch export of an
inverted-residual network: units found, the least squares proven, the sliced graph proven against the composed one."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnx_tucker import prune as P
from onnx_tucker.graph import infer_shapes
from tests.conftest import run_model


def _mobilenet_like(path, seed: int = 0):
    """stem 3x3 -> inverted residual (residual Add) -> inverted residual (stride 2) -> a residual 3x3 conv -> 3x3 conv ->
    3x3 conv -> head conv -> GAP -> Linear, every conv followed by a BatchNorm the export folds, ReLU6 activations
    (Clip). Units: the two blocks, the pair of plain 3x3 convs, the head; the residual 3x3 conv is in none."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def cbr(c_in, c_out, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
        return nn.Sequential(*layers, *( [nn.ReLU6()] if act else []))

    class Inverted(nn.Module):
        def __init__(self, c_in, c_out, stride, expand=3):
            super().__init__()
            hidden = c_in * expand
            self.body = nn.Sequential(cbr(c_in, hidden), cbr(hidden, hidden, 3, stride, hidden), cbr(hidden, c_out, act=False))
            self.residual = stride == 1 and c_in == c_out

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class Residual3x3(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = cbr(c, c, 3)

        def forward(self, x):
            return x + self.body(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(cbr(3, 8, 3), Inverted(8, 8, 1), Inverted(8, 16, 2), Residual3x3(16),
                                          cbr(16, 16, 3), cbr(16, 16, 3), cbr(16, 48))
            self.fc = nn.Linear(48, 10)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    torch.manual_seed(seed)
    net = Net()
    for m in net.modules():  # BatchNorm statistics far from identity: the folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 16, 16), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "mbnet.onnx"
    model = _mobilenet_like(path)
    x = np.random.default_rng(0).normal(size=(512, 3, 16, 16)).astype(np.float32)  # the head: 20 rows per unknown
    return path, model, {"input": x}


def _units(model):
    graph = gs.import_onnx(model)
    return graph, P.find_units(graph, infer_shapes(model))


def test_units_are_the_blocks_and_the_head_of_a_folded_export(net):
    _, model, _ = net
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # folded by the exporter
    _, units = _units(model)
    assert [u.kind for u in units] == ["block", "block", "conv", "head"]
    assert [u.channels for u in units] == [24, 24, 16, 48]
    assert units[2].taps == 9 and units[3].taps == 1 and units[3].geometry is None
    assert units[0].skip is not None and units[1].skip is None  # the first block's output is a residual Add
    # MACs per channel: expand (c_in), depthwise (9), project (c_out), at the block's output size
    assert units[0].macs_per_channel == (8 + 9 + 8) * 16 * 16
    assert units[1].macs_per_channel == 8 * 16 * 16 + (9 + 16) * 8 * 8
    assert units[2].macs_per_channel == 2 * 16 * 9 * 8 * 8  # the producer's output and the consumer's input channels


def _lstsq_residual(moment, weight, keep, taps=1):
    """The least-squares residual on the channels ``keep`` (+ the intercept), directly."""
    c = moment.shape[0] - 1
    idx = P.columns(keep, taps) + [c]
    m = P._ridged(moment)
    solution = np.linalg.solve(m[np.ix_(idx, idx)], (m @ weight.T)[idx]).T
    full = np.zeros_like(weight)
    full[:, idx] = solution
    d = weight - full
    return float(np.einsum("oi,ij,oj->", d, m, d))


def _elimination_problem(channels: int, taps: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    width = channels * taps
    rows = np.maximum(rng.normal(size=(500, width)) @ rng.normal(size=(width, width)), 0)  # correlated, ReLU-like
    z = np.concatenate([rows, np.ones((500, 1))], axis=1)
    return z.T @ z / 500, rng.normal(size=(4, width + 1))


@pytest.mark.parametrize("taps", [1, 3])
@pytest.mark.parametrize("channels", [7, 24])  # 24: the dropped channels' columns are compacted away three times
def test_elimination_order_is_the_exact_greedy_and_its_residuals_are_the_least_squares_ones(taps, channels):
    """One column per channel (a 1x1 consumer) or several (a kxk consumer's taps, dropped together)."""
    moment, weight = _elimination_problem(channels, taps)
    order, residual = P.elimination_order(moment, weight, taps)
    assert sorted(order) == list(range(channels))
    kept = list(range(channels))
    for step, j in enumerate(order):
        costs = {i: _lstsq_residual(moment, weight, [k for k in kept if k != i], taps) for i in kept}
        assert costs[j] == pytest.approx(min(costs.values()), rel=1e-6)  # the cheapest drop at each step
        kept.remove(j)
        assert residual[step] == pytest.approx(_lstsq_residual(moment, weight, kept, taps), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("taps", [1, 3])
def test_elimination_order_is_the_same_whenever_its_arrays_are_compacted(taps, monkeypatch):
    """Dropped channels' columns left in place (no live entry reads them) or cut out: the same order and residuals,
    and equal costs (dead channels) still go in channel order."""
    moment, weight = _elimination_problem(30, taps, seed=2)
    weight[:, 5 * taps : 9 * taps] = 0.0  # four channels the consumer ignores: they cost 0, a tie
    results = []
    for fraction in (1.0, 0.5, 0.25, 0.05):  # 1.0: never before the last drop; 0.05: after almost every drop
        monkeypatch.setattr(P, "COMPACT_FRACTION", fraction)
        results.append(P.elimination_order(moment, weight, taps))
    order, residual = results[0]
    assert order[:4] == [5, 6, 7, 8]
    for other_order, other_residual in results[1:]:
        assert other_order == order
        np.testing.assert_allclose(other_residual, residual, rtol=1e-9, atol=1e-12)
    for drops in (0, 1, 11, 30, 40):  # the refit's reselection stops at the count it keeps: the same first drops
        first, first_residual = P.elimination_order(moment, weight, taps, drops=drops)
        assert first == order[:drops] and first_residual == results[-1][1][:drops]


def test_solve_with_every_channel_gives_back_the_original_weights(net):
    """Full 'rank': the refit of a consumer on all its channels is the consumer itself."""
    _, model, feeds = net
    graph, units = _units(model)
    moments = P.original_moments(model, feeds, units)
    nodes = {n.name: n for n in graph.nodes}
    for u in units:
        w, b = P._consumer_matrix(nodes[u.consumer])
        weight = np.concatenate([w, b[:, None]], axis=1)
        moment = moments[u.consumer][0]
        solution = P.solve(moment, P._ridged(moment) @ weight.T, list(range(u.channels)), taps=u.taps)
        np.testing.assert_allclose(solution, weight, rtol=1e-6, atol=1e-8)


def _composed_and_sliced(model, feeds, ratio):
    graph, units = _units(model)
    curves = P.error_curves(graph, units, P.original_moments(model, feeds, units))
    keep = P.keep_by_ratio(units, ratio)
    for u in units:
        u.keep = P.kept_after(curves[u.consumer][0], u.channels, keep[u.consumer])
    composed = P.refit_in_order(model, graph, units, keep, feeds)
    return units, composed, P.sliced(composed, units)


def test_the_sliced_graph_computes_the_composed_model_at_real_ranks(net):
    """At half the channels, the pruned graph equals the original graph with each consumer's dropped columns zero and
    its kept ones refitted: the slicing of producer, depthwise and consumer is exact."""
    _, model, feeds = net
    units, composed, pruned = _composed_and_sliced(model, feeds, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    x = {"input": np.random.default_rng(5).normal(size=(8, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_model(pruned, x)[0], run_model(composed, x)[0], rtol=1e-4, atol=1e-5)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in composed.graph.initializer}
    consumers = {n.name: n for n in composed.graph.node}
    for u in units:
        assert len(u.keep) == u.channels // 2
        w = inits[consumers[u.consumer].input[1]]
        dropped = sorted(set(range(u.channels)) - set(u.keep))
        columns = w[:, dropped] if u.kind == "block" else w[:, dropped]  # Gemm with transB: (out, in)
        assert np.all(columns == 0) and np.any(w[:, u.keep] != 0)
    sizes = {i.name: i.dims for i in pruned.graph.initializer}
    names = {n.name: n for n in pruned.graph.node}
    assert list(sizes[names[units[0].producer].input[1]])[0] == 12
    assert list(sizes[names[units[0].depthwise].input[1]])[0] == 12
    assert [a.i for a in names[units[0].depthwise].attribute if a.name == "group"] == [12]
    assert list(sizes[names[units[2].producer].input[1]]) == [8, 16, 3, 3]
    assert list(sizes[names[units[2].consumer].input[1]]) == [16, 8, 3, 3]
    assert list(sizes[names[units[3].consumer].input[1]]) == [10, 24]


def test_the_refit_runs_each_model_forward_once_and_equals_prefix_models_per_unit(net, monkeypatch):
    """The refit's inputs come from one forward pass of the pruned model (each unit refitted before the pass moves on)
    and one of the original, never a prefix model per unit; they are the tensors prefix models give, so the composed
    weights are the same."""
    from onnx_tucker.calibrate import _collect
    from onnx_tucker.passes import Passes

    _, model, feeds = net
    real_at, seen = Passes.at, []

    def spy(self, at_model, tensors, index):
        values = real_at(self, at_model, tensors, index)
        seen.append((self.forward.usable, self.forward.index == index))
        return values
    monkeypatch.setattr(Passes, "at", spy)
    units, one_pass, _ = _composed_and_sliced(model, feeds, 0.5)
    assert len(seen) == 2 * len(units) and all(usable and there for usable, there in seen)
    errors = [u.relative_error for u in units]

    monkeypatch.setattr(Passes, "at", lambda self, at_model, tensors, index: [_collect(at_model, self.feeds, t) for t in tensors])
    units, per_unit, _ = _composed_and_sliced(model, feeds, 0.5)
    changed = 0
    for got, want, original in zip(one_pass.graph.initializer, per_unit.graph.initializer, model.graph.initializer):
        a, b, o = (onnx.numpy_helper.to_array(t) for t in (got, want, original))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())  # float32 sums in other orders
        changed += not np.array_equal(a, o)
    assert changed >= 2 * len(units)  # every consumer's weight and bias refitted
    np.testing.assert_allclose(errors, [u.relative_error for u in units], rtol=1e-4)


def test_the_refit_beats_dropping_the_channels_alone(net):
    """What the least squares buys: the pruned model is nearer the original than the same channels dropped with the
    consumer's weights unchanged."""
    _, model, feeds = net
    units, composed, pruned = _composed_and_sliced(model, feeds, 0.5)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    inits = {i.name: i for i in plain.graph.initializer}
    nodes = {n.name: n for n in plain.graph.node}
    for u in units:
        w = onnx.numpy_helper.to_array(inits[nodes[u.consumer].input[1]]).copy()
        dropped = sorted(set(range(u.channels)) - set(u.keep))
        w[:, dropped] = 0
        inits[nodes[u.consumer].input[1]].CopyFrom(onnx.numpy_helper.from_array(w, nodes[u.consumer].input[1]))
    x = {"input": np.random.default_rng(6).normal(size=(64, 3, 16, 16)).astype(np.float32)}
    ref = run_model(model, x)[0]
    err = lambda m: np.linalg.norm(run_model(m, x)[0] - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(pruned) < 0.7 * err(plain)
    assert all(0 <= u.relative_error < 1 for u in units)


def test_a_mac_budget_is_met_with_the_fewest_errors(net):
    from onnx_tucker import compress

    path, model, feeds = net
    new, report = compress(model, layers=("hidden",), target_macs=0.6, calibration=feeds)
    t = report.totals()
    assert t["macs_after"] <= 0.6 * t["macs_before"] and t["macs_after"] > 0.5 * t["macs_before"]
    assert report.pruning["pruned"] >= 1 and t["pruned"] >= 3 and t["decomposed"] == 0
    assert report.settings["target_macs"] == 0.6 and report.settings["layers"] == ["hidden"]
    # the table's sizes are the model's: the MACs the report says are the written model's
    graph, units = _units(new)
    shapes = infer_shapes(new)
    assert P.conv_macs(graph, shapes) == t["macs_after"]
    onnx.checker.check_model(new, full_check=True)
    recorded = json.loads({p.key: p.value for p in new.metadata_props}["onnx_tucker.pruning"])
    assert {name: entry["kept"] for name, entry in recorded.items()} == {u["consumer"]: u["kept"] for u in report.pruning["units"]}


def test_with_a_ratio_the_other_kinds_are_factored_and_the_pruned_convs_left_as_pruned(net):
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), ratio=0.5, calibration=feeds)
    records = {r.layer: r for r in report.layers}
    decomposed = [r for r in report.layers if r.decomposed]
    assert len(decomposed) == 1 and decomposed[0].kernel == [16, 16, 3, 3]  # the plain 3x3 conv
    pruned = [r for r in report.layers if r.pruned]
    assert len(pruned) == 9 and not any(r.decomposed for r in pruned)  # 2 blocks x 3 convs, the pair, the head conv
    assert all(r.macs_after < r.macs_before for r in pruned)
    graph, _ = _units(model)
    assert sum(r.macs_before for r in records.values()) == P.conv_macs(graph, infer_shapes(model))
    np.testing.assert_array_equal(run_model(new, feeds)[0].shape, (512, 10))


def _error_lines(result) -> int:
    """stderr's lines other than notices (a small calibration set gets one)."""
    return len([line for line in result.stderr.strip().splitlines() if not line.startswith("onnx-tucker: notice:")])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_prunes_to_a_budget_and_reports_it(net, tmp_path):
    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = _cli(path, out, "--target-macs", "0.6", "--layers", "hidden", "--calibrate", calib, "--report", report)
    assert r.returncode == 0, r.stderr
    assert "pruned" in r.stdout and "prune" in r.stdout
    data = json.loads(report.read_text())
    assert data["pruning"]["pruned"] >= 1 and data["totals"]["macs_after"] <= 0.6 * data["totals"]["macs_before"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.5", "--layers", "hidden"], "--layers hidden needs calibration data (--calibrate)"),
    (["--layers", "hidden", "--rank-method", "energy", "--calibrate", "CALIB"], "give --ratio or --target-macs"),
    (["--target-macs", "0.01", "--layers", "hidden", "--calibrate", "CALIB"], "cannot be met by pruning"),
    (["--layers", "hiden", "--calibrate", "CALIB"], "unknown layer kind 'hiden'"),
])
def test_cli_refuses_what_pruning_cannot_do_in_one_line(net, tmp_path, args, message):
    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    out = tmp_path / "out.onnx"
    r = _cli(path, out, *[str(calib) if a == "CALIB" else a for a in args])
    assert r.returncode != 0 and message in r.stderr
    assert _error_lines(r) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_a_model_without_hidden_units_is_a_one_line_error(tmp_path, residual):
    path = tmp_path / "res.onnx"
    onnx.save(residual, str(path))
    calib = tmp_path / "calib.npz"
    shape = [d.dim_value or 1 for d in residual.graph.input[0].type.tensor_type.shape.dim]
    np.savez(calib, **{residual.graph.input[0].name: np.random.default_rng(0).normal(size=[64] + shape[1:]).astype(np.float32)})
    out = tmp_path / "out.onnx"
    r = _cli(path, out, "--ratio", "0.5", "--layers", "hidden", "--calibrate", calib)
    assert r.returncode != 0 and "no prunable hidden channels" in r.stderr and not out.exists()
    assert _error_lines(r) == 1 and "Traceback" not in r.stderr


def test_distill_trains_the_pruned_tensors(net):
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden",), ratio=0.5, calibration=feeds,
                           distill={"steps": 4, "reconstruct_steps": 0, "holdout": 0.25})
    # a block: its producer's, depthwise's and consumer's weight and bias; a head: its conv's and the classifier's
    expected = sum(6 if u["kind"] == "block" else 4 for u in report.pruning["units"] if u["kept"] < u["channels"])
    assert report.distill["trainable_tensors"] == expected == 20
    assert report.distill["before"]["kl"] > 0  # measured against the original model, not against the pruned one
    names = {i.name for i in new.graph.initializer}
    assert any(n.endswith("_pruned") for n in names)


def test_an_excluded_conv_keeps_its_unit_whole(net):
    from onnx_tucker import compress

    _, model, feeds = net
    _, units = _units(model)
    _, report = compress(model, layers=("hidden",), ratio=0.5, calibration=feeds, exclude=(units[1].depthwise,))
    kept = {u["consumer"]: u["kept"] for u in report.pruning["units"]}
    assert units[1].consumer not in kept and kept[units[0].consumer] == 16  # a block: half of 24, up to a multiple of 8
    records = {r.layer: r for r in report.layers}
    assert not records[units[1].depthwise].pruned and records[units[1].depthwise].macs_after == records[units[1].depthwise].macs_before


def _keras_inverted_residuals():
    """The same network in Keras, converted by the tool's tf2onnx path: the BatchNorm after each depthwise conv stays a
    per-channel Mul and Add, a stride-2 block pads first (Pad), the head squeezes (Squeeze) into a MatMul + Add."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from onnx_tucker.convert import keras_to_onnx

    keras.utils.set_random_seed(0)
    L = keras.layers

    def bn_relu(x, act=True):
        x = L.BatchNormalization()(x)
        return L.ReLU(6.0)(x) if act else x

    def block(x, c_out, stride, expand=3):
        c_in = x.shape[-1]
        h = bn_relu(L.Conv2D(c_in * expand, 1, use_bias=False, kernel_initializer="he_normal")(x))
        if stride == 2:
            h = L.ZeroPadding2D(((0, 1), (0, 1)))(h)
        h = bn_relu(L.DepthwiseConv2D(3, stride, padding="valid" if stride == 2 else "same", use_bias=False,
                                      depthwise_initializer="he_normal")(h))
        y = bn_relu(L.Conv2D(c_out, 1, use_bias=False, kernel_initializer="he_normal")(h), act=False)
        return L.Add()([x, y]) if stride == 1 and c_in == c_out else y

    inp = keras.Input((16, 16, 3))
    x = bn_relu(L.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer="he_normal")(inp))
    x = block(block(x, 8, 1), 16, 2)
    x = bn_relu(L.Conv2D(48, 1, use_bias=False, kernel_initializer="he_normal")(x))
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # trained-like statistics: the folded convs get biases, the depthwise BN real scales
        if isinstance(layer, L.BatchNormalization):
            c = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c), rng.uniform(-0.3, 0.3, c), rng.uniform(0.5, 2, c)])
        if isinstance(layer, L.Dense):
            w, b = layer.get_weights()
            layer.set_weights([w, rng.uniform(-0.1, 0.1, b.shape)])
    return keras_to_onnx(model)


def test_a_tf2onnx_keras_export_prunes_exactly_too():
    """Keras MobileNetV2-style blocks as tf2onnx writes them (NHWC input, Pad, per-channel Mul/Add, Squeeze, MatMul +
    Add): all three units found, and the sliced graph equals the composed model."""
    model = _keras_inverted_residuals()
    graph, units = _units(model)
    assert [(u.kind, u.channels) for u in units] == [("block", 24), ("block", 24), ("head", 48)]
    ops = [{n.op for n in u.nodes} for u in units]
    assert {"Mul", "Add"} <= ops[0] and "Pad" in ops[1] and "Squeeze" in ops[2]
    assert units[0].skip is not None
    x = {model.graph.input[0].name: np.random.default_rng(1).normal(size=(512, 16, 16, 3)).astype(np.float32)}
    units, composed, pruned = _composed_and_sliced(model, x, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run_model(pruned, x)[0], run_model(composed, x)[0], rtol=1e-4, atol=1e-5)
    reference = run_model(model, x)[0]
    assert 0 < np.abs(run_model(pruned, x)[0] - reference).max() < 0.5 * np.abs(reference).max()
    # the per-channel scales and the classifier were sliced too
    inits = {i.name: list(i.dims) for i in pruned.graph.initializer}
    matmul = [n for n in pruned.graph.node if n.op_type == "MatMul"][0]
    assert inits[matmul.input[1]] == [24, 10]


def test_a_unit_keeps_no_more_channels_than_its_calibration_rows_can_refit(net):
    """The head has one row per image: with 96 images half its 48 channels (25 unknowns per score) is more than 96 rows
    fit at 20 per unknown, so it stays whole at --ratio 0.5 and the budget is not offered it; the blocks' many positions
    per image let them be pruned. (With too few rows the in-sample error said 0 and the seed CNN's output collapsed.)"""
    from onnx_tucker import compress

    _, model, feeds = net
    few = {"input": feeds["input"][:96]}
    _, report = compress(model, layers=("hidden",), ratio=0.5, calibration=few)
    units = {u["kind"]: u for u in report.pruning["units"]}
    assert units["head"]["kept"] == units["head"]["channels"] == 48 and units["head"]["most_kept"] == 3
    assert units["block"]["kept"] < units["block"]["channels"]
    assert any("rows" in note for note in report.notes)
    graph, units_ = _units(model)
    moments = P.original_moments(model, few, units_)
    curves = P.error_curves(graph, units_, moments)
    assert max(k for k in curves[units_[3].consumer][1] if k < 48) <= 3


def test_kept_channels_are_multiples_of_8_in_blocks_or_of_rank_multiple(net):
    """A block keeps a multiple of 8 channels (``prune.MULTIPLE``: a MobileNetV2 with odd counts ran slower than the
    original on the CPU EP), pairs and heads any count; --rank-multiple N makes every unit keep multiples of N; or all."""
    from onnx_tucker import compress

    _, model, feeds = net
    for multiple, kwargs in ((1, {"ratio": 0.4}), (1, {"target_macs": 0.6}), (16, {"ratio": 0.4})):
        _, report = compress(model, layers=("hidden",), calibration=feeds, rank_multiple=multiple, **kwargs)
        units = report.pruning["units"]
        for u in units:
            step = multiple if multiple > 1 else (P.MULTIPLE if u["kind"] == "block" else 1)
            assert u["kept"] % step == 0 or u["kept"] == u["channels"], (multiple, kwargs, u)
        assert any(u["kept"] < u["channels"] for u in units)
    _, report = compress(model, layers=("hidden",), calibration=feeds, ratio=0.4)
    assert {u["kind"]: u["kept"] for u in report.pruning["units"]} == {"block": 16, "conv": 6, "head": 19}
    assert P.keep_options(24, 8) == [8, 16, 24] and P.keep_options(20, 8) == [8, 16, 20]


def test_probe_curves_measure_the_composed_model(net):
    """The budget's KL probes (``prune.probe_curves``: the consumers' weights fed as inputs of one session) give the
    distortion of the model with that unit alone pruned and refitted, written out and run on its own."""
    from onnx_tucker.sensitivity import _distortion, eval_samples

    _, model, feeds = net
    graph, units = _units(model)
    moments = P.original_moments(model, feeds, units)
    curves = P.error_curves(graph, units, moments)
    probed = P.probe_curves(model, feeds, graph, units, moments, curves)
    assert set(probed) == set(curves)
    u = units[2]  # the conv pair: 9 taps per channel
    keep = sorted(k for k in probed[u.consumer][1] if k < u.channels)[0]
    assert probed[u.consumer][1][u.channels] == 0 and probed[u.consumer][1][keep] > 0
    # the same option built as a model
    kept = P.kept_after(curves[u.consumer][0], u.channels, keep)
    node = {n.name: n for n in graph.nodes}[u.consumer]
    w, b = P._consumer_matrix(node)
    moment = moments[u.consumer][0]
    solution = P.solve(moment, moment @ np.concatenate([w, b[:, None]], axis=1).T, kept, taps=u.taps)
    full = np.zeros((solution.shape[0], u.channels * u.taps))
    full[:, P.columns(kept, u.taps)] = solution[:, :-1]
    composed = onnx.ModelProto()
    composed.CopyFrom(model)
    for init in composed.graph.initializer:
        if init.name == node.inputs[1].name:
            init.CopyFrom(onnx.numpy_helper.from_array(full.reshape(node.inputs[1].values.shape).astype(np.float32), init.name))
        if init.name == node.inputs[2].name:
            init.CopyFrom(onnx.numpy_helper.from_array(solution[:, -1].astype(np.float32), init.name))
    pick = np.sort(np.random.default_rng(0).choice(len(feeds["input"]), eval_samples(feeds), replace=False))
    x = {"input": feeds["input"][pick]}
    expected = _distortion(run_model(model, x)[0], run_model(composed, x)[0])
    assert probed[u.consumer][1][keep] == pytest.approx(expected, rel=1e-4)


# --- edge cases a regression hunt found (stop 29) ---------------------------------------------------------------------


def test_a_model_fixed_to_batch_1_is_pruned_batch_by_batch(tmp_path):
    """A torch export without dynamic axes takes batches of 1 only: the statistics and refits run at its batch."""
    from onnx_tucker import compress
    from tests.conftest import torch_fixed_batch_net

    pytest.importorskip("torch")
    model = onnx.load(str(torch_fixed_batch_net(tmp_path / "fixed.onnx")))
    x = np.random.default_rng(0).normal(size=(40, 3, 16, 16)).astype(np.float32)
    new, report = compress(model, layers=("hidden",), ratio=0.5, calibration={"input": x})
    assert report.pruning["pruned"] == 1
    composed_free = run_model(new, {"input": x[:1]})[0]
    assert composed_free.shape == (1, 10) and np.all(np.isfinite(composed_free))


def test_nothing_pruned_writes_the_model_unchanged_even_with_distill(net, tmp_path):
    """--ratio 1.0 keeps every channel: like a factoring that pays nowhere, the input model is written unchanged and
    --distill has nothing to train (it used to fail: 'needs at least one trainable initializer')."""
    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    out = tmp_path / "out.onnx"
    r = _cli(path, out, "--ratio", "1.0", "--layers", "hidden", "--calibrate", calib, "--distill", "--distill-steps", "2",
             "--reconstruct-steps", "0")
    assert r.returncode == 0, r.stderr
    assert "nothing pays: wrote the input model unchanged" in r.stdout


def test_a_budget_at_the_least_reachable_macs_keeps_the_fewest_channels(net):
    """The knapsack's bins round costs up, so a budget the exact check allows could find no choice: then every unit
    keeps its fewest channels (it crashed: 'NoneType' object is not subscriptable)."""
    _, model, feeds = net
    _, units = _units(model)
    shapes = infer_shapes(model)
    graph = gs.import_onnx(model)
    total = P.conv_macs(graph, shapes)
    fixed = total - sum(u.macs_per_channel * u.channels for u in units)
    multiple = {u.consumer: P.MULTIPLE if u.kind == "block" else 1 for u in units}
    least = (fixed + sum(u.macs_per_channel * min(P.keep_options(u.channels, multiple[u.consumer])) for u in units)) / total
    new, pruning = P.prune(model, feeds, target_macs=least + 1e-9)
    kept = {u.consumer: len(u.keep) for u in pruning.units}
    assert all(kept[u.consumer] == min(P.keep_options(u.channels, u.multiple)) for u in pruning.units), kept


def test_a_pruned_head_is_not_factored_again_with_dense_and_distill_trains_it(net):
    """--layers hidden,dense: the pruned classifier stays as pruned (its refit weights are what --distill trains; it
    used to be factored, and --distill then named a weight the model no longer had)."""
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "dense"), ratio=0.5, calibration=feeds,
                           distill={"steps": 2, "reconstruct_steps": 0, "holdout": 0.25})
    gemm = [r for r in report.layers if r.op == "Gemm"]
    assert gemm and not gemm[0].decomposed and gemm[0].pruned
    assert report.distill["trainable_tensors"] > 0


def test_sweep_and_inspect_with_hidden(net, tmp_path):
    """sweep: a setting that pruned is a row (it used to count as 'nothing decomposed'); inspect refuses hidden."""
    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    labels = np.random.default_rng(0).integers(0, 10, size=(64, 1))
    test = tmp_path / "test.npz"
    np.savez(test, x=feeds["input"][:64], y=labels)
    r = _cli("sweep", path, "--data", test, "--calibrate", calib, "--ratios", "0.5", "--layers", "hidden",
             "--out-dir", tmp_path / "sweep", "--batch", "1", "--runs", "3")
    assert r.returncode == 0, r.stderr
    r = _cli("inspect", path, "--layers", "hidden")
    assert r.returncode != 0 and "--layers hidden" in r.stderr and _error_lines(r) == 1


def test_an_unfolded_batchnorm_between_two_convs_is_pruned_with_them(tmp_path):
    """A torch export without constant folding keeps each BatchNormalization node: `--layers hidden` found no unit
    across it ('no prunable hidden channels'). Now it is a per-channel op of the unit, its scale, shift, mean and
    variance sliced with the channels, and the sliced graph computes the composed model."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                        nn.BatchNorm2d(24), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    for bn in (net[1], net[4]):  # statistics far from the identity, so a slicing mistake shows
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, do_constant_folding=False, dynamo=False)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 2
    feeds = {"input": np.random.default_rng(0).normal(size=(256, 3, 16, 16)).astype(np.float32)}
    units, composed, pruned = _composed_and_sliced(model, feeds, 0.5)
    assert len(units) == 1  # conv1 -> BN -> ReLU -> conv2 (conv2, its consumer, is in no other unit)
    assert [n.op for n in units[0].nodes] == ["Conv", "BatchNormalization", "Relu"]
    onnx.checker.check_model(pruned, full_check=True)
    x = {"input": np.random.default_rng(5).normal(size=(8, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_model(pruned, x)[0], run_model(composed, x)[0], rtol=1e-4, atol=1e-5)
    sizes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    bn = next(n for n in pruned.graph.node if n.op_type == "BatchNormalization")
    assert [sizes[t][0] for t in bn.input[1:5]] == [8, 8, 8, 8]
    # the scale and shift are trained by --distill, the statistics are not
    assert set(units[0].trainable) & set(bn.input[1:3]) == set(bn.input[1:3]) and not set(units[0].trainable) & set(bn.input[3:5])

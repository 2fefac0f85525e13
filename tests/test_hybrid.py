"""One MAC budget for pruning and rank cuts (``--layers hidden,KIND --target-macs T``, onnx_tucker/hybrid.py), on the
BatchNorm-folded inverted-residual export of tests/test_prune.py: the hybrid is the two public calls composed, the
target holds, the share moves the split, ``auto`` keeps the share it measured best, bad shares are one-line errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnx_tucker import prune as P
from onnx_tucker.graph import infer_shapes
from tests.conftest import run_model
from tests.test_prune import _cli, _error_lines, _mobilenet_like


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrid") / "mbnet.onnx"
    model = _mobilenet_like(path)
    x = np.random.default_rng(0).normal(size=(512, 3, 16, 16)).astype(np.float32)
    return path, model, {"input": x}


@pytest.mark.parametrize("args, message", [
    (["--target-macs", "0.5", "--layers", "hidden", "--prune-share", "0.3", "--calibrate", "CALIB"], "--prune-share splits"),
    (["--ratio", "0.5", "--layers", "hidden,kxk", "--prune-share", "0.3", "--calibrate", "CALIB"], "--prune-share splits"),
    (["--target-macs", "0.5", "--layers", "hidden,kxk", "--prune-share", "1.5", "--calibrate", "CALIB"], "must be in [0, 1] or auto"),
    (["--target-macs", "0.1", "--layers", "hidden,kxk", "--prune-share", "0.1", "--calibrate", "CALIB"],
     "a larger --prune-share prunes more"),
])
def test_cli_refuses_a_prune_share_it_cannot_use_in_one_line(net, tmp_path, args, message):
    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    out = tmp_path / "out.onnx"
    before = path.read_bytes()
    r = _cli(path, out, *[str(calib) if a == "CALIB" else a for a in args])
    assert r.returncode != 0 and message in r.stderr
    assert _error_lines(r) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and path.read_bytes() == before


def test_a_budget_shared_with_factoring_is_pruning_then_the_measured_budget(net):
    """--layers hidden,kxk --target-macs T: pruning to T ** share of the MACs, then the measured budget on the pruned
    model, its pruned convs included, to T of the original's: the same model as the two public calls one after the
    other, T met, and the MACs the report gives are the written model's."""
    from onnx_tucker import compress
    from onnx_tucker.hybrid import PRUNE_SHARE

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds)
    t = report.totals()
    assert 0.45 * t["macs_before"] < t["macs_after"] <= 0.5 * t["macs_before"]
    assert report.pruning["pruned"] >= 1 and t["decomposed"] >= 1
    assert any(r.pruned and r.decomposed for r in report.layers)  # a pruned conv factored too
    assert P.conv_macs(gs.import_onnx(new), infer_shapes(new)) == t["macs_after"]
    assert report.settings["prune_share"] == PRUNE_SHARE and report.pruning["share"] == PRUNE_SHARE
    onnx.checker.check_model(new, full_check=True)

    pruned, first = compress(model, layers=("hidden",), target_macs=0.5 ** PRUNE_SHARE, calibration=feeds)
    f = first.totals()
    assert report.pruning["pruned_to"] == pytest.approx(f["macs_after"] / f["macs_before"], abs=1e-6)
    second, _ = compress(pruned, layers=("kxk",), target_macs=0.5 * f["macs_before"] / f["macs_after"], calibration=feeds)
    np.testing.assert_array_equal(run_model(new, feeds)[0], run_model(second, feeds)[0])


def test_prune_share_moves_the_split_between_pruning_and_factoring(net):
    from onnx_tucker import compress

    _, model, feeds = net
    shares = {}
    for share in (0.25, 0.75):
        _, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share=share)
        t = report.totals()
        assert t["macs_after"] <= 0.5 * t["macs_before"]
        assert report.pruning["pruned_to"] <= 0.5 ** share + 1e-9
        shares[share] = report.pruning["pruned_to"]
    assert shares[0.75] < shares[0.25]


@pytest.mark.parametrize("share", [-0.1, 1.01, 1.5, "half", True, float("nan")])
def test_a_prune_share_outside_0_1_is_refused_by_the_api(net, share):
    from onnx_tucker import compress
    from onnx_tucker.errors import UsageError

    _, model, feeds = net
    with pytest.raises(UsageError, match="prune_share must be"):
        compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share=share)


def test_distill_after_pruning_and_factoring_trains_what_is_in_the_model(net):
    """A pruned conv that a chain then replaced has no pruned tensor left to train: its chain's factors are trained."""
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds,
                           distill={"steps": 2, "reconstruct_steps": 0, "holdout": 0.25})
    assert any(r.pruned and r.decomposed for r in report.layers)
    names = {i.name for i in new.graph.initializer}
    assert report.distill["trainable_tensors"] > 0 and any(n.endswith("_pruned") for n in names)


def test_prune_share_auto_keeps_the_share_whose_outputs_move_least(net):
    """--prune-share auto: each of hybrid.SHARES tried; the model kept is the one at the share with the least KL on
    calibration images, and it is that share's model exactly."""
    from onnx_tucker import compress
    from onnx_tucker.hybrid import SHARES

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share="auto")
    tried = {float(k): v for k, v in report.pruning["shares_tried"].items()}
    assert sorted(tried) == sorted(SHARES) and all(v is not None and v >= 0 for v in tried.values())
    chosen = min(tried, key=tried.get)
    assert report.pruning["share"] == chosen and report.settings["prune_share"] == chosen
    again, _ = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share=chosen)
    np.testing.assert_array_equal(run_model(new, feeds)[0], run_model(again, feeds)[0])
    assert any("--prune-share auto" in note for note in report.notes)


def test_prune_share_0_is_the_rank_cuts_alone(net):
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share=0)
    plain, alone = compress(model, layers=("kxk",), target_macs=0.5, calibration=feeds)
    assert report.pruning["pruned"] == 0 and not any(r.pruned for r in report.layers)
    assert report.totals()["macs_after"] == alone.totals()["macs_after"]
    np.testing.assert_array_equal(run_model(new, feeds)[0], run_model(plain, feeds)[0])


def test_cli_prunes_and_factors_to_one_budget_and_reports_the_split(net, tmp_path):
    import json

    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = _cli(path, out, "--target-macs", "0.5", "--layers", "hidden,kxk", "--prune-share", "0.25", "--calibrate", calib,
             "--report", report)
    assert r.returncode == 0, r.stderr
    assert "then decomposed" in r.stdout and "pruning took the conv MACs to" in r.stdout
    data = json.loads(report.read_text())
    assert data["pruning"]["share"] == 0.25 and data["settings"]["prune_share"] == 0.25
    assert data["totals"]["macs_after"] <= 0.5 * data["totals"]["macs_before"]
    assert 0.5 < data["pruning"]["pruned_to"] <= 0.5 ** 0.25
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ("hidden", "hidden"), "target_macs": 0.5, "prune_share": 0.25}, "--prune-share splits"),
    ({"layers": ("hidden", "kxk"), "target_macs": 0.05}, "a smaller --prune-share prunes less"),
    ({"layers": ("hidden", "kxk"), "target_macs": 0.05, "prune_share": "auto"}, "none of the shares 0, 0.25, 0.5, 0.75"),
    ({"layers": ("hidden", "kxk"), "target_macs": 0.5, "curves": "CURVES"}, "--curves does not apply with --layers hidden"),
])
def test_what_the_hybrid_cannot_do_is_one_usage_error_that_says_why(net, tmp_path, kwargs, message):
    from onnx_tucker import compress
    from onnx_tucker.errors import UsageError

    _, model, feeds = net
    kwargs = {k: str(tmp_path / "c.json") if v == "CURVES" else v for k, v in kwargs.items()}
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as caught:
        compress(model, calibration=feeds, **kwargs)
    assert "\n" not in str(caught.value)


def test_auto_on_a_model_without_hidden_units_keeps_the_rank_cuts_alone(residual):
    from onnx_tucker import compress

    shape = [d.dim_value or 1 for d in residual.graph.input[0].type.tensor_type.shape.dim]
    feeds = {residual.graph.input[0].name: np.random.default_rng(0).normal(size=[256] + shape[1:]).astype(np.float32)}
    plain, _ = compress(residual, layers=("kxk",), target_macs=0.6, calibration=feeds)
    new, report = compress(residual, layers=("hidden", "kxk"), target_macs=0.6, calibration=feeds, prune_share="auto")
    assert report.pruning["share"] == 0.0 and report.pruning["shares_tried"]["0.25"] is None
    np.testing.assert_array_equal(run_model(new, feeds)[0], run_model(plain, feeds)[0])
    # the note says why the other shares did not run: nothing to prune, not a target out of reach
    note = next(n for n in report.notes if n.startswith("--prune-share auto"))
    assert "0.25: nothing to prune" in note and "1: nothing to prune" in note and "cannot reach" not in note


def test_auto_timings_add_up_to_the_run(net):
    import time

    from onnx_tucker import compress

    _, model, feeds = net
    started = time.perf_counter()
    _, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share="auto")
    wall = time.perf_counter() - started
    assert report.timings["share_search"] > 0 and sum(report.timings.values()) <= wall


def test_prune_share_1_is_the_pruning_alone(net):
    from onnx_tucker import compress

    _, model, feeds = net
    new, report = compress(model, layers=("hidden", "kxk"), target_macs=0.6, calibration=feeds, prune_share=1)
    alone, by_itself = compress(model, layers=("hidden",), target_macs=0.6, calibration=feeds)
    assert report.totals()["decomposed"] == 0 and report.pruning["share"] == 1.0
    assert report.totals()["macs_after"] == by_itself.totals()["macs_after"]
    np.testing.assert_array_equal(run_model(new, feeds)[0], run_model(alone, feeds)[0])


def test_auto_measures_pruning_statistics_once_for_every_share(net, monkeypatch):
    from onnx_tucker import compress
    from onnx_tucker.hybrid import SHARES

    _, model, feeds = net
    calls = []
    original = P.original_moments
    monkeypatch.setattr(P, "original_moments", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, report = compress(model, layers=("hidden", "kxk"), target_macs=0.5, calibration=feeds, prune_share="auto")
    assert len(calls) == 1 and len([s for s in SHARES if s > 0]) > 1


def test_sweep_takes_a_prune_share_for_its_targets(net, tmp_path):
    import json

    path, _, feeds = net
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=feeds["input"])
    test = tmp_path / "test.npz"
    np.savez(test, x=feeds["input"][:64], y=np.random.default_rng(0).integers(0, 10, size=(64, 1)))
    common = ["--data", test, "--calibrate", calib, "--batch", "1", "--runs", "3"]
    r = _cli("sweep", path, *common, "--targets", "0.5", "--layers", "hidden,kxk", "--prune-share", "0.25",
             "--out-dir", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert len(rows) == 1 and not rows[0]["error"]
    assert rows[0]["forms"].startswith("hidden pruned: ") and "(share 0.25)" in rows[0]["forms"]
    written = onnx.load(str(next((tmp_path / "sweep").glob("*.onnx"))))
    settings = json.loads({p.key: p.value for p in written.metadata_props}["onnx_tucker.settings"])
    assert settings["prune_share"] == 0.25
    r = _cli("sweep", path, *common, "--ratios", "0.5", "--layers", "hidden,kxk", "--prune-share", "0.25",
             "--out-dir", tmp_path / "refused")
    assert r.returncode != 0 and "--prune-share splits each of --targets" in r.stderr and _error_lines(r) == 1
    assert not (tmp_path / "refused").exists()


def test_reconstruction_after_pruning_fits_the_original_at_the_kept_channels(net):
    """A chain on pruned channels (a pruned pair's first 3x3 conv, then factored) writes fewer channels than the
    original's tensor of the same name: its reconstruction target is the original's tensor at the kept channels,
    proved by the held-out error the reconstruction starts from, computed here by hand."""
    pytest.importorskip("torch")
    from onnx_tucker import compress
    from onnx_tucker.distill import _run, _session, _with_outputs
    from onnx_tucker.reconstruct import chains_in, reconstruct

    _, model, feeds = net
    pruned_model, pruning = P.prune(model, feeds, target_macs=0.7)
    channels = pruning.kept_channels()
    factored, _ = compress(pruned_model, layers=("kxk", "1x1"), target_macs=0.6, calibration=feeds)
    chains = chains_in(factored)
    trainable = [t for c in chains for t in c.trainable()]
    train, check = {"input": feeds["input"][:384]}, {"input": feeds["input"][384:]}
    _, stats = reconstruct(model, factored, chains, train, check, trainable, steps=20, blocks=1, channels=channels)
    rows = [r for r in stats["chains"] if r["target"] in channels]
    assert rows, "no chain aims at a pruned tensor: the test net no longer exercises this"
    for row in rows:
        assert "skipped" not in row and row["after"] <= row["before"] or not row["kept"]
        mine = _run(_session(_with_outputs(factored, [row["target"]])), check)[0]
        theirs = np.take(_run(_session(_with_outputs(model, [row["target"]])), check)[0], channels[row["target"]], axis=1)
        assert mine.shape == theirs.shape
        expected = float(((mine.astype(np.float64) - theirs) ** 2).sum() / (theirs.astype(np.float64) ** 2).sum())
        assert row["before"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    # without the kept channels the same units are left alone, not a crash
    _, blind = reconstruct(model, factored, chains, train, check, trainable, steps=2, blocks=1)
    assert all("skipped" in r for r in blind["chains"] if r["target"] in channels)


def test_distill_with_reconstruction_runs_after_pruning_and_factoring_the_pruned_convs(net):
    """The CLI's path: --layers hidden,kxk,1x1 --target-macs T --distill with its reconstruction (a traceback before)."""
    from onnx_tucker import compress

    _, model, feeds = net
    _, report = compress(model, layers=("hidden", "kxk", "1x1"), target_macs=0.5, calibration=feeds, prune_share=0.5,
                         distill={"steps": 2, "reconstruct_steps": 10, "holdout": 0.25})
    assert "/features/features.1/body/body.0/body.0.0/Conv" in [r.layer for r in report.layers if r.pruned and r.decomposed]
    rows = report.distill["reconstruct"]["chains"]
    assert any(r["target"] == "/features/features.1/body/body.0/body.0.2/Clip_output_0" for r in rows)  # pruned channels
    assert rows and not any("skipped" in r for r in rows)


def test_a_pruned_model_records_its_kept_channels_for_distill_and_a_later_run_clears_them(net):
    """The written model says which channels pruning kept (as its chain records say what was factored): the public
    ``distill`` on that file fits those units without being told. Compressing that model again (it is then the
    original) clears the record: its tensors are whole there."""
    pytest.importorskip("torch")
    from onnx_tucker import compress
    from onnx_tucker.distill import distill, tucker_trainable
    from onnx_tucker.prune import kept_channels_in

    _, model, feeds = net
    new, _ = compress(model, layers=("hidden", "kxk", "1x1"), target_macs=0.5, calibration=feeds, prune_share=0.5)
    kept = kept_channels_in(new)
    target = "/features/features.1/body/body.0/body.0.2/Clip_output_0"
    assert target in kept and len(kept[target]) < 24
    _, stats = distill(model, new, feeds, tucker_trainable(new), steps=0, reconstruct_steps=5, progress=False, threads=1)
    rows = stats["reconstruct"]["chains"]
    assert any(r["target"] == target for r in rows) and not any("skipped" in r for r in rows)
    again, _ = compress(new, layers=("kxk",), target_macs=0.9, calibration=feeds)
    assert kept_channels_in(again) == {}

"""sweep end to end on a tiny model, and calibration files: accepted layouts, bad ones refused in one line."""
import importlib.util
import json

import numpy as np
import onnx
import pytest

from conftest import residual_model, run_model
from onnx_tucker.cli import main
from onnx_tucker.data import load_calibration
from onnx_tucker.errors import DataError

HAS_BUDGET = importlib.util.find_spec("onnx_tucker.budget") is not None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The residual model (input [N,3,10,10], 10 logits), a labelled test set and a training set."""
    root = tmp_path_factory.mktemp("sweep")
    model = residual_model()
    model_path = root / "residual.onnx"
    onnx.save(model, str(model_path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 10, 10)).astype(np.float32)
    labels = run_model(model, {"x": x})[0].argmax(1)
    labels[:10] = (labels[:10] + 1) % 10  # 30 of 40 right: original top-1 is exactly 75%
    np.savez(root / "test.npz", x_test=x, y_test=labels)
    np.savez(root / "train.npz", x_train=rng.standard_normal((64, 3, 10, 10)).astype(np.float32))
    return root, model


def sweep(root, *extra):
    return main(["sweep", str(root / "residual.onnx"), "--data", str(root / "test.npz"), "--runs", "3",
                 "--batch", "1,4", "--no-progress", *extra])


def test_sweep_end_to_end_writes_table_json_and_plot(setup, capsys):
    root, _ = setup
    out = root / "plain"
    assert sweep(root, "--ratios", "0.5,0.75", "--out-dir", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| original |" in printed and "| ratio 0.5 |" in printed and "PASSED: 2/2" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert result["schema"] == "onnx-tucker.sweep/1" and result["samples"] == 40 and result["calibration"] is None
    o = result["original"]
    assert o["top1"] == pytest.approx(0.75)
    assert set(o["latency"]) == {"1", "4"} and o["latency"]["1"]["median_ms"] > 0
    assert [r["setting"] for r in result["results"]] == ["ratio 0.5", "ratio 0.75"]
    for r in result["results"]:
        assert r["error"] is None
        assert r["conv_macs"] < o["conv_macs"] and r["macs_reduction"] == pytest.approx(o["conv_macs"] / r["conv_macs"])
        assert r["params"] < o["params"] and r["decomposed"] >= 1
        assert r["top1_change"] == pytest.approx(r["top1"] - o["top1"])
        assert 0 <= r["agreement"] <= 1
        assert r["latency"]["4"]["speedup"]["pairs"] == 3
        assert onnx.load(r["file"]).graph.output[0].name == "logits"
    # block_conv 16x16x3x3 at ratio 0.5: ranks (8, 8); the 3-channel stem is left whole (no gamble for crumbs)
    assert result["results"][0]["ranks"]["block_conv"] == [8, 8] and "stem" not in result["results"][0]["ranks"]
    assert result["results"][0]["conv_macs"] < result["results"][1]["conv_macs"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ratio 0.75 |" in (out / "sweep.md").read_text()


def test_sweep_with_calibration_records_the_training_samples(setup, capsys):
    root, _ = setup
    out = root / "calibrated"
    assert sweep(root, "--ratios", "0.5", "--calibrate", str(root / "train.npz"), "--calib-size", "32",
                 "--batch", "1", "--out-dir", str(out)) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["calibration"]["samples"] == 32 and result["results"][0]["error"] is None


@pytest.mark.skipif(not HAS_BUDGET, reason="onnx_tucker.budget (--target-macs) not there yet")
def test_sweep_targets_meet_the_mac_budget(setup):
    root, _ = setup
    out = root / "targets"
    assert sweep(root, "--targets", "0.6", "--batch", "1", "--out-dir", str(out)) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["results"][0]["conv_macs"] <= 0.6 * result["original"]["conv_macs"]


@pytest.mark.skipif(HAS_BUDGET, reason="the budget exists: see test_sweep_targets_meet_the_mac_budget")
def test_sweep_targets_without_budget_fail_cleanly(setup, capsys):
    root, _ = setup
    assert sweep(root, "--targets", "0.5", "--out-dir", str(root / "t")) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("args, needle", [
    (["--ratios", "0.5,1.5"], "must be in (0, 1]"),
    (["--ratios", "0.5", "--targets", "0.5"], "not allowed with"),
    (["--ratios", "abc"], "must be a number"),
    (["--ratios", "0.5,,0.25"], "expected comma-separated"),
    (["--batch", "1,,32"], "expected comma-separated"),
])
def test_sweep_bad_settings_are_usage_errors(setup, capsys, args, needle):
    root, _ = setup
    assert sweep(root, *args, "--out-dir", str(root / "bad")) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_sweep_refuses_calibrating_on_the_test_file(setup, capsys):
    root, _ = setup
    assert sweep(root, "--calibrate", str(root / "test.npz"), "--out-dir", str(root / "bad")) == 2
    assert "training data" in capsys.readouterr().err


# --- calibration files ------------------------------------------------------------------------------

def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_calibration_layouts_by_name_keras_and_single_array(tmp_path):
    model = residual_model()
    x = np.random.default_rng(0).standard_normal((20, 3, 10, 10))
    for name, arrays in [("name", {"x": x}), ("keras", {"x_train": x, "y_train": np.zeros(20)}), ("single", {"anything": x})]:
        feeds = load_calibration(_save(tmp_path / f"{name}.npz", **arrays), model, size=8, seed=1)
        assert list(feeds) == ["x"] and feeds["x"].shape == (8, 3, 10, 10) and feeds["x"].dtype == np.float32
    again = load_calibration(tmp_path / "name.npz", model, size=8, seed=1)
    np.testing.assert_array_equal(again["x"], feeds["x"])  # seeded subset
    ints = load_calibration(_save(tmp_path / "u8.npz", x_train=np.zeros((5, 3, 10, 10), np.uint8)), model, size=None)
    assert ints["x"].dtype == np.float32  # uint8 images cast to the model's float input


@pytest.mark.parametrize("arrays, size, needle", [
    ({"x_train": np.zeros((8, 3, 12, 12), np.float32)}, 4, "expects"),  # wrong shape
    ({"x_train": np.zeros((8, 3, 10), np.float32)}, 4, "expects"),  # wrong rank
    ({"x_train": np.full((8, 3, 10, 10), "a")}, 4, "cannot be cast"),  # wrong dtype
    ({"x_train": np.zeros((8, 3, 10, 10), np.complex64)}, 4, "cannot be cast"),
    ({"x_train": np.zeros((8, 3, 10, 10), np.float32)}, 16, "fewer than the 16"),  # too few samples
    ({"x_train": np.full((8, 3, 10, 10), np.nan, np.float32)}, 4, "NaN or Inf"),
    ({"x_train": np.full((8, 3, 10, 10), np.inf)}, 4, "NaN or Inf"),
    ({"x_train": np.full((8, 3, 10, 10), 1e300)}, 4, "overflow"),
    ({"x_train": np.zeros((0, 3, 10, 10), np.float32)}, 4, "no calibration samples"),
    ({"x_test": np.zeros((8, 3, 10, 10), np.float32), "y_test": np.zeros(8)}, 4, "training data"),
    ({"a": np.zeros((8, 3, 10, 10)), "b": np.zeros((8, 3, 10, 10))}, 4, "no calibration array"),
])
def test_bad_calibration_files_are_one_line_data_errors(tmp_path, arrays, size, needle):
    with pytest.raises(DataError) as info:
        load_calibration(_save(tmp_path / "c.npz", **arrays), residual_model(), size=size)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_garbage_calibration_file_is_a_data_error(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_calibration(path, residual_model())


@pytest.mark.parametrize("arrays", [
    {"x_train": np.full((8, 3, 10, 10), np.nan, np.float32)},
    {"x_train": np.zeros((8, 3, 7, 7), np.float32)},
    {"x_train": np.zeros((3, 3, 10, 10), np.float32)},
])
def test_sweep_with_a_bad_calibration_file_exits_1_with_one_line(setup, capsys, tmp_path, arrays):
    root, _ = setup
    bad = _save(tmp_path / "bad.npz", **arrays)
    assert sweep(root, "--calibrate", str(bad), "--calib-size", "4", "--out-dir", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-tucker: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_forms_summary_counts_each_form_and_layout():
    from onnx_tucker.report import LayerRecord
    from onnx_tucker.sweep import forms_summary

    records = [LayerRecord(layer="a", kernel=[], form="tucker2", layout="1x1 -> 3x3 -> 1x1"),
               LayerRecord(layer="b", kernel=[], form="tucker2", layout="1x1 -> 3x3"),
               LayerRecord(layer="c", kernel=[], form="tucker2", layout="1x1 -> 3x3 -> 1x1"),
               LayerRecord(layer="d", kernel=[], form="svd", layout="dense -> dense")]
    assert forms_summary(records) == "tucker2 1x1 -> 3x3 -> 1x1: 2, tucker2 1x1 -> 3x3: 1, svd dense -> dense: 1"
    # pruned units (--layers hidden) come first, with the hybrid's share where there is one
    assert forms_summary(records[3:], {"pruned": 3, "share": 0.75}) == "hidden pruned: 3 units (share 0.75), svd dense -> dense: 1"
    assert forms_summary([], {"pruned": 2}) == "hidden pruned: 2 units"
    assert forms_summary(records[3:], {"pruned": 0, "share": 0.0}) == "svd dense -> dense: 1"


def test_sweep_rank_multiple_auto_is_measured_once_for_every_setting(setup, capsys, tmp_path):
    root, _ = setup
    out = root / "auto"
    assert sweep(root, "--ratios", "0.5,0.75", "--out-dir", str(out), "--rank-multiple", "auto",
                 "--latency-table", str(tmp_path / "latency.json")) == 0
    result = json.loads((out / "sweep.json").read_text())
    settings = result["settings"]
    multiple = settings["rank_multiple"]
    assert multiple == settings["rank_multiple_auto"]["multiple"] in (1, 4, 8, 16)
    assert f"--rank-multiple auto: {multiple} on cpu" in capsys.readouterr().err
    for row in result["results"]:  # at 16 the rounded ranks are whole on this 16-channel model: nothing pays
        if row["error"] is None:
            assert_ranks_round_to(row["ranks"], multiple, setup[1])
        else:
            assert multiple == 16 and "would not reduce MACs" in row["error"]


def assert_ranks_round_to(ranks: dict, multiple: int, model):
    """Each (output, input) rank is a multiple of N, or the layer's whole channel count (3 on the stem's input)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weight = {n.name: shapes[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}
    for layer, layer_ranks in ranks.items():
        limits = weight[layer][:2]
        assert all(r % multiple == 0 or r == limit for r, limit in zip(layer_ranks, limits)), (layer, layer_ranks, multiple)


@pytest.mark.parametrize("multiple", [4, 8])
def test_sweep_rank_multiple_rounds_every_rank_or_keeps_the_whole_channel_count(setup, tmp_path, multiple):
    # the auto test above sees whichever multiple this machine's timings pick; these two always run
    root, model = setup
    out = tmp_path / str(multiple)
    assert sweep(root, "--ratios", "0.5,0.75", "--out-dir", str(out), "--rank-multiple", str(multiple)) == 0
    rows = json.loads((out / "sweep.json").read_text())["results"]
    assert all(row["error"] is None for row in rows)
    for row in rows:
        assert_ranks_round_to(row["ranks"], multiple, model)
    assert rows[0]["ranks"]["stem"] == [8, 3]  # rounding 1.5 up to 4 would exceed the 3 channels: whole instead


def test_a_dynamic_models_macs_are_counted_at_the_size_of_the_data(setup, tmp_path):
    """H and W free in the model: the cost model counts at the --data images' size (it used to count parameters)."""
    root, model = setup
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for dim in list(dynamic.graph.input[0].type.tensor_type.shape.dim)[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    onnx.save(dynamic, str(tmp_path / "dynamic.onnx"))
    args = ["--data", str(root / "test.npz"), "--runs", "2", "--batch", "1", "--no-progress", "--ratios", "0.5"]
    assert main(["sweep", str(tmp_path / "dynamic.onnx"), "--out-dir", str(tmp_path / "d"), *args]) == 0
    assert main(["sweep", str(root / "residual.onnx"), "--out-dir", str(tmp_path / "s"), *args]) == 0
    got, want = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("d", "s"))
    assert got["original"]["conv_macs"] == want["original"]["conv_macs"] > got["original"]["conv_params"]
    assert got["results"][0]["conv_macs"] == want["results"][0]["conv_macs"]


@pytest.mark.parametrize("where", ["timing", "plot"])
def test_an_interrupted_sweep_leaves_no_model_and_no_folder(setup, capsys, monkeypatch, tmp_path, where):
    """Ctrl-C after the first settings were compressed (while timing, or while drawing the plot): each model used to
    be written at once, so the --out-dir it created held models and no sweep.json. Now the models are staged with
    the tables and land together at the end: here nothing lands, and the folder the run created is removed."""
    import onnx_tucker.sweep as sweep_module

    root, _ = setup

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "time_models" if where == "timing" else "plot", stop)
    out = tmp_path / "fresh"
    assert sweep(root, "--ratios", "0.5,0.75", "--out-dir", str(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert sweep(root, "--ratios", "0.5", "--out-dir", str(kept)) == 130
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a folder the user made stays, with what it held


# --- found by the hostile-input hunt -------------------------------------------------------------------

def test_sweep_refuses_a_batch_a_fixed_batch_model_cannot_run_before_any_work(setup, capsys, monkeypatch, tmp_path):
    """A model exported for batch 1 and the default --batch 1,32: onnxruntime failed on batch 32 after every setting
    was compressed (an internal error). Refused up front, in bench's words."""
    import onnx_tucker.sweep as sweep_module

    root, model = setup
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, str(tmp_path / "fixed1.onnx"))

    def never(*args, **kwargs):
        raise AssertionError("compressed before the batch was checked")

    monkeypatch.setattr(sweep_module, "compress_setting", never)
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "fixed1.onnx"), "--data", str(root / "test.npz"), "--ratios", "0.5",
                 "--runs", "2", "--no-progress", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-tucker: error: fixed1.onnx is exported for batch 1 only: --batch 32 cannot run it")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    monkeypatch.undo()
    assert main(["sweep", str(tmp_path / "fixed1.onnx"), "--data", str(root / "test.npz"), "--ratios", "0.5",
                 "--runs", "2", "--batch", "1", "--no-progress", "--out-dir", str(out)]) == 0  # the batch it takes runs
    assert list(json.loads((out / "sweep.json").read_text())["original"]["latency"]) == ["1"]


def test_sweep_with_a_data_path_that_is_not_utf8_writes_its_tables(setup, capsys, tmp_path):
    """A --data file named b"t\\xff.npz": writing sweep.md failed at the very end with UnicodeEncodeError. The table
    shows the byte as \\xff (sweep.md stays valid UTF-8); sweep.json keeps the path (os.fsencode gives the bytes back)."""
    import os

    root, _ = setup
    data = tmp_path / os.fsdecode(b"t\xff.npz")
    try:
        data.write_bytes((root / "test.npz").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses a file name that is not UTF-8")
    out = tmp_path / "out"
    assert main(["sweep", str(root / "residual.onnx"), "--data", str(data), "--ratios", "0.5", "--runs", "2",
                 "--batch", "1", "--no-progress", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "sweep.md").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "samples of " + str(tmp_path / "t\\xff.npz") in md and "t\\xff.npz" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert os.fsencode(result["data"]) == os.fsencode(data)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_uses_all_of_a_smaller_calibration_file_with_a_note_as_compress_does(setup, capsys, tmp_path):
    """--calib-size above what the file holds (64 samples): compress notes it and uses all of them, and so does
    sweep, in the same one line (it said it as "note: ...", and the README said sweep refused it)."""
    root, _ = setup
    out = tmp_path / "out"
    assert sweep(root, "--ratios", "0.5", "--calibrate", str(root / "train.npz"), "--calib-size", "100",
                 "--batch", "1", "--out-dir", str(out)) == 0
    sweep_notes = [line for line in capsys.readouterr().err.splitlines() if "fewer than the 100" in line]
    assert json.loads((out / "sweep.json").read_text())["calibration"]["samples"] == 64
    assert main([str(root / "residual.onnx"), str(tmp_path / "c.onnx"), "--ratio", "0.5", "--calibrate", str(root / "train.npz"),
                 "--calib-size", "100", "--no-check"]) == 0
    compress_notes = [line for line in capsys.readouterr().err.splitlines() if "fewer than the 100" in line]
    assert sweep_notes == compress_notes == [f"onnx-tucker: notice: {root / 'train.npz'} holds 64 calibration samples, fewer than the 100 "
                                             "asked for: using all 64"]


def test_sweep_latency_table_gets_the_mode_of_a_new_file_and_keeps_a_changed_one(setup, tmp_path):
    """--latency-table (the same code as --curves: outputs.replace_cache_file) went through tempfile.mkstemp and was
    left 0600: new, it gets 0666 less the umask as any new file; rewritten, it keeps the mode it had."""
    import os
    import stat

    root, _ = setup
    table = tmp_path / "latency.json"
    args = ["--ratios", "0.5", "--batch", "1", "--rank-multiple", "auto", "--latency-table", str(table)]
    umask = os.umask(0o027)
    try:
        assert sweep(root, *args, "--out-dir", str(tmp_path / "a")) == 0
        assert stat.S_IMODE(table.stat().st_mode) == 0o640
        table.chmod(0o604)
        inode = table.stat().st_ino
        assert sweep(root, *args, "--out-dir", str(tmp_path / "b")) == 0  # every timing cached: the file is rewritten
    finally:
        os.umask(umask)
    assert table.stat().st_ino != inode and stat.S_IMODE(table.stat().st_mode) == 0o604


def test_sweep_calibrates_on_an_image_folder_as_compress_does(setup, tmp_path, capsys):
    """`sweep --help` offered `--calibrate TRAIN.npz|DIR` and the --image-* flags (they are compress's), and sweep then
    refused both: a folder now calibrates every setting, decoded once, with the same preprocessing."""
    from PIL import Image

    root, _ = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "out"
    assert sweep(root, "--ratios", "0.5", "--calibrate", str(folder), "--calib-size", "32", "--image-scale", "1/255",
                 "--batch", "1", "--out-dir", str(out)) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["calibration"] == {"file": str(folder), "samples": 32} and result["results"][0]["error"] is None
    capsys.readouterr()
    assert sweep(root, "--ratios", "0.5", "--image-scale", "1/255", "--out-dir", str(tmp_path / "o2")) == 2
    assert "only apply with --calibrate DIR" in capsys.readouterr().err


def test_file_names_tell_close_values_apart():
    """--ratios 0.1234567,0.1234568 gave both models one {:g} file name and a refusal naming the same file twice."""
    from onnx_tucker.sweep import _short

    values = [0.1234567, 0.1234568, 0.5]
    assert [_short(v, values) for v in values] == ["0.1234567", "0.1234568", "0.5"]
    assert _short(0.25, [0.25, 0.75]) == "0.25"
    from pathlib import Path

    from onnx_tucker.sweep import SweepConfig, settings_of

    labels = [label for label, _, _ in settings_of(SweepConfig(model=Path("m.onnx"), data=Path("d.npz"), ratios=values))]
    assert labels == ["ratio 0.1234567", "ratio 0.1234568", "ratio 0.5"]  # the table's rows too

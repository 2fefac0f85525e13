"""The command line, run as a user runs it: exit codes, one-line errors, nothing left behind."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import conv_model, residual_model

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_clean_failure(result, code, needle, folder: Path, before: set):
    assert result.returncode == code, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr
    assert len(err.splitlines()) == 1, err
    assert needle.lower() in err.lower(), err
    assert set(folder.iterdir()) == before  # no output, no temporary file left


def test_bare_form_compresses_and_checks(saved_residual, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    r = cli(saved_residual, out, "--ratio", "0.5", "--report", report)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and "self-check" in r.stdout and "block_conv" in r.stdout
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads(report.read_text())
    assert data["totals"]["decomposed"] == 2 and data["check"]["outputs"][0]["name"] == "logits"  # the 3-channel stem stays whole
    assert data["verdict"]["passed"] and [c["layer"] for c in data["chains"]] == ["block_conv", "down"]
    assert {layer["layer"] for layer in data["layers"]} == {"stem", "block_conv", "down", "grouped", "pointwise"}


def test_full_rank_self_check_is_exact(saved_residual, tmp_path):
    r = cli("compress", saved_residual, tmp_path / "o.onnx", "--ratio", "1.0", "--force", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    check = json.loads((tmp_path / "r.json").read_text())["check"]["outputs"][0]
    assert check["relative_error"] < 1e-4 and check["top1_agreement"] == 1.0


def test_same_input_and_options_give_identical_bytes(saved_residual, tmp_path):
    cli(saved_residual, tmp_path / "a.onnx", "--no-check")
    cli(saved_residual, tmp_path / "b.onnx", "--no-check")
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_inspect_lists_layers_without_writing(saved_residual, tmp_path):
    before = set(tmp_path.iterdir())
    r = cli("inspect", saved_residual)
    assert r.returncode == 0, r.stderr
    assert "block_conv" in r.stdout and "grouped conv" in r.stdout and "TOTAL" in r.stdout
    assert set(tmp_path.iterdir()) == before


def test_inspect_forms_lists_each_layers_form_and_refuses_unknown_names(saved_residual, tmp_path):
    r = cli("inspect", saved_residual, "--forms", "spatial", "--json", tmp_path / "l.json")
    assert r.returncode == 0, r.stderr
    layers = {e["layer"]: e for e in json.loads((tmp_path / "l.json").read_text())["layers"]}
    assert layers["block_conv"]["form"] == "spatial" and len(layers["block_conv"]["ratios"]["0.5"]["ranks"]) == 1
    both = cli("inspect", saved_residual, "--forms", "tucker2,spatial")
    assert both.returncode == 0 and "tucker2|spatial" in both.stdout
    bad = cli("inspect", saved_residual, "--forms", "nope")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown factorization 'nope'" in bad.stderr


@pytest.mark.parametrize("model, ratio, forms_written", [
    # inspect printed Tucker-2's ranks and MACs for every layer while compress writes the form with the least error
    # (spatial SVD on every layer of the small ResNet at 0.5)
    ("cifar10_resnet", "0.5", {"spatial"}),
    # inspect chose from Tucker-2 fits without HOOI iterations, compress with its 10: on the seed CNN at 0.3 inspect
    # predicted spatial SVD for conv4 (29, 2,449,920 MACs) where compress writes Tucker-2 (38, 38)
    ("cifar10_cnn", "0.3", {"spatial", "tucker2"}),
])
def test_inspect_with_two_forms_predicts_the_form_ranks_and_macs_compress_writes(tmp_path, model, ratio, forms_written):
    path = Path(__file__).resolve().parents[1] / f"models/{model}.onnx"
    assert cli("inspect", path, "--ratios", ratio, "--forms", "tucker2,spatial", "--json", tmp_path / "i.json").returncode == 0
    assert cli(path, tmp_path / "o.onnx", "--ratio", ratio, "--forms", "tucker2,spatial", "--no-check",
               "--report", tmp_path / "r.json").returncode == 0
    predicted = {e["layer"]: e["ratios"][ratio] for e in json.loads((tmp_path / "i.json").read_text())["layers"] if e["ratios"]}
    written = [e for e in json.loads((tmp_path / "r.json").read_text())["layers"] if e["decomposed"]]
    assert {e["form"] for e in written} == forms_written
    for e in written:
        p = predicted[e["layer"]]
        assert (p["form"], p["ranks"], p["macs"]) == (e["form"], e["ranks"], e["macs_after"]), e["layer"]


@pytest.mark.parametrize(
    "make_input, args, code, needle",
    [
        (lambda d: d / "missing.onnx", [], 2, "not found"),
        (lambda d: d, [], 2, "not a file"),
        (lambda d: write(d / "empty.onnx", b""), [], 1, "empty"),
        (lambda d: write(d / "noise.onnx", random.Random(0).randbytes(4096)), [], 1, "not a valid ONNX model"),
    ],
    ids=["missing", "folder", "empty", "random-bytes"],
)
def test_unreadable_inputs(tmp_path, make_input, args, code, needle):
    work = tmp_path / "work"
    work.mkdir()
    src = make_input(work)
    before = set(work.iterdir())
    r = cli(src, work / "out.onnx", *args)
    assert_clean_failure(r, code, needle, work, before)


def test_truncated_model(tmp_path, saved_residual):
    data = saved_residual.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    before = set(tmp_path.iterdir())
    r = cli(bad, tmp_path / "out.onnx")
    assert_clean_failure(r, 1, "ONNX", tmp_path, before)


def test_model_without_conv(tmp_path):
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(g), str(path))
    before = set(tmp_path.iterdir())
    assert_clean_failure(cli(path, tmp_path / "out.onnx"), 1, "no Conv", tmp_path, before)


def test_model_failing_the_checker(tmp_path):
    model = conv_model()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    before = set(tmp_path.iterdir())
    assert_clean_failure(cli(path, tmp_path / "out.onnx"), 1, "checker", tmp_path, before)


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5", "abc", "nan"])
def test_bad_ratio(saved_residual, tmp_path, ratio):
    before = set(tmp_path.iterdir())
    assert_clean_failure(cli(saved_residual, tmp_path / "out.onnx", f"--ratio={ratio}"), 2, "ratio", tmp_path, before)


def test_output_folder_missing(saved_residual, tmp_path):
    before = set(tmp_path.iterdir())
    assert_clean_failure(cli(saved_residual, tmp_path / "nope" / "out.onnx"), 2, "does not exist", tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(saved_residual, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    r = cli(saved_residual, locked / "out.onnx")
    assert r.returncode == 2 and "not writable" in r.stderr


def test_output_folder_not_writable_is_refused_as_usage(saved_residual, tmp_path, monkeypatch):
    from onnx_tucker import UsageError
    from onnx_tucker.io import check_output_path

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UsageError, match="not writable"):
        check_output_path(saved_residual, tmp_path / "out.onnx")


def test_output_equal_to_input(saved_residual, tmp_path):
    before = set(tmp_path.iterdir())
    original = digest(saved_residual)
    r = cli(saved_residual, saved_residual)
    assert_clean_failure(r, 2, "input", tmp_path, before)
    assert digest(saved_residual) == original
    r = cli(saved_residual, tmp_path / "." / saved_residual.name)
    assert r.returncode == 2 and digest(saved_residual) == original


def test_unknown_option_is_one_line_usage_error(saved_residual, tmp_path):
    before = set(tmp_path.iterdir())
    assert_clean_failure(cli(saved_residual, tmp_path / "o.onnx", "--bogus"), 2, "unrecognized", tmp_path, before)


def test_input_untouched_after_success(saved_residual, tmp_path):
    original = digest(saved_residual)
    assert cli(saved_residual, tmp_path / "o.onnx").returncode == 0
    assert digest(saved_residual) == original


def test_help_does_not_import_tensorflow():
    code = "import sys; from onnx_tucker.cli import build_parser; build_parser(); print('tensorflow' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.stdout.strip() == "False"


# --- models torch exports by default (issue 12): fixed batch 1, dynamic spatial sizes -----------------

def _torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    return torch, nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def _export(tmp_path, name, dynamic_axes=None):
    torch, net = _torch_net()
    path = tmp_path / name
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), dynamo=False, input_names=["input"], output_names=["y"],
                      dynamic_axes=dynamic_axes)
    return path


def test_fixed_batch_1_model_runs_data_and_calibration_and_bench_refuses_other_batches(tmp_path, capsys):
    from onnx_tucker.cli import main

    src = _export(tmp_path, "fixed1.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x_test=rng.uniform(0, 1, (20, 3, 32, 32)).astype(np.float32), y_test=rng.integers(0, 10, 20))
    np.savez(tmp_path / "train.npz", x_train=rng.uniform(0, 1, (96, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--ratio", "0.5", "--force", "--data", str(tmp_path / "test.npz"),
                 "--calibrate", str(tmp_path / "train.npz"), "--max-rel-error", "10"]) == 0
    assert "top-1 on 20 labelled samples" in capsys.readouterr().out
    assert main(["bench", str(src), str(out), "--batch", "1,32", "--providers", "cpu", "--runs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported for batch 1 only: --batch 32" in err
    assert main(["bench", str(src), str(out), "--batch", "1", "--providers", "cpu", "--runs", "2", "--no-progress"]) == 0


def test_fixed_batch_1_model_goes_through_the_measured_budget_and_distill(tmp_path, capsys):
    """The probes run 128 images and distill trains on batches of 64: a model whose batch of 1 is baked into a
    Reshape must be run a sample at a time in both (it used to fail with onnxruntime's batch error)."""
    pytest.importorskip("torch")
    from conftest import torch_fixed_batch_net
    from onnx_tucker.cli import main

    src = torch_fixed_batch_net(tmp_path / "fixed1.onnx")
    np.savez(tmp_path / "train.npz", x_train=np.random.default_rng(0).uniform(0, 1, (160, 3, 16, 16)).astype(np.float32))
    train = str(tmp_path / "train.npz")
    assert main([str(src), str(tmp_path / "t.onnx"), "--target-macs", "0.5", "--calibrate", train, "--force"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main([str(src), str(tmp_path / "d.onnx"), "--ratio", "0.5", "--calibrate", train, "--force", "--distill",
                 "--distill-steps", "5", "--reconstruct-steps", "5", "--distill-batch", "16", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "distill:" in out
    assert json.loads((tmp_path / "r.json").read_text())["distill"]["batch_size"] == 16


def test_dynamic_spatial_sizes_need_an_input_shape_and_never_call_parameters_macs(tmp_path, capsys):
    from onnx_tucker.cli import main

    src = _export(tmp_path, "dyn.onnx", {"input": {0: "n", 2: "h", 3: "w"}})
    assert main([str(src), str(tmp_path / "a.onnx"), "--ratio", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input-shape" in err
    assert main([str(src), str(tmp_path / "b.onnx"), "--ratio", "0.5", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "MACs unknown" in out and "unknown*" in out
    assert main([str(src), str(tmp_path / "c.onnx"), "--ratio", "0.5", "--input-shape", "input:1x3x32x32"]) == 0
    out = capsys.readouterr().out
    assert "MACs 2.40x fewer" in out and "unknown" not in out
    assert main([str(src), str(tmp_path / "d.onnx"), "--input-shape", "nope:1x3x32x32"]) == 2
    assert "no input 'nope'" in capsys.readouterr().err


def test_inspect_never_calls_parameters_macs_and_takes_an_input_shape(tmp_path, capsys):
    """A model with dynamic H/W: inspect used to print each weight's parameter count as its MACs."""
    from onnx_tucker.cli import main

    src = _export(tmp_path, "dyn.onnx", {"input": {0: "n", 2: "h", 3: "w"}})
    assert main(["inspect", str(src), "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "unknown*" in out and "the xR columns are parameter reductions" in out and "18,432" not in out
    listing = json.loads((tmp_path / "a.json").read_text())
    assert listing["macs_known"] is False and listing["macs_total"] is None and all(l["macs"] is None for l in listing["layers"])
    assert main(["inspect", str(src), "--input-shape", "input:1x3x32x32", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "18,874,368" in out and "unknown" not in out  # 64x32x3x3 at 32x32
    # the 3-channel stem: what compress would do, not a reduction it would never make
    stem = json.loads((tmp_path / "b.json").read_text())["layers"][0]
    assert stem["ratios"]["0.5"]["profitable"] is False and "image stem" in stem["ratios"]["0.5"]["left_whole"]
    assert "x0.25, x0.5: would cut a 3-channel input" in out


def test_compress_counts_a_dynamic_models_macs_at_the_size_of_its_data(tmp_path, capsys):
    from onnx_tucker.cli import main

    src = _export(tmp_path, "dyn.onnx", {"input": {0: "n", 2: "h", 3: "w"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x_test=rng.uniform(0, 1, (20, 3, 32, 32)).astype(np.float32), y_test=rng.integers(0, 10, 20))
    assert main([str(src), str(tmp_path / "a.onnx"), "--ratio", "0.5", "--data", str(tmp_path / "test.npz")]) == 0
    assert "MACs 2.40x fewer" in capsys.readouterr().out  # as with --input-shape input:1x3x32x32


def test_bench_sizes_a_dynamic_models_random_inputs_with_input_shape(tmp_path, capsys):
    from onnx_tucker.cli import main

    src = _export(tmp_path, "dyn.onnx", {"input": {0: "n", 2: "h", 3: "w"}})
    args = ["bench", str(src), "--providers", "cpu", "--runs", "2", "--warmup", "0", "--no-progress", "--batch", "1,2"]
    assert main(args) == 1
    assert "--input-shape" in capsys.readouterr().err
    assert main(args + ["--input-shape", "input:1x3x32x32", "--json", str(tmp_path / "b.json")]) == 0
    assert [r["batch"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == [1, 2]
    np.savez(tmp_path / "in.npz", input=np.zeros((2, 3, 32, 32), np.float32))
    assert main(args + ["--input-shape", "input:1x3x32x32", "--inputs", str(tmp_path / "in.npz")]) == 2
    assert main(["bench", str(src), str(tmp_path)]) == 2
    assert "model is not a file" in capsys.readouterr().err


def test_ratio_with_a_budget_or_another_rank_rule_is_refused(saved_residual, tmp_path):
    for extra, said in ((["--target-macs", "0.5"], "--ratio has no effect with --target-macs"),
                        (["--rank-method", "energy"], "--ratio has no effect with --rank-method energy")):
        r = cli(saved_residual, tmp_path / "o.onnx", "--ratio", "0.3", *extra)
        assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_inspect_rank_multiple_auto_measures_once_and_rounds_every_rank(saved_residual, tmp_path):
    table, out = tmp_path / "latency.json", tmp_path / "inspect.json"
    r = cli("inspect", saved_residual, "--rank-multiple", "auto", "--latency-table", table, "--json", out)
    assert r.returncode == 0, r.stderr
    listing = json.loads(out.read_text())
    choice = listing["rank_multiple_auto"]
    multiple = listing["rank_multiple"]
    assert multiple == choice["multiple"] in (1, 4, 8, 16) and choice["provider"] == "cpu" and choice["timed_layer_models"] > 0
    assert f"--rank-multiple auto: {multiple} on cpu" in r.stdout
    for layer in listing["layers"]:
        for info, limits in ((i, layer["op_shape"][:2]) for i in layer["ratios"].values()):
            assert all(rank % multiple == 0 or rank == limit for rank, limit in zip(info["ranks"], limits))
    again = cli("inspect", saved_residual, "--rank-multiple", "auto", "--latency-table", table, "--json", out)
    assert again.returncode == 0 and json.loads(out.read_text())["rank_multiple_auto"]["timed_layer_models"] == 0  # cached


def test_inspect_measuring_flags_need_rank_multiple_auto(saved_residual):
    r = cli("inspect", saved_residual, "--provider", "cpu")
    assert r.returncode == 2 and r.stderr.strip() == "onnx-tucker: error: --provider only applies with --rank-multiple auto"


def test_inspect_latency_table_must_be_a_file(saved_residual, tmp_path):
    r = cli("inspect", saved_residual, "--rank-multiple", "auto", "--latency-table", tmp_path)
    assert r.returncode == 2 and "--latency-table" in r.stderr and "not a regular file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_report_and_the_output_say_where_the_time_went(tmp_path, capsys):
    """People size machines and budgets by the phases: load, statistics, plan (the measured curves),
    fit, export, refit, check, save, accuracy, total; the report's phases sum to about the total."""
    from onnx_tucker.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), src)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x_train=rng.standard_normal((96, 3, 10, 10)).astype(np.float32))
    np.savez(tmp_path / "test.npz", x_test=rng.standard_normal((20, 3, 10, 10)).astype(np.float32), y_test=rng.integers(0, 4, 20))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main([str(src), str(out), "--target-macs", "0.6", "--calibrate", str(tmp_path / "train.npz"), "--data",
                 str(tmp_path / "test.npz"), "--report", str(report), "--max-rel-error", "10"]) == 0
    timings = json.loads(report.read_text())["timings"]
    assert list(timings) == ["load", "statistics", "plan", "fit", "export", "refit", "check", "save", "accuracy", "total"]
    assert all(v >= 0 for v in timings.values())
    phases = sum(v for k, v in timings.items() if k != "total")
    assert phases <= timings["total"] * 1.01 + 0.01 and phases >= 0.5 * timings["total"]
    line = [t for t in capsys.readouterr().out.splitlines() if t.startswith("time: ")]
    assert len(line) == 1 and "total" in line[0]


def test_ranks_flag_sets_layers_by_hand_and_the_rule_does_the_rest(saved_residual, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = cli(saved_residual, out, "--ranks", "block_conv=5,3", "--ranks", "2=12,6", "--rank-multiple", "4", "--report", report)
    assert r.returncode == 0, r.stderr
    chains = {c["layer"]: c["ranks"] for c in json.loads(report.read_text())["chains"]}
    assert chains["block_conv"] == [5, 3] and chains["down"] == [12, 6]  # index 2 is "down"; unrounded by --rank-multiple
    listed = cli("inspect", saved_residual, "--json", tmp_path / "l.json")
    assert listed.returncode == 0 and {e["index"]: e["layer"] for e in json.loads((tmp_path / "l.json").read_text())["layers"]}[2] == "down"


@pytest.mark.parametrize("flags, needle", [
    (["--ranks", "block_conv=5,3,1"], "expected NAME=R"),
    (["--ranks", "nope=4"], "names no layer of this model: nope"),
    (["--ranks", "block_conv=4", "--ranks", "block_conv=5"], "more than once"),
    (["--ranks", "block_conv=40,3"], "exceeds tucker2's limits 16,16"),
    (["--ranks", "grouped=4,4"], "not factored"),
    (["--ranks", "block_conv=4,4", "--target-macs", "0.5"], "give one"),
])
def test_ranks_flag_bad_input_is_one_line_and_writes_nothing(saved_residual, tmp_path, flags, needle):
    folder = tmp_path / "o"
    folder.mkdir()
    before = set(folder.iterdir())
    r = cli(saved_residual, folder / "out.onnx", *flags)
    assert_clean_failure(r, 2, needle, folder, before)


def test_cache_flags_refuse_to_overwrite_a_file_the_tool_did_not_write(saved_residual, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    for args in (["--latency-aware", "--latency-table", notes], ["--target-macs", "0.5", "--calibrate", "x.npz", "--curves", notes]):
        r = cli(saved_residual, tmp_path / "o.onnx", *args)
        assert r.returncode == 2 and "would be overwritten" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert notes.read_text() == '{"my": "notes"}' and not (tmp_path / "o.onnx").exists()
    empty = tmp_path / "new.json"
    empty.write_text("")
    r = cli(saved_residual, tmp_path / "o.onnx", "--latency-aware", "--latency-table", empty, "--no-check")
    assert r.returncode == 0, r.stderr  # an empty file is a new cache


def test_inspect_json_is_written_for_a_model_without_candidates(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    src = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    r = cli("inspect", src, "--json", tmp_path / "l.json")
    assert r.returncode == 0 and "no Conv layers" in r.stdout
    assert json.loads((tmp_path / "l.json").read_text())["layers"] == []


def test_a_reader_that_leaves_early_is_not_an_internal_error(saved_residual, tmp_path):
    """`onnx-tucker ... | head -2`: the print after the reader closed raised BrokenPipeError as an internal error."""
    proc = subprocess.Popen([sys.executable, "-m", "onnx_tucker", str(saved_residual), str(tmp_path / "o.onnx"), "--ratio", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    proc.stdout.close()  # the reader is gone before the tool prints anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141) and "internal error" not in err and "Traceback" not in err, err


def test_inspect_total_without_any_sized_layer_is_a_dash_not_zero(tmp_path):
    """Every conv's weight computed at run time: no layer has a size, and the TOTAL row read '0.00x'."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph([helper.make_node("Mul", ["w", "two"], ["w2"]), helper.make_node("Conv", ["x", "w2"], ["y"], name="conv")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w, two])
    src = tmp_path / "computed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    r = cli("inspect", src)
    assert r.returncode == 0, r.stderr
    total = next(line for line in r.stdout.splitlines() if "TOTAL" in line)
    assert "0.00x" not in total and total.split()[-1] == "-"


@pytest.mark.parametrize("args, needle", [
    (["--check-batch", "1000000000"], "--check-batch 1000000000: the inputs alone would take"),
    (["--check-batch", "99999999999999999999"], "too large"),
    (["--ratio", "0.5", "--latency-aware", "--latency-batch", "1000000000"], "--latency-batch 1000000000: the inputs alone"),
    (["sweep", "--data", str(ROOT / "models" / "cifar10_test_sample.npz"), "--ratios", "0.5", "--batch", "1000000000"], "--batch 1000000000"),
    (["bench", "--threads", "99999999999999999999"], "too large"),
])
def test_huge_counts_are_one_line_usage_errors(tmp_path, args, needle):
    """Counts that pass as positive integers but cannot be run (a batch of a billion images, a thread count over int32)
    failed deep inside with MemoryError, ValueError or TypeError ("internal error"); now each is refused in one line."""
    model = write(tmp_path / "m.onnx", (ROOT / "models" / "cifar10_cnn.onnx").read_bytes())
    before = set(tmp_path.iterdir())
    if args[0] in ("sweep", "bench"):
        command = [args[0], model, *args[1:]] + (["--out-dir", tmp_path / "sw"] if args[0] == "sweep" else [])
    else:
        command = [model, tmp_path / "o.onnx", *args]
    assert_clean_failure(cli(*command), 2, needle, tmp_path, before)


@pytest.mark.parametrize("command", ["compress", "inspect", "bench"])
def test_a_dash_sends_the_json_alone_to_stdout(tmp_path, command):
    """--report - / --json -: the JSON on stdout, for a pipe, and everything meant for people on stderr. It made a file
    named '-' in the working folder and left stdout to the table."""
    model = write(tmp_path / "m.onnx", (ROOT / "models" / "cifar10_cnn.onnx").read_bytes())
    args = {"compress": [model, tmp_path / "o.onnx", "--report", "-"], "inspect": ["inspect", model, "--json", "-"],
            "bench": ["bench", model, "--json", "-", "--runs", "2", "--warmup", "0", "--batch", "1"]}[command]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"compress": "totals", "inspect": "layers", "bench": "schema"}[command] in data
    assert not (tmp_path / "-").exists()
    assert ("TOTAL" if command != "bench" else "ms") in result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_standard_stream_failures_are_not_internal_errors(tmp_path):
    """stdout on a full device: the outputs are in place and the run says it could not print (it said 'internal error:
    OSError'); a stderr that cannot be written does not turn a usage error's exit 2 into 1."""
    model = write(tmp_path / "m.onnx", (ROOT / "models" / "cifar10_cnn.onnx").read_bytes())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    full = subprocess.run(f"{sys.executable} -m onnx_tucker m.onnx o.onnx --ratio 0.5 > /dev/full", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 1 and full.stderr.strip() == "onnx-tucker: error: cannot write to standard output: No space left on device"
    assert (tmp_path / "o.onnx").is_file()
    closed = subprocess.run(f"{sys.executable} -m onnx_tucker m.onnx o2.onnx --ratio 7 2</dev/null", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert closed.returncode == 2 and not (tmp_path / "o2.onnx").exists()
    # --report - writes the JSON before the files land: a stdout that cannot take it leaves no model behind
    dash = subprocess.run(f"{sys.executable} -m onnx_tucker m.onnx o3.onnx --report - > /dev/full", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert dash.returncode == 1 and "cannot write to standard output" in dash.stderr and not (tmp_path / "o3.onnx").exists()


def test_a_closed_stdout_writes_the_model_quietly_or_refuses_a_json_asked_on_it(saved_residual, tmp_path):
    """`onnx-tucker IN OUT >&-` wrote the model, then failed with an internal AttributeError (sys.stdout is None):
    exit 1 with the output in place. Now the run is quiet and succeeds; `--report -` there is refused before work."""
    import shlex

    def closed(*args):
        command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "onnx_tucker", *args))
        return subprocess.run(["bash", "-c", command + " >&-"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)

    quiet = closed(saved_residual, tmp_path / "a.onnx", "--no-check")
    assert quiet.returncode == 0 and quiet.stderr == "" and (tmp_path / "a.onnx").is_file()
    refused = closed(saved_residual, tmp_path / "b.onnx", "--report", "-")
    assert refused.returncode == 2 and "standard output is closed" in refused.stderr and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("command", ["inspect", "compress"])
@pytest.mark.parametrize("shape", ["1x3x224x224", "1x32x32", "pixels:1x32x32x4"])
def test_an_input_shape_that_does_not_fit_the_model_is_refused_before_work(tmp_path, command, shape):
    """`inspect` (and `compress --no-check`) took `--input-shape 1x3x224x224` for a 32x32x3 NHWC model and counted
    MACs at that size (or called them unknown); only the self-check refused it, with exit 1."""
    model = ROOT / "models/cifar10_cnn.onnx"
    args = ["inspect", model] if command == "inspect" else [model, tmp_path / "o.onnx", "--no-check"]
    r = cli(*args, "--input-shape", shape)
    assert r.returncode == 2 and "does not fit input 'pixels' (?x32x32x3)" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "o.onnx").exists()


def test_the_api_refuses_input_shapes_for_inputs_the_model_lacks_or_that_do_not_fit():
    from onnx_tucker import UsageError, compress

    model = onnx.load(str(ROOT / "models/cifar10_cnn.onnx"))
    with pytest.raises(UsageError, match="no input 'nope'"):
        compress(model, input_shapes={"nope": [1, 32, 32, 3]})
    with pytest.raises(UsageError, match="does not fit input 'pixels'"):
        compress(model, input_shapes={"pixels": [1, 3, 224, 224]})


@pytest.mark.parametrize("flag", [["--curves", "c.json"], ["--probes", "all"], ["--probe-images", "64"]])
def test_the_measured_budgets_flags_are_refused_with_a_uniform_budget(tmp_path, flag):
    """`--budget-rule uniform` measures nothing: --curves wrote no file and --probes / --probe-images did nothing, exit 0."""
    np.savez(tmp_path / "cal.npz", x_train=np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype(np.float32))
    r = cli(ROOT / "models/cifar10_cnn.onnx", tmp_path / "o.onnx", "--target-macs", "0.5", "--budget-rule", "uniform",
            "--calibrate", tmp_path / "cal.npz", *flag, cwd=tmp_path)
    assert r.returncode == 2 and "not with --budget-rule uniform" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("args", [["--report", ""], ["--data", ""], ["--inputs", ""], ["--calibrate", "", "--calib-size", "64"]])
def test_an_empty_path_is_refused_not_taken_as_not_given(tmp_path, args):
    """`--report ""` (an unset shell variable) wrote no report and exited 0; `--calibrate ""` blamed --calib-size."""
    r = cli(ROOT / "models/cifar10_cnn.onnx", tmp_path / "o.onnx", *args)
    assert r.returncode == 2 and f"{args[0]}: the path is empty" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_inspect_refuses_an_empty_json_path():
    r = cli("inspect", ROOT / "models/cifar10_cnn.onnx", "--json", "")
    assert r.returncode == 2 and "--json: the path is empty" in r.stderr


def test_inspect_json_must_not_replace_the_latency_table(tmp_path):
    """`inspect --rank-multiple auto --latency-table t.json --json t.json` replaced the timings cache with the listing."""
    table = tmp_path / "t.json"
    r = cli("inspect", ROOT / "models/cifar10_cnn.onnx", "--rank-multiple", "auto", "--latency-table", table, "--json", table)
    assert r.returncode == 2 and "are the same file" in r.stderr and not table.exists()


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_a_latency_batch_too_big_for_one_layers_input_is_refused_before_work(tmp_path, command):
    """The memory check sized the model's inputs only: a --latency-batch whose 3x32x32 images fit but whose 64x32x32
    layer inputs (drawn in float64) do not ended in an internal MemoryError after the per-layer timing had started."""
    from onnx_tucker.bench import available_memory

    memory = available_memory()
    if not memory:
        pytest.skip("no MemAvailable here")
    batch = int(memory / 2 / (3 * 32 * 32 * 4) / 4)  # the images: an eighth of the memory; a 64-channel layer's: 5x it
    model = ROOT / "models/cifar10_cnn.onnx"
    args = ([model, tmp_path / "o.onnx", "--latency-aware"] if command == "compress" else ["inspect", model, "--rank-multiple", "auto"])
    r = cli(*args, "--latency-batch", batch)
    assert r.returncode == 2 and "one layer's input alone would take" in r.stderr and r.stderr.strip().count("\n") == 0


def test_latency_timing_defaults_to_a_fixed_batch_models_own_batch(tmp_path):
    """A model exported for batch 2: `--latency-aware` (and `inspect --rank-multiple auto`) failed with '--latency-batch 1
    cannot run it', a flag the user never gave, after the per-layer timing had run. They time at the model's batch."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n) for n, s in (("a", (32, 16, 3, 3)), ("b", (32, 32, 3, 3)))]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "a"], ["y"], name="c1", pads=[1] * 4),
                               helper.make_node("Conv", ["y", "b"], ["z"], name="c2", pads=[1] * 4)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 16, 16])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 32, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "b2.onnx")
    table = tmp_path / "t.json"
    r = cli(tmp_path / "b2.onnx", tmp_path / "o.onnx", "--ratio", "0.5", "--force", "--latency-aware", "--latency-table", table)
    assert r.returncode == 0, r.stderr
    assert all("|batch 2|" in key for key in json.loads(table.read_text())["entries"])
    r = cli("inspect", tmp_path / "b2.onnx", "--rank-multiple", "auto", "--latency-table", table)
    assert r.returncode == 0 and "batch 2" in r.stdout, r.stdout + r.stderr


def test_report_ratio_is_none_unless_a_ratio_chose_the_ranks(saved_residual, tmp_path):
    """The report's top-level ratio said 0.5 (the option's default) under --target-macs, --rank-method energy ..."""
    for args, ratio in ((["--target-macs", "0.6"], None), (["--rank-method", "energy"], None), (["--ratio", "0.25"], 0.25)):
        assert cli(saved_residual, tmp_path / "o.onnx", *args, "--no-check", "--report", tmp_path / "r.json").returncode == 0
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["ratio"] == data["settings"]["ratio"] == ratio, args


def test_settings_record_every_flag_that_changes_the_model(saved_residual, tmp_path):
    """--exclude, --ranks, --iterations and --method changed the model but not its recorded settings."""
    recorded = []
    for args in ([], ["--exclude", "block_conv"], ["--iterations", "2"], ["--method", "tensorly"], ["--ranks", "down=4,4"]):
        assert cli(saved_residual, tmp_path / "o.onnx", *args, "--no-check").returncode == 0
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
        recorded.append(meta["onnx_tucker.settings"])
    assert len(set(recorded)) == len(recorded)
    last = json.loads(recorded[-1])
    assert last["ranks"] == {"down": [4, 4]} and last["iterations"] == 10 and last["method"] == "eig" and last["exclude"] is None


def test_repeated_exclude_flags_all_count(saved_residual, tmp_path):
    """--exclude 1 --exclude 2 excluded only layer 2."""
    assert cli(saved_residual, tmp_path / "o.onnx", "--exclude", "block_conv", "--exclude", "down", "--force", "--no-check",
               "--report", tmp_path / "r.json").returncode == 0
    reasons = {e["layer"]: e["reason"] for e in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert reasons["block_conv"] == reasons["down"] == "excluded by the user"


def test_check_batch_with_samples_to_check_on_is_refused(saved_residual, tmp_path):
    """--check-batch sizes the random self-check inputs; with --inputs or --data it did nothing, exit 0."""
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 3, 10, 10), np.float32))
    before = set(tmp_path.iterdir())
    r = cli(saved_residual, tmp_path / "o.onnx", "--check-batch", "3", "--inputs", tmp_path / "in.npz")
    assert_clean_failure(r, 2, "--check-batch has no effect with --inputs", tmp_path, before)


def test_sweep_has_no_refit_flag():
    """sweep's help listed --refit {core,last,none} (default core) and refused every value."""
    assert "--refit" not in cli("sweep", "--help").stdout


def test_report_shows_a_matmul_weight_as_out_by_in_as_inspect_does(tmp_path):
    """compress showed a MatMul's raw (in, out) weight; inspect, Conv and Gemm show (out, in)."""
    model = Path(__file__).resolve().parents[1] / "models/cifar10_cnn.onnx"
    assert cli(model, tmp_path / "o.onnx", "--layers", "kxk,dense", "--ratio", "0.25", "--no-check", "--report", tmp_path / "r.json").returncode == 0
    assert cli("inspect", model, "--layers", "kxk,dense", "--json", tmp_path / "i.json").returncode == 0
    shown = {e["layer"]: e["kernel"] for e in json.loads((tmp_path / "r.json").read_text())["layers"]}
    listed = {e["layer"]: e["op_shape"] for e in json.loads((tmp_path / "i.json").read_text())["layers"]}
    assert shown == listed and any(name.endswith("MatMul") and k == [10, 512] for name, k in shown.items())


def test_probe_images_capped_by_the_calibration_set_says_so(saved_residual, tmp_path):
    """--probe-images 40 with 64 calibration samples ran on 16 (a quarter of the set) without a word."""
    np.savez(tmp_path / "cal.npz", x_train=np.random.default_rng(0).standard_normal((64, 3, 10, 10)).astype(np.float32))
    r = cli(saved_residual, tmp_path / "o.onnx", "--target-macs", "0.6", "--calibrate", tmp_path / "cal.npz",
            "--probe-images", "40", "--no-check", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["sensitivity"]["eval_samples"] == 16 and data["settings"]["probe_images"] == 40
    assert any("the probes ran on 16 held-out calibration images, not the 40 asked" in n for n in data["notes"])
    r = cli(saved_residual, tmp_path / "o.onnx", "--target-macs", "0.6", "--calibrate", tmp_path / "cal.npz",
            "--no-check", "--report", tmp_path / "r.json")
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert r.returncode == 0 and not any("the probes ran on" in n for n in notes)  # the default is capped without a word


def test_a_scalar_graph_input_is_fed_whole(tmp_path):
    """A 0-d input (a scale, an If's condition) crashed the self-check's batching (IndexError) and --inputs (len() of an
    unsized object); calibration, which draws samples along a batch axis, refuses it in one line."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1], name="conv"), helper.make_node("Mul", ["h", "s"], ["y"], name="scale")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 8, 8]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "s.onnx"))
    r = cli(tmp_path / "s.onnx", tmp_path / "o.onnx", "--ratio", "1.0", "--force", "--report", tmp_path / "r.json")
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["check"]["outputs"][0]["relative_error"] < 1e-4
    np.savez(tmp_path / "in.npz", x=np.ones((3, 32, 8, 8), np.float32), s=np.float32(2.0))
    r = cli(tmp_path / "s.onnx", tmp_path / "o2.onnx", "--ratio", "0.5", "--inputs", tmp_path / "in.npz")
    assert r.returncode == 0, r.stderr
    r = cli("bench", tmp_path / "s.onnx", tmp_path / "o2.onnx", "--runs", "2", "--inputs", tmp_path / "in.npz")
    assert r.returncode == 0, r.stderr  # bench's timing inputs took len() of the scalar
    np.savez(tmp_path / "cal.npz", x=np.ones((64, 32, 8, 8), np.float32), s=np.float32(2.0))
    r = cli(tmp_path / "s.onnx", tmp_path / "o3.onnx", "--calibrate", tmp_path / "cal.npz", "--calib-size", "64")
    assert r.returncode == 1 and "'s' is a scalar (shape [])" in r.stderr and r.stderr.count("\n") == 1


def test_unknown_sizes_behind_a_loop_do_not_ask_for_input_shape(tmp_path):
    """A static 1x32x8x8 input with a Loop before a conv: shape inference stops at the Loop, and the table asked for
    --input-shape, which changes nothing there. It now says where the sizes were lost."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Relu", ["st_in"], ["st_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("st_in", TensorProto.FLOAT, [1, 32, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("st_out", TensorProto.FLOAT, [1, 32, 8, 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "T", "x"], ["l"], body=body, name="loop"), helper.make_node("Conv", ["l", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(2, np.int64), "M"), numpy_helper.from_array(np.array(True), "T")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "loop.onnx"))
    for args in (["inspect", tmp_path / "loop.onnx"], [tmp_path / "loop.onnx", tmp_path / "o.onnx"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert "shape inference stops before" in r.stdout and "give --input-shape" not in r.stdout, r.stdout


def test_an_unreachable_target_names_the_rank_multiple_that_made_it_so(saved_residual, tmp_path):
    """--rank-multiple 8 on 8-channel layers makes the smallest rank full: "cannot be met" gave no cause."""
    r = cli(saved_residual, tmp_path / "o.onnx", "--target-macs", "0.3", "--rank-multiple", "16")
    assert r.returncode == 2 and "cannot be met" in r.stderr and "--rank-multiple 16 makes 16 the smallest rank" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_verbose_says_each_phase_and_step_as_it_ends(saved_residual, tmp_path):
    """-v: where the time goes, on stderr as the run goes (a run killed at a time limit still shows how far it got);
    stdout keeps its lines, and the same run without -v says none of it."""
    np.savez(tmp_path / "cal.npz", x_train=np.random.default_rng(0).standard_normal((64, 3, 10, 10)).astype(np.float32))
    args = (saved_residual, tmp_path / "o.onnx", "--target-macs", "0.6", "--calibrate", tmp_path / "cal.npz")
    r = cli(*args, "-v")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("onnx-tucker: ")]
    for step in ("statistics:", "plan: moments of", "plan: rank options fitted", "probes on cpu:", "plan:", "refit:",
                 "refit: forward passes", "onnxruntime sessions:"):
        assert any(line.removeprefix("onnx-tucker: ").startswith(step) or step in line for line in lines), (step, r.stderr)
    assert "PASSED" in r.stdout and "time:" in r.stdout
    quiet = cli(*args)
    assert quiet.returncode == 0 and "plan: moments" not in quiet.stderr

"""Issue 12, "safe with whatever a user hands it": file harm and bad input.

The contract: bad input gets one line on stderr (``onnx-tucker: error: ...``), a non-zero exit, no
traceback, nothing written and the inputs untouched; a run writes all of its outputs or none.
Every test goes through the real command line (``cli.main`` in-process, or a subprocess where a
signal, a FIFO or the current folder is involved).
"""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, residual_model

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "cifar10_cnn.onnx"
SAMPLE = ROOT / "models" / "cifar10_test_sample.npz"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# --- helpers ---------------------------------------------------------------------------------------

def cli(*args, cwd=None, timeout=240):
    """The real command in a subprocess; a hang (a FIFO opened for writing) is a failure, not a stuck suite."""
    try:
        return subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd, env=ENV, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"onnx-tucker {' '.join(map(str, args))} did not finish in {timeout} s")


def run(capsys, *args):
    """``cli.main`` in this process: (exit code, stdout, stderr)."""
    from onnx_tucker.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(err: str) -> list[str]:
    """stderr's lines as a terminal shows them (progress bars redraw with \\r)."""
    return [line.split("\r")[-1] for line in err.splitlines() if line.split("\r")[-1].strip()]


def assert_one_line_error(code, err, expected_code=None, needle=None):
    lines = lines_of(err)
    assert code != 0, err
    if expected_code is not None:
        assert code == expected_code, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("onnx-tucker: error: "), err
    if needle:
        assert needle.lower() in lines[0].lower(), lines[0]


def refused(r, expected_code=None, needle=None):
    assert_one_line_error(r.returncode, r.stderr, expected_code, needle)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict:
    """Every entry under ``folder`` (hidden ones too, links not followed): kind and content digest."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                out[str(p.relative_to(folder))] = ("file", digest(p))
            elif stat.S_ISLNK(mode):
                out[str(p.relative_to(folder))] = ("link", os.readlink(p))
            else:
                out[str(p.relative_to(folder))] = (stat.S_IFMT(mode), None)
    return out


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".onnx-tucker-*")]


def special(path: Path, kind: str) -> Path:
    if kind == "chardev":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a character device here: {exc}")
    else:
        os.mkfifo(path)
    return path


def cnn_images(n: int, seed: int = 0) -> np.ndarray:
    with np.load(SAMPLE) as data:
        x = data["x_test"]
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)].astype(np.float32)


@pytest.fixture
def files(tmp_path):
    """Copies of what a compress run reads (never the repository's own files: the bugs overwrite them)."""
    work = tmp_path / "work"
    work.mkdir()
    data = work / "test.npz"
    data.write_bytes(SAMPLE.read_bytes())
    inputs = work / "inputs.npz"
    np.savez(inputs, x=cnn_images(8, seed=1))
    train = work / "train.npz"
    np.savez(train, x_train=cnn_images(40, seed=2))
    return work, {"data": data, "inputs": inputs, "calibrate": train}


# --- 1. outputs that are not regular files ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["chardev", "fifo"])
@pytest.mark.parametrize("where", ["model", "report"])
def test_compress_refuses_a_device_or_fifo_as_output_before_any_work(tmp_path, kind, where):
    target = special(tmp_path / ("out.onnx" if where == "model" else "report.json"), kind)
    args = [CNN, target, "--no-check"] if where == "model" else [CNN, tmp_path / "out.onnx", "--no-check", "--report", target]
    before = tree(tmp_path)
    r = cli(*args, timeout=120)
    refused(r, 2, "not a regular file")
    assert r.stdout == ""  # refused before any work
    assert tree(tmp_path) == before  # the device is still a device, nothing else written


@pytest.mark.parametrize("kind", ["chardev", "fifo"])
@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_inspect_and_bench_refuse_a_device_or_fifo_as_json(tmp_path, kind, command):
    target = special(tmp_path / "listing.json", kind)
    before = tree(tmp_path)
    extra = ["--runs", "2", "--warmup", "0", "--no-progress", "--providers", "cpu"] if command == "bench" else []
    r = cli(command, CNN, *extra, "--json", target, timeout=120)
    refused(r, 2, "not a regular file")
    assert r.stdout == ""
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["chardev", "fifo"])
@pytest.mark.parametrize("name", ["sweep.json", "cifar10_cnn_ratio0.5.onnx"])
def test_sweep_refuses_a_device_or_fifo_in_its_out_dir(tmp_path, kind, name):
    out_dir = tmp_path / "sweep"
    out_dir.mkdir()
    special(out_dir / name, kind)
    data = tmp_path / "test.npz"
    data.write_bytes(SAMPLE.read_bytes())
    before = tree(tmp_path)
    r = cli("sweep", CNN, "--data", data, "--data-limit", "20", "--ratios", "0.5", "--runs", "1", "--batch", "1",
            "--no-progress", "--out-dir", out_dir, timeout=180)
    refused(r, 2, "not a regular file")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "report"])
def test_output_that_is_a_symlink_to_a_regular_file_is_refused_leaving_link_and_target_alone(tmp_path, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    precious = elsewhere / "precious.bin"
    precious.write_bytes(b"keep me")
    link = tmp_path / ("out.onnx" if where == "model" else "report.json")
    link.symlink_to(precious)
    args = [CNN, link, "--no-check"] if where == "model" else [CNN, tmp_path / "out.onnx", "--no-check", "--report", link]
    before = tree(tmp_path)
    r = cli(*args)
    refused(r, 2, "symbolic link")
    assert tree(tmp_path) == before and precious.read_bytes() == b"keep me"


# --- 2. an output naming a file the command reads ----------------------------------------------------

VICTIM_ARGS = {
    "output": lambda f, out: [],
    "data": lambda f, out: ["--data", f["data"], "--data-limit", "50"],
    "inputs": lambda f, out: ["--inputs", f["inputs"]],
    "calibrate": lambda f, out: ["--calibrate", f["calibrate"], "--calib-size", "40"],
}


@pytest.mark.parametrize("victim", list(VICTIM_ARGS))
def test_report_naming_the_output_or_a_file_read_is_refused(files, capsys, victim):
    work, f = files
    out = work / "out.onnx"
    report = out if victim == "output" else f[victim]
    before = tree(work)
    code, _, err = run(capsys, CNN, out, *VICTIM_ARGS[victim](f, out), "--report", report)
    assert_one_line_error(code, err, 2)
    assert tree(work) == before


@pytest.mark.parametrize("victim", ["data", "inputs", "calibrate"])
def test_output_model_naming_a_file_read_is_refused(files, capsys, victim):
    work, f = files
    before = tree(work)
    code, _, err = run(capsys, CNN, f[victim], *VICTIM_ARGS[victim](f, None))
    assert_one_line_error(code, err, 2, "reads")
    assert tree(work) == before


def test_report_reaching_the_data_file_through_a_linked_folder_is_refused(files, capsys):
    work, f = files
    (work / "via").symlink_to(work, target_is_directory=True)
    before = tree(work)
    code, _, err = run(capsys, CNN, work / "out.onnx", "--data", f["data"], "--data-limit", "50",
                       "--report", work / "via" / f["data"].name)
    assert_one_line_error(code, err, 2, "--data")
    assert tree(work) == before


def test_report_that_is_a_hard_link_to_the_calibration_file_is_refused(files, capsys):
    work, f = files
    os.link(f["calibrate"], work / "hard.json")
    before = tree(work)
    code, _, err = run(capsys, CNN, work / "out.onnx", "--calibrate", f["calibrate"], "--calib-size", "40",
                       "--report", work / "hard.json")
    assert_one_line_error(code, err, 2, "--calibrate")
    assert tree(work) == before


@pytest.mark.parametrize("victim", ["data", "inputs"])
def test_bench_json_naming_its_data_or_inputs_is_refused_before_timing(files, capsys, victim):
    work, f = files
    before = tree(work)
    code, out, err = run(capsys, "bench", CNN, "--runs", "2", "--warmup", "0", "--no-progress", "--providers", "cpu",
                         f"--{victim}", f[victim], "--json", f[victim])
    assert_one_line_error(code, err, 2, f"--{victim}")
    assert out == "" and tree(work) == before


def test_the_output_and_report_cannot_be_one_file(files, capsys):
    work, f = files
    code, _, err = run(capsys, CNN, work / "out.onnx", "--no-check", "--report", work / "." / "out.onnx")
    assert_one_line_error(code, err, 2, "same file")
    assert not (work / "out.onnx").exists()


# --- 3. all outputs or none ----------------------------------------------------------------------------

def test_failing_accuracy_step_leaves_no_model_behind(files, capsys, monkeypatch):
    work, f = files
    import onnx_tucker.data

    def broken(outputs, labels):
        raise RuntimeError("accuracy step failed")

    monkeypatch.setattr(onnx_tucker.data, "top1", broken)
    before = tree(work)
    code, _, err = run(capsys, CNN, work / "out.onnx", "--data", f["data"], "--data-limit", "50", "--report", work / "r.json")
    assert code == 1 and "Traceback" not in err
    assert tree(work) == before


def test_failing_report_leaves_no_model_or_data_file_behind(files, capsys, monkeypatch):
    work, f = files
    from onnx_tucker.report import Report

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "to_json", broken)
    before = tree(work)
    code, _, err = run(capsys, CNN, work / "out.onnx", "--external-data", "--no-check", "--report", work / "r.json")
    assert code == 1 and "Traceback" not in err
    assert tree(work) == before  # neither out.onnx nor out.onnx.data


def test_failure_keeps_the_previous_output_and_report(files, capsys, monkeypatch):
    work, f = files
    (work / "out.onnx").write_bytes(b"previous model")
    (work / "r.json").write_text("previous report")
    import onnx_tucker.data

    monkeypatch.setattr(onnx_tucker.data, "top1", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    before = tree(work)
    code, _, err = run(capsys, CNN, work / "out.onnx", "--data", f["data"], "--data-limit", "50", "--report", work / "r.json")
    assert code == 1 and tree(work) == before


def test_successful_run_writes_model_and_report_together(files, capsys):
    work, f = files
    code, out, err = run(capsys, CNN, work / "out.onnx", "--data", f["data"], "--data-limit", "50",
                         "--report", work / "r.json", "-q")
    assert code == 0, err
    assert (work / "r.json").is_file() and (work / "out.onnx").is_file() and not leftovers(work)
    onnx.checker.check_model(str(work / "out.onnx"))


def test_outputs_api_stages_and_commits_all_or_none(tmp_path):
    from onnx_tucker.outputs import Outputs

    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            staged = outputs.write_text(tmp_path / "a.txt", "a")
            outputs.write_text(tmp_path / "b.txt", "b")
            assert staged.read_text() == "a" and not (tmp_path / "a.txt").exists()
            raise RuntimeError("later step failed")
    assert list(tmp_path.iterdir()) == []
    with Outputs() as outputs:
        outputs.write_text(tmp_path / "a.txt", "a")
        staged, data = outputs.save_model(conv_model(c_in=16, c_out=32), tmp_path / "m.onnx", external_data=True)
        onnx.checker.check_model(str(staged))  # usable (self-check, top-1) before the commit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.onnx", "m.onnx.data"]
    assert data == tmp_path / "m.onnx.data"


def test_outputs_commit_failing_halfway_restores_the_previous_files(tmp_path, monkeypatch):
    from onnx_tucker.errors import OnnxTuckerError
    from onnx_tucker.outputs import Outputs

    (tmp_path / "a.txt").write_text("old a")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    outputs = Outputs()
    outputs.write_text(tmp_path / "a.txt", "new a")
    outputs.write_text(tmp_path / "b.txt", "new b")
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OnnxTuckerError, match="No space left"):
        outputs.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_outputs_write_text_survives_a_path_that_is_not_utf8(tmp_path):
    """A lone surrogate (how Python spells the byte 0xff of a file name like b"t\\xff.npz") in a text output: the
    write failed with UnicodeEncodeError (sweep.md naming such a --data file); it is a backslash escape now and
    the file is valid UTF-8."""
    from onnx_tucker.outputs import Outputs

    name = os.fsdecode(b"t\xff.npz")
    with Outputs() as outputs:
        outputs.write_text(tmp_path / "table.md", f"measured on {name}\n")
    assert (tmp_path / "table.md").read_bytes().decode("utf-8") == "measured on t\\udcff.npz\n"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=["umask-022", "umask-027", "umask-002"])
def test_cache_file_mode_new_and_kept(tmp_path, umask):
    """--curves and --latency-table (outputs.replace_cache_file) were written through tempfile.mkstemp: 0600 whatever
    the umask, and a file the user had made readable to others was made private on every rewrite."""
    from onnx_tucker.outputs import replace_cache_file

    path = tmp_path / "curves.json"
    old = os.umask(umask)
    try:
        replace_cache_file(path, "{}", "--curves")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as a model output, or any new file, gets
        (tmp_path / "plain").write_text("x")
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
        for mode in (0o644, 0o600, 0o660, 0o604):
            path.chmod(mode)
            inode = path.stat().st_ino
            replace_cache_file(path, '{"a": 1}', "--curves")
            assert path.stat().st_ino != inode and stat.S_IMODE(path.stat().st_mode) == mode
            assert path.read_text() == '{"a": 1}'
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.json", "plain"]  # no temporary left


# --- 4. SIGTERM / SIGINT ---------------------------------------------------------------------------------

SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import onnx_tucker.io as io
    marker = Path(sys.argv[1])
    def slow(message, f):
        f.write(b"partial")
        f.flush()
        marker.write_text("saving")
        time.sleep(120)
    io.write_serialized = slow
    from onnx_tucker.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("signum, code, extra", [(signal.SIGTERM, 143, []), (signal.SIGINT, 130, []),
                                                 (signal.SIGTERM, 143, ["--external-data"])],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-external-data"])
def test_signal_during_the_save_leaves_nothing(tmp_path, signum, code, extra):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(marker), str(CNN), str(out_dir / "o.onnx"), "--no-check",
                             *extra, "--report", str(out_dir / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert len(lines_of(err)) == 1 and "Traceback" not in err and lines_of(err)[0].startswith("onnx-tucker: "), err
    assert list(out_dir.iterdir()) == []  # no .onnx-tucker-* folder, no model, no data file, no report


def test_sigterm_at_any_moment_leaves_all_outputs_or_none(tmp_path):
    def start(out_dir):
        out_dir.mkdir()
        return subprocess.Popen([sys.executable, "-m", "onnx_tucker", str(CNN), str(out_dir / "o.onnx"), "--external-data",
                                 "--report", str(out_dir / "r.json"), "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    began = time.monotonic()
    proc = start(tmp_path / "whole")
    assert proc.wait(timeout=240) == 0
    whole = time.monotonic() - began  # signals sent across the run's own length, whatever the machine's load
    codes = []
    for i, fraction in enumerate((0.2, 0.4, 0.6, 0.75, 0.85, 0.95, 1.05)):
        out_dir = tmp_path / f"run{i}"
        proc = start(out_dir)
        time.sleep(fraction * whole)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
        codes.append(proc.returncode)
        names = sorted(p.name for p in out_dir.iterdir())
        assert names in ([], ["o.onnx", "o.onnx.data", "r.json"]), (fraction, proc.returncode, names)  # all or none
        assert "Traceback" not in err and len(lines_of(err)) <= 1, err
        if proc.returncode == 0:
            assert names, fraction
        elif proc.returncode == 143:  # the command's own handler: it says so in one line, and wrote nothing
            assert names == [] and lines_of(err) == ["onnx-tucker: terminated (SIGTERM)"], (fraction, names, err)
        else:  # killed outright: before the command started, or after it had finished and committed
            assert proc.returncode == -signal.SIGTERM, (fraction, proc.returncode, err)
    assert any(code != 0 for code in codes), codes


# --- 5. external data whatever the current folder --------------------------------------------------------

def test_external_data_rerun_from_the_output_folder(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    for attempt in range(2):
        code, _, err = run(capsys, CNN, "again.onnx", "--external-data", "--no-check", "-q")
        assert code == 0, (attempt, err)
        if attempt == 0:
            first = tree(out_dir)
    assert tree(out_dir) == first and set(first) == {"again.onnx", "again.onnx.data"}  # written fresh, same bytes
    from onnx_tucker.runtime import make_session

    make_session(out_dir / "again.onnx")


def test_unrelated_data_file_in_the_current_folder_is_left_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.onnx.data").write_bytes(b"unrelated")
    (tmp_path / "sub").mkdir()
    code, _, err = run(capsys, CNN, "sub/x.onnx", "--external-data", "--no-check", "-q")
    assert code == 0, err
    assert (tmp_path / "x.onnx.data").read_bytes() == b"unrelated"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.onnx", "x.onnx.data"]
    from onnx_tucker.io import load_model

    load_model(tmp_path / "sub" / "x.onnx")


# --- 6. degenerate calibration sets ---------------------------------------------------------------------

@pytest.mark.parametrize("make, needle", [
    (lambda: np.zeros((64, 32, 32, 3), np.float32), "identical"),
    (lambda: np.full((64, 32, 32, 3), 128, np.uint8), "identical"),
    (lambda: np.repeat(cnn_images(1), 64, axis=0), "identical"),
    (lambda: cnn_images(1), "at least"),
    (lambda: cnn_images(3), "at least"),
    (lambda: cnn_images(31), "at least"),
], ids=["all-zero", "constant", "one-image-repeated", "1-sample", "3-samples", "31-samples"])
def test_degenerate_calibration_sets_are_refused(tmp_path, capsys, make, needle):
    np.savez(tmp_path / "train.npz", x_train=make())
    before = tree(tmp_path)
    code, out, err = run(capsys, CNN, tmp_path / "out.onnx", "--calibrate", tmp_path / "train.npz", "--no-check")
    assert_one_line_error(code, err, 1, needle)
    assert "PASSED" not in out and tree(tmp_path) == before


def test_sweep_refuses_a_degenerate_calibration_set(tmp_path, capsys):
    np.savez(tmp_path / "train.npz", x_train=np.zeros((64, 32, 32, 3), np.float32))
    data = tmp_path / "test.npz"
    data.write_bytes(SAMPLE.read_bytes())
    code, _, err = run(capsys, "sweep", CNN, "--data", data, "--calibrate", tmp_path / "train.npz", "--ratios", "0.5",
                       "--no-progress", "--out-dir", tmp_path / "sweep")
    assert_one_line_error(code, err, 1, "identical")
    assert not list((tmp_path / "sweep").glob("*"))  # at most the empty folder it made


def test_fewer_calibration_samples_than_asked_prints_one_notice(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(residual_model(), str(model))
    np.savez(tmp_path / "train.npz", x_train=np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32))
    code, out, err = run(capsys, model, tmp_path / "out.onnx", "--calibrate", tmp_path / "train.npz", "--calib-size", "64", "-q")
    assert code == 0, err
    notices = [line for line in lines_of(err) if "notice" in line]
    assert len(notices) == 1 and "40" in notices[0] and "64" in notices[0], err
    assert "PASSED" in out


def test_calibration_api_refuses_too_few_samples_only_when_asked(tmp_path):
    from onnx_tucker.data import MIN_CALIB_SAMPLES, load_calibration
    from onnx_tucker.errors import DataError

    np.savez(tmp_path / "c.npz", x_train=np.random.default_rng(0).standard_normal((8, 3, 10, 10)))
    assert len(load_calibration(tmp_path / "c.npz", residual_model(), size=None)["x"]) == 8  # the library's default
    with pytest.raises(DataError, match=f"at least {MIN_CALIB_SAMPLES}"):
        load_calibration(tmp_path / "c.npz", residual_model(), size=None, min_samples=MIN_CALIB_SAMPLES)


# --- 9. symbolic links in the model's folder (a Hugging Face cache) --------------------------------------

def hf_cache(tmp_path: Path) -> tuple[Path, Path]:
    """models--x/blobs/<hash> and models--x/snapshots/<rev>/model.onnx(.data) as links into ../../blobs/."""
    repo = tmp_path / "models--x"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    model = onnx.ModelProto.FromString(residual_model(channels=32).SerializeToString())
    onnx.save_model(model, str(repo / "blobs" / "staging.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)
    (repo / "blobs" / "staging.onnx").rename(repo / "blobs" / "1111")
    (repo / "blobs" / "model.onnx.data").rename(repo / "blobs" / "2222")
    (snap / "model.onnx").symlink_to("../../blobs/1111")
    (snap / "model.onnx.data").symlink_to("../../blobs/2222")
    return repo, snap / "model.onnx"


def test_hugging_face_style_symlinked_model_folder_loads_and_compresses(tmp_path, capsys):
    repo, model = hf_cache(tmp_path)
    before = tree(repo)
    code, out, err = run(capsys, model, tmp_path / "out.onnx")
    assert code == 0, err
    assert "PASSED" in out and tree(repo) == before


def test_output_over_a_linked_data_blob_is_refused(tmp_path, capsys):
    repo, model = hf_cache(tmp_path)
    before = tree(repo)
    code, _, err = run(capsys, model, repo / "blobs" / "2222", "--no-check")
    assert_one_line_error(code, err, 2)
    assert tree(repo) == before


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../m.onnx.data", "/etc/hostname"])
def test_locations_climbing_out_are_still_refused_lexically(tmp_path, capsys, location):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "sub").mkdir()
    path = folder / "m.onnx"
    model = onnx.ModelProto.FromString(conv_model(c_in=16, c_out=32).SerializeToString())
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=64)
    stored = onnx.load(str(path), load_external_data=False)
    for t in stored.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(stored.SerializeToString())
    (tmp_path / "secret.bin").write_bytes((folder / "m.onnx.data").read_bytes())
    code, _, err = run(capsys, path, tmp_path / "out.onnx", "--no-check")
    assert_one_line_error(code, err, 1, "outside the model's folder")
    assert not (tmp_path / "out.onnx").exists()


# --- 10. internal errors where a one-line message is due -------------------------------------------------

def scalar_output_model() -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv -> ReduceSum over everything -> a scalar."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32), "W")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32), "W2")
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["b"], ["y"], name="sum", keepdims=0)]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [w, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("flag, arrays", [
    ("--inputs", {"x": np.full((4, 32, 32, 3), "a")}),
    ("--inputs", {"x": np.zeros((0, 32, 32, 3), np.float32)}),
    ("--data", {"x_test": np.full((4, 32, 32, 3), "a"), "y_test": np.zeros(4, np.int64)}),
    ("--data", {"x_test": np.zeros((0, 32, 32, 3), np.float32), "y_test": np.zeros(0, np.int64)}),
], ids=["inputs-strings", "inputs-empty", "data-strings", "data-empty"])
def test_string_or_empty_arrays_are_one_line_errors(tmp_path, capsys, flag, arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    before = tree(tmp_path)
    code, _, err = run(capsys, CNN, tmp_path / "out.onnx", flag, tmp_path / "bad.npz")
    assert_one_line_error(code, err, 1)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("member", [b"garbage", b"\x93NUMPY garbage after the magic" * 10], ids=["no-magic", "bad-header"])
def test_zip_with_a_garbage_npy_member_is_a_one_line_error(tmp_path, capsys, member):
    with zipfile.ZipFile(tmp_path / "train.npz", "w") as z:
        z.writestr("x_train.npy", member)
    before = tree(tmp_path)
    code, _, err = run(capsys, CNN, tmp_path / "out.onnx", "--calibrate", tmp_path / "train.npz")
    assert_one_line_error(code, err, 1, "train.npz")
    assert tree(tmp_path) == before


def test_scalar_output_model_self_check_runs(tmp_path, capsys):
    onnx.save(scalar_output_model(), str(tmp_path / "s.onnx"))
    code, out, err = run(capsys, tmp_path / "s.onnx", tmp_path / "out.onnx", "--force")
    assert code == 0, err
    assert "self-check" in out and "internal error" not in err


def test_scalar_output_model_top1_is_a_one_line_error(tmp_path, capsys):
    onnx.save(scalar_output_model(), str(tmp_path / "s.onnx"))
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3, 8, 8), np.float32) + np.arange(10)[:, None, None, None],
             y=np.arange(10) % 3)
    before = tree(tmp_path)
    code, _, err = run(capsys, tmp_path / "s.onnx", tmp_path / "out.onnx", "--force", "--data", tmp_path / "d.npz")
    assert_one_line_error(code, err, 1, "top-1")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "report"])
def test_output_name_over_255_characters_is_a_one_line_error(tmp_path, capsys, where):
    long = tmp_path / ("a" * 300 + ".onnx")
    args = [long, "--no-check"] if where == "model" else [tmp_path / "out.onnx", "--no-check", "--report", long]
    code, out, err = run(capsys, CNN, *args)
    assert_one_line_error(code, err, 2, "too long")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_external_data_name_over_255_characters_is_a_one_line_error(tmp_path, capsys):
    name = tmp_path / ("a" * 250 + ".onnx")  # fits; its .data file does not
    code, out, err = run(capsys, CNN, name, "--no-check", "--external-data")
    assert_one_line_error(code, err, 2, "too long")
    assert list(tmp_path.iterdir()) == []


def test_bench_json_naming_a_folder_is_refused_before_the_benchmark(tmp_path, capsys):
    code, out, err = run(capsys, "bench", CNN, "--runs", "2", "--warmup", "0", "--no-progress", "--providers", "cpu",
                         "--json", tmp_path)
    assert_one_line_error(code, err, 2, "folder")
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax"),
    ])
    path = tmp_path_factory.mktemp("keras") / "tiny.keras"
    model.save(path)
    return path


def test_convert_opset_99_is_a_one_line_error(tiny_keras, tmp_path):
    r = cli("convert", tiny_keras, tmp_path / "o.onnx", "--opset", "99")
    refused(r, 2, "opset")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arrays", [{"x": np.zeros((4, 9, 9, 3), np.float32)}, {"x": np.zeros((4, 8, 8), np.float32)},
                                    {"x": np.zeros((0, 8, 8, 3), np.float32)}, {"x": np.full((2, 8, 8, 3), "a")}],
                         ids=["wrong-size", "wrong-rank", "empty", "strings"])
def test_convert_inputs_of_the_wrong_shape_or_kind_are_one_line_errors(tiny_keras, tmp_path, arrays):
    np.savez(tmp_path / "in.npz", **arrays)
    before = tree(tmp_path)
    r = cli("convert", tiny_keras, tmp_path / "o.onnx", "--inputs", tmp_path / "in.npz")
    refused(r, 1)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["chardev", "fifo", "inputs"])
def test_convert_output_that_is_a_device_fifo_or_its_inputs_is_refused(tiny_keras, tmp_path, kind):
    if kind == "inputs":
        np.savez(tmp_path / "in.npz", x=np.zeros((2, 8, 8, 3), np.float32))
        target, extra = tmp_path / "in.npz", ["--inputs", tmp_path / "in.npz"]
    else:
        target, extra = special(tmp_path / "o.onnx", kind), []
    before = tree(tmp_path)
    r = cli("convert", tiny_keras, target, *extra, timeout=180)
    refused(r, 2)
    assert r.stdout == "" and tree(tmp_path) == before


def test_convert_of_a_missing_or_folder_input_is_a_usage_error_like_compress(tmp_path):
    for source, said in ((tmp_path / "nope.keras", "Keras model not found"), (tmp_path, "Keras model is not a file")):
        r = cli("convert", source, tmp_path / "o.onnx")
        refused(r, 2, said)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("target", ["img000.png", "sub/new.JPG"])
def test_an_output_inside_the_image_folder_it_calibrates_on_is_refused(tmp_path, capsys, target):
    """The paths check compared the output with the --calibrate folder itself, not the images inside: `onnx-tucker m.onnx
    imgs/img000.png --calibrate imgs` wrote the model over a calibration image, exit 0. An image name there is refused
    (read now, or by the next run); a model beside the images is not (`--calibrate .` with the output in `.`)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    before = {p: p.read_bytes() for p in folder.rglob("*.png")}
    code, _, err = run(capsys, CNN, folder / target, "--calibrate", folder, "--calib-size", "32")
    assert_one_line_error(code, err, 2, "a folder this command reads")
    assert {p: p.read_bytes() for p in folder.rglob("*.png")} == before and not (folder / "sub/new.JPG").exists()
    code, _, _ = run(capsys, CNN, folder / "model.onnx", "--calibrate", folder, "--calib-size", "32", "--no-check")
    assert code == 0 and (folder / "model.onnx").is_file()


def test_an_earlier_outputs_data_file_left_beside_a_new_inline_model_is_said(tmp_path, capsys):
    """Rewriting OUT.onnx with its weights inline left the earlier run's OUT.onnx.data beside it without a word: a
    file nothing reads. It is not ours to delete; a notice says so."""
    out = tmp_path / "o.onnx"
    code, _, _ = run(capsys, CNN, out, "--ratio", "0.5", "--external-data", "--no-check")
    assert code == 0 and (tmp_path / "o.onnx.data").is_file()
    before = (tmp_path / "o.onnx.data").read_bytes()
    code, _, err = run(capsys, CNN, out, "--ratio", "0.5", "--no-check")
    assert code == 0 and "o.onnx.data (an earlier output's weights) is left as it was" in err
    assert (tmp_path / "o.onnx.data").read_bytes() == before and onnx.load(str(out)).graph.initializer


def test_two_runs_committing_into_one_folder_take_turns(tmp_path, monkeypatch):
    """Two runs writing the same model with external data: between one run's two renames (the data file, then the
    model) the other's whole commit could land, leaving run A's model beside run B's data (both exit 0, the model
    unloadable). Commits into one folder now hold an flock on it: the pair always comes from one run."""
    import threading

    from onnx_tucker.outputs import Outputs

    real, a_paused, release = os.replace, threading.Event(), threading.Event()

    def replace(src, dst, *args, **kwargs):
        result = real(src, dst, *args, **kwargs)
        if threading.current_thread().name == "A" and str(dst).endswith(".data"):
            a_paused.set()  # A has renamed its data file, not yet its model
            release.wait(10)
        return result

    monkeypatch.setattr(os, "replace", replace)

    def run(tag):
        with Outputs() as outputs:
            outputs.write_text(tmp_path / "m.onnx.data", tag)
            outputs.write_text(tmp_path / "m.onnx", tag)

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_paused.wait(10)
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    b.join(0.5)
    assert b.is_alive()  # B waits for A's commit
    release.set()
    a.join(10)
    b.join(10)
    assert (tmp_path / "m.onnx").read_text() == (tmp_path / "m.onnx.data").read_text() == "B"


def test_side_files_are_held_to_their_own_path_not_to_a_models_data_file(tmp_path, capsys):
    """`--report b.onnx` (or `inspect --json b.onnx`) was refused because a *model* named b.onnx would write b.onnx.data,
    the input's data file; a JSON file writes only itself. Its own path is still checked, and named in the error."""
    import onnx

    onnx.save(onnx.load(str(CNN)), str(tmp_path / "a.onnx"), save_as_external_data=True, location="b.onnx.data")
    a = tmp_path / "a.onnx"
    code, _, err = run(capsys, a, tmp_path / "new.onnx", "--no-check", "--report", tmp_path / "b.onnx")
    assert code == 0, err
    code, _, err = run(capsys, "inspect", a, "--json", tmp_path / "b2.onnx")
    assert code == 0, err
    before = tree(tmp_path)
    code, _, err = run(capsys, a, tmp_path / "new2.onnx", "--no-check", "--report", tmp_path / "b.onnx.data")
    assert_one_line_error(code, err, 2, "--report")
    assert "external data file b.onnx.data" in err
    code, _, err = run(capsys, a, tmp_path / "new2.onnx", "--no-check", "--report", a)
    assert_one_line_error(code, err, 2, "--report")
    assert "is the input model" in err and tree(tmp_path) == before


def test_outputs_naming_one_folder_two_ways_commit_without_waiting_on_themselves(tmp_path):
    """`out.onnx` and `--report $PWD/r.json`: the commit's folder lock grouped folders by the path as typed, so the run
    locked its own folder twice and waited on itself forever, signals held back (only kill -9 ended it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", str(CNN), "m.onnx", "--no-check", "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "r.json"}


def test_a_run_waiting_for_anothers_commit_stays_interruptible(tmp_path):
    """While another run holds the output folder's lock, SIGTERM ended the waiting run only after the lock was
    released: it waited with the signals held back. Now it stops at once, leaving nothing."""
    import fcntl

    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        p = subprocess.Popen([sys.executable, "-m", "onnx_tucker", str(CNN), str(tmp_path / "m.onnx"), "--no-check"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        for _ in range(600):  # until it waits for the lock: its staging folder is there and it has not finished
            staged = [f for f in tmp_path.iterdir() if f.name.startswith(".onnx-tucker-")]
            if staged and p.poll() is None and any(f.iterdir() for f in staged):
                time.sleep(0.5)
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        os.close(holder)
    assert p.returncode == 143 and "Traceback" not in err, (p.returncode, err)
    assert list(tmp_path.iterdir()) == []

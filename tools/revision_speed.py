"""Time one CLI command at two revisions of the tool, interleaved, and say whether they wrote the same model.

Each revision is exported (``git archive``; ``WORKTREE`` is the working tree as it is) into its own folder and run
from there: ``python -m`` puts the current folder first on ``sys.path``, so a run from the checkout would time the
checkout whatever ``PYTHONPATH`` says. Runs alternate between the two (old, new, old, new, ...) so that load on a
shared machine falls on both; the script prints each run's wall seconds and the tool's own ``time:`` line, the
medians and their ratio, and compares the two output models: byte-identical, or the largest relative difference of
an initializer and whether pruning kept the same channels.

    python tools/revision_speed.py c9463d9 WORKTREE -- models/cifar10_resnet56.onnx --target-macs 0.5 --layers hidden
    python tools/revision_speed.py HEAD~1 HEAD --rounds 3 -- models/cifar10_vgg11_bn.onnx --target-macs 0.2 \\
        --layers hidden,kxk --prune-share 0.25

The calibration set defaults to the CIFAR-10 training file (``--calibrate`` is added unless given); ``--no-check``
and ``-v`` are added so that the time is the compression's.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("CIFAR10_DIR", ROOT.parent / "shared/data/cifar10"))


def export(revision: str, into: Path) -> None:
    """The package at ``revision`` (or the working tree) under ``into``."""
    if revision == "WORKTREE":
        subprocess.run(["cp", "-r", str(ROOT / "onnx_tucker"), str(into)], check=True)
        return
    archive = subprocess.run(["git", "archive", revision, "onnx_tucker"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def run(folder: Path, argv: list[str], out: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnx_tucker", argv[0], str(out), *argv[1:]], cwd=folder,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"revision_speed: the run in {folder} failed: {done.stderr.strip().splitlines()[-1:]}")
    times = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("time:")]
    return wall, (times[0] if times else "")


def compare(a: Path, b: Path) -> str:
    if a.read_bytes() == b.read_bytes():
        return "the same bytes"
    from onnx_tucker.prune import kept_channels_in

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in ma.graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in mb.graph.initializer}
    if set(ia) != set(ib) or any(ia[k].shape != ib[k].shape for k in ia):
        return "different graphs (initializer names or shapes differ)"
    worst = max((float(np.abs(ia[k] - ib[k]).max() / max(float(np.abs(ia[k]).max()), 1e-30)) for k in ia), default=0.0)
    same_kept = kept_channels_in(ma) == kept_channels_in(mb)
    return f"not the same bytes: same graph, largest relative weight difference {worst:.2g}, same kept channels: {same_kept}"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's arguments, and the command's after ``--`` (argparse's REMAINDER mixes them up)."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="a git revision, or WORKTREE")
    parser.add_argument("new", help="a git revision, or WORKTREE")
    parser.add_argument("--rounds", type=int, default=2)
    ours, argv = _split(sys.argv[1:])
    args = parser.parse_args(ours)
    if not argv:
        parser.error("give the command after --: MODEL SETTINGS... (as after onnx-tucker IN OUT)")
    argv[0] = str(Path(argv[0]).resolve())
    if "--calibrate" not in argv:
        argv += ["--calibrate", str(DATA / "cifar10_train.npz")]
    argv += ["--no-check", "-v"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for label, revision in (("old", args.old), ("new", args.new)):
            folders[label] = Path(tmp) / label
            folders[label].mkdir()
            export(revision, folders[label])
        walls = {"old": [], "new": []}
        for round_ in range(args.rounds):
            for label in ("old", "new"):
                wall, line = run(folders[label], argv, Path(tmp) / f"{label}.onnx")
                walls[label].append(wall)
                print(f"round {round_ + 1} {label:3s} {wall:7.1f} s  load {os.getloadavg()[0]:.2f}  {line}", flush=True)
        old, new = statistics.median(walls["old"]), statistics.median(walls["new"])
        print(f"median: {args.old} {old:.1f} s, {args.new} {new:.1f} s: {old / new:.2f}x")
        print("outputs:", compare(Path(tmp) / "old.onnx", Path(tmp) / "new.onnx"))


if __name__ == "__main__":
    main()

"""tools/gpu_check.sh (the one-call GPU check) as a dry run on the CPU EP, and the models it builds."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_runs_every_cnn_step(tmp_path):
    out = tmp_path / "check.txt"
    env = os.environ | {"PROVIDER": "cpu", "RUNS": "2", "CPU_RUNS": "2", "BIG": "0", "PYTHON": "python"}
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    exits = [line for line in text.splitlines() if line.startswith("-> exit")]
    assert exits and all(line.startswith("-> exit 0") for line in exits), exits
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert {"cnn_cuda", "cnn_cuda_fp16", "cnn_cpu", "compress_cnn_la_b1", "compress_cnn_la_b32"} <= set(runs)
    assert runs["cnn_cuda_fp16"]["settings"]["precision"] == "float16"
    assert len({r["model"] for r in runs["cnn_cuda"]["results"]}) == 4  # original, ratio 0.5, latency-aware at batch 1 and 32
    assert "cuda: NOT available" in text  # the reason is recorded where there is no GPU


def test_zoo_resnet50_has_the_published_shape(tmp_path):
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import zoo_models

    from onnx_tucker.io import load_model
    from onnx_tucker.pipeline import factorable_sites

    path = tmp_path / "resnet50.onnx"
    zoo_models.export("resnet50", str(path))
    _, sites = factorable_sites(load_model(path), layers=("kxk", "1x1", "dense"))
    convs = [s for s in sites if s.op == "Conv"]
    assert len(convs) == 53 and sum(s.kind == "conv1x1" for s in convs) == 36
    assert sum(s.shape.macs() for s in sites) == pytest.approx(4.09e9, rel=0.01)  # 4.1 GMACs at 224 px

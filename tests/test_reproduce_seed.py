"""tools/reproduce_seed.py end to end in its fast mode (a subset of the data, two rank fractions)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_seed_fast_mode(tmp_path):
    r = subprocess.run(
        [sys.executable, "tools/reproduce_seed.py", "--fast", "--out-dir", tmp_path,
         "--data", "models/cifar10_test_sample.npz"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 4/8 | seed rule (all but first) | 5 |" in r.stdout
    for name in ("seed_reconstruction.png", "seed_accuracy.png", "seed_results.md"):
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith(".md")
    result = json.loads((tmp_path / "seed_results.json").read_text())
    loss_r1 = result["loss_vs_r1"]
    assert len(loss_r1) == 64 and loss_r1[-1] < 1e-8 * loss_r1[0]  # full rank: exact
    assert all(a >= b - 1e-9 for a, b in zip(loss_r1, loss_r1[1:]))  # loss falls with rank

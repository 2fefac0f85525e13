"""Time ``prune.elimination_order`` against another version of it, on a shipped model's real pruning statistics.

Each unit's consumer moment comes from ``prune.original_moments`` on the CLI's calibration subset (2048 seeded
training images); both versions eliminate every channel, and the script prints per unit the seconds of each, whether
the orders are the same and the largest relative difference of the residuals.

    git show c02350f:onnx_tucker/prune.py > /tmp/prune_old.py
    python tools/elimination_speed.py models/cifar10_vgg11_bn.onnx --old /tmp/prune_old.py
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_tucker import prune as P  # noqa: E402
from onnx_tucker.data import load_calibration  # noqa: E402

DATA = Path(os.environ.get("CIFAR10_DIR", "/work/shared/data/cifar10"))


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("prune_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["prune_other"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--old", required=True, help="another prune.py (e.g. from git show REV:onnx_tucker/prune.py)")
    ap.add_argument("--calibrate", default=str(DATA / "cifar10_train.npz"))
    args = ap.parse_args()
    old = load_module(args.old)
    model = onnx.load(args.model)
    feeds = load_calibration(args.calibrate, model)
    graph = gs.import_onnx(model)
    units = P.find_units(graph, P.infer_shapes(model, None))
    moments = P.original_moments(model, feeds, units)
    nodes = {n.name: n for n in graph.nodes}
    t_old = t_new = 0.0
    for u in units:
        w, b = P._consumer_matrix(nodes[u.consumer])
        weight = np.concatenate([w, b[:, None]], axis=1)
        moment = moments[u.consumer][0]
        t0 = time.perf_counter()
        order_old, residual_old = old.elimination_order(moment, weight, u.taps)
        t1 = time.perf_counter()
        order_new, residual_new = P.elimination_order(moment, weight, u.taps)
        t2 = time.perf_counter()
        t_old, t_new = t_old + t1 - t0, t_new + t2 - t1
        rel = max(abs(a - b) / max(abs(a), 1e-300) for a, b in zip(residual_old, residual_new))
        print(f"{u.consumer[:40]:40s} C={u.channels:4d} taps={u.taps} other {t1 - t0:6.2f} s  this {t2 - t1:6.2f} s  "
              f"same order {order_old == order_new}  residuals max rel diff {rel:.1e}")
    print(f"total: other {t_old:.1f} s, this {t_new:.1f} s, {t_old / max(t_new, 1e-9):.2f}x")


if __name__ == "__main__":
    main()

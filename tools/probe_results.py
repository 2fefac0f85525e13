"""Cheaper measured budgets (issue 15): ``probes="auto"`` against ``probes="all"`` on the CIFAR-10 models.

    python tools/probe_results.py --out docs/probe_results.jsonl

For each model and MAC target: the allocation (ranks per layer), top-1 on the full test set, the number of
whole-model probes and the seconds, with every option probed ("all", the exact curves) and with a few
probes per layer plus refinement ("auto", the default). Calibration: 2048 seeded training images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_tucker import compress  # noqa: E402
from onnx_tucker.data import load_labelled, predict, top1  # noqa: E402

RUNS = [("cifar10_cnn", 0.33), ("cifar10_resnet20", 0.5), ("cifar10_vgg11_bn", 0.5), ("cifar10_resnet", 0.33)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--calib-size", type=int, default=2048)
    parser.add_argument("--models", default=",".join(f"{m}:{t}" for m, t in RUNS))
    parser.add_argument("--modes", default="auto,all")
    parser.add_argument("--out", default=str(ROOT / "docs/probe_results.jsonl"))
    args = parser.parse_args(argv)
    train = np.load(Path(args.data) / "cifar10_train.npz")
    pick = np.random.default_rng(0).choice(len(train["x_train"]), args.calib_size, replace=False)
    images = train["x_train"][pick].astype(np.float32)
    for item in args.models.split(","):
        name, target = item.split(":")
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        feeds, labels = load_labelled(Path(args.data) / "cifar10_test.npz", model)
        base = top1(predict(model, feeds), labels)
        for mode in args.modes.split(","):
            start = time.perf_counter()
            new, report = compress(model, target_macs=float(target), probes=mode,
                                   calibration={model.graph.input[0].name: images})
            seconds = time.perf_counter() - start
            acc = top1(predict(new, feeds), labels)
            row = {"model": name, "target_macs": float(target), "probes_mode": mode, "original_top1": base, "top1": acc,
                   "change_points": round(100 * (acc - base), 2), "macs_reduction": round(report.totals()["macs_reduction"], 3),
                   "probes": report.sensitivity["probes"], "options": report.sensitivity["options"],
                   "curve_seconds": report.sensitivity["seconds"], "seconds": round(seconds, 1),
                   "ranks": {r.layer: list(r.ranks) for r in report.decomposed}}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

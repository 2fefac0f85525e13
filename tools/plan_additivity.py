"""Does a measured budget's plan hold as a whole? The summed per-layer distortion the knapsack minimised against the
compressed model's own KL divergence from the original.

The measured budget (``--target-macs --calibrate``) probes each layer alone and assumes the layers' distortions add
up. This reads a ``--report`` JSON, sums the curve value of each layer's chosen option, and measures the whole
compressed model's KL (and top-1 agreement) against the original on seeded training images (not the ones it was
calibrated on, unless chance picks them). A whole-model KL far above the sum means the layers interact and the
plan is not what the knapsack thought it was; near it, the plan is what the forms can give at that budget.

    onnx-tucker models/cifar10_mobilenetv2.onnx mb.onnx --target-macs 0.5 --layers kxk,1x1 \\
        --calibrate ../shared/data/cifar10/cifar10_train.npz --report mb.json
    python tools/plan_additivity.py models/cifar10_mobilenetv2.onnx mb.onnx mb.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_tucker.data import load_calibration  # noqa: E402


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def logits(path, x, batch=128):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def planned_sum(report: dict) -> float:
    ranks = {layer["layer"]: layer["ranks"] for layer in report["layers"]}
    total = 0.0
    for name, curve in report["sensitivity"]["curves"].items():
        total += max(0.0, next((entry[1] for entry in curve if entry[2] == ranks.get(name)), 0.0))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("compressed")
    ap.add_argument("report", help="the compress run's --report JSON (a measured budget's)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    args = ap.parse_args(argv)
    feeds = load_calibration(Path(args.data) / "cifar10_train.npz", onnx.load(args.original), size=args.images, seed=args.seed)
    x = next(iter(feeds.values()))
    a, b = logits(args.original, x), logits(args.compressed, x)
    la, lb = _log_softmax(a.astype(np.float64)), _log_softmax(b.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=1)))
    result = {"planned_sum": round(planned_sum(json.load(open(args.report))), 4), "whole_model_kl": round(kl, 4),
              "agreement": round(float(np.mean(a.argmax(1) == b.argmax(1))), 4), "images": len(x)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A/B of the residual refit target (``calibrate.RESIDUAL_TARGET``) on the committed CIFAR-10 models.

Each run: ``compress(model, calibration=2048 seeded training images, SETTING)`` with the residual target
off and on, then top-1 on the full CIFAR-10 test set (onnxruntime, CPU). One JSON line per run on stdout
and appended to ``--out``.

    python tools/residual_target_results.py cifar10_resnet20:t0.5 cifar10_resnet:r0.5 cifar10_resnet56:r0.5 \
        cifar10_resnet56:t0.5 cifar10_mobilenetv2:t0.6+1x1 --out docs/residual_target.jsonl

SETTING: ``rX`` for ``--ratio X``, ``tX`` for ``--target-macs X``; ``+1x1`` adds ``--layers kxk,1x1``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_tucker import calibrate, compress  # noqa: E402
from onnx_tucker.data import load_labelled, predict, top1  # noqa: E402


def options(setting: str) -> dict:
    base, _, extra = setting.partition("+")
    opt = {"ratio": float(base[1:])} if base[0] == "r" else {"target_macs": float(base[1:])}
    if extra:
        opt["layers"] = ("kxk", extra)
    return opt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="MODEL:SETTING (MODEL names models/MODEL.onnx)")
    ap.add_argument("--flags", default="0,1", help="residual target off (0) and/or on (1)")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--calib-size", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = Path(args.data)
    train = np.load(data / "cifar10_train.npz")
    pick = np.random.default_rng(0).choice(len(train["x_train"]), args.calib_size, replace=False)  # as calibration_results.py
    cal_x = train["x_train"][pick].astype(np.float32)
    for run in args.runs:
        name, setting = run.split(":")
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        feeds, labels = load_labelled(data / "cifar10_test.npz", model)
        base = top1(predict(model, feeds), labels)
        for flag in (f.strip() == "1" for f in args.flags.split(",")):
            calibrate.RESIDUAL_TARGET = flag
            start = time.perf_counter()
            new, report = compress(model, calibration={model.graph.input[0].name: cal_x}, **options(setting))
            seconds = time.perf_counter() - start
            acc = top1(predict(new, feeds), labels)
            row = {"model": name, "setting": setting, "residual_target": flag, "change": round(100 * (acc - base), 2),
                   "top1": acc, "base": base, "macs": round(report.totals()["macs_reduction"], 3), "seconds": round(seconds, 1),
                   "targets": sum("target" in v for v in report.calibration["layers"].values())}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

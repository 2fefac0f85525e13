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
import os
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tools"))

from cifar_runs import emit, measured_compress, options, seeded_subset  # noqa: E402
from onnx_tucker import calibrate  # noqa: E402
from onnx_tucker.data import load_labelled, predict, top1  # noqa: E402


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
    cal_x = seeded_subset(train["x_train"], 0, args.calib_size)  # as calibration_results.py
    for run in args.runs:
        name, setting = run.split(":")
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        feeds, labels = load_labelled(data / "cifar10_test.npz", model)
        base = top1(predict(model, feeds), labels)
        for flag in (f.strip() == "1" for f in args.flags.split(",")):
            calibrate.RESIDUAL_TARGET = flag
            measured, report = measured_compress(model, {model.graph.input[0].name: cal_x}, feeds, labels, base, **options(setting))
            emit({"model": name, "setting": setting, "residual_target": flag, "change": measured["change"], "top1": measured["top1"],
                  "base": base, "macs": measured["macs"], "seconds": measured["seconds"],
                  "targets": sum("target" in v for v in report.calibration["layers"].values())}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

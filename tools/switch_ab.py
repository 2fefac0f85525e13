"""A/B of one module constant of onnx_tucker on the committed CIFAR-10 models (top-1 on the full test set).

Each run: ``compress(model, calibration=2048 seeded training images (--rng), SETTING)`` once per value of the
constant (``--flags``: 0/1 for a bool, numbers otherwise), then top-1 with onnxruntime. One JSON line per run
on stdout and appended to ``--out``. For experiments: an idea goes behind a constant, this measures it.

    python tools/switch_ab.py calibrate.RESIDUAL_TARGET cifar10_resnet20:t0.5 cifar10_cnn:r0.5 --out rows.jsonl

SETTING as in tools/residual_target_results.py: ``rX`` (--ratio X), ``tX`` (--target-macs X), ``+1x1``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cifar_runs import emit, measured_compress, models_of, options  # noqa: E402


def value_of(current, flag: str):
    """``flag`` as the constant's type: 0/1 for a bool."""
    return flag.strip() == "1" if isinstance(current, bool) else type(current)(float(flag))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("switch", help="MODULE.CONSTANT of onnx_tucker, e.g. calibrate.RESIDUAL_TARGET")
    ap.add_argument("runs", nargs="+", help="MODEL:SETTING (MODEL names models/MODEL.onnx)")
    ap.add_argument("--flags", default="0,1", help="the constant's values, comma-separated")
    ap.add_argument("--rng", type=int, default=0, help="seed of the 2048-image calibration subset")
    ap.add_argument("--probe-images", type=int, default=128)
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    module_name, constant = args.switch.rsplit(".", 1)
    module = importlib.import_module("onnx_tucker." + module_name)
    for name, setting, model, calibration, feeds, labels, base in models_of(args.runs, Path(args.data), args.rng):
        for flag in args.flags.split(","):
            setattr(module, constant, value_of(getattr(module, constant), flag))
            measured, _ = measured_compress(model, calibration, feeds, labels, base,
                                            probe_images=args.probe_images, **options(setting))
            emit({"switch": args.switch, "flag": flag, "model": name, "setting": setting, "rng": args.rng,
                  "change": measured["change"], "macs": measured["macs"], "seconds": measured["seconds"]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure data-aware Tucker against plain Tucker on the committed CIFAR-10 models (issue 6).

    python tools/calibration_results.py                       # full test set, 512 calibration images
    python tools/calibration_results.py --test-limit 2000     # quicker, noisier

Calibration images are a seeded random sample of the *training* file; top-1 is
measured on the *test* file. For each model and setting it compresses plainly
(the seed's method) and with ``calibration=`` (whitened input factor + sequential
least-squares refit, and measured per-layer sensitivity for MAC budgets), and
prints a markdown table (also written to docs/calibration_results.md / .json).
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

SETTINGS = [
    ("ratio 0.5", {"ratio": 0.5}),
    ("MACs <= 1/2", {"target_macs": 0.5}),
    ("ratio 0.4", {"ratio": 0.4}),
    ("MACs <= 1/3", {"target_macs": 1 / 3}),
    ("ratio 0.3", {"ratio": 0.3}),
    ("MACs <= 1/5", {"target_macs": 0.2}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/cifar10_cnn.onnx,models/cifar10_cnn_seed1.onnx,models/cifar10_resnet.onnx")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--calib-size", type=int, default=2048)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--settings", default=None, help="comma-separated setting names to run (default: all)")
    parser.add_argument("--refit", default="core", help="comma-separated refit modes to compare (core, last)")
    parser.add_argument("--out", default=str(ROOT / "docs/calibration_results"))
    args = parser.parse_args(argv)

    train = np.load(Path(args.data) / "cifar10_train.npz")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train["x_train"]), args.calib_size, replace=False)
    calibration_images = train["x_train"][pick].astype(np.float32)
    settings = SETTINGS if not args.settings else [s for s in SETTINGS if s[0] in args.settings.split(",")]
    rows = []
    for path in args.models.split(","):
        model = onnx.load(str(ROOT / path))
        feeds, labels = load_labelled(Path(args.data) / "cifar10_test.npz", model, limit=args.test_limit)
        base = top1(predict(model, feeds), labels)
        calibration = {model.graph.input[0].name: calibration_images}
        for name, setting in settings:
            methods = [("plain", {})] + [
                ("calibrated" if mode == "core" else f"calibrated, refit {mode}", {"calibration": calibration, "refit": mode})
                for mode in args.refit.split(",")
            ]
            for method, extra in methods:
                start = time.perf_counter()
                try:
                    new, report = compress(model, **setting, **extra)
                except Exception as exc:  # a setting the model cannot meet is a row, not a crash
                    rows.append({"model": Path(path).stem, "setting": name, "method": method, "error": str(exc)})
                    continue
                seconds = time.perf_counter() - start
                acc = top1(predict(new, feeds), labels)
                t = report.totals()
                row = {
                    "model": Path(path).stem, "setting": name, "method": method, "macs_reduction": t["macs_reduction"],
                    "params_reduction": t["params_reduction"], "top1": acc, "original_top1": base,
                    "change_points": 100 * (acc - base), "seconds": seconds, "samples": int(len(labels)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        f"Top-1 on {rows[0]['samples'] if rows else 0} CIFAR-10 test images; calibration: {args.calib_size} training images (seeded).",
        "",
        "| model | setting | method | conv MACs fewer | top-1 | change (points) | compress time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | - | - | {r['error'][:60]} | - |")
        else:
            lines.append(
                f"| {r['model']} | {r['setting']} | {r['method']} | {r['macs_reduction']:.2f}x | {100 * r['top1']:.2f}% | "
                f"{r['change_points']:+.2f} | {r['seconds']:.1f} |"
            )
    text = "\n".join(lines)
    print(text)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

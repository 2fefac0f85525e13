"""Measure label-free distillation (onnx_tucker.distill) on compressed CIFAR-10 models.

For each run: the calibration inputs the CLI uses (``load_calibration``, 2048 seeded x_train images),
``distill`` with the given settings, then top-1 on the full CIFAR-10 test set (onnxruntime, CPU) of the
original, the compressed model before and after. One JSON line per run is appended to ``--out``.

    python tools/distill_results.py ORIGINAL.onnx COMPRESSED.onnx --label cnn_t02 --steps 600 --lr 1e-3 \
        --out docs/distill_results.jsonl [--save OUT.onnx]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_tucker.data import load_calibration, load_labelled, predict, top1  # noqa: E402
from onnx_tucker.distill import (  # noqa: E402
    DEFAULT_BATCH, DEFAULT_FEATURE_WEIGHT, DEFAULT_LR, DEFAULT_MIXUP, DEFAULT_STEPS, DEFAULT_TEMPERATURE, distill, tucker_trainable,
)

DATA = Path(os.environ.get("CIFAR10_DIR", "/work/shared/data/cifar10"))


def outputs(model, test, cache_dir: Path, key: str | None) -> np.ndarray:
    """First output on the test images (cached on disk for unchanged models)."""
    path = cache_dir / (key.replace("/", "_").replace(":", "_") + ".npy") if key else None
    if path is not None and path.exists():
        return np.load(path)
    value = predict(model, test[0], batch_size=250)
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, value)
    return value


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original")
    ap.add_argument("compressed")
    ap.add_argument("--label", required=True)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    ap.add_argument("--feature-weight", type=float, default=DEFAULT_FEATURE_WEIGHT)
    ap.add_argument("--mixup", type=float, default=DEFAULT_MIXUP)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "docs" / "distill_results.jsonl"))
    ap.add_argument("--cache", default="/tmp/distill_outputs_cache", help="test outputs of unchanged models, by path and mtime")
    ap.add_argument("--save", help="write the distilled model here")
    args = ap.parse_args()

    original, compressed = onnx.load(args.original), onnx.load(args.compressed)
    feeds = load_calibration(DATA / "cifar10_train.npz", original, size=args.calib_size, strict_size=False)
    trainable = tucker_trainable(compressed)
    test = load_labelled(DATA / "cifar10_test.npz", original)
    cache = Path(args.cache)

    def key(path):
        return f"{Path(path).resolve()}:{os.path.getmtime(path)}"

    labels = test[1]
    out_orig = outputs(original, test, cache, key(args.original))
    out_before = outputs(compressed, test, cache, key(args.compressed))

    t0 = time.perf_counter()
    result, stats = distill(
        original, compressed, feeds, trainable, steps=args.steps, lr=args.lr, batch_size=args.batch,
        augment=not args.no_augment, holdout=args.holdout, temperature=args.temperature, feature_weight=args.feature_weight, mixup=args.mixup,
        seed=args.seed,
        threads=args.threads, progress=sys.stderr.isatty(),
    )
    wall = time.perf_counter() - t0
    # top-1 of what the step returns (the compressed model itself when the holdout check refused)
    out_after = out_before if not stats["kept"] else outputs(result, test, cache, None)
    acc_orig, acc_before, acc_after = (top1(o, labels) for o in (out_orig, out_before, out_after))
    row = {
        "label": args.label, "original": args.original, "compressed": args.compressed,
        "steps": args.steps, "lr": args.lr, "batch": args.batch, "temperature": args.temperature,
        "feature_weight": args.feature_weight, "mixup": args.mixup, "augment": not args.no_augment, "seed": args.seed, "threads": args.threads, "calib_size": args.calib_size,
        "distill_seconds": round(wall, 1), "top1_original": acc_orig, "top1_before": acc_before, "top1_after": acc_after,
        "drop_before": round(100 * (acc_orig - acc_before), 2), "drop_after": round(100 * (acc_orig - acc_after), 2),
        "test_agreement_before": agreement(out_orig, out_before), "test_agreement_after": agreement(out_orig, out_after),
        "stats": stats,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}))
    print(json.dumps({k: stats[k] for k in ("before", "after", "train_fit", "kept", "check_curve", "train_seconds")}))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if args.save:
        onnx.save(result, args.save)


if __name__ == "__main__":
    main()

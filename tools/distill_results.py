"""Measure label-free distillation (onnx_tucker.distill) on compressed CIFAR-10 models.

For each run: the calibration inputs the CLI uses (``load_calibration``: seeded x_train images,
2048 by default), ``distill`` with the given settings, then top-1 on the full CIFAR-10 test set
(onnxruntime, CPU) of the original, of the compressed model before, of what ``distill`` returns and
of the trained weights even when the holdout check refused them (``keep_worse``; same seeded run).
One JSON line per run is appended to ``--out``; ``--render`` prints the markdown table of a file.

    python tools/distill_results.py ORIGINAL.onnx COMPRESSED.onnx --label "cnn 5x" [--steps N --lr X ...]
    python tools/distill_results.py --render docs/distill_results.jsonl
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
    DEFAULT_BATCH, DEFAULT_FEATURE_WEIGHT, DEFAULT_HOLDOUT, DEFAULT_LR, DEFAULT_RECONSTRUCT_STEPS, DEFAULT_STEPS, DEFAULT_TEMPERATURE, distill,
    tucker_trainable,
)
from onnx_tucker.reconstruct import DEFAULT_BLOCKS  # noqa: E402

DATA = Path(os.environ.get("CIFAR10_DIR", "/work/shared/data/cifar10"))


def outputs(model, test, cache_dir: Path, key: str | None) -> np.ndarray:
    """First output on the test images (cached on disk for unchanged model files)."""
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


def render(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = ("| model | reconstruct steps/chain | steps | lr | batch | T | augment | images (train+holdout) | distill s | top-1 original | before | "
            "after (returned) | trained weights | holdout agreement before -> after | kept |")
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        s = r["stats"]
        trained = "-" if r["top1_trained"] is None else (
            f"{100 * r['top1_trained']:.2f}% ({100 * (r['top1_trained'] - r['top1_original']):+.2f})")
        # the model returned: a run without a global phase (steps 0) has no "after", and "compressed" is the start
        best = ({"distilled": s["after"], "reconstructed": s.get("reconstructed")}.get(s.get("returned", "distilled"))
                or s["after"] or s.get("reconstructed") or s["before"])
        out.append(
            f"| {r['label']} | {r.get('reconstruct_steps', 0)} | {r['steps']} | {r['lr']:g} | {r['batch']} | {r['temperature']:g} | {'yes' if r['augment'] else 'no'} "
            f"| {s['train_samples']}+{s['holdout_samples']} | {r['distill_seconds']:.0f} | {100 * r['top1_original']:.2f}% "
            f"| {100 * r['top1_before']:.2f}% ({100 * (r['top1_before'] - r['top1_original']):+.2f}) "
            f"| {100 * r['top1_after']:.2f}% ({100 * (r['top1_after'] - r['top1_original']):+.2f}) "
            f"| {trained} "
            f"| {100 * s['before']['agreement']:.1f} -> {100 * best['agreement']:.1f} | {s.get('returned', 'yes') if s['kept'] else 'no'} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original", nargs="?")
    ap.add_argument("compressed", nargs="?")
    ap.add_argument("--label")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature-weight", type=float, default=DEFAULT_FEATURE_WEIGHT, help="intermediate-target loss weight")
    ap.add_argument("--reconstruct-steps", type=int, default=DEFAULT_RECONSTRUCT_STEPS, help="per chain; 0: no local reconstruction")
    ap.add_argument("--reconstruct-blocks", type=int, default=DEFAULT_BLOCKS, help="residual blocks in a row reconstructed as one")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (1: best on the shared 2-core VM)")
    ap.add_argument("--calib-size", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "docs" / "distill_results.jsonl"))
    ap.add_argument("--cache", default="/tmp/distill_outputs_cache", help="test outputs of unchanged model files")
    ap.add_argument("--save", help="write the model distill returns here")
    ap.add_argument("--render", metavar="JSONL", help="print the markdown table of a results file and exit")
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    if not (args.original and args.compressed and args.label):
        ap.error("ORIGINAL, COMPRESSED and --label are needed")

    original, compressed = onnx.load(args.original), onnx.load(args.compressed)
    feeds = load_calibration(DATA / "cifar10_train.npz", original, size=args.calib_size, strict_size=False)
    test = load_labelled(DATA / "cifar10_test.npz", original)
    cache = Path(args.cache)

    def key(path):
        return f"{Path(path).resolve()}:{os.path.getmtime(path)}"

    out_orig = outputs(original, test, cache, key(args.original))
    out_before = outputs(compressed, test, cache, key(args.compressed))

    t0 = time.perf_counter()
    trained, stats = distill(
        original, compressed, feeds, tucker_trainable(compressed), steps=args.steps, lr=args.lr, batch_size=args.batch,
        augment=not args.no_augment, holdout=args.holdout, temperature=args.temperature, seed=args.seed,
        threads=args.threads, progress=sys.stderr.isatty(), keep_worse=not args.reconstruct_steps,
        reconstruct_steps=args.reconstruct_steps, reconstruct_blocks=args.reconstruct_blocks, feature_weight=args.feature_weight,
    )
    wall = time.perf_counter() - t0
    if args.reconstruct_steps:  # what distill returns; the refused trained weights are not measured
        returned = trained
        out_after = outputs(trained, test, cache, None) if trained is not compressed else out_before
        out_trained = out_after if stats["returned"] == "distilled" else None
    else:  # keep_worse: the trained weights even where the check refused them (the same seeded run)
        returned = trained if stats["kept"] else compressed
        out_trained = outputs(trained, test, cache, None) if trained is not compressed else out_before
        out_after = out_trained if stats["kept"] else out_before
    labels = test[1]
    row = {
        "label": args.label, "original": args.original, "compressed": args.compressed,
        "steps": args.steps, "lr": args.lr, "batch": args.batch, "temperature": args.temperature,
        "augment": not args.no_augment, "holdout": args.holdout, "seed": args.seed, "threads": args.threads,
        "calib_size": args.calib_size, "distill_seconds": round(wall, 1),
        "load_average": round(os.getloadavg()[0], 2),
        "top1_original": top1(out_orig, labels), "top1_before": top1(out_before, labels),
        "top1_after": top1(out_after, labels), "top1_trained": None if out_trained is None else top1(out_trained, labels),
        "reconstruct_steps": args.reconstruct_steps, "reconstruct_blocks": args.reconstruct_blocks, "feature_weight": args.feature_weight,
        "test_agreement_before": agreement(out_orig, out_before), "test_agreement_after": agreement(out_orig, out_after),
        "test_agreement_trained": None if out_trained is None else agreement(out_orig, out_trained),
        "stats": stats,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}))
    print(json.dumps({k: stats[k] for k in ("before", "after", "train_fit", "kept", "check_curve", "train_seconds")}))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if args.save:
        onnx.save(returned, args.save)


if __name__ == "__main__":
    main()

"""Measure local reconstruction alone (onnx_tucker.reconstruct) on a compressed CIFAR-10 model.

The same inputs and split as ``distill`` (``load_calibration``, 2048 seeded x_train images; a seeded 10 %
held out), each chain (or residual block) fitted to the original's activated output, then top-1 on the
full CIFAR-10 test set of the original, the compressed model and the reconstructed one. Per chain: the
held-out relative error of the activated output before and after. One JSON line per run to ``--out``.

    python tools/reconstruct_results.py ORIGINAL.onnx COMPRESSED.onnx --label "resnet ratio 0.5" [--steps N --lr X --blocks N --no-joint --freeze in]
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
from onnx_tucker.distill import DEFAULT_HOLDOUT, tucker_trainable  # noqa: E402
from onnx_tucker.reconstruct import DEFAULT_BATCH, DEFAULT_BLOCKS, DEFAULT_LR, DEFAULT_STEPS, chains_in, reconstruct  # noqa: E402

DATA = Path(os.environ.get("CIFAR10_DIR", "/work/shared/data/cifar10"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original")
    ap.add_argument("compressed")
    ap.add_argument("--label", required=True)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS, help="residual blocks in a row fitted as one (1: each alone)")
    ap.add_argument("--no-joint", action="store_true", help="one chain at a time, also inside residual blocks")
    ap.add_argument("--freeze", default="", help="factor roles left untrained, comma-separated (in, core, out): which factors the gain needs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reconstruct_results.jsonl"))
    ap.add_argument("--save", help="write the reconstructed model here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    original, compressed = onnx.load(args.original), onnx.load(args.compressed)
    feeds = load_calibration(DATA / "cifar10_train.npz", original, size=args.calib_size, strict_size=False)
    n = len(next(iter(feeds.values())))
    order = np.random.default_rng(args.seed).permutation(n)  # the split distill makes
    n_hold = min(n - 1, max(1, int(round(DEFAULT_HOLDOUT * n))))
    hold, train = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    frozen = [f"_tucker_{role.strip()}_" for role in args.freeze.split(",") if role.strip()]
    trainable = [name for name in tucker_trainable(compressed) if not any(f in name for f in frozen)]
    t0 = time.perf_counter()
    model, stats = reconstruct(original, compressed, chains_in(compressed), {k: v[train] for k, v in feeds.items()},
                               {k: v[hold] for k, v in feeds.items()}, trainable, steps=args.steps,
                               lr=args.lr, batch_size=args.batch, seed=args.seed, threads=args.threads, joint=not args.no_joint, blocks=args.blocks)
    wall = time.perf_counter() - t0
    test = load_labelled(DATA / "cifar10_test.npz", original)
    acc = {name: top1(predict(m, test[0], batch_size=250), test[1]) for name, m in
           (("original", original), ("before", compressed), ("after", model))}
    row = {"label": args.label, "original": args.original, "compressed": args.compressed, "steps": args.steps, "lr": args.lr,
           "batch": args.batch, "joint": not args.no_joint, "blocks": args.blocks, "frozen": args.freeze, "seed": args.seed, "threads": args.threads,
           "calib_size": args.calib_size, "seconds": round(wall, 1), "load_average": round(os.getloadavg()[0], 2),
           **{f"top1_{k}": v for k, v in acc.items()}, "stats": stats}
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}))
    for r in stats["chains"]:
        print(json.dumps(r))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if args.save:
        onnx.save(model, args.save)


if __name__ == "__main__":
    main()

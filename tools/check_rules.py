"""What the distill holdout check sees against what the test set says, to judge its acceptance rules.

For one compressed CIFAR-10 model: the local reconstruction, returned whatever the check says, then the global phase
from it (``keep_worse``); for the compressed, reconstructed and distilled models the held-out agreement / KL with the
original (what ``distill`` decides on) and the top-1 change on the full test set. One JSON line per run on stdout and
appended to ``--out``. Defaults as ``distill``'s (2048 seeded training images, 10 % held out, one thread).

    python tools/check_rules.py models/cifar10_resnet.onnx C.onnx --out docs/check_rules.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cifar_runs import emit, load_labelled, predict, top1  # noqa: E402


def main(argv=None) -> int:
    import torch

    import onnx_tucker.distill as distill_module
    from onnx_tucker.data import load_calibration
    from onnx_tucker.reconstruct import chains_in

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("compressed")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    original, compressed = onnx.load(args.original), onnx.load(args.compressed)
    feeds, labels = load_labelled(Path(args.data) / "cifar10_test.npz", original)
    base = top1(predict(original, feeds), labels)
    calibration = load_calibration(Path(args.data) / "cifar10_train.npz", original, size=2048)
    trainable = list(dict.fromkeys(t for c in chains_in(compressed) for t in c.trainable()))

    def change(model) -> float:
        return round(100 * (top1(predict(model, feeds), labels) - base), 2)

    rules = distill_module._reconstruction_passes
    distill_module._reconstruction_passes = lambda m, before: m is not None  # return the reconstruction whatever the check says
    try:
        reconstructed, stats = distill_module.distill(original, compressed, calibration, trainable, steps=0, threads=1, progress=False)
    finally:
        distill_module._reconstruction_passes = rules
    distilled, global_stats = distill_module.distill(original, reconstructed, calibration, trainable, reconstruct_steps=0, threads=1,
                                                     progress=False, keep_worse=True)
    emit({"original": args.original, "compressed": args.compressed,
          "test_compressed": change(compressed), "test_reconstructed": change(reconstructed), "test_distilled": change(distilled),
          "hold_compressed": stats["before"], "hold_reconstructed": stats["reconstructed"], "hold_distilled": global_stats["after"]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

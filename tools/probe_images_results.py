"""Top-1 of a measured budget against the number of probe images, on several calibration subsets.

The measured budget probes each rank option on 128 held-out calibration images by default
(``--probe-images``). Each run: 2048 training images drawn by a seeded generator (or the CLI's own subset),
then ``compress(model, calibration, target_macs=T, probe_images=N)``, then top-1 on the full CIFAR-10 test
set. One JSON line per run on stdout and appended to ``--out``.

    python tools/probe_images_results.py --model cifar10_resnet20 --target-macs 0.5 --evals 128,512 \\
        --subsets 0,cli,1,2 --out docs/probe_images.jsonl
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

from cifar_runs import emit, measured_compress, seeded_subset  # noqa: E402
from onnx_tucker.data import load_calibration, load_labelled, predict, top1  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar10_resnet20", help="models/MODEL.onnx")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--evals", default="128,512", help="probe image counts")
    ap.add_argument("--subsets", default="0,cli,1,2", help="generator seeds of the 2048-image subsets, or 'cli'")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = Path(args.data)
    model = onnx.load(str(ROOT / "models" / f"{args.model}.onnx"))
    name = model.graph.input[0].name
    feeds, labels = load_labelled(data / "cifar10_test.npz", model)
    base = top1(predict(model, feeds), labels)
    x = np.load(data / "cifar10_train.npz")["x_train"]
    subsets = {}
    for key in args.subsets.split(","):
        if key == "cli":
            subsets[key] = load_calibration(data / "cifar10_train.npz", model)
        else:
            subsets[f"rng {key}"] = {name: seeded_subset(x, int(key))}
    for evals in (int(e) for e in args.evals.split(",")):
        for key, calibration in subsets.items():
            measured, _ = measured_compress(model, calibration, feeds, labels, base, target_macs=args.target_macs, probe_images=evals)
            emit({"model": args.model, "target_macs": args.target_macs, "eval_samples": evals, "subset": key,
                  "change": measured["change"], "seconds": measured["seconds"]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

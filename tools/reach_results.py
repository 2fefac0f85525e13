"""Measurements for the reach issue (11): which layers, which forms, on the committed CIFAR-10 models.

    python tools/reach_results.py --only ratio05            # --ratio 0.5 on every model in models/
    python tools/reach_results.py --only dense,mbv2,twoconv  # the calibrated budgets

Calibration: a seeded sample of 2048 *training* images; top-1 on the full *test* file. Each row is
printed as JSON and appended to ``--out`` (docs/reach_results.jsonl).
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

MODELS = ["cifar10_cnn", "cifar10_cnn_seed1", "cifar10_resnet", "cifar10_resnet20", "cifar10_vgg11_bn", "cifar10_mobilenetv2"]


def runs(only):
    """(group, model, label, compress options, needs calibration)."""
    out = []
    if "ratio05" in only:
        out += [("ratio05", m, "--ratio 0.5", {"ratio": 0.5}, False) for m in MODELS]
    if "dense" in only:
        for layers in (("kxk",), ("kxk", "dense")):
            out.append(("dense", "cifar10_cnn", f"--target-macs 0.33 --calibrate --layers {','.join(layers)}",
                        {"target_macs": 0.33, "layers": layers}, True))
    if "mbv2" in only:
        for layers in (("kxk", "1x1"),):
            out.append(("mbv2", "cifar10_mobilenetv2", f"--target-macs 0.6 --calibrate --layers {','.join(layers)}",
                        {"target_macs": 0.6, "layers": layers}, True))
    if "twoconv" in only:
        for model in ("cifar10_resnet20", "cifar10_vgg11_bn"):
            for two in (True, False):
                out.append(("twoconv", model, f"--target-macs 0.5 --calibrate (two-conv shapes {'offered' if two else 'not offered'})",
                            {"target_macs": 0.5, "_two_conv": two}, True))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="ratio05,dense,mbv2,twoconv")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--calib-size", type=int, default=2048)
    parser.add_argument("--out", default=str(ROOT / "docs/reach_results.jsonl"))
    args = parser.parse_args(argv)
    from onnx_tucker.forms import tucker2 as tucker2_form

    offered = tucker2_form.TWO_CONV_FRACTIONS
    train = np.load(Path(args.data) / "cifar10_train.npz")
    pick = np.random.default_rng(0).choice(len(train["x_train"]), args.calib_size, replace=False)
    images = train["x_train"][pick].astype(np.float32)
    for group, name, label, options, calibrated in runs(args.only.split(",")):
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        feeds, labels = load_labelled(Path(args.data) / "cifar10_test.npz", model)
        base = top1(predict(model, feeds), labels)
        options = dict(options)
        tucker2_form.TWO_CONV_FRACTIONS = offered if options.pop("_two_conv", True) else ()
        if calibrated:
            options["calibration"] = {model.graph.input[0].name: images}
        start = time.perf_counter()
        try:
            new, report = compress(model, **options)
        except Exception as exc:  # a setting a model cannot meet is a row
            row = {"group": group, "model": name, "setting": label, "error": str(exc)}
        else:
            seconds = time.perf_counter() - start
            acc = top1(predict(new, feeds), labels)
            t = report.totals()
            row = {"group": group, "model": name, "setting": label, "original_top1": base, "top1": acc,
                   "change_points": round(100 * (acc - base), 2), "macs_reduction": round(t["macs_reduction"], 3),
                   "params_reduction": round(t["params_reduction"], 3), "seconds": round(seconds, 1),
                   "decomposed": {r.layer: [r.form, list(r.ranks), r.layout] for r in report.decomposed},
                   "samples": int(len(labels))}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    tucker2_form.TWO_CONV_FRACTIONS = offered
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

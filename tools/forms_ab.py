"""Top-1 of the committed CIFAR-10 models compressed with each set of factorizations (``forms=``), same calibration.

Each run: ``compress(model, calibration=2048 seeded training images (--rng), SETTING, forms=F)`` for every F of
``--forms`` (slash-separated; ``default`` = the tool's default forms), then top-1 on the full test set with
onnxruntime. One JSON line per run on stdout and appended to ``--out``.

    python tools/forms_ab.py cifar10_resnet20:t0.5 cifar10_resnet:r0.5 --forms default/spatial/tucker2,spatial \
        --out docs/spatial_forms.jsonl

SETTING as in tools/switch_ab.py: ``rX`` (--ratio X), ``tX`` (--target-macs X), ``+1x1`` (also 1x1 convs).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cifar_runs import emit, measured_compress, models_of, options  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="MODEL:SETTING (MODEL names models/MODEL.onnx)")
    ap.add_argument("--forms", default="default/spatial", help="slash-separated sets of comma-separated form names")
    ap.add_argument("--rng", type=int, default=0, help="seed of the 2048-image calibration subset")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--probes", default="auto", choices=("auto", "all"), help="the measured budget's probes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name, setting, model, calibration, feeds, labels, base in models_of(args.runs, Path(args.data), args.rng):
        for forms in args.forms.split("/"):
            kwargs = options(setting) | {"probes": args.probes}
            if forms != "default":
                kwargs["forms"] = tuple(forms.split(","))
                if "layers" in kwargs:  # +1x1: the 1x1 convs keep their SVD form
                    kwargs["forms"] += ("svd",)
            measured, report = measured_compress(model, calibration, feeds, labels, base, **kwargs)
            chosen = sorted({c.form for c in report.chains})
            emit({"forms": forms, "model": name, "setting": setting, "rng": args.rng, "probes": args.probes, "change": measured["change"],
                  "macs": measured["macs"], "seconds": measured["seconds"], "chain_forms": chosen,
                  "spatial_chains": sum(c.form == "spatial" for c in report.chains), "chains": len(report.chains)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

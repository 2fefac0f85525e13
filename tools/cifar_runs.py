"""What the CIFAR-10 result tools share: a run's settings, its calibration subset, one measured compress, its row.

    from cifar_runs import options, seeded_subset, measured_compress, emit, models_of
"""
from __future__ import annotations

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


FORM_TOKENS = {"spatial": ("spatial",), "both": ("tucker2", "spatial")}


def options(setting: str) -> dict:
    """``rX`` -> ``--ratio X``, ``tX`` -> ``--target-macs X``; ``+1x1`` adds ``--layers kxk,1x1``, ``+hidden`` gives
    ``--layers hidden``; ``+spatial``
    gives ``--forms spatial`` and ``+both`` ``--forms tucker2,spatial`` (with ``+1x1`` the 1x1 convs keep SVD);
    ``+hybridS`` gives ``--layers hidden,kxk --prune-share S`` (pruning and rank cuts in one budget)."""
    base, *extras = setting.split("+")
    opt = {"ratio": float(base[1:])} if base[0] == "r" else {"target_macs": float(base[1:])}
    for extra in extras:
        if extra in FORM_TOKENS:
            opt["forms"] = FORM_TOKENS[extra]
        elif extra == "hidden":  # --layers hidden (pruning), alone: a budget is not shared with other kinds
            opt["layers"] = ("hidden",)
        elif extra.startswith("hybrid"):
            opt["layers"], opt["prune_share"] = ("hidden", "kxk"), float(extra[len("hybrid"):])
        else:
            opt["layers"] = ("kxk", extra)
    if "forms" in opt and "layers" in opt:
        opt["forms"] += ("svd",)
    return opt


def seeded_subset(x: np.ndarray, seed: int, size: int = 2048) -> np.ndarray:
    """``size`` training images drawn by ``default_rng(seed)``, as float32 (the tools' calibration subsets)."""
    return x[np.random.default_rng(seed).choice(len(x), size, replace=False)].astype(np.float32)


def models_of(runs: list[str], data: Path, rng: int):
    """For each ``MODEL:SETTING`` (MODEL names models/MODEL.onnx): (name, setting, model, calibration feeds from
    the ``rng`` subset of the training file, test feeds, test labels, the original's top-1)."""
    cal_x = seeded_subset(np.load(data / "cifar10_train.npz")["x_train"], rng)
    for run in runs:
        name, setting = run.split(":")
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        feeds, labels = load_labelled(data / "cifar10_test.npz", model)
        yield name, setting, model, {model.graph.input[0].name: cal_x}, feeds, labels, top1(predict(model, feeds), labels)


def measured_compress(model, calibration: dict, feeds, labels, base: float, **kwargs) -> tuple[dict, object]:
    """``compress(model, calibration=..., **kwargs)``, then top-1 on ``feeds``: ({change, top1, macs, seconds}, report)."""
    start = time.perf_counter()
    new, report = compress(model, calibration=calibration, **kwargs)
    seconds = time.perf_counter() - start
    acc = top1(predict(new, feeds), labels)
    return {"change": round(100 * (acc - base), 2), "top1": acc, "macs": round(report.totals()["macs_reduction"], 3),
            "seconds": round(seconds, 1)}, report


def emit(row: dict, out: str | None) -> None:
    """One JSON line on stdout, and appended to ``out`` when given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")

"""A/B a module constant in compress: python switch_ab.py MODULE.CONST MODEL:SETTING ... --flags 0,1"""
import argparse, json, sys, time, importlib
from pathlib import Path
import numpy as np, onnx
ROOT = Path("/work/main"); sys.path.insert(0, str(ROOT))
from onnx_tucker import compress
from onnx_tucker.data import load_labelled, predict, top1
sys.path.insert(0, str(ROOT / "tools"))
from residual_target_results import options
ap = argparse.ArgumentParser()
ap.add_argument("switch"); ap.add_argument("runs", nargs="+"); ap.add_argument("--flags", default="0,1")
ap.add_argument("--rng", type=int, default=0); ap.add_argument("--out", default="/tmp/d15/ab.jsonl")
ap.add_argument("--probe-images", type=int, default=128)
a = ap.parse_args()
mod, const = a.switch.rsplit(".", 1); mod = importlib.import_module("onnx_tucker." + mod)
data = Path("/work/shared/data/cifar10"); train = np.load(data / "cifar10_train.npz")
pick = np.random.default_rng(a.rng).choice(len(train["x_train"]), 2048, replace=False)
cal_x = train["x_train"][pick].astype(np.float32)
for run in a.runs:
    name, setting = run.split(":")
    model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
    feeds, labels = load_labelled(data / "cifar10_test.npz", model)
    base = top1(predict(model, feeds), labels)
    for flag in a.flags.split(","):
        setattr(mod, const, type(getattr(mod, const))(float(flag)) if not isinstance(getattr(mod, const), bool) else flag == "1")
        t = time.perf_counter()
        new, report = compress(model, calibration={model.graph.input[0].name: cal_x}, probe_images=a.probe_images, **options(setting))
        s = time.perf_counter() - t
        acc = top1(predict(new, feeds), labels)
        errs = {k: (v.get("after"), v.get("before")) for k, v in report.calibration["layers"].items()}
        row = {"switch": a.switch, "flag": flag, "model": name, "setting": setting, "rng": a.rng, "change": round(100 * (acc - base), 2),
               "macs": round(report.totals()["macs_reduction"], 3), "seconds": round(s, 1), "ranks": {k: list(v) for k, v in getattr(report, "ranks", {}).items()} if hasattr(report, "ranks") else None}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")

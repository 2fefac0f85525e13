"""Speed of the tool itself: ``onnx_tucker.compress`` against the plain tensorly route, same run.

For each Keras application (random weights, ``weights=None``, converted once with
``onnx_tucker.convert.keras_to_onnx`` and cached), two fresh child processes are timed:

- tool:  ``io.load_model`` -> ``compress(model, ratio)`` -> ``io.save_model`` (no self-check);
- plain: what a user would write: ``onnx.load``, then for every conv weight the tool
  decomposes, tensorly ``partial_tucker(W, rank=[R_out, R_in], modes=[0, 1])`` with its
  default settings (n_iter_max=100, init='svd', tol=1e-4), layer by layer. No graph is
  rewritten, so this route is timed doing strictly less work than the tool.

Each child reports wall and CPU time (``time.process_time``) per phase, the 1-minute load
average around its run (on a shared machine wall time is inflated; CPU time much less),
its peak RSS (``getrusage``) and its RSS before the model is loaded; the parent reports the total reconstruction error of both routes
(sqrt(sum ||W - W'||^2) / sqrt(sum ||W||^2) over the decomposed layers).

    python tools/bench_tool.py                      # ResNet50 and VGG16, 224x224, ratio 0.5
    python tools/bench_tool.py --models ResNet50 --json out/bench_tool.json

TensorFlow is only imported in the conversion child; the timed children never import it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "onnx-tucker-bench-models"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- children ---------------------------------------------------------------------------------


def child_convert(name: str, size: int, path: Path, top: bool = True) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import onnx

    from onnx_tucker.convert import keras_to_onnx

    keras.utils.set_random_seed(0)
    kwargs = {} if top else {"include_top": False, "pooling": "avg"}
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), **kwargs)
    onnx_model = keras_to_onnx(model)
    tmp = path.with_suffix(".tmp")
    onnx.save(onnx_model, str(tmp))
    os.replace(tmp, path)


def child_tool(path: Path, ratio: float, out: Path) -> dict:
    from onnx_tucker.io import load_model, save_model
    from onnx_tucker.pipeline import compress

    base = rss_mb()
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_model(path)
    t1, c1 = time.perf_counter(), time.process_time()
    new_model, report = compress(model, ratio=ratio)
    t2, c2 = time.perf_counter(), time.process_time()
    save_model(new_model, out)
    t3, c3 = time.perf_counter(), time.process_time()
    layers = {r.layer: {"ranks": list(r.ranks), "relative_error": r.relative_error} for r in report.layers if r.decomposed}
    return {
        "load_s": t1 - t0, "compress_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
        "load_cpu_s": c1 - c0, "compress_cpu_s": c2 - c1, "save_cpu_s": c3 - c2,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "rss_before_mb": base, "peak_rss_mb": peak_rss_mb(), "layers": layers,
        "macs_reduction": report.totals()["macs_reduction"],
    }


def child_plain(path: Path, layers: dict) -> dict:
    """The plain route: tensorly partial_tucker, defaults, on each weight the tool decomposed."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    from onnx_tucker.decompose import reconstruct
    from onnx_tucker.site import find_sites

    base = rss_mb()
    t0 = time.perf_counter()
    model = onnx.load(str(path))
    graph = gs.import_onnx(model)
    weights = {s.name: s.weight for s in find_sites(graph) if s.name in layers}
    t1, c1 = time.perf_counter(), time.process_time()
    results = {}
    tl.set_backend("numpy")
    for name, w in weights.items():
        r_out, r_in = layers[name]["ranks"]
        (core, (u_out, u_in)), errors = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1])
        results[name] = (core, u_out, u_in, len(errors))
    t2, c2 = time.perf_counter(), time.process_time()
    out = {}
    for name, (core, u_out, u_in, iters) in results.items():
        w = weights[name].astype(np.float64)
        approx = reconstruct(u_in.T.astype(np.float64), core.astype(np.float64), u_out.astype(np.float64))
        out[name] = {"sq_error": float(np.sum((w - approx) ** 2)), "sq_norm": float(np.sum(w * w)), "iterations": iters}
    return {"load_s": t1 - t0, "decompose_s": t2 - t1, "decompose_cpu_s": c2 - c1, "rss_before_mb": base, "peak_rss_mb": peak_rss_mb(), "layers": out}


def run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}


# --- parent -----------------------------------------------------------------------------------


def bench(name: str, size: int, ratio: float, cache: Path, repeats: int, top: bool = True) -> dict:
    path = cache / f"{name}_{size}{'' if top else '_notop'}.onnx"
    if not path.is_file():
        t = time.perf_counter()
        print(f"[{name}] converting (cached at {path}) ...", file=sys.stderr, flush=True)
        run_child("--child", "convert", name, str(size), str(path), "top" if top else "notop")
        print(f"[{name}] converted in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    out = path.with_name(f"{path.stem}_r{ratio}.onnx")
    tool_runs = [run_child("--child", "tool", str(path), str(ratio), str(out)) for _ in range(repeats)]
    tool = min(tool_runs, key=lambda r: r["compress_s"])
    plain = run_child("--child", "plain", str(path), json.dumps({k: {"ranks": v["ranks"]} for k, v in tool["layers"].items()}))
    sq_norm = sum(v["sq_norm"] for v in plain["layers"].values())
    if not sq_norm:  # no layer decomposed (MobileNet at 32 px): nothing to compare the two routes on
        sys.exit(f"{name}: no layer was decomposed at ratio {ratio}: nothing to compare (choose another model or size)")
    tool_sq = sum(tool["layers"][k]["relative_error"] ** 2 * plain["layers"][k]["sq_norm"] for k in plain["layers"])
    plain_sq = sum(v["sq_error"] for v in plain["layers"].values())
    file_mb = path.stat().st_size / 2**20
    result = {
        "model": name, "include_top": top, "input": [1, 3, size, size], "ratio": ratio, "file_mb": round(file_mb, 1),
        "decomposed_layers": len(tool["layers"]),
        "tool": {
            "compress_s": round(tool["compress_s"], 2), "compress_s_all_runs": [round(r["compress_s"], 2) for r in tool_runs],
            "compress_cpu_s": round(tool["compress_cpu_s"], 2),
            "compress_cpu_s_all_runs": [round(r["compress_cpu_s"], 2) for r in tool_runs],
            "load_cpu_s": round(tool["load_cpu_s"], 2), "save_cpu_s": round(tool["save_cpu_s"], 2),
            "loadavg_1min_during": [[round(x, 2) for x in r["loadavg_1min"]] for r in tool_runs],
            "load_s": round(tool["load_s"], 2), "save_s": round(tool["save_s"], 2),
            "peak_rss_mb": round(tool["peak_rss_mb"]), "rss_before_load_mb": round(tool["rss_before_mb"]),
            "peak_over_file": round((tool["peak_rss_mb"] - tool["rss_before_mb"]) / file_mb, 2),
            "total_relative_error": (tool_sq / sq_norm) ** 0.5, "macs_reduction": round(tool["macs_reduction"], 3),
        },
        "plain_tensorly": {
            "decompose_s": round(plain["decompose_s"], 2), "decompose_cpu_s": round(plain["decompose_cpu_s"], 2),
            "load_s": round(plain["load_s"], 2),
            "peak_rss_mb": round(plain["peak_rss_mb"]), "rss_before_load_mb": round(plain["rss_before_mb"]),
            "total_relative_error": (plain_sq / sq_norm) ** 0.5,
            "iterations": sorted({v["iterations"] for v in plain["layers"].values()}),
        },
    }
    result["speedup"] = round(plain["decompose_s"] / tool["compress_s"], 2)
    result["speedup_cpu"] = round(plain["decompose_cpu_s"] / tool["compress_cpu_s"], 2)
    result["tool_error_not_higher"] = result["tool"]["total_relative_error"] <= result["plain_tensorly"]["total_relative_error"]
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        kind, rest = argv[1], argv[2:]
        if kind == "convert":
            child_convert(rest[0], int(rest[1]), Path(rest[2]), top=rest[3] == "top")
            print("{}")
        elif kind == "tool":
            print(json.dumps(child_tool(Path(rest[0]), float(rest[1]), Path(rest[2]))))
        elif kind == "plain":
            print(json.dumps(child_plain(Path(rest[0]), json.loads(rest[1]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="ResNet50,VGG16", help="comma-separated keras.applications names")
    p.add_argument("--size", type=int, default=224, help="input height/width (default 224)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2, help="tool runs per model; the fastest is reported (default 2)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"converted models (default {DEFAULT_CACHE})")
    p.add_argument("--no-top", action="store_true", help="include_top=False, pooling='avg': the conv layers only "
                   "(VGG16's 124M-parameter classifier makes the file 4x larger and its tf2onnx conversion needs ~8 GB)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "loadavg_start": os.getloadavg()},
        "results": [],
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench(name, args.size, args.ratio, args.cache, args.repeats, top=not args.no_top)
        results["results"].append(r)
        t, pl = r["tool"], r["plain_tensorly"]
        print(
            f"{name}: tool compress {t['compress_s']:.2f} s wall / {t['compress_cpu_s']:.2f} s CPU "
            f"(load {t['load_s']:.2f}, save {t['save_s']:.2f}; 1-min load average {t['loadavg_1min_during']}), "
            f"peak RSS {t['peak_rss_mb']} MB ({t['peak_over_file']}x the {r['file_mb']} MB file above the "
            f"{t['rss_before_load_mb']} MB start), error {t['total_relative_error']:.6f} | plain tensorly "
            f"{pl['decompose_s']:.2f} s wall / {pl['decompose_cpu_s']:.2f} s CPU, error {pl['total_relative_error']:.6f}, iterations {pl['iterations']} | "
            f"{r['speedup']}x faster ({r['speedup_cpu']}x in CPU time), error not higher: {r['tool_error_not_higher']}",
            flush=True,
        )
        results["machine"]["loadavg_end"] = os.getloadavg()
        if args.json:  # after each model, so a later failure keeps the earlier results
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``onnx-tucker sweep``: compress at several settings and put MACs, size, top-1 and latency side by side.

For each setting (a rank ratio, or a whole-model MAC target) the model is compressed with
:func:`onnx_tucker.pipeline.compress` (data-aware with ``calibration`` feeds, which must come from
training data), its top-1 is measured on labelled *test* data, and all models, the original
included, are timed together on onnxruntime's CPU EP, interleaved (``onnx_tucker.bench``).

JSON written to ``sweep.json`` (``schema: "onnx-tucker.sweep/1"``)::

    {"schema", "tool_version", "onnxruntime_version", "model", "data", "samples",
     "calibration": null or {"file", "samples"},
     "settings": {"threads", "runs", "warmup", "batches", "rank_multiple"},
     "original": {"file", "conv_macs", "conv_params", "params", "top1",
                  "latency": {batch: {"median_ms", "p90_ms", ...}}},
     "results": [{"setting", "kind": "ratio"|"target", "value", "file", "error": null or a message,
                  "conv_macs", "conv_params", "params", "macs_reduction", "params_reduction",
                  "decomposed", "ranks": {layer: [R_out, R_in]}, "top1", "top1_change", "agreement",
                  "latency": {batch: {"median_ms", ..., "speedup": {"median", "p10", "p90", ...}}}}]}
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker import __version__
from onnx_tucker.errors import ModelError, OnnxTuckerError, UsageError
from onnx_tucker.graph import from_bytes

SCHEMA = "onnx-tucker.sweep/1"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)


@dataclass
class SweepConfig:
    model: Path
    data: Path
    ratios: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    calibrate: Path | None = None
    calib_size: int | None = None  # None: up to DEFAULT_CALIB_SIZE, fewer if the file has fewer
    out_dir: Path = Path("sweep")
    data_limit: int | None = None
    threads: int = 2
    batches: tuple = (1, 32)
    runs: int = 30
    warmup: int = 5
    rank_multiple: int | str = 1  # "auto": measured once (onnx_tucker.latency_table.resolve_multiple), used by every setting
    multiple_at: dict = field(default_factory=dict)  # with "auto": {"provider", "batch", "table"} (options.MultipleArgs)
    progress: bool = True
    ray: str | None = None  # "auto" or a cluster address: each setting's compress is a Ray task (onnx_tucker.fanout)
    layers: tuple | None = None  # --layers kinds (kxk, 1x1, dense); None: compress's default
    prune_share: float | str | None = None  # --prune-share with --layers hidden,KIND and --targets (onnx_tucker.hybrid)
    images: dict = field(default_factory=dict)  # --calibrate DIR: image_scale, image_mean, image_std (data.load_calibration)


def parse_fractions(text: str, what: str) -> list[float]:
    """Comma-separated numbers in (0, 1], deduplicated, in the given order (``options.check_fraction_list``)."""
    from onnx_tucker.options import check_fraction_list

    return check_fraction_list(text, what)


def _short(value: float, values: list) -> str:
    """``value`` with the fewest significant digits (at least {:g}'s six) that no other of ``values`` shares."""
    for digits in range(6, 18):
        text = f"{value:.{digits}g}"
        if all(f"{other:.{digits}g}" != text for other in values if other != value):
            return text
    return repr(value)


def settings_of(config: SweepConfig) -> list[tuple[str, str, float]]:
    """(label, kind, value) for each setting."""
    if config.ratios and config.targets:
        raise UsageError("give either --ratios or --targets, not both")
    if config.targets:
        if importlib.util.find_spec("onnx_tucker.budget") is None:
            raise UsageError("--targets needs the MAC budget (onnx_tucker.budget), which this version does not have yet; use --ratios")
        return [(f"target {_short(t, config.targets)}", "target", t) for t in config.targets]
    ratios = config.ratios or DEFAULT_RATIOS
    return [(f"ratio {_short(r, ratios)}", "ratio", r) for r in ratios]  # labels as distinct as the values


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant tensor: the model's stored parameters."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    total += math.prod(a.t.dims)
    return int(total)


def prepare_out_dir(out_dir: Path, outputs=None) -> Path:
    """Create ``--out-dir``; with ``outputs`` (staged outputs), a folder created here is removed again if they are."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir is a file, not a folder: {out_dir}")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--out-dir: parent folder does not exist: {out_dir.parent}")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out-dir: cannot create {out_dir}: {exc.strerror}") from None
    if created and outputs is not None:
        outputs.remove_if_discarded(out_dir)
    return out_dir


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="setting", file=sys.stderr, disable=None if enabled else True, leave=False)


def run_sweep(config: SweepConfig, outputs=None) -> dict:
    """Compress at every setting, measure, and return the JSON-ready result (see module docstring).

    ``outputs``: an :class:`onnx_tucker.outputs.Outputs` the compressed models are staged in (timed from there), so
    that they land with the tables at its commit, or not at all; without it each is written at once."""
    from onnx_tucker.providers import onnxruntime

    ort = onnxruntime()

    from onnx_tucker.data import MIN_CALIB_SAMPLES, load_calibration, load_labelled, predict, top1
    from onnx_tucker.options import DEFAULT_CALIB_SIZE
    from onnx_tucker.io import check_output_path, load_model, save_model
    from onnx_tucker.outputs import check_paths

    settings = settings_of(config)
    if config.threads < 1 or config.runs < 1 or config.warmup < 0:
        raise UsageError("--threads and --runs must be positive, --warmup >= 0")
    model = load_model(config.model)
    from onnx_tucker.bench import check_batch_memory, check_fixed_batch, check_latency_batch_memory

    check_fixed_batch(model, config.model, config.batches)
    check_batch_memory(model, list(config.batches))
    if config.rank_multiple == "auto":
        from onnx_tucker.capture import timing_batch

        config.multiple_at = {**config.multiple_at, "batch": timing_batch(config.multiple_at.get("batch"), model)}
        check_latency_batch_memory(model, config.multiple_at["batch"])
    out_dir = prepare_out_dir(config.out_dir, outputs)
    # the shortest name that tells the values apart ({:g} gave 0.1234567 and 0.1234568 one file and a confusing refusal)
    model_files = {(kind, value): out_dir / f"{config.model.stem}_{kind}{_short(value, [v for _, k, v in settings if k == kind])}.onnx"
                   for _, kind, value in settings}
    check_paths(reads={"the input model": config.model, "--data": config.data, "--calibrate": config.calibrate},
                writes={"--out-dir file": [out_dir / n for n in ("sweep.md", "sweep.json", "sweep.png")] + list(model_files.values()),
                        "--latency-table": config.multiple_at.get("table")},
                may_write={"--out-dir data file": [p.parent / (p.name + ".data") for p in model_files.values()]})
    feeds, labels = load_labelled(config.data, model, limit=config.data_limit)
    from onnx_tucker.runtime import shapes_of_arrays

    input_shapes = shapes_of_arrays(model, feeds)  # a dynamic model's MACs at the size of the --data images
    calibration = None
    if config.calibrate is not None:
        if Path(config.calibrate).resolve() == Path(config.data).resolve():
            raise UsageError("--calibrate and --data are the same file: calibrate on training data, measure on test data")
        size = config.calib_size or DEFAULT_CALIB_SIZE
        calibration = load_calibration(config.calibrate, model, size=size, strict_size=False, min_samples=MIN_CALIB_SAMPLES,
                                       input_shapes=input_shapes, **config.images)  # a folder: decoded once, for every setting
        got = len(next(iter(calibration.values())))
        if got < size:
            print(f"onnx-tucker: notice: {config.calibrate} holds {got} calibration samples, fewer than the {size} asked for: "
                  f"using all {got}", file=sys.stderr)  # as compress says it (CalibrationArgs.parse)
    rank_multiple, auto = config.rank_multiple, None
    if rank_multiple == "auto":  # once, here: every setting (and every Ray worker) uses the same measured multiple
        from onnx_tucker.latency_table import resolve_multiple
        from onnx_tucker.pipeline import factorable_sites

        _, sites = factorable_sites(model, layers=config.layers)
        at = {"provider": "cpu", "batch": 1, "table": None} | config.multiple_at
        auto = resolve_multiple([s for s in sites if s.eligible], at["provider"], at["batch"], at["table"])
        rank_multiple = auto["multiple"]
        print(f"note: --rank-multiple auto: {rank_multiple} on {auto['provider']}, batch {auto['batch']}", file=sys.stderr)
    reference = predict(model, feeds)
    original = {
        "file": str(config.model), "conv_macs": None, "conv_params": None, "params": count_params(model),
        "top1": top1(reference, labels), "latency": {},
    }
    results, staged = [], {}
    if config.ray is not None:  # every setting's compress as a Ray task; the rest (files, top-1, latency) here
        from onnx_tucker.fanout import cluster, map_tasks

        with cluster(config.ray):
            outcomes = map_tasks(compress_setting, settings, labels=[f"setting {label}" for label, _, _ in settings],
                                 shared={"model": model.SerializeToString(), "calibration": calibration,
                                         "rank_multiple": rank_multiple, "layers": config.layers, "input_shapes": input_shapes,
                                         "prune_share": config.prune_share},
                                 progress=config.progress, desc="sweep (ray)", unit="setting")
    else:
        outcomes = (compress_setting(setting, model, calibration, rank_multiple, config.layers, input_shapes, config.prune_share)
                    for setting in settings)
    bar = _bar(len(settings), "sweep", config.progress and config.ray is None)
    for (label, kind, value), (error, new_model, report) in zip(settings, outcomes):
        bar.set_description(f"sweep {label}")
        row = {"setting": label, "kind": kind, "value": value, "file": None, "error": error}
        if row["error"]:
            results.append(row)
            bar.update()
            continue
        new_model = from_bytes(new_model)
        t = report.totals()
        original["conv_macs"], original["conv_params"] = t["macs_before"], t["params_before"]
        path = check_output_path(config.model, model_files[(kind, value)])
        if outputs is not None:
            staged[str(path)], _ = outputs.save_model(new_model, path, protected=[config.model])
        else:
            save_model(new_model, path, protected=[config.model])
        predicted = predict(new_model, feeds)
        row.update({
            "file": str(path), "conv_macs": t["macs_after"], "conv_params": t["params_after"],
            "params": count_params(new_model), "macs_reduction": t["macs_reduction"],
            "params_reduction": t["params_reduction"], "decomposed": t["decomposed"],
            "ranks": {r.layer: list(r.ranks) for r in report.decomposed},
            "layers": {r.layer: {"op": r.op, "form": r.form, "layout": r.layout, "ranks": list(r.ranks),
                                 "macs": [r.macs_before, r.macs_after], "params": [r.params_before, r.params_after]}
                       for r in report.decomposed},
            "forms": forms_summary(report.decomposed, report.pruning),
            "top1": top1(predicted, labels), "agreement": agreement(reference, predicted),
            "latency": {},
        })
        row["top1_change"] = row["top1"] - original["top1"]
        results.append(row)
        bar.update()
    bar.close()
    if original["conv_macs"] is None:
        raise ModelError("no setting could be compressed: " + "; ".join(sorted({r["error"] for r in results})))
    done = [r for r in results if r["error"] is None]
    paths = [Path(config.model)] + [Path(staged.get(r["file"], r["file"])) for r in done]
    for batch, timings in time_models(paths, model, feeds, config).items():
        original["latency"][str(batch)] = timings[0]
        for row, stats in zip(done, timings[1:]):
            row["latency"][str(batch)] = stats
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "onnxruntime_version": ort.__version__,
        "model": str(config.model),
        "data": str(config.data),
        "samples": int(len(labels)),
        "calibration": None if calibration is None else {
            "file": str(config.calibrate), "samples": int(len(next(iter(calibration.values()))))},
        "settings": {"threads": config.threads, "runs": config.runs, "warmup": config.warmup,
                     "batches": list(config.batches), "rank_multiple": rank_multiple,
                     **({"rank_multiple_auto": auto} if auto else {})},
        "original": original,
        "results": results,
    }


def compress_setting(setting: tuple, model, calibration: dict | None, rank_multiple: int, layers: tuple | None = None,
                     input_shapes: dict | None = None, prune_share=None) -> tuple:
    """One setting's compress: (error or None, new model, report); the model as bytes when given as bytes (a Ray task)."""
    from onnx_tucker.pipeline import compress

    _, kind, value = setting
    as_bytes = isinstance(model, (bytes, bytearray))
    options = {"rank_multiple": rank_multiple}
    if layers is not None:
        options["layers"] = tuple(layers)
    if input_shapes:
        options["input_shapes"] = input_shapes
    if calibration is not None:
        options["calibration"] = calibration
    if kind == "target":
        options["target_macs"] = value
        if prune_share is not None:
            options["prune_share"] = prune_share
    try:
        new_model, report = compress(from_bytes(model), ratio=value if kind == "ratio" else 1.0, **options)
    except ModelError as exc:
        return str(exc), None, None
    if not report.decomposed and not report.pruned_units:  # nothing profitable here: a row that says why
        return (report.notes[-1] if report.notes else "no layer was decomposed"), None, None
    return None, new_model.SerializeToString() if as_bytes else new_model, report




def forms_summary(records: list, pruning: dict | None = None) -> str:
    """"hidden pruned: 3 units (share 0.5), tucker2 1x1 -> 3x3 -> 1x1: 5, svd dense -> dense: 2": the pruned units
    (--layers hidden, with the hybrid's share) and how many layers got each form and layout."""
    parts = []
    if pruning and pruning.get("pruned"):
        share = pruning.get("share")
        parts.append(f"hidden pruned: {pruning['pruned']} units" + ("" if share is None else f" (share {share:g})"))
    counts = {}
    for r in records:
        key = f"{r.form} {r.layout}".strip()
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(parts + [f"{k}: {v}" for k, v in counts.items()])


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)))


def time_models(paths: list[Path], model: onnx.ModelProto, feeds: dict, config: SweepConfig) -> dict[int, list[dict]]:
    """Batch -> per-model latency statistics (and paired speedup over the first), CPU EP, interleaved."""
    from onnx_tucker import bench

    sessions = [bench.open_session(p, "cpu", config.threads, {}) for p in paths]
    out = {}
    total = len(config.batches) * len(paths) * (config.runs + config.warmup)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="latency", unit="run", file=sys.stderr, disable=None if config.progress else True, leave=False)
    for batch in config.batches:
        bar.set_description(f"latency batch {batch}")
        timing_feeds = bench.timing_feeds(model, batch, feeds)
        runners = [bench.bind(s, timing_feeds, "cpu") for s in sessions]
        times = bench.time_interleaved(runners, config.runs, config.warmup, on_run=bar.update)
        rows = []
        for index, seconds in enumerate(times):
            stats = bench.latency_stats(seconds, batch)
            stats["speedup"] = bench.paired_speedup(times[0], seconds) if index else None
            rows.append(stats)
        out[batch] = rows
    bar.close()
    return out


# --- outputs ----------------------------------------------------------------------------------------

def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 path (lone surrogates in Python) shown as ``\\xff``:
    valid UTF-8 for sweep.md, the terminal and the plot, and the byte the file name really holds."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _m(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def markdown_table(result: dict) -> str:
    batches = [str(b) for b in result["settings"]["batches"]]
    headers = ["setting", "conv MACs", "MACs x", "params", "top-1", "change", "agreement", "forms"]
    for b in batches:
        headers += [f"ms b{b}", f"speedup b{b}"]
    o = result["original"]
    rows = [["original", _m(o["conv_macs"]), "1.00x", _m(o["params"]), f"{100 * o['top1']:.2f}%", "-", "-", "-"]
            + sum(([f"{o['latency'][b]['median_ms']:.3f}", "1.00x"] for b in batches), [])]
    for r in result["results"]:
        if r["error"]:
            rows.append([r["setting"]] + ["-"] * (len(headers) - 2) + [f"failed: {r['error']}"[:80]])
            continue
        cells = [r["setting"], _m(r["conv_macs"]), f"{r['macs_reduction']:.2f}x", _m(r["params"]),
                 f"{100 * r['top1']:.2f}%", f"{100 * r['top1_change']:+.2f}", f"{100 * r['agreement']:.1f}%", r.get("forms", "")]
        for b in batches:
            lat = r["latency"][b]
            cells += [f"{lat['median_ms']:.3f}", f"{lat['speedup']['median']:.2f}x"]
        rows.append(cells)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    calib = result["calibration"]
    lines.append("")
    lines.append(
        f"top-1 on {result['samples']} labelled samples of {result['data']}; "
        + (f"calibrated on {calib['samples']} samples of {calib['file']}; " if calib else "no calibration; ")
        + f"latency: onnxruntime {result['onnxruntime_version']} CPU EP, {result['settings']['threads']} threads, "
        f"median of {result['settings']['runs']} interleaved runs; MACs of the convs at batch 1"
    )
    return printable("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    """Two panels: top-1 against conv MACs and against batch-1 latency; the original marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = result["original"]
    done = [r for r in result["results"] if not r["error"]]
    batch = str(result["settings"]["batches"][0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("conv MACs (millions, batch 1)", lambda r: r["conv_macs"] / 1e6),
              (f"CPU latency, batch {batch} (ms, median)", lambda r: r["latency"][batch]["median_ms"])]
    for ax, (xlabel, x_of) in zip(axes, panels):
        pts = sorted(((x_of(r), 100 * r["top1"], r["setting"]) for r in done))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="Tucker-2")
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.plot([x_of(o)], [100 * o["top1"]], "*", color="tab:red", markersize=14, label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{printable(Path(result['model']).name)}: top-1 on {result['samples']} test samples"
                 + (" (calibrated)" if result["calibration"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, outputs) -> dict[str, Path]:
    """sweep.md, sweep.json and sweep.png, staged in ``outputs`` (committed with the models, or discarded with them)."""
    out_dir = Path(out_dir)
    paths = {"md": out_dir / "sweep.md", "json": out_dir / "sweep.json", "png": out_dir / "sweep.png"}
    try:
        outputs.write_text(paths["md"], markdown_table(result) + "\n")
        outputs.write_text(paths["json"], json.dumps(result, indent=2))
        plot(result, outputs.path_for(paths["png"]))
    except OSError as exc:
        raise OnnxTuckerError(f"cannot write the sweep results to {out_dir}: {exc.strerror}") from None
    return paths

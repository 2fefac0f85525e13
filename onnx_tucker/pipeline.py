"""``compress``: the one place that orders the steps (candidates -> ranks -> decompose -> rewrite)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import ThreadpoolController

from onnx_tucker import __version__
from onnx_tucker.decompose import DEFAULT_ITERATIONS, max_ranks, tucker2
from onnx_tucker.errors import ModelError, UsageError, first_line
from onnx_tucker.io import PROTOBUF_LIMIT, load_model
from onnx_tucker.ranks import energy_ranks, ratio_ranks, round_to_multiple, vbmf_ranks
from onnx_tucker.report import LayerRecord, Report
from onnx_tucker.rewrite import export, find_candidates, replace_conv, taken_names, unique_name


@dataclass
class Options:
    ratio: float = 0.5
    force: bool = False
    rank_multiple: int = 1
    n_iter_max: int = DEFAULT_ITERATIONS
    method: str = "eig"
    ranks: dict = field(default_factory=dict)  # layer name -> (R_out, R_in), overrides the rule
    exclude: tuple = ()  # layer names (or 0-based conv indices) to leave as they are
    rank_method: str = "ratio"  # ratio | energy | vbmf
    energy: float = 0.9  # fraction of each mode's spectral energy kept by rank_method="energy"
    target_macs: float | None = None  # whole-model conv MACs at most this fraction of the original
    calibration: dict | None = None  # input name -> array of calibration samples (data-aware mode)
    refit: str | bool = "core"  # with calibration: "core" (core by reduced-rank regression, then last), "last" (1x1 + bias), False: none
    whiten: bool = True  # with calibration: input-covariance-weighted (data-aware) decomposition
    fixed_macs: int = 0  # set by compress: MACs of convs that are never decomposed
    budget_rule: str = "auto"  # with target_macs: auto (measured with calibration, else uniform) | measured | uniform
    latency_aware: bool = False  # leave whole the layers whose chain is measured slower (CPU EP)
    latency_batch: int = 1


def check_ratio(ratio) -> float:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise UsageError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0) or not np.isfinite(value):
        raise UsageError(f"ratio must be in (0, 1], got {ratio}")
    return value


def _shape_skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """``model`` without float initializers over ``keep_bytes``, each listed as a graph input of its type and shape."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    listed = {i.name for i in model.graph.input}
    integer = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    for init in model.graph.initializer:
        if init.data_type in integer or init.ByteSize() <= keep_bytes:
            graph.initializer.append(init)
        elif init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name -> shape (ints where known, batch taken as 1) from ONNX shape inference.

    Inference runs on a skeleton without the large weights (they become typed graph inputs):
    it would otherwise serialise and copy every weight twice (issue 5: peak memory), and
    models over 2 GB get shapes too.
    """
    skeleton = _shape_skeleton(model)
    if skeleton.ByteSize() > PROTOBUF_LIMIT:
        return {}  # shape inference serialises the model; the cost model falls back to parameters
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(1 if i == 0 else None)  # batch 1 for the cost model
        shapes[vi.name] = tuple(dims)
    return shapes


def compress(model, ratio: float = 0.5, **options) -> tuple[onnx.ModelProto, Report]:
    """Replace every profitable eligible Conv of ``model`` by its Tucker-2 chain.

    ``model`` is an ``onnx.ModelProto`` (left unmodified) or a path. Options:
    ``force`` (decompose every eligible conv, profitable or not), ``rank_multiple``
    (round ranks to multiples of N), ``n_iter_max`` (HOOI iterations),
    ``method`` ("eig" or "tensorly"), ``ranks`` ({layer: (R_out, R_in)}),
    ``exclude`` (layer names or conv indices in graph order to leave alone).
    Returns ``(new_model, report)``; raises :class:`ModelError` when nothing can be done.
    """
    opts = Options(ratio=check_ratio(ratio), **options)
    if opts.latency_aware:
        return _latency_aware(model, ratio, options, opts)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model))
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    shapes = infer_shapes(model)
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelError(f"cannot import the graph: {first_line(exc)}") from None
    candidates = find_candidates(graph, shapes)
    if not candidates:
        raise ModelError("the model has no Conv node: nothing to compress")
    report = Report(ratio=opts.ratio, force=opts.force, tool_version=__version__)
    taken = taken_names(graph)
    shared: dict[tuple, tuple[gs.Constant, gs.Constant, gs.Constant, float]] = {}
    excluded = {str(e) for e in opts.exclude}
    unknown = excluded - {c.name for c in candidates} - {str(i) for i in range(len(candidates))}
    if unknown:
        raise UsageError(f"--exclude names no Conv of this model: {', '.join(sorted(unknown))}")
    records = {}
    for index, cand in enumerate(candidates):
        if cand.eligible and (cand.name in excluded or str(index) in excluded):
            cand.reason = "excluded by the user"
        records[cand.name] = record = LayerRecord.from_candidate(cand)
        report.layers.append(record)
    eligible = [c for c in candidates if c.eligible]
    opts.fixed_macs = sum(c.shape.macs() for c in candidates if not c.eligible and c.shape is not None)
    input_stats = None
    if opts.calibration is not None and opts.whiten:
        from onnx_tucker.calibrate import input_covariances

        input_stats = input_covariances(model, opts.calibration, [c.node.inputs[0].name for c in eligible])
    planned = plan_ranks(eligible, opts, model=model, covariances=input_stats, report=report)
    blas = ThreadpoolController()  # finds the BLAS libraries once (threadpool_limits searches again per fit: ~4 ms each)
    for cand in eligible:
        record, shape = records[cand.name], cand.shape
        if planned.get(cand.name) is None:
            record.reason = "left whole by the MAC budget allocation"
            continue
        r_out, r_in = planned[cand.name]
        max_out, max_in = max_ranks(cand.weight.shape)
        r_out = round_to_multiple(min(r_out, max_out), opts.rank_multiple, max_out)
        r_in = round_to_multiple(min(r_in, max_in), opts.rank_multiple, max_in)
        record.ranks = (r_out, r_in)
        record.params_after = shape.chain_params(r_out, r_in)
        record.macs_after = shape.chain_macs(r_out, r_in)
        if record.macs_after >= record.macs_before and not opts.force:
            record.reason = f"chain would not reduce MACs ({record.macs_before:,} -> {record.macs_after:,})"
            record.params_after, record.macs_after = record.params_before, record.macs_before
            continue
        key = (cand.weight_key, r_out, r_in)
        if key not in shared:
            cov = input_stats.get(cand.node.inputs[0].name) if input_stats else None
            # One BLAS thread: the fits are many small eigendecompositions, which threaded OpenBLAS
            # runs ~3x slower on 2 cores (ResNet50: 6.1 s single-threaded vs 17 s, docs/tool_speed.md).
            with blas.limit(limits=1, user_api="blas"):
                factors = tucker2(cand.weight, r_out, r_in, n_iter_max=opts.n_iter_max, method=opts.method, input_covariance=cov)
            dtype = cand.weight.dtype
            nd = cand.weight.ndim - 2
            base = cand.name
            first = gs.Constant(unique_name(f"{base}_tucker_in_W", taken), factors.first.reshape(factors.first.shape + (1,) * nd).astype(dtype))
            core = gs.Constant(unique_name(f"{base}_tucker_core_W", taken), factors.core.astype(dtype))
            last = gs.Constant(unique_name(f"{base}_tucker_out_W", taken), factors.last.reshape(factors.last.shape + (1,) * nd).astype(dtype))
            shared[key] = (first, core, last, factors.relative_error)
        first, core, last, error = shared[key]
        record.relative_error = error
        replace_conv(graph, cand, first, core, last, taken)
        record.decomposed = True
    if not report.decomposed:
        raise ModelError(
            "no Conv was decomposed: " + "; ".join(sorted({r.reason for r in report.layers if r.reason}))
        )
    new_model = export(graph, model)
    if opts.calibration is not None and opts.refit:
        from onnx_tucker.calibrate import refit_last_convs

        mode = "core" if opts.refit is True else opts.refit
        report.calibration = refit_last_convs(model, new_model, opts.calibration, [r.layer for r in report.decomposed], mode=mode)
    report.settings = {
        "rank_method": "target_macs" if opts.target_macs is not None else opts.rank_method,
        "ratio": opts.ratio if opts.target_macs is None and opts.rank_method == "ratio" else None,
        "energy": opts.energy if opts.rank_method == "energy" and opts.target_macs is None else None,
        "target_macs": opts.target_macs,
        "calibration_samples": int(len(next(iter(opts.calibration.values())))) if opts.calibration else 0,
        "refit": (opts.refit or "none") if opts.calibration else None,
        "rank_multiple": opts.rank_multiple,
        "force": opts.force,
    }
    _set_metadata(new_model, report)
    return new_model, report


def _latency_aware(model, ratio, options: dict, opts: "Options"):
    """Compress, measure each chain against its conv on the CPU EP, and redo without the slower ones."""
    from onnx_tucker.latency import slower_layers

    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model))
    plain = dict(options, latency_aware=False)
    new_model, report = compress(model, ratio=ratio, **plain)
    slow = slower_layers(model, new_model, batch=opts.latency_batch)
    if not slow:
        report.settings["latency_aware"] = {"batch": opts.latency_batch, "left_whole": {}}
        return new_model, report
    if set(slow) >= {r.layer for r in report.decomposed}:
        raise ModelError(
            f"every decomposed layer was measured slower than its conv on the CPU EP (batch {opts.latency_batch}): nothing to gain"
        )
    excluded = tuple(plain.get("exclude", ())) + tuple(slow)
    new_model, report = compress(model, ratio=ratio, **dict(plain, exclude=excluded))
    for record in report.layers:
        if record.layer in slow:
            before, chain = slow[record.layer]
            record.reason = f"chain measured slower on the CPU EP ({chain:.0f} us vs {before:.0f} us, batch {opts.latency_batch})"
    report.settings["latency_aware"] = {"batch": opts.latency_batch, "left_whole": {k: list(v) for k, v in slow.items()}}
    _set_metadata(new_model, report)
    return new_model, report


def plan_ranks(candidates: list, opts: "Options", model=None, covariances=None, report=None) -> dict:
    """Layer name -> (R_out, R_in) before rounding, or None to leave the layer at full rank."""
    if opts.target_macs is not None:
        from onnx_tucker.budget import allocate_measured, allocate_ranks

        rule = opts.budget_rule
        if rule not in ("auto", "measured", "uniform"):
            raise UsageError(f"unknown budget rule {rule!r}: choose auto, measured or uniform")
        if rule == "auto":
            rule = "measured" if opts.calibration is not None else "uniform"
        if rule == "measured":
            if opts.calibration is None:
                raise UsageError("the measured budget rule needs calibration data (--calibrate)")
            from onnx_tucker.sensitivity import Unsupported, distortion_curves

            try:
                measured = distortion_curves(model, candidates, opts.calibration, covariances, opts.rank_multiple)
            except Unsupported as exc:
                if report is not None:
                    report.notes.append(f"measured budget unavailable ({exc}): uniform ratio used")
                return allocate_ranks(candidates, opts)
            if report is not None:
                report.sensitivity = {
                    "seconds": measured["seconds"], "eval_samples": measured["eval_samples"],
                    "curves": {k: [[m, d, list(r)] for m, d, r in v] for k, v in measured["curves"].items()},
                }
            return allocate_measured(candidates, measured["curves"], opts)
        return allocate_ranks(candidates, opts)
    planned = {}
    for cand in candidates:
        if cand.name in opts.ranks:
            planned[cand.name] = tuple(opts.ranks[cand.name])
        elif opts.rank_method == "ratio":
            planned[cand.name] = ratio_ranks(cand.shape.c_out, cand.shape.c_in, opts.ratio)
        elif opts.rank_method == "energy":
            planned[cand.name] = energy_ranks(cand.weight, opts.energy)
        elif opts.rank_method == "vbmf":
            planned[cand.name] = vbmf_ranks(cand.weight)
        else:
            raise UsageError(f"unknown rank method {opts.rank_method!r}: choose ratio, energy or vbmf")
    return planned


def _set_metadata(model: onnx.ModelProto, report: Report) -> None:
    entries = {
        "onnx_tucker.version": report.tool_version,
        "onnx_tucker.ratio": repr(report.ratio) if report.settings.get("ratio") is not None else "",
        "onnx_tucker.settings": json.dumps(report.settings, sort_keys=True),
        "onnx_tucker.ranks": json.dumps({r.layer: list(r.ranks) for r in report.layers if r.decomposed}, sort_keys=True),
    }
    keep = [p for p in model.metadata_props if p.key not in entries]
    entries = {k: v for k, v in entries.items() if v}
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)

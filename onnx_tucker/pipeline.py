"""``compress``: the one place that orders the steps (sites -> forms -> ranks -> fit -> emit -> refit)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import ThreadpoolController

from onnx_tucker import __version__
from onnx_tucker.chain import METADATA_KEY as CHAINS_KEY, dumps as dump_chains
from onnx_tucker.errors import ModelError, UsageError, first_line
from onnx_tucker.factorization import chooser, get_form, layer_plan, not_worth_it
from onnx_tucker.graph import export, infer_shapes, set_metadata, taken_names
from onnx_tucker.io import load_model
from onnx_tucker.options import CompressOptions, check_ratio, settings_of
from onnx_tucker.ranks import round_to_multiple
from onnx_tucker.report import LayerRecord, Report
from onnx_tucker.site import find_sites

__all__ = ["compress", "check_ratio", "factorable_sites", "CompressOptions"]


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model))
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    return model


def factorable_sites(model: onnx.ModelProto, forms: tuple | None = None, input_shapes: dict | None = None,
                     layers: tuple | None = None) -> tuple[gs.Graph, list]:
    """The model's graph and its sites, each with the form that takes it (``site.form``) or its reason."""
    forms, kinds, ops = layer_plan(layers, forms)
    shapes = infer_shapes(model, input_shapes)
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelError(f"cannot import the graph: {first_line(exc)}") from None
    sites = find_sites(graph, shapes, choose=chooser(forms, kinds), ops=tuple(sorted(ops)))
    return graph, sites


def compress(model, ratio: float = 0.5, **options) -> tuple[onnx.ModelProto, Report]:
    """Replace every profitable eligible layer of ``model`` by its low-rank chain.

    ``model`` is an ``onnx.ModelProto`` (left unmodified) or a path. The options, all keyword
    arguments, are the fields of :class:`onnx_tucker.options.CompressOptions` (its docstring
    describes each): ``force``, ``rank_multiple``, ``n_iter_max``, ``method``, ``ranks``, ``exclude``,
    ``rank_method``, ``energy``, ``target_macs``, ``budget_rule``, ``calibration``, ``refit``,
    ``whiten``, ``latency_aware``, ``latency_batch``, ``forms``, ``layers``, ``input_shapes``, ``fold_affine``, ``curves``, ``probes``, ``distill``, ``ray``. An unknown option or a bad value
    raises :class:`UsageError`.

    Returns ``(new_model, report)``; ``report.chains`` lists what each rewrite produced. When no layer
    pays, ``new_model`` is the input unchanged (with the tool's metadata) and the table says why;
    a model without any Conv raises :class:`ModelError`.
    """
    opts = CompressOptions.from_kwargs(ratio=ratio, **options)
    if opts.latency_aware:
        return _latency_aware(_as_model(model), opts)
    return _compress(_as_model(model), opts)


def _compress(model: onnx.ModelProto, opts: CompressOptions) -> tuple[onnx.ModelProto, Report]:
    graph, sites = factorable_sites(model, opts.forms, opts.input_shapes, opts.layers)
    if not sites:
        raise ModelError("the model has no Conv node: nothing to compress")
    report = Report(ratio=opts.ratio, force=opts.force, tool_version=__version__)
    taken = taken_names(graph)
    excluded = {str(e) for e in opts.exclude}
    unknown = excluded - {s.name for s in sites} - {str(i) for i in range(len(sites))}
    if unknown:
        raise UsageError(f"--exclude names no Conv of this model: {', '.join(sorted(unknown))}")
    records = {}
    for index, site in enumerate(sites):
        if site.eligible and (site.name in excluded or str(index) in excluded):
            site.reason, site.weight = "excluded by the user", None
        records[site.name] = record = LayerRecord.from_site(site)
        report.layers.append(record)
    eligible = [s for s in sites if s.eligible]
    fixed_macs = sum(s.shape.macs() for s in sites if not s.eligible and s.shape is not None)
    total_macs = fixed_macs + sum(s.shape.macs() for s in eligible)
    total_params = sum(s.shape.params() for s in sites if s.shape is not None)
    input_stats = None
    if opts.calibration is not None and opts.whiten and eligible:
        from onnx_tucker.calibrate import input_covariances

        input_stats = input_covariances(model, opts.calibration, [s.input_name for s in eligible],
                                        axes={s.input_name: s.extra.get("channel_axis", 1) for s in eligible})
    planned = plan_ranks(eligible, opts, fixed_macs, model=model, covariances=input_stats, report=report)
    blas = ThreadpoolController()  # finds the BLAS libraries once (threadpool_limits searches again per fit: ~4 ms each)
    shared: dict[tuple, tuple[dict, float]] = {}
    for site in eligible:
        form = get_form(site.form)
        record = records[site.name]
        if planned.get(site.name) is None:
            record.reason = "left whole by the MAC budget allocation"
            continue
        limits = form.max_ranks(site)
        ranks = tuple(round_to_multiple(min(r, m), opts.rank_multiple, m) for r, m in zip(planned[site.name], limits))
        cost = form.cost(site, ranks)
        record.ranks, record.params_after, record.macs_after = ranks, cost.params, cost.macs
        why = "" if opts.force else not_worth_it(site, ranks, cost, total_macs, total_params)
        if why:
            record.reason = why
            record.params_after, record.macs_after = record.params_before, record.macs_before
            continue
        key = (form.name, site.weight_key, ranks)
        if key not in shared:
            cov = input_stats.get(site.input_name) if input_stats else None
            # One BLAS thread: the fits are many small eigendecompositions, which threaded OpenBLAS
            # runs ~3x slower on 2 cores (ResNet50: 6.1 s single-threaded vs 17 s, docs/tool_speed.md).
            with blas.limit(limits=1, user_api="blas"):
                factors = form.fit(site, ranks, n_iter_max=opts.n_iter_max, method=opts.method, input_covariance=cov)
            shared[key] = (form.constants(site, factors, taken), factors.relative_error)
        constants, record.relative_error = shared[key]
        chain = form.emit(graph, site, constants, taken)
        report.chains.append(chain)
        record.decomposed, record.form, record.layout = True, form.name, _layout(site, chain)
    if report.decomposed:
        new_model = export(graph, model)
        if opts.calibration is not None and opts.refit:
            from onnx_tucker.calibrate import refit_chains

            report.calibration = refit_chains(model, new_model, opts.calibration, report.chains, mode=opts.refit)
        if opts.distill is not None:
            if opts.calibration is None:
                raise UsageError("distillation needs unlabelled inputs: give calibration data (--calibrate)")
            from onnx_tucker.distill import distill

            trainable = list(dict.fromkeys(t for c in report.chains for t in c.trainable()))
            new_model, report.distill = distill(model, new_model, opts.calibration, trainable, **opts.distill)
        if opts.fold_affine:
            from onnx_tucker.fold import fold_affine_into_chains

            folded = fold_affine_into_chains(new_model, report.chains)
            if folded:
                report.notes.append(f"folded the per-channel Mul/Add before {len(folded)} chain(s) into their first 1x1 conv (exact)")
    else:
        reasons = "; ".join(sorted({r.reason for r in report.layers if r.reason}))
        if all(site.extra.get("defect") for site in sites):  # not a choice: no layer of this model can be factored
            raise ModelError(f"no Conv was decomposed: {reasons}")
        report.notes.append(f"no layer was decomposed ({reasons}): the output is the input model unchanged")
        new_model = onnx.ModelProto()
        new_model.CopyFrom(model)
    report.settings = settings_of(opts)
    _set_metadata(new_model, report)
    return new_model, report


def _latency_aware(model: onnx.ModelProto, opts: CompressOptions):
    """Compress, measure each chain against its layer on the CPU EP, and redo without the slower ones."""
    from dataclasses import replace

    from onnx_tucker.latency import slower_layers

    plain = replace(opts, latency_aware=False)
    # the measuring pass needs the chains' shapes only: no distillation there (it runs once, at the end)
    new_model, report = _compress(model, replace(plain, distill=None) if plain.distill is not None else plain)
    slow = slower_layers(model, new_model, batch=opts.latency_batch) if report.decomposed else {}
    if not slow and plain.distill is not None:
        new_model, report = _compress(model, plain)
    if not slow:
        report.settings["latency_aware"] = {"batch": opts.latency_batch, "left_whole": {}}
        _set_metadata(new_model, report)
        return new_model, report
    new_model, report = _compress(model, replace(plain, exclude=tuple(plain.exclude) + tuple(slow)))
    for record in report.layers:
        if record.layer in slow:
            before, chain, verdict = slow[record.layer]
            if verdict == "slower":
                record.reason = f"chain measured slower on the CPU EP ({chain:.0f} us vs {before:.0f} us, batch {opts.latency_batch})"
            else:
                record.reason = (f"chain not faster in every profiled round on the CPU EP (median {chain:.0f} us vs {before:.0f} us, "
                                 f"batch {opts.latency_batch}): inside the noise, left whole")
    report.settings["latency_aware"] = {"batch": opts.latency_batch, "left_whole": {k: list(v) for k, v in slow.items()}}
    _set_metadata(new_model, report)
    return new_model, report


def plan_ranks(sites: list, opts: CompressOptions, fixed_macs: int = 0, model=None, covariances=None, report=None) -> dict:
    """Layer name -> rank tuple before rounding, or None to leave the layer at full rank."""
    if opts.target_macs is not None:
        from onnx_tucker.budget import allocate_ranks

        rule = opts.budget_rule
        if rule == "auto":
            rule = "measured" if opts.calibration is not None else "uniform"
        if rule == "measured":
            if opts.calibration is None:
                raise UsageError("the measured budget rule needs calibration data (--calibrate)")
            from onnx_tucker.sensitivity import Unsupported, distortion_curves

            try:
                measured = distortion_curves(model, sites, opts.calibration, covariances, opts.rank_multiple, fixed_macs=fixed_macs,
                                             cache_path=opts.curves, probes=opts.probes, ray=opts.ray)
                planned, refined = _refined_allocation(sites, measured, opts, fixed_macs)
            except Unsupported as exc:
                if report is not None:
                    report.notes.append(f"measured budget unavailable ({exc}): uniform ratio used")
                return allocate_ranks(sites, opts, fixed_macs)
            if report is not None:
                curves = measured["curves"]
                report.sensitivity = {
                    "seconds": measured["seconds"], "eval_samples": measured["eval_samples"],
                    "cached_layers": measured.get("cached_layers", 0), "provider": measured.get("provider"),
                    **({"ray": measured["ray"]} if measured.get("ray") else {}),
                    "probes": measured.get("probes", 0) + refined, "options": sum(len(v) for v in curves.values()),
                    "curves": {k: [[m, d, list(r), bool(known)] for m, d, r, known, _ in v] for k, v in curves.items()},
                }
            return planned
        return allocate_ranks(sites, opts, fixed_macs)
    planned = {}
    for site in sites:
        if site.name in opts.ranks:
            planned[site.name] = tuple(opts.ranks[site.name])
        else:
            planned[site.name] = get_form(site.form).rule_ranks(site, opts.rank_method, opts.ratio, opts.energy)
    return planned


REFINE_ROUNDS = 6  # allocate, measure the chosen options that were predicted, allocate again


def _refined_allocation(sites: list, measured: dict, opts: CompressOptions, fixed_macs: int) -> tuple[dict, int]:
    """The knapsack on the curves, refined until every chosen option's distortion was measured, not
    predicted (or ``REFINE_ROUNDS`` is spent). Returns (layer -> ranks, probes run while refining)."""
    from onnx_tucker.budget import allocate_measured

    curves, runs = measured["curves"], 0
    planned = allocate_measured(sites, curves, opts, fixed_macs)
    for _ in range(REFINE_ROUNDS):
        wanted = {}
        for name, ranks in planned.items():
            entry = next((e for e in curves.get(name, []) if ranks is not None and tuple(e[2]) == tuple(ranks)), None)
            if entry is not None and not entry[3]:
                wanted[name] = tuple(ranks)
        if not wanted:
            break
        runs += measured["refine"](wanted)
        planned = allocate_measured(sites, curves, opts, fixed_macs)
    return planned, runs


def _layout(site, chain) -> str:
    """The chain's nodes as kernel sizes, in data-flow order ("1x1 -> 3x3 -> 1x1"; "dense -> dense")."""
    if site.geometry is None:
        return " -> ".join("dense" for _ in chain.roles)
    kxk = "x".join(str(k) for k in site.shape.kernel)
    pointwise = "x".join("1" for _ in site.shape.kernel)
    return " -> ".join(kxk if role == "core" else pointwise for role in chain.roles)


def _set_metadata(model: onnx.ModelProto, report: Report) -> None:
    set_metadata(model, {
        "onnx_tucker.version": report.tool_version,
        "onnx_tucker.ratio": repr(report.ratio) if report.settings.get("ratio") is not None else "",
        "onnx_tucker.settings": json.dumps(report.settings, sort_keys=True),
        "onnx_tucker.ranks": json.dumps({r.layer: list(r.ranks) for r in report.layers if r.decomposed}, sort_keys=True),
        CHAINS_KEY: dump_chains(report.chains) if report.chains else "",
    })

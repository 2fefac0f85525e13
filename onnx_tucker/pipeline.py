"""``compress``: the one place that orders the steps (sites -> forms -> ranks -> fit -> emit -> refit)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import ThreadpoolController

from onnx_tucker import __version__
from onnx_tucker.chain import METADATA_KEY as CHAINS_KEY, dumps as dump_chains
from onnx_tucker.errors import ModelError, UsageError, first_line
from onnx_tucker.factorization import PRUNED_KIND, chooser, get_form, layer_plan, not_worth_it, rounded_ranks
from onnx_tucker.graph import check_chain_nodes, export, infer_shapes, set_metadata, taken_names, with_node_names
from onnx_tucker.io import load_model
from onnx_tucker.options import CompressOptions, check_input_shapes, check_ratio, settings_of
from onnx_tucker.report import LayerRecord, Report
from onnx_tucker.runtime import graph_inputs, sizes_static
from onnx_tucker.site import find_sites

__all__ = ["compress", "check_ratio", "factorable_sites", "CompressOptions"]


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model))
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    # weights left in external files (onnx.load(..., load_external_data=False)) would be read relative to the working
    # directory, if at all: say so instead of a checker's ValidationError from deep inside
    unloaded = next((t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL), None)
    if unloaded is not None:
        raise ModelError(f"initializer {unloaded!r} is in an external data file that is not loaded: pass the model's path, "
                         "or load it with onnx.load(path) (load_external_data=True)")
    return with_node_names(model)


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
    ``whiten``, ``latency_aware``, ``latency_batch``, ``target_latency``, ``provider``, ``latency_table``, ``forms``, ``layers``, ``input_shapes``, ``fold_affine``, ``curves``, ``probes``, ``probe_images``, ``distill``, ``ray``. An unknown option or a bad value
    raises :class:`UsageError`.

    Returns ``(new_model, report)``; ``report.chains`` lists what each rewrite produced. When no layer
    pays, ``new_model`` is the input unchanged (with the tool's metadata) and the table says why;
    a model without any Conv raises :class:`ModelError`.
    """
    opts = CompressOptions.from_kwargs(ratio=ratio, **options)
    model = _as_model(model)
    check_input_shapes(opts.input_shapes, graph_inputs(model))
    if opts.calibration is not None:
        from onnx_tucker.data import calibration_arrays

        opts.calibration = calibration_arrays(model, opts.calibration)
    if opts.distill is not None:  # an op the torch executor cannot run is said now, not after the compression
        from onnx_tucker.distill import check_runnable

        check_runnable(model, opts.calibration)
    if opts.target_latency is not None:
        return _target_latency(model, opts)
    if opts.layers and PRUNED_KIND in opts.layers:
        return _prune_then_compress(model, opts)
    return _compress(model, opts)


def _prune_then_compress(model: onnx.ModelProto, opts: CompressOptions) -> tuple[onnx.ModelProto, Report]:
    """``--layers hidden``: prune the hidden channels first, then factor the other kinds asked for.

    With ``ratio``: each unit keeps ``ratio`` of its channels and the other kinds are factored at ``ratio``, the pruned
    units' convs left as they are (a rank cut at R of a layer already cut to R would compound to R squared).
    With ``target_macs`` alone: pruning meets it. With ``target_macs`` and other kinds: ``onnx_tucker.hybrid``."""
    _, sites = factorable_sites(model, opts.forms, opts.input_shapes, opts.layers)
    excluded = excluded_names(sites, opts.exclude)  # before the pruning's passes: a typo costs nothing
    before = {site.name: LayerRecord.from_site(site) for site in sites}  # the table's sizes before pruning
    rest = tuple(k for k in opts.layers if k != PRUNED_KIND)
    if opts.target_macs is not None and rest:
        from onnx_tucker.hybrid import prune_and_factor

        return prune_and_factor(model, opts, rest, excluded, before)
    pruned_model, pruning = pruned(model, opts, opts.target_macs, excluded)
    # a pruned head's classifier is a site only under --layers dense: left whole then too (it was refitted, and
    # --distill trains its pruned weight)
    convs = tuple(dict.fromkeys(n for u in pruning.pruned() for n in (u.producer, u.depthwise, u.consumer) if n
                                and (n != u.consumer or u.kind != "head" or "dense" in rest)))
    factored = replace(opts, layers=rest or (PRUNED_KIND,), target_macs=None, exclude=tuple(opts.exclude) + convs, distill=opts.distill)
    return _compress(pruned_model, factored, pruning=(pruning, before), original=model, shown=opts)


def pruned(model: onnx.ModelProto, opts: CompressOptions, target_macs: float | None, excluded: set, memo: dict | None = None):
    """``prune.prune`` with the options' ratio (where ``target_macs`` is None), exclusions and multiple, timed."""
    from onnx_tucker.prune import prune
    from onnx_tucker.trace import timed

    started = time.perf_counter()
    with timed("prune"):
        model, pruning = prune(model, opts.calibration, ratio=None if target_macs is not None else opts.ratio,
                               target_macs=target_macs, input_shapes=opts.input_shapes, exclude=excluded,
                               multiple=opts.rank_multiple if opts.rank_multiple > 1 else None, memo=memo)
    pruning.seconds = time.perf_counter() - started
    return model, pruning


def budget_macs(model: onnx.ModelProto, opts: CompressOptions, layers: tuple) -> int:
    """The MACs a ``--target-macs`` of ``_compress`` is a fraction of: every layer it counts, eligible or not."""
    _, sites = factorable_sites(model, opts.forms, opts.input_shapes, layers)
    return sum(s.shape.macs() for s in sites if s.shape is not None)


def excluded_names(sites: list, exclude) -> set[str]:
    """``--exclude``'s layers as names: each a layer's name or its 0-based index in the table's order (both, where a
    layer is named like an index); one that is neither is a one-line UsageError."""
    given = {str(e) for e in exclude}
    names = {site.name for site in sites}
    by_index = {str(i): site.name for i, site in enumerate(sites)}
    unknown = given - names - set(by_index)
    if unknown:
        raise UsageError(f"--exclude names no Conv of this model: {', '.join(sorted(unknown))}")
    return (given & names) | {by_index[e] for e in given if e in by_index}


FEEDBACK_AIM = 0.9  # the corrected plan aims this far under the target: the measurement that checks it is noisy
FEEDBACK_SLACK = 0.1  # no second plan when the first one's measured latency is within this of the target (and meets it)
CONFIRM_RUNS = 120  # a first measurement that would start a second plan is repeated with this many interleaved pairs first


def _target_latency(model: onnx.ModelProto, opts: CompressOptions) -> tuple[onnx.ModelProto, Report]:
    """``target_latency``: plan on the per-layer table, build, measure the whole models; when the measured ratio
    is off the prediction, plan once more with the prediction corrected by that measurement (same curves and
    table: only the knapsack, fits and refits run again), and keep the plan whose measured latency meets the
    target with the larger budget (less distortion); when none meets it, the faster one."""
    started = time.perf_counter()
    chosen = _feedback(model, opts)
    # the other plan and the confirming measurement took time too: the time line must add up to the run
    own = sum(chosen[1].timings.values())
    extra = time.perf_counter() - started - own
    if "confirmed" in (chosen[1].latency or {}) and extra >= 0.05:
        chosen[1].timings["latency feedback"] = extra
    return chosen


def _feedback(model: onnx.ModelProto, opts: CompressOptions) -> tuple[onnx.ModelProto, Report]:
    """:func:`_target_latency`'s plans and measurements."""
    memo: dict = {}
    first = _compress(model, opts, memo)
    latency = first[1].latency or {}
    if not first[1].decomposed or "measured" not in latency:
        return first
    predicted, measured = latency["prediction"]["predicted_ratio"], 1 / latency["measured"]["speedup"]
    target = opts.target_latency
    within = lambda ratio: (1 - FEEDBACK_SLACK) * target <= ratio <= target  # noqa: E731
    if within(measured):
        return first
    # One whole-model measurement is noisy (two runs of the same plan measured 0.395 and 1.21x its prediction):
    # repeat it, with more pairs, before replanning on it.
    from onnx_tucker.latency_table import time_models

    confirm = time_models(model, first[0], latency["provider"], latency["batch"], runs=CONFIRM_RUNS,
                          input_shapes=opts.input_shapes)
    confirmed = confirm | {"first_measured": measured}
    repeat_note = (f"latency feedback: the first plan measured {measured:.3f} x the original, outside "
                   f"[{(1 - FEEDBACK_SLACK) * target:.3f}, {target:.3f}]; a repeat of {CONFIRM_RUNS} interleaved pairs "
                   f"measured {1 / confirm['speedup']:.3f}")
    measured = 1 / confirm["speedup"]
    if within(measured):
        latency["confirmed"] = confirmed
        first[1].notes.append(repeat_note)
        _set_metadata(first[0], first[1])
        return first
    correction = measured / predicted
    memo["planned_target"] = min(1.0, FEEDBACK_AIM * target / correction)
    memo["correction"] = correction
    try:
        second = _compress(model, opts, memo)  # on the first plan's table (memo["table"]): its count goes on
    except UsageError as exc:  # the corrected target cannot be planned: keep the first
        latency["confirmed"] = confirmed
        latency["timed_layer_models"] = memo["table"].measured
        first[1].notes += [repeat_note, f"no second plan with the measured correction ({first_line(exc)})"]
        _set_metadata(first[0], first[1])
        return first
    again = 1 / second[1].latency["measured"]["speedup"]
    keep = second if again <= target or (measured > target and again < measured) else first
    # the kept report speaks for the whole run: every one-layer model timed (both plans share one table), and,
    # when it is the second, the first plan's phases too (its curves, statistics and snapshot are the second's)
    keep[1].latency["timed_layer_models"] = memo["table"].measured
    if keep is second:
        merged = dict(first[1].timings)
        for name, seconds in second[1].timings.items():
            merged[name] = merged.get(name, 0.0) + seconds
        second[1].timings = merged
    keep[1].notes.append(repeat_note)
    keep[1].latency["confirmed"] = confirmed
    keep[1].notes.append(
        f"latency feedback: first plan predicted {predicted:.3f}, measured {measured:.3f} (the repeat); second plan on the corrected prediction "
        f"(x {correction:.3f}, aiming at {FEEDBACK_AIM:g} x the target) measured {again:.3f}: kept the "
        f"{'second' if keep is second else 'first'}")
    keep[1].latency["feedback"] = {"first": {"predicted": predicted, "measured": measured}, "correction": correction,
                                   "planned_target": memo["planned_target"], "second_measured": again,
                                   "kept": "second" if keep is second else "first"}
    _set_metadata(keep[0], keep[1])
    return keep


def _compress(model: onnx.ModelProto, opts: CompressOptions, memo: dict | None = None, pruning=None, original=None,
              shown: CompressOptions | None = None) -> tuple[onnx.ModelProto, Report]:
    """``pruning``: ``model`` is ``original`` with hidden channels pruned: (``prune.Pruning``, the original's
    ``LayerRecord`` by layer name); ``shown``: the options the report records (the user's, where ``opts`` are those
    left for the factoring)."""
    graph, sites = factorable_sites(model, opts.forms, opts.input_shapes, opts.layers)
    if not sites:
        raise ModelError("the model has no Conv node: nothing to compress")
    # the ratio only where a ratio chose the ranks (a budget or another rank rule left the default in opts.ratio)
    report = Report(ratio=settings_of(shown or opts)["ratio"], force=opts.force, tool_version=__version__)
    pruning, before = pruning if pruning is not None else (None, None)
    if pruning is not None:
        report.timings["prune"] = pruning.seconds
    report.sizes_static = sizes_static(model, opts.input_shapes)
    taken = taken_names(graph)
    excluded = excluded_names(sites, opts.exclude)
    records = {}
    for site in sites:
        if site.eligible and site.name in excluded:
            site.reason, site.weight = "excluded by the user", None
        records[site.name] = record = LayerRecord.from_site(site)
        report.layers.append(record)
    if pruning is not None:
        _record_pruning(records, pruning, before, report)
    if opts.ranks:
        opts = replace(opts, ranks=_explicit_ranks(sites, opts.ranks))
    eligible = [s for s in sites if s.eligible]
    fixed_macs = sum(s.shape.macs() for s in sites if not s.eligible and s.shape is not None)
    total_macs = fixed_macs + sum(s.shape.macs() for s in eligible)
    total_params = sum(s.shape.params() for s in sites if s.shape is not None)
    table = None
    if (opts.latency_aware or opts.target_latency is not None or opts.rank_multiple == "auto") and eligible:
        from onnx_tucker.latency_table import LatencyTable, default_path

        table = memo.get("table") if memo is not None else None  # a second plan (--target-latency) reuses the first's
        if table is None:
            table = LatencyTable(opts.latency_table or default_path(), opts.provider, opts.latency_batch)
        if memo is not None:
            memo["table"] = table
        report.latency = {"provider": table.provider, "device": table.device, "onnxruntime": table.ort_version,
                          "batch": table.batch, "table": str(table.path), "layers": {}}
    if opts.rank_multiple == "auto":
        from onnx_tucker.latency_table import choose_multiple

        if table is None:
            opts = replace(opts, rank_multiple=1)
        else:
            with report.phase("latency"):
                choice = choose_multiple(table, eligible)
            opts = replace(opts, rank_multiple=choice["multiple"])
            report.latency["rank_multiple"] = choice
            report.notes.append(f"--rank-multiple auto: {choice['multiple']} (chains at ranks rounded up to each multiple, summed time against unrounded ranks on {table.provider}, "
                                f"batch {table.batch}: " + ", ".join(f"{m}: {v:.2f}" for m, v in choice["scores"].items()) + ")")
    if opts.target_macs is not None and opts.calibration is not None and opts.budget_rule != "uniform" and eligible:
        from onnx_tucker.budget import check_measured_target
        from onnx_tucker.sensitivity import measured_options

        # before the covariances and the curves: a ResNet50 used to measure for 8 minutes, then refuse
        check_measured_target(eligible, measured_options(eligible, opts.rank_multiple, fixed_macs), opts, fixed_macs)
    input_stats = None
    if memo is not None and "input_stats" in memo:
        input_stats = memo["input_stats"]
    elif opts.calibration is not None and opts.whiten and eligible:
        from onnx_tucker.calibrate import input_covariances

        from onnx_tucker.capture import activation_bytes, batch_for_bytes

        per_sample = sum(activation_bytes(s.shape, "in") for s in {s.input_name: s for s in eligible}.values())
        with report.phase("statistics"):
            input_stats = input_covariances(model, opts.calibration, [s.input_name for s in eligible],
                                            axes={s.input_name: s.extra.get("channel_axis", 1) for s in eligible},
                                            batch_size=batch_for_bytes(per_sample), vertical=_patch_requests(eligible))
    if memo is not None:
        memo["input_stats"] = input_stats
    for site in eligible:  # the spatial form's whitening: the patches its first conv reads
        if input_stats and ("patch", site.name) in input_stats:
            site.extra["patch_covariance"] = input_stats[("patch", site.name)]
    with report.phase("plan"):  # with a measured budget: the distortion curves
        planned = plan_ranks(eligible, opts, fixed_macs, model=model, covariances=input_stats, report=report, table=table, memo=memo)
    left_whole = {}
    blas = ThreadpoolController()  # finds the BLAS libraries once (threadpool_limits searches again per fit: ~4 ms each)
    shared: dict[tuple, tuple[dict, float]] = {}
    decided = []  # (site, form, ranks, fit key) of every layer that gets a chain, in order
    for site in eligible:
        form = get_form(site.form)
        record = records[site.name]
        if planned.get(site.name) is None:
            if not record.pruned:  # a pruned conv's note says what was pruned
                record.reason = "left whole by the " + ("latency" if opts.target_latency is not None else "MAC") + " budget allocation"
            continue
        if hasattr(form, "resolve"):  # a FormChoice: the planned ranks say which form writes the chain
            form = form.resolve(site, tuple(planned[site.name]))
        if site.name in opts.ranks:  # the user's, as given (checked against the limits)
            ranks = tuple(planned[site.name])
        else:
            ranks = rounded_ranks(form, site, planned[site.name], opts.rank_multiple)
        cost = form.cost(site, ranks)
        record.ranks, record.params_after, record.macs_after = ranks, cost.params, cost.macs
        why = "" if opts.force else not_worth_it(site, ranks, cost, total_macs, total_params, by_hand=site.name in opts.ranks)
        if not why and table is not None and (opts.latency_aware or opts.target_latency is not None):
            with report.phase("latency", traced=False):
                why = _latency_verdict(table, site, ranks, record, report, left_whole, strict=opts.latency_aware)
        if why:
            if record.pruned:  # stays as pruned: the pruned model's sizes
                record.params_after, record.macs_after = site.shape.params(), site.shape.macs()
            else:
                record.reason = why
                record.params_after, record.macs_after = record.params_before, record.macs_before
            continue
        # one fit per weight, form, layout and ranks: a weight a MatMul reads as (in, out) and a Gemm with transB as
        # (out, in) needs factors of each layout (the Gemm took the MatMul's, transposed: wrong output, PASSED)
        decided.append((site, form, ranks, (form.name, site.weight_key, site.extra.get("layout"), ranks)))
    # One BLAS thread per fit: they are many small eigendecompositions, which threaded OpenBLAS runs ~3x slower on
    # 2 cores (ResNet50: 6.1 s single-threaded vs 17 s, docs/tool_speed.md); the fits go side by side on threads
    # instead (an H100 machine's 16 cores did a ResNet50's 45 one after another: 12.9 s). Each fit is its own:
    # the same factors in any order. Names and nodes are then made in the layers' order, as before.
    with blas.limit(limits=1, user_api="blas"), report.phase("fit"):
        fitted = _fit_all(decided, input_stats, opts)
    for site, form, ranks, key in decided:
        record = records[site.name]
        if key not in shared:
            shared[key] = (form.constants(site, fitted[key], taken), fitted[key].relative_error)
        constants, record.relative_error = shared[key]
        chain = form.emit(graph, site, constants, taken)
        report.chains.append(chain)
        record.decomposed, record.form, record.layout = True, form.name, _layout(site, chain)
    if report.form_choice:
        for name, entry in report.form_choice["layers"].items():  # what became of each choice
            record = records[name]
            entry["written"] = record.decomposed
            if not record.decomposed:
                entry["left_whole"] = record.reason
        report.notes.append(_form_choice_note(report))
    if report.decomposed or report.pruned_units:
        with report.phase("export"):
            new_model = export(graph, model) if report.decomposed else _copy(model)
            check_chain_nodes(new_model, report.chains)
        # which channels pruning kept, as the chain records say what was factored (--distill's reconstruction reads
        # it); cleared otherwise: an input pruned by an earlier run is this run's original, with nothing cut
        from onnx_tucker.prune import KEPT_KEY

        set_metadata(new_model, {KEPT_KEY: pruning.dumps_kept() if pruning is not None else ""})
        if opts.calibration is not None and opts.refit and report.chains:
            from onnx_tucker.calibrate import refit_chains

            with report.phase("refit"):
                report.calibration = refit_chains(model, new_model, opts.calibration, report.chains, mode=opts.refit)
        if opts.distill is not None:
            if opts.calibration is None:
                raise UsageError("distillation needs unlabelled inputs: give calibration data (--calibrate)")
            from onnx_tucker.distill import distill

            # a pruned tensor a chain replaced (--layers hidden,KIND --target-macs) is trained as the chain's factors
            present = {i.name for i in new_model.graph.initializer}
            trainable = list(dict.fromkeys([t for c in report.chains for t in c.trainable()]
                                           + [t for u in (pruning.pruned() if pruning else ()) for t in u.trainable if t in present]))
            # The chain records go on the model now (not only when it is written): the reconstruction finds
            # its chains there; from node names alone it would see only the Tucker ones, not the SVD forms.
            set_metadata(new_model, {CHAINS_KEY: dump_chains(report.chains)})
            feeds = {k: np.asarray(v) for k, v in opts.calibration.items()}  # a streamed image folder: decoded now
            with report.phase("distill"):
                # the teacher is the user's model: after pruning, ``model`` is already the pruned one
                teacher = original if original is not None else model
                new_model, report.distill = distill(teacher, new_model, feeds, trainable, **opts.distill)
        if opts.fold_affine:
            from onnx_tucker.fold import fold_affine_into_chains

            fold_affine_into_chains(new_model, report.chains)
            before = sum("folded_affine" in c.extra for c in report.chains)
            after = sum("folded_after" in c.extra for c in report.chains)
            if before:
                report.notes.append(f"folded the per-channel Mul/Add before {before} chain(s) into their first 1x1 conv (exact)")
            if after:
                report.notes.append(f"folded the per-channel affine ops after {after} chain(s) into their last conv (exact)")
    else:
        reasons = "; ".join(sorted({r.reason for r in report.layers if r.reason}))
        if all(site.extra.get("defect") for site in sites):  # not a choice: no layer of this model can be factored
            raise ModelError(f"no Conv was decomposed: {reasons}")
        report.notes.append(f"no layer was decomposed ({reasons}): the output is the input model unchanged")
        new_model = _copy(model)
    report.settings = settings_of(shown or opts)
    if table is not None:
        report.settings["provider"] = table.provider
        report.settings["latency_batch"] = table.batch
        if opts.latency_aware:
            report.settings["latency_aware"] = {"batch": table.batch, "provider": table.provider,
                                                "left_whole": {k: list(v) for k, v in left_whole.items()}}
        if opts.target_latency is not None or opts.latency_aware:
            with report.phase("latency"):
                _measure_whole(model, new_model, table, report, opts.input_shapes)
        report.latency["timed_layer_models"] = table.measured  # 0: every per-layer time came from the cache
        if table.dropped:
            report.notes.append(f"the latency table {table.path} held {table.dropped} damaged entr"
                                f"{'y' if table.dropped == 1 else 'ies'}: measured again where needed")
        if table.unsaved:
            report.notes.append(f"the latency table was not saved ({table.unsaved}): its timings served this run only")
    _set_metadata(new_model, report)
    return new_model, report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _record_pruning(records: dict, pruning, before: dict, report: Report) -> None:
    """The pruned units' convs in the table: their sizes ``before`` (the original's records) and after, and what was kept."""
    from onnx_tucker.prune import ROWS_PER_UNKNOWN

    for unit in pruning.pruned():
        kept = f"{len(unit.keep)}/{unit.channels}"
        for name, role in ((unit.producer, "its output"), (unit.depthwise, "its"), (unit.consumer, "its input")):
            record = records.get(name)
            if record is None:  # a head's classifier (a Gemm: a layer only under --layers dense)
                continue
            was = before[name]
            record.params_before, record.macs_before, record.kernel = was.params_before, was.macs_before, was.kernel
            record.pruned, record.kept = True, kept
            record.relative_error = unit.relative_error if name == unit.consumer else None
            record.reason = f"pruned: {role} {kept} hidden channels ({unit.kind})"
    report.pruning = pruning.to_dict() | {"seconds": round(pruning.seconds, 3)}
    limited = [u for u in pruning.units if u.most_kept() < u.channels - 1]
    if limited:
        report.notes.append(f"--layers hidden: {len(limited)} unit(s) limited by their calibration rows (a refit needs "
                            f"{ROWS_PER_UNKNOWN} per unknown): fewer channels offered, or left whole")
    report.notes.append(f"--layers hidden: pruned {len(pruning.pruned())} of {len(pruning.units)} units' hidden channels "
                        f"({pruning.to_dict()['macs_saved'] / max(1, pruning.conv_macs):.1%} of the conv MACs), each consumer refitted on the calibration inputs")


def _latency_verdict(table, site, ranks, record, report, left_whole: dict, strict: bool) -> str:
    """Time the chain at ``ranks`` against the layer (the table; cached); '' when it is kept, else why not.

    ``strict`` (``--latency-aware``): kept only when measured faster (:func:`latency_table.verdict`); otherwise
    (``--target-latency`` alone, whose knapsack already left out options not faster) the times are recorded only.
    """
    from onnx_tucker.latency_table import verdict

    entry = table.measure(site, [ranks])[ranks]
    before, chain = entry["original_us"], entry["cost_us"]
    record.original_us, record.chain_us = before, chain
    report.latency["layers"][site.name] = {"ranks": list(ranks), "original_us": before, "chain_us": chain,
                                           "ratio": entry["ratio"], "q3": entry["q3"]}
    if not strict:
        return ""
    decision = verdict(entry)
    report.latency["layers"][site.name]["verdict"] = decision
    if decision == "faster":
        return ""
    left_whole[site.name] = (before, chain, decision)
    where = f"on {table.provider}, batch {table.batch}"
    if decision == "slower":
        return f"chain measured slower {where} ({chain:.0f} us vs {before:.0f} us)"
    return (f"chain not faster in 3 of 4 paired runs {where} (median {chain:.0f} us vs {before:.0f} us): "
            "inside the noise, left whole")


def _measure_whole(model, new_model, table, report, input_shapes: dict | None = None) -> None:
    """Predicted (table) and measured (interleaved medians) whole-model latency, side by side in the report
    (``input_shapes``: the sizes a model with dynamic sizes is fed at, as its layers were timed)."""
    measured = table.whole_models(model, new_model, input_shapes)
    latency = report.latency
    latency["measured"] = measured
    prediction = latency.get("prediction")
    if prediction is None:  # --latency-aware alone: the original's measured time, less what the kept chains save
        saved = sum(r.original_us - r.chain_us for r in report.layers if r.decomposed and r.original_us is not None)
        whole = measured["original_ms"] * 1e3
        prediction = latency["prediction"] = {"original_us": whole, "predicted_us": whole - saved,
                                              "predicted_ratio": (whole - saved) / whole}
    report.notes.append(
        f"latency on {table.provider} ({table.device}), batch {table.batch}: predicted {prediction['predicted_ratio']:.3f} x the original "
        f"({prediction['predicted_us'] / 1e3:.2f} ms of {prediction['original_us'] / 1e3:.2f} ms, per-layer table"
        f"{', corrected x %.3f by the first plan' % prediction['correction'] if 'correction' in prediction else ''}), measured "
        f"{1 / measured['speedup']:.3f} x ({measured['compressed_ms']:.2f} ms vs {measured['original_ms']:.2f} ms, "
        f"speedup {measured['speedup']:.2f}x, median of {measured['runs']} interleaved pairs)")


def _patch_requests(sites: list) -> dict:
    """{("patch", layer): (input tensor, geometry)} for the layers a form with a patch statistic may write."""
    requests = {}
    for site in sites:
        for name in (site.form or "").split("|"):
            form = get_form(name)
            if hasattr(form, "patch_statistic"):
                requests[("patch", site.name)] = (site.input_name, *form.patch_statistic(site))
    return requests


def plan_ranks(sites: list, opts: CompressOptions, fixed_macs: int = 0, model=None, covariances=None, report=None,
               table=None, memo: dict | None = None) -> dict:
    """Layer name -> rank tuple before rounding, or None to leave the layer at full rank."""
    if opts.target_latency is not None:
        return _plan_latency(sites, opts, fixed_macs, model, covariances, report, table, memo if memo is not None else {})
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
                                             cache_path=opts.curves, probes=opts.probes, ray=opts.ray,
                                             probe_images=opts.probe_images, refit=opts.refit)
                planned, refined = _refined_allocation(sites, measured, opts, fixed_macs)
            except Unsupported as exc:
                if report is not None:
                    report.notes.append(f"measured budget unavailable ({exc}): uniform ratio used")
                return _choose_forms(sites, allocate_ranks(sites, opts, fixed_macs), opts, covariances, report, "uniform budget")
            if report is not None and measured.get("ray"):
                todo = len(measured["curves"]) - measured.get("cached_layers", 0)
                report.notes.append(f"--ray {measured['ray']}: the measured budget's {todo} layer curve(s) ran as Ray tasks")
            if report is not None and measured.get("curves_replaced"):
                report.notes.append(f"--curves {opts.curves} held curves of another model, calibration set or setting: "
                                    "measured again and replaced")
            if report is not None:
                # a --probe-images the probes could not take (the default, 128, is capped silently, as documented)
                if opts.probe_images != 128 and measured["eval_samples"] < opts.probe_images:
                    n = len(next(iter(opts.calibration.values())))
                    report.notes.append(f"the probes ran on {measured['eval_samples']} held-out calibration images, not the "
                                        f"{opts.probe_images} asked: at most a quarter of the {n} calibration images"
                                        " (and fewer for inputs bigger than CIFAR's)")
                curves = measured["curves"]
                report.sensitivity = {
                    "seconds": measured["seconds"], "eval_samples": measured["eval_samples"],
                    "cached_layers": measured.get("cached_layers", 0), "provider": measured.get("provider"),
                    **({"ray": measured["ray"]} if measured.get("ray") else {}),
                    "probes": measured.get("probes", 0) + refined, "options": sum(len(v) for v in curves.values()),
                    "curves": {k: [[m, d, list(r), bool(known)] for m, d, r, known, _ in v] for k, v in curves.items()},
                }
            return planned
        return _choose_forms(sites, allocate_ranks(sites, opts, fixed_macs), opts, covariances, report, "uniform budget")
    planned = {site.name: tuple(opts.ranks[site.name]) if site.name in opts.ranks
               else get_form(site.form).rule_ranks(site, opts.rank_method, opts.ratio, opts.energy) for site in sites}
    return _choose_forms(sites, planned, opts, covariances, report, opts.rank_method + " rule")


def _choose_forms(sites: list, planned: dict, opts: CompressOptions, covariances, report, rule: str) -> dict:
    """Where several forms take a layer (``--forms tucker2,spatial``) and a rule without measurements planned the
    first form's ranks: the form with the least error at those MACs (:meth:`FormChoice.choose`), recorded in
    ``report.form_choice`` (the note names what was written: :func:`_form_choice_note`)."""
    blas, layers = ThreadpoolController(), {}
    for site in sites:
        form = get_form(site.form)
        if not hasattr(form, "choose") or site.name in opts.ranks or planned.get(site.name) is None:
            continue
        cov = covariances.get(site.input_name) if covariances else None
        with blas.limit(limits=1, user_api="blas"):  # small SVDs: one BLAS thread (as the fits)
            planned[site.name], errors = form.choose(site, planned[site.name], covariance=cov, rank_multiple=opts.rank_multiple,
                                                     n_iter_max=opts.n_iter_max, method=opts.method)
        if errors:
            layers[site.name] = {"form": form.resolve(site, planned[site.name]).name, "forms": form.name.split("|"),
                                 "errors": {k: round(v, 6) for k, v in errors.items()}}
    if layers and report is not None:
        metric = "input-whitened by the calibration statistics" if covariances else "relative to the weight"
        report.form_choice = {"rule": rule, "metric": metric, "layers": layers}
    return planned


def _form_choice_note(report) -> str:
    """What the form choice wrote: the chains of each form (layers left whole afterwards not counted)."""
    choice, written = report.form_choice, {r.layer: r.form for r in report.layers if r.decomposed}
    forms = list(dict.fromkeys(f for entry in choice["layers"].values() for f in entry["forms"]))
    counts = {f: sum(written.get(name) == f for name in choice["layers"]) for f in forms}
    return (f"--forms {','.join(forms)}: each layer's form is the one with the least error ({choice['metric']}) at the MACs "
            f"the {forms[0]} {choice['rule']} gives the layer: " + ", ".join(f"{f} {k}" for f, k in counts.items()) + " chains")


def _explicit_ranks(sites: list, ranks: dict) -> dict:
    """``--ranks`` checked against the model: {site name: ranks}. Keys are layer names or 0-based indices (as
    ``--exclude``); each must name a layer a form takes, with as many ranks as that form has, each at most its
    mode's size. A FormChoice layer takes either form's length (which picks the form)."""
    by_key = {s.name: s for s in sites} | {str(i): s for i, s in enumerate(sites)}
    unknown = sorted(k for k in ranks if k not in by_key)
    if unknown:
        raise UsageError(f"--ranks names no layer of this model: {', '.join(unknown)} (see onnx-tucker inspect)")
    out = {}
    for key, values in ranks.items():
        site = by_key[key]
        if site.name in out:
            raise UsageError(f"--ranks gives {site.name} twice (by name and by index)")
        if not site.eligible:
            raise UsageError(f"--ranks {site.name}: the layer is not factored ({site.reason})")
        form = get_form(site.form)
        forms = {len(f.max_ranks(site)): f for f in getattr(form, "forms", (form,))}
        if len(values) not in forms:
            wanted = " or ".join(f"{n} for {f.name}" for n, f in forms.items())
            raise UsageError(f"--ranks {site.name}: {len(values)} rank(s) given, this layer takes {wanted}")
        limits = forms[len(values)].max_ranks(site)
        if any(r > m for r, m in zip(values, limits)):
            raise UsageError(f"--ranks {site.name}: {','.join(map(str, values))} exceeds {forms[len(values)].name}'s "
                             f"limits {','.join(map(str, limits))}")
        out[site.name] = tuple(values)
    return out


REFINE_ROUNDS = 6  # allocate, measure the chosen options that were predicted, allocate again


def _refined_allocation(sites: list, measured: dict, opts: CompressOptions, fixed_macs: int) -> tuple[dict, int]:
    """The knapsack on the curves, refined until every chosen option's distortion was measured, not
    predicted (or ``REFINE_ROUNDS`` is spent). Returns (layer -> ranks, probes run while refining); the seconds the
    refining took are added to ``measured["seconds"]`` (with cached curves it is all the measuring there is)."""
    from onnx_tucker.budget import allocate_measured

    started = time.perf_counter()
    try:
        return _refine(sites, measured, opts, fixed_macs, allocate_measured)
    finally:
        measured["seconds"] = round(measured["seconds"] + time.perf_counter() - started, 2)


def _refine(sites, measured, opts, fixed_macs, allocate_measured) -> tuple[dict, int]:
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


def _fit_all(decided: list, input_stats: dict | None, opts) -> dict:
    """Fit key -> factors, one fit per key, side by side on threads (``runtime.worker_threads``)."""
    from concurrent.futures import ThreadPoolExecutor

    from onnx_tucker.runtime import worker_threads

    jobs = {}
    for site, form, ranks, key in decided:
        jobs.setdefault(key, (site, form, ranks))

    def fit(item):
        site, form, ranks = item
        cov = input_stats.get(site.input_name) if input_stats else None
        return form.fit(site, ranks, n_iter_max=opts.n_iter_max, method=opts.method, input_covariance=cov)
    workers = min(worker_threads(), len(jobs))
    if workers <= 1:
        return {key: fit(item) for key, item in jobs.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(jobs, pool.map(fit, jobs.values())))


def _layout(site, chain) -> str:
    """The chain's nodes as kernel sizes, in data-flow order ("1x1 -> 3x3 -> 1x1"; "dense -> dense")."""
    if site.geometry is None:
        return " -> ".join("dense" for _ in chain.roles)
    own = getattr(get_form(chain.form), "layout", None)
    if own is not None:
        return own(site, chain)
    kxk = "x".join(str(k) for k in site.shape.kernel)
    pointwise = "x".join("1" for _ in site.shape.kernel)
    return " -> ".join(kxk if role == "core" else pointwise for role in chain.roles)


def _plan_latency(sites, opts, fixed_macs, model, covariances, report, table, memo: dict) -> dict:
    """``target_latency``: measured distortion curves, measured per-layer latencies, the latency knapsack.

    ``memo`` keeps the curves, costs and snapshot for a second plan; with ``memo["planned_target"]`` (the
    target corrected by a measurement, :func:`_target_latency`) the knapsack aims there."""
    from onnx_tucker.budget import allocate_latency
    from onnx_tucker.latency_table import option_costs, snapshot

    if opts.calibration is None:
        raise UsageError("a target latency needs calibration data (--calibrate): it spends latency against measured distortion")
    from onnx_tucker.sensitivity import Unsupported, distortion_curves

    if "curves" not in memo:
        try:
            memo["curves"] = distortion_curves(model, sites, opts.calibration, covariances, opts.rank_multiple, fixed_macs=fixed_macs,
                                               cache_path=opts.curves, probes="all", probe_images=opts.probe_images,
                                               refit=opts.refit)  # the latency knapsack wants exact curves
        except Unsupported as exc:
            raise ModelError(f"a target latency needs the measured distortion curves, unavailable here: {exc}") from None
        shapes = infer_shapes(model, opts.input_shapes) if opts.fold_affine else None  # the folded Mul/Add count with their layer
        memo["snap"] = snapshot(table, model, sites, shapes, input_shapes=opts.input_shapes)
        memo["costs"] = option_costs(table, sites, memo["curves"]["curves"], memo["snap"])
    measured, snap, costs = memo["curves"], memo["snap"], memo["costs"]
    target = memo.get("planned_target", opts.target_latency)
    planned, prediction = allocate_latency(sites, measured["curves"], costs, target, snap["whole_us"], snap["fixed_us"])
    if "correction" in memo:
        prediction = prediction | {"target": opts.target_latency, "planned_target": target, "correction": memo["correction"],
                                   "raw_predicted_ratio": prediction["predicted_ratio"],
                                   "predicted_ratio": prediction["predicted_ratio"] * memo["correction"],
                                   "predicted_us": prediction["predicted_us"] * memo["correction"]}
    if report is not None:
        report.sensitivity = {
            "seconds": measured["seconds"], "eval_samples": measured["eval_samples"],
            "cached_layers": measured.get("cached_layers", 0), "provider": measured.get("provider"),
            "probes": measured.get("probes", 0), "options": sum(len(v) for v in measured["curves"].values()),
            "curves": {k: [[m, d, list(r), bool(known)] for m, d, r, known, _ in v] for k, v in measured["curves"].items()},
        }
        report.latency["prediction"] = prediction
        report.latency["options"] = {name: {"original_us": before, "chains": [[list(r), us] for r, us in chain.items()]}
                                     for name, (before, chain) in costs.items()}
    return planned


def _set_metadata(model: onnx.ModelProto, report: Report) -> None:
    set_metadata(model, {
        "onnx_tucker.version": report.tool_version,
        "onnx_tucker.ratio": repr(report.ratio) if report.settings.get("ratio") is not None else "",
        "onnx_tucker.settings": json.dumps(report.settings, sort_keys=True),
        "onnx_tucker.ranks": json.dumps({r.layer: list(r.ranks) for r in report.layers if r.decomposed}, sort_keys=True),
        CHAINS_KEY: dump_chains(report.chains) if report.chains else "",
        # which hidden channels each pruned unit kept: a pruned model says what was done to it, as a factored one does
        "onnx_tucker.pruning": json.dumps({u["consumer"]: {"kind": u["kind"], "kept": u["kept"], "channels": u["channels"]}
                                           for u in report.pruning["units"]}, sort_keys=True) if report.pruning else "",
    })

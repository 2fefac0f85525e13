"""Measured rank budgets: how much the model's output moves when one layer is decomposed at each rank.

For every eligible layer and every rank option of its form (Tucker-2: both modes' channel fractions
from 1/16 to 3/4, at most 2x apart, and the two-conv shapes with one mode whole), the layer alone is
decomposed the way ``compress`` would with calibration data (whitened fit; the inner refit the calibration
does, a Tucker-2 core or a spatial chain's first conv, from the layer's moments; then the least-squares refit
of the last factor and bias on the layer's real inputs), folded back into a full-size weight,
and the model from that layer on is run on held-out calibration images with that weight in place.
The distortion is the mean KL divergence between the original and the perturbed class distributions
(relative squared error for outputs that are not class scores). ``budget.allocate_measured`` then
picks one option per layer so that the summed distortion is smallest under the MAC budget.

Cost (issue 15): every option's refit is solved from the layer's moments (the Gram matrix of its
sampled input patches and their products with its outputs, summed once over the fit images), which
also gives the option's layer-output error for free. With ``probes="auto"`` (the default) only
``PROBES`` options per layer, spread over that error's range, get a whole-model probe; the others are
predicted by a per-layer power law (distortion against layer error, fitted in log-log on the probed
ones), and the budget measures the options it chooses (and their neighbours) until every kept option
was measured (``refine``). On the seed CNN at 3x: 36 probes instead of 257, top-1 -0.84 against
-0.80 points (docs/probe_results.md).

Everything runs on one onnxruntime session in which each candidate's weight and bias are
graph inputs, so each measurement is one forward pass with no session rebuild.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from onnx_tucker.calibrate import patches_at
from onnx_tucker.capture import activation_bytes, batch_for_bytes, fixed_batch, iterate, run_all
from onnx_tucker.options import check_own_cache
from onnx_tucker.errors import UsageError, first_line
from onnx_tucker.factorization import get_form, not_worth_it
from onnx_tucker.graph import cut, expose, from_bytes, probe_model, suffix_model, tensor_types
from onnx_tucker.providers import fastest_available, probe_options
from onnx_tucker.providers import get as get_provider
from onnx_tucker.runtime import make_session, worker_threads
from onnx_tucker.trace import timed

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)

FIT_ROWS = 12_000  # sampled output positions per layer for the refit
EVAL_SAMPLES = 128  # calibration images the distortion is measured on (not used by the refit) ...
EVAL_ELEMENTS = 128 * 32 * 32 * 3  # ... at most this many input values in all (128 CIFAR images; issue 15) ...
EVAL_MIN = 8  # ... but at least this many images: a ResNet50 at 224 px gets 8, each probe costing 8 forward passes
FIT_SAMPLES = 512  # calibration images the per-option refits use
BATCH = 64
FIT_ITERATIONS = 1  # HOOI sweeps per option: the curves rank options, the final fit iterates fully
PROBES = 5  # whole-model probes per layer before the budget's refinement (probes="auto")
WHOLE_PROBES = None  # every probe in one session on the whole model: None = on a GPU provider (distortion_curves)
PROBE_MODES = ("auto", "all")
INNER_REFIT = True  # with refit "core", the probes refit what the calibration refits before the last factor (_solve)


class Unsupported(Exception):
    """The model has a candidate the measurement cannot handle; the caller falls back to the uniform rule."""


def rank_options(site, rank_multiple: int = 1) -> list[tuple]:
    """The rank tuples the measured budget tries for ``site``: its form's options."""
    return get_form(site.form).rank_options(site, rank_multiple)


def _bias_of(site) -> np.ndarray:
    try:
        bias = site.bias_values()
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    return np.zeros(site.shape.c_out, dtype=site.weight.dtype) if bias is None else bias.astype(site.weight.dtype)


def _probe_weights(site, solution: np.ndarray, inner: np.ndarray, w_name: str, b_name: str | None) -> dict:
    """The option's composed weight (and bias) in the site's own layout, as the probe's feeds."""
    from onnx_tucker.forms.svd import stored

    dtype = site.weight.dtype
    last = solution[:-1] if b_name is not None else solution  # (R, C_out)
    matrix = last.T @ inner  # (C_out, C_in*k...)
    if site.op == "Conv":
        feed = {w_name: matrix.reshape(site.weight.shape).astype(dtype)}
    else:
        alpha = float(site.node.attrs.get("alpha", 1.0)) if site.op == "Gemm" else 1.0
        feed = {w_name: (stored(site, matrix) / alpha).astype(dtype)}
    if b_name is not None:
        beta = float(site.node.attrs.get("beta", 1.0)) if site.op == "Gemm" else 1.0
        feed[b_name] = (solution[-1] / beta).astype(dtype)
    return feed


def _distortion(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean KL(original || perturbed) over samples for class scores, else relative squared error."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    out = output.astype(np.float64).reshape(len(output), -1)
    if reference.ndim == 2 and ref.shape[1] > 1:
        is_prob = ref.min() >= 0 and np.allclose(ref.sum(1), 1.0, atol=1e-3)
        p = ref if is_prob else _softmax(ref)
        q = np.clip(out, 1e-12, None) if is_prob else _softmax(out)
        p = np.clip(p, 1e-12, None)
        return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), 1e-30))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


SCHEMA = "onnx-tucker.curves/4"  # /2: each point says whether it was measured or predicted; /3: every output counts;
# /4: the probes refit a Tucker-2 core and a spatial chain's first conv (refit "core"), as the calibration does


class CurveCache:
    """Curves on disk (``--curves FILE``): a run at another target reuses them, an interrupted run resumes.

    Valid only for the same model (graph and every weight), calibration inputs and measurement settings
    (one key over all of them); each layer's entry also records the options it was measured at.
    Written atomically after every layer.
    """

    def __init__(self, path, model: onnx.ModelProto, feeds: dict, rank_multiple: int, seed: int, probe_images: int = EVAL_SAMPLES,
                 inner_refit: bool = True):
        import hashlib
        import json
        from pathlib import Path

        self.path = Path(path)
        digest = hashlib.sha256()
        for node in model.graph.node:
            digest.update(node.SerializeToString(deterministic=True))
        for init in model.graph.initializer:
            digest.update(init.name.encode())
            digest.update(init.raw_data or init.SerializeToString(deterministic=True))
        for name in sorted(feeds):
            digest.update(name.encode() + str(feeds[name].shape).encode() + str(feeds[name].dtype).encode())
            digest.update(np.ascontiguousarray(feeds[name]).tobytes())
        digest.update(json.dumps([SCHEMA, rank_multiple, seed, probe_images, EVAL_ELEMENTS, EVAL_MIN, FIT_SAMPLES, FIT_ROWS, FIT_ITERATIONS,
                                  inner_refit]).encode())
        self.key = digest.hexdigest()
        self.layers = {}
        self.replaced = False  # the file held curves of another model, calibration set or setting
        data = check_own_cache(self.path, "--curves")  # a file that is not a curves file is refused, not overwritten
        if data is not None:
            if data.get("key") == self.key:
                self.layers = data.get("layers", {})
            else:
                self.replaced = True

    def get(self, name: str, options: list) -> list | None:
        entry = self.layers.get(name)
        if entry is None or [tuple(o) for o in entry["options"]] != [tuple(o) for o in options]:
            return None
        return [(int(m), float(d), tuple(r), bool(measured), float(e)) for m, d, r, measured, e in entry["curve"]]

    def put(self, name: str, options: list, curve: list) -> None:
        import json

        from onnx_tucker.outputs import replace_cache_file

        self.layers[name] = {"options": [list(o) for o in options], "curve": [[m, d, list(r), bool(k), e] for m, d, r, k, e in curve]}
        try:  # another run sharing the file may have added layers since: keep them
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("key") == self.key:
                self.layers = {**data.get("layers", {}), **self.layers}
        except (OSError, ValueError):
            pass
        try:
            replace_cache_file(self.path, json.dumps({"schema": SCHEMA, "key": self.key, "layers": self.layers}), "--curves")
        except OSError as exc:
            raise UsageError(f"--curves {self.path}: cannot write it: {first_line(exc)}") from None


def eval_samples(feeds: dict, wanted: int = EVAL_SAMPLES) -> int:
    """Held-out images the distortion is measured on: ``wanted`` (``EVAL_SAMPLES`` by default), fewer for big
    inputs (at most ``EVAL_ELEMENTS`` input values per ``EVAL_SAMPLES`` wanted, at least ``EVAL_MIN`` images),
    and at most a quarter of the data. Every probe runs the model on all of them, and the cut activations of
    every layer are kept for them."""
    n = len(next(iter(feeds.values())))
    per_sample = sum(int(np.prod(v.shape[1:], dtype=np.int64)) for v in feeds.values())
    return min(wanted, max(EVAL_MIN, EVAL_ELEMENTS * wanted // EVAL_SAMPLES // max(per_sample, 1)), max(n // 4, 1))


def measured_options(candidates: list, rank_multiple: int, fixed_macs: int) -> dict:
    """Each site's rank options worth measuring (profitable, not crumbs)."""
    total = fixed_macs + sum(c.shape.macs() for c in candidates)
    return {cand.name: [r for r in rank_options(cand, rank_multiple)
                        if not not_worth_it(cand, r, get_form(cand.form).cost(cand, r), total)] for cand in candidates}


def distortion_curves(model: onnx.ModelProto, candidates: list, feeds: dict, covariances: dict | None,
                      rank_multiple: int = 1, seed: int = 0, progress: bool = True, fixed_macs: int = 0,
                      cache_path=None, probes: str = "auto", ray: str | None = None, probe_images: int = EVAL_SAMPLES,
                      refit: str = "core", _setup: bool = False) -> dict:
    """Layer -> [(chain MACs, distortion, ranks, measured, layer-output error)], plus the seconds it took
    and ``refine(wanted)``, which measures chosen options (and their neighbours) that were only predicted.

    ``probes="all"`` measures every option with a whole-model probe (the exact curves). ``"auto"``
    computes every option's layer-output error (cheap: a small solve from the layer's moments), measures
    ``PROBES`` options spread over that error's range, and predicts the others by a per-layer power law
    fitted on those; the budget then refines (``refine``) near its choice until every chosen option is
    measured (issue 15: the same allocations with far fewer probes).

    ``probe_images``: held-out calibration images each probe runs on (:func:`eval_samples`). ``refit``: the
    calibration's refit mode; with "core" (the default) each option's fit refits what that refit will (a Tucker-2
    core, a spatial chain's first conv: the form's ``refit_from_moments``) before the last factor, else the last
    factor alone.
    With ``cache_path`` the curves are read from and written to that file (:class:`CurveCache`).
    With ``ray`` (``"auto"`` or a cluster address) each layer's curve is a Ray task (``onnx_tucker.fanout``):
    the same curves, measured over the cluster's workers; the cache is still written here, layer by layer.
    Raises :class:`Unsupported` for models the probe cannot handle (non-2-D or grouped convs
    among the candidates, unknown spatial sizes, non-constant biases).
    """
    start = time.perf_counter()
    options = measured_options(candidates, rank_multiple, fixed_macs)
    inner_refit = INNER_REFIT and refit == "core"
    cache = CurveCache(cache_path, model, feeds, rank_multiple, seed, probe_images, inner_refit) if cache_path is not None else None
    cached = {c.name: cache.get(c.name, options[c.name]) for c in candidates} if cache is not None else {}
    n = len(next(iter(feeds.values())))
    n_eval = eval_samples(feeds, probe_images)
    if not _setup and cache is not None and all(v is not None for v in cached.values()) and (probes != "all" or all(map(_all_measured, cached.values()))):
        def refine(wanted: dict) -> int:  # the measuring state is built only if the budget wants a probe
            full = distortion_curves(model, candidates, feeds, covariances, rank_multiple, seed, progress, fixed_macs,
                                     cache_path, probes, probe_images=probe_images, refit=refit, _setup=True)
            runs = full["refine"](wanted)
            cached.update(full["curves"])
            return runs
        return {"curves": cached, "seconds": round(time.perf_counter() - start, 2), "eval_samples": n_eval,
                "cached_layers": len(cached), "probes": 0, "refine": refine}
    fit_feeds = {k: v[: min(n - n_eval, FIT_SAMPLES)] if n > n_eval else v for k, v in feeds.items()}
    eval_feeds = {k: np.asarray(v[n - n_eval :]) for k, v in feeds.items()}  # fed whole to every probe
    probe, names = probe_model(model, candidates)
    # The activations each option's suffix model is fed with (residual branches too) are outputs as well.
    cuts = {cand.name: cut(probe, cand.node.name) for cand in candidates}
    known = set(feeds) | {n for c in candidates for n in names[c.name][:2] if n}
    cut_tensors = list(dict.fromkeys(t for tensors in cuts.values() if tensors for t in tensors if t not in known))
    types = tensor_types(model)
    if any(t not in {o.name for o in probe.graph.output} for t in cut_tensors):
        expose(probe, cut_tensors, types)  # shape tensors are int64: typed by inference
    provider = fastest_available()  # probes run where they run fastest (CUDA when present)
    session = make_session(probe, provider, provider_options=probe_options(provider))
    # On a GPU every probe runs the whole model in this one session: a probe's few images cost the GPU next
    # to nothing, while a suffix model per layer cost a CUDA session each (0.5 s; a ResNet50 needs ~80 of them).
    # The CPU runs the suffix from the layer on: there the computing is what costs. (Ray tasks: their own sessions.)
    whole_probes = (get_provider(provider).device != "cpu" if WHOLE_PROBES is None else WHOLE_PROBES) and ray is None
    output_names = [o.name for o in model.graph.output]  # every output counts: a head's convs move only theirs
    fixed = fixed_batch(model)  # a torch export's batch of 1: every run below goes in batches of it
    weights = {}
    for cand in candidates:
        w_name, b_name, _, _ = names[cand.name]
        weights[w_name] = np.ascontiguousarray(cand.weight)
        if b_name is not None:
            weights[b_name] = _bias_of(cand)
    geometries = {}
    for cand in candidates:
        if cand.op != "Conv":  # a dense layer: its "patches" are its input rows
            if cand.shape.out_spatial is None:
                raise Unsupported(f"{cand.name} is a dense layer of unknown input shape")
            geometries[cand.name] = None
            continue
        geometry = cand.geometry.as_2d() if cand.geometry is not None else None
        if geometry is None or cand.shape.in_spatial is None or cand.shape.out_spatial is None:
            raise Unsupported(f"{cand.name} is not a 2-D ungrouped conv of known size")
        geometries[cand.name] = geometry
    # Per layer, the Gram matrices of the sampled patches (inputs, with a ones column for the bias) and
    # their products with the outputs, summed batch by batch over the fit images: every option's
    # least-squares refit is then solved from these small matrices, without keeping any patch rows.
    n_fit = len(next(iter(fit_feeds.values())))
    per_image = {c.name: max(1, FIT_ROWS // max(n_fit, 1)) for c in candidates}
    todo = [c for c in candidates if cached.get(c.name) is None or (probes == "all" and not _all_measured(cached[c.name]))]
    stats = {}

    def collect(cands: list) -> None:
        """One pass over the fit images: the moments of each of ``cands``."""
        # one generator per layer: its sampled rows do not depend on which other layers are collected
        index = {c.name: i for i, c in enumerate(candidates)}
        rngs = {c.name: np.random.default_rng([seed, index[c.name]]) for c in cands}
        for cand in cands:
            stats[cand.name] = _Moments(names[cand.name][1] is not None)
        fetch = [t for t in dict.fromkeys(t for c in cands for t in names[c.name][2:4]) if t not in graph_inputs]
        # every layer's input and output of a batch are fetched at once: fewer images a batch for big models
        batch_size = batch_for_bytes(sum(activation_bytes(c.shape, "in") + activation_bytes(c.shape, "out") for c in cands), BATCH)
        def rows_of(cand, values) -> None:  # a layer's sampled rows of a batch: its own generator and moments
            x, y = values[names[cand.name][2]], values[names[cand.name][3]]
            if geometries[cand.name] is None:  # dense: rows of (features) per sample
                x2, y2 = x.reshape(len(x), -1, x.shape[-1]), y.reshape(len(y), -1, y.shape[-1])
                count = min(per_image[cand.name], x2.shape[1])
                pick = np.stack([rngs[cand.name].choice(x2.shape[1], count, replace=False) for _ in range(len(x2))])
                n_idx = np.repeat(np.arange(len(x2)), count)
                stats[cand.name].add(x2[n_idx, pick.ravel()], y2[n_idx, pick.ravel()])
                return
            oh_total, ow_total = y.shape[2], y.shape[3]
            count = min(per_image[cand.name], oh_total * ow_total)
            n_idx = np.repeat(np.arange(len(x)), count)
            flat = np.concatenate([rngs[cand.name].choice(oh_total * ow_total, count, replace=False) for _ in range(len(x))])
            oh, ow = np.divmod(flat, ow_total)
            stats[cand.name].add(patches_at(x, n_idx, oh, ow, geometries[cand.name]), y[n_idx, :, oh, ow])

        # The layers of a batch side by side on threads of one BLAS thread each (gathering patches holds one
        # core per layer; a 16-core GPU machine did a ResNet50's 53 layers one after another). Each layer keeps
        # its generator and its batches' order, so the moments are the same in any thread order.
        workers = min(worker_threads(), len(cands))
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool, \
                (threadpool_limits(limits=1, user_api="blas") if workers > 1 else nullcontext()):
            for batch, outputs in (iterate(session, fit_feeds, fetch, fixed or batch_size, extra=weights, fixed=fixed is not None)
                                   if cands else ()):
                values = dict(zip(fetch, outputs))
                values.update(batch)
                if workers > 1:
                    list(pool.map(lambda cand: rows_of(cand, values), cands))
                else:
                    for cand in cands:
                        rows_of(cand, values)
            list(pool.map(lambda cand: stats[cand.name]._flush(), cands))  # a Ray job carries the Gram matrices, not rows

    graph_inputs = {i.name for i in model.graph.input}
    with timed(f"plan: moments of {len(todo)} layers"):
        collect(todo)
    # Each option only changes one layer: run the model from that layer on, fed at the cut with
    # the original activations (computed once), not the whole model.
    # A cut tensor computed from shapes (a size read off the input for a later Resize or Reshape) has no row per
    # image: it is fed whole to every batch, like the weights, with the value the eval batch gives it.
    sizes = _shape_computed(session, eval_feeds, cut_tensors, weights, fixed, types)
    rows = [t for t in cut_tensors if t not in sizes]
    with timed(f"plan: reference outputs on {n_eval} held-out images"):
        values = run_all(session, eval_feeds, output_names + rows, extra=weights, fixed=fixed)
    reference, at_cut = dict(zip(output_names, values)), dict(zip(rows, values[len(output_names):]))
    if sizes:
        _, first = next(iterate(session, eval_feeds, sizes, fixed or n_eval, extra=weights, fixed=fixed is not None))
        at_cut.update(zip(sizes, first))
    at_cut.update(eval_feeds)
    at_cut.update(weights)
    by_name = {c.name: c for c in candidates}
    curves = {name: curve for name, curve in cached.items() if curve is not None}

    def job_of(cand) -> LayerJob:
        if cand.name not in stats:  # a cached curve: its moments were never computed in this run
            collect([cand])
        w_name, b_name, _, _ = names[cand.name]
        known = {tuple(e[2]): e[1] for e in curves.get(cand.name, []) if e[3]}
        return LayerJob(
            site=detached(cand), options=options[cand.name], weight_name=w_name, bias_name=b_name,
            whole=whole_probes or cuts[cand.name] is None,
            feed_names=list(eval_feeds) + list(weights) if whole_probes or cuts[cand.name] is None else cuts[cand.name],
            covariance=covariances.get(cand.input_name) if covariances else None,
            moments=stats[cand.name], probes=probes, known=known, refit_inner=inner_refit)

    shared = dict(probe=probe, reference=reference, at_cut=at_cut, provider=provider,
                  constants=sorted(weights) + sizes, fixed=fixed)

    def done(name, curve):
        curves[name] = curve
        if cache is not None:
            cache.put(name, options[name], curve)

    from tqdm import tqdm

    count = sum(len(options[c.name]) if probes == "all" else min(PROBES, len(options[c.name])) for c in todo)
    if ray is not None and todo:
        from onnx_tucker.fanout import cluster, map_tasks

        jobs = [job_of(cand) for cand in todo]
        # the probe crosses as bytes; each task builds its own suffix model and session
        shared["probe"] = probe.SerializeToString()
        shared["threads"] = 1  # a task holds one of the cluster's CPUs
        with cluster(ray):
            map_tasks(layer_curve, jobs, shared=shared, labels=[f"layer {j.site.name}" for j in jobs],
                      weights=[len(j.options) for j in jobs], progress=progress, desc="measuring ranks", unit="option",
                      on_result=lambda i, curve: done(jobs[i].site.name, curve))  # cached as each layer arrives
    else:
        # A bar on a terminal only (disable=None): measuring takes (layers x probes) forward passes.
        jobs = [job_of(cand) for cand in todo]
        with timed(f"plan: rank options fitted ({sum(len(j.options) for j in jobs)} options, {len(jobs)} layers)"):
            errors = all_option_errors(jobs, progress=progress)  # every option's fit, layers in parallel
        bar = tqdm(total=count, desc="measuring ranks", unit="probe", file=sys.stderr, leave=False,
                   disable=None if progress else True)
        with timed(f"plan: {count} probes on {provider}"):
            for cand, job, layer_errors in zip(todo, jobs, errors):
                done(cand.name, layer_curve(job, **shared, session=session, on_option=bar.update, errors=layer_errors))
        bar.close()

    def refine(wanted: dict) -> int:
        """Measure the wanted (layer -> ranks) options not measured yet, with their neighbours on the layer's
        curve (in MACs); updates the curves (and the cache). Returns the number of probes run."""
        runs, todo_refine = 0, []
        for name, ranks in wanted.items():
            curve = curves[name]
            order = sorted(range(len(curve)), key=lambda i: curve[i][0])
            position = order.index(next(i for i, e in enumerate(curve) if tuple(e[2]) == tuple(ranks)))
            near = [order[j] for j in (position - 1, position, position + 1) if 0 <= j < len(order)]
            missing = [tuple(curve[i][2]) for i in near if not curve[i][3]]
            if missing:
                todo_refine.append((name, missing))
        bar = tqdm(total=sum(len(m) for _, m in todo_refine), desc="refining ranks", unit="probe", file=sys.stderr,
                   leave=False, disable=None if progress else True)
        with timed(f"plan: {sum(len(m) for _, m in todo_refine)} refining probes in {len(todo_refine)} layers"):
            for name, missing in todo_refine:
                job = job_of(by_name[name])
                errors = {tuple(e[2]): e[4] for e in curves[name]}
                with threadpool_limits(limits=1, user_api="blas"):
                    measured = _measure(job, missing, _suffix(job, **shared, session=session), reference, bar.update)
                job.known.update(measured)
                runs += len(missing)
                done(name, _predicted_curve(job.site, job.options, errors, job.known))
        bar.close()
        return runs

    curves = {c.name: curves[c.name] for c in candidates}  # graph order, cached or not (refine updates this dict)
    result = {"curves": curves, "seconds": round(time.perf_counter() - start, 2), "eval_samples": n_eval,
              "cached_layers": len(candidates) - len(todo), "provider": provider, "probes": count, "refine": refine,
              "curves_replaced": bool(cache is not None and cache.replaced)}
    if ray is not None:
        result["ray"] = ray
    return result


def _shape_computed(session, feeds: dict, tensors: list, weights: dict, fixed: int | None, types: dict) -> list:
    """The ``tensors`` that do not depend on the images, only on their shapes: the same value on two different
    batches of the same size (an int64 size for a Resize, a float scale computed from shapes). Not by dtype: a
    per-image mask is bool, a computed scale float. Where the eval images are too few for two batches, the
    non-float tensors."""
    if not tensors:
        return []
    n = len(next(iter(feeds.values())))
    size = fixed or max(1, min(8, n // 2))
    if n < 2 * size:
        return [t for t in tensors if types.get(t) not in (None, *FLOAT_TYPES)]
    batches = iterate(session, {k: v[: 2 * size] for k, v in feeds.items()}, tensors, size, extra=weights, fixed=fixed is not None)
    (_, first), (_, second) = next(batches), next(batches)
    return [t for t, a, b in zip(tensors, first, second) if np.shape(a) == np.shape(b) and np.array_equal(a, b)]


class _Node:
    """What the curve of a layer reads of its graph node (a picklable stand-in for the gs.Node)."""

    def __init__(self, node):
        self.name, self.op, self.attrs = node.name, node.op, dict(node.attrs)


def detached(site):
    """``site`` without its graph: the values a fit, a compose and a cost need, safe to send to a worker."""
    from dataclasses import replace

    return replace(site, node=_Node(site.node), extra=dict(site.extra))


@dataclass
class LayerJob:
    """One layer's measurement: everything it needs besides what all layers share (see :func:`layer_curve`)."""

    site: object  # a detached Site
    options: list  # rank tuples, in this order
    weight_name: str  # the probe's graph inputs for this layer's weight and bias
    bias_name: str | None
    whole: bool  # the whole probe runs (a later node holds a subgraph), not the suffix from this layer on
    feed_names: list  # what the suffix (or the whole probe) is fed with from ``at_cut``
    covariance: object  # the input's channel covariance or None
    moments: "_Moments"  # the layer's sampled input/output moments on the fit images
    probes: str  # "auto" or "all"
    known: dict  # ranks -> distortion already measured (a cached curve)
    refit_inner: bool = True  # refit what the calibration's "core" mode refits before the last factor (:func:`_solve`)


def layer_curve(job: LayerJob, probe, reference: dict, at_cut: dict, provider: str,
                constants=(), fixed: int | None = None, session=None, threads: int | None = None, on_option=None,
                errors: dict | None = None) -> list:
    """One layer's curve [(MACs, distortion, ranks, measured, layer error)]: the same bits here or in a Ray task.

    Every option's layer-output error comes from the moments; the whole-model probe runs for every option
    (``probes="all"``) or for ``PROBES`` of them spread over those errors, the rest predicted.
    ``probe`` is the probe model (or its bytes); ``reference``: the original model's outputs on the eval images,
    by name (each counts: :func:`_measure`); ``at_cut`` holds every cut tensor, the eval feeds and the
    original weights (``constants``: their names; the rest has a row per image); ``fixed``: the batch the model
    is fixed to, if any; ``session`` (optional) is an open session on the probe, used when the whole probe runs;
    ``threads``: onnxruntime's intra-op threads (None: its default). numpy's BLAS runs on one thread
    throughout (the products' rounding then does not depend on the machine's thread count; and the
    small products are faster so). ``errors``: the options' layer-output errors when already computed
    (:func:`option_errors`).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        errors = errors if errors is not None else option_errors(job)
        chosen = list(errors) if job.probes == "all" else _spread(errors, PROBES)
        chosen = [r for r in chosen if r not in job.known]
        known = dict(job.known)
        if chosen:
            suffix = _suffix(job, probe, reference, at_cut, provider, constants, fixed, session, threads)
            # a Ray task (threads=1) holds one of the cluster's CPUs: its solves stay on it
            known.update(_measure(job, chosen, suffix, reference, on_option, workers=1 if threads == 1 else None))
        return _predicted_curve(job.site, job.options, errors, known)


def option_errors(job: LayerJob) -> dict:
    """Ranks -> the option's layer-output relative error (a fit and a small solve each, no probe)."""
    return {tuple(r): _solve(job, r)[1] for r in job.options}


def all_option_errors(jobs: list, workers: int | None = None, progress: bool = False) -> list[dict]:
    """:func:`option_errors` of every job, layers side by side on ``workers`` threads (default: the CPUs,
    at most ``runtime.WORKERS``).

    The fits are numpy/LAPACK work that releases the GIL, one BLAS thread each (as in :func:`layer_curve`):
    the same numbers in any order, the cores all busy (a ResNet50 spent 135 s here on one core)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if workers is None:  # each thread holds a layer's fit in memory
        workers = worker_threads()
    workers = max(1, min(workers, len(jobs)))
    bar = tqdm(total=len(jobs), desc="fitting ranks", unit="layer", file=sys.stderr, leave=False,
               disable=None if progress else True)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if workers == 1:
                return [_tick(bar, option_errors(job)) for job in jobs]
            # The biggest layers first: in graph order a ResNet50's conv5 layers (the longest fits) started last
            # and the other threads waited for them. The results keep the jobs' order.
            order = sorted(range(len(jobs)), key=lambda i: -_fit_work(jobs[i]))
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                futures = {i: pool.submit(option_errors, jobs[i]) for i in order}
                return [_tick(bar, futures[i].result()) for i in range(len(jobs))]
            finally:  # an error or Ctrl-C surfaces now: the queued layers are dropped, the running ones not awaited
                pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()


def _fit_work(job: LayerJob) -> int:
    """A layer's fitting work, for ordering only: its weight's size times its options."""
    return int(np.prod(job.site.weight.shape)) * len(job.options)


def _tick(bar, value):
    bar.update(1)
    return value


def _solve(job: LayerJob, ranks) -> tuple[dict, float]:
    """The option's probe feed (composed weight and bias) and its layer-output relative error."""
    cand = job.site
    form = get_form(cand.form)
    factors = form.fit(cand, ranks, n_iter_max=FIT_ITERATIONS, input_covariance=job.covariance)
    # every factor before the last as one (R, C_in*k*k) map: its output at each sampled position
    inner = form.compose(cand, factors, upto_last=True)
    solution, error = job.moments.solve(inner)
    refit = getattr(form, "refit_from_moments", None) if job.refit_inner else None  # the calibration refits more than the last factor
    refitted = refit(cand, factors, job.moments) if refit is not None else factors
    if refitted is not factors:  # kept where it leaves less error, as the calibration keeps a refit
        inner_r = form.compose(cand, refitted, upto_last=True)
        solution_r, error_r = job.moments.solve(inner_r)
        if error_r <= error:
            inner, solution, error = inner_r, solution_r, error_r
    return _probe_weights(cand, solution, inner, job.weight_name, job.bias_name), error


def _suffix(job: LayerJob, probe, reference, at_cut, provider, constants=(), fixed=None, session=None, threads=None):
    """A function: an option's probe feed -> {output: value} for the model's outputs that the job's layer can move
    (those computed from it on), run from the layer on over the eval images."""
    feeds = {t: at_cut[t] for t in job.feed_names}
    outputs = list(reference)
    if job.whole:
        session = session if session is not None else make_session(from_bytes(probe), provider, threads, probe_options(provider))
    else:
        model = from_bytes(probe)
        index = next(i for i, n in enumerate(model.graph.node) if n.name == job.site.node.name)
        written = {o for n in model.graph.node[index:] for o in n.output}
        outputs = [o for o in outputs if o in written]  # an output made before the layer cannot move
        if not outputs:  # a dead branch: the layer reaches no output, so no option moves any
            return lambda feed: {}
        session = make_session(suffix_model(model, job.site.node.name, outputs, feeds), provider, threads, probe_options(provider))
    whole = {k: v for k, v in feeds.items() if k in set(constants)}
    rows = {k: v for k, v in feeds.items() if k not in whole}

    def run(feed: dict) -> dict:
        return dict(zip(outputs, run_all(session, rows, outputs, extra={**whole, **feed}, fixed=fixed)))

    return run


def _measure(job: LayerJob, ranks_list: list, suffix, reference: dict, on_option=None, workers: int | None = None) -> dict:
    """Ranks -> measured distortion of each option (one forward pass each): the mean over the model's outputs
    of each one's distortion (:func:`_distortion`; 0 for an output the layer cannot move). ``workers``: threads
    solving the options' weights (:func:`_option_feeds`; default the CPUs)."""
    out = {}
    for ranks, feed in _option_feeds(job, ranks_list, workers):
        result = suffix(feed)
        out[tuple(ranks)] = sum(_distortion(reference[name], value) for name, value in result.items()) / len(reference)
        if on_option is not None:
            on_option()
    return out


FEED_BYTES = 1 << 30  # option weights solved ahead of their probes, at most (a VGG's fc option holds ~400 MB)


def _option_feeds(job: LayerJob, ranks_list: list, workers: int | None = None):
    """(ranks, probe feed) of each option in order, solved a few at a time side by side on threads (numpy that
    releases the GIL; BLAS as the caller limits it): on an H100 machine the probes' own solves, one after
    another on one core, were most of a ResNet50's probe time (264 probes: 37 s, the GPU idle). Each option's
    solve is its own, so the feeds are the same bytes as solved one by one."""
    from onnx_tucker.decompose import adopt_memo, memo_entries

    workers = worker_threads() if workers is None else workers
    per_chunk = max(1, min(workers, len(ranks_list) - 1, FEED_BYTES // max(job.site.weight.nbytes, 1)))
    if not ranks_list:
        return
    # The first here: it leaves the layer's covariance root and SVD in this thread's memo, which the helper
    # threads then start from (each computing them again cost time and a copy each of their memory).
    yield ranks_list[0], _solve(job, ranks_list[0])[0]
    rest = ranks_list[1:]
    if per_chunk <= 1:
        for ranks in rest:
            yield ranks, _solve(job, ranks)[0]
        return
    shared = memo_entries()

    def solve(ranks):
        adopt_memo(shared)
        return _solve(job, ranks)[0]
    with ThreadPoolExecutor(max_workers=per_chunk) as pool:
        for start in range(0, len(rest), per_chunk):
            chunk = rest[start : start + per_chunk]
            yield from zip(chunk, pool.map(solve, chunk))


class _Moments:
    """Gram matrix of one layer's sampled input rows (a ones column appended when it has a bias), their
    products with the output rows and the outputs' squared norm: what every option's refit needs.

    Rows are buffered and multiplied ``FLUSH_ROWS`` at a time: a big model's batches hold a few images,
    and a thin product plus a fresh D x D sum per batch cost a ResNet50 four minutes (issue 15)."""

    FLUSH_ROWS = 4096
    FLUSH_BYTES = 32 << 20  # buffered input rows per layer (a ResNet50 has 53 layers buffering at once)

    def __init__(self, bias: bool):
        self.bias = bias
        self.gram = self.cross = None
        self.norm = 0.0
        self.count = 0  # rows summed
        self.pending, self.rows = [], 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.pending.append((x, y))
        self.rows += len(x)
        self.count += len(x)
        if self.rows >= self.FLUSH_ROWS or self.rows * x.shape[1] * x.itemsize >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        x = np.concatenate([p[0] for p in self.pending]).astype(np.float64, copy=False)
        y = np.concatenate([p[1] for p in self.pending]).astype(np.float64, copy=False)
        self.pending, self.rows = [], 0
        if self.bias:
            x = np.hstack([x, np.ones((len(x), 1))])
        gram, cross = x.T @ x, x.T @ y
        if self.gram is None:
            self.gram, self.cross = gram, cross
        else:
            self.gram += gram
            self.cross += cross
        self.norm += float(np.sum(y * y))

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(Gram matrix, cross products) of every row added."""
        self._flush()
        return self.gram, self.cross

    def solve(self, inner: np.ndarray) -> tuple[np.ndarray, float]:
        """Least squares of the outputs on ``[patches @ inner.T, 1]`` (a small ridge) from the moments;
        returns the (R [+1], C_out) solution and the relative output error it leaves."""
        self._flush()
        if self.bias:
            lift = np.zeros((inner.shape[0] + 1, inner.shape[1] + 1))
            lift[:-1, :-1], lift[-1, -1] = inner, 1.0
        else:
            lift = inner
        gram = lift @ self.gram @ lift.T
        rhs = lift @ self.cross
        ridge = (1e-6 * np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
        solution = np.linalg.solve(gram + ridge, rhs)
        residual = float(np.sum(solution * (gram @ solution)) - 2 * np.sum(solution * rhs) + self.norm)
        return solution, float(np.sqrt(max(residual, 0.0) / max(self.norm, 1e-30)))


def _spread(errors: dict, count: int) -> list[tuple]:
    """``count`` options spread evenly over the range of layer-output errors (log scale), extremes included."""
    ranked = sorted(errors, key=lambda r: errors[r])
    if len(ranked) <= count:
        return ranked
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, count)).astype(int))
    return [ranked[i] for i in picks]


def _predicted_curve(cand, options: list, errors: dict, known: dict) -> list:
    """[(MACs, distortion, ranks, measured, layer error)]: measured distortions where known, else predicted
    from the layer-output error by a power law fitted on this layer's measured options (log-log)."""
    form = get_form(cand.form)
    points = [(errors[r], d) for r, d in known.items() if r in errors and errors[r] > 0 and d > 0]
    if len(points) >= 2:
        le, ld = np.log([p[0] for p in points]), np.log([p[1] for p in points])
        slope = float(np.clip(np.polyfit(le, ld, 1)[0], 0.5, 4.0)) if np.ptp(le) > 1e-9 else 2.0
        offset = float(np.mean(ld - slope * le))
    elif points:
        slope, offset = 2.0, float(np.log(points[0][1]) - 2.0 * np.log(points[0][0]))
    else:
        slope, offset = 2.0, 0.0
    curve = []
    for ranks in options:
        r = tuple(ranks)
        if r in known:
            value, measured = known[r], True
        else:
            value, measured = float(np.exp(offset + slope * np.log(max(errors[r], 1e-12)))), False
        curve.append((form.cost(cand, r).macs, float(value), r, measured, float(errors[r])))
    return curve


def _all_measured(curve: list) -> bool:
    return all(entry[3] for entry in curve)

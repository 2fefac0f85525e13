"""Measured rank budgets: how much the model's output moves when one layer is decomposed at each rank.

For every eligible 2-D conv and every candidate rank pair (both modes' channel fractions
from 1/16 to 3/4, at most 2x apart), the layer alone is decomposed
the way ``compress`` would with calibration data (whitened Tucker-2, then the
least-squares refit of the last factor and bias on the layer's real inputs), folded back
into a full-size weight, and the *whole model* is run on held-out calibration images with
that weight in place. The distortion is the mean KL divergence between the original and
the perturbed class distributions (relative squared error for outputs that are not
class scores). ``budget.allocate_measured`` then picks one option per layer so that the
summed distortion is smallest under the MAC budget.

Everything runs on one onnxruntime session in which each candidate's weight and bias are
graph inputs, so each measurement is one forward pass with no session rebuild.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from onnx_tucker.calibrate import patches_at, relu_solve
from onnx_tucker.capture import iterate
from onnx_tucker.factorization import get_form, not_worth_it
from onnx_tucker.graph import cut, expose, feeds_only_relu, probe_model, suffix_model, tensor_types
from onnx_tucker.providers import fastest_available
from onnx_tucker.runtime import make_session

FIT_ROWS = 12_000  # sampled output positions per layer for the refit
EVAL_SAMPLES = 128  # calibration images the distortion is measured on (not used by the refit)
FIT_SAMPLES = 512  # calibration images the per-option refits use
BATCH = 64
RELU_AWARE = False  # ReLU-aware refits in the curves: same allocation on the seed CNN, 4x slower
FIT_ITERATIONS = 1  # HOOI sweeps per option: the curves rank options, the final fit iterates fully


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


class CurveCache:
    """Curves on disk (``--curves FILE``): a run at another target reuses them, an interrupted run resumes.

    Valid only for the same model (graph and every weight), calibration inputs and measurement settings
    (one key over all of them); each layer's entry also records the options it was measured at.
    Written atomically after every layer.
    """

    def __init__(self, path, model: onnx.ModelProto, feeds: dict, rank_multiple: int, seed: int):
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
        digest.update(json.dumps([rank_multiple, seed, EVAL_SAMPLES, FIT_SAMPLES, FIT_ROWS, FIT_ITERATIONS, RELU_AWARE]).encode())
        self.key = digest.hexdigest()
        self.layers = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("key") == self.key:
                self.layers = data.get("layers", {})

    def get(self, name: str, options: list) -> list | None:
        entry = self.layers.get(name)
        if entry is None or [tuple(o) for o in entry["options"]] != [tuple(o) for o in options]:
            return None
        return [(int(m), float(d), tuple(r)) for m, d, r in entry["curve"]]

    def put(self, name: str, options: list, curve: list) -> None:
        import json
        import os

        self.layers[name] = {"options": [list(o) for o in options], "curve": [[m, d, list(r)] for m, d, r in curve]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"schema": "onnx-tucker.curves/1", "key": self.key, "layers": self.layers}))
        os.replace(tmp, self.path)


def measured_options(candidates: list, rank_multiple: int, fixed_macs: int) -> dict:
    """Each site's rank options worth measuring (profitable, not crumbs)."""
    total = fixed_macs + sum(c.shape.macs() for c in candidates)
    return {cand.name: [r for r in rank_options(cand, rank_multiple)
                        if not not_worth_it(cand, r, get_form(cand.form).cost(cand, r), total)] for cand in candidates}


def distortion_curves(model: onnx.ModelProto, candidates: list, feeds: dict, covariances: dict | None,
                      rank_multiple: int = 1, seed: int = 0, progress: bool = True, fixed_macs: int = 0,
                      cache_path=None, ray: str | None = None) -> dict:
    """Layer -> [(chain MACs, measured distortion, ranks)], plus the seconds it took.

    With ``cache_path`` the curves are read from and written to that file (:class:`CurveCache`).
    With ``ray`` (``"auto"`` or a cluster address) each layer's curve is a Ray task (``onnx_tucker.fanout``):
    the same curves, measured over the cluster's workers; the cache is still written here, layer by layer.
    Raises :class:`Unsupported` for models the probe cannot handle (non-2-D or grouped convs
    among the candidates, unknown spatial sizes, non-constant biases).
    """
    start = time.perf_counter()
    options = measured_options(candidates, rank_multiple, fixed_macs)
    cache = CurveCache(cache_path, model, feeds, rank_multiple, seed) if cache_path is not None else None
    cached = {c.name: cache.get(c.name, options[c.name]) for c in candidates} if cache is not None else {}
    n = len(next(iter(feeds.values())))
    n_eval = min(EVAL_SAMPLES, max(n // 4, 1))
    if cache is not None and all(v is not None for v in cached.values()):
        return {"curves": cached, "seconds": round(time.perf_counter() - start, 2), "eval_samples": n_eval,
                "cached_layers": len(cached)}
    n_eval = min(EVAL_SAMPLES, max(n // 4, 1))
    fit_feeds = {k: v[: min(n - n_eval, FIT_SAMPLES)] if n > n_eval else v for k, v in feeds.items()}
    eval_feeds = {k: v[n - n_eval :] for k, v in feeds.items()}
    probe, names = probe_model(model, candidates)
    # The activations each option's suffix model is fed with (residual branches too) are outputs as well.
    cuts = {cand.name: cut(probe, cand.node.name) for cand in candidates}
    known = set(feeds) | {n for c in candidates for n in names[c.name][:2] if n}
    cut_tensors = list(dict.fromkeys(t for tensors in cuts.values() if tensors for t in tensors if t not in known))
    if any(t not in {o.name for o in probe.graph.output} for t in cut_tensors):
        expose(probe, cut_tensors, tensor_types(model))  # shape tensors are int64: typed by inference
    provider = fastest_available()  # probes run where they run fastest (CUDA when present)
    session = make_session(probe, provider)
    output_name = model.graph.output[0].name
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
    # Sampled patches (inputs) and outputs of every layer on the fit images, batch by batch.
    rng = np.random.default_rng(seed)
    n_fit = len(next(iter(fit_feeds.values())))
    per_image = {c.name: max(1, FIT_ROWS // max(n_fit, 1)) for c in candidates}
    rows = {c.name: ([], []) for c in candidates}
    fetch = []
    for cand in candidates:
        fetch += [names[cand.name][2], names[cand.name][3]]
    graph_inputs = {i.name for i in model.graph.input}
    fetch = [t for t in dict.fromkeys(fetch) if t not in graph_inputs]
    for batch, outputs in iterate(session, fit_feeds, fetch, BATCH, extra=weights):
        values = dict(zip(fetch, outputs))
        values.update(batch)
        for cand in candidates:
            x, y = values[names[cand.name][2]], values[names[cand.name][3]]
            if geometries[cand.name] is None:  # dense: rows of (features) per sample
                x2, y2 = x.reshape(len(x), -1, x.shape[-1]), y.reshape(len(y), -1, y.shape[-1])
                count = min(per_image[cand.name], x2.shape[1])
                pick = np.stack([rng.choice(x2.shape[1], count, replace=False) for _ in range(len(x2))])
                n_idx = np.repeat(np.arange(len(x2)), count)
                rows[cand.name][0].append(x2[n_idx, pick.ravel()].astype(np.float64))
                rows[cand.name][1].append(y2[n_idx, pick.ravel()].astype(np.float64))
                continue
            oh_total, ow_total = y.shape[2], y.shape[3]
            count = min(per_image[cand.name], oh_total * ow_total)
            n_idx = np.repeat(np.arange(len(x)), count)
            flat = np.concatenate([rng.choice(oh_total * ow_total, count, replace=False) for _ in range(len(x))])
            oh, ow = np.divmod(flat, ow_total)
            rows[cand.name][0].append(patches_at(x, n_idx, oh, ow, geometries[cand.name]).astype(np.float64))
            rows[cand.name][1].append(y[n_idx, :, oh, ow].astype(np.float64))
    # Each option only changes one layer: run the model from that layer on, fed at the cut with
    # the original activations (computed once), not the whole model.
    values = session.run([output_name] + cut_tensors, {**eval_feeds, **weights})
    reference, at_cut = values[0], dict(zip(cut_tensors, values[1:]))
    at_cut.update(eval_feeds)
    at_cut.update(weights)
    todo = [c for c in candidates if cached.get(c.name) is None]
    curves = {name: curve for name, curve in cached.items() if curve is not None}

    def job_of(cand) -> LayerJob:
        w_name, b_name, _, y_name = names[cand.name]
        return LayerJob(
            site=detached(cand), options=options[cand.name], weight_name=w_name, bias_name=b_name,
            whole=cuts[cand.name] is None, feed_names=list(eval_feeds) + list(weights) if cuts[cand.name] is None else cuts[cand.name],
            relu=feeds_only_relu(model, y_name),
            covariance=covariances.get(cand.input_name) if covariances else None,
            patches=np.concatenate(rows[cand.name][0]), target=np.concatenate(rows[cand.name][1]))

    shared = dict(probe=probe, reference=reference, at_cut=at_cut, output_name=output_name, provider=provider)

    def done(job, curve):
        curves[job.site.name] = curve
        if cache is not None:
            cache.put(job.site.name, job.options, curve)

    if ray is not None and todo:
        from onnx_tucker.fanout import cluster, map_tasks

        jobs = []
        for cand in todo:
            jobs.append(job_of(cand))
            del rows[cand.name]  # the job holds them now
        # the probe crosses as bytes; each task builds its own suffix model and session
        shared["probe"] = probe.SerializeToString()
        shared["threads"] = 1  # a task holds one of the cluster's CPUs
        with cluster(ray):
            map_tasks(layer_curve, jobs, shared=shared, labels=[f"layer {j.site.name}" for j in jobs],
                      weights=[len(j.options) for j in jobs], progress=progress, desc="measuring ranks", unit="option",
                      on_result=lambda i, curve: done(jobs[i], curve))  # cached as each layer arrives
    else:
        from tqdm import tqdm

        # A bar on a terminal only (disable=None): measuring takes (layers x options) forward passes.
        bar = tqdm(total=sum(len(options[c.name]) for c in todo), desc="measuring ranks", unit="option", file=sys.stderr,
                   leave=False, disable=None if progress else True)
        for cand in todo:  # one layer's concatenated rows at a time (memory as before)
            job = job_of(cand)
            done(job, layer_curve(job, **shared, session=session, on_option=bar.update))
            del job
        bar.close()
    curves = {c.name: curves[c.name] for c in candidates}  # graph order, cached or not
    result = {"curves": curves, "seconds": round(time.perf_counter() - start, 2), "eval_samples": n_eval,
              "cached_layers": len(candidates) - len(todo), "provider": provider}
    if ray is not None:
        result["ray"] = ray
    return result


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
    options: list  # rank tuples, measured in this order
    weight_name: str  # the probe's graph inputs for this layer's weight and bias
    bias_name: str | None
    whole: bool  # the whole probe runs (a later node holds a subgraph), not the suffix from this layer on
    feed_names: list  # what the suffix (or the whole probe) is fed with from ``at_cut``
    relu: bool
    covariance: object  # the input's channel covariance or None
    patches: np.ndarray  # sampled inputs (rows) of the layer on the fit images, float64
    target: np.ndarray  # and its outputs there


def layer_curve(job: LayerJob, probe, reference: np.ndarray, at_cut: dict, output_name: str, provider: str,
                session=None, threads: int | None = None, on_option=None) -> list:
    """[(chain MACs, distortion, ranks)] of one layer, one entry per option: the same bits here or in a Ray task.

    ``probe`` is the probe model (or its bytes); ``at_cut`` holds every cut tensor, the eval feeds and the
    original weights; ``session`` (optional) is an open session on the probe, used when the whole probe runs;
    ``threads``: onnxruntime's intra-op threads (None: its default). numpy's BLAS runs on one thread
    throughout (the products' rounding then does not depend on the machine's thread count; and the
    small products are faster so).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _layer_curve(job, probe, reference, at_cut, output_name, provider, session, threads, on_option)


def _layer_curve(job, probe, reference, at_cut, output_name, provider, session, threads, on_option) -> list:
    cand = job.site
    suffix_feeds = {t: at_cut[t] for t in job.feed_names}
    if job.whole:
        suffix_session = session if session is not None else make_session(_as_model(probe), provider, threads)
    else:
        suffix_session = make_session(suffix_model(_as_model(probe), cand.node.name, output_name, suffix_feeds), provider, threads)
    patches, target = job.patches, job.target
    design_ones = np.ones((len(patches), 1 if job.bias_name is not None else 0))  # a MatMul: no intercept
    form = get_form(cand.form)
    curve = []
    for ranks in job.options:
        factors = form.fit(cand, ranks, n_iter_max=FIT_ITERATIONS, input_covariance=job.covariance)
        # every factor before the last as one (R, C_in*k*k) map: its output at each sampled position
        inner = form.compose(cand, factors, upto_last=True)
        design = np.hstack([patches @ inner.T, design_ones])
        gram = design.T @ design
        gram += (1e-6 * np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
        solution = np.linalg.solve(gram, design.T @ target)
        if job.relu and RELU_AWARE:
            solution = relu_solve(design, target, solution, 1e-6, iterations=2)
        feed = _probe_weights(cand, solution, inner, job.weight_name, job.bias_name)
        out = suffix_session.run([output_name], {**suffix_feeds, **feed})[0]
        curve.append((form.cost(cand, ranks).macs, _distortion(reference, out), tuple(ranks)))
        if on_option is not None:
            on_option()
    return curve


def _as_model(probe) -> onnx.ModelProto:
    if isinstance(probe, (bytes, bytearray)):
        model = onnx.ModelProto()
        model.ParseFromString(probe)
        return model
    return probe

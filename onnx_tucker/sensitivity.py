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

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from onnx_tucker.calibrate import feeds_only_relu, patches_at, relu_solve
from onnx_tucker.decompose import max_ranks, tucker2
from onnx_tucker.ranks import round_to_multiple
from onnx_tucker.runtime import make_session

FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4)
FIT_ROWS = 12_000  # sampled output positions per layer for the refit
EVAL_SAMPLES = 128  # calibration images the distortion is measured on (not used by the refit)
FIT_SAMPLES = 512  # calibration images the per-option refits use
BATCH = 64
PROBE = "onnx_tucker_probe"
RELU_AWARE = False  # ReLU-aware refits in the curves: same allocation on the seed CNN, 4x slower
SKEW = 2.0  # largest ratio between the two modes' rank fractions
FIT_ITERATIONS = 1  # HOOI sweeps per option: the curves rank options, the final fit iterates fully


class Unsupported(Exception):
    """The model has a candidate the measurement cannot handle; the caller falls back to the uniform rule."""


def rank_options(cand, rank_multiple: int = 1) -> list[tuple[int, int]]:
    """Distinct profitable (R_out, R_in) pairs: channel fractions from ``FRACTIONS`` for each mode,
    the two at most ``SKEW`` apart (measured on the seed CNN: the knapsack then often keeps R_in
    near R_out / 2, and the 5x drop went from -3.3 to -2.6 points against equal fractions)."""
    shape = cand.shape
    max_out, max_in = max_ranks(cand.weight.shape)
    seen = []
    for f_out in FRACTIONS:
        for f_in in FRACTIONS:
            if max(f_out, f_in) > SKEW * min(f_out, f_in) + 1e-9:
                continue
            r_out = round_to_multiple(min(max(1, round(f_out * shape.c_out)), max_out), rank_multiple, max_out)
            r_in = round_to_multiple(min(max(1, round(f_in * shape.c_in)), max_in), rank_multiple, max_in)
            if (r_out, r_in) not in seen and shape.chain_macs(r_out, r_in) < shape.macs():
                seen.append((r_out, r_in))
    return seen


def _geometry(node, weight_shape, in_hw) -> tuple | None:
    """(kernel, strides, pads [t, l, b, r], dilations) of a 2-D, ungrouped conv, else None."""
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape", weight_shape[2:]))
    if len(kernel) != 2 or attrs.get("group", 1) != 1 or in_hw is None or None in in_hw:
        return None
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:  # SAME_UPPER / SAME_LOWER: output size ceil(in / stride), the odd pixel at the end / start
        pads = [0, 0, 0, 0]
        for axis in range(2):
            out = math.ceil(in_hw[axis] / strides[axis])
            total = max((out - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - in_hw[axis], 0)
            small, big = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    return kernel, strides, pads, dilations


def _probe_model(model: onnx.ModelProto, candidates: list) -> tuple[onnx.ModelProto, dict]:
    """``model`` with each candidate's weight and bias fed as graph inputs, and its input/output exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {}
    by_name = {n.name: n for n in probe.graph.node}
    graph_outputs = {o.name for o in probe.graph.output}
    for i, cand in enumerate(candidates):
        node = by_name[cand.node.name]
        w_name, b_name = f"{PROBE}_W{i}", f"{PROBE}_B{i}"
        node.input[1] = w_name
        if len(node.input) > 2:
            node.input[2] = b_name
        else:
            node.input.append(b_name)
        dtype = onnx.helper.np_dtype_to_tensor_dtype(cand.weight.dtype)
        probe.graph.input.append(onnx.helper.make_tensor_value_info(w_name, dtype, list(cand.weight.shape)))
        probe.graph.input.append(onnx.helper.make_tensor_value_info(b_name, dtype, [cand.shape.c_out]))
        for tensor in (node.input[0], node.output[0]):
            if tensor not in graph_outputs and tensor not in {i.name for i in model.graph.input}:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, dtype, None))
                graph_outputs.add(tensor)
        names[cand.name] = (w_name, b_name, node.input[0], node.output[0])
    return probe, names


def _cut(probe: onnx.ModelProto, node_name: str) -> list[str] | None:
    """Tensors the model needs from node ``node_name`` on (in its topological order) that come from
    before it: activations, graph inputs and probe weights. None when a later node holds a subgraph
    (its outer-scope references are invisible here), and the whole model must run instead."""
    nodes = list(probe.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node_name)
    tail = nodes[index:]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in tail for a in n.attribute):
        return None
    produced = {o for n in tail for o in n.output}
    initializers = {i.name for i in probe.graph.initializer}
    return [t for t in dict.fromkeys(t for n in tail for t in n.input) if t and t not in produced and t not in initializers]


def _suffix_model(probe: onnx.ModelProto, node_name: str, output: str, cut_values: dict) -> onnx.ModelProto:
    """The part of ``probe`` from node ``node_name`` on, taking ``cut_values``' tensors as inputs."""
    nodes = list(probe.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node_name)
    tail = nodes[index:]
    needed = set(t for n in tail for t in n.input)
    inputs = [
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), None)
        for name, value in cut_values.items()
    ]
    graph = onnx.helper.make_graph(
        tail, f"{probe.graph.name}_suffix", inputs,
        [o for o in probe.graph.output if o.name == output],
        [i for i in probe.graph.initializer if i.name in needed],
    )
    suffix = onnx.helper.make_model(graph, opset_imports=probe.opset_import, ir_version=probe.ir_version)
    suffix.functions.extend(probe.functions)
    return suffix


def _expose(probe: onnx.ModelProto, tensors: list[str], model: onnx.ModelProto) -> None:
    """Add ``tensors`` to ``probe``'s outputs, typed by shape inference (shape tensors are int64)."""
    from onnx_tucker.pipeline import _shape_skeleton

    present = {o.name for o in probe.graph.output}
    missing = [t for t in tensors if t not in present]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(_shape_skeleton(model), strict_mode=False)
        graph = inferred.graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.output)}
    except Exception:
        types = {}
    for name in missing:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None))


def _bias_of(model: onnx.ModelProto, cand) -> np.ndarray:
    node_inputs = cand.node.inputs
    if len(node_inputs) > 2 and node_inputs[2] is not None and getattr(node_inputs[2], "values", None) is not None:
        return np.asarray(node_inputs[2].values).astype(cand.weight.dtype).reshape(-1)
    if len(node_inputs) > 2 and node_inputs[2] is not None and node_inputs[2].name:
        raise Unsupported(f"bias of {cand.name} is not a constant")
    return np.zeros(cand.shape.c_out, dtype=cand.weight.dtype)


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


def distortion_curves(model: onnx.ModelProto, candidates: list, feeds: dict, covariances: dict | None,
                      rank_multiple: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Layer -> [(chain MACs, measured distortion, (R_out, R_in))], plus the seconds it took.

    Raises :class:`Unsupported` for models the probe cannot handle (non-2-D or grouped convs
    among the candidates, unknown spatial sizes, non-constant biases).
    """
    start = time.perf_counter()
    n = len(next(iter(feeds.values())))
    n_eval = min(EVAL_SAMPLES, max(n // 4, 1))
    fit_feeds = {k: v[: min(n - n_eval, FIT_SAMPLES)] if n > n_eval else v for k, v in feeds.items()}
    eval_feeds = {k: v[n - n_eval :] for k, v in feeds.items()}
    probe, names = _probe_model(model, candidates)
    # The activations each option's suffix model is fed with (residual branches too) are outputs as well.
    cuts = {cand.name: _cut(probe, cand.node.name) for cand in candidates}
    known = set(feeds) | {n for c in candidates for n in names[c.name][:2]}
    cut_tensors = list(dict.fromkeys(t for cut in cuts.values() if cut for t in cut if t not in known))
    _expose(probe, cut_tensors, model)
    session = make_session(probe)
    output_name = model.graph.output[0].name
    weights = {}
    for cand in candidates:
        w_name, b_name, _, _ = names[cand.name]
        weights[w_name] = np.ascontiguousarray(cand.weight)
        weights[b_name] = _bias_of(model, cand)
    geometries = {}
    for cand in candidates:
        geometry = _geometry(cand.node, cand.weight.shape, cand.shape.in_spatial)
        if geometry is None or cand.shape.out_spatial is None:
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
    for begin in range(0, n_fit, BATCH):
        batch = {k: v[begin : begin + BATCH] for k, v in fit_feeds.items()}
        values = dict(zip(fetch, session.run(fetch, {**batch, **weights})))
        values.update(batch)
        for cand in candidates:
            x, y = values[names[cand.name][2]], values[names[cand.name][3]]
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
    options = {cand.name: rank_options(cand, rank_multiple) for cand in candidates}
    from tqdm import tqdm

    # A bar on a terminal only (disable=None): measuring takes (layers x options) forward passes.
    bar = tqdm(total=sum(map(len, options.values())), desc="measuring ranks", unit="option", file=sys.stderr,
               leave=False, disable=None if progress else True)
    curves = {}
    for cand in candidates:
        if cuts[cand.name] is None:
            suffix_session, suffix_feeds = session, {**eval_feeds, **weights}
        else:
            suffix_feeds = {t: at_cut[t] for t in cuts[cand.name]}
            suffix_session = make_session(_suffix_model(probe, cand.node.name, output_name, suffix_feeds))
        patches = np.concatenate(rows[cand.name][0])
        target = np.concatenate(rows[cand.name][1])
        design_ones = np.ones((len(patches), 1))
        relu = feeds_only_relu(model, names[cand.name][3])
        w_name, b_name, _, _ = names[cand.name]
        cov = covariances.get(cand.node.inputs[0].name) if covariances else None
        curve = []
        for r_out, r_in in options[cand.name]:
            with threadpool_limits(limits=1, user_api="blas"):  # small eigh calls: one thread is faster
                factors = tucker2(cand.weight, r_out, r_in, n_iter_max=FIT_ITERATIONS, input_covariance=cov)
            # first then core as one (R_out, C_in*k*k) map: the core's output at each sampled position
            inner = np.einsum("rskl,sc->rckl", factors.core.astype(np.float64), factors.first.astype(np.float64))
            inner = inner.reshape(r_out, -1)
            design = np.hstack([patches @ inner.T, design_ones])
            gram = design.T @ design
            gram += (1e-6 * np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
            solution = np.linalg.solve(gram, design.T @ target)
            if relu and RELU_AWARE:
                solution = relu_solve(design, target, solution, 1e-6, iterations=2)
            weight = (solution[:-1].T @ inner).reshape(cand.weight.shape).astype(cand.weight.dtype)
            bias = solution[-1].astype(cand.weight.dtype)
            out = suffix_session.run([output_name], {**suffix_feeds, w_name: weight, b_name: bias})[0]
            curve.append((cand.shape.chain_macs(r_out, r_in), _distortion(reference, out), (r_out, r_in)))
            bar.update()
        curves[cand.name] = curve
    bar.close()
    return {"curves": curves, "seconds": round(time.perf_counter() - start, 2), "eval_samples": n_eval}

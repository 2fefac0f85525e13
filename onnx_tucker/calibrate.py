"""Data-aware Tucker from calibration activations (captured with onnxruntime).

Two tools, both measured in docs/calibration.md:
- ``input_covariances``: second moment of each conv's input channels on the
  original model, used by ``decompose.tucker2`` to whiten the input mode.
- ``refit_last_convs``: layer after layer in graph order, a least-squares refit of
  each chain's last 1x1 conv (weight and bias) so that, fed the *compressed*
  model's own activations, it reproduces the *original* layer's output: each layer
  corrects what the earlier ones changed.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from onnx_tucker.capture import batch_size_for, capture_named, fixed_batch, iterate
from onnx_tucker.graph import Initializers, feeds_only_relu, nodes_by_name, prefix_model, with_outputs
from onnx_tucker.runtime import make_session
from onnx_tucker.site import GeometryError, conv_geometry

MAX_ROWS = 30_000
ROW_SPREAD = 4  # candidate positions per sampled row: the images a layer's rows come from hold >= 4 x MAX_ROWS positions
MIN_IMAGES = 512  # ... and are at least this many (128 calibration images in all ruined a refit: issue 12 finding)
MIN_ROWS_PER_UNKNOWN = 20
CORE_RIDGE = 1e-2  # the core refit shrinks towards the Tucker solution: it has many unknowns  # pixel samples per layer for the least-squares refit
BATCH = 64
COV_POSITIONS = 64  # spatial positions per sample for the input covariances


def input_covariances(model: onnx.ModelProto, feeds: dict, tensor_names: list[str], seed: int = 0,
                      axes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Channel second moment E[x x^T] (over samples and positions) of each named NC... tensor
    (channels on ``axes[name]``: 1 by default, -1 for a dense layer's features).

    Estimated on at most ``COV_POSITIONS`` random positions per sample: plenty for a C x C
    moment, and it keeps calibration time flat in the image size.
    """
    names = list(dict.fromkeys(tensor_names))
    exposed = with_outputs(model, names)
    session = make_session(exposed)
    rng = np.random.default_rng(seed)
    sums = {n: None for n in names}
    counts = {n: 0 for n in names}
    for _, values in iterate(session, feeds, names, batch_size_for(model, BATCH), fixed=fixed_batch(model) is not None):
        for name, value in zip(names, values):
            if (axes or {}).get(name, 1) != 1:
                value = np.moveaxis(value, (axes or {})[name], 1) if value.ndim > 2 else value
            flat = value.reshape(value.shape[0], value.shape[1], -1)
            if flat.shape[2] > COV_POSITIONS:
                flat = flat[:, :, rng.choice(flat.shape[2], COV_POSITIONS, replace=False)]
            x = np.moveaxis(flat, 1, 0).reshape(value.shape[1], -1).astype(np.float32, copy=False)
            gram = (x @ x.T).astype(np.float64)  # float32 products, float64 sums across batches
            sums[name] = gram if sums[name] is None else sums[name] + gram
            counts[name] += x.shape[1]
    return {n: sums[n] / max(counts[n], 1) for n in names}


def _flat(value: np.ndarray, axis: int = 1) -> np.ndarray:
    """(N, C, spatial...) with channels on ``axis`` -> (rows, C), rows ordered sample-major."""
    return np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])


def _rows(value: np.ndarray, pick: np.ndarray, axis: int = 1) -> np.ndarray:
    """(N, C, spatial...) -> (rows, C) at the chosen flat positions."""
    return _flat(value, axis)[pick]


def refit_chains(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict, chains: list,
                 ridge: float = 1e-6, seed: int = 0, mode: str = "last", relu_aware: bool = True) -> dict:
    """Sequential least-squares refit of each chain's last node; edits ``compressed`` (and ``chains``) in place.

    ``mode="last"`` refits the last 1x1 conv and bias; ``mode="core"`` also refits the core by
    reduced-rank regression, for forms that have one, where there are enough calibration rows.
    Returns per-layer output errors (relative, on the calibration rows) before and after.
    """
    start = time.perf_counter()
    nodes = nodes_by_name(compressed)
    inits = Initializers(compressed)
    chains = [c for c in chains if c.nodes.get(c.last_role) in nodes]
    targets = [c.output for c in chains]
    axes = {c.output: c.channel_axis for c in chains}
    # The original layers' outputs: computed once, on the original model.
    reference = capture_named(with_outputs(original, targets), feeds, targets, batch_size=batch_size_for(original, BATCH))
    rng = np.random.default_rng(seed)
    picks, images = {}, {}
    n = len(next(iter(feeds.values())))
    for name, value in reference.items():
        per_image = value.size // value.shape[axes[name]] // n
        # The rows come from a seeded subset of the images, large enough that the rows stay spread
        # (ROW_SPREAD x MAX_ROWS positions, at least MIN_IMAGES images): each layer's input is then
        # captured on that subset only (a ResNet-20's 32x32 layers: 512 of 2048 images).
        count = min(n, max(MIN_IMAGES, -(-ROW_SPREAD * MAX_ROWS // per_image)))
        chosen = np.sort(rng.choice(n, count, replace=False)) if count < n else np.arange(n)
        local = np.sort(rng.choice(count * per_image, min(count * per_image, MAX_ROWS), replace=False))
        global_rows = chosen[local // per_image] * per_image + local % per_image
        picks[name], images[name] = (local, global_rows), chosen
    target_rows = {name: _rows(v, picks[name][1], axes[name]) for name, v in reference.items()}
    del reference
    result = {"layers": {}, "samples": int(n)}
    for chain in chains:
        last = nodes[chain.nodes[chain.last_role]]
        core_node = nodes.get(chain.nodes.get("core", ""))
        target = target_rows[chain.output].astype(np.float64)
        pick = picks[chain.output][0]  # flat positions within the chosen images
        feeds_of_layer = feeds if len(images[chain.output]) == n else {k: v[images[chain.output]] for k, v in feeds.items()}
        relu = relu_aware and feeds_only_relu(compressed, chain.output)
        if core_node is not None and core_node.name == last.name:  # 1x1 -> kxk: the kxk core writes the output
            result["layers"][chain.layer] = _refit_kxk_last(compressed, chain, last, inits, feeds_of_layer, pick, target, ridge, relu)
            continue
        # The core refit has R_in*k*k unknowns per output channel: with too few calibration
        # rows (late layers with small feature maps) it over-fits, so refit only the last conv.
        if (mode == "core" and core_node is not None and _is_2d_conv(core_node)
                and len(pick) >= MIN_ROWS_PER_UNKNOWN * _core_unknowns(core_node, inits)):
            first_out = core_node.input[0]
            f = _collect(compressed, feeds_of_layer, first_out)
            geometry = _core_geometry(core_node, inits, f.shape[2:])
            if geometry is not None:
                result["layers"][chain.layer] = _refit_core_and_last(compressed, chain, core_node, last, inits, f, pick, target, geometry, ridge, relu)
                continue
        before_last = last.input[0]
        z = _rows(_collect(compressed, feeds_of_layer, before_last), pick, chain.channel_axis).astype(np.float64)
        result["layers"][chain.layer] = _refit_last(chain, last, inits, z, target, ridge, relu=relu)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


RELU_ITERATIONS = 3
RELU_RIDGE = 1e-3
RELU_ROWS = 16_000  # rows per layer for the per-channel ReLU-aware solves


def relu_solve(design: np.ndarray, target: np.ndarray, solution: np.ndarray, ridge: float,
               iterations: int = RELU_ITERATIONS, max_rows: int = RELU_ROWS, seed: int = 0) -> np.ndarray:
    """Least squares on what the ReLU lets through: per output channel, the rows where the
    original or the fitted pre-activation is positive (elsewhere both are cut to 0 and any
    error is invisible downstream). Iterated, since the fitted side moves. One Gram matrix per
    channel, so it runs on a row subsample in float32 (the solve itself is float64)."""
    if len(design) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(design), max_rows, replace=False))
        design, target = design[keep], target[keep]
    d32 = design.astype(np.float32)
    eye = np.eye(design.shape[1])
    # Where the original is cut by the ReLU, reaching 0 is enough: aiming at the negative
    # value would spend the fit on error nobody downstream sees.
    relu_target = np.maximum(target, 0)
    for _ in range(iterations):
        active = (target > 0) | ((design @ solution) > 0)
        new = np.empty_like(solution)
        for c in range(target.shape[1]):
            mask = active[:, c]
            if mask.sum() < MIN_ROWS_PER_UNKNOWN * len(eye):  # (nearly) dead channel: too few rows to refit
                new[:, c] = solution[:, c]
                continue
            rows = d32[mask]
            gram = (rows.T @ rows).astype(np.float64)
            lam = RELU_RIDGE * np.trace(gram) / len(gram) + 1e-12  # shrink towards the linear fit
            new[:, c] = np.linalg.solve(gram + lam * eye, design[mask].T @ relu_target[mask, c] + lam * solution[:, c])
        solution = new
    return solution


def _owned_last(chain, last, inits):
    """The last node's weight and bias initializers, owned by this chain (copied if shared, bias created;
    a MatMul has no bias: None)."""
    role = chain.last_role
    weight_init = inits.owned(last, 1, f"{chain.weights[role]}")
    w = inits.array(weight_init.name)
    chain.weights[role] = weight_init.name
    if last.op_type == "MatMul":
        return weight_init, w, None
    out_channels = w.shape[0] if _out_first(last) else w.shape[1]
    bias = inits.bias(last, out_channels, w.dtype, f"{chain.nodes[role]}_B")
    chain.bias = bias.name
    return weight_init, w, bias


def _out_first(node) -> bool:
    """Whether the node's weight is stored (out, in, ...): a Conv, or a Gemm with transB=1."""
    if node.op_type == "Conv":
        return True
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)


def _beta(node) -> float:
    return next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0


def _refit_last(chain, last, inits, z, target, ridge, relu: bool = False) -> dict:
    """Least squares for the last node's weight (and bias, where it has one), given its input rows ``z``."""
    weight_init, w, bias = _owned_last(chain, last, inits)
    matrix = w.reshape(w.shape[0], -1) if _out_first(last) else w.T  # (out, in)
    beta = _beta(last)
    b0 = beta * inits.array(bias.name).astype(np.float64).reshape(-1) if bias is not None else 0.0
    before = z @ matrix.T.astype(np.float64) + b0
    if bias is None:  # MatMul: no intercept
        gram = z.T @ z
        gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
        solution = np.linalg.solve(gram, z.T @ target)
        if relu:
            solution = relu_solve(z, target, solution, ridge)
        after = z @ solution
        clip = (lambda v: np.maximum(v, 0)) if relu else (lambda v: v)  # noqa: E731
        result = _errors(clip(before), clip(after), clip(target), "last factor" + (" (after the ReLU)" if relu else ""))
        if _kept(result):
            inits.set(weight_init.name, solution.astype(w.dtype) if not _out_first(last) else solution.T.reshape(w.shape).astype(w.dtype))
        return result

    def store(solution):
        weights = solution[:-1].T.reshape(w.shape) if _out_first(last) else solution[:-1]
        inits.set(weight_init.name, weights.astype(w.dtype))
        inits.set(bias.name, (solution[-1] / beta).astype(w.dtype))
    design = np.hstack([z, np.ones((len(z), 1))])
    gram = design.T @ design
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    solution = np.linalg.solve(gram, design.T @ target)  # (R_out + 1, C_out)
    if relu:
        solution = relu_solve(design, target, solution, ridge)
        after = design @ solution
        relu_target = np.maximum(target, 0)
        result = _errors(np.maximum(before, 0), np.maximum(after, 0), relu_target, "last conv (after the ReLU)")
    else:
        result = _errors(before, design @ solution, target, "last conv")
    if _kept(result):
        store(solution)
    return result


def _refit_kxk_last(model, chain, last, inits, feeds, pick, target, ridge, relu) -> dict:
    """Least squares for a kxk last conv (weight and bias) on the im2col rows of its real input, shrunk
    towards the fitted core (it has R_in*k*k unknowns per output channel); skipped with too few rows."""
    if not _is_2d_conv(last) or len(pick) < MIN_ROWS_PER_UNKNOWN * (_core_unknowns(last, inits) + 1):
        return {"refit": "none (a kxk last conv needs a 2-D ungrouped conv and enough calibration rows)",
                "output_error_before": None, "output_error_after": None}
    f = _collect(model, feeds, last.input[0])
    geometry = _core_geometry(last, inits, f.shape[2:])
    if geometry is None:
        return {"refit": "none (unsupported core geometry)", "output_error_before": None, "output_error_after": None}
    weight_init, w, bias = _owned_last(chain, last, inits)
    p = _patches(f, pick, _output_hw(f.shape[2:], geometry), geometry).astype(np.float64)
    design = np.hstack([p, np.ones((len(p), 1))])
    prior = np.vstack([w.reshape(w.shape[0], -1).T.astype(np.float64), inits.array(bias.name).astype(np.float64)[None, :]])
    before = design @ prior
    gram = design.T @ design
    lam = max(ridge, CORE_RIDGE) * np.trace(gram) / len(gram) + 1e-12
    solution = np.linalg.solve(gram + lam * np.eye(len(gram)), design.T @ target + lam * prior)
    if relu:
        solution = relu_solve(design, target, solution, ridge)
        clip = (lambda v: np.maximum(v, 0))  # noqa: E731
        result = _errors(clip(before), clip(design @ solution), clip(target), "kxk last conv (after the ReLU)")
    else:
        result = _errors(before, design @ solution, target, "kxk last conv")
    if _kept(result):
        inits.set(weight_init.name, solution[:-1].T.reshape(w.shape).astype(w.dtype))
        inits.set(bias.name, solution[-1].astype(w.dtype))
    return result


def _kept(result: dict) -> bool:
    """Whether a refit is kept: never one that is worse than the factors it replaces on the calibration rows."""
    if result["output_error_after"] <= result["output_error_before"]:
        return True
    result["output_error_after"] = result["output_error_before"]
    result["refit"] += ": not kept (no better than the fit)"
    return False


def _errors(before, after, target, what) -> dict:
    norm = np.linalg.norm(target) or 1.0
    return {
        "refit": what,
        "output_error_before": float(np.linalg.norm(before - target) / norm),
        "output_error_after": float(np.linalg.norm(after - target) / norm),
    }


def _core_unknowns(core_node, inits) -> int:
    dims = inits[core_node.input[1]].dims
    return int(np.prod(dims[1:]))


def _node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _is_2d_conv(node: onnx.NodeProto) -> bool:
    attrs = _node_attrs(node)
    return node.op_type == "Conv" and len(attrs.get("kernel_shape", [])) == 2 and attrs.get("group", 1) == 1


def _core_geometry(core_node, inits, in_hw):
    """(kernel, strides, pads [t, l, b, r], dilations) of a 2-D ungrouped core conv (SAME_* resolved on ``in_hw``), else None."""
    try:
        geometry = conv_geometry(_node_attrs(core_node), tuple(inits[core_node.input[1]].dims), tuple(int(d) for d in in_hw))
    except GeometryError:
        return None
    return geometry.as_2d()


def patches_at(x: np.ndarray, n_idx: np.ndarray, oh: np.ndarray, ow: np.ndarray, geometry) -> np.ndarray:
    """im2col rows (C-major like OIHW) of ``x`` (N, C, H, W) at output positions (n, oh, ow)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geometry
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rows = oh[:, None] * sh + np.arange(kh)[None, :] * dh  # (P, kh)
    cols = ow[:, None] * sw + np.arange(kw)[None, :] * dw  # (P, kw)
    channels = np.arange(x.shape[1])[None, :, None, None]
    patches = padded[n_idx[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]]
    return patches.reshape(len(n_idx), -1)


def _patches(f: np.ndarray, pick: np.ndarray, out_hw: tuple, geometry) -> np.ndarray:
    """im2col rows of the core's input ``f`` at flat output positions ``pick`` (n, oh, ow raveled)."""
    n_idx, rest = np.divmod(pick, out_hw[0] * out_hw[1])
    oh, ow = np.divmod(rest, out_hw[1])
    return patches_at(f, n_idx, oh, ow, geometry)


def _refit_core_and_last(model, chain, core_node, last, inits, f, pick, target, geometry, ridge, relu=False) -> dict:
    """Reduced-rank regression of core+last on the first conv's real output.

    Fits the combined kxk conv (C_out x R_in*k*k) by least squares, shrunk towards
    the Tucker solution, then keeps its best rank-R_out part (the top principal
    directions of its fitted outputs): the optimal core and last factor for the
    data, given the input factor.
    """
    core_init = inits.owned(core_node, 1, chain.weights["core"])
    chain.weights["core"] = core_init.name
    core = inits.array(core_init.name).astype(np.float64)  # (R_out, R_in, kh, kw)
    last_init, lw, bias = _owned_last(chain, last, inits)
    dtype = lw.dtype
    u = lw.reshape(lw.shape[0], -1).astype(np.float64)  # (C_out, R_out)
    b0 = inits.array(bias.name).astype(np.float64)
    r_out = core.shape[0]
    out_hw = _output_hw(f.shape[2:], geometry)
    p = _patches(f, pick, out_hw, geometry).astype(np.float64)
    prior = (u @ core.reshape(r_out, -1)).T  # (R_in*k*k, C_out): the Tucker conv
    before = p @ prior + b0
    mean_p, mean_t = p.mean(0), target.mean(0)
    pc, tc = p - mean_p, target - mean_t
    gram = pc.T @ pc
    lam = max(ridge, CORE_RIDGE) * np.trace(gram) / len(gram) + 1e-12
    full = np.linalg.solve(gram + lam * np.eye(len(gram)), pc.T @ tc + lam * prior)
    fitted = pc @ full
    _, vectors = np.linalg.eigh(fitted.T @ fitted)
    v = vectors[:, ::-1][:, :r_out]  # (C_out, R_out)
    new_core = (full @ v).T.reshape(core.shape)
    new_bias = mean_t - mean_p @ (full @ v @ v.T)
    after = p @ (full @ v @ v.T) + new_bias
    if relu:  # then the last factor and bias again, for the error the ReLU lets through
        design = np.hstack([p @ full @ v, np.ones((len(p), 1))])
        solution = relu_solve(design, target, np.vstack([v.T, new_bias[None, :]]), ridge)
        v, new_bias = solution[:-1].T, solution[-1]
        after = design @ solution
    inits.set(core_init.name, new_core.astype(dtype))
    inits.set(last_init.name, v.reshape(lw.shape).astype(dtype))
    inits.set(bias.name, new_bias.astype(dtype))
    if relu:
        return _errors(np.maximum(before, 0), np.maximum(after, 0), np.maximum(target, 0), "core + last conv (after the ReLU)")
    return _errors(before, after, target, "core + last conv (reduced-rank regression)")


def _output_hw(in_hw, geometry) -> tuple[int, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geometry
    h = (in_hw[0] + pt + pb - (kh - 1) * dh - 1) // sh + 1
    w = (in_hw[1] + pl + pr - (kw - 1) * dw - 1) // sw + 1
    return h, w


def _collect(model: onnx.ModelProto, feeds: dict, name: str) -> np.ndarray:
    """One tensor of ``model`` over all of ``feeds``."""
    return capture_named(prefix_model(model, [name]), feeds, [name], batch_size=batch_size_for(model, BATCH))[name]

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
from onnx import numpy_helper

from onnx_tucker.rewrite import unique_name
from onnx_tucker.runtime import make_session

MAX_ROWS = 30_000
MIN_ROWS_PER_UNKNOWN = 20
CORE_RIDGE = 1e-2  # the core refit shrinks towards the Tucker solution: it has many unknowns  # pixel samples per layer for the least-squares refit
BATCH = 64
COV_POSITIONS = 64  # spatial positions per sample for the input covariances


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return exposed


def _batches(feeds: dict, size: int = BATCH):
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in feeds.items()}


def input_covariances(model: onnx.ModelProto, feeds: dict, tensor_names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Channel second moment E[x x^T] (over samples and positions) of each named NC... tensor.

    Estimated on at most ``COV_POSITIONS`` random positions per sample: plenty for a C x C
    moment, and it keeps calibration time flat in the image size.
    """
    names = list(dict.fromkeys(tensor_names))
    session = make_session(with_outputs(model, names))
    rng = np.random.default_rng(seed)
    sums = {n: None for n in names}
    counts = {n: 0 for n in names}
    for batch in _batches(feeds):
        values = session.run(names, batch)
        for name, value in zip(names, values):
            flat = value.reshape(value.shape[0], value.shape[1], -1)
            if flat.shape[2] > COV_POSITIONS:
                flat = flat[:, :, rng.choice(flat.shape[2], COV_POSITIONS, replace=False)]
            x = np.moveaxis(flat, 1, 0).reshape(value.shape[1], -1).astype(np.float32, copy=False)
            gram = (x @ x.T).astype(np.float64)  # float32 products, float64 sums across batches
            sums[name] = gram if sums[name] is None else sums[name] + gram
            counts[name] += x.shape[1]
    return {n: sums[n] / max(counts[n], 1) for n in names}


def _rows(value: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """(N, C, spatial...) -> (rows, C) at the chosen flat positions."""
    flat = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
    return flat[pick]


def refit_last_convs(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict, layers: list[str],
                     ridge: float = 1e-6, seed: int = 0, mode: str = "last", relu_aware: bool = True) -> dict:
    """Sequential least-squares refit of each decomposed layer's last conv; edits ``compressed`` in place.

    ``mode="last"`` refits the last 1x1 conv and bias; ``mode="core"`` also refits the
    core by reduced-rank regression where there are enough calibration rows.
    Returns per-layer output errors (relative, on the calibration rows) before and after.
    """
    start = time.perf_counter()
    nodes = {n.name: n for n in compressed.graph.node}
    inits = {i.name: i for i in compressed.graph.initializer}
    chains = []
    for layer in layers:
        last = nodes.get(f"{layer}_tucker_out")
        core = nodes.get(f"{layer}_tucker_core")
        if last is None or core is None:
            continue
        chains.append((layer, core.output[0], last))
    targets = [last.output[0] for _, _, last in chains]
    # The original layers' outputs: computed once, on the original model.
    reference = _collect(original, feeds, targets)
    rng = np.random.default_rng(seed)
    picks = {}
    for name, value_list in reference.items():
        total = sum(v.shape[0] * int(np.prod(v.shape[2:])) for v in value_list)
        picks[name] = np.sort(rng.choice(total, min(total, MAX_ROWS), replace=False))
    target_rows = {n: _rows(np.concatenate(v), picks[n]) for n, v in reference.items()}
    del reference
    result = {"layers": {}, "samples": int(len(next(iter(feeds.values()))))}
    for layer, core_out, last in chains:
        core_node = nodes[f"{layer}_tucker_core"]
        target = target_rows[last.output[0]].astype(np.float64)
        pick = picks[last.output[0]]
        geometry = _core_geometry(core_node, inits)
        unknowns = _core_unknowns(core_node, inits)
        # The core refit has R_in*k*k unknowns per output channel: with too few calibration
        # rows (late layers with small feature maps) it over-fits, so refit only the last conv.
        if mode == "core" and geometry is not None and len(pick) >= MIN_ROWS_PER_UNKNOWN * unknowns:
            first_out = core_node.input[0]
            f = np.concatenate(_collect(compressed, feeds, [first_out])[first_out])
            relu = relu_aware and feeds_only_relu(compressed, last.output[0])
            result["layers"][layer] = _refit_core_and_last(compressed, layer, core_node, last, inits, f, pick, target, geometry, ridge, relu)
        else:
            z = _rows(np.concatenate(_collect(compressed, feeds, [core_out])[core_out]), pick).astype(np.float64)
            relu = relu_aware and feeds_only_relu(compressed, last.output[0])
            result["layers"][layer] = _refit_last(compressed, layer, last, inits, z, target, ridge, relu=relu)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def feeds_only_relu(model: onnx.ModelProto, name: str) -> bool:
    """True when every consumer of tensor ``name`` is a Relu (and it is not a graph output)."""
    if any(o.name == name for o in model.graph.output):
        return False
    users = [n for n in model.graph.node if name in n.input]
    return bool(users) and all(n.op_type == "Relu" for n in users)


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


def _refit_last(model, layer, last, inits, z, target, ridge, relu: bool = False) -> dict:
    """Least squares for the last 1x1 conv's weight and bias, given the core's output rows ``z``."""
    weight_init = _own_initializer(model, last, 1, inits, f"{layer}_tucker_out_W")
    w = numpy_helper.to_array(weight_init)
    bias = _bias(model, last, inits, w.shape[0], w.dtype, layer)
    before = z @ w.reshape(w.shape[0], -1).T.astype(np.float64) + numpy_helper.to_array(bias).astype(np.float64)
    design = np.hstack([z, np.ones((len(z), 1))])
    gram = design.T @ design
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    solution = np.linalg.solve(gram, design.T @ target)  # (R_out + 1, C_out)
    if relu:
        solution = relu_solve(design, target, solution, ridge)
        after = design @ solution
        weight_init.CopyFrom(numpy_helper.from_array(solution[:-1].T.reshape(w.shape).astype(w.dtype), weight_init.name))
        bias.CopyFrom(numpy_helper.from_array(solution[-1].astype(w.dtype), bias.name))
        relu_target = np.maximum(target, 0)
        return _errors(np.maximum(before, 0), np.maximum(after, 0), relu_target, "last conv (after the ReLU)")
    weight_init.CopyFrom(numpy_helper.from_array(solution[:-1].T.reshape(w.shape).astype(w.dtype), weight_init.name))
    bias.CopyFrom(numpy_helper.from_array(solution[-1].astype(w.dtype), bias.name))
    return _errors(before, design @ solution, target, "last conv")


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


def _core_geometry(core_node, inits):
    """(kernel, strides, pads, dilations) of a 2-D core conv with explicit geometry, else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in core_node.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2 or attrs.get("group", 1) != 1:
        return None
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None  # SAME_* padding depends on the input size: the last-conv refit is used instead
    pads = list(attrs.get("pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    return kernel, list(attrs.get("strides", [1, 1])), pads, list(attrs.get("dilations", [1, 1]))


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


def _refit_core_and_last(model, layer, core_node, last, inits, f, pick, target, geometry, ridge, relu=False) -> dict:
    """Reduced-rank regression of core+last on the first conv's real output.

    Fits the combined kxk conv (C_out x R_in*k*k) by least squares, shrunk towards
    the Tucker solution, then keeps its best rank-R_out part (the top principal
    directions of its fitted outputs): the optimal core and last factor for the
    data, given the input factor.
    """
    core_init = _own_initializer(model, core_node, 1, inits, f"{layer}_tucker_core_W")
    last_init = _own_initializer(model, last, 1, inits, f"{layer}_tucker_out_W")
    core = numpy_helper.to_array(core_init).astype(np.float64)  # (R_out, R_in, kh, kw)
    lw = numpy_helper.to_array(last_init)
    dtype = lw.dtype
    u = lw.reshape(lw.shape[0], -1).astype(np.float64)  # (C_out, R_out)
    bias = _bias(model, last, inits, lw.shape[0], dtype, layer)
    b0 = numpy_helper.to_array(bias).astype(np.float64)
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
    core_init.CopyFrom(numpy_helper.from_array(new_core.astype(dtype), core_init.name))
    last_init.CopyFrom(numpy_helper.from_array(v.reshape(lw.shape).astype(dtype), last_init.name))
    bias.CopyFrom(numpy_helper.from_array(new_bias.astype(dtype), bias.name))
    if relu:
        return _errors(np.maximum(before, 0), np.maximum(after, 0), np.maximum(target, 0), "core + last conv (after the ReLU)")
    return _errors(before, after, target, "core + last conv (reduced-rank regression)")


def _output_hw(in_hw, geometry) -> tuple[int, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geometry
    h = (in_hw[0] + pt + pb - (kh - 1) * dh - 1) // sh + 1
    w = (in_hw[1] + pl + pr - (kw - 1) * dw - 1) // sw + 1
    return h, w


def _collect(model: onnx.ModelProto, feeds: dict, names: list[str]) -> dict[str, list[np.ndarray]]:
    session = make_session(with_outputs(model, names))
    out = {n: [] for n in names}
    for batch in _batches(feeds):
        for name, value in zip(names, session.run(names, batch)):
            out[name].append(value)
    return out


def _users(model: onnx.ModelProto, name: str) -> int:
    return sum(name in n.input for n in model.graph.node)


def _own_initializer(model, node, index, inits, fresh_name):
    """The initializer at ``node.input[index]``, copied first if other nodes share it."""
    init = inits[node.input[index]]
    if _users(model, init.name) > 1:
        copy = model.graph.initializer.add()
        copy.CopyFrom(init)
        copy.name = unique_name(fresh_name, set(inits))
        inits[copy.name] = copy
        node.input[index] = copy.name
        return copy
    return init


def _bias(model, node, inits, channels, dtype, layer):
    """The last conv's bias initializer (created when the original conv had none, copied when shared)."""
    if len(node.input) > 2 and node.input[2] in inits:
        return _own_initializer(model, node, 2, inits, f"{layer}_tucker_out_B")
    if len(node.input) > 2 and node.input[2]:
        raise ValueError(f"bias of {layer} is not a constant: cannot refit it")
    bias = model.graph.initializer.add()
    bias.CopyFrom(numpy_helper.from_array(np.zeros(channels, dtype=dtype), unique_name(f"{layer}_tucker_out_B", set(inits))))
    inits[bias.name] = bias
    while len(node.input) < 2:
        node.input.append("")
    if len(node.input) == 2:
        node.input.append(bias.name)
    else:
        node.input[2] = bias.name
    return bias

"""Run an ONNX graph in PyTorch, with chosen initializers as trainable parameters.

``TorchGraph(model, trainable=[...])`` is an ``nn.Module`` whose forward pass executes the graph's
nodes in order with torch operations, so gradients flow to the named initializers (registered as
``nn.Parameter``; every other initializer and ``Constant`` is a buffer). It covers the operators of
CNN classifiers as tf2onnx and torch.onnx export them (see ``SUPPORTED_OPS``); a graph with another
operator is refused up front with a :class:`~onnx_tucker.errors.ModelError` naming it. Numerics follow
onnxruntime (CPU) to float32 rounding; the tests compare every operator with it.

This module imports torch at import time; import it only where torch is wanted.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnx_tucker.errors import ModelError, UsageError

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


# --- attribute and padding helpers --------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise ModelError(f"torch executor: node '{node.name}' ({node.op_type}) has a subgraph, which is not supported")
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


def _ints(t) -> list[int]:
    return [int(v) for v in t.detach().cpu().reshape(-1).tolist()]


def _spatial_pads(sizes, kernel, strides, dilations, attrs) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from ``pads`` or ``auto_pad``."""
    nd = len(sizes)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(sizes, kernel, strides, dilations):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX (begin..., end...) for the trailing axes -> F.pad's last-axis-first pairs."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# --- operators: fn(inputs, attrs, opset) -> tensor or tuple of tensors ----------------------------


def _conv(ins, a, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    if nd not in _CONV:
        raise ModelError(f"torch executor: Conv with {nd} spatial axes is not supported")
    kernel = list(w.shape[2:])
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    begin, end = _spatial_pads(list(x.shape[2:]), kernel, strides, dilations, a)
    if begin == end:
        padding = begin
    else:
        x, padding = F.pad(x, _torch_pad(begin, end)), 0
    return _CONV[nd](x, w, b, strides, padding, dilations, a.get("group", 1))


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_transpose(ins, a, opset):
    """ConvTranspose with ``pads``, ``output_padding``, strides, dilations and groups (a U-Net's upsampling). The full
    transposed conv, then ONNX's pads cropped and ``output_padding`` appended (rows only the bias reaches), exactly."""
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    if nd not in _CONV_TRANSPOSE:
        raise ModelError(f"torch executor: ConvTranspose with {nd} spatial axes is not supported")
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ModelError("torch executor: ConvTranspose with output_shape or a SAME auto_pad is not supported")
    strides, dilations = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads = [0] * (2 * nd) if a.get("auto_pad", "NOTSET") == "VALID" else list(a.get("pads", [0] * (2 * nd)))
    extra = a.get("output_padding", [0] * nd)
    y = _CONV_TRANSPOSE[nd](x, w, None, strides, 0, 0, a.get("group", 1), dilations)
    if any(extra):
        y = F.pad(y, _torch_pad([0] * nd, extra))
    crop = tuple(slice(begin, y.shape[2 + i] - end) for i, (begin, end) in enumerate(zip(pads[:nd], pads[nd:])))
    y = y[(slice(None), slice(None), *crop)]
    return y if b is None else y + b.reshape(1, -1, *([1] * nd))


_RESIZE_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _resize(ins, a, opset):
    """Resize/Upsample as torch exports them: ``nearest`` with ``asymmetric`` coordinates and ``floor`` (nn.Upsample),
    ``linear`` with ``half_pixel``/``pytorch_half_pixel`` or ``align_corners`` (bilinear); scales or sizes on the
    spatial axes only. Anything else is a one-line error naming the mode."""
    x = ins[0]
    nd = x.dim() - 2
    if opset < 11:  # Upsample (opset 7-9) / Resize 10: (X, scales), asymmetric coordinates
        scales, sizes, coords = (ins[1] if len(ins) > 1 else None), None, "asymmetric"
        if scales is None and "scales" in a:
            scales = torch.tensor(a["scales"])
    else:
        scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        sizes = ins[3] if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
        coords = a.get("coordinate_transformation_mode", "half_pixel")
    mode = a.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    unsupported = [k for k in ("axes", "antialias", "exclude_outside") if a.get(k)]
    if unsupported or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ModelError(f"torch executor: Resize with {', '.join(unsupported) or 'keep_aspect_ratio_policy'} is not supported")
    if sizes is not None:
        size = _ints(sizes)
        if size[:2] != list(x.shape[:2]):
            raise ModelError("torch executor: Resize of the batch or channel axis is not supported")
        target = {"size": size[2:]}
    elif scales is not None:
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise ModelError("torch executor: Resize of the batch or channel axis is not supported")
        target = {"scale_factor": factors[2:], "recompute_scale_factor": False}
    else:
        raise ModelError("torch executor: Resize without scales or sizes is not supported")
    if mode == "nearest" and coords == "asymmetric" and a.get("nearest_mode", "round_prefer_floor" if opset >= 11 else "floor") == "floor":
        return F.interpolate(x, mode="nearest", **target)
    if mode == "linear" and nd in _RESIZE_LINEAR and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        if coords == "pytorch_half_pixel":  # an output axis of length 1 reads input coordinate 0 (the spec), not the centre
            x, target = _resize_to_first(x, target)
        return F.interpolate(x, mode=_RESIZE_LINEAR[nd], align_corners=coords == "align_corners", **target)
    raise ModelError(f"torch executor: Resize mode '{mode}' with coordinate_transformation_mode '{coords}'"
                     + (f" and nearest_mode '{a.get('nearest_mode', 'round_prefer_floor')}'" if mode == "nearest" else "")
                     + " is not supported")


def _resize_to_first(x, target: dict):
    """For ``pytorch_half_pixel``: each spatial axis whose output has length 1 is cut to the input's first slice
    (coordinate 0, as the spec maps it; the half-pixel centre otherwise) and resized 1 -> 1 there."""
    if "size" in target:
        outs = list(target["size"])
    else:
        outs = [int(math.floor(n * f)) for n, f in zip(x.shape[2:], target["scale_factor"])]
    ones = [i for i, n in enumerate(outs) if n == 1]
    if not ones:
        return x, target
    for i in ones:
        x = x.narrow(2 + i, 0, 1)
    if "size" in target:
        return x, target
    factors = [1.0 if i in ones else f for i, f in enumerate(target["scale_factor"])]
    return x, {**target, "scale_factor": factors}


def _pool_geometry(x, a):
    nd = x.dim() - 2
    kernel = a["kernel_shape"]
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    sizes = list(x.shape[2:])
    begin, end = _spatial_pads(sizes, kernel, strides, dilations, a)
    extra = []  # padding past ``end`` that ceil_mode's last window reaches (not counted as padding)
    for n, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end):
        span = n + b + e - ((k - 1) * d + 1)
        if a.get("ceil_mode", 0):
            out = -(-span // s) + 1
            if (out - 1) * s >= n + b:  # a window may not start in the end padding
                out -= 1
        else:
            out = span // s + 1
        extra.append(max(0, (out - 1) * s + (k - 1) * d + 1 - (n + b + e)))
    return nd, kernel, strides, dilations, begin, end, extra


def _maxpool(ins, a, opset):
    x = ins[0]
    nd, kernel, strides, dilations, begin, end, extra = _pool_geometry(x, a)
    if nd not in _MAXPOOL:
        raise ModelError(f"torch executor: MaxPool with {nd} spatial axes is not supported")
    ends = [e + x_ for e, x_ in zip(end, extra)]
    if any(begin) or any(ends):
        x = F.pad(x, _torch_pad(begin, ends), value=-math.inf)
    return _MAXPOOL[nd](x, kernel, strides, 0, dilations)


def _avgpool(ins, a, opset):
    x = ins[0]
    nd, kernel, strides, dilations, begin, end, extra = _pool_geometry(x, a)
    if nd not in _AVGPOOL:
        raise ModelError(f"torch executor: AveragePool with {nd} spatial axes is not supported")
    include = bool(a.get("count_include_pad", 0))
    ends = [e + x_ for e, x_ in zip(end, extra)]
    padded = F.pad(x, _torch_pad(begin, ends)) if any(begin) or any(ends) else x
    if all(d == 1 for d in dilations) and not any(extra) and (include or not (any(begin) or any(end))):
        return _AVGPOOL[nd](padded, kernel, strides, 0)  # every window counts the whole kernel
    # General case: window sums over a depthwise all-ones kernel, divided by the counted positions.
    c = x.shape[1]
    ones = torch.ones((c, 1, *kernel), dtype=x.dtype, device=x.device)
    sums = _CONV[nd](padded, ones, None, strides, 0, dilations, c)
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(mask, _torch_pad(begin, end), value=1.0 if include else 0.0)
    mask = F.pad(mask, _torch_pad([0] * nd, extra), value=0.0)
    counts = _CONV[nd](mask, ones[:1], None, strides, 0, dilations, 1)
    return sums / counts


def _global_avg(ins, a, opset):
    x = ins[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max(ins, a, opset):
    x = ins[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _gemm(ins, a, opset):
    A, B = ins[0], ins[1]
    C = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = A @ B
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        y = y + (C * beta if beta != 1.0 else C)
    return y


def _div(ins, a, opset):
    x, y = ins
    if not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _clip(ins, a, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _hard_sigmoid(ins, a, opset):
    return torch.clamp(ins[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0)


def _hard_swish(ins, a, opset):
    x = ins[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def _leaky_relu(ins, a, opset):
    return F.leaky_relu(ins[0], a.get("alpha", 0.01))


def _flatten(ins, a, opset):
    x = ins[0]
    axis = a.get("axis", 1)
    if axis < 0:
        axis += x.dim()
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(ins, a, opset):
    x, shape = ins[0], _ints(ins[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(ins, a, opset):
    x = ins[0]
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return x.permute(perm)


def _concat(ins, a, opset):
    return torch.cat([t for t in ins if t is not None], dim=a["axis"])


def _batchnorm(ins, a, opset):
    x, scale, bias, mean, var = ins[:5]
    if a.get("training_mode", 0):
        raise ModelError("torch executor: BatchNormalization with training_mode=1 is not supported")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _layer_norm(ins, a, opset):
    """LayerNormalization (opset 17): normalised over the axes from ``axis`` on, then scale and bias; only the first
    output (the mean and inverse deviation outputs are refused when used, as for BatchNormalization)."""
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    shape = tuple(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape) if scale is not None else None,
                        bias.expand(shape) if bias is not None else None, a.get("epsilon", 1e-5))


def _softmax_like(fn):
    def op(ins, a, opset):
        x = ins[0]
        if opset >= 13:
            return fn(x, a.get("axis", -1))
        axis = a.get("axis", 1)  # before opset 13: coerced to 2-D at ``axis``
        if axis < 0:
            axis += x.dim()
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, 1).reshape(x.shape)

    return op


def _pad(ins, a, opset):
    x = ins[0]
    if opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = _ints(ins[1])
        value = ins[2].reshape(()).item() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    axes = [ax + x.dim() if ax < 0 else ax for ax in axes]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[len(axes) + i]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, _torch_pad(begin, end), value=value)
    first = next((i for i in range(x.dim()) if begin[i] or end[i]), x.dim())
    torch_mode = {"reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None or first < 2 or x.dim() - 2 not in (1, 2, 3):
        raise ModelError(f"torch executor: Pad mode '{mode}' on these axes is not supported")
    return F.pad(x, _torch_pad(begin[2:], end[2:]), mode=torch_mode)


def _shape(ins, a, opset):
    x = ins[0]
    dims = list(x.shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _gather(ins, a, opset):
    x, idx = ins
    axis = a.get("axis", 0)
    if axis < 0:
        axis += x.dim()
    flat = idx.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = x.index_select(axis, flat)
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _axes(ins, a, opset, since):
    """Axes from the ``axes`` attribute (before opset ``since``) or the second input (None: absent)."""
    if opset < since:
        return a.get("axes")
    return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None


def _unsqueeze(ins, a, opset):
    x = ins[0]
    axes = _axes(ins, a, opset, 13)
    rank = x.dim() + len(axes)
    for ax in sorted(ax + rank if ax < 0 else ax for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(ins, a, opset):
    x = ins[0]
    axes = _axes(ins, a, opset, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(ax + x.dim() if ax < 0 else ax for ax in axes)) if axes else x


def _cast(ins, a, opset):
    to = a["to"]
    if to not in _DTYPES:
        raise ModelError(f"torch executor: Cast to ONNX type {to} is not supported")
    return ins[0].to(_DTYPES[to])


def _reduce(fn, since):
    def op(ins, a, opset):
        x = ins[0]
        axes = _axes(ins, a, opset, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(ax + x.dim() if ax < 0 else ax for ax in axes), keep)

    return op


def _slice(ins, a, opset):
    """Slice: starts/ends/axes/steps from the inputs (opset 10 on) or the attributes; ONNX's clamping, negative
    indices and steps (a negative step walks backwards, as ``x[::-1]``)."""
    x = ins[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + x.dim() if axis < 0 else axis
        size = x.shape[axis]
        if step < 0 and end >= 2**31 - 1:  # onnxruntime reads INT32/INT64_MAX as "through the first element"
            end = -size - 1
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        if step == 1:
            x = x.narrow(axis, start, max(end - start, 0))
        else:
            empty = (start >= end) if step > 0 else (start <= end)
            index = torch.arange(start, end, step, device=x.device) if not empty else torch.zeros(0, dtype=torch.int64, device=x.device)
            x = x.index_select(axis, index)
    return x


def _split(ins, a, opset):
    """Split into the node's outputs: sizes from the ``split`` input (opset 13 on) or attribute, else equal parts
    (``num_outputs``, opset 18, lets the last part be smaller)."""
    x, axis = ins[0], a.get("axis", 0)
    sizes = (_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None) if opset >= 13 else a.get("split")
    if not sizes:
        parts = a.get("num_outputs") or a["_outputs"]
        size = -(-x.shape[axis] // parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _constant_of_shape(ins, a, opset):
    value = _to_tensor(numpy_helper.to_array(a["value"])) if "value" in a else torch.zeros(1)
    return torch.full(tuple(_ints(ins[0])), value.reshape(-1)[0].item(), dtype=value.dtype, device=ins[0].device)


def _mod(ins, a, opset):
    """Mod: the sign of the divisor (Python's %, ``fmod=0``, integers only) or of the dividend (``fmod=1``)."""
    return torch.fmod(ins[0], ins[1]) if a.get("fmod", 0) else torch.remainder(ins[0], ins[1])


def _gelu(ins, a, opset):
    return F.gelu(ins[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


def _unary(fn):
    return lambda ins, a, opset: fn(ins[0])


def _binary(fn):
    return lambda ins, a, opset: fn(ins[0], ins[1])


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Resize": _resize,
    "Upsample": _resize,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Erf": _unary(torch.erf),
    "Reciprocal": _unary(torch.reciprocal),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "LeakyRelu": _leaky_relu,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avg,
    "GlobalMaxPool": _global_max,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layer_norm,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Pad": _pad,
    "Identity": _unary(lambda x: x),
    "Dropout": _unary(lambda x: x),  # inference: identity (a mask output is refused below)
    "Shape": _shape,
    "Slice": _slice,
    "Split": _split,
    "ConstantOfShape": _constant_of_shape,
    "Gelu": _gelu,
    "Mod": _mod,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep), 18),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep), 13),
    "ReduceMax": _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep), 18),
}
SUPPORTED_OPS = frozenset(OPS) | {"Constant"}
# Operators whose outputs past the first are not computed (a graph that uses them is refused).
_FIRST_OUTPUT_ONLY = {"MaxPool", "BatchNormalization", "Dropout", "LayerNormalization"}


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = _attrs(node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    raise ModelError(f"torch executor: Constant node '{node.name}' has no supported value attribute ({', '.join(a) or 'none'})")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    array = np.array(array, order="C", copy=True)  # (np.ascontiguousarray would make a scalar 1-D)
    if array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.int64)
    return torch.from_numpy(array)


def _in_topological_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with its nodes sorted where they are not (onnxruntime's float16 converter appends its
    input Casts after the nodes that read them; a CUDA teacher built from such an original failed with a KeyError)."""
    from onnx_tucker.io import sort_nodes

    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        if not all(name in known for name in node.input):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            sort_nodes(copy.graph)
            return copy
        known.update(node.output)
    return model


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a torch module.

    ``trainable``: initializer names to register as ``nn.Parameter`` (float tensors); every other
    initializer and every ``Constant`` becomes a buffer. ``outputs``: tensor names to return (any
    tensor of the graph; default: the graph outputs). Only the nodes the outputs need are run.
    ``inputs``: tensor names to feed instead of the graph inputs (the graph is cut there: nothing
    that produces them runs; default: the graph inputs). ``forward`` takes the inputs positionally
    (in that order) or by name and returns a tuple of tensors in ``outputs`` order.

    A trainable float16 initializer is a float32 master parameter, cast to its own type where
    the graph reads it: an optimizer stepping float16 values directly breaks down (Adam's epsilon 1e-8 is 0 in
    float16 and its squared gradients underflow, so the first step writes NaN). :meth:`trained_arrays` and
    :meth:`write_back` give the values in the initializer's own type.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = (), outputs: Sequence[str] | None = None,
                 inputs: Sequence[str] | None = None):
        super().__init__()
        model = _in_topological_order(model)
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        init_names = [i.name for i in graph.initializer]
        self.input_names = list(inputs) if inputs is not None else [i.name for i in graph.input if i.name not in set(init_names)]
        self.output_names = list(outputs) if outputs is not None else [o.name for o in graph.output]
        trainable = list(dict.fromkeys(trainable))
        missing = [n for n in trainable if n not in set(init_names)]
        if missing:
            raise UsageError(f"trainable tensor '{missing[0]}' is not an initializer of the model")

        # Nodes needed for the outputs, in graph order (ONNX requires a topological order).
        producer = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    producer[out] = i
        known = set(init_names) | set(self.input_names)
        needed, stack = set(), list(self.output_names)
        while stack:
            name = stack.pop()
            if name in known:
                continue
            if name in producer and producer[name] not in needed:
                needed.add(producer[name])
                stack.extend(n for n in graph.node[producer[name]].input if n)
            elif name not in producer and name not in known:
                raise ModelError(f"torch executor: tensor '{name}' is neither produced in the graph nor an input or initializer")

        # A torch export fixed to batch 1 may bake that batch into constants (a flatten's Reshape to [1, -1]):
        # bigger batches are run in slices of the model's own batch.
        from onnx_tucker.capture import fixed_batch

        self.fixed_batch = fixed_batch(model)
        self._keys: dict[str, str] = {}  # ONNX tensor name -> attribute name on this module
        self._trainable = trainable
        self._cast: dict[str, torch.dtype] = {}  # trainable name -> its own type, where its master is float32
        for init in graph.initializer:
            value = _to_tensor(numpy_helper.to_array(init))
            key = f"t{len(self._keys)}"
            self._keys[init.name] = key
            if init.name in trainable:
                if not value.is_floating_point():
                    raise UsageError(f"trainable initializer '{init.name}' is not a float tensor")
                if value.dtype == torch.float16:
                    self._cast[init.name] = value.dtype
                    value = value.float()
                self.register_parameter(key, torch.nn.Parameter(value))
            else:
                self.register_buffer(key, value)

        self._steps = []
        for i, node in enumerate(graph.node):
            if i not in needed:
                continue
            where = f"(node '{node.name}')" if node.name else f"(node {i}, output '{node.output[0]}')"
            if node.domain not in ("", "ai.onnx"):
                raise ModelError(f"torch executor: unsupported op '{node.domain}.{node.op_type}' {where}")
            if node.op_type == "Constant":
                key = f"t{len(self._keys)}"
                self._keys[node.output[0]] = key
                self.register_buffer(key, _to_tensor(_constant_value(node)), persistent=False)
                continue
            if node.op_type not in OPS:
                raise ModelError(f"torch executor: unsupported op '{node.op_type}' {where}")
            outs = list(node.output)
            if node.op_type in _FIRST_OUTPUT_ONLY:
                extra = [o for o in outs[1:] if o]
                used = {n for j in needed for n in graph.node[j].input} | set(self.output_names)
                if any(o in used for o in extra):
                    raise ModelError(f"torch executor: unsupported op '{node.op_type}' with more than one output {where}")
                outs = outs[:1]
            attrs = _attrs(node)
            if node.op_type == "Split":  # equal parts: as many as the node has outputs
                attrs["_outputs"] = len(node.output)
            self._steps.append((OPS[node.op_type], attrs, list(node.input), outs, node.op_type, node.name))

        # Free each intermediate after its last use (the graph outputs are kept).
        last_use: dict[str, int] = {}
        for j, (_, _, ins, _, _, _) in enumerate(self._steps):
            for n in ins:
                last_use[n] = j
        self._release = [[] for _ in self._steps]
        for name, j in last_use.items():
            if name not in self._keys and name not in self.output_names:
                self._release[j].append(name)

    # -- running ---------------------------------------------------------------------------------

    def forward(self, *args: torch.Tensor, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) > len(self.input_names):
            raise UsageError(f"the graph has {len(self.input_names)} inputs, got {len(args)}")
        env = dict(zip(self.input_names, args))
        env.update(feeds)
        absent = [n for n in self.input_names if n not in env]
        if absent:
            raise UsageError(f"missing graph input '{absent[0]}'")
        size = self.fixed_batch
        rows = next((v.shape[0] for v in env.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        if size and rows is not None and rows != size:
            return self._in_slices(env, rows, size)
        return self._run(env)

    def _in_slices(self, env: dict, rows: int, size: int) -> tuple[torch.Tensor, ...]:
        """The graph over ``rows`` samples in slices of its fixed batch ``size`` (the last one padded)."""
        parts = []
        for start in range(0, rows, size):
            piece = {}
            for name, value in env.items():
                value = value[start : start + size]
                if len(value) < size:
                    value = torch.cat([value, value[-1:].expand(size - len(value), *value.shape[1:])])
                piece[name] = value
            parts.append(self._run(piece))
        return tuple(torch.cat([p[i] for p in parts])[:rows] for i in range(len(parts[0])))

    def _run(self, env: dict) -> tuple[torch.Tensor, ...]:
        for name, key in self._keys.items():
            env[name] = getattr(self, key)
        for name, dtype in self._cast.items():  # float32 masters, read in their own type
            env[name] = env[name].to(dtype)
        for (fn, attrs, ins, outs, op_type, name), release in zip(self._steps, self._release):
            values = [env[n] if n else None for n in ins]
            try:
                result = fn(values, attrs, self.opset)
            except ModelError as exc:  # an attribute or input the executor refuses: say which node
                raise ModelError(f"{exc} (node '{name}')" if name else str(exc)) from None
            if isinstance(result, torch.Tensor):
                result = (result,)
            for out, value in zip(outs, result):
                env[out] = value
            for n in release:
                env.pop(n, None)
        return tuple(env[n] for n in self.output_names)

    # -- parameters back to ONNX -----------------------------------------------------------------

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable initializers (what an optimizer steps: float32 masters of float16 ones), by ONNX name."""
        return {name: getattr(self, self._keys[name]) for name in self._trainable}

    def trained_arrays(self) -> dict[str, np.ndarray]:
        """Current values of the trainable initializers as numpy arrays in their own type (a float16 one's float32
        master rounded to float16: a value past float16's range is inf here, as it would be in the model), by ONNX name."""
        return {name: p.detach().to(self._cast.get(name, p.dtype)).cpu().numpy().copy() for name, p in self.onnx_parameters().items()}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with the trainable initializers' current values (nothing else changes)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        values = self.trained_arrays()
        for init in out.graph.initializer:
            if init.name in values:
                array = values[init.name].astype(helper.tensor_dtype_to_np_dtype(init.data_type), copy=False)
                init.CopyFrom(numpy_helper.from_array(array.reshape(tuple(init.dims)), init.name))
        return out


def to_torch(model: onnx.ModelProto, trainable: Iterable[str] = (), outputs: Sequence[str] | None = None,
             inputs: Sequence[str] | None = None) -> TorchGraph:
    """Shorthand for :class:`TorchGraph`."""
    return TorchGraph(model, trainable, outputs, inputs)

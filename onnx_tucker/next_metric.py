"""How the next layers weigh a layer's output channels: the metric of its output error.

A chain's output error ``e`` (one channel vector per position) reaches the network through the convs and
dense layers that read it; a 1x1 reader ``W`` (O x C) turns it into ``W e``, whose energy is ``e^T W^T W e``.
So the error is measured in ``M = sum over readers and their kernel taps of W_tap^T W_tap`` (C x C) instead
of the plain sum of squares: a channel the next layer ignores costs nothing, one it amplifies costs more.
Cross-position terms of a kxk reader are ignored (errors at neighbouring positions are taken as unrelated).
"""
from __future__ import annotations

import numpy as np
import onnx

from onnx_tucker.graph import consumers

PASS_THROUGH = ("Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool", "Identity")


def next_layer_metric(model: onnx.ModelProto, tensor: str) -> np.ndarray | None:
    """``M`` (C x C) for ``tensor`` (NCHW channels) read by ``model``'s convs, through activations, pools and
    per-channel constant Mul/Add; None where anything else reads it (a residual Add, a reshape, an output)."""
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    total = None

    def add(m):
        nonlocal total
        total = m if total is None else total + m

    def visit(name: str, scale: np.ndarray | None, depth: int) -> bool:
        if name in outputs or depth > 8:
            return False
        users = consumers(model, name)
        if not users:
            return False
        for node in users:
            if node.op_type in PASS_THROUGH and node.input[0] == name:
                if not visit(node.output[0], scale, depth + 1):
                    return False
            elif node.op_type in ("Mul", "Add") and len(node.input) == 2:
                other = [i for i in node.input if i != name]
                if len(other) != 1 or other[0] not in inits:
                    return False
                if node.op_type == "Mul":
                    value = onnx.numpy_helper.to_array(inits[other[0]]).astype(np.float64).ravel()
                    if value.size == 1:
                        value = np.full(1, value[0])
                    factor = value if scale is None else scale * value
                else:
                    factor = scale
                if not visit(node.output[0], factor, depth + 1):
                    return False
            elif node.op_type == "Conv" and node.input[0] == name and node.input[1] in inits:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if group != 1:
                    return False
                w = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)  # O, C, kh, kw
                taps = w.reshape(w.shape[0], w.shape[1], -1).transpose(2, 0, 1)  # taps, O, C
                m = np.einsum("toc,tod->cd", taps, taps)
                if scale is not None:
                    s = np.broadcast_to(scale, (m.shape[0],))
                    m = m * np.outer(s, s)
                add(m)
            else:
                return False
        return True

    return total if visit(tensor, None, 0) else None


def sqrt_and_inverse(metric: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """``M^(1/2)`` and ``M^(-1/2)`` of the metric with a ridge relative to its mean eigenvalue (a channel the
    next layer ignores still keeps a little weight, so the output factor stays well defined)."""
    m = (metric + metric.T) / 2
    m = m + ridge * np.trace(m) / len(m) * np.eye(len(m))
    values, vectors = np.linalg.eigh(m)
    values = np.maximum(values, 1e-300)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T

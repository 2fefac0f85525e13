"""Hidden-channel pruning (``--layers hidden``): the layers a rank cut cannot reach.

An inverted residual block (MobileNetV2: 1x1 expand -> activation -> depthwise -> activation -> 1x1 project) holds its
MACs in 1x1 convs that are already bottlenecks: a low-rank 1x1 keeps a rank below the block's *input* width, and
MobileNetV2 lost 4.4 points at 2x that way (docs/results_calibration.md, "Stop 27"). What such a block can spare is
hidden channels: dropping hidden channel j removes row j of the producer conv, channel j of the depthwise conv and
column j of the consumer conv, so the block's MACs fall in proportion to the channels kept. The same holds between
two ordinary convs (a ResNet basic block's, a VGG's: the consumer's kernel taps of a channel go together) and for a
conv whose activated output is globally pooled into a linear classifier (the "head" unit).

Which channels go, and what the consumer does without them, is a least-squares question on calibration data:

* the channels are chosen by exact greedy backward elimination in the consumer's input second moment (the
  classical "delete the regressor that raises the residual least": ThiNet's criterion, in closed form);
* the consumer is refitted on the kept channels, in graph order, from the *pruned* model's inputs to the
  original's output (for a block whose output is a residual Add, to what the Add must give);
* with ``--target-macs`` a multiple-choice knapsack over the units' error curves splits the budget.

A pruned unit computes exactly what the original unit computes with the consumer's dropped columns set to zero and
its kept ones refitted (the "composed" model :func:`refit_in_order` returns): tests prove the sliced graph against it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_tucker.errors import ModelError, UsageError
from onnx_tucker.graph import export, infer_shapes, json_metadata, prefix_model, taken_names, unique_name

# Per-channel ops that may sit between the producer and the depthwise conv, or after it: each output channel
# depends only on the same input channel, so a dropped channel drops through them.
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus",
               "Identity", "Mish", "Gelu", "MaxPool", "AveragePool"}  # a pool mixes positions, never channels
STEPS = 16  # keep-count options per unit for the budget: c * j / STEPS, j = 1 .. STEPS
NO_UNITS = "the model has no prunable hidden channels"  # the error's words (--prune-share auto's note tells it apart)
COMPACT_FRACTION = 0.25  # elimination_order shrinks its arrays once dropped channels are this share of them
RIDGE = 1e-6  # relative ridge of every solve: dead channels (a ReLU6 that never fires) make the moment singular
POSITIONS = 64  # sampled positions per image for a block's moments (each image gives thousands of rows)
# Least-squares rows per unknown a refit needs (calibrate.MIN_ROWS_PER_UNKNOWN): a 3x3 consumer of 256 channels on a
# 2x2 map has 2305 unknowns and 4 rows per image; below this the in-sample error says 0 while the refit overfits
# (the seed CNN's output collapsed, cosine 0.47), so a unit keeps no more channels than its rows can fit, or stays whole.
ROWS_PER_UNKNOWN = 20
# A block (its depthwise conv) keeps a multiple of this many channels unless --rank-multiple says another: MobileNetV2
# pruned to 2x with any counts ran 0.79-0.92x the original's speed on onnxruntime's CPU EP, with multiples of 8
# 1.33-1.52x (docs/pruning.md). Pairs and heads keep any count: ResNet-20 pruned so ran 1.26-1.39x faster, and a
# multiple of 8 leaves a 16-channel layer only 8 or 16 (-2.95 points at 2x against -2.19).
MULTIPLE = 8
# Each unit's channels are chosen again in its refit pass, from the inputs the units pruned before it give and for the
# original's output (channel pruning's usual "sequential" selection; the first choice, on the original's statistics, set
# the count): ResNet-20 at 2x -2.94 -> -2.06, VGG-11-BN -1.03 -> -0.84, MobileNetV2 -1.05 either way
# (`tools/switch_ab.py prune.RESELECT MODEL:t0.5+hidden --flags 0,1`, rng 0, multiples of 8 for every unit).
RESELECT = True
# The budget's curves in whole-model KL (``probe_curves``, the measured budget's metric) instead of each unit's linear
# output error: not kept. At 2x, rng 0: MobileNetV2 -1.10 -> -1.12, VGG-11-BN -0.82 -> -0.91, ResNet-20 -2.21 -> -2.07,
# 15-20 s more (`tools/switch_ab.py prune.PROBES MODEL:t0.5+hidden --flags 0,1`, docs/prune_probes.jsonl).
PROBES = False
BATCH = 64


@dataclass
class Unit:
    """One prunable set of hidden channels: ``producer`` writes them, ``depthwise`` (a block) filters them,
    ``consumer`` (a 1x1 conv, or the classifier Gemm of a head) reads them."""

    kind: str  # "block" or "head"
    producer: str  # node names
    depthwise: str | None
    consumer: str
    channels: int
    hidden: str  # the tensor the consumer reads: what is pruned, and the refit's design
    target: str  # what the refit aims at: the consumer's output, or the residual Add's
    skip: str | None  # the Add's other input (a residual block), else None
    macs_per_channel: int  # conv MACs (batch 1) of the convs that scale with the kept channels
    nodes: list = field(default_factory=list)  # every node whose channels shrink, in order (activations included)
    keep: list | None = None  # the kept channels, once planned
    relative_error: float | None = None  # the consumer's output error on the calibration inputs, once refitted
    trainable: list = field(default_factory=list)  # the initializers the pruned graph gave it (what --distill trains)
    geometry: tuple | None = None  # the consumer conv's (kernel, strides, pads, dilations); None: a head's pooled features
    taps: int = 1  # the consumer's kernel positions: each channel is that many columns of the least squares
    rows: int = 0  # least-squares rows the calibration data gives it (images x sampled positions)
    multiple: int = 1  # it keeps a multiple of this many channels (or all)

    def most_kept(self) -> int:
        """The most channels a refit can take from ``rows`` (``ROWS_PER_UNKNOWN`` each, its bias too)."""
        return max(0, (self.rows // ROWS_PER_UNKNOWN - 1) // self.taps)

    def to_dict(self) -> dict:
        kept = len(self.keep) if self.keep is not None else self.channels
        return {"kind": self.kind, "producer": self.producer, "depthwise": self.depthwise, "consumer": self.consumer,
                "channels": self.channels, "kept": kept, "macs_before": self.macs_per_channel * self.channels,
                "macs_after": self.macs_per_channel * kept, "relative_error": self.relative_error,
                "rows": self.rows, "most_kept": min(self.most_kept(), self.channels)}


def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _only_consumer(tensor: gs.Tensor, graph_outputs: set) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _constant(tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _plain_conv(node: gs.Node) -> bool:
    """A 2-D Conv with constant weight (and bias), ungrouped."""
    return (node.op == "Conv" and len(node.inputs) >= 2 and _constant(node.inputs[1]) is not None
            and _constant(node.inputs[1]).ndim == 4 and int(_attr(node, "group", 1)) == 1
            and (len(node.inputs) < 3 or _constant(node.inputs[2]) is not None))


def _pointwise(node: gs.Node) -> bool:
    """A 1x1 conv, stride 1, no padding: its input positions are its output positions."""
    w = _constant(node.inputs[1])
    return (_plain_conv(node) and w.shape[2:] == (1, 1) and all(s == 1 for s in _attr(node, "strides", [1, 1]))
            and not any(_attr(node, "pads", [0, 0, 0, 0])) and _attr(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID"))


AFFINE = {"Mul", "Add", "Sub", "Div"}  # by a per-channel constant (an unfolded BatchNorm's scale, tf2onnx's depthwise BN)


def per_channel_axis(value: np.ndarray, channels: int) -> int | None:
    """The axis of a constant that broadcasts per channel against an NCHW tensor (its size there ``channels``,
    1 elsewhere), -1 for a single value, None otherwise."""
    if value.size == 1:
        return -1
    axis = value.ndim - 3  # aligned to the trailing dims of an N, C, H, W tensor
    if axis >= 0 and value.shape[axis] == channels and value.size == channels:
        return axis
    return None


def _elementwise(node: gs.Node, channels: int) -> bool:
    """Each output channel depends only on the same input channel (through the first input)."""
    if len(node.outputs) != 1:
        return False
    if node.op in ELEMENTWISE:  # Clip's bounds: scalars (a per-channel bound would need slicing)
        return all(t is None or not isinstance(t, gs.Constant) or np.asarray(t.values).size == 1 for t in node.inputs[1:])
    if node.op in AFFINE and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant):
        return per_channel_axis(np.asarray(node.inputs[1].values), channels) is not None
    if node.op == "BatchNormalization":  # left unfolded (a torch export without constant folding): scale, B, mean, var
        return _inference_batchnorm(node, channels)
    if node.op == "Pad":  # tf2onnx's ZeroPadding2D before a stride-2 depthwise conv: spatial zeros only
        pads = _constant(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(_attr(node, "pads", []))
        value = node.inputs[2] if len(node.inputs) > 2 else None
        mode = _attr(node, "mode", "constant")
        return (pads is not None and pads.size == 8 and pads[1] == 0 and pads[5] == 0 and mode in ("constant", b"constant")
                and (value is None or value.name == "" or (_constant(value) is not None and not np.any(_constant(value))))
                and (len(node.inputs) < 4 or node.inputs[3].name == ""))
    return False


def _inference_batchnorm(node: gs.Node, channels: int) -> bool:
    """A BatchNormalization in inference mode whose four per-channel parameters are constants of ``channels`` values
    (pruning slices them with the channels)."""
    params = node.inputs[1:5]
    return (int(_attr(node, "training_mode", 0)) == 0 and len(params) == 4
            and all(isinstance(t, gs.Constant) and np.asarray(t.values).shape == (channels,) for t in params)
            and all(len(t.outputs) == 1 for t in params))  # its own: slicing a shared one would change its other reader


def _walk(tensor: gs.Tensor, outputs: set, channels: int) -> tuple[list, gs.Node | None]:
    """Follow single-consumer per-channel ops from ``tensor``: (those ops, the first other node), or (ops, None)."""
    ops = []
    while True:
        node = _only_consumer(tensor, outputs)
        if node is None:
            return ops, None
        if not _elementwise(node, channels) or node.inputs[0] is not tensor:
            return ops, node
        ops.append(node)
        tensor = node.outputs[0]


def _depthwise(node: gs.Node, channels: int) -> bool:
    w = _constant(node.inputs[1]) if node.op == "Conv" and len(node.inputs) >= 2 else None
    return (w is not None and w.ndim == 4 and w.shape[0] == channels and w.shape[1] == 1
            and int(_attr(node, "group", 1)) == channels and (len(node.inputs) < 3 or _constant(node.inputs[2]) is not None))


def _owned(consumer: gs.Node) -> bool:
    """The consumer's weight and bias are its own: the refit rewrites them in place."""
    return all(len(t.outputs) == 1 for t in consumer.inputs[1:3])


def _macs(node: gs.Node, shapes: dict) -> int | None:
    out = shapes.get(node.outputs[0].name)
    if out is None or len(out) != 4 or not all(isinstance(d, int) and d > 0 for d in out[2:]):
        return None
    return int(np.prod(_constant(node.inputs[1]).shape)) * out[2] * out[3]


def find_units(graph: gs.Graph, shapes: dict) -> list[Unit]:
    """Every prunable unit of ``graph``, in graph order; each conv in at most one unit."""
    outputs = {t.name for t in graph.outputs}
    units, used = [], set()
    for producer in graph.nodes:
        if not _plain_conv(producer) or producer.name in used:
            continue
        c = _constant(producer.inputs[1]).shape[0]
        before, nxt = _walk(producer.outputs[0], outputs, c)
        if nxt is None:
            continue
        unit = None
        if _depthwise(nxt, c) and nxt.inputs[0] is (before[-1].outputs[0] if before else producer.outputs[0]):
            after, consumer = _walk(nxt.outputs[0], outputs, c)
            if consumer is not None and _pointwise(consumer) and consumer.inputs[0].name == (after[-1].outputs[0] if after else nxt.outputs[0]).name \
                    and _owned(consumer):
                macs = [_macs(n, shapes) for n in (producer, nxt, consumer)]
                if None not in macs:
                    target, skip = _residual(consumer, outputs)
                    unit = Unit("block", producer.name, nxt.name, consumer.name, c, consumer.inputs[0].name, target, skip,
                                sum(macs) // c, nodes=[producer, *before, nxt, *after], geometry=_geometry(consumer, shapes))
        elif nxt.op == "GlobalAveragePool":
            unit = _head(producer, before, nxt, c, shapes, outputs)
        elif _plain_conv(nxt) and nxt.inputs[0].name == (before[-1].outputs[0] if before else producer.outputs[0]).name and _owned(nxt):
            unit = _pair(producer, before, nxt, c, shapes, outputs)
        if unit is not None and not ({n.name for n in unit.nodes} | {unit.consumer}) & used:
            used |= {n.name for n in unit.nodes} | {unit.consumer}
            units.append(unit)
    return units


def _geometry(conv: gs.Node, shapes: dict) -> tuple | None:
    """(kernel, strides, pads [t, l, b, r], dilations) of a 2-D conv whose padding is known."""
    from onnx_tucker.site import GeometryError, conv_geometry

    w = _constant(conv.inputs[1])
    in_shape = shapes.get(conv.inputs[0].name)
    try:
        geometry = conv_geometry(conv.attrs, w.shape, tuple(in_shape[2:]) if in_shape and len(in_shape) == 4 else None)
    except GeometryError:
        return None
    return geometry.as_2d()


def _residual(consumer: gs.Node, outputs: set) -> tuple[str, str | None]:
    """(what the refit aims at, the residual Add's other input): the Add's output where the consumer feeds only an Add
    of two computed tensors (``calibrate.residual_merge``'s rule, on the graph-surgeon graph), else its own output."""
    adds = consumer.outputs[0].outputs
    if len(adds) == 1 and adds[0].op == "Add" and consumer.outputs[0].name not in outputs:
        other = [t for t in adds[0].inputs if t is not consumer.outputs[0]]
        if len(other) == 1 and not isinstance(other[0], gs.Constant):
            return adds[0].outputs[0].name, other[0].name
    return consumer.outputs[0].name, None


def _pair(producer, before, consumer, c, shapes, outputs) -> Unit | None:
    """conv -> per-channel ops (activations, an unfolded BatchNorm, pools) -> conv: a ResNet basic block's or a VGG's
    inner channels; the consumer may be any 2-D conv (its kernel taps are the least squares' columns)."""
    geometry = _geometry(consumer, shapes)
    macs = [_macs(n, shapes) for n in (producer, consumer)]
    if geometry is None or None in macs or shapes.get(consumer.inputs[0].name) is None:
        return None
    target, skip = _residual(consumer, outputs)
    kh, kw = geometry[0]
    return Unit("conv", producer.name, None, consumer.name, c, consumer.inputs[0].name, target, skip, sum(macs) // c,
                nodes=[producer, *before], geometry=geometry, taps=kh * kw)


def _head(producer, before, pool, c, shapes, outputs) -> Unit | None:
    """conv -> per-channel ops -> GlobalAveragePool -> Flatten (torch) or Squeeze (tf2onnx) -> Gemm or MatMul (the
    classifier, its bias in the Gemm or in an Add after the MatMul): its pooled features."""
    flatten = _only_consumer(pool.outputs[0], outputs)
    if flatten is None or not _flattens(flatten):
        return None
    linear = _only_consumer(flatten.outputs[0], outputs)
    if linear is None or linear.op not in ("Gemm", "MatMul") or _constant(linear.inputs[1]) is None or _constant(linear.inputs[1]).ndim != 2:
        return None
    if linear.op == "Gemm" and (int(_attr(linear, "transA", 0)) or float(_attr(linear, "alpha", 1.0)) != 1.0
                                or float(_attr(linear, "beta", 1.0)) != 1.0):
        return None
    if _constant(linear.inputs[1]).shape[1 if _transposed(linear) else 0] != c:
        return None
    bias = _bias(linear)
    out = _constant(linear.inputs[1]).shape[0 if _transposed(linear) else 1]
    if bias is not None and (_constant(bias) is None or _constant(bias).shape != (out,)):
        return None  # a broadcast bias cannot take the refit's per-score intercept
    if not _owned(linear):
        return None
    macs = _macs(producer, shapes)
    if macs is None:
        return None
    target = linear.outputs[0] if bias is None or linear.op == "Gemm" else linear.outputs[0].outputs[0].outputs[0]
    return Unit("head", producer.name, None, linear.name, c, flatten.outputs[0].name, target.name, None,
                macs // c, nodes=[producer, *before, pool, flatten])


def _flattens(node: gs.Node) -> bool:
    """(N, C, 1, 1) -> (N, C): Flatten at axis 1, or Squeeze of axes 2 and 3."""
    if node.op == "Flatten":
        return int(_attr(node, "axis", 1)) == 1
    if node.op == "Squeeze":
        axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else _attr(node, "axes", None)
        return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
    return False


def _transposed(linear: gs.Node) -> bool:
    """The weight is (out, in): a Gemm with transB."""
    return linear.op == "Gemm" and bool(int(_attr(linear, "transB", 0)))


def _bias(consumer: gs.Node):
    """The consumer's bias tensor: a Conv's or Gemm's third input, or a constant (out,) Add after a MatMul; None."""
    if consumer.op != "MatMul":
        return consumer.inputs[2] if len(consumer.inputs) > 2 else None
    readers = consumer.outputs[0].outputs
    if len(readers) == 1 and readers[0].op == "Add" and len(readers[0].inputs) == 2 and readers[0].inputs[0] is consumer.outputs[0] \
            and isinstance(readers[0].inputs[1], gs.Constant) and len(readers[0].inputs[1].outputs) == 1:
        return readers[0].inputs[1]
    return None


# --- least squares -----------------------------------------------------------------------------------------------


def _consumer_matrix(consumer: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(W as (out, channels), bias as (out,)) of the consumer."""
    w = _constant(consumer.inputs[1]).astype(np.float64)
    if consumer.op in ("Gemm", "MatMul"):
        w = w if _transposed(consumer) else w.T
    else:
        w = w.reshape(w.shape[0], -1)  # columns channel-major, then the kernel taps (OIHW)
    bias = _bias(consumer)
    b = _constant(bias).astype(np.float64) if bias is not None else np.zeros(w.shape[0])
    return w, np.broadcast_to(b, (w.shape[0],)).copy()


def _ridged(moment: np.ndarray) -> np.ndarray:
    c = moment.shape[0] - 1
    m = moment.copy()
    scale = np.trace(m[:c, :c]) / max(1, c)
    m[np.arange(c), np.arange(c)] += RIDGE * (scale if scale > 0 else 1.0)
    return m


def _downdate(p: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """``p -= left @ right`` in place, with BLAS's own accumulate (no temporary of p's size: 1.4x on a 2305-square p,
    where the update is most of a drop's time). ``p`` is C-ordered, so its transpose is the Fortran matrix BLAS updates."""
    from scipy.linalg.blas import dgemm

    out = dgemm(-1.0, right.T, left.T, beta=1.0, c=p.T, overwrite_c=True)
    if not np.shares_memory(out, p):  # BLAS had to copy (an unexpected layout): the result is still right
        p[...] = out.T


def elimination_order(moment: np.ndarray, weight: np.ndarray, taps: int = 1,
                      drops: int | None = None) -> tuple[list[int], list[float]]:
    """Greedy backward elimination: the channels in the order they are dropped, and the residual after each drop;
    only the first ``drops`` of them when given (the first drops, on the largest arrays, cost the most).

    ``moment``: the (C*taps+1) square second moment of the consumer's input (a channel is ``taps`` adjacent columns:
    its kernel positions) with a constant 1 appended (the intercept, never dropped); ``weight``: (out, C*taps+1), the
    consumer's weight and bias: the target is ``weight @ [x; 1]``. The least-squares coefficients ``S`` on the kept
    columns and the inverse moment ``P`` are downdated in closed form per drop: removing the columns G raises the
    residual by ``tr(S_G P_GG^-1 S_G^T)`` (``|S_j|^2 / P_jj`` for one column).

    A dropped channel's columns stay in ``S`` and ``P`` (no live entry reads them again) until they are
    ``COMPACT_FRACTION`` of the columns, then the arrays shrink: deleting them at every drop copied ``P`` (2305
    square on a 256-channel 3x3 consumer) twice per channel."""
    c = (moment.shape[0] - 1) // taps
    p = np.linalg.inv(_ridged(moment))
    s = weight.astype(np.float64).copy()
    slot_channel = np.arange(c)  # the channel in each slot (slot k owns columns k*taps .. k*taps+taps-1, in channel order)
    live = np.ones(c, dtype=bool)
    order, residual, total = [], [], 0.0
    for _ in range(c if drops is None else min(c, drops)):
        slots = np.flatnonzero(live)
        if taps == 1:
            cost = (s[:, slots] ** 2).sum(0) / np.maximum(np.diag(p)[slots], 1e-300)
        else:  # tr(P_GG^-1 S_G^T S_G): the inverses of n small blocks, not n solves with `out` right-hand sides (3-10x)
            idx = slots[:, None] * taps + np.arange(taps)  # (n, taps) columns
            blocks = p[idx[:, :, None], idx[:, None, :]]  # (n, taps, taps)
            s_blocks = s[:, : len(live) * taps].reshape(len(s), len(live), taps)[:, slots].transpose(1, 2, 0)  # (n, taps, out)
            cost = (np.linalg.inv(blocks) * (s_blocks @ s_blocks.transpose(0, 2, 1))).sum((1, 2))
        a = int(np.argmin(cost))  # the first of equal costs in channel order, as the live slots are
        slot = int(slots[a])
        total += float(max(cost[a], 0.0))
        order.append(int(slot_channel[slot]))
        residual.append(total)
        g = np.arange(slot * taps, (slot + 1) * taps)
        step = np.linalg.solve(p[np.ix_(g, g)], p[g])  # (taps, columns): P_GG^-1 P_G, shared by both downdates
        s -= s[:, g] @ step
        _downdate(p, p[:, g], step)
        live[slot] = False
        dead = len(live) - int(live.sum())
        if dead and dead >= COMPACT_FRACTION * len(live):
            keep_slots = np.flatnonzero(live)
            cols = np.concatenate([(keep_slots[:, None] * taps + np.arange(taps)).ravel(), [p.shape[0] - 1]])
            p, s = p[np.ix_(cols, cols)], s[:, cols]
            slot_channel, live = slot_channel[keep_slots], np.ones(len(keep_slots), dtype=bool)
    return order, residual


def kept_after(order: list[int], channels: int, keep: int) -> list[int]:
    dropped = set(order[: channels - keep])
    return [i for i in range(channels) if i not in dropped]


def columns(keep: list[int], taps: int = 1) -> list[int]:
    """The least squares' columns of the kept channels."""
    return [j * taps + t for j in keep for t in range(taps)]


def solve(moment: np.ndarray, cross: np.ndarray, keep: list[int], intercept: bool = True, taps: int = 1) -> np.ndarray:
    """Least squares on the kept channels and the intercept: (out, len(keep) * taps + 1) from the design's moment
    ((C*taps+1) square, intercept last) and its cross moment with the target ((C*taps+1) x out). Without
    ``intercept`` (a consumer with no bias) the last column is 0."""
    idx = columns(keep, taps) + ([moment.shape[0] - 1] if intercept else [])
    m = _ridged(moment)[np.ix_(idx, idx)]
    solution = np.linalg.solve(m, cross[idx]).T
    return solution if intercept else np.concatenate([solution, np.zeros((solution.shape[0], 1))], axis=1)


# --- statistics ---------------------------------------------------------------------------------------------------


def _sample(u: Unit, value: np.ndarray, rng) -> tuple | None:
    """(image, row, column) of up to ``POSITIONS`` of the consumer's output positions per image; None for a head's
    pooled features (one row per image)."""
    if u.geometry is None or value.ndim == 2:
        return None
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = u.geometry
    n, _, h, w = value.shape
    out_w = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    hw = ((h + pt + pb - (kh - 1) * dh - 1) // sh + 1) * out_w
    take = min(hw, POSITIONS)
    flat = np.stack([rng.choice(hw, take, replace=False) for _ in range(n)]).ravel()
    return np.repeat(np.arange(n), take), flat // out_w, flat % out_w


def _design(u: Unit, value: np.ndarray, sample: tuple | None) -> np.ndarray:
    """The consumer's input rows at the sampled positions: its kernel's patches (channel-major, like OIHW)."""
    if sample is None:
        return value.reshape(len(value), -1).astype(np.float64)
    from onnx_tucker.calibrate import patches_at

    return patches_at(value, *sample, u.geometry).astype(np.float64)


def _at(value: np.ndarray, sample: tuple | None) -> np.ndarray:
    """(rows, channels) of an output-sized tensor at the sampled positions."""
    if sample is None:
        return value.reshape(len(value), -1).astype(np.float64)
    images, rows, cols = sample
    return value[images, :, rows, cols].astype(np.float64)


def _augmented(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


def _batched(model: onnx.ModelProto, feeds: dict, runs: list):
    """Per batch of ``feeds``: (the batch, each ``(session, names)``'s outputs), padding removed. A model exported for a
    fixed batch gets batches of that size, the last one padded (``capture.batches``)."""
    from onnx_tucker.capture import batch_size_for, batches, fixed_batch

    fixed = fixed_batch(model) is not None
    for batch, rows in batches(feeds, batch_size_for(model, BATCH), fixed):
        try:
            outputs = [session.run(names, batch) for session, names in runs]
        except Exception as exc:  # a model that passes the checker but cannot run
            from onnx_tucker.errors import first_line

            raise ModelError(f"onnxruntime cannot run the model: {first_line(exc)}") from None
        yield {k: v[:rows] for k, v in batch.items()}, [[v[:rows] for v in out] for out in outputs]


def _session(model: onnx.ModelProto):
    from onnx_tucker.runtime import make_session

    return make_session(model, "cpu")


def original_moments(model: onnx.ModelProto, feeds: dict, units: list[Unit], seed: int = 0) -> dict:
    """Per unit, from the original model: the consumer input's augmented second moment, and the energy of what the
    unit's output is measured against (the block's output, Add included; the head's scores), per row."""
    names = list(dict.fromkeys([u.hidden for u in units] + [u.target for u in units]))
    session = _session(prefix_model(model, names))
    rng = np.random.default_rng(seed)
    moments = {u.consumer: 0.0 for u in units}
    energy = {u.consumer: 0.0 for u in units}
    rows = {u.consumer: 0 for u in units}
    for _, (values,) in _batched(model, feeds, [(session, names)]):
        got = dict(zip(names, values))
        for u in units:
            sample = _sample(u, got[u.hidden], rng)
            h = _augmented(_design(u, got[u.hidden], sample))
            moments[u.consumer] = moments[u.consumer] + h.T @ h
            energy[u.consumer] += float((_at(got[u.target], sample) ** 2).sum())
            rows[u.consumer] += h.shape[0]
    for u in units:
        u.rows = rows[u.consumer]
    return {u.consumer: (moments[u.consumer] / rows[u.consumer], energy[u.consumer] / rows[u.consumer]) for u in units}


# --- plan --------------------------------------------------------------------------------------------------------


def error_curves(graph: gs.Graph, units: list[Unit], moments: dict) -> dict:
    """Per unit: (elimination order, {kept channels: relative output error}) at the budget's keep counts."""
    nodes = {n.name: n for n in graph.nodes}
    curves = {}
    for u in units:
        moment, energy = moments[u.consumer]
        w, b = _consumer_matrix(nodes[u.consumer])
        order, residual = elimination_order(moment, np.concatenate([w, b[:, None]], axis=1), u.taps)
        errors = {u.channels: 0.0}
        for keep in keep_options(u.channels, u.multiple):
            if keep < u.channels and keep <= u.most_kept():  # more would be a fit to too few rows: not offered
                errors[keep] = residual[u.channels - keep - 1] / max(energy, 1e-300)
        curves[u.consumer] = (order, errors)
    return curves


def probe_curves(model: onnx.ModelProto, feeds: dict, graph: gs.Graph, units: list[Unit], moments: dict, curves: dict,
                 seed: int = 0) -> dict:
    """The curves in the measured budget's metric: per unit, {keep: the whole model's output distortion (KL of class
    scores, ``sensitivity._distortion``, summed over outputs) with that unit alone pruned to ``keep`` channels and its
    consumer refitted on the original's statistics}, on ``sensitivity.eval_samples`` seeded calibration images. One
    session: the consumers' weights and biases are its inputs."""
    from onnx_tucker.capture import fixed_batch, run_all
    from onnx_tucker.sensitivity import _distortion, eval_samples

    n = len(next(iter(feeds.values())))
    pick = np.sort(np.random.default_rng(seed).choice(n, eval_samples(feeds), replace=False))
    probe_feeds = {k: np.asarray(v[pick]) for k, v in feeds.items()}
    nodes = {node.name: node for node in graph.nodes}
    fed = {}  # consumer's weight and bias tensors -> their original values
    for u in units:
        consumer = nodes[u.consumer]
        for tensor in (consumer.inputs[1], _bias(consumer)):
            if tensor is not None:
                fed[tensor.name] = np.asarray(tensor.values)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept_inits = [i for i in probe.graph.initializer if i.name not in fed]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept_inits)
    listed = {i.name for i in probe.graph.input}
    for name, value in fed.items():
        if name not in listed:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
    session = _session(probe)
    names = [o.name for o in session.get_outputs()]

    def run(given: dict) -> list:  # the weights fed whole to every batch; a fixed batch read from the model
        return run_all(session, probe_feeds, names, extra={**fed, **given}, batch_size=BATCH, fixed=fixed_batch(model))

    reference = run({})
    measured = {}
    for u in units:
        consumer = nodes[u.consumer]
        moment = moments[u.consumer][0]
        w, b = _consumer_matrix(consumer)
        cross = moment @ np.concatenate([w, b[:, None]], axis=1).T  # the original consumer's own output as the target
        bias = _bias(consumer)
        errors = {u.channels: 0.0}
        for keep in curves[u.consumer][1]:
            if keep == u.channels:
                continue
            kept = kept_after(curves[u.consumer][0], u.channels, keep)
            solution = solve(moment, cross, kept, intercept=bias is not None, taps=u.taps)
            full = np.zeros((solution.shape[0], u.channels * u.taps))
            full[:, columns(kept, u.taps)] = solution[:, :-1]
            weight = consumer.inputs[1]
            value = (full if _transposed(consumer) else full.T) if consumer.op in ("Gemm", "MatMul") else full
            given = {weight.name: value.reshape(fed[weight.name].shape).astype(fed[weight.name].dtype)}
            if bias is not None:
                given[bias.name] = solution[:, -1].astype(fed[bias.name].dtype)
            outputs = run(given)
            errors[keep] = sum(_distortion(r, o) for r, o in zip(reference, outputs))
        measured[u.consumer] = (curves[u.consumer][0], errors)
    return measured


def keep_options(channels: int, multiple: int = 1) -> list[int]:
    """The keep counts offered: ``STEPS`` fractions of the channels, or with ``multiple`` > 1 its multiples (and all of
    them): onnxruntime's CPU convs run channel counts in blocks of 8 or 16, and odd counts were measured slower."""
    if multiple > 1:
        return sorted({k for k in range(multiple, channels, multiple)} | {channels})
    return sorted({max(1, int(round(channels * j / STEPS))) for j in range(1, STEPS + 1)})


def keep_by_ratio(units: list[Unit], ratio: float) -> dict:
    """``int(ratio * C)`` channels per unit (rounded up to its multiple, at most C); a unit whose rows cannot fit that
    many stays whole."""
    keep = {}
    for u in units:
        k = max(1, int(ratio * u.channels))
        k = min(u.channels, -(-k // u.multiple) * u.multiple)
        keep[u.consumer] = k if k <= u.most_kept() else u.channels
    return keep


def keep_by_budget(units: list[Unit], curves: dict, budget: int) -> dict:
    """The keep counts with the least summed error whose units' MACs fit ``budget``."""
    from onnx_tucker.budget import _knapsack

    options = [[(u.macs_per_channel * k, curves[u.consumer][1][k], k) for k in sorted(curves[u.consumer][1])] for u in units]
    chosen = _knapsack(options, float(budget))
    if chosen is None:  # its bins round costs up: a budget just above the least MACs fits only the fewest channels
        return {u.consumer: min(curves[u.consumer][1]) for u in units}
    return {u.consumer: options[i][c][2] for i, (u, c) in enumerate(zip(units, chosen))}


# --- refit and surgery ---------------------------------------------------------------------------------------------


def _initializers(model: onnx.ModelProto) -> dict:
    return {i.name: i for i in model.graph.initializer}


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = _initializers(model)[name]
    init.CopyFrom(onnx.numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), name))


def refit_in_order(original: onnx.ModelProto, graph: gs.Graph, units: list[Unit], keep: dict, feeds: dict,
                   seed: int = 0) -> onnx.ModelProto:
    """The composed model: each unit's consumer refitted on its kept channels (zeros in the dropped ones), in graph
    order, from the inputs the units before it give (already refitted) to the original's target. Sets
    ``unit.keep`` and ``unit.relative_error``. Both models run forward once over ``feeds`` (``passes.Passes``), not
    once a unit from the inputs, which grew with the square of the depth (ResNet-56 at 2x: 197 -> 55 s)."""
    from onnx_tucker.capture import batch_size_for
    from onnx_tucker.passes import Passes

    nodes = {n.name: n for n in graph.nodes}
    current = onnx.ModelProto()
    current.CopyFrom(original)
    producer = {o: i for i, nd in enumerate(original.graph.node) for o in nd.output}  # the same graph in both
    pruned_pass, original_pass = Passes(current, feeds), Passes(original, feeds)
    step = batch_size_for(original, BATCH)  # the sums in the order of the batches before (the same bytes)
    for u in units:
        if u.keep is None or len(u.keep) == u.channels:
            continue
        consumer = nodes[u.consumer]
        names = [u.hidden] + ([u.skip] if u.skip else [])
        values = pruned_pass.at(current, names, producer[consumer.outputs[0].name])
        target_value = original_pass.at(original, [u.target], producer[u.target] + 1)[0]
        rng = np.random.default_rng(seed)
        c, width = u.channels, u.channels * u.taps
        moment, cross, energy, rows = np.zeros((width + 1, width + 1)), None, 0.0, 0
        for start in range(0, len(target_value), step):
            part = slice(start, start + step)
            sample = _sample(u, values[0][part], rng)
            h = _augmented(_design(u, values[0][part], sample))
            t = _at(target_value[part], sample)
            if u.skip:  # what the Add must give: the original's sum less the pruned model's other branch
                t = t - _at(values[1][part], sample)
            moment += h.T @ h
            cross = h.T @ t if cross is None else cross + h.T @ t
            energy += float((t ** 2).sum())
            rows += h.shape[0]
        bias_tensor = _bias(consumer)
        if RESELECT:  # the same count, chosen again on the inputs the pruned units before it give, for the original's target
            full_fit = np.linalg.solve(_ridged(moment), cross).T
            order, _ = elimination_order(moment, full_fit, u.taps, drops=c - len(u.keep))
            u.keep = kept_after(order, c, len(u.keep))
        solution = solve(moment, cross, u.keep, intercept=bias_tensor is not None, taps=u.taps)
        kept_columns = columns(u.keep, u.taps)
        full = np.zeros((solution.shape[0], width))
        full[:, kept_columns] = solution[:, :-1]
        bias = solution[:, -1]
        # the refit's error on its own rows: target energy less what the fit explains (normal equations)
        idx = kept_columns + [width]
        explained = 2 * float(np.einsum("oi,io->", solution, cross[idx])) - float(np.einsum("oi,ij,oj->", solution, moment[np.ix_(idx, idx)], solution))
        u.relative_error = float(max(0.0, energy - explained) / max(energy, 1e-300))
        w = _constant(consumer.inputs[1])
        new_w = (full if _transposed(consumer) else full.T) if consumer.op in ("Gemm", "MatMul") else full
        _set(current, consumer.inputs[1].name, new_w.reshape(w.shape))
        if bias_tensor is not None:
            _set(current, bias_tensor.name, bias)
    return current


def sliced(composed: onnx.ModelProto, units: list[Unit]) -> onnx.ModelProto:
    """The pruned graph: every unit's dropped channels removed from its producer, depthwise and consumer, with the
    composed model's refitted consumer weights. Computes what ``composed`` computes."""
    graph = gs.import_onnx(composed)
    nodes = {n.name: n for n in graph.nodes}
    taken = taken_names(graph)

    def replace(node: gs.Node, index: int, values: np.ndarray, trainable: bool = True) -> None:
        old = node.inputs[index]
        node.inputs[index] = gs.Constant(unique_name(f"{old.name}_pruned", taken), np.ascontiguousarray(values.astype(old.values.dtype)))
        if trainable:
            u.trainable.append(node.inputs[index].name)

    for u in units:
        if u.keep is None or len(u.keep) == u.channels:
            continue
        keep = np.asarray(u.keep)
        producer = nodes[u.producer]
        replace(producer, 1, _constant(producer.inputs[1])[keep])
        if len(producer.inputs) > 2:
            replace(producer, 2, _constant(producer.inputs[2])[keep])
        if u.depthwise:
            dw = nodes[u.depthwise]
            replace(dw, 1, _constant(dw.inputs[1])[keep])
            if len(dw.inputs) > 2:
                replace(dw, 2, _constant(dw.inputs[2])[keep])
            dw.attrs["group"] = len(keep)
        for node in (nodes[n.name] for n in u.nodes):
            if node.op in AFFINE:  # a per-channel scale or shift: its kept channels (a tf2onnx constant may be shared)
                value = np.asarray(node.inputs[1].values)
                axis = per_channel_axis(value, u.channels)
                if axis is not None and axis >= 0:
                    replace(node, 1, np.take(value, keep, axis=axis))
            elif node.op == "BatchNormalization":  # scale, B, mean and var at the kept channels
                for index in range(1, 5):  # --distill trains the scale and shift, not the statistics (a negative var is NaN)
                    replace(node, index, np.asarray(node.inputs[index].values)[keep], trainable=index < 3)
        consumer = nodes[u.consumer]
        w = _constant(consumer.inputs[1])
        if consumer.op in ("Gemm", "MatMul"):
            replace(consumer, 1, w[:, keep] if _transposed(consumer) else w[keep])
        else:
            replace(consumer, 1, w[:, keep])
        if _bias(consumer) is not None:
            u.trainable.append(_bias(consumer).name)  # refitted in place
        for node in [nodes[n.name] for n in u.nodes]:  # their outputs have fewer channels now: shapes inferred again
            for out in node.outputs:
                out.shape = None
    model = export(graph, composed)
    try:
        onnx.checker.check_model(model) if model.ByteSize() < (1 << 31) - 1 else None
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the pruned model is not valid ONNX ({str(exc).splitlines()[0]}): an onnx-tucker bug, please report it") from None
    return model


# --- the pass ------------------------------------------------------------------------------------------------------


@dataclass
class Pruning:
    units: list  # every Unit found (kept channels set where planned)
    conv_macs: int  # the original model's conv MACs (batch 1)
    budget: int | None = None  # the units' MACs allowed (--target-macs)
    seconds: float = 0.0

    def pruned(self) -> list[Unit]:
        return [u for u in self.units if u.keep is not None and len(u.keep) < u.channels]

    def kept_groups(self) -> list[tuple[list[str], list[int]]]:
        """Per pruned unit: the tensors whose channels (axis 1) it cut, and its kept channels as indices into the
        original's (what ``--distill``'s reconstruction aims at there: the original's tensor at those channels)."""
        return [([o.name for n in u.nodes for o in n.outputs], [int(k) for k in u.keep]) for u in self.pruned()]

    def kept_channels(self) -> dict[str, list[int]]:
        """{tensor: its kept channels} for every tensor pruning cut."""
        return {name: keep for names, keep in self.kept_groups() for name in names}

    def dumps_kept(self) -> str:
        """:meth:`kept_groups` for the model's metadata (``KEPT_KEY``); "" when nothing was pruned."""
        return json.dumps(self.kept_groups()) if self.pruned() else ""

    def to_dict(self) -> dict:
        return {"units": [u.to_dict() for u in self.units], "pruned": len(self.pruned()),
                "macs_saved": sum(u.macs_per_channel * (u.channels - len(u.keep)) for u in self.pruned())}


KEPT_KEY = "onnx_tucker.kept_channels"  # a pruned model's kept channels, read back by --distill's reconstruction


def kept_channels_in(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The kept channels a model's pruning recorded (``Pruning.dumps_kept``), as ``Pruning.kept_channels``; {} if none."""
    return {name: keep for names, keep in json_metadata(model, KEPT_KEY, []) for name in names}


def conv_macs(graph: gs.Graph, shapes: dict) -> int:
    total = 0
    for node in graph.nodes:
        if node.op == "Conv" and len(node.inputs) >= 2 and _constant(node.inputs[1]) is not None:
            total += _macs(node, shapes) or 0
    return total


def prune(model: onnx.ModelProto, feeds: dict, *, ratio: float | None = None, target_macs: float | None = None,
          input_shapes: dict | None = None, seed: int = 0, exclude: set | None = None,
          multiple: int | None = None, memo: dict | None = None) -> tuple[onnx.ModelProto, Pruning]:
    """Prune every unit's hidden channels: to ``ratio`` of each, or the split of the units' MACs that makes the
    whole model's conv MACs at most ``target_macs`` of the original's with the least summed output error. A unit
    with a node named in ``exclude`` is left whole. Each unit keeps a multiple of ``multiple`` channels (or all); None: of
    ``MULTIPLE`` for a block, any count for a pair or a head. ``memo``: a dict kept between calls on the same model,
    data, exclusions and multiple (``--prune-share auto``'s shares): the statistics and error curves, computed once."""
    shapes = infer_shapes(model, input_shapes)
    graph = gs.import_onnx(model)
    units = [u for u in find_units(graph, shapes)
             if not ({n.name for n in u.nodes} | {u.consumer}) & set(exclude or ())]
    for u in units:
        u.multiple = multiple if multiple else (MULTIPLE if u.kind == "block" else 1)
    total = conv_macs(graph, shapes)
    result = Pruning(units, total)
    if not units:
        raise ModelError(f"--layers hidden: {NO_UNITS} (conv -> per-channel ops -> depthwise "
                         "conv -> 1x1 conv, conv -> per-channel ops -> conv, or conv -> GlobalAveragePool -> Flatten -> Gemm)")
    if target_macs is not None:
        fixed = total - sum(u.macs_per_channel * u.channels for u in units)
        smallest = fixed + sum(u.macs_per_channel * min(keep_options(u.channels, u.multiple)) for u in units)
        if smallest > target_macs * total:
            raise UsageError(f"target MACs {target_macs:g} cannot be met by pruning: the fewest hidden channels give "
                             f"{smallest / total:.3f} of the original conv MACs")
    if memo is not None and "moments" in memo:  # the same units: their statistics, rows and curves do not change
        moments, curves = memo["moments"], memo["curves"]
        for u in units:
            u.rows = memo["rows"][u.consumer]
    else:
        moments = original_moments(model, feeds, units, seed)
        curves = error_curves(graph, units, moments)
        if memo is not None:
            memo.update(moments=moments, curves=curves, rows={u.consumer: u.rows for u in units})
    if target_macs is not None:
        smallest = fixed + sum(u.macs_per_channel * min(curves[u.consumer][1]) for u in units)
        if smallest > target_macs * total:
            raise UsageError(f"target MACs {target_macs:g} cannot be met by pruning with {len(next(iter(feeds.values())))} "
                             f"calibration samples: the fewest channels their refits can fit give {smallest / total:.3f} "
                             "of the original conv MACs (more samples, --calib-size, let more of them be pruned)")
        result.budget = int(math.floor(target_macs * total)) - fixed
        if PROBES:
            curves = probe_curves(model, feeds, graph, units, moments, curves, seed)
        keep = keep_by_budget(units, curves, result.budget)
    else:
        keep = keep_by_ratio(units, ratio)
    for u in units:
        u.keep = kept_after(curves[u.consumer][0], u.channels, keep[u.consumer])
    composed = refit_in_order(model, graph, units, keep, feeds, seed)
    if not result.pruned():
        return composed, result
    return sliced(composed, units), result

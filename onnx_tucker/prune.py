"""Hidden-channel pruning (``--layers hidden``): the layers a rank cut cannot reach.

An inverted residual block (MobileNetV2: 1x1 expand -> activation -> depthwise -> activation -> 1x1 project) holds its
MACs in 1x1 convs that are already bottlenecks: a low-rank 1x1 keeps a rank below the block's *input* width, and
MobileNetV2 lost 4.4 points at 2x that way (docs/results_calibration.md, "Stop 27"). What such a block can spare is
hidden channels: dropping hidden channel j removes row j of the producer conv, channel j of the depthwise conv and
column j of the consumer conv, so the block's MACs fall in proportion to the channels kept. The same holds for a
conv whose activated output is globally pooled into a linear classifier (the "head" unit).

Which channels go, and what the consumer does without them, is a least-squares question on calibration data:

* the channels are chosen by exact greedy backward elimination in the consumer's input second moment (the
  classical "delete the regressor that raises the residual least": ThiNet's criterion, in closed form);
* the consumer is refitted on the kept channels, in graph order, from the *pruned* model's inputs to the
  original's output (for a block whose output is a residual Add, to what the Add must give);
* with ``--target-macs`` a multiple-choice knapsack over the units' error curves splits the budget.

A pruned unit computes exactly what the original unit computes with the consumer's dropped columns set to zero and
its kept ones refitted (the "composed" model, :func:`composed`): tests prove the sliced graph against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_tucker.errors import ModelError, UsageError
from onnx_tucker.graph import export, infer_shapes, prefix_model, taken_names, unique_name

KIND = "hidden"  # the --layers kind
# Per-channel ops that may sit between the producer and the depthwise conv, or after it: each output channel
# depends only on the same input channel, so a dropped channel drops through them.
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus",
               "Identity", "Mish", "Gelu"}
STEPS = 16  # keep-count options per unit for the budget: c * j / STEPS, j = 1 .. STEPS
RIDGE = 1e-6  # relative ridge of every solve: dead channels (a ReLU6 that never fires) make the moment singular
POSITIONS = 64  # sampled positions per image for a block's moments (each image gives thousands of rows)
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
    macs_per_channel: int  # conv MACs (batch 1) of the three convs that scale with the kept channels
    nodes: list = field(default_factory=list)  # every node whose channels shrink, in order (activations included)
    keep: list | None = None  # the kept channels, once planned
    relative_error: float | None = None  # the consumer's output error on the calibration inputs, once refitted
    trainable: list = field(default_factory=list)  # the initializers the pruned graph gave it (what --distill trains)

    def to_dict(self) -> dict:
        kept = len(self.keep) if self.keep is not None else self.channels
        return {"kind": self.kind, "producer": self.producer, "depthwise": self.depthwise, "consumer": self.consumer,
                "channels": self.channels, "kept": kept, "macs_before": self.macs_per_channel * self.channels,
                "macs_after": self.macs_per_channel * kept, "relative_error": self.relative_error}


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


def _elementwise(node: gs.Node) -> bool:
    if node.op not in ELEMENTWISE or len(node.outputs) != 1:
        return False
    # Clip's bounds: scalars (a per-channel bound would need slicing)
    return all(t is None or not isinstance(t, gs.Constant) or np.asarray(t.values).size == 1 for t in node.inputs[1:])


def _walk(tensor: gs.Tensor, outputs: set) -> tuple[list, gs.Node | None]:
    """Follow single-consumer elementwise ops from ``tensor``: (those ops, the first other node), or (ops, None)."""
    ops = []
    while True:
        node = _only_consumer(tensor, outputs)
        if node is None:
            return ops, None
        if not _elementwise(node) or node.inputs[0] is not tensor:
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
        before, nxt = _walk(producer.outputs[0], outputs)
        if nxt is None:
            continue
        unit = None
        if _depthwise(nxt, c) and nxt.inputs[0] is (before[-1].outputs[0] if before else producer.outputs[0]):
            after, consumer = _walk(nxt.outputs[0], outputs)
            if consumer is not None and _pointwise(consumer) and consumer.inputs[0].name == (after[-1].outputs[0] if after else nxt.outputs[0]).name \
                    and _owned(consumer):
                macs = [_macs(n, shapes) for n in (producer, nxt, consumer)]
                if None not in macs:
                    target, skip = consumer.outputs[0].name, None
                    adds = consumer.outputs[0].outputs
                    if len(adds) == 1 and adds[0].op == "Add" and consumer.outputs[0].name not in outputs:
                        other = [t for t in adds[0].inputs if t is not consumer.outputs[0]]
                        if len(other) == 1 and not isinstance(other[0], gs.Constant):
                            target, skip = adds[0].outputs[0].name, other[0].name
                    unit = Unit("block", producer.name, nxt.name, consumer.name, c, consumer.inputs[0].name, target, skip,
                                sum(macs) // c, nodes=[producer, *before, nxt, *after])
        elif nxt.op == "GlobalAveragePool":
            unit = _head(producer, before, nxt, c, shapes, outputs)
        if unit is not None and not ({n.name for n in unit.nodes} | {unit.consumer}) & used:
            used |= {n.name for n in unit.nodes} | {unit.consumer}
            units.append(unit)
    return units


def _head(producer, before, pool, c, shapes, outputs) -> Unit | None:
    """conv -> activations -> GlobalAveragePool -> Flatten -> Gemm (the classifier): its pooled features."""
    flatten = _only_consumer(pool.outputs[0], outputs)
    if flatten is None or flatten.op != "Flatten" or int(_attr(flatten, "axis", 1)) != 1:
        return None
    gemm = _only_consumer(flatten.outputs[0], outputs)
    if gemm is None or gemm.op != "Gemm" or _constant(gemm.inputs[1]) is None or int(_attr(gemm, "transA", 0)):
        return None
    if float(_attr(gemm, "alpha", 1.0)) != 1.0 or float(_attr(gemm, "beta", 1.0)) != 1.0:
        return None
    out = _constant(gemm.inputs[1]).shape[0 if int(_attr(gemm, "transB", 0)) else 1]
    if len(gemm.inputs) > 2 and (_constant(gemm.inputs[2]) is None or _constant(gemm.inputs[2]).shape != (out,)):
        return None  # a broadcast bias cannot take the refit's per-score intercept
    if not _owned(gemm):
        return None
    macs = _macs(producer, shapes)
    if macs is None:
        return None
    return Unit("head", producer.name, None, gemm.name, c, flatten.outputs[0].name, gemm.outputs[0].name, None,
                macs // c, nodes=[producer, *before, pool, flatten])


# --- least squares -----------------------------------------------------------------------------------------------


def _consumer_matrix(consumer: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(W as (out, channels), bias as (out,)) of the consumer."""
    w = _constant(consumer.inputs[1]).astype(np.float64)
    if consumer.op == "Gemm":
        w = w if int(_attr(consumer, "transB", 0)) else w.T
    else:
        w = w[:, :, 0, 0]
    b = _constant(consumer.inputs[2]).astype(np.float64) if len(consumer.inputs) > 2 else np.zeros(w.shape[0])
    return w, np.broadcast_to(b, (w.shape[0],)).copy()


def _ridged(moment: np.ndarray) -> np.ndarray:
    c = moment.shape[0] - 1
    m = moment.copy()
    scale = np.trace(m[:c, :c]) / max(1, c)
    m[np.arange(c), np.arange(c)] += RIDGE * (scale if scale > 0 else 1.0)
    return m


def elimination_order(moment: np.ndarray, weight: np.ndarray) -> tuple[list[int], list[float]]:
    """Greedy backward elimination: the channels in the order they are dropped, and the residual after each drop.

    ``moment``: the (C+1) x (C+1) second moment of the consumer's input with a constant 1 appended (the intercept,
    never dropped); ``weight``: (out, C+1), the consumer's weight and bias: the target is ``weight @ [h; 1]``. The
    least-squares coefficients ``S`` on the kept set and the inverse moment ``P`` are downdated in closed form per drop
    (removing regressor j raises the residual by ``|S_j|^2 / P_jj``), O(C^2) each."""
    c = moment.shape[0] - 1
    p = np.linalg.inv(_ridged(moment))
    s = weight.astype(np.float64).copy()
    alive = list(range(c + 1))
    order, residual, total = [], [], 0.0
    for _ in range(c):
        cols = np.arange(len(alive) - 1)  # the intercept is last in ``alive``
        diag = np.diag(p)[cols]
        cost = (s[:, cols] ** 2).sum(0) / np.maximum(diag, 1e-300)
        j = int(np.argmin(cost))
        total += float(cost[j])
        order.append(alive[j])
        residual.append(total)
        pj = p[j].copy()
        s = s - np.outer(s[:, j], pj / p[j, j])
        p = p - np.outer(p[:, j], pj / p[j, j])
        s = np.delete(s, j, axis=1)
        p = np.delete(np.delete(p, j, axis=0), j, axis=1)
        del alive[j]
    return order, residual


def kept_after(order: list[int], channels: int, keep: int) -> list[int]:
    dropped = set(order[: channels - keep])
    return [i for i in range(channels) if i not in dropped]


def solve(moment: np.ndarray, cross: np.ndarray, keep: list[int], intercept: bool = True) -> np.ndarray:
    """Least squares on the kept channels and the intercept: (out, len(keep) + 1) from the design's moment
    ((C+1) square, intercept last) and its cross moment with the target ((C+1) x out). Without ``intercept`` (a
    consumer with no bias) the last column is 0."""
    idx = list(keep) + ([moment.shape[0] - 1] if intercept else [])
    m = _ridged(moment)[np.ix_(idx, idx)]
    solution = np.linalg.solve(m, cross[idx]).T
    return solution if intercept else np.concatenate([solution, np.zeros((solution.shape[0], 1))], axis=1)


# --- statistics ---------------------------------------------------------------------------------------------------


def _rows(value: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    """(rows, channels) of an NC... tensor, at the sampled flat positions ``pick`` (per image) when given."""
    if value.ndim == 2:
        return value.astype(np.float64)
    flat = value.reshape(value.shape[0], value.shape[1], -1)
    if pick is not None:
        flat = np.take_along_axis(flat, pick[:, None, :], axis=2)
    return flat.transpose(0, 2, 1).reshape(-1, value.shape[1]).astype(np.float64)


def _augmented(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


def _session(model: onnx.ModelProto):
    from onnx_tucker.runtime import make_session

    return make_session(model, "cpu")


def _positions(value: np.ndarray, rng) -> np.ndarray | None:
    if value.ndim == 2:
        return None
    n, hw = value.shape[0], int(np.prod(value.shape[2:]))
    take = min(hw, POSITIONS)
    return np.stack([rng.choice(hw, take, replace=False) for _ in range(n)])


def original_moments(model: onnx.ModelProto, feeds: dict, units: list[Unit], seed: int = 0) -> dict:
    """Per unit, from the original model: the consumer input's augmented second moment, and the energy of what the
    unit's output is measured against (the block's output, Add included; the head's scores), per row."""
    from onnx_tucker.capture import iterate

    names = list(dict.fromkeys([u.hidden for u in units] + [u.target for u in units]))
    session = _session(prefix_model(model, names))
    rng = np.random.default_rng(seed)
    moments = {u.consumer: 0.0 for u in units}
    energy = {u.consumer: 0.0 for u in units}
    rows = {u.consumer: 0 for u in units}
    for _, values in iterate(session, feeds, names, BATCH):
        got = dict(zip(names, values))
        for u in units:
            pick = _positions(got[u.hidden], rng)
            h = _augmented(_rows(got[u.hidden], pick))
            moments[u.consumer] = moments[u.consumer] + h.T @ h
            energy[u.consumer] += float((_rows(got[u.target], pick) ** 2).sum())
            rows[u.consumer] += h.shape[0]
    return {u.consumer: (moments[u.consumer] / rows[u.consumer], energy[u.consumer] / rows[u.consumer]) for u in units}


# --- plan --------------------------------------------------------------------------------------------------------


def error_curves(graph: gs.Graph, units: list[Unit], moments: dict) -> dict:
    """Per unit: (elimination order, {kept channels: relative output error}) at the budget's keep counts."""
    nodes = {n.name: n for n in graph.nodes}
    curves = {}
    for u in units:
        moment, energy = moments[u.consumer]
        w, b = _consumer_matrix(nodes[u.consumer])
        order, residual = elimination_order(moment, np.concatenate([w, b[:, None]], axis=1))
        errors = {u.channels: 0.0}
        for keep in keep_options(u.channels):
            if keep < u.channels:
                errors[keep] = residual[u.channels - keep - 1] / max(energy, 1e-300)
        curves[u.consumer] = (order, errors)
    return curves


def keep_options(channels: int) -> list[int]:
    return sorted({max(1, int(round(channels * j / STEPS))) for j in range(1, STEPS + 1)})


def keep_by_ratio(units: list[Unit], ratio: float) -> dict:
    return {u.consumer: max(1, int(ratio * u.channels)) for u in units}


def keep_by_budget(units: list[Unit], curves: dict, budget: int) -> dict:
    """The keep counts with the least summed error whose units' MACs fit ``budget``."""
    from onnx_tucker.budget import _knapsack

    options = [[(u.macs_per_channel * k, curves[u.consumer][1][k], k) for k in sorted(curves[u.consumer][1])] for u in units]
    chosen = _knapsack(options, float(budget))
    if chosen is None:
        return None
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
    ``unit.keep`` and ``unit.relative_error``."""
    from onnx_tucker.capture import iterate

    nodes = {n.name: n for n in graph.nodes}
    current = onnx.ModelProto()
    current.CopyFrom(original)
    for u in units:
        if u.keep is None or len(u.keep) == u.channels:
            continue
        consumer = nodes[u.consumer]
        names = [u.hidden] + ([u.skip] if u.skip else [])
        session = _session(prefix_model(current, names))
        # onnxruntime runs every node of a session whatever is fetched: the original only up to this unit's target
        reference = _session(prefix_model(original, [u.target]))
        rng = np.random.default_rng(seed)
        c = u.channels
        moment, cross, energy, rows = np.zeros((c + 1, c + 1)), None, 0.0, 0
        for batch, values in iterate(session, feeds, names, BATCH):
            (target,) = reference.run([u.target], batch)
            pick = _positions(values[0], rng)
            h = _augmented(_rows(values[0], pick))
            t = _rows(target, pick)
            if u.skip:  # what the Add must give: the original's sum less the pruned model's other branch
                t = t - _rows(values[1], pick)
            moment += h.T @ h
            cross = h.T @ t if cross is None else cross + h.T @ t
            energy += float((t ** 2).sum())
            rows += h.shape[0]
        solution = solve(moment, cross, u.keep, intercept=len(consumer.inputs) > 2)
        full = np.zeros((solution.shape[0], c))
        full[:, u.keep] = solution[:, :-1]
        bias = solution[:, -1]
        # the refit's error on its own rows: target energy less what the fit explains (normal equations)
        idx = list(u.keep) + [c]
        explained = 2 * float(np.einsum("oi,io->", solution, cross[idx])) - float(np.einsum("oi,ij,oj->", solution, moment[np.ix_(idx, idx)], solution))
        u.relative_error = float(max(0.0, energy - explained) / max(energy, 1e-300))
        w = _constant(consumer.inputs[1])
        if consumer.op == "Gemm":
            new_w = full if int(_attr(consumer, "transB", 0)) else full.T
        else:
            new_w = full[:, :, None, None]
        _set(current, consumer.inputs[1].name, new_w.reshape(w.shape))
        if len(consumer.inputs) > 2:
            _set(current, consumer.inputs[2].name, bias)
    return current


def sliced(composed: onnx.ModelProto, units: list[Unit]) -> onnx.ModelProto:
    """The pruned graph: every unit's dropped channels removed from its producer, depthwise and consumer, with the
    composed model's refitted consumer weights. Computes what ``composed`` computes."""
    graph = gs.import_onnx(composed)
    nodes = {n.name: n for n in graph.nodes}
    taken = taken_names(graph)

    def replace(node: gs.Node, index: int, values: np.ndarray) -> None:
        old = node.inputs[index]
        node.inputs[index] = gs.Constant(unique_name(f"{old.name}_pruned", taken), np.ascontiguousarray(values.astype(old.values.dtype)))
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
        consumer = nodes[u.consumer]
        w = _constant(consumer.inputs[1])
        if consumer.op == "Gemm":
            replace(consumer, 1, w[:, keep] if int(_attr(consumer, "transB", 0)) else w[keep])
        else:
            replace(consumer, 1, w[:, keep])
        if len(consumer.inputs) > 2:
            u.trainable.append(consumer.inputs[2].name)  # refitted in place
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

    def to_dict(self) -> dict:
        return {"units": [u.to_dict() for u in self.units], "pruned": len(self.pruned()),
                "macs_saved": sum(u.macs_per_channel * (u.channels - len(u.keep)) for u in self.pruned())}


def conv_macs(graph: gs.Graph, shapes: dict) -> int:
    total = 0
    for node in graph.nodes:
        if node.op == "Conv" and len(node.inputs) >= 2 and _constant(node.inputs[1]) is not None:
            total += _macs(node, shapes) or 0
    return total


def prune(model: onnx.ModelProto, feeds: dict, *, ratio: float | None = None, target_macs: float | None = None,
          input_shapes: dict | None = None, seed: int = 0, exclude: set | None = None) -> tuple[onnx.ModelProto, Pruning]:
    """Prune every unit's hidden channels: to ``ratio`` of each, or the split of the units' MACs that makes the
    whole model's conv MACs at most ``target_macs`` of the original's with the least summed output error. A unit
    with a node named in ``exclude`` is left whole."""
    shapes = infer_shapes(model, input_shapes)
    graph = gs.import_onnx(model)
    units = [u for u in find_units(graph, shapes)
             if not ({n.name for n in u.nodes} | {u.consumer}) & set(exclude or ())]
    total = conv_macs(graph, shapes)
    result = Pruning(units, total)
    if not units:
        raise ModelError("--layers hidden: the model has no prunable hidden channels (an inverted residual block "
                         "conv -> activation -> depthwise conv -> activation -> 1x1 conv, or a conv -> GlobalAveragePool -> Flatten -> Gemm head)")
    if target_macs is not None:
        fixed = total - sum(u.macs_per_channel * u.channels for u in units)
        smallest = fixed + sum(u.macs_per_channel * min(keep_options(u.channels)) for u in units)
        if smallest > target_macs * total:
            raise UsageError(f"target MACs {target_macs:g} cannot be met by pruning: the fewest hidden channels give "
                             f"{smallest / total:.3f} of the original conv MACs")
        result.budget = int(math.floor(target_macs * total)) - fixed
        moments = original_moments(model, feeds, units, seed)
        curves = error_curves(graph, units, moments)
        keep = keep_by_budget(units, curves, result.budget)
    else:
        moments = original_moments(model, feeds, units, seed)
        curves = error_curves(graph, units, moments)
        keep = keep_by_ratio(units, ratio)
    for u in units:
        u.keep = kept_after(curves[u.consumer][0], u.channels, keep[u.consumer])
    composed = refit_in_order(model, graph, units, keep, feeds, seed)
    if not result.pruned():
        return composed, result
    return sliced(composed, units), result

"""Fold per-channel affine ops into a chain's convs: before its first 1x1 conv, and after its last conv.

Before: ``y = W1 (a * x + b)`` is ``(W1 diag(a)) x + W1 b``: exact for a 1x1 conv without padding, which is
what a chain's first node is (the padded core comes after it). When a MaxPool sits between the affine and
the chain and every scale is positive, the affine commutes with the max (``max(a x + b) = a max(x) + b``)
and is folded the same way. The seed CNN's BatchNorm after each ReLU is such a Mul/Add, and it takes a
large share of its CPU time (issue 13).

After: ``a * (W x + c) + b`` is ``(diag(a) W) x + (a c + b)``, exact for any conv (the output side has no
padding to respect): a Mul, Add, Sub (constant second input) or inference BatchNormalization reading only the
chain's output, as an exporter leaves an unfolded BatchNorm. The ops vanish from the written model instead of
depending on the runtime's optimizer to fuse them.

Only true constants fold: an initializer also listed in ``graph.input`` (IR >= 4, as
``torch.onnx.export(..., keep_initializers_as_inputs=True)`` writes every weight) is a default the user may
override at run time, so an op reading one is left as it is, and a conv whose weight or bias is one is not
changed. Folding never changes the model's inputs.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnx_tucker.graph import Initializers, add_initializer, consumers, nodes_by_name, unique_name


def _per_channel_of(inits, node, const_index: int, channels: int, rank: int) -> np.ndarray | None:
    """The node's constant input as a (C,) vector when it broadcasts along the channel axis (1) of a
    rank-``rank`` NC... tensor (a scalar counts), else None."""
    name = node.input[const_index]
    if name not in inits:
        return None
    raw = inits.array(name)
    if raw.size == 1:
        return np.full(channels, float(raw.reshape(-1)[0]))
    shape = (1,) * (rank - raw.ndim) + raw.shape if raw.ndim <= rank else None
    if shape is None or shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return raw.reshape(-1).astype(np.float64)


def fold_affine_into_chains(model: onnx.ModelProto, chains: list) -> list[str]:
    """Fold the Mul/Add (and Mul/Add -> MaxPool) feeding each chain's first 1x1 conv, and the per-channel
    affine ops reading its last conv; edits ``model`` and ``chains`` in place. Returns the layers folded into."""
    folded = []
    for chain in chains:
        if chain.form not in ("tucker2", "svd") or chain.channel_axis != 1:
            continue
        before = _fold_one(model, chain)
        after = _fold_after(model, chain)
        if before or after:
            folded.append(chain.layer)
    if folded:
        _drop_unused(model)
    return folded


def _constants(model: onnx.ModelProto) -> Initializers:
    """The initializers folding may treat as constants: not those also listed as graph inputs (overridable)."""
    inits = Initializers(model)
    overridable = {i.name for i in model.graph.input}
    inits.by_name = {name: init for name, init in inits.by_name.items() if name not in overridable}
    return inits


def _taken(model: onnx.ModelProto) -> set[str]:
    """Every name a new initializer must not take: initializers (overridable ones too), graph inputs, node outputs."""
    graph = model.graph
    return ({i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
            | {o for n in graph.node for o in n.output})


def _through_identity(model, inits, name: str) -> str:
    """The initializer behind ``name`` when it is one, or reached through Identity nodes (torch.onnx without
    constant folding routes BatchNorm statistics so); ``name`` itself otherwise."""
    producers = {o: n for n in model.graph.node for o in n.output}
    seen = set()
    while name not in inits and name in producers and producers[name].op_type == "Identity" and name not in seen:
        seen.add(name)
        name = producers[name].input[0]
    return name


def _affine_of(model, node, inits, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(scale, shift, data input) when ``node`` is ``x -> scale * x + shift`` per channel (axis 1), else None."""
    if node.op_type == "BatchNormalization":
        stats = [_through_identity(model, inits, t) for t in node.input[1:5]]
        if len(node.output) != 1 or len(stats) != 4 or any(t not in inits for t in stats):
            return None  # training mode (running stats as outputs) or computed statistics
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0):
            return None
        gamma, beta, mean, var = (inits.array(t).astype(np.float64).reshape(-1) for t in stats)
        if gamma.size != channels:
            return None
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        return scale, beta - mean * scale, node.input[0]
    if node.op_type not in ("Mul", "Add", "Sub") or len(node.input) != 2:
        return None
    const = 1 if node.input[1] in inits else 0 if node.input[0] in inits and node.op_type != "Sub" else None
    if const is None:
        return None
    value = _per_channel_of(inits, node, const, channels, rank)
    if value is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    affine = {"Mul": (value, zeros), "Add": (ones, value), "Sub": (ones, -value)}[node.op_type]
    return affine[0], affine[1], node.input[1 - const]


def _fold_after(model, chain) -> bool:
    """Fold the per-channel affine ops that read the chain's last conv (one after another) into that conv."""
    nodes = nodes_by_name(model)
    last = nodes.get(chain.nodes[chain.last_role])
    if last is None or last.op_type != "Conv":
        return False
    inits = _constants(model)
    if last.input[1] not in inits or len(consumers(model, last.input[1])) != 1:
        return False  # an overridable weight, or one two chains share (identical layers): it would be scaled for both
    has_bias = len(last.input) > 2 and bool(last.input[2])
    if has_bias and last.input[2] not in inits:
        return False  # an overridable (or computed) bias: not ours to change
    w = inits.array(last.input[1])
    channels = w.shape[0]
    graph_outputs = {o.name for o in model.graph.output}
    scale, shift, ops, tensor = np.ones(channels), np.zeros(channels), [], last.output[0]
    while tensor not in graph_outputs:
        readers = consumers(model, tensor)
        if len(readers) != 1:
            break
        affine = _affine_of(model, readers[0], inits, channels, w.ndim)
        if affine is None or affine[2] != tensor:
            break
        scale, shift = scale * affine[0], shift * affine[0] + affine[1]  # the new op runs on the folded result
        ops.append(readers[0])
        tensor = readers[0].output[0]
    if not ops:
        return False
    bias = inits.array(last.input[2]).astype(np.float64) if has_bias else np.zeros(channels)
    inits.set(last.input[1], (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
    new_bias = (bias * scale + shift).astype(w.dtype)
    if has_bias and len(consumers(model, last.input[2])) == 1:
        inits.set(last.input[2], new_bias)
        bias_name = last.input[2]
    else:
        bias_name = unique_name(f"{chain.nodes[chain.last_role]}_B", _taken(model))
        add_initializer(model, new_bias, bias_name)
    while len(last.input) < 3:
        last.input.append("")
    last.input[2] = bias_name
    last.output[0] = tensor  # the conv now writes what the last affine op wrote: every reader stays as it was
    gone = {id(op) for op in ops}
    keep = [n for n in model.graph.node if id(n) not in gone]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    chain.output, chain.bias = tensor, bias_name
    chain.extra["folded_after"] = {"ops": [op.op_type for op in ops], "bias": bias_name}
    return True


def _fold_one(model, chain) -> bool:
    nodes = nodes_by_name(model)
    first = nodes.get(chain.nodes.get("first", ""))  # a kxk -> 1x1 chain has no first 1x1: nothing exact to fold into
    if first is None or first.op_type != "Conv" or len(first.input) > 2 and first.input[2]:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
    if any(attrs.get("pads", [0])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return False
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    inits = _constants(model)
    if first.input[1] not in inits:
        return False  # an overridable weight: not ours to change
    w = inits.array(first.input[1])
    channels = w.shape[1]
    pool, tensor = None, first.input[0]
    node = producers.get(tensor)
    if node is not None and node.op_type == "MaxPool":
        pool, tensor = node, node.input[0]
        node = producers.get(tensor)
    if node is None or node.op_type != "Add" or tensor in graph_outputs:
        return False
    add = node
    add_const = 1 if add.input[1] in inits else 0 if add.input[0] in inits else None
    if add_const is None:
        return False
    mul = producers.get(add.input[1 - add_const])
    if mul is None or mul.op_type != "Mul" or mul.output[0] in graph_outputs:
        return False
    mul_const = 1 if mul.input[1] in inits else 0 if mul.input[0] in inits else None
    if mul_const is None:
        return False
    scale = _per_channel_of(inits, mul, mul_const, channels, w.ndim)
    shift = _per_channel_of(inits, add, add_const, channels, w.ndim)
    if scale is None or shift is None:
        return False
    # every intermediate tensor must feed only the next step, so removing the affine changes nothing else
    chain_path = [mul.output[0], add.output[0]] + ([pool.output[0]] if pool is not None else [])
    for t in chain_path:
        if len(consumers(model, t)) != 1:
            return False
    if pool is not None and not np.all(scale > 0):
        return False  # max(a x + b) = a max(x) + b only for a > 0
    x = mul.input[1 - mul_const]
    w64 = w.astype(np.float64)
    new_w = w64 * scale.reshape(1, -1, *([1] * (w.ndim - 2)))
    new_b = w64.reshape(w.shape[0], w.shape[1]) @ shift
    inits.set(first.input[1], new_w.astype(w.dtype))
    bias_name = unique_name(f"{chain.nodes['first']}_B", _taken(model))
    add_initializer(model, new_b.astype(w.dtype), bias_name)
    if pool is not None:
        pool.input[0] = x  # the max now runs on the raw activations
    else:
        first.input[0] = x
    while len(first.input) < 3:
        first.input.append("")
    first.input[2] = bias_name
    keep = [n for n in model.graph.node if n is not mul and n is not add]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    chain.input = first.input[0]
    chain.extra["folded_affine"] = {"bias": bias_name, "through_maxpool": pool is not None}
    return True


def _drop_unused(model: onnx.ModelProto) -> None:
    """Drop Identity nodes nobody reads any more (they fed a folded BatchNorm its statistics), then initializers.
    An initializer listed as a graph input stays: dropping it alone would leave an input the user must feed."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type == "Identity" and not any(o in read for o in n.output)]
        if not dead:
            break
        keep = [n for n in model.graph.node if all(n is not d for d in dead)]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input} | outputs | {i.name for i in model.graph.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)

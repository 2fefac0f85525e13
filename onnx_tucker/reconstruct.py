"""Local reconstruction: train each chain to reproduce the original layer's activated output.

Global distillation has one target per image (the class distribution); with a few thousand unlabelled
images it over-fits. A chain's output has one target per position and channel (about a thousand
positions per 32x32 image), so fitting the chain alone is far better determined. For each chain, in
graph order (BRECQ-style block reconstruction):

- the *target* is the original model's tensor after the chain's output passes the ops that follow
  it up to the first activation: a residual ``Add`` (the chain is fitted where the branches merge,
  with the skip as the compressed model computes it) and then ``Relu`` / ``Clip`` / ``LeakyRelu``;
- the chain's *inputs* are the compressed model's own tensors (with the chains before it already
  reconstructed), so later chains also absorb the error of earlier ones;
- every factor's weight and the bias are trained together with Adam (a closed-form refit can only
  fit the last factors given the first) on ``mean((s - t)^2) / mean(t^2)``;
- the trained chain is kept only if that error is lower on held-out images than before.

The graph, names and every other initializer stay as they are. torch is needed (``[distill]``).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import onnx

from onnx_tucker.chain import Chain, chains_of
from onnx_tucker.graph import constant_outputs
from onnx_tucker.passes import Passes

DEFAULT_STEPS = 200  # per chain (measured in docs/distill.md)
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 16  # images per step: ~16k target rows at 32x32
DEFAULT_JOINT = True  # fit chains that feed only each other (a residual block's two convs) together
DEFAULT_BLOCKS = 3  # ... and up to this many such units in a row, each fed by the one before (docs/distill.md)
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu")
AFFINE = ("Mul", "Add", "Sub", "Div")  # after the activation, with a constant second operand
EVAL_BATCH = 256
MAX_BYTES = 1 << 30  # a unit's inputs and target held in memory; beyond, a seeded subset of the images


def chains_in(model: onnx.ModelProto) -> list[Chain]:
    """The model's chain records, or for a model without them (older onnx-tucker output) the chains
    read from the node names: nodes named ``<layer>_tucker_<role>``, grouped by layer, graph order."""
    recorded = chains_of(model)
    if recorded:
        return recorded
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if "_tucker_" in node.name:
            groups.setdefault(node.name.rsplit("_tucker_", 1)[0], []).append(node)
    inits = {i.name for i in model.graph.initializer}
    chains = []
    for layer, nodes in groups.items():
        made = {o for n in nodes for o in n.output}
        read = {i for n in nodes for i in n.input}
        ins = [i for n in nodes for i in n.input if i and i not in made and i not in inits]
        outs = [o for n in nodes for o in n.output if o not in read]
        if len(set(ins)) != 1 or len(outs) != 1:
            continue
        last = nodes[-1]
        roles = {n.name.rsplit("_tucker_", 1)[1]: n.name for n in nodes}
        chains.append(Chain(layer=layer, form="", ranks=(), nodes=roles,
                            weights={n.name.rsplit("_tucker_", 1)[1]: n.input[1] for n in nodes if len(n.input) > 1},
                            bias=last.input[2] if len(last.input) > 2 and last.input[2] in inits else None,
                            input=ins[0], output=outs[0]))
    return chains


def target_of(model: onnx.ModelProto, chain: Chain) -> tuple[str, list[onnx.NodeProto]]:
    """The tensor a chain is reconstructed at and the nodes after the chain leading to it.

    From the chain's output, follow a sole consumer that is a residual ``Add`` (both inputs
    computed, at most one), then an activation, then any elementwise op with a constant operand (an
    unfolded BatchNorm's ``Mul``/``Add`` after the ReLU: the error is then weighed as the next layer
    sees it, not in the ReLU's raw scale); stop elsewhere.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in model.graph.output}
    tensor, path, merged, activated = chain.output, [], False, False
    while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        if activated:
            other = [i for i in node.input if i != tensor]
            if not (node.op_type in AFFINE and len(node.input) == 2 and len(other) == 1 and other[0] in constants
                    and (node.op_type in ("Mul", "Add") or node.input[0] == tensor)):  # x - c, x / c; not c / x
                break
        elif node.op_type == "Add" and not merged and len(node.input) == 2 and not (set(node.input) & constants):
            merged = True
        elif node.op_type in ACTIVATIONS:
            activated = True
        else:
            break
        path.append(node)
        tensor = node.output[0]
    return tensor, path


def units(model: onnx.ModelProto, chains: Sequence[Chain], joint: bool = True, blocks: int = 1) -> list[list[Chain]]:
    """Chains fitted together: with ``joint``, a chain whose target only the next chain reads joins it
    (the two convs of a residual block are then fitted to the block's output after the Add), else one each.
    With ``blocks`` > 1 (and ``joint``), up to that many such units in a row become one where each reads
    nothing but what the one before computes (a stage-level scope, as in BRECQ): fitted to the last one's
    target only, so an early block may leave its own output wherever helps the later ones most."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    out: list[list[Chain]] = []
    for chain in chains:
        if joint and out:
            target, _ = target_of(model, out[-1][-1])
            if readers.get(target) and readers[target] <= set(chain.node_names()):
                out[-1].append(chain)
                continue
        out.append([chain])
    return _stages(model, out, blocks) if joint and blocks > 1 else out


def _stages(model: onnx.ModelProto, blocks_in_order: list[list[Chain]], blocks: int) -> list[list[Chain]]:
    grouped, count = [], 0
    for unit in blocks_in_order:
        if grouped and count < blocks and _fed_by(model, unit, grouped[-1]):
            grouped[-1].extend(unit)
            count += 1
            continue
        grouped.append(list(unit))
        count = 1
    return grouped


def _fed_by(model: onnx.ModelProto, unit: Sequence[Chain], before: Sequence[Chain]) -> bool:
    """Whether every tensor ``unit`` reads from outside itself is computed by ``before`` (its chains and the
    ops between them and their targets): then the two can be fitted as one."""
    names = {m for c in before for m in c.node_names()}
    made = {o for n in model.graph.node if n.name in names for o in n.output}
    made |= {o for c in before for n in target_of(model, c)[1] for o in n.output}
    inputs = set(_cut_inputs(model, unit, [n for c in unit for n in target_of(model, c)[1]]))
    if not (inputs and inputs <= made):
        return False
    # The joined unit is fitted to the last target only: nothing ``before`` computes may be read outside the two (a
    # conv feeding two chains joined one of them, whose sibling's output then fell out of the loss and got worse).
    inside = names | {m for c in unit for m in c.node_names()}
    inside |= {n.name for c in list(before) + list(unit) for n in target_of(model, c)[1]}
    outputs = {o.name for o in model.graph.output}
    return not any(t in outputs for t in made) and all(
        n.name in inside for n in model.graph.node if any(i in made for i in n.input))


def _cut_inputs(model: onnx.ModelProto, chain: Chain | Sequence[Chain], path: Sequence[onnx.NodeProto]) -> list[str]:
    """Tensors the chains and their paths read that they do not compute themselves (not initializers, nor
    ``Constant`` nodes' outputs, such as the bounds of a torch-exported ReLU6's ``Clip``: the unit computes
    those itself)."""
    names = {n for c in ([chain] if isinstance(chain, Chain) else chain) for n in c.node_names()}
    nodes = [n for n in model.graph.node if n.name in names] + list(path)
    made = {o for n in nodes for o in n.output}
    constant = {i.name for i in model.graph.initializer} | set(constant_outputs(model))
    return list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in made and i not in constant))


def _rel_error(student, target) -> float:
    return float(((student - target) ** 2).sum() / max(float((target**2).sum()), 1e-30))


def reconstruct(original: onnx.ModelProto, compressed: onnx.ModelProto, chains: Sequence[Chain],
                train: dict[str, np.ndarray], check: dict[str, np.ndarray], trainable: Sequence[str], **options) -> tuple[onnx.ModelProto, dict]:
    """:func:`_reconstruct` with torch's global generator restored afterwards (the seeded run reseeds it; a caller's
    own random stream must carry on as it was)."""
    import torch

    device = options.get("device")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        return _reconstruct(original, compressed, chains, train, check, trainable, **options)


def _reconstruct(original: onnx.ModelProto, compressed: onnx.ModelProto, chains: Sequence[Chain],
                 train: dict[str, np.ndarray], check: dict[str, np.ndarray], trainable: Sequence[str], *,
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH,
                 seed: int = 0, threads: int | None = None, joint: bool = DEFAULT_JOINT, blocks: int = DEFAULT_BLOCKS,
                 progress: bool = False, device=None, channels: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """Reconstruct ``chains`` of ``compressed`` one after the other (see the module docstring).

    ``train`` / ``check``: graph inputs to fit on and to judge on (held out). Only names in
    ``trainable`` change. ``blocks``: residual blocks in a row fitted as one unit (:func:`units`). ``progress``: a bar over all units' steps on stderr (800 steps a unit take
    minutes on a deep model). ``device``: where torch trains (a ``torch.device`` or its name; default
    the CPU); the inputs and targets still come from onnxruntime on the CPU, once per unit, and the
    minibatches are drawn by a CPU generator (the same indices on any device). Returns ``(model, stats)``;
    stats['chains'] has per unit the target tensor, the device, the held-out relative error before and
    after and whether the new weights were kept. ``channels``: ``{tensor: kept channel indices}`` where
    ``compressed`` holds fewer channels (axis 1) than ``original`` (pruned hidden channels, ``Pruning.kept_channels``):
    a unit aiming there fits the original's tensor at those channels. A unit whose target still differs in shape
    from the original's is left as it is (``skipped`` in its row).
    """
    import torch

    from onnx_tucker.distill import _run, _session
    from onnx_tucker.graph import prefix_model
    from onnx_tucker.torch_exec import TorchGraph

    def subset(feeds: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
        n = len(next(iter(feeds.values())))
        if n <= cap:
            return feeds
        rows = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        return {k: v[rows] for k, v in feeds.items()}

    started = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    allowed = set(trainable)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    from tqdm import tqdm

    model = compressed
    in_original = {o for n in original.graph.node for o in n.output}
    rows = []
    todo = units(model, chains, joint, blocks)
    both = {k: np.concatenate([train[k], check[k]]) for k in train}
    n_train, n_all = len(next(iter(train.values()))), len(next(iter(both.values())))
    student_pass, teacher_pass = Passes(model, both), Passes(original, both)
    position = {nd.name: i for i, nd in enumerate(model.graph.node)}
    producer = {o: i for i, nd in enumerate(original.graph.node) for o in nd.output}
    bar = tqdm(total=steps * len(todo), desc="reconstruct", unit="step", file=sys.stderr, disable=None if progress else True, leave=False)  # a terminal only (None), like the probes
    for index, unit in enumerate(todo):
        bar.set_postfix(unit=f"{index + 1}/{len(todo)}")
        params = list(dict.fromkeys(t for c in unit for t in c.trainable() if t in allowed))
        paths = [target_of(model, c) for c in unit]
        target, path = paths[-1][0], [n for _, p in paths for n in p]
        if not params or target not in in_original:  # nothing to train, or no counterpart to fit to
            bar.update(steps)
            continue
        cut = _cut_inputs(model, unit, path)
        t0 = time.perf_counter()
        # Teacher: the original's tensor; inputs: the compressed model's own (earlier chains already fitted).
        teacher = _session(prefix_model(original, [target]), threads)  # only the nodes the tensors need
        student_in = _session(prefix_model(model, cut), threads)
        one = {k: v[:1] for k, v in train.items()}
        per_image = sum(a.nbytes for a in _run(student_in, one)) + _run(teacher, one)[0].nbytes
        cap = max(1, MAX_BYTES // max(per_image, 1))
        if cap >= n_all:  # every image fits: the tensors come from the two forward passes, a segment a unit
            first = min(position[nd] for c in unit for nd in c.node_names() if nd in position)
            xs = student_pass.at(model, cut, first)
            y = teacher_pass.at(original, [target], producer[target] + 1)[0]
            x_train, x_check = [x[:n_train] for x in xs], [x[n_train:] for x in xs]
            y_train, y_check = y[:n_train], y[n_train:]
        else:  # a seeded subset of the images, through prefix sessions (a big model's early layers)
            fit, held = subset(train, cap), subset(check, cap)
            x_train, x_check = _run(student_in, fit), _run(student_in, held)
            y_train, y_check = _run(teacher, fit)[0], _run(teacher, held)[0]
        if channels and target in channels:  # pruned: the original's tensor at the channels kept
            y_train, y_check = (np.take(y, channels[target], axis=1) for y in (y_train, y_check))
        x_train = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in x_train]
        x_check = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in x_check]
        y_train = torch.from_numpy(np.ascontiguousarray(y_train)).to(dev)
        y_check = torch.from_numpy(np.ascontiguousarray(y_check)).to(dev)
        block = TorchGraph(model, params, outputs=[target], inputs=cut).to(dev)
        opt_params = list(block.onnx_parameters().values())

        def check_error() -> float:
            with torch.no_grad():
                out = torch.cat([block(*[x[s : s + EVAL_BATCH] for x in x_check])[0] for s in range(0, len(y_check), EVAL_BATCH)])
            return _rel_error(out.double(), y_check.double())

        with torch.no_grad():
            shape = tuple(block(*[x[:1] for x in x_check])[0].shape[1:])
        if shape != tuple(y_check.shape[1:]):  # no counterpart of the same shape to fit to
            rows.append({"layer": "+".join(c.layer for c in unit), "target": target, "inputs": len(cut), "images": len(y_train),
                         "device": str(dev), "before": None, "after": None, "kept": False,
                         "skipped": f"its output {list(shape)} differs from the original's {list(y_check.shape[1:])}",
                         "seconds": round(time.perf_counter() - t0, 2)})
            bar.update(steps)
            continue
        before = check_error()
        optimizer = torch.optim.Adam(opt_params, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        m = len(y_train)
        b = min(batch_size, m)
        scale = float((y_train.double() ** 2).mean())
        for _ in range(steps):
            idx = torch.randint(0, m, (b,), generator=generator).to(dev)
            out = block(*[x[idx] for x in x_train])[0]
            loss = ((out.float() - y_train[idx].float()) ** 2).mean() / max(scale, 1e-30)  # float32 for a float16 model too
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not math.isfinite(float(loss.detach())):
                break
            optimizer.step()
            scheduler.step()
            bar.update(1)
        after = check_error()
        kept = math.isfinite(after) and after < before
        if kept:  # else the chain stays as it was
            model = block.write_back(model)
        rows.append({"layer": "+".join(c.layer for c in unit), "target": target, "inputs": len(cut), "images": len(y_train),
                     "device": str(dev),
                     "before": round(before, 6),
                     "after": round(after, 6), "kept": kept, "seconds": round(time.perf_counter() - t0, 2)})
    bar.close()
    stats = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "blocks": blocks if joint else 1, "chains": rows,
             "kept": sum(r["kept"] for r in rows), "seconds": round(time.perf_counter() - started, 2)}
    return model, stats

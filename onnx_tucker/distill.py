"""Label-free recovery of a compressed model: distil the original into the Tucker factors.

``distill(original, compressed, feeds, trainable)`` trains only the named initializers of the
compressed model (the chains' factor weights and biases) so that its class distribution matches the
original model's on the unlabelled calibration inputs: soft-target KL divergence at a temperature,
teacher = the original model (onnxruntime on CPU, the torch executor on CUDA), light seeded
augmentation for image inputs. By default each chain is first reconstructed locally
(``onnx_tucker.reconstruct``: fitted alone to the original's activated output, many targets per image).
Part of the inputs is held out; the distilled model is kept if it agrees better with the original there than
the compressed model (lower KL and no lower top-1 agreement), else the reconstructed one if its KL is lower, else
the compressed model is returned unchanged. The graph, names and every other initializer stay as they are.

torch is imported only when ``distill`` runs (``pip install 'onnx-tucker[distill]'``).
Defaults measured in docs/distill.md.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import onnx

from onnx_tucker.errors import ModelError, UsageError

MISSING_TORCH = "--distill needs torch: pip install 'onnx-tucker[distill]'"

# Defaults measured on the shipped CIFAR-10 models at 5x / 3x fewer conv MACs with 2048 calibration
# images (docs/distill.md): more steps or a higher rate over-fit 1844 training images (the holdout
# check then refuses), T=4 beat T=1, 2 and 8; 500 steps take 2-5 minutes on the 2-core VM.
DEFAULT_STEPS = 500
DEFAULT_LR = 1e-4
DEFAULT_BATCH = 64
DEFAULT_TEMPERATURE = 4.0
DEFAULT_HOLDOUT = 0.1
# Local reconstruction of each chain before the global loss (onnx_tucker.reconstruct): steps per chain.
# Measured (docs/distill.md): on the BN-folded ResNets it gains 0.1-1.2 points over the global loss alone
# (ResNet-20 at 2x: -1.56 -> -0.62); on the seed CNN (BN not folded) it is refused by the holdout check.
# 800 rather than 200 steps: small ResNet 3x -2.61 -> -2.26 (2000: -2.12), 5x with the global phase
# -4.57 -> -3.91, ResNet-56 at ratio 0.5 -1.71 (200 + global) -> -1.41; ResNet-20 at 2x the same (-0.68).
DEFAULT_RECONSTRUCT_STEPS = 800
# Weight of the intermediate-target loss (chains' activated outputs, normalised MSE) next to the KL.
DEFAULT_FEATURE_WEIGHT = 0.0
TRAIN_CHECK = 512  # training samples on which the fit is also reported
CHECKPOINTS = 10  # holdout KL evaluations during training (diagnostics: stats['check_curve'])
WARMUP_FRACTION = 0.05  # linear warm-up, then cosine decay to 0
SHIFT_FRACTION = 1 / 8  # pad-crop shifts up to 1/8 of the image side (4 pixels at 32x32)
MIN_SPATIAL = 8  # smaller "images" are not augmented
CURVE_POINTS = 10


def _import_torch():
    try:
        import torch
    except ImportError:
        raise UsageError(MISSING_TORCH) from None
    return torch


def check_runnable(model: onnx.ModelProto, feeds: dict | None = None) -> None:
    """Before any work: torch is installed and its executor runs every op of ``model``, else the one-line error
    (an op, a custom domain, a subgraph) that the distillation would raise after the whole compression. With
    ``feeds`` (the calibration inputs) the executor also runs ``model`` on their first sample, which finds the
    refusals that depend on a node's attributes or inputs (a training-mode BatchNormalization, a Resize mode)."""
    torch = _import_torch()
    from onnx_tucker.torch_exec import SUPPORTED_OPS, TorchGraph

    for i, node in enumerate(model.graph.node):
        where = f"node '{node.name}'" if node.name else f"node {i}"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelError(f"--distill: the torch executor cannot run {node.op_type} with a subgraph ({where}); compress without --distill")
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise ModelError(f"--distill: the torch executor cannot run op '{op}' ({where}); compress without --distill")
    if feeds:
        try:
            with torch.no_grad():
                TorchGraph(model)(**{k: torch.from_numpy(np.ascontiguousarray(np.asarray(v[:1]))) for k, v in feeds.items()})
        except ModelError as exc:
            reason = str(exc).removeprefix("torch executor: ")
            raise ModelError(f"--distill: the torch executor cannot run this model: {reason}; compress without --distill") from None


def tucker_trainable(model: onnx.ModelProto) -> list[str]:
    """The initializers a distillation of an onnx-tucker model should train.

    With chain records (any model onnx-tucker wrote since they exist): every chain's factor weights and
    biases, whatever its form (Tucker-2 and the SVD forms of 1x1 convs and dense layers). Without: the
    initializers whose names contain ``_tucker_`` plus the bias of each ``*_tucker_out`` conv. Either way
    a bias another node also reads is left out (it would change there too).
    """
    from onnx_tucker.chain import chains_of

    inits = [i.name for i in model.graph.initializer]
    init_set = set(inits)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    records = chains_of(model)
    if records:
        owned = {w for c in records for w in c.weights.values()}
        shared_ok = {b for c in records for b in c.trainable() if b not in owned and readers.get(b, 0) == 1}
        return [n for n in inits if n in owned or n in shared_ok]
    chosen = {n for n in inits if "_tucker_" in n}
    for node in model.graph.node:
        if node.op_type == "Conv" and "_tucker_out" in node.name and len(node.input) > 2:
            bias = node.input[2]
            if bias in init_set and readers.get(bias, 0) == 1:
                chosen.add(bias)
    return [n for n in inits if n in chosen]


# --- graph helpers ---------------------------------------------------------------------------------


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def softmax_inputs(model: onnx.ModelProto) -> list[bool]:
    """Per graph output, whether :func:`logit_names` took the input of a final Softmax (class scores, whatever the rank)."""
    return [name != out.name for name, out in zip(logit_names(model), model.graph.output)]


def logit_names(model: onnx.ModelProto) -> list[str]:
    """Per graph output, the tensor to distil: the input of a final Softmax over the last axis (through the Casts a
    float16 conversion puts after it), else the output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    names = []
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Cast", "Identity") and node.input:  # a float16 model's output Cast
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            rank = len(out.type.tensor_type.shape.dim)
            if axis == -1 or (rank and axis == rank - 1) or (opset < 13 and rank == 2 and axis == 1):
                names.append(node.input[0])
                continue
        names.append(out.name)
    return names


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``names`` (intermediate tensors allowed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name: o for o in model.graph.output}
    types = None
    del out.graph.output[:]
    for name in names:
        if name in existing:
            out.graph.output.append(existing[name])
        else:  # an inner tensor, in its own type (a float16 model's logits are float16)
            if types is None:
                from onnx_tucker.graph import tensor_types

                types = tensor_types(model)
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None))
    return out


def _session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - the models were checked before
        raise ModelError(f"onnxruntime cannot load the model for distillation: {str(exc).strip().splitlines()[0][:200]}") from None


def _run(session, feeds: dict[str, np.ndarray], batch: int = 256) -> list[np.ndarray]:
    from onnx_tucker.capture import run_all

    return run_all(session, feeds, batch_size=batch)  # in the model's own batch where it is fixed


def _feature_names(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """The reconstruction targets of the compressed model's chains that the original computes too."""
    from onnx_tucker.reconstruct import chains_in, target_of, units

    made = {o for n in original.graph.node for o in n.output}
    names = [target_of(compressed, u[-1])[0] for u in units(compressed, chains_in(compressed))]
    return [n for n in dict.fromkeys(names) if n in made]


# --- metrics ---------------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(len(z), -1, z.shape[-1]).astype(np.float64) if z.ndim > 2 else z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def output_kinds(arrays: Sequence[np.ndarray], softmax_inputs: Sequence[bool] | None = None) -> list[str]:
    """How each distilled output is matched: ``"classes"`` (class scores on the last axis: the input of a final
    Softmax, or an (N, C) output with C > 1; soft-target KL and top-1 agreement) or ``"values"`` (anything else,
    such as a segmentation map in NCHW, boxes or an embedding: the relative squared error; a KL over its last axis
    would ignore an offset per row and compare the wrong axis)."""
    softmax_inputs = softmax_inputs or [False] * len(arrays)
    return ["classes" if soft or (a.ndim == 2 and a.shape[1] > 1) else "values" for a, soft in zip(arrays, softmax_inputs)]


def agreement_and_kl(teacher: Sequence[np.ndarray], student: Sequence[np.ndarray], kinds: Sequence[str] | None = None) -> dict:
    """How far ``student``'s outputs are from ``teacher``'s. ``kl``: the mean over outputs of KL(teacher || student)
    of the class distributions (``"classes"`` outputs) or of the relative squared error (``"values"``; see
    :func:`output_kinds`, the default); ``measure`` says which. ``agreement``: top-1 agreement of the first class
    output, None when there is none."""
    kinds = list(kinds) if kinds is not None else output_kinds(teacher)
    errors = []
    for t, s, kind in zip(teacher, student, kinds):
        if kind == "classes":
            lt, ls = _log_softmax(t), _log_softmax(s)
            errors.append(float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1))))
        else:
            t64, s64 = t.astype(np.float64), s.astype(np.float64)
            errors.append(float(np.sum((s64 - t64) ** 2) / max(float(np.sum(t64**2)), 1e-30)))
    first = next((i for i, k in enumerate(kinds) if k == "classes"), None)
    agree = None
    if first is not None:
        t, s = teacher[first], student[first]
        agree = float(np.mean(t.reshape(len(t), -1, t.shape[-1]).argmax(-1) == s.reshape(len(s), -1, s.shape[-1]).argmax(-1)))
    measure = {frozenset({"classes"}): "kl", frozenset({"values"}): "relative error"}.get(frozenset(kinds), "kl + relative error")
    return {"agreement": agree, "kl": float(np.mean(errors)), "measure": measure}


# --- augmentation ----------------------------------------------------------------------------------


def image_layout(shape: Sequence[int]) -> str | None:
    """'NHWC' for a 4-D shape whose last dim is 1-4, 'NCHW' when dim 1 is, None otherwise (or too small)."""
    if len(shape) != 4:
        return None
    if 1 <= shape[3] <= 4 and min(shape[1], shape[2]) >= MIN_SPATIAL:
        return "NHWC"
    if 1 <= shape[1] <= 4 and min(shape[2], shape[3]) >= MIN_SPATIAL:
        return "NCHW"
    return None


def _augment(torch, batch: dict, layouts: dict, generator):
    """Random horizontal flips and reflect-padded shifts, the same draw for every image input of a sample."""
    import torch.nn.functional as F

    if not layouts:
        return batch
    n = len(next(iter(batch.values())))
    flip = torch.rand(n, generator=generator) < 0.5
    draws = {}
    out = dict(batch)
    for name, layout in layouts.items():
        x = batch[name]
        nchw = x.permute(0, 3, 1, 2) if layout == "NHWC" else x
        h, w = nchw.shape[2], nchw.shape[3]
        pad = max(1, int(round(min(h, w) * SHIFT_FRACTION)))
        if pad not in draws:
            draws[pad] = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
        dy, dx = (d.to(x.device) for d in draws[pad])
        f = flip.to(x.device)
        nchw = torch.where(f[:, None, None, None], nchw.flip(3), nchw)
        padded = F.pad(nchw, (pad, pad, pad, pad), mode="reflect")
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
        picked = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (n, h, w, c)
        out[name] = picked.contiguous() if layout == "NHWC" else picked.permute(0, 3, 1, 2).contiguous()
    return out


# --- the step --------------------------------------------------------------------------------------


def _whole_number(value):
    """``value`` as an int where it is a whole number (numpy integers included, bools not), else unchanged."""
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) else value


def _real(value):
    """``value`` as a float where it is a real number (numpy floats included, bools not), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _check_args(steps, lr, batch_size, holdout, temperature, reconstruct_steps=0, reconstruct_blocks=None, seed=0, threads=None,
                feature_weight=0.0):
    """Every option checked (one-line UsageError) and normalised: numpy scalars become Python numbers."""
    steps, batch_size, reconstruct_steps, seed = map(_whole_number, (steps, batch_size, reconstruct_steps, seed))
    reconstruct_blocks, threads = _whole_number(reconstruct_blocks), _whole_number(threads)
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"distillation seed must be a whole number >= 0, got {seed!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"distillation threads must be a whole number >= 1 (or None), got {threads!r}")
    weight = _real(feature_weight)
    if weight is None or not math.isfinite(weight) or weight < 0:
        raise UsageError(f"distillation feature weight must be a number >= 0, got {feature_weight!r}")
    if not isinstance(reconstruct_steps, int) or reconstruct_steps < 0:
        raise UsageError(f"reconstruction steps must be a whole number >= 0, got {reconstruct_steps}")
    if reconstruct_blocks is not None and (not isinstance(reconstruct_blocks, int) or isinstance(reconstruct_blocks, bool)
                                           or reconstruct_blocks < 1):
        raise UsageError(f"reconstruction blocks must be a whole number >= 1, got {reconstruct_blocks}")
    if not isinstance(steps, int) or steps < (0 if reconstruct_steps else 1):  # 0: reconstruction alone
        raise UsageError(f"distillation steps must be a positive integer (0 only with reconstruction), got {steps}")
    rate = _real(lr)
    if rate is None or not (math.isfinite(rate) and rate > 0):
        raise UsageError(f"distillation learning rate must be positive, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"distillation batch size must be a positive integer, got {batch_size!r}")
    fraction = _real(holdout)
    if fraction is None or not (0 <= fraction < 1):
        raise UsageError(f"distillation holdout must be a fraction in [0, 1), got {holdout!r}")
    temp = _real(temperature)
    if temp is None or not (math.isfinite(temp) and temp > 0):
        raise UsageError(f"distillation temperature must be positive, got {temperature!r}")
    return steps, rate, batch_size, fraction, temp, reconstruct_steps, reconstruct_blocks, seed, threads, weight


def _device(torch, device: str):
    name = str(device)
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"distillation on '{name}': this torch build sees no CUDA GPU (use device 'cpu')")
        return torch.device(name)
    raise UsageError(f"distillation device must be 'cpu' or 'cuda', got '{name}'")


def _better(m: dict | None, before: dict) -> bool:
    """Whether check-set metrics ``m`` pass against ``before``: lower KL, top-1 agreement not lower (where the model
    has class scores)."""
    return (m is not None and m["kl"] < before["kl"]
            and (m["agreement"] is None or before["agreement"] is None or m["agreement"] >= before["agreement"]))


def _reconstruction_passes(m: dict | None, before: dict) -> bool:
    """The reconstruction's model-level check: a lower KL on the check inputs. Each unit has already kept its
    weights only where its held-out output error fell (thousands of targets an image); top-1 agreement on a couple
    of hundred images moves in steps of one image. On seven CIFAR models the reconstruction lowered the held-out KL and
    raised test top-1 every time (+0.45 to +3.0 points), and the agreement rule refused two of them, worth 0.76 and
    0.59 points (small ResNet ``--ratio 0.5 --forms spatial``: agreement 97.1 -> 96.6 %, KL 0.036 -> 0.028;
    docs/distill.md, stop 17). The global phase, which fits ten numbers an image and can over-fit them, keeps the
    stricter :func:`_better`."""
    return m is not None and m["kl"] < before["kl"]


def _curve(losses: list[float]) -> dict:
    if not losses:
        return {"first": None, "last": None, "min": None, "curve": []}
    k = max(1, len(losses) // 20)
    chunks = np.array_split(np.asarray(losses), min(CURVE_POINTS, len(losses)))
    return {
        "first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "min": float(np.min(losses)),
        "curve": [round(float(c.mean()), 6) for c in chunks],
    }


def distill(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    trainable: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    augment: bool = True,
    holdout: float = DEFAULT_HOLDOUT,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = None,
    keep_worse: bool = False,
    reconstruct_steps: int = DEFAULT_RECONSTRUCT_STEPS,
    reconstruct_blocks: int | None = None,
    feature_weight: float = DEFAULT_FEATURE_WEIGHT,
    channels: dict | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Train the ``trainable`` initializers of ``compressed`` to reproduce ``original``'s outputs.

    ``feeds``: unlabelled inputs ``{input name: array}`` (same sample count each), e.g. the calibration
    set; a seeded ``holdout`` fraction of them is kept out of training, and the trained weights are
    kept only if their KL there is lower and their top-1 agreement with the original no lower than
    before (holdout 0: checked on the training inputs). Adam, linear warm-up then cosine decay of ``lr``,
    ``steps`` minibatches of ``batch_size``; loss ``T^2 KL(softmax(t/T) || softmax(s/T))`` on the logits
    (the input of a final Softmax, else the output itself). ``augment``: random horizontal flips and
    reflect-padded shifts (up to 1/8 of the side) of 4-D image inputs, NHWC or NCHW detected from the
    shape. ``threads``: torch CPU threads for the run (default: torch's). ``keep_worse``: return the
    trained weights even when the check fails (for measurements; ``stats['kept']`` still says whether
    it passed). ``reconstruct_steps`` (0: off): first fit each chain alone to the original's activated
    output at that point (``onnx_tucker.reconstruct``, on the same training inputs, judged on the same
    holdout; ``reconstruct_blocks``: residual blocks in a row fitted as one, default
    ``reconstruct.DEFAULT_BLOCKS``; ``channels``: the kept channels of tensors pruning cut,
    ``Pruning.kept_channels()``, by default those ``compressed`` records), then distil from there (from the compressed model instead when neither the reconstruction nor the
    distillation from it passes the check); the model returned is the distilled one if it passes the check against
    the compressed model, else the reconstructed one if it passes, else the compressed one. Same seed, inputs and
    threads on CPU: the same result.

    Returns ``(model, stats)``: the distilled model (same graph and names, only the trainable
    initializers' values differ), or ``compressed`` itself when the distilled one is not better on
    the check set (``stats['kept']`` False). Stats: steps, lr, batch_size, temperature, augment (the
    augmented inputs and their layout, or False), seed, device, teacher, trainable_tensors,
    trainable_values, train_samples, holdout_samples, check_on, before / after ({agreement, kl} on the
    check set), kept, diverged, train_fit (the same on up to 512 training samples), check_curve
    ([step, holdout KL] ten times during training), loss ({first, last, min, curve}: training loss,
    curve = 10 means), train_seconds, seconds (the whole step).
    """
    torch = _import_torch()
    from onnx_tucker.torch_exec import TorchGraph

    steps, lr, batch_size, holdout, temperature, reconstruct_steps, reconstruct_blocks, seed, threads, feature_weight = _check_args(
        steps, lr, batch_size, holdout, temperature, reconstruct_steps, reconstruct_blocks, seed, threads, feature_weight)
    dev = _device(torch, device)
    trainable = list(dict.fromkeys(trainable))
    if not trainable:
        raise UsageError("distillation needs at least one trainable initializer")
    names = _graph_inputs(compressed)
    if names != _graph_inputs(original) or [o.name for o in compressed.graph.output] != [o.name for o in original.graph.output]:
        raise ModelError("distillation needs the original and the compressed model to have the same inputs and outputs")
    absent = [n for n in names if n not in feeds]
    if absent:
        raise UsageError(f"distillation inputs lack the model input '{absent[0]}'")
    counts = {len(feeds[n]) for n in names}
    if len(counts) != 1:
        raise UsageError(f"distillation inputs have different sample counts: {sorted(counts)}")
    n = counts.pop()
    if n < 2:
        raise UsageError(f"distillation needs at least 2 input samples, got {n}")

    if channels is None:
        from onnx_tucker.prune import kept_channels_in

        channels = kept_channels_in(compressed)
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    # the seeded run draws from torch's global generator too: the caller's stream is restored afterwards
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return _distill(torch, TorchGraph, original, compressed, {k: np.asarray(feeds[k]) for k in names}, trainable, n,
                            steps=steps, lr=float(lr), batch_size=batch_size, augment=augment, holdout=holdout,
                            temperature=float(temperature), seed=seed, dev=dev, progress=progress, keep_worse=keep_worse,
                            started=started, reconstruct_steps=reconstruct_steps, reconstruct_blocks=reconstruct_blocks,
                            threads=threads, feature_weight=float(feature_weight), channels=channels)
    finally:
        if threads:
            torch.set_num_threads(old_threads)


def _distill(torch, TorchGraph, original, compressed, feeds, trainable, n, *, steps, lr, batch_size, augment,
             holdout, temperature, seed, dev, progress, keep_worse, started, reconstruct_steps, reconstruct_blocks, threads, feature_weight,
             channels):
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = min(n - 1, max(1, int(round(holdout * n)))) if holdout > 0 else 0
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    train = {k: v[train_idx] for k, v in feeds.items()}
    check = {k: v[hold_idx] for k, v in feeds.items()} if n_hold else train

    t_logits, s_logits = logit_names(original), logit_names(compressed)
    teacher_ort = _session(_with_outputs(original, t_logits), torch.get_num_threads())
    reference = _run(teacher_ort, check)
    kinds = output_kinds(reference, softmax_inputs(original))
    fit_idx = np.sort(rng.permutation(len(train_idx))[:TRAIN_CHECK]) if n_hold else None
    fit = {k: v[fit_idx] for k, v in train.items()} if n_hold else None
    fit_reference = _run(teacher_ort, fit) if n_hold else None
    student_ort = _session(_with_outputs(compressed, s_logits))
    before = agreement_and_kl(reference, _run(student_ort, check), kinds)
    fit_before = agreement_and_kl(fit_reference, _run(student_ort, fit), kinds) if n_hold else None
    local, reconstructed, rebuilt = None, None, None
    if reconstruct_steps:
        from onnx_tucker.reconstruct import DEFAULT_BLOCKS, chains_in, reconstruct

        blocks = DEFAULT_BLOCKS if reconstruct_blocks is None else reconstruct_blocks
        rebuilt, local = reconstruct(original, compressed, chains_in(compressed), train, check, trainable, steps=reconstruct_steps,
                                     blocks=blocks, seed=seed, threads=threads, progress=progress, device=dev, channels=channels)
        reconstructed = agreement_and_kl(reference, _run(_session(_with_outputs(rebuilt, s_logits)), check), kinds)
    # The global phase starts from the reconstruction whatever its model-level check said: each kept unit already
    # lowered its own held-out error, and on the hybrid seed CNN at 5x the reconstruction raised the held-out KL yet
    # distilling from it gained 0.57 test points where distilling the compressed model was refused (docs/distill.md,
    # stop 31). reconstruct() returns the compressed model itself when it kept no unit.
    start = rebuilt if rebuilt is not None else compressed

    n_logits = len(s_logits)
    # Intermediate targets: each chain's (or residual block's) activated output, same name in both models.
    features = _feature_names(original, compressed) if feature_weight else []
    teacher_torch = TorchGraph(original, (), outputs=t_logits + features).to(dev) if dev.type != "cpu" else None
    train_teacher = _session(_with_outputs(original, t_logits + features), torch.get_num_threads()) if features else teacher_ort

    layouts = {}
    if augment:
        for name, value in train.items():
            layout = image_layout(value.shape)
            if layout and np.issubdtype(value.dtype, np.floating):
                layouts[name] = layout
    data = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in train.items()}
    cached = None
    if not layouts:  # nothing changes between epochs: the teacher runs once
        cached = [torch.from_numpy(t).to(dev) for t in _run(train_teacher, train)]

    def teacher(batch, idx):
        if cached is not None:
            return [c[idx.to(dev)] for c in cached]
        with torch.no_grad():
            if teacher_torch is not None:
                return list(teacher_torch(**batch))
            outs = _run(train_teacher, {k: v.cpu().numpy() for k, v in batch.items()})
            return [torch.from_numpy(o).to(dev) for o in outs]

    warmup = max(1, int(steps * WARMUP_FRACTION))

    def factor(step):  # step 0.. steps-1
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    check_t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in check.items()}
    at = {max(0, int(round(steps * (i + 1) / CHECKPOINTS)) - 1) for i in range(CHECKPOINTS)} if n_hold else set()
    m = len(train_idx)
    batch_size = min(batch_size, m)

    def global_phase(start: onnx.ModelProto) -> dict:
        """``steps`` of soft-target training from ``start``, seeded alike whatever the start: the trained model, its
        check-set metrics (None when it diverged or ``steps`` is 0) and the run's curves."""
        torch.manual_seed(seed)  # inside distill's fork_rng: the caller's generator is restored afterwards
        generator = torch.Generator().manual_seed(seed)
        student = TorchGraph(start, trainable, outputs=s_logits + features).to(dev)
        params = list(student.onnx_parameters().values())
        optimizer = torch.optim.Adam(params, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

        def check_kl() -> float:
            with torch.no_grad():
                parts = [student(**{k: v[s : s + 256] for k, v in check_t.items()}) for s in range(0, n_hold, 256)]
            outs = [torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(n_logits)]
            return agreement_and_kl(reference, outs, kinds)["kl"]

        check_curve = []
        perm, pos = torch.randperm(m, generator=generator), 0
        losses, diverged = [], False
        t_train = time.perf_counter()
        bar = tqdm(total=steps, desc="distill", unit="step", file=sys.stderr, disable=None if progress else True, leave=False)  # a terminal only (None), like the probes
        try:
            for step in range(steps):
                if pos + batch_size > m:
                    perm, pos = torch.randperm(m, generator=generator), 0
                idx = perm[pos : pos + batch_size]
                pos += batch_size
                batch = {k: v[idx.to(dev)] for k, v in data.items()}
                if layouts:
                    batch = _augment(torch, batch, layouts, generator)
                targets = teacher(batch, idx)
                outs = student(**batch)
                loss = 0.0
                for t, s, kind in zip(targets[:n_logits], outs[:n_logits], kinds):
                    if kind == "values":  # a map, boxes, an embedding: the relative squared error
                        t, s = t.float(), s.float()
                        loss = loss + ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
                        continue
                    t = t.reshape(-1, t.shape[-1]).float()
                    s = s.reshape(-1, s.shape[-1]).float()
                    log_p = torch.log_softmax(t / temperature, -1)
                    log_q = torch.log_softmax(s / temperature, -1)
                    loss = loss + (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
                loss = loss / n_logits
                if features:  # normalised MSE per feature, averaged
                    loss = loss + feature_weight * sum(((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
                                                       for t, s in zip(targets[n_logits:], outs[n_logits:])) / len(features)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = float(loss.detach())
                if not math.isfinite(value):
                    diverged = True
                    break
                optimizer.step()
                scheduler.step()
                losses.append(value)
                if step in at:
                    check_curve.append([step + 1, round(check_kl(), 6)])
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{value:.4f}")
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t_train
        candidate = student.write_back(start)
        finite = all(np.all(np.isfinite(v)) for v in student.trained_arrays().values())
        after = fit_after = None
        if finite and not diverged and steps:  # steps 0: reconstruction alone, no global phase
            trained_ort = _session(_with_outputs(candidate, s_logits))
            after = agreement_and_kl(reference, _run(trained_ort, check), kinds)
            fit_after = agreement_and_kl(fit_reference, _run(trained_ort, fit), kinds) if n_hold else None
        return {"model": candidate, "after": after, "fit_after": fit_after, "losses": losses, "diverged": diverged,
                "check_curve": check_curve, "train_seconds": train_seconds, "params": params,
                "from": "compressed" if start is compressed else "reconstructed"}

    run, attempts = global_phase(start), []
    if (steps and start is not compressed and not run["diverged"] and not _better(run["after"], before)
            and not _reconstruction_passes(reconstructed, before)):
        # Neither the reconstruction nor the distillation from it passed: distil the compressed model instead (the
        # seed CNN at 5x of stop 13, whose reconstruction raised the KL and distilling from it was refused).
        first = run
        run = global_phase(compressed)
        run["train_seconds"] += first["train_seconds"]
        attempts.insert(0, {"from": first["from"], "after": first["after"]})
    after, fit_after, candidate, losses, diverged = run["after"], run["fit_after"], run["model"], run["losses"], run["diverged"]
    params, check_curve, train_seconds = run["params"], run["check_curve"], run["train_seconds"]
    # The distilled model whenever it passes the check against the compressed one, else the reconstructed model if it
    # passes, else the compressed model. Not the lower KL of the two: between them the 205-image held-out KL did not
    # rank the test set (on four of eight CIFAR models the distilled model had the higher KL and the better top-1,
    # +0.07 to +0.34 points; docs/distill.md, stop 31).
    if _better(after, before):
        best = (after, candidate, "distilled")
    elif _reconstruction_passes(reconstructed, before):
        best = (reconstructed, rebuilt, "reconstructed")
    else:
        best = (before, compressed, "compressed")
    kept = best[2] != "compressed"
    stats = {
        "steps": len(losses), "steps_asked": steps, "lr": lr, "batch_size": batch_size, "temperature": temperature,
        "augment": sorted(layouts.items()) if layouts else False, "seed": seed, "device": str(dev),
        "teacher": "torch" if teacher_torch is not None else "onnxruntime",
        "trainable_tensors": len(params), "trainable_values": int(sum(p.numel() for p in params)),
        "train_samples": int(m), "holdout_samples": int(n_hold), "check_on": "holdout" if n_hold else "train",
        "before": before, "after": after, "kept": kept, "diverged": diverged,
        "train_fit": {"samples": len(fit_idx), "before": fit_before, "after": fit_after} if n_hold else None,
        "check_curve": check_curve, "returned": best[2], "outputs": kinds, "feature_weight": feature_weight, "features": len(features),
        "reconstruct": local, "reconstructed": reconstructed,
        # reconstruct() returns the compressed model itself when it kept no unit: then the start was that one
        "distilled_from": run["from"],
        "global_attempts": attempts + [{"from": run["from"], "after": after}],  # two where the first start failed
        "loss": _curve(losses), "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if keep_worse and after is not None:
        return candidate, stats
    return best[1], stats

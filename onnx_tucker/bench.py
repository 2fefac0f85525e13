"""Latency of ONNX models on onnxruntime execution providers, timed so that A/B numbers can be trusted.

How it times (``onnx-tucker bench A.onnx B.onnx``):

- one session per model and provider, a fixed intra-op thread count (recorded), intra-op spinning off
  (with it on, an idle session's spinning workers steal cores from the model being timed: on a busy
  2-core machine that made one model of a pair up to 4x slower, at random), inputs and outputs bound
  once with IOBinding on the provider's device, so host<->device copies are never inside the timer;
- warm-up runs first (on CUDA at least ``GPU_MIN_WARMUP``: the first run does cuDNN's algorithm search);
- then ``runs`` iterations; each iteration runs every model once, round-robin, starting one model later
  each time, so a machine that drifts (thermal, other load) affects all models alike;
- latency statistics per model (median, p90, p99), throughput = batch / median, and the speedup of each
  model against the first as the median of the per-iteration ratios ``t_first / t_model`` with its
  p10-p90 and interquartile spread (a ratio of medians hides how consistent the gain is).

JSON written by ``--json`` (``schema: "onnx-tucker.bench/1"``)::

    {"schema", "tool_version", "onnxruntime_version", "host": {"platform", "python", "cpu_count"},
     "settings": {"threads", "spinning", "warmup", "runs", "batches", "cudnn_conv_algo_search", "inputs",
                  "interleaved", "precision" ("as stored" or "float16": --fp16), "cuda_graph"},
     "providers": {"requested", "benchmarked", "unavailable": {provider: reason}},
     "models": [{"index", "path", "name"}],
     "results": [{"provider", "batch", "model", "model_index", "session_providers", "warmup", "runs",
                  "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput_ips",
                  "speedup": null for the first model, else {"median", "p10", "p90", "q1", "q3", "pairs"}}],
     "accuracy": null or [{"provider", "model", "model_index", "samples", "labelled", "top1",
                           "top1_agreement", "max_abs_diff", "cosine", "outputs_matched_by",
                           "unmatched_outputs", "shape_mismatch", "finite"}],
     "per_layer": null or [{"provider", "batch", "runs", "precision", "layers": [{"layer", "original_us", "in_us",
                           "core_us", "out_us", "chain_us", "speedup", "pays_off"}],
                           "totals": [{"model", "conv_us", "other_us", "total_us"}]}]}

The JSON is strict (no ``Infinity``/``NaN`` tokens): every non-finite number is written as ``null``
(:func:`json_ready`; ``run_bench`` already returns it that way).

``settings.batches``: the batches timed; without ``--batch`` (``BenchConfig.batches=None``) the batch
the models are exported for when they are fixed to one (all that are fixed agree), else 1.

Accuracy rows compare each output of a model with the first model's output **of the same name**
(``outputs_matched_by: "name"``); only when the two models share no output name at all are they paired
by position (``"position"``, and the table says so). ``unmatched_outputs``: output names of either model
left out of the comparison; ``shape_mismatch``: outputs (the first model's names) whose shapes differ, in
which case ``max_abs_diff`` and ``cosine`` are null; ``finite``: every compared output of the model is
finite (a null ``max_abs_diff`` with ``finite: false`` is a NaN/Inf output). ``top1_agreement`` is taken
from the first model's class-score output and its counterpart.

``per_layer`` profiles the models that were timed: with ``--fp16`` the float16 copies
(``precision: "float16"``; on the CPU EP onnxruntime runs their convs as float32 kernels between
inserted casts, whose names are traced back like the others).
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from onnx_tucker import __version__
from onnx_tucker.errors import ModelError, OnnxTuckerError, UsageError
from onnx_tucker import providers as registry
from onnx_tucker.providers import CUDNN_ALGOS, PROVIDERS, get as get_provider, parse_providers  # noqa: F401 (parse_providers: API)

SCHEMA = "onnx-tucker.bench/1"
GPU_MIN_WARMUP = 20
RESULT_KEYS = (
    "provider", "batch", "model", "model_index", "session_providers", "warmup", "runs",
    "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput_ips", "speedup",
)
SPEEDUP_KEYS = ("median", "p10", "p90", "q1", "q3", "pairs")


# --- statistics (pure) -----------------------------------------------------------------------------

def latency_stats(seconds: Sequence[float], batch: int) -> dict:
    """Latency percentiles in ms and throughput (images/s at the median) of one model's timed runs."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings")
    median = float(np.median(ms))
    return {
        "runs": int(ms.size),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_ips": batch * 1e3 / median if median > 0 else float("inf"),
    }


def paired_speedup(baseline_s: Sequence[float], model_s: Sequence[float]) -> dict:
    """Speedup of a model over the baseline from runs of the same iterations: ``baseline[i] / model[i]``."""
    base, model = np.asarray(baseline_s, np.float64), np.asarray(model_s, np.float64)
    if base.shape != model.shape or base.size == 0:
        raise ValueError("paired timings must have the same, non-zero length")
    ratios = base / model
    p10, q1, median, q3, p90 = np.percentile(ratios, [10, 25, 50, 75, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "q1": float(q1), "q3": float(q3), "pairs": int(ratios.size)}


def interleaved_order(n_models: int, iteration: int) -> list[int]:
    """The models' order in one iteration: round-robin, starting one model later each iteration."""
    return [(iteration + k) % n_models for k in range(n_models)]


def time_interleaved(
    runners: Sequence[Callable[[], object]],
    runs: int,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Warm up, then time ``runs`` interleaved iterations; returns the seconds of each run, per runner."""
    n = len(runners)
    for iteration in range(warmup):
        for k in interleaved_order(n, iteration):
            runners[k]()
            if on_run:
                on_run()
    times: list[list[float]] = [[] for _ in runners]
    for iteration in range(runs):
        for k in interleaved_order(n, iteration):
            start = clock()
            runners[k]()
            times[k].append(clock() - start)
            if on_run:
                on_run()
    return times


# --- sessions bound to their device ----------------------------------------------------------------

@dataclass
class BoundRun:
    """One model ready to run: inputs already on the device, outputs bound there (no copies timed)."""

    session: object
    binding: object
    values: list = field(default_factory=list)  # keep the device buffers alive

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()  # a GPU run is finished when the timer stops

    def outputs(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.binding.get_outputs()]


def bind(session, feeds: dict[str, np.ndarray], device: str, fixed_outputs: bool = False) -> BoundRun:
    """Inputs copied to the device once and outputs bound there. ``fixed_outputs`` preallocates each output
    (shapes from one run): CUDA graph capture replays fixed addresses, so onnxruntime must not allocate them."""
    from onnx_tucker.providers import onnxruntime

    ort = onnxruntime()

    binding = session.io_binding()
    values = []
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
        binding.bind_ortvalue_input(name, value)
        values.append(value)
    if fixed_outputs:
        shapes = [(o.name, a.shape, a.dtype) for o, a in zip(session.get_outputs(), session.run(None, feeds))]
        for name, shape, dtype in shapes:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
            binding.bind_ortvalue_output(name, value)
            values.append(value)
    else:
        for output in session.get_outputs():
            binding.bind_output(output.name, device, 0)
    return BoundRun(session, binding, values)


def open_session(path: Path, provider: str, threads: int, options: dict, spinning: bool = False, **extra):
    """A session on ``provider`` that really runs there (onnxruntime silently falls back to CPU otherwise)."""
    from onnx_tucker.runtime import make_session

    config = {"session.intra_op.allow_spinning": "1" if spinning else "0"}
    session = make_session(path, provider, threads, options, config=config, **extra)
    wanted = get_provider(provider).ort_name
    if session.get_providers()[0] != wanted:
        raise OnnxTuckerError(
            f"{wanted} could not be initialised for {path.name} (CUDA/cuDNN libraries missing or not matching "
            f"this onnxruntime-gpu? onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9); it fell back to {session.get_providers()[0]}"
        )
    return session


# --- inputs ----------------------------------------------------------------------------------------

def timing_feeds(model, batch: int, given: dict[str, np.ndarray] | None = None, seed: int = 0,
                 shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Inputs of ``batch`` rows: the first rows of ``given`` (repeated when it has fewer), else seeded random
    (``shapes``: dims for dynamic sizes, the batch there replaced by ``batch``)."""
    from onnx_tucker.runtime import random_inputs

    if given is None:
        shapes = {k: [batch, *v[1:]] for k, v in shapes.items()} if shapes else None
        return random_inputs(model, batch=batch, seed=seed, shapes=shapes)
    feeds = {}
    for name, array in given.items():
        if np.ndim(array) == 0:  # a scalar input (shape []): the same value for every batch
            feeds[name] = array
            continue
        reps = -(-batch // len(array))
        feeds[name] = np.concatenate([array] * reps)[:batch] if reps > 1 else array[:batch]
    return feeds


# --- accuracy and output agreement -----------------------------------------------------------------

def class_scores(outputs: list[np.ndarray]) -> np.ndarray | None:
    """The first (N, C) output with C > 1: what top-1 is taken from."""
    return next((o for o in outputs if o.ndim == 2 and o.shape[1] > 1), None)


def match_outputs(first_names: Sequence[str], names: Sequence[str]) -> tuple[list[tuple[int, int]], str]:
    """Pairs ``(index in the first model, index in this one)`` of the outputs to compare: by name for every
    name both models have, in the first model's order; by position only when they share no name at all."""
    index = {name: i for i, name in enumerate(names)}
    shared = [(i, index[name]) for i, name in enumerate(first_names) if name in index]
    if shared or not first_names or not names:
        return shared, "name"
    return [(i, i) for i in range(min(len(first_names), len(names)))], "position"


def accuracy_rows(outputs: list[list[np.ndarray]], labels: np.ndarray | None, provider: str,
                  names: list[list[str]] | None = None) -> list[dict]:
    """Top-1 (with labels), top-1 agreement and output agreement of each model with the first (pure).

    ``names``: each model's output names, in the order of its ``outputs``; outputs are matched by name
    (:func:`match_outputs`). Without names they are matched by position (as if named by their index).
    """
    from onnx_tucker.validate import compare_outputs

    names = names or [[str(i) for i in range(len(outs))] for outs in outputs]
    first, first_names = outputs[0], names[0]
    first_scores = class_scores(first)
    scores_index = next((i for i, o in enumerate(first) if o is first_scores), None)
    rows = []
    for index, (outs, own) in enumerate(zip(outputs, names)):
        pairs, matched_by = match_outputs(first_names, own)
        agreements = [compare_outputs(first_names[i], first[i], outs[j]) for i, j in pairs]
        paired = dict(pairs)
        # agreement needs the first model's class scores paired with this model's; top-1 on the labels needs only
        # this model's own (a model whose scores output has another name still has a top-1)
        scores = outs[paired[scores_index]] if scores_index in paired else class_scores(outs) if matched_by == "position" else None
        if scores is not None and not (scores.ndim == 2 and scores.shape[1] > 1):
            scores = None
        own_scores = scores if scores is not None else class_scores(outs)
        if own_scores is not None and not (own_scores.ndim == 2 and own_scores.shape[1] > 1):
            own_scores = None
        comparable = scores is not None and first_scores is not None and scores.shape == first_scores.shape
        mismatch = [g.name for g in agreements if not g.same_shape]
        exact = [g for g in agreements if g.same_shape]
        rows.append({
            "provider": provider,
            "model_index": index,
            "samples": int(len(outs[0])) if outs and np.ndim(outs[0]) else 0,
            "labelled": labels is not None,
            "top1": (float(np.mean(own_scores.argmax(1) == labels))
                     if labels is not None and own_scores is not None and len(own_scores) == len(labels) else None),
            "top1_agreement": float(np.mean(scores.argmax(1) == first_scores.argmax(1))) if comparable else None,
            "max_abs_diff": max(g.max_abs_diff for g in exact) if exact and not mismatch else None,
            "cosine": min(g.cosine for g in exact) if exact and not mismatch else None,
            "outputs_matched_by": matched_by,
            "unmatched_outputs": [first_names[i] for i in range(len(first_names)) if i not in paired]
                                 + [own[j] for j in range(len(own)) if j not in paired.values()],
            "shape_mismatch": mismatch,
            "finite": all(g.finite for g in agreements),
        })
    return rows


def output_names(model) -> list[str]:
    """The graph outputs' names, in the order onnxruntime returns them (a float16 copy keeps them)."""
    return [o.name for o in model.graph.output]


def run_outputs(path: Path, feeds: dict, provider: str, threads: int, options: dict, batch_size: int = 64, model=None) -> list[np.ndarray]:
    from onnx_tucker.capture import capture

    session = open_session(path, provider, threads, options)
    return capture(model, feeds, session=session, batch_size=batch_size)


# --- per-layer profile -----------------------------------------------------------------------------

# onnxruntime's InsertCastTransformer: a float16 node the EP has no float16 kernel for (the CPU EP's Conv) runs as
# float32 between inserted casts, and the tensors and nodes it renames get this prefix
CAST_PREFIX = "InsertedPrecisionFreeCast_"
ACTIVATIONS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Elu", "Selu", "HardSwish", "Swish"}


def node_index(model) -> tuple[dict[str, object], dict[str, object]]:
    """Nodes by name and by output tensor name."""
    by_name, by_output = {}, {}
    for node in model.graph.node:
        by_name[node.name] = node
        for out in node.output:
            by_output[out] = node
    return by_name, by_output


def original_node(profiled: str, model, order: dict[str, int] | None = None) -> str | None:
    """The model node a profiler entry belongs to, through onnxruntime's renamings.

    Kept names ("conv"), fusions keeping the conv's name (FusedConv), casts inserted around a float16 node
    (``InsertedPrecisionFreeCast_<tensor>``), NCHWc nodes named after their
    output tensor ("<tensor>_nchwc"), where the tensor may be a fused activation's or BatchNormalization's
    output (Conv+BN+Relu: we walk back to the conv) or a fused Add's (Conv+Sum: the conv computed last of its inputs).
    """
    by_name, by_output = node_index(model)
    order = order or {n.name: i for i, n in enumerate(model.graph.node)}
    name = profiled.removeprefix("fused ").removesuffix("_kernel_time")
    while name.startswith(CAST_PREFIX) and name not in by_name:  # a float16 node run as float32 between inserted casts
        name = name.removeprefix(CAST_PREFIX)
    if name in by_name:
        return name
    for suffix in ("_nchwc",):
        name = name.removesuffix(suffix)
    node = by_output.get(name)
    if node is None:  # e.g. "<tensor>_mul_nchwc": the longest tensor or node name it starts with
        keys = [k for k in list(by_output) + list(by_name) if name.startswith(k)]
        if not keys:
            return None
        key = max(keys, key=len)
        node = by_output.get(key) or by_name[key]
    # onnxruntime folds an inference BatchNormalization into the conv before it (an export that kept BN)
    while (node.op_type in ACTIVATIONS or node.op_type == "BatchNormalization") and node.input and node.input[0] in by_output:
        producer = by_output[node.input[0]]
        if producer.op_type not in ("Conv", "FusedConv", "BatchNormalization") and producer.op_type not in ACTIVATIONS:
            break
        node = producer
    if node.op_type in ("Add", "Sum"):
        convs = [by_output[i] for i in node.input if i in by_output and by_output[i].op_type == "Conv"]
        if convs:
            node = max(convs, key=lambda c: order.get(c.name, -1))
    return node.name


def kernel_times(events: list[dict], skip_runs: int = 0) -> dict[tuple[str, str], float]:
    """Median microseconds per profiled node, keyed (name, node index): onnxruntime may give two nodes
    one name (ReorderOutput). Runs before ``skip_runs`` are warm-up and left out."""
    per_node: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            key = (event["name"], str(event.get("args", {}).get("node_index", "")))
            per_node.setdefault(key, []).append(float(event["dur"]))
    return {key: float(np.median(durs[skip_runs:] or durs)) for key, durs in per_node.items()}


def attribute(times: dict, model) -> dict[str | None, float]:
    """Microseconds per model node (None: onnxruntime's own nodes, e.g. layout reorders)."""
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    layers: dict[str | None, float] = {}
    for key, us in times.items():
        owner = original_node(key[0] if isinstance(key, tuple) else key, model, order)
        layers[owner] = layers.get(owner, 0.0) + us
    return layers


def layer_rows(original, compressed, original_us: dict, compressed_us: dict) -> list[dict]:
    """Each chain the compressed model records (its metadata): the chain's nodes' time against the original layer's.

    ``parts`` has every role's time; ``in_us``/``core_us``/``out_us`` are the first, core and last roles
    (None where the form has no such role).
    """
    from onnx_tucker.chain import chains_of

    rows = []
    for chain in chains_of(compressed):
        parts = {role: compressed_us.get(node, 0.0) for role, node in chain.nodes.items()}
        before, total = original_us.get(chain.layer), sum(parts.values())
        rows.append({
            "layer": chain.layer,
            "form": chain.form,
            "original_us": before,
            "in_us": parts.get("first"), "core_us": parts.get("core"), "out_us": parts.get("last"),
            "parts": parts,
            "chain_us": total,
            "speedup": before / total if before and total else None,
            "pays_off": bool(before and total and total < before),
        })
    return rows


def model_totals(model, us: dict[str | None, float], index: int) -> dict:
    convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
    conv = sum(t for name, t in us.items() if name in convs)
    total = sum(us.values())
    return {"model_index": index, "conv_us": conv, "other_us": total - conv, "total_us": total}


def profile_model(path: Path, feeds: dict, threads: int, runs: int, warmup: int, folder: str, spinning: bool = False) -> dict:
    """Median kernel time per profiled node on the CPU EP (a session of its own: profiling costs time)."""
    import json

    session = open_session(path, "cpu", threads, {}, spinning, profile_prefix=os.path.join(folder, "profile"))
    run = bind(session, feeds, "cpu")
    for _ in range(warmup + runs):
        run()
    trace = session.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        Path(trace).unlink(missing_ok=True)
    return kernel_times(events, skip_runs=warmup)


# --- the whole benchmark ---------------------------------------------------------------------------

@dataclass
class BenchConfig:
    models: list[Path]
    providers: list[str] | None = None  # None: every one available
    batches: list[int] | None = None  # None: the batch the models are exported for if fixed (default_batches), else [1]
    threads: int = 2
    spinning: bool = False
    warmup: int = 10
    runs: int = 100
    cudnn_algo: str = "EXHAUSTIVE"
    data: str | None = None
    inputs: str | None = None
    per_layer: bool = False
    per_layer_runs: int = 10
    progress: bool = True
    fp16: bool = False  # time float16 copies of the models (onnx_tucker.precision.to_float16)
    cuda_graph: bool = False  # onnxruntime's CUDA graph capture on cuda/tensorrt
    input_shapes: dict | None = None  # {input: dims} for the random inputs of a model with dynamic sizes (--input-shape)


def parse_batches(text: str) -> list[int]:
    from onnx_tucker.options import check_int_list

    return check_int_list(text, "--batch")


def choose_providers(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Providers to benchmark and, for each one missing, why; an explicit request for a missing one fails."""
    available = registry.available_providers()
    unavailable = {}
    for key, provider in PROVIDERS.items():
        if key not in available and (key in (requested or ()) or (requested is None and provider.note_missing)):
            unavailable[key] = registry.unavailable_reason(key)
    if requested is None:
        return available, unavailable
    missing = [p for p in requested if p not in available]
    if missing:
        reason = unavailable.get(missing[0]) or registry.unavailable_reason(missing[0])
        raise OnnxTuckerError(f"{missing[0]} execution provider not available: {reason}")
    return requested, unavailable


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_batch_memory(model, batches: list[int], limit: int | None = None, flag: str = "--batch") -> None:
    """Refuse a batch whose input tensors alone would take over half the memory available (``--batch 100000``
    ran the machine out of memory without a word; ``--check-batch``, ``--latency-batch`` and sweep's ``--batch``
    failed with an internal MemoryError); activations come on top of it."""
    from onnx_tucker.runtime import graph_inputs, input_spec

    limit = limit if limit is not None else available_memory()
    if not limit:
        return
    per_sample = 0
    for vi in graph_inputs(model):
        dims, dtype = input_spec(vi)
        size = 1
        for d in dims[1:]:
            size *= d or 1
        per_sample += size * np.dtype(dtype).itemsize
    for batch in batches:
        if batch * per_sample > limit // 2:
            raise UsageError(f"{flag} {batch}: the inputs alone would take {batch * per_sample / 2**30:.1f} GiB, over half of the "
                             f"{limit / 2**30:.1f} GiB available: choose a smaller batch")


def default_batches(paths: list[Path], models: list) -> list[int]:
    """The batches to time when none is asked for: the one batch the fixed-batch models are exported for (a model
    exported for batch 2 cannot run batch 1), else 1; models fixed to different batches cannot run one batch."""
    from onnx_tucker.capture import fixed_batch

    fixed = {}
    for path, model in zip(paths, models):
        batch = fixed_batch(model)
        if batch:
            fixed.setdefault(batch, path)
    if len(fixed) > 1:
        (a, path_a), (b, path_b) = list(fixed.items())[:2]
        raise UsageError(f"{path_a.name} is exported for batch {a} only and {path_b.name} for batch {b} only: no batch runs "
                         "them all (export them with a dynamic batch axis)")
    return list(fixed) or [1]


def check_latency_batch_memory(model, batch: int, input_shapes: dict | None = None, limit: int | None = None) -> None:
    """:func:`check_batch_memory` for ``--latency-batch``, and the same for the largest tensor inside the model (one
    layer's input, timed alone with random values drawn in float64): the inputs' check alone let `--latency-batch
    100000` through to an internal MemoryError (a 64 x 30 x 30 layer input is 20x the 3 x 32 x 32 image)."""
    from onnx_tucker.graph import infer_shapes

    limit = limit if limit is not None else available_memory()
    if not limit:
        return
    check_batch_memory(model, [batch], limit, flag="--latency-batch")
    largest = 0
    for dims in infer_shapes(model, input_shapes).values():
        if dims and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            size = 8  # float64, as the random values are drawn
            for d in dims[1:]:
                size *= d
            largest = max(largest, size)
    if batch * largest > limit // 2:
        raise UsageError(f"--latency-batch {batch}: one layer's input alone would take {batch * largest / 2**30:.1f} GiB, over half of the "
                         f"{limit / 2**30:.1f} GiB available: choose a smaller batch")


def check_fixed_batch(model, path, batches) -> None:
    """Refuse a ``--batch`` that a model exported for one batch size cannot run (timing batch 1 and calling it batch 32
    would report 32x the throughput; sweep's timing failed in onnxruntime after every setting was compressed)."""
    from onnx_tucker.capture import fixed_batch

    fixed = fixed_batch(model)
    wrong = [b for b in batches if fixed and b != fixed]
    if wrong:
        raise UsageError(f"{Path(path).name} is exported for batch {fixed} only: --batch {wrong[0]} cannot run it "
                         f"(use --batch {fixed}, or export it with a dynamic batch axis)")


def check_models(paths: list[Path], batches: list[int] | None = None) -> list:
    """Load the models; they must take the same inputs, and every batch asked for must be one each can run."""
    from onnx_tucker.capture import fixed_batch
    from onnx_tucker.io import load_model
    from onnx_tucker.runtime import graph_inputs

    models = [load_model(p) for p in paths]
    for path, model in zip(paths, models):
        check_fixed_batch(model, path, batches or ())
    def signature(model):  # name, element type, rank, and the sizes after the batch where both are fixed
        return [(i.name, i.type.tensor_type.elem_type, [d.dim_value or None for d in i.type.tensor_type.shape.dim][1:])
                for i in graph_inputs(model)]

    first = signature(models[0])
    for path, model in zip(paths[1:], models[1:]):
        other = signature(model)
        same = len(other) == len(first) and all(
            a[:2] == b[:2] and len(a[2]) == len(b[2]) and all(x is None or y is None or x == y for x, y in zip(a[2], b[2]))
            for a, b in zip(first, other))
        if not same:
            raise ModelError(f"{path} has other inputs than {paths[0]} ({_describe(other)} against {_describe(first)}): "
                             "the models must take the same inputs")
    return models


def _describe(signature) -> str:
    return ", ".join(f"{name} [N, {', '.join('?' if d is None else str(d) for d in dims)}]" for name, _, dims in signature)


def _progress(config: BenchConfig, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety
        return None
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=None if config.progress else True, leave=False)


def warmup_for(provider: str, warmup: int) -> int:
    return get_provider(provider).warmup(warmup)


def run_bench(config: BenchConfig) -> dict:
    """Time every model on every provider and batch; returns the JSON-ready result (see module docstring:
    non-finite numbers are None). ``config.batches`` None: :func:`default_batches`."""
    import tempfile

    from onnx_tucker.providers import onnxruntime

    ort = onnxruntime()

    from onnx_tucker.runtime import load_inputs

    if config.cudnn_algo not in CUDNN_ALGOS:
        raise UsageError(f"--cudnn-algo: choose from {', '.join(CUDNN_ALGOS)}")
    providers, unavailable = choose_providers(config.providers)
    if config.cuda_graph:
        for provider in providers:
            get_provider(provider).options(cuda_graph=True)  # a provider without graph capture: one-line error
    models = check_models(config.models, config.batches)
    if config.batches is None:
        config = replace(config, batches=default_batches(config.models, models))
    check_batch_memory(models[0], config.batches)
    given = load_inputs(config.inputs, models[0]) if config.inputs else None
    n = len(models)
    total = sum(len(config.batches) * n * (warmup_for(p, config.warmup) + config.runs) for p in providers)
    bar = _progress(config, total)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-bench-") as scratch:
        paths = float16_copies(config.models, models, scratch) if config.fp16 else list(config.models)
        for provider in providers:
            options = get_provider(provider).options(config.cudnn_algo, scratch, cuda_graph=config.cuda_graph, fp16=config.fp16)
            sessions = [open_session(p, provider, config.threads, options, config.spinning) for p in paths]
            for batch in config.batches:
                feeds = timing_feeds(models[0], batch, given, shapes=config.input_shapes)
                runners = [bind(s, feeds, get_provider(provider).device, fixed_outputs=config.cuda_graph) for s in sessions]
                if bar is not None:
                    bar.set_description(f"{provider} batch {batch}")
                warmup = warmup_for(provider, config.warmup)
                times = time_interleaved(runners, config.runs, warmup, on_run=bar.update if bar is not None else None)
                for index, (path, session, seconds) in enumerate(zip(config.models, sessions, times)):
                    row = {"provider": provider, "batch": batch, "model": path.name, "model_index": index,
                           "session_providers": session.get_providers(), "warmup": warmup}
                    row.update(latency_stats(seconds, batch))
                    row["speedup"] = paired_speedup(times[0], seconds) if index else None
                    results.append({k: row[k] for k in RESULT_KEYS})
            del sessions
        if bar is not None:
            bar.close()
        accuracy = measure_accuracy(config, models, providers, paths) if config.data or config.inputs or n > 1 else None
        per_layer = profile_layers(config, models, given, scratch, paths) if config.per_layer else None
    return json_ready({
        "schema": SCHEMA,
        "tool_version": __version__,
        "onnxruntime_version": ort.__version__,
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "settings": {
            "threads": config.threads, "spinning": config.spinning, "warmup": config.warmup, "runs": config.runs, "batches": config.batches,
            "cudnn_conv_algo_search": config.cudnn_algo if any(p != "cpu" for p in providers) else None,
            "inputs": config.inputs or "random, seed 0", "interleaved": True,
            "precision": "float16" if config.fp16 else "as stored", "cuda_graph": config.cuda_graph,
        },
        "providers": {"requested": config.providers, "benchmarked": providers, "unavailable": unavailable},
        "models": [{"index": i, "path": str(p), "name": p.name} for i, p in enumerate(config.models)],
        "results": results,
        "accuracy": accuracy,
        "per_layer": per_layer,
    })


def float16_copies(paths: list[Path], models: list, folder: str) -> list[Path]:
    """Each model's float16 copy (float32 inputs and outputs kept), written to ``folder``."""
    import onnx

    from onnx_tucker.precision import to_float16

    copies = []
    for index, (path, model) in enumerate(zip(paths, models)):
        copy = Path(folder) / f"fp16_{index}_{path.name}"
        onnx.save(to_float16(model), str(copy))
        copies.append(copy)
    return copies


def measure_accuracy(config: BenchConfig, models: list, providers: list[str], paths: list[Path] | None = None) -> list[dict]:
    """Top-1 on labelled ``--data``, else agreement with the first model on ``--inputs`` or random inputs
    (of the models timed: ``paths``, e.g. their float16 copies)."""
    from onnx_tucker.runtime import load_inputs

    if config.data:
        from onnx_tucker.data import load_labelled

        feeds, labels = load_labelled(config.data, models[0])
    else:
        feeds = load_inputs(config.inputs, models[0]) if config.inputs else timing_feeds(models[0], 16, shapes=config.input_shapes)
        labels = None
    rows = []
    for provider in providers:
        options = get_provider(provider).options(config.cudnn_algo)
        outputs = [run_outputs(p, feeds, provider, config.threads, options, model=m) for p, m in zip(paths or config.models, models)]
        for row in accuracy_rows(outputs, labels, provider, names=[output_names(m) for m in models]):
            rows.append({"provider": row["provider"], "model": config.models[row["model_index"]].name} | row)
    return rows


def profile_layers(config: BenchConfig, models: list, given, scratch: str, paths: list[Path] | None = None) -> list[dict]:
    """Per decomposed layer: the chain's kernel time against the original conv's, on the CPU EP, of the models
    timed (``paths``: e.g. their float16 copies; their own graphs name what the profiler reports)."""
    import onnx

    paths = list(paths or config.models)
    profiled = models if paths == list(config.models) else [onnx.load(str(p), load_external_data=False) for p in paths]
    precision = "float16" if config.fp16 else "as stored"
    profiles = []
    for batch in config.batches:
        feeds = timing_feeds(models[0], batch, given, shapes=config.input_shapes)
        times = [profile_model(p, feeds, config.threads, config.per_layer_runs, 2, scratch, config.spinning) for p in paths]
        attributed = [attribute(t, m) for t, m in zip(times, profiled)]
        layers = []
        for index in range(1, len(profiled)):
            for row in layer_rows(profiled[0], profiled[index], attributed[0], attributed[index]):
                layers.append({"model": config.models[index].name, "model_index": index} | row)
        totals = [model_totals(m, a, i) | {"model": config.models[i].name} for i, (m, a) in enumerate(zip(profiled, attributed))]
        profiles.append({"provider": "cpu", "batch": batch, "runs": config.per_layer_runs, "precision": precision,
                         "layers": layers, "totals": totals})
    return profiles


def json_ready(value):
    """``value`` with every non-finite float (inf, NaN) as None, numpy scalars as Python numbers: strict JSON
    has no ``Infinity``/``NaN`` (``json.dumps`` writes them, and JSON parsers reject the file)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(result: dict) -> str:
    """The ``--json`` text of a :func:`run_bench` result: strict JSON (non-finite numbers as null)."""
    import json

    return json.dumps(json_ready(result), indent=2, allow_nan=False)


# --- terminal tables -------------------------------------------------------------------------------

def format_rows(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_speedup(s: dict | None) -> str:
    return "1 (base)" if s is None else f"{_number(s['median'], '.2f')}x [{_number(s['p10'], '.2f')}-{_number(s['p90'], '.2f')}]"


def latency_table(result: dict) -> str:
    headers = ["provider", "batch", "model", "median ms", "p90 ms", "p99 ms", "images/s", "speedup [p10-p90]"]
    rows = [[r["provider"], r["batch"], r["model"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
             _number(r["throughput_ips"], ".1f"), format_speedup(r["speedup"])] for r in result["results"]]
    return format_rows(headers, rows)


def accuracy_table(result: dict) -> str:
    headers = ["provider", "model", "samples", "top-1", "top-1 agreement", "max|diff|", "cosine"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731

    def missing(r):  # why there is no number
        return "shape differs" if r.get("shape_mismatch") else "non-finite" if r.get("finite") is False else "-"

    rows = [[r["provider"], r["model"], r["samples"], pct(r["top1"]), pct(r["top1_agreement"]),
             missing(r) if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}",
             missing(r) if r["cosine"] is None else f"{r['cosine']:.6f}"] for r in result["accuracy"]]
    lines = [format_rows(headers, rows)]
    first = result["accuracy"][0]["model"] if result["accuracy"] else ""
    notes = {}
    for r in result["accuracy"]:
        if r.get("outputs_matched_by") == "position":
            notes[r["model"]] = f"note: {r['model']} has no output named as in {first}: outputs compared by position"
        elif r.get("unmatched_outputs"):
            notes[r["model"]] = f"note: {r['model']}: output(s) {', '.join(r['unmatched_outputs'])} not in both models, not compared"
        if r.get("shape_mismatch"):
            notes[r["model"] + " shape"] = f"note: {r['model']}: output(s) {', '.join(r['shape_mismatch'])} of another shape than in {first}"
    return "\n".join(lines + list(notes.values()))


def per_layer_table(profile: dict) -> str:
    us = lambda v: "?" if v is None else f"{v / 1e3:.3f}"  # noqa: E731
    headers = ["layer", "original ms", "in ms", "core ms", "out ms", "chain ms", "speedup", "pays off"]
    rows = [[r["layer"] if len(profile["layers"]) == len({x["layer"] for x in profile["layers"]}) else f"{r['layer']} ({r['model']})",
             us(r["original_us"]), us(r["in_us"]), us(r["core_us"]), us(r["out_us"]), us(r["chain_us"]),
             "?" if r["speedup"] is None else f"{r['speedup']:.2f}x", "yes" if r["pays_off"] else "NO"] for r in profile["layers"]]
    copies = ", float16 copies" if profile.get("precision") == "float16" else ""
    lines = [f"per-layer kernel time, CPU EP{copies}, batch {profile['batch']} (median of {profile['runs']} profiled runs):",
             format_rows(headers, rows)]
    for t in profile["totals"]:
        lines.append(f"  {t['model']}: convs {t['conv_us'] / 1e3:.3f} ms + other nodes {t['other_us'] / 1e3:.3f} ms "
                     f"= {t['total_us'] / 1e3:.3f} ms")
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    lines = []
    for provider, reason in result["providers"]["unavailable"].items():
        lines.append(f"note: {provider} not benchmarked: {reason}")
    s = result["settings"]
    algo = f", cudnn_conv_algo_search {s['cudnn_conv_algo_search']}" if s["cudnn_conv_algo_search"] else ""
    algo += ", float16 copies" if s.get("precision") == "float16" else ""
    algo += ", CUDA graph capture" if s.get("cuda_graph") else ""
    spin = "on" if s["spinning"] else "off"
    lines.append(f"onnxruntime {result['onnxruntime_version']}, {s['threads']} intra-op threads (spinning {spin}), {s['warmup']} warm-up + "
                 f"{s['runs']} interleaved runs per model, inputs {s['inputs']}{algo}")
    return lines

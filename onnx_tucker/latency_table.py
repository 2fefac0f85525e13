"""Per-layer latency tables on a target execution provider, cached on disk.

For one site (a layer the forms can factor) the table times the original layer and each rank option
the budget considers, each as an isolated one-layer model: the site's node alone, fed at its input
shape with the deployment batch and dtype. An option's model is made by the site's own form
(``form.fit`` data-free with one HOOI start, ``form.constants``, ``form.emit`` into the one-node
graph), so whatever chain a form emits (three convs, two, a dense pair) is what is timed.

Timing: one session per model on the provider (intra-op spinning off, inputs and outputs bound once),
warm-up, then interleaved round-robin iterations (``bench.time_interleaved``: every model once per
iteration, starting one model later each time). Each option is recorded as the median of its
per-iteration ratios to the original (``ratio``, with the upper quartile ``q3``), and the original's
median time; an option's cost in microseconds is ``ratio x original``. Ratios against the original
timed in the same iterations survive a noisy, shared machine far better than absolute times.

Cache: a JSON file (default ``~/.cache/onnx-tucker/latency.json``, or ``$XDG_CACHE_HOME``), written
atomically; an entry's key holds the provider, the device's name (CPU model, GPU name), the
onnxruntime version, batch, dtype, the layer's op, attributes, weight and input shapes, the form and
the ranks, so a rerun on the same machine costs nothing and a change of any of them measures again.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

SCHEMA = "onnx-tucker.latency-table/1"
RUNS = 15  # interleaved iterations per layer (every model once per iteration)
WARMUP = 3
MIN_SECONDS = 0.3  # ... or more iterations, up to MAX_RUNS, while the original alone takes less than this
MAX_RUNS = 200
MULTIPLES = (1, 4, 8, 16)  # --rank-multiple auto chooses among these
OPSET = 17


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-tucker" / "latency.json"


def device_name(provider: str) -> str:
    """The device a provider runs on, as a name that changes when the hardware does."""
    from onnx_tucker.providers import get

    if get(provider).device != "cpu":
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 (best effort: the name is only a cache key)
            pass
        return f"{get(provider).device} device 0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    import platform

    return (platform.processor() or platform.machine() or "cpu") + f" ({os.cpu_count()} CPUs)"


def _attr_text(value) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_attr_text(v) for v in value]
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def site_dtype(site) -> str:
    return str(np.dtype(site.weight.dtype)) if site.weight is not None else "float32"


def input_dims(site, batch: int) -> list[int]:
    """The site's input shape with ``batch`` rows; an unknown dim is an error (the layer cannot be timed alone)."""
    from onnx_tucker.errors import UsageError

    shape = site.input_shape
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        raise UsageError(f"{site.name}: input shape {shape} is not known: give --input-shape to time its layer")
    return [batch] + [int(d) for d in shape[1:]]


def layer_signature(site, batch: int) -> str:
    """What decides a layer's latency besides the provider: op, attributes, weight and input shapes, batch, dtype."""
    weight = list(site.weight.shape) if site.weight is not None else None
    attrs = {k: _attr_text(v) for k, v in sorted(site.node.attrs.items())}
    has_bias = len(site.node.inputs) > 2 and site.node.inputs[2] is not None and bool(site.node.inputs[2].name)
    return json.dumps({"op": site.op, "attrs": attrs, "weight": weight, "bias": has_bias, "input": input_dims(site, batch),
                       "dtype": site_dtype(site)}, sort_keys=True)


# --- one-layer models --------------------------------------------------------------------------------

def _one_node(site, batch: int):
    """A fresh graph holding a copy of the site's node alone, and the copy's site record."""
    import onnx_graphsurgeon as gs

    dtype = np.dtype(site_dtype(site))
    rng = np.random.default_rng(0)
    x = gs.Variable("x", dtype=dtype, shape=input_dims(site, batch))
    inputs = [x]
    for index, tensor in enumerate(site.node.inputs[1:], start=1):
        if tensor is None or not tensor.name:
            inputs.append(gs.Variable.empty())
            continue
        if index == 1 and site.weight is not None:
            values = np.ascontiguousarray(site.weight)
        else:
            shape = tensor.shape if tensor.shape is not None else getattr(getattr(tensor, "values", None), "shape", None)
            values = rng.standard_normal(shape).astype(dtype) if shape is not None else np.zeros((site.shape.c_out,), dtype)
        inputs.append(gs.Constant(f"{site.name}_input{index}", values))
    y = gs.Variable("y", dtype=dtype)
    node = gs.Node(site.op, name=site.name, attrs=dict(site.node.attrs), inputs=inputs, outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=OPSET)
    return graph, replace(site, node=node, extra=dict(site.extra))


def _export(graph):
    import onnx_graphsurgeon as gs

    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 8)
    return model


def layer_model(site, batch: int, form=None, ranks: tuple | None = None):
    """The one-layer model of ``site`` (``ranks`` None: the original layer; else its form's chain at ``ranks``)."""
    graph, copy = _one_node(site, batch)
    if ranks is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            factors = form.fit(copy, tuple(ranks), n_iter_max=0, method="eig")
        taken = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
        constants = form.constants(copy, factors, taken)
        form.emit(graph, copy, constants, taken)
    return _export(graph)


def foldable_affine(site, shapes: dict) -> tuple | None:
    """(input dims at batch 1, scale, shift) of the per-channel Mul -> Add that ``fold.fold_affine_into_chains``
    folds into this site's chain (directly before it, or before a MaxPool before it), else None.

    A chain makes those two ops vanish, so the layer's whole cost is the conv plus them: the table times them
    too (``affine`` entries), and the latency budget counts them with the layer, not in the fixed part.
    """
    from onnx_tucker.site import resolve_constant

    if site.op != "Conv" or site.geometry is None or site.shape is None:
        return None
    tensor = site.node.inputs[0]
    producer = tensor.inputs[0] if tensor.inputs else None
    pool = None
    if producer is not None and producer.op == "MaxPool" and len(tensor.outputs) == 1:
        pool, tensor = producer, producer.inputs[0]
        producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Add" or len(tensor.outputs) != 1:
        return None
    add = producer
    values = [resolve_constant(t)[0] if t is not None else None for t in add.inputs]
    if len(values) != 2 or (values[0] is None) == (values[1] is None):
        return None
    shift = values[0] if values[0] is not None else values[1]
    mid = add.inputs[1] if values[0] is not None else add.inputs[0]
    mul = mid.inputs[0] if mid.inputs else None
    if mul is None or mul.op != "Mul" or len(mid.outputs) != 1:
        return None
    values = [resolve_constant(t)[0] if t is not None else None for t in mul.inputs]
    if len(values) != 2 or (values[0] is None) == (values[1] is None):
        return None
    scale = values[0] if values[0] is not None else values[1]
    source = mul.inputs[1] if values[0] is not None else mul.inputs[0]
    channels = site.shape.c_in
    for v in (scale, shift):
        if v.size != 1 and (v.size != channels or v.ndim < 1):
            return None
    if pool is not None and not np.all(np.asarray(scale) > 0):
        return None
    dims = shapes.get(source.name)
    if dims is None or len(dims) < 2 or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        return None
    return tuple(dims), np.asarray(scale), np.asarray(shift)


def affine_model(dims: list, scale: np.ndarray, shift: np.ndarray, dtype: str):
    """x -> Mul(scale) -> Add(shift): the ops a chain's fold removes."""
    from onnx import TensorProto, helper, numpy_helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE}[dtype]
    nd = len(dims)
    def const(name, v):
        v = np.asarray(v, dtype=dtype)
        v = v.reshape((1, -1) + (1,) * (nd - 2)) if v.size > 1 else v.reshape(())
        return numpy_helper.from_array(v, name)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "affine",
        [helper.make_tensor_value_info("x", elem, list(dims))], [helper.make_tensor_value_info("y", elem, None)],
        [const("a", scale), const("b", shift)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def dynamic_sizes(model, input_shapes: dict | None) -> dict:
    """{input: its dims after the batch, as ``input_shapes`` gives them (None where it does not)} for each graph input
    with a dynamic size after the batch: what a whole-model timing of a dynamic model depends on besides its bytes."""
    from onnx_tucker.runtime import graph_inputs

    sizes = {}
    for vi in graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if any(d is None or d <= 0 for d in dims[1:]):
            given = (input_shapes or {}).get(vi.name)
            sizes[vi.name] = [int(d) for d in given[1:]] if given else None
    return sizes


def _positive(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


ENTRY_FIELDS = {"original": ("us",), "option": ("us", "ratio", "q3"),
                "whole": ("runs", "original_ms", "compressed_ms", "speedup")}


def valid_entry(key, entry) -> bool:
    """Whether a cached entry holds the positive, finite numbers its kind is read for (:data:`ENTRY_FIELDS`): a
    layer's original time, an option's time and ratios, a whole-model timing."""
    if not isinstance(key, str) or not isinstance(entry, dict):
        return False
    kind = "whole" if "|whole|" in key else "original" if key.endswith("|original") else "option"
    return all(_positive(entry.get(name)) for name in ENTRY_FIELDS[kind])


# --- the table ---------------------------------------------------------------------------------------

class LatencyTable:
    """Measured per-layer latencies on one provider, batch and device, cached in ``path`` (None: memory only).

    ``measured`` counts the models timed by this object (0 after a run served from the cache).
    """

    def __init__(self, path=None, provider: str = "cpu", batch: int = 1, threads: int | None = None, runs: int | None = None,
                 warmup: int | None = None, min_seconds: float | None = None):
        from onnx_tucker.providers import onnxruntime, require

        self.provider = require(provider).key  # a missing provider is a one-line error here
        self.device = device_name(self.provider)
        self.ort_version = onnxruntime().__version__
        self.batch = int(batch)
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.runs = int(RUNS if runs is None else runs)
        self.warmup = int(WARMUP if warmup is None else warmup)
        self.min_seconds = MIN_SECONDS if min_seconds is None else float(min_seconds)
        self.path = Path(path) if path is not None else None
        self.dropped = 0  # damaged entries the file held when this table loaded it (measured again)
        self.entries: dict[str, dict] = self._load()
        self.measured = 0
        self.unsaved: str | None = None  # why the file could not be written, once it could not

    # keys and storage
    def _prefix(self) -> str:
        return f"{self.provider}|{self.device}|onnxruntime {self.ort_version}|threads {self.threads}|batch {self.batch}"

    def key(self, site, form: str | None = None, ranks: tuple | None = None) -> str:
        if form and "|" in form and ranks is not None:  # a FormChoice: keyed by the form that writes the chain
            from onnx_tucker.factorization import get_form

            form = get_form(form).resolve(site, tuple(ranks)).name
        what = "original" if ranks is None else f"{form} {','.join(str(int(r)) for r in ranks)}"
        return f"{self._prefix()}|{layer_signature(site, self.batch)}|{what}"

    def _load(self) -> dict:
        """The file's entries, or {} when there is no file. A damaged cache is measured again, not an error: a file
        that cannot be read or parsed, or of another schema, gives {}; under this schema, entries that are not an
        object give {}, and each entry without the numbers its kind needs (:func:`valid_entry`) is dropped, counted
        in ``dropped`` (the report's note), and measured again when wanted."""
        self.dropped = 0
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}  # a damaged cache is measured again, not an error
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            self.dropped = len(entries) if isinstance(entries, list) else int(entries is not None)
            return {}
        kept = {k: v for k, v in entries.items() if valid_entry(k, v)}
        self.dropped = len(entries) - len(kept)
        return kept

    def save(self) -> None:
        """Merge into the file (another run may have added entries since this one loaded). A file that cannot be
        written (an unwritable HOME in a container, a link) leaves the timings in memory for this run, the reason
        in ``unsaved`` (the report's note): a cache, not an output."""
        from onnx_tucker.errors import UsageError, first_line
        from onnx_tucker.outputs import replace_cache_file

        if self.path is None or self.unsaved:
            return
        dropped = self.dropped
        entries = self._load()
        self.dropped = dropped  # what this table found when it loaded, not what the merge found
        entries.update(self.entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_cache_file(self.path, json.dumps({"schema": SCHEMA, "entries": entries}, sort_keys=True), "--latency-table")
        except (OSError, UsageError) as exc:
            self.unsaved = f"{self.path}: {first_line(exc)}"
            return
        self.entries = entries

    # lookups
    def original_us(self, site) -> float | None:
        entry = self.entries.get(self.key(site))
        return entry["us"] if entry else None

    def option(self, site, ranks: tuple) -> dict | None:
        """The cached entry of ``site``'s chain at ``ranks``: {"us", "ratio", "q3", "original_us"} or None."""
        entry = self.entries.get(self.key(site, site.form, ranks))
        original = self.original_us(site)
        if entry is None or original is None:
            return None
        return entry | {"original_us": original, "cost_us": entry["ratio"] * original}

    def whole_models(self, original, compressed, input_shapes: dict | None = None) -> dict:
        """:func:`time_models` of the two whole models on this table's provider and batch, cached by both models'
        bytes and, for a model with dynamic sizes, the sizes it is fed at (``input_shapes``: {input: dims}, from
        ``--input-shape`` or the calibration arrays); a rerun that writes the same model times nothing (``cached``
        says which it was)."""
        import hashlib

        digest = "|".join(hashlib.sha256(m.SerializeToString()).hexdigest()[:24] for m in (original, compressed))
        key = f"{self._prefix()}|whole|{digest}"
        sizes = dynamic_sizes(original, input_shapes)
        if sizes:
            key += "|input " + json.dumps(sizes, sort_keys=True)
        if key in self.entries:
            return self.entries[key] | {"cached": True}
        measured = time_models(original, compressed, self.provider, self.batch, self.threads, input_shapes=input_shapes)
        self.entries[key] = measured
        self.save()
        return measured | {"cached": False}

    def measure(self, site, options: list, progress=None) -> dict:
        """{ranks: entry} for ``options`` of ``site`` (its form), timing only those not cached yet."""
        from onnx_tucker.factorization import get_form

        options = [tuple(int(r) for r in ranks) for ranks in options]
        todo = [r for r in dict.fromkeys(options) if self.entries.get(self.key(site, site.form, r)) is None]
        if todo or self.original_us(site) is None:
            form = get_form(site.form)
            models = [layer_model(site, self.batch)] + [layer_model(site, self.batch, form, r) for r in todo]
            times = self._time(models)
            base = times[0]
            self.entries[self.key(site)] = {"us": float(np.median(base) * 1e6), "runs": len(base)}
            for ranks, seconds in zip(todo, times[1:]):
                ratios = np.asarray(seconds) / np.asarray(base)
                self.entries[self.key(site, site.form, ranks)] = {
                    "us": float(np.median(seconds) * 1e6), "ratio": float(np.median(ratios)),
                    "q3": float(np.percentile(ratios, 75)), "runs": len(seconds)}
            self.save()
            if progress is not None:
                progress(site, len(todo))
        return {r: self.option(site, r) for r in options}

    def _time(self, models: list, feeds: list | None = None, runs: int | None = None) -> list[list[float]]:
        """Seconds per interleaved run of each model (the first is the reference: the original layer)."""
        from onnx_tucker.bench import bind, open_session, time_interleaved
        from onnx_tucker.providers import get
        from onnx_tucker.runtime import random_inputs

        device = get(self.provider).device
        with tempfile.TemporaryDirectory(prefix="onnx-tucker-latency-table-") as folder:
            runners = []
            for index, model in enumerate(models):
                path = Path(folder) / f"layer{index}.onnx"
                path.write_bytes(model.SerializeToString())
                session = open_session(path, self.provider, self.threads, get(self.provider).options())
                given = feeds[index] if feeds is not None else None
                runners.append(bind(session, given if given is not None else random_inputs(model, batch=self.batch, seed=0), device))
            warmup = get(self.provider).warmup(self.warmup)
            # calibrate the number of iterations on the original alone
            import time

            start = time.perf_counter()
            for _ in range(max(warmup, 1)):
                runners[0]()
            each = (time.perf_counter() - start) / max(warmup, 1)
            runs = runs or max(self.runs, min(MAX_RUNS, int(self.min_seconds / max(each, 1e-6))))
            times = time_interleaved(runners, runs, warmup)
        self.measured += len(models)
        return times


# --- uses of the table -------------------------------------------------------------------------------

def snapshot(table: LatencyTable, model, sites: list, shapes: dict | None = None, runs: int = 20,
             input_shapes: dict | None = None) -> dict:
    """The whole model (fed at ``input_shapes``, {input: dims}, where its sizes are dynamic), each site's original
    layer and its foldable Mul/Add (:func:`foldable_affine`, with ``shapes``: the inferred tensor shapes), timed
    together, interleaved, at the table's batch: {"whole_us", "layers": {name: (layer us,
    affine us)}, "fixed_us"}. Absolute times drift with the load of a shared machine; times taken in the same
    iterations do not drift apart, so the part of the model outside the sites (``fixed_us`` = whole minus the
    layers and affines) is measured, not a difference of two moments."""
    from onnx_tucker.bench import timing_feeds
    from onnx_tucker.capture import fixed_batch
    from onnx_tucker.errors import UsageError
    from onnx_tucker.runtime import random_inputs

    fixed = fixed_batch(model)
    if fixed and fixed != table.batch:
        raise UsageError(f"the model is exported for batch {fixed} only: --latency-batch {table.batch} cannot run it")
    models, feeds, slots = [model], [timing_feeds(model, table.batch, shapes=input_shapes)], []
    for site in sites:
        models.append(layer_model(site, table.batch))
        feeds.append(None)
        affine = foldable_affine(site, shapes) if shapes is not None else None
        if affine is not None:
            models.append(affine_model([table.batch] + list(affine[0][1:]), affine[1], affine[2], site_dtype(site)))
            feeds.append(None)
        slots.append((site.name, affine is not None))
    times = table._time(models, feeds=[f if f is not None else random_inputs(m, batch=table.batch, seed=0) for m, f in zip(models, feeds)],
                        runs=runs)
    medians = [float(np.median(t)) * 1e6 for t in times]
    layers, k = {}, 1
    for name, has_affine in slots:
        layers[name] = (medians[k], medians[k + 1] if has_affine else 0.0)
        k += 2 if has_affine else 1
    whole = medians[0]
    # ``fixed_us`` may be negative: a layer timed alone pays its own layout reorders (NCHW <-> NCHWc on the CPU EP)
    # that the whole model pays once; its chain alone pays them too, so they cancel in fixed + sum(chains).
    return {"whole_us": whole, "layers": layers, "fixed_us": whole - sum(a + b for a, b in layers.values())}


def option_costs(table: LatencyTable, sites: list, curves: dict, snap: dict) -> dict:
    """Layer -> (original us, {ranks: chain us}) for every option of the measured curves (timed where not cached).

    The original's time and its foldable Mul/Add come from ``snap`` (:func:`snapshot`, same moment as the whole
    model); a chain's time is its cached ratio to the original layer times that layer's time in ``snap``."""
    costs = {}
    for site in sites:
        options = [tuple(e[2]) for e in curves.get(site.name, [])]
        entries = table.measure(site, options)
        layer, affine = snap["layers"][site.name]
        costs[site.name] = (layer + affine, {r: e["ratio"] * layer for r, e in entries.items()})
    return costs


def verdict(entry: dict) -> str:
    """'faster' when the chain beat the original in at least 3 of 4 paired runs (upper quartile of the ratios
    below 1), 'slower' when its median ratio is not below 1, else 'noise' (left whole: not worth the accuracy)."""
    if entry["q3"] < 1:
        return "faster"
    return "slower" if entry["ratio"] >= 1 else "noise"


def choose_multiple(table: LatencyTable, sites: list, candidates=MULTIPLES, fractions=(0.3, 0.45), layers: int = 2) -> dict:
    """``--rank-multiple auto``: the largest multiple whose extra rank comes free on the provider.

    On the ``layers`` eligible sites with the most MACs, ranks at each of ``fractions`` of the channels (rarely
    aligned) are rounded UP to each candidate multiple and timed with the unrounded ranks (cached in the table
    like any option). Rounding up never lowers a rank, so a multiple whose chains are no slower in sum than the
    unrounded ones (``score`` <= 1) gives the budget as much accuracy per microsecond or more: the largest such
    multiple is chosen, 1 when none is. Returns {"multiple", "scores" (summed time against unrounded), "layers"}.
    """
    import math

    from onnx_tucker.factorization import get_form

    ranked = sorted([s for s in sites if s.eligible and s.form and s.shape is not None], key=lambda s: -s.shape.macs())[:layers]
    if not ranked:
        return {"multiple": 1, "scores": {}, "layers": []}
    summed = {m: 0.0 for m in candidates}
    for site in ranked:
        form = get_form(site.form)
        limits = form.max_ranks(site)
        options = {}
        for f in fractions:
            base = form.rule_ranks(site, "ratio", f, 1.0)
            for m in candidates:
                options[(m, f)] = tuple(min(lim, max(m, math.ceil(r / m) * m)) for r, lim in zip(base, limits))
        entries = table.measure(site, [tuple(min(r, lim) for r, lim in zip(form.rule_ranks(site, "ratio", f, 1.0), limits))
                                       for f in fractions] + list(options.values()))
        for (m, f), ranks in options.items():
            summed[m] += entries[ranks]["cost_us"]
    unrounded = summed[1] if 1 in summed else min(summed.values())
    scores = {m: summed[m] / unrounded for m in candidates}
    chosen = max([m for m in candidates if scores[m] <= 1.0] or [1])
    return {"multiple": chosen, "scores": {str(m): round(v, 4) for m, v in scores.items()}, "layers": [s.name for s in ranked]}


def resolve_multiple(sites: list, provider: str = "cpu", batch: int = 1, path=None) -> dict:
    """``--rank-multiple auto`` outside compress (inspect, sweep): :func:`choose_multiple` on a table at ``path``
    (default :func:`default_path`), with the provider and batch it measured on."""
    table = LatencyTable(path or default_path(), provider, batch)
    choice = choose_multiple(table, sites)
    table.save()
    return choice | {"provider": table.provider, "batch": table.batch, "timed_layer_models": table.measured}


def time_models(original, compressed, provider: str = "cpu", batch: int = 1, threads: int | None = None, runs: int = 40,
                warmup: int = 5, input_shapes: dict | None = None) -> dict:
    """Whole-model latency of the two models, interleaved: medians (ms) and the paired median speedup. ``input_shapes``
    ({input: dims}, the batch there replaced by ``batch``) gives the sizes a model with dynamic sizes is fed at."""
    from onnx_tucker.bench import bind, open_session, paired_speedup, time_interleaved, timing_feeds
    from onnx_tucker.capture import fixed_batch
    from onnx_tucker.errors import UsageError
    from onnx_tucker.providers import get

    fixed = fixed_batch(original)
    if fixed and fixed != batch:
        raise UsageError(f"the model is exported for batch {fixed} only: --latency-batch {batch} cannot run it")
    threads = threads or min(2, os.cpu_count() or 1)
    chosen = get(provider)
    feeds = timing_feeds(original, batch, shapes=input_shapes)
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-latency-") as folder:
        runners = []
        for index, model in enumerate((original, compressed)):
            path = Path(folder) / f"model{index}.onnx"
            path.write_bytes(model.SerializeToString())
            runners.append(bind(open_session(path, chosen.key, threads, chosen.options()), feeds, chosen.device))
        times = time_interleaved(runners, runs, chosen.warmup(warmup))
    return {"provider": chosen.key, "batch": batch, "runs": runs,
            "original_ms": statistics.median(times[0]) * 1e3, "compressed_ms": statistics.median(times[1]) * 1e3,
            "speedup": paired_speedup(times[0], times[1])["median"]}

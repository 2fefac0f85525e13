"""onnxruntime sessions (providers from ``providers``) and model inputs, shared by every module that runs a model."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError, ModelError, first_line
from onnx_tucker.trace import session_made

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}

WORKERS = 16  # threads that fit layers or solve channels side by side (each holds a layer's or channel's arrays)


def worker_threads() -> int:
    """Threads for numpy work that releases the GIL: the CPUs this process may use, at most ``WORKERS``, and at
    most ``OMP_NUM_THREADS`` where that is set (a Ray task holding one CPU has it set to 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cpus = min(cpus, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:  # unset or not a number: the CPUs
        pass
    return max(1, min(cpus, WORKERS))


def make_session(
    model,
    provider: str = "cpu",
    threads: int | None = None,
    provider_options: dict | None = None,
    *,
    profile_prefix: str | None = None,
    config: dict | None = None,
):
    """An InferenceSession for a path or ModelProto on one provider of the registry (``providers.PROVIDERS``).

    ``profile_prefix`` turns on onnxruntime's profiler (trace file named from it; ``end_profiling()``
    returns its path); ``config`` holds session config entries (``session.intra_op.allow_spinning``...).
    An unknown provider is a usage error.
    """
    from onnx_tucker.providers import onnxruntime

    ort = onnxruntime()

    from onnx_tucker.providers import get, preload_gpu_libraries

    chosen = get(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    if chosen.device != "cpu":
        preload_gpu_libraries()
    source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    if isinstance(source, str):
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8: onnxruntime takes no such path, only the model
            source = onnx.load(source).SerializeToString()
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(source, options, providers=chosen.session_providers(provider_options))
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
    session_made(time.perf_counter() - start)
    return session


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def shapes_of_arrays(model: onnx.ModelProto, feeds: dict | None) -> dict | None:
    """{input: [batch, *sizes]} (batch 1 where it is free) for each graph input with a dynamic size after the batch that ``feeds`` (real arrays:
    ``--calibrate``, ``--data``, ``--inputs``) gives a value of: the size the model will be used at, for the cost
    model where no ``--input-shape`` says it. None when no input needs it."""
    shapes = {}
    for vi in graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        array = (feeds or {}).get(vi.name)
        if any(d is None or d <= 0 for d in dims[1:]) and array is not None and np.ndim(array) == len(dims):
            batch = dims[0] if dims and dims[0] and dims[0] > 0 else 1  # a fixed batch stays what the model says
            shapes[vi.name] = [batch, *(int(n) for n in np.shape(array)[1:])]
    return shapes or None


def input_spec(value_info: onnx.ValueInfoProto) -> tuple[list, type]:
    t = value_info.type.tensor_type
    dtype = _ONNX_TO_NUMPY.get(t.elem_type)
    if dtype is None:
        raise ModelError(f"input '{value_info.name}' has an element type this tool cannot feed ({t.elem_type})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return dims, dtype


def sizes_static(model: onnx.ModelProto, shapes: dict | None = None) -> bool:
    """Every graph input's dims past the batch are known (in the model or ``--input-shape``): where a layer's sizes are
    still unknown, shape inference stopped before it (a Loop, an If, a custom-domain op) and --input-shape cannot help."""
    for vi in graph_inputs(model):
        dims, _ = input_spec(vi)
        given = (shapes or {}).get(vi.name)
        if any((d is None or d <= 0) and not (given and i < len(given) and given[i]) for i, d in enumerate(dims) if i):
            return False
    return True


def unknown_sizes_note(static: bool, columns: str = "profitability judged on parameters") -> str:
    """The footnote of a table where some layer's MACs are unknown: what to do about it, if anything."""
    if static:
        return (f"* spatial sizes unknown: shape inference stops before these layers (an op it cannot see through: Loop, If "
                f"or a custom-domain op), so --input-shape cannot help: MACs unknown, {columns}")
    return f"* spatial sizes unknown (dynamic input sizes): MACs unknown, {columns}; give --input-shape NAME:DIMS to count MACs"


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input; unknown batch dims become ``batch``; ``shapes`` ({input: dims},
    from ``--input-shape``) fill unknown dims (a batch fixed there wins over ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        dims, dtype = input_spec(vi)
        if shapes and vi.name in shapes:
            given = shapes[vi.name]
            if len(given) != len(dims) or any(d and d != g for d, g in zip(dims, given)):
                raise ModelError(f"--input-shape {given} does not fit input '{vi.name}' {['?' if d is None else d for d in dims]}")
            dims = [None if i == 0 and dims[0] is None else g for i, g in enumerate(given)]  # a free batch stays ``batch``
        shape = []
        for i, d in enumerate(dims):
            if d is None or d <= 0:
                if i != 0:
                    raise ModelError(
                        f"input '{vi.name}' has an unknown dimension {i}: give --input-shape {vi.name}:DIMS or real inputs with --inputs FILE.npz"
                    )
                d = batch
            shape.append(d)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an .npz (:func:`onnx_tucker.data.load_inputs`, which refuses arrays that cannot be fed)."""
    from onnx_tucker.data import load_inputs as load

    return load(path, model)

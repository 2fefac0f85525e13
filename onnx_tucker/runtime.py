"""onnxruntime sessions and model inputs, shared by validate, calibrate and bench."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError, ModelError, first_line

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

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def make_session(
    model,
    provider: str = "cpu",
    threads: int | None = None,
    provider_options: dict | None = None,
    *,
    profile_prefix: str | None = None,
    config: dict | None = None,
):
    """An InferenceSession for a path or ModelProto on one provider ('cpu', 'cuda', 'tensorrt').

    ``profile_prefix`` turns on onnxruntime's profiler (trace file named from it; ``end_profiling()``
    returns its path); ``config`` holds session config entries (``session.intra_op.allow_spinning``...).
    """
    import onnxruntime as ort

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
    name = PROVIDER_NAMES.get(provider, provider)
    if name != "CPUExecutionProvider":
        preload_gpu_libraries()
    providers = provider_chain(name, provider_options)
    source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def provider_chain(name: str, provider_options: dict | None = None) -> list[tuple[str, dict]]:
    """The provider list for a session: the chosen one first, then what takes the nodes it cannot run."""
    chain = [(name, provider_options or {})]
    if name == "TensorrtExecutionProvider":
        chain.append(("CUDAExecutionProvider", {}))
    if name != "CPUExecutionProvider":
        chain.append(("CPUExecutionProvider", {}))
    return chain


def preload_gpu_libraries() -> None:
    """Let onnxruntime-gpu (>= 1.21) load CUDA/cuDNN from pip's nvidia-* packages (e.g. torch's), if it can."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None or os.environ.get("ONNX_TUCKER_NO_PRELOAD"):
        return
    try:
        preload()
    except Exception:  # best effort: without it onnxruntime searches the default library paths
        pass


# --- execution providers: which are available, and why CUDA is not --------------------------------

GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1"
SHORT_NAMES = {v: k for k, v in PROVIDER_NAMES.items()}


def available_providers() -> list[str]:
    """Short names ('cpu', 'cuda', 'tensorrt') of the providers this onnxruntime offers, fastest first."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    return [short for short in ("tensorrt", "cuda", "cpu") if PROVIDER_NAMES[short] in offered]


def installed_version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_gpu_visible() -> bool:
    """An NVIDIA driver is there: ``nvidia-smi`` on PATH or a /dev/nvidia<N> device node."""
    import glob
    import shutil

    return bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*"))


def explain_missing_cuda(gpu_visible: bool, cpu_package: str | None, gpu_package: str | None) -> list[str]:
    """Why the CUDA EP is not offered, from the facts (pure: each fact gives its own sentence)."""
    reasons = []
    if not gpu_visible:
        reasons.append("no NVIDIA GPU or driver found (no nvidia-smi on PATH, no /dev/nvidia*)")
    if cpu_package and gpu_package:
        reasons.append(
            f"both onnxruntime {cpu_package} (CPU-only) and onnxruntime-gpu {gpu_package} are installed and the "
            f"CPU package hides the CUDA EP; fix: {GPU_INSTALL}"
        )
    elif cpu_package:
        reasons.append(f"the CPU-only onnxruntime {cpu_package} is installed, not onnxruntime-gpu; GPU install: {GPU_INSTALL}")
    elif gpu_package and gpu_visible:
        reasons.append(f"onnxruntime-gpu {gpu_package} is installed but does not offer the CUDA EP (a broken install?)")
    elif not gpu_package:
        reasons.append(f"no onnxruntime-gpu distribution is installed; GPU install: {GPU_INSTALL}")
    return reasons


def provider_unavailable_reason(provider: str) -> str | None:
    """None when ``provider`` ('cpu', 'cuda', 'tensorrt') is offered; otherwise why not, in one line."""
    if provider in available_providers():
        return None
    if provider == "tensorrt":
        cuda = provider_unavailable_reason("cuda")
        return cuda or "this onnxruntime-gpu build does not offer the TensorRT EP (TensorRT libraries missing?)"
    if provider == "cuda":
        facts = (nvidia_gpu_visible(), installed_version("onnxruntime"), installed_version("onnxruntime-gpu"))
        return "; ".join(explain_missing_cuda(*facts))
    return f"onnxruntime does not offer the {PROVIDER_NAMES.get(provider, provider)}"


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_spec(value_info: onnx.ValueInfoProto) -> tuple[list, type]:
    t = value_info.type.tensor_type
    dtype = _ONNX_TO_NUMPY.get(t.elem_type)
    if dtype is None:
        raise ModelError(f"input '{value_info.name}' has an element type this tool cannot feed ({t.elem_type})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return dims, dtype


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input; unknown batch dims become ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        dims, dtype = input_spec(vi)
        shape = []
        for i, d in enumerate(dims):
            if d is None or d <= 0:
                if i != 0:
                    raise ModelError(
                        f"input '{vi.name}' has an unknown dimension {i}: pass real inputs with --inputs FILE.npz"
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

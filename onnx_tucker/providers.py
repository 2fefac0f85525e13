"""The execution-provider registry: one record per onnxruntime execution provider.

A record says what the provider is called (short name, aliases, onnxruntime's name), which device
IOBinding puts tensors on, the options its sessions get, its minimum warm-up, what takes the nodes it
cannot run, and why it is missing when it is. Sessions, ``bench``, latency measurements and calibration
take providers from here; adding one is one entry in ``PROVIDERS``.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

from onnx_tucker.errors import OnnxTuckerError, UsageError

GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1"
CUDNN_ALGOS = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


# The CLI sets this: onnxruntime-gpu 1.31 logs a warning on its default logger for every CUDA session
# ("No registered plugin EP device found for 'CUDAExecutionProvider'"), about 80 lines in a ResNet50 budget,
# which the session's own log level does not silence. A library caller's logger is left as it is.
QUIET_DEFAULT_LOGGER = False
_quieted = False


def onnxruntime():
    """The onnxruntime module (from ``onnxruntime`` or ``onnxruntime-gpu``), or a one-line error saying what to install."""
    global _quieted
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'onnx-tucker[cpu]' (or 'onnx-tucker[gpu]' for onnxruntime-gpu)") from None
    if QUIET_DEFAULT_LOGGER and not _quieted:
        ort.set_default_logger_severity(3)  # errors only
        _quieted = True
    return ort


@dataclass(frozen=True)
class Provider:
    key: str  # short name used on the command line and in reports
    ort_name: str  # onnxruntime's name
    device: str  # IOBinding device type ("cpu", "cuda")
    aliases: tuple[str, ...] = ()
    min_warmup: int = 0  # warm-up runs at least (cuDNN's algorithm search happens in the first runs)
    fallback: tuple[str, ...] = ("CPUExecutionProvider",)  # what takes the nodes it cannot run
    make_options: Callable[..., dict] = field(default=lambda **_: {})
    missing: Callable[[], str] | None = None  # why it is not offered, when it is not
    note_missing: bool = False  # say why it is missing even when nobody asked for it (bench's default set)

    graph_capture: bool = False  # offers onnxruntime's CUDA graph capture (bench --cuda-graph)

    def options(self, cudnn_algo: str = "EXHAUSTIVE", cache_dir: str | None = None, cuda_graph: bool = False, fp16: bool = False) -> dict:
        if cuda_graph and not self.graph_capture:
            raise UsageError(f"--cuda-graph: the {self.key} execution provider has no CUDA graph capture (use cuda or tensorrt)")
        return self.make_options(cudnn_algo=cudnn_algo, cache_dir=cache_dir, cuda_graph=cuda_graph, fp16=fp16)

    def session_providers(self, options: dict | None = None) -> list[tuple[str, dict]]:
        return [(self.ort_name, options or {})] + [(name, {}) for name in self.fallback if name != self.ort_name]

    def warmup(self, requested: int) -> int:
        return max(requested, self.min_warmup)


def _cuda_options(cudnn_algo: str = "EXHAUSTIVE", cuda_graph: bool = False, **_) -> dict:
    options = {"device_id": 0, "cudnn_conv_algo_search": cudnn_algo}
    if cuda_graph:  # replays the captured kernels: no per-node launch cost (needs fixed I/O addresses)
        options["enable_cuda_graph"] = "1"
    return options


def _tensorrt_options(cache_dir: str | None = None, cuda_graph: bool = False, fp16: bool = False, **_) -> dict:
    options = {"device_id": 0}
    if cache_dir:
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache_dir)
    if cuda_graph:
        options["trt_cuda_graph_enable"] = "True"
    if fp16:  # TensorRT picks fp16 kernels itself where they are faster
        options["trt_fp16_enable"] = "True"
    return options


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_gpu_visible() -> bool:
    """An NVIDIA driver is there: ``nvidia-smi`` on PATH or a /dev/nvidia<N> device node."""
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


def _cuda_missing() -> str:
    facts = (nvidia_gpu_visible(), installed_version("onnxruntime"), installed_version("onnxruntime-gpu"))
    return "; ".join(explain_missing_cuda(*facts))


def _tensorrt_missing() -> str:
    cuda = unavailable_reason("cuda")
    return cuda or "this onnxruntime-gpu build does not offer the TensorRT EP (TensorRT libraries missing?)"


# The order "every one available" benchmarks in; the first offered is where probes run fastest.
PROVIDERS: dict[str, Provider] = {
    p.key: p
    for p in (
        Provider("cuda", "CUDAExecutionProvider", "cuda", ("gpu",), min_warmup=20, make_options=_cuda_options, missing=_cuda_missing,
                 note_missing=True, graph_capture=True),
        Provider("tensorrt", "TensorrtExecutionProvider", "cuda", ("trt",), min_warmup=20,
                 fallback=("CUDAExecutionProvider", "CPUExecutionProvider"), make_options=_tensorrt_options, missing=_tensorrt_missing,
                 graph_capture=True),
        Provider("cpu", "CPUExecutionProvider", "cpu"),
    )
}


def get(name: str) -> Provider:
    """The provider for a short name, alias or onnxruntime name; an unknown one is a usage error."""
    key = str(name).strip().lower()
    for provider in PROVIDERS.values():
        if key in (provider.key, provider.ort_name.lower()) or key in provider.aliases:
            return provider
    raise UsageError(f"unknown execution provider {name!r} (choose from {', '.join(PROVIDERS)})")


def parse_providers(text: str) -> list[str]:
    """Comma-separated provider names -> registry keys (an empty list or item is an error)."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items) or any(not t for t in items):
        raise UsageError(f"--providers: expected comma-separated providers ({', '.join(PROVIDERS)}), got {text!r}")
    names = []
    for item in items:
        try:
            key = get(item).key
        except UsageError:
            raise UsageError(f"--providers: unknown provider {item!r} (choose from {', '.join(PROVIDERS)})") from None
        if key not in names:
            names.append(key)
    return names


def available_providers() -> list[str]:
    """Keys of the providers this onnxruntime offers, fastest first."""
    ort = onnxruntime()

    offered = set(ort.get_available_providers())
    return [p.key for p in PROVIDERS.values() if p.ort_name in offered]


def unavailable_reason(name: str) -> str | None:
    """None when the provider is offered; otherwise why not, in one line."""
    provider = get(name)
    if provider.key in available_providers():
        return None
    if provider.missing is not None:
        return provider.missing()
    return f"onnxruntime does not offer the {provider.ort_name}"


def fastest_available() -> str:
    """The first offered provider of the registry (CUDA before CPU): where probes run fastest."""
    return available_providers()[0]


def probe_options(name: str) -> dict:
    """Session options for runs whose outputs matter and whose speed does not (distortion probes,
    calibration passes): cuDNN picks its conv algorithm by heuristic instead of timing every one
    (the EXHAUSTIVE default), which each new session and input shape would pay again."""
    return get(name).options(cudnn_algo="HEURISTIC")  # the CPU EP takes no options: {}


def require(name: str) -> Provider:
    """The provider, or a one-line error saying why it is missing."""
    provider = get(name)
    reason = unavailable_reason(provider.key)
    if reason:
        raise OnnxTuckerError(f"{provider.key} execution provider not available: {reason}")
    return provider


_preloaded = False


def preload_gpu_libraries() -> None:
    """Let onnxruntime-gpu (>= 1.21) load CUDA/cuDNN from pip's nvidia-* packages (e.g. torch's), if it can.
    Once per process: each call looks for every library again and, in 1.31, registers its CUDA plugin again;
    it ran before every GPU session (a ResNet50 budget made ~80 of them, 0.5 s each)."""
    global _preloaded
    if _preloaded:
        return
    ort = onnxruntime()

    preload = getattr(ort, "preload_dlls", None)
    if preload is None or os.environ.get("ONNX_TUCKER_NO_PRELOAD"):
        return
    _preloaded = True
    try:
        preload()
    except Exception:  # best effort: without it onnxruntime searches the default library paths
        pass

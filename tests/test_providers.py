"""Execution providers: what is offered, and why the CUDA EP is not, for each cause the tool names."""
import importlib.metadata
import os
import shutil

import numpy as np
import pytest

from onnx_tucker import providers as runtime, runtime as sessions
from onnx_tucker.providers import explain_missing_cuda, unavailable_reason as provider_unavailable_reason

from conftest import residual_model


def fake_distributions(monkeypatch, installed: dict):
    def version(name):
        if name in installed:
            return installed[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def no_gpu(monkeypatch, visible: bool):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if visible else None)
    monkeypatch.setattr("glob.glob", lambda pattern: [])


def cuda_not_offered(monkeypatch):
    monkeypatch.setattr(runtime, "available_providers", lambda: ["cpu"])


def test_cpu_is_always_offered_and_needs_no_reason():
    assert "cpu" in runtime.available_providers()
    assert provider_unavailable_reason("cpu") is None


def test_no_gpu_and_cpu_package_gives_both_reasons(monkeypatch):
    cuda_not_offered(monkeypatch)
    no_gpu(monkeypatch, visible=False)
    fake_distributions(monkeypatch, {"onnxruntime": "1.32.0"})
    reason = provider_unavailable_reason("cuda")
    assert "no NVIDIA GPU or driver" in reason and "nvidia-smi" in reason
    assert "CPU-only onnxruntime 1.32.0" in reason and "pip install onnxruntime-gpu" in reason


def test_gpu_present_but_cpu_only_package_names_the_package(monkeypatch):
    cuda_not_offered(monkeypatch)
    no_gpu(monkeypatch, visible=True)
    fake_distributions(monkeypatch, {"onnxruntime": "1.32.0"})
    reason = provider_unavailable_reason("cuda")
    assert "GPU or driver" not in reason
    assert reason.startswith("the CPU-only onnxruntime 1.32.0 is installed, not onnxruntime-gpu")


def test_both_packages_installed_is_named_as_the_cause(monkeypatch):
    cuda_not_offered(monkeypatch)
    no_gpu(monkeypatch, visible=True)
    fake_distributions(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    reason = provider_unavailable_reason("cuda")
    assert "both onnxruntime 1.32.0" in reason and "onnxruntime-gpu 1.31.1" in reason and "hides the CUDA EP" in reason
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in reason


def test_gpu_package_alone_without_gpu_blames_the_missing_gpu_only(monkeypatch):
    cuda_not_offered(monkeypatch)
    no_gpu(monkeypatch, visible=False)
    fake_distributions(monkeypatch, {"onnxruntime-gpu": "1.31.1"})
    assert provider_unavailable_reason("cuda") == "no NVIDIA GPU or driver found (no nvidia-smi on PATH, no /dev/nvidia*)"


def test_device_node_counts_as_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/nvidia0"])
    assert runtime.nvidia_gpu_visible()


def test_explanations_are_one_sentence_per_fact():
    assert len(explain_missing_cuda(False, "1.0", None)) == 2
    assert len(explain_missing_cuda(True, "1.0", "1.0")) == 1
    assert "broken install" in explain_missing_cuda(True, None, "1.31.1")[0]
    assert "no onnxruntime-gpu" in explain_missing_cuda(True, None, None)[0]


def test_tensorrt_reason_falls_back_to_cuda_reason(monkeypatch):
    cuda_not_offered(monkeypatch)
    no_gpu(monkeypatch, visible=False)
    fake_distributions(monkeypatch, {"onnxruntime": "1.32.0"})
    assert provider_unavailable_reason("tensorrt") == provider_unavailable_reason("cuda")


def test_provider_chain_puts_cpu_last():
    assert runtime.get("cpu").session_providers() == [("CPUExecutionProvider", {})]
    chain = runtime.get("tensorrt").session_providers({"device_id": 0})
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.cuda
def test_cuda_session_runs_on_cuda():
    if "cuda" not in runtime.available_providers():
        pytest.skip(f"CUDA EP not available: {provider_unavailable_reason('cuda')}")
    session = sessions.make_session(residual_model(), "cuda", provider_options={"cudnn_conv_algo_search": "HEURISTIC"})
    assert session.get_providers()[0] == "CUDAExecutionProvider"


def test_unknown_provider_is_a_usage_error_not_cuda():
    from onnx_tucker.errors import UsageError

    with pytest.raises(UsageError, match="unknown execution provider 'tpu'"):
        sessions.make_session(residual_model(), "tpu")
    with pytest.raises(UsageError, match="unknown execution provider"):
        runtime.get("rocm")


def test_every_provider_record_is_complete_and_reachable_by_alias():
    for key, provider in runtime.PROVIDERS.items():
        assert runtime.get(key) is provider and runtime.get(provider.ort_name) is provider
        for alias in provider.aliases:
            assert runtime.get(alias) is provider
        assert provider.device in ("cpu", "cuda")
        assert provider.session_providers()[-1][0] == "CPUExecutionProvider"
        assert provider.warmup(0) == provider.min_warmup
    assert runtime.get("gpu").key == "cuda" and runtime.get("trt").key == "tensorrt"
    assert runtime.get("cuda").options("HEURISTIC") == {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}


def test_missing_onnxruntime_says_which_extra_to_install(monkeypatch):
    import builtins

    from onnx_tucker.errors import UsageError

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(UsageError, match=r"onnx-tucker\[cpu\]"):
        runtime.onnxruntime()


def test_probe_options_pick_cudnn_heuristics_on_cuda_and_nothing_on_the_cpu():
    from onnx_tucker.providers import probe_options

    assert probe_options("cuda")["cudnn_conv_algo_search"] == "HEURISTIC"
    assert probe_options("gpu") == probe_options("cuda")
    assert probe_options("cpu") == {}


def test_gpu_libraries_are_preloaded_once_per_process(monkeypatch):
    """onnxruntime's preload_dlls looks for every CUDA library again (and 1.31 registers its CUDA plugin again) on each
    call; it ran before every GPU session, ~80 in a ResNet50 budget."""
    from onnx_tucker import providers

    calls = []
    ort = providers.onnxruntime()
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    monkeypatch.setattr(providers, "_preloaded", False)
    monkeypatch.delenv("ONNX_TUCKER_NO_PRELOAD", raising=False)
    for _ in range(3):
        providers.preload_gpu_libraries()
    assert calls == [1]

"""Latency-aware compression: measure each decomposed layer's chain against its original conv.

onnxruntime's profiler (CPU EP) gives per-node kernel times; a layer whose three convs
take longer than the conv they replace is not worth its accuracy loss.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from onnx_tucker.bench import attribute, layer_rows, profile_model, timing_feeds


def slower_layers(original: onnx.ModelProto, compressed: onnx.ModelProto, batch: int = 1, threads: int = 2,
                  runs: int = 20, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """Layer -> (original conv us, chain us) for every decomposed layer measured slower on the CPU EP."""
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-latency-") as folder:
        paths = []
        for name, model in (("original.onnx", original), ("compressed.onnx", compressed)):
            path = Path(folder) / name
            path.write_bytes(model.SerializeToString())
            paths.append(path)
        feeds = timing_feeds(original, batch)
        times = [attribute(profile_model(p, feeds, threads, runs, warmup, folder), m) for p, m in zip(paths, (original, compressed))]
    slow = {}
    for row in layer_rows(original, compressed, times[0], times[1]):
        if row["original_us"] and row["chain_us"] and not row["pays_off"]:
            slow[row["layer"]] = (row["original_us"], row["chain_us"])
    return slow

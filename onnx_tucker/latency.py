"""Whole-model check: each decomposed layer's chain against its original layer inside the two models.

(``--latency-aware`` itself times each layer alone on any provider: ``latency_table``.)

onnxruntime's profiler (CPU EP) gives per-node kernel times; a layer whose chain takes longer than the
layer it replaces is not worth its accuracy loss. One profile is noisy (two runs of the same command
once kept 5 and then 3 of 6 convs), so the pair is profiled in several rounds and a chain is kept only
when it was faster in every round; a layer whose rounds disagree is inside the noise and left whole,
and the table says which it was.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.bench import attribute, layer_rows, profile_model, timing_feeds

ROUNDS = 3  # profiles of each model, alternating
MAX_ROUNDS = 5  # more while some layer's rounds disagree


def decide(rounds: list[tuple[float, float]]) -> str:
    """'faster' when the chain beat the layer in every round, 'slower' when its median time is not lower,
    else 'noise' (the rounds disagree)."""
    ratios = [chain / before for before, chain in rounds if before]
    if not ratios:
        return "faster"
    if all(r < 1 for r in ratios):
        return "faster"
    return "slower" if np.median(ratios) >= 1 else "noise"


def slower_layers(original: onnx.ModelProto, compressed: onnx.ModelProto, batch: int = 1, threads: int = 2,
                  runs: int = 20, warmup: int = 3, rounds: int = ROUNDS, max_rounds: int = MAX_ROUNDS) -> dict[str, tuple]:
    """Layer -> (original us, chain us, "slower" | "noise") for every decomposed layer not measured faster in every
    round on the CPU EP: the layer's median time over the rounds, and that times the median chain/layer ratio."""
    per_layer: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-latency-") as folder:
        paths = []
        for name, model in (("original.onnx", original), ("compressed.onnx", compressed)):
            path = Path(folder) / name
            path.write_bytes(model.SerializeToString())
            paths.append(path)
        feeds = timing_feeds(original, batch)
        done = 0
        while done < rounds or (done < max_rounds and any(decide(r) == "noise" for r in per_layer.values())):
            order = (0, 1) if done % 2 == 0 else (1, 0)  # alternate which model is profiled first
            times = [None, None]
            for i in order:
                times[i] = attribute(profile_model(paths[i], feeds, threads, runs, warmup, folder), (original, compressed)[i])
            for row in layer_rows(original, compressed, times[0], times[1]):
                if row["original_us"] and row["chain_us"]:
                    per_layer.setdefault(row["layer"], []).append((row["original_us"], row["chain_us"]))
            done += 1
    out = {}
    for layer, measured in per_layer.items():
        verdict = decide(measured)
        if verdict != "faster":
            before = float(np.median([b for b, _ in measured]))
            # the verdict is on the median ratio: the chain's time as the layer's times that ratio agrees with it
            # (two separate medians could put a "slower" chain under its layer on a loaded machine)
            chain = before * float(np.median([c / b for b, c in measured if b]))
            out[layer] = (before, chain, verdict)
    return out

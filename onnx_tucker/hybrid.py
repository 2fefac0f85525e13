"""One MAC budget for pruning and rank cuts (``--layers hidden,KIND --target-macs T``).

Pruning first takes the conv MACs to T ** share of the original's (``prune.prune``'s own knapsack over its units),
then the measured budget factors the pruned model, its pruned convs included, down to T of the original's MACs.
Each stage is the tool's own, with its proofs; what is new is the split. ``--prune-share auto`` tries ``SHARES`` and
keeps the model whose class scores move least (KL, as the measured budget's probes) on calibration images, share 0
(rank cuts alone) and 1 (pruning alone) among them: the best share differs by model (ResNet-20 at 2x liked little
pruning, MobileNetV2 much, the small ResNet none; docs/pruning.md).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx

from onnx_tucker.errors import UsageError
from onnx_tucker.factorization import PRUNED_KIND
from onnx_tucker.options import CompressOptions
from onnx_tucker.report import Report

PRUNE_SHARE = 0.5  # the default: pruning and rank cuts each take the square root of T
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # --prune-share auto's candidates: 0 rank cuts alone (the small ResNet pruned
# badly), 1 pruning alone (MobileNetV2 at 5x: -10.7 against -12.5 at 0.75)
AUTO_IMAGES = 512  # calibration images the candidates are compared on (fewer for big inputs: sensitivity.eval_samples)


def prune_and_factor(model: onnx.ModelProto, opts: CompressOptions, rest: tuple, excluded: set, before: dict
                     ) -> tuple[onnx.ModelProto, Report]:
    """Prune to ``target_macs ** prune_share``, then factor the ``rest`` kinds to ``target_macs`` of ``model``'s MACs."""
    if opts.prune_share == "auto":
        return _best_share(model, opts, rest, excluded, before)
    share = PRUNE_SHARE if opts.prune_share is None else opts.prune_share
    return _at_share(model, replace(opts, prune_share=share), rest, excluded, before)


def _at_share(model, opts: CompressOptions, rest: tuple, excluded: set, before: dict, memo: dict | None = None
              ) -> tuple[onnx.ModelProto, Report]:
    from onnx_tucker.pipeline import _compress, _set_metadata, budget_macs, pruned

    layers = ",".join(opts.layers)
    if opts.prune_share == 0:  # rank cuts alone: no pruning pass at all
        new_model, report = _compress(model, replace(opts, layers=rest, prune_share=None), shown=opts)
        report.pruning = {"units": [], "pruned": 0, "macs_saved": 0, "share": 0.0, "pruned_to": 1.0,
                          "factored_to": opts.target_macs}
        report.notes.append(f"--layers {layers} --target-macs {opts.target_macs:g} at share 0: rank cuts alone, nothing pruned")
        return new_model, report
    aim = opts.target_macs ** opts.prune_share
    if opts.prune_share == 1:  # pruning alone: the other kinds left as they are
        pruned_model, pruning = pruned(model, opts, aim, excluded, memo)
        alone = replace(opts, layers=(PRUNED_KIND,), target_macs=None, prune_share=None)
        new_model, report = _compress(pruned_model, alone, pruning=(pruning, before), original=model, shown=opts)
        report.pruning |= {"share": 1.0, "pruned_to": round(_pruned_to(pruning), 6), "factored_to": 1.0}
        report.notes.append(f"--layers {layers} --target-macs {opts.target_macs:g} at share 1: pruning alone, nothing factored")
        _set_metadata(new_model, report)
        return new_model, report
    try:
        pruned_model, pruning = pruned(model, opts, aim, excluded, memo)
    except UsageError as exc:
        if not str(exc).startswith("target MACs"):
            raise
        raise UsageError(f"--layers {layers}: pruning cannot take the conv MACs to {aim:.3f} (--target-macs "
                         f"{opts.target_macs:g} ** share {opts.prune_share:g}): {_reason(exc)}; a smaller --prune-share prunes less") from None
    whole, left = budget_macs(model, opts, rest), budget_macs(pruned_model, opts, rest)
    target = min(1.0, opts.target_macs * whole / max(left, 1))  # what is left of T, in the pruned model's own MACs
    factored = replace(opts, layers=rest, target_macs=target, prune_share=None)
    try:
        new_model, report = _compress(pruned_model, factored, pruning=(pruning, before), original=model, shown=opts)
    except UsageError as exc:
        if not str(exc).startswith("target MACs"):
            raise
        raise UsageError(f"--layers {layers}: pruning left {left / whole:.3f} of the MACs, and the factoring cannot take "
                         f"the pruned model to {target:.3f} of its own ({exc}): a larger --prune-share prunes more") from None
    pruned_to = _pruned_to(pruning)
    report.pruning |= {"share": opts.prune_share, "pruned_to": round(pruned_to, 6), "factored_to": round(target, 6)}
    report.notes.append(f"--layers {layers} --target-macs {opts.target_macs:g}: pruning took the conv MACs to "
                        f"{pruned_to:.3f} (aim {aim:.3f}, share {opts.prune_share:g}), the measured budget the pruned "
                        f"model to {target:.3f} of its own")
    _set_metadata(new_model, report)
    return new_model, report


def _pruned_to(pruning) -> float:
    """The share of the original's conv MACs pruning left (in pruning's own count: convs only, no Gemm)."""
    return 1 - pruning.to_dict()["macs_saved"] / max(1, pruning.conv_macs)


def _failed(exc: Exception) -> str:
    """A share's entry in --prune-share auto's note: out of reach of the target, or nothing to prune at all (a model
    without prunable hidden channels, where only share 0 runs)."""
    from onnx_tucker.errors import ModelError
    from onnx_tucker.prune import NO_UNITS

    return "nothing to prune" if isinstance(exc, ModelError) and NO_UNITS in str(exc) else "cannot reach the target"


def _reason(exc: Exception) -> str:
    """An error's text after its 'target MACs X cannot be met' opening: what stood in the way."""
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


def _best_share(model, opts: CompressOptions, rest: tuple, excluded: set, before: dict) -> tuple[onnx.ModelProto, Report]:
    """Each of ``SHARES`` without distillation, the least KL on calibration images kept (then distilled, if asked)."""
    from onnx_tucker.capture import capture
    from onnx_tucker.errors import ModelError
    from onnx_tucker.sensitivity import _distortion, eval_samples

    started = time.perf_counter()
    feeds = opts.calibration
    n = len(next(iter(feeds.values())))
    pick = np.sort(np.random.default_rng(0).choice(n, eval_samples(feeds, AUTO_IMAGES), replace=False))
    images = {k: np.asarray(v[pick]) for k, v in feeds.items()}
    reference = capture(model, images)  # every output, batch by batch (padded for a fixed batch)
    tried, best, failures = {}, None, {}
    memo = {}  # pruning's statistics and curves: the same for every share
    for share in SHARES:
        try:
            new_model, report = _at_share(model, replace(opts, prune_share=share, distill=None), rest, excluded, before, memo)
        except (UsageError, ModelError) as exc:  # this share cannot reach T (or finds nothing to prune): another may
            tried[share], failures[share] = None, exc
            continue
        tried[share] = sum(_distortion(r, o) for r, o in zip(reference, capture(new_model, images)))
        if best is None or tried[share] < tried[best[0]]:
            best = (share, new_model, report)
    if best is None:
        if all(isinstance(exc, ModelError) for exc in failures.values()):
            raise failures[SHARES[0]]  # the model itself: the same for every share
        raise UsageError(f"--prune-share auto: none of the shares {', '.join(f'{s:g}' for s in SHARES)} reaches --target-macs "
                         f"{opts.target_macs:g} (rank cuts alone: {_reason(failures[SHARES[0]])}; pruning alone: "
                         f"{_reason(failures[SHARES[-1]])})")
    share, new_model, report = best
    if opts.distill is not None:  # the chosen share again (the same model: every stage is seeded), now distilled
        new_model, report = _at_share(model, replace(opts, prune_share=share), rest, excluded, before, memo)
    report.pruning["shares_tried"] = {str(k): v for k, v in tried.items()}
    # the other shares' runs and the comparison: the time line must add up to the run (as the latency feedback's)
    report.timings["share_search"] = round(time.perf_counter() - started - sum(report.timings.values()), 3)
    report.notes.append(f"--prune-share auto: {share:g} (KL of the class scores on {len(pick)} calibration images: "
                        + ", ".join(f"{k:g}: " + (_failed(failures[k]) if v is None else f"{v:.4g}") for k, v in tried.items())
                        + ")")
    return new_model, report

"""Global rank budget: per-layer ranks so that the model's conv MACs meet a target.

Two rules:
- "uniform" (no calibration data): the largest single ratio (the seed's rule; unprofitable
  layers left whole) whose conv MACs meet the target, found by bisection.
- "measured" (with calibration data, the default then): ``sensitivity.distortion_curves``
  measures, for each layer alone and each candidate rank pair, how far the model's output
  moves; a multiple-choice knapsack then picks the ranks with the least summed distortion
  within the budget. On the seed CNN at 5x it leaves the 3-channel first conv whole (the
  uniform ratio squeezed it to one input channel) and spends ranks where the curves say.
  A sensitivity-weighted greedy rule on weight-energy estimates was tried before and lost
  to the uniform ratio (docs/calibration_results_cnn_targets.md); it is gone.
"""
from __future__ import annotations

import numpy as np

from onnx_tucker.errors import UsageError
from onnx_tucker.factorization import get_form, not_worth_it, rounded_ranks


def unreachable_macs(target: float, share: float, rank_multiple: int = 1) -> UsageError:
    # --rank-multiple N makes N the smallest rank: full rank (nothing to save) on layers of N channels or fewer
    hint = (f" (--rank-multiple {rank_multiple} makes {rank_multiple} the smallest rank, full rank for layers of "
            f"{rank_multiple} channels or fewer: try a smaller multiple)") if isinstance(rank_multiple, int) and rank_multiple > 1 else ""
    return UsageError(f"target MACs {target:g} cannot be met: the smallest ranks give {share:.3f} of the original conv MACs{hint}")


def _ratio_ranks(site, ratio: float) -> tuple:
    return get_form(site.form).rule_ranks(site, "ratio", ratio, 1.0)


def uniform_ratio(sites: list, opts, target: float, fixed: int = 0) -> float:
    """The largest single ratio (seed rule, unprofitable layers left whole) meeting the MAC target."""
    total = fixed + sum(s.shape.macs() for s in sites)

    def macs_at(ratio):
        m = fixed
        for s in sites:
            form = get_form(s.form)
            ranks = rounded_ranks(form, s, _ratio_ranks(s, ratio), opts.rank_multiple)
            cost = form.cost(s, ranks)
            m += s.shape.macs() if not_worth_it(s, ranks, cost, total) else cost.macs
        return m

    lo, hi = 1e-3, 1.0
    if macs_at(lo) > target * total:
        raise unreachable_macs(target, macs_at(lo) / total, opts.rank_multiple)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_at(mid) <= target * total else (lo, mid)
    return lo


def allocate_ranks(sites: list, opts, fixed: int = 0) -> dict:
    """Layer name -> rank tuple at the largest uniform ratio meeting ``opts.target_macs``."""
    target = float(opts.target_macs)
    if not 0 < target <= 1:
        raise UsageError(f"target MACs must be a fraction in (0, 1], got {target}")
    base = uniform_ratio(sites, opts, target, fixed)
    return {s.name: _ratio_ranks(s, base) for s in sites}


def check_measured_target(candidates: list, options: dict, opts, fixed: int = 0) -> None:
    """Refuse a MAC target the measured budget's options cannot reach, before any curve is measured
    (a ResNet50 at 224 px used to measure for 8 minutes and then refuse)."""
    target = float(opts.target_macs)
    total = fixed + sum(c.shape.macs() for c in candidates)
    smallest = fixed + sum(min([c.shape.macs()] + [get_form(c.form).cost(c, r).macs for r in options.get(c.name, [])])
                           for c in candidates)
    if smallest > target * total:
        raise unreachable_macs(target, smallest / total, opts.rank_multiple)


BINS = 4000  # resolution of the knapsack (costs round up, or savings down: the target always holds)


def allocate_measured(candidates: list, curves: dict, opts, fixed: int = 0) -> dict:
    """Per-layer ranks with the smallest summed measured distortion whose conv MACs meet the target.

    ``curves``: layer -> [(chain MACs, distortion, ranks, ...)] from
    ``sensitivity.distortion_curves``; leaving a layer whole costs its MACs and no distortion.
    A multiple-choice knapsack solved exactly by dynamic programming over MAC bins.
    """
    target = float(opts.target_macs)
    if not 0 < target <= 1:
        raise UsageError(f"target MACs must be a fraction in (0, 1], got {target}")
    total = fixed + sum(c.shape.macs() for c in candidates)
    budget = target * total - fixed
    smallest = fixed + sum(min([c.shape.macs()] + [entry[0] for entry in curves.get(c.name, [])]) for c in candidates)
    if smallest > target * total:
        raise unreachable_macs(target, smallest / total, opts.rank_multiple)
    options_of = [[(cand.shape.macs(), 0.0, None)] + list(curves.get(cand.name, [])) for cand in candidates]
    picks = _knapsack(options_of, budget)
    if picks is None:
        raise UsageError(f"target MACs {target:g} cannot be met at this budget resolution: try a larger target")
    return {cand.name: options[index][2] for cand, options, index in zip(candidates, options_of, picks)}


def allocate_latency(candidates: list, curves: dict, costs: dict, target: float, whole_us: float,
                     fixed_us: float | None = None) -> tuple[dict, dict]:
    """Per-layer ranks with the smallest summed measured distortion whose predicted latency meets the target.

    The multiple-choice knapsack of :func:`allocate_measured`, spending measured latency instead of MACs.
    ``costs``: layer -> (original us, {ranks: chain us}) from the latency table (``latency_table.option_costs``);
    ``whole_us``: the original model's measured latency. The target is a fraction of the WHOLE model's latency:
    the part outside the candidate layers (``fixed_us``, by default ``whole_us`` minus their summed times) is fixed.
    Options not faster than their original are never chosen. Returns (planned ranks, prediction) where the
    prediction holds ``fixed_us``, ``original_us`` (= whole), ``predicted_us`` and ``predicted_ratio``.
    """
    target = float(target)
    if not 0 < target <= 1:
        raise UsageError(f"target latency must be a fraction in (0, 1], got {target}")
    layer_us = {c.name: costs[c.name][0] for c in candidates}
    fixed = whole_us - sum(layer_us.values()) if fixed_us is None else fixed_us  # may be < 0 (see latency_table.snapshot)
    budget = target * whole_us - fixed
    options_of = {}
    for cand in candidates:
        before, chain = costs[cand.name]
        by_ranks = {tuple(e[2]): e[1] for e in curves.get(cand.name, [])}
        options_of[cand.name] = [(before, 0.0, None)] + [(us, by_ranks[r], r) for r, us in chain.items()
                                                          if r in by_ranks and us < before]
    smallest = fixed + sum(min(us for us, _, _ in options_of[c.name]) for c in candidates)
    if budget <= 0 or smallest > target * whole_us:
        raise UsageError(f"target latency {target:g} cannot be met: the fastest measured options give "
                         f"{smallest / whole_us:.3f} of the model's latency ({smallest / 1e3:.2f} of {whole_us / 1e3:.2f} ms)")
    picks = _knapsack([options_of[c.name] for c in candidates], budget)
    if picks is None:
        raise UsageError(f"target latency {target:g} cannot be met at this budget resolution: try a larger target")
    planned, predicted = {}, fixed
    for cand, index in zip(candidates, picks):
        us, _, ranks = options_of[cand.name][index]
        planned[cand.name] = ranks
        predicted += us
    return planned, {"fixed_us": fixed, "original_us": whole_us, "predicted_us": predicted, "predicted_ratio": predicted / whole_us,
                     "target": target}


def _knapsack(options: list[list[tuple]], budget: float, bins: int = BINS) -> list[int] | None:
    """Multiple-choice knapsack: one option (cost, distortion, ...) per group, summed cost within ``budget``,
    least summed distortion, solved exactly by dynamic programming over bins. Indices, or None.

    Rounding to bins must never break the budget, and it costs resolution where the bins are coarse. Two equivalent
    forms, the finer one used: the options' costs rounded up against the budget (fine for a small budget), or what
    each option saves against its group's dearest one, rounded down, against the saving the budget needs (fine near
    a budget every dearest option fits: at 1.0, where it needs no saving at all, every layer stays whole)."""
    dearest = [max(entry[0] for entry in group) for group in options]
    needed = sum(dearest) - budget
    if needed <= 0:  # no constraint: each group's least distortion
        return [min(range(len(group)), key=lambda i: group[i][1]) for group in options]
    if budget <= needed:
        return _knapsack_costs(options, budget, bins)
    return _knapsack_savings(options, dearest, needed, bins)


def _knapsack_costs(options: list[list[tuple]], budget: float, bins: int) -> list[int] | None:
    """:func:`_knapsack` with costs rounded up to ``budget / bins``."""
    if budget <= 0:
        return None
    unit = budget / bins
    best = np.zeros(bins + 1)
    choices = []
    for group in options:
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1)
        for index, (cost, distortion) in enumerate(entry[:2] for entry in group):
            steps = int(np.ceil(cost / unit - 1e-9))
            if steps > bins:
                continue
            shifted = np.full(bins + 1, np.inf)
            shifted[steps:] = best[: bins + 1 - steps] + distortion
            better = shifted < new
            new[better], pick[better] = shifted[better], index
        best = new
        choices.append((group, pick))
    if not np.isfinite(best[bins]):
        return None
    picks, b = [], bins
    for group, pick in reversed(choices):
        index = int(pick[b])
        picks.append(index)
        b -= int(np.ceil(group[index][0] / unit - 1e-9))
    return picks[::-1]


def _knapsack_savings(options: list[list[tuple]], dearest: list[float], needed: float, bins: int) -> list[int] | None:
    """:func:`_knapsack` with each option's saving against its group's dearest option rounded down to
    ``needed / bins``, against the saving the budget needs (``needed``, > 0)."""
    unit = needed / bins
    best = np.full(bins + 1, np.inf)  # best[b]: least distortion saving at least b bins (b = bins: all it needs)
    best[0] = 0.0
    choices = []
    for group, top in zip(options, dearest):
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1)
        came = np.full(bins + 1, -1)
        for index, (cost, distortion) in enumerate(entry[:2] for entry in group):
            steps = min(int(np.floor((top - cost) / unit + 1e-9)), bins)
            shifted = np.full(bins + 1, np.inf)
            source = np.full(bins + 1, -1)
            shifted[steps:bins] = best[: bins - steps] + distortion
            source[steps:bins] = np.arange(bins - steps)
            tail = bins - steps + int(np.argmin(best[bins - steps:]))  # every b with b + steps >= bins lands on bins
            shifted[bins], source[bins] = best[tail] + distortion, tail
            better = shifted < new
            new[better], pick[better], came[better] = shifted[better], index, source[better]
        best = new
        choices.append((pick, came))
    if not np.isfinite(best[bins]):
        return None
    picks, b = [], bins
    for pick, came in reversed(choices):
        picks.append(int(pick[b]))
        b = int(came[b])
    return picks[::-1]

"""The Factorization protocol and its registry: a low-rank form is one module plus one entry in ``FORMS``.

A form decides which sites it can factor (or why not), which ranks it offers and what they cost, fits
its factors (data-free, or with the input's channel covariance from calibration), composes them for the
sensitivity probes, and emits its nodes into the graph, returning a :class:`~onnx_tucker.chain.Chain`.
The pipeline, the budget, the sensitivity curves, the calibration refits and the report only talk to
forms through this protocol.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from onnx_tucker.errors import UsageError
from onnx_tucker.ranks import Cost

__all__ = ["Cost", "Factorization", "FormChoice", "FORMS", "DEFAULT_FORMS", "get_form", "chooser", "choose_forms", "not_worth_it"]


@runtime_checkable
class Factorization(Protocol):
    name: str  # registry key, stored in the chain and the report
    kinds: tuple[str, ...]  # the site kinds it takes ("conv": kxk, "conv1x1", "dense"), what --layers selects
    ops: tuple[str, ...]  # the ONNX ops whose sites it may take
    roles: tuple[str, ...]  # the chain's nodes, in data-flow order; the last one writes the layer's output
    refits: tuple[str, ...]  # calibration refits it supports: "last" (the last 1x1 conv + bias), "core"

    def eligible(self, site) -> str:
        """'' when this form can factor ``site``, else why not (one line for the table)."""

    def max_ranks(self, site) -> tuple[int, ...]:
        """The largest useful ranks (higher ones cannot improve the fit)."""

    def rule_ranks(self, site, rule: str, ratio: float, energy: float) -> tuple[int, ...]:
        """Ranks from a named rule ("ratio", "energy", "vbmf"), before rounding and clamping."""

    def rank_options(self, site, rank_multiple: int = 1) -> list[tuple[int, ...]]:
        """The profitable rank tuples the measured budget tries."""

    def cost(self, site, ranks: tuple[int, ...]) -> Cost:
        """MACs (batch 1) and parameters of the chain at ``ranks``."""

    def fit(self, site, ranks: tuple[int, ...], *, n_iter_max: int, method: str, input_covariance=None) -> Any:
        """The factors (an object with ``relative_error``)."""

    def compose(self, site, factors, *, upto_last: bool = False) -> np.ndarray:
        """The layer's weight the factors stand for; with ``upto_last`` the map before the last node,
        as (R, C_in * kernel) rows (what the sensitivity probe refits the last factor against)."""

    def constants(self, site, factors, taken: set[str]) -> dict:
        """Role -> onnx-graphsurgeon Constant holding that node's weight."""

    def emit(self, graph, site, constants: dict, taken: set[str]):
        """Replace ``site.node`` in ``graph`` by the chain's nodes; returns the :class:`Chain`."""


def _registry() -> dict[str, Factorization]:
    from onnx_tucker.forms.spatial import SpatialSVDForm
    from onnx_tucker.forms.svd import SVDForm
    from onnx_tucker.forms.tucker2 import Tucker2Form

    return {form.name: form for form in (Tucker2Form(), SVDForm(), SpatialSVDForm())}


FORMS: dict[str, Factorization] = _registry()
# The forms used when none are named: kxk convs only, so that ``--ratio 0.5`` gives the seed's model.
DEFAULT_FORMS: tuple[str, ...] = ("tucker2",)

# ``--layers``: which kinds of layer to factor, and the form each kind gets.
LAYER_KINDS = {"kxk": ("conv", "tucker2"), "1x1": ("conv1x1", "svd"), "dense": ("dense", "svd")}
DEFAULT_LAYERS: tuple[str, ...] = ("kxk",)
PRUNED_KIND = "hidden"  # --layers hidden: inverted residual blocks' hidden channels, pruned (onnx_tucker.prune)


def layer_plan(layers: tuple[str, ...] | None, forms: tuple[str, ...] | None = None) -> tuple[tuple, set | None, set]:
    """(forms, site kinds to factor, ops to list) for ``--layers`` kinds; ``forms`` alone keeps every kind."""
    if layers is None:
        forms = forms or DEFAULT_FORMS
        ops = {op for name in forms for op in get_form(name).ops}
        return forms, None, ops
    unknown = [k for k in layers if k not in LAYER_KINDS and k != PRUNED_KIND]
    if unknown:
        raise UsageError(f"unknown layer kind {unknown[0]!r}: choose from {', '.join(LAYER_KINDS)}, {PRUNED_KIND}")
    layers = tuple(k for k in layers if k != PRUNED_KIND)  # pruned before factoring (onnx_tucker.prune), by no form
    kinds = {LAYER_KINDS[k][0] for k in layers}
    # --forms names the forms of the kinds they take; a kind asked for that no named form takes keeps its default
    # (--layers kxk,1x1 --forms tucker2,spatial: the 1x1 convs by SVD, not left whole as "nothing to factor spatially")
    taken = {kind for name in forms or () for kind in getattr(get_form(name), "kinds", ())}
    forms = tuple(dict.fromkeys(tuple(forms or ()) + tuple(LAYER_KINDS[k][1] for k in layers if LAYER_KINDS[k][0] not in taken)))
    ops = {"Conv"} | ({"Gemm", "MatMul"} if "dense" in layers else set())
    return forms, kinds, ops


# "No gamble for crumbs" (issue 11): a chain that saves less than this share of the model's conv MACs is
# not worth its accuracy risk. 0.1% keeps the seed CNN's last conv (0.19% at ratio 0.5: today's model);
# an image stem of 1-4 channels cut to 1-2 channels loses colour information outright (a MobileNetV2
# stem at R_in = 1 cost 7.6 points of top-1 for 0.4% fewer MACs).
CRUMBS = 0.001
PARAM_SHARE = 0.01  # ... unless it saves at least 1% of the layers' parameters (where --ratio is asked to save them)
TINY_INPUT = 4
TINY_RANK = 2


def not_worth_it(site, ranks: tuple, cost, total_macs: int, total_params: int = 0, by_hand: bool = False) -> str:
    """Why a chain at ``ranks`` is not worth building by default ('' when it is): it saves no MACs,
    a negligible share of the model's (and, when ``total_params`` is given, of its parameters), or
    squeezes a tiny input to one or two channels. Ranks given ``by_hand`` (``--ranks``) are only held to the first:
    the others are the defaults' judgement, and the user asked for these."""
    before = site.shape.macs()
    if cost.macs >= before:
        return f"chain would not reduce MACs ({before:,} -> {cost.macs:,})"
    if by_hand:
        return ""
    if site.shape.c_in <= TINY_INPUT and _input_rank(site, ranks) <= TINY_RANK:
        return f"would cut a {site.shape.c_in}-channel input to rank {_input_rank(site, ranks)} (an image stem): left whole"
    # a dense layer can hold a large share of the parameters for almost no MACs (VGG16's fc2: 12% and 0.08%)
    saves_params = total_params and site.shape.params() - cost.params >= PARAM_SHARE * total_params
    if total_macs and before - cost.macs < CRUMBS * total_macs and not saves_params:
        share = 100 * (before - cost.macs) / total_macs
        return f"chain saves only {share:.3f}% of the model's conv MACs (< {100 * CRUMBS:g}%): left whole"
    return ""


def _input_rank(site, ranks: tuple) -> int:
    """How many input channels' worth the chain keeps, as its form says (Tucker-2: R_in; spatial SVD: K / kh);
    the smallest rank for a form that does not say (SVD: its one rank)."""
    form = get_form(site.form) if site.form else None
    if form is not None and hasattr(form, "resolve"):
        form = form.resolve(site, tuple(ranks))
    own = getattr(form, "input_rank", None)
    return own(site, ranks) if own is not None else min(ranks)


def get_form(name: str) -> Factorization:
    """The registered form ``name``, or for ``"a|b"`` the :class:`FormChoice` of those forms."""
    if "|" in name:
        return _choice(tuple(name.split("|")))
    try:
        return FORMS[name]
    except KeyError:
        raise UsageError(f"unknown factorization {name!r}: choose from {', '.join(FORMS)}") from None


class _Chosen:
    """A sub-form's factors, tagged with the form that made them."""

    def __init__(self, form, factors):
        self.form, self.factors = form, factors
        self.relative_error = factors.relative_error


class _ChosenConstants(dict):
    """A sub-form's constants, tagged with the form that emits them."""

    def __init__(self, form, constants: dict):
        super().__init__(constants)
        self.form = form


class FormChoice:
    """Several forms that take the same layer, offered together to the measured budget: its knapsack then picks
    the form with the ranks, per layer (``--forms tucker2,spatial``). The forms' rank tuples differ in length
    (Tucker-2: ``(R_out, R_in)``, spatial SVD: ``(K,)``), which says whose an option is. The rank limits are
    the first form's; a rule without measurements (``--ratio``, ``energy``, a uniform budget) goes through
    :meth:`choose` (the first form's rule sets the MACs, the least error wins); :meth:`resolve` gives the
    pipeline the form that writes the chain, so chains and reports name the real form."""

    def __init__(self, forms: tuple):
        self.forms = forms
        self.name = "|".join(f.name for f in forms)
        self.ops = forms[0].ops
        self.roles = forms[0].roles
        self.refits = forms[0].refits

    def resolve(self, site, ranks: tuple):
        lengths = [len(f.max_ranks(site)) for f in self.forms]
        return self.forms[lengths.index(len(ranks))] if len(ranks) in lengths else self.forms[0]

    def eligible(self, site) -> str:
        return self.forms[0].eligible(site)

    def max_ranks(self, site):
        return self.forms[0].max_ranks(site)

    def rule_ranks(self, site, rule: str, ratio: float, energy: float):
        return self.forms[0].rule_ranks(site, rule, ratio, energy)

    def choose(self, site, first_ranks: tuple, *, covariance=None, rank_multiple: int = 1, n_iter_max: int = 0,
               method: str = "eig") -> tuple[tuple, dict]:
        """Where a rule without measurements (``--ratio``, ``energy``, a uniform MAC budget) gave the first form's
        ranks: every form takes its largest ranks within their MACs (after ``--rank-multiple`` rounding), and the
        form whose chain leaves the least error writes the layer. The error is the composed weight's,
        input-whitened by the calibration statistics where given (what the fits minimise), else relative to the
        weight. At full rank the first form, unchosen (every form is exact there). Returns (ranks, {form: error})."""
        first = rounded_ranks(self.forms[0], site, first_ranks, rank_multiple)
        budget = self.forms[0].cost(site, first).macs
        if all(r >= m for r, m in zip(first, self.forms[0].max_ranks(site))) or budget >= site.shape.macs():
            return first, {}  # full rank, or a chain no cheaper than the layer (left whole): nothing to choose
        candidates = [(self.forms[0], first)]
        for form in self.forms[1:]:
            ranks = _within(form, site, budget, rank_multiple)
            if ranks is not None:
                candidates.append((form, ranks))
        errors = {form.name: composed_error(form, site, ranks, covariance, n_iter_max=n_iter_max, method=method)
                  for form, ranks in candidates}
        return min(candidates, key=lambda c: errors[c[0].name])[1], errors

    def rank_options(self, site, rank_multiple: int = 1) -> list:
        return [r for f in self.forms for r in f.rank_options(site, rank_multiple)]

    def cost(self, site, ranks):
        return self.resolve(site, ranks).cost(site, ranks)

    def fit(self, site, ranks, **kwargs):
        form = self.resolve(site, ranks)
        return _Chosen(form, form.fit(site, ranks, **kwargs))

    def refit_from_moments(self, site, factors, moments):
        refit = getattr(factors.form, "refit_from_moments", None)
        refitted = factors.factors if refit is None else refit(site, factors.factors, moments)
        return factors if refitted is factors.factors else _Chosen(factors.form, refitted)

    def compose(self, site, factors, *, upto_last: bool = False):
        return factors.form.compose(site, factors.factors, upto_last=upto_last)

    def constants(self, site, factors, taken: set[str]) -> dict:
        return _ChosenConstants(factors.form, factors.form.constants(site, factors.factors, taken))

    def emit(self, graph, site, constants: dict, taken: set[str]):
        return constants.form.emit(graph, site, dict(constants), taken)


def rounded_ranks(form, site, ranks: tuple, multiple: int) -> tuple:
    """``ranks`` as the pipeline writes them: clamped to the form's limits, rounded to ``multiple`` (--rank-multiple)."""
    from onnx_tucker.ranks import round_to_multiple

    return tuple(round_to_multiple(min(r, m), multiple, m) for r, m in zip(ranks, form.max_ranks(site)))


def _within(form, site, macs: float, multiple: int) -> tuple | None:
    """``form``'s largest ranks costing at most ``macs`` once rounded to ``multiple``, or None (the form has no
    such rule, or one multiple already costs more)."""
    if not hasattr(form, "ranks_for_macs"):
        return None
    ranks = form.ranks_for_macs(site, macs)
    for candidate in (rounded_ranks(form, site, ranks, multiple),
                      tuple(min(m, (r // multiple) * multiple) for r, m in zip(ranks, form.max_ranks(site)))):
        if min(candidate) >= 1 and form.cost(site, candidate).macs <= macs:
            return candidate
    return None


def composed_error(form, site, ranks: tuple, covariance=None, *, n_iter_max: int = 0, method: str = "eig") -> float:
    """``form``'s relative error on ``site`` at ``ranks``: ``||(W - W') S^(1/2)|| / ||W S^(1/2)||`` over the input
    channels with their second moment ``S`` (the expected output error for inputs independent across positions),
    or ``||W - W'|| / ||W||`` without it."""
    weight = site.weight.astype(np.float64)
    factors = form.fit(site, ranks, n_iter_max=n_iter_max, method=method, input_covariance=covariance)
    diff = weight - form.compose(site, factors)
    if covariance is None:
        norm = np.linalg.norm(weight)
        return float(np.linalg.norm(diff) / norm) if norm > 0 else 0.0
    # The channels' metric for every form, even where the site has the vertical patches' moment: measured in that, a
    # spatial fit whitened by those patches looked better than Tucker-2 on every layer of the small ResNet at --ratio
    # 0.3, and the model lost 14.6 points against Tucker-2's 10.3; in the channels' metric the choice lost 10.3
    # (Tucker-2's core refit on real patches, which its composed weight does not show, is its strength).
    d, w = (np.moveaxis(a, 1, -1).reshape(-1, weight.shape[1]) for a in (diff, weight))
    total = float(np.sum((w @ covariance) * w))
    return float(np.sqrt(max(float(np.sum((d @ covariance) * d)), 0.0) / total)) if total > 0 else 0.0


_CHOICES: dict[tuple, FormChoice] = {}


def _choice(names: tuple) -> FormChoice:
    if names not in _CHOICES:
        _CHOICES[names] = FormChoice(tuple(get_form(n) for n in names))
    return _CHOICES[names]


def chooser(enabled: tuple[str, ...] | None = None, kinds: set | None = None):
    """``choose(site)``: set a usable site's ``form`` to the enabled form that takes it, or its ``reason``.

    Where several take it and their rank tuples differ in length (Tucker-2 and spatial SVD on a kxk conv), the
    form is their :class:`FormChoice` (``"tucker2|spatial"``); where they do not, the first. ``kinds`` (from ``--layers``) limits which site kinds are factored at all. A site no form takes keeps
    the first form's reason (the table's note) and releases its weight.
    """
    forms = [get_form(n) for n in (enabled or DEFAULT_FORMS)]

    def choose(site) -> None:
        if not site.eligible:
            return
        reasons, takers = [], []
        for form in forms:
            why = form.eligible(site)
            if not why and kinds is not None and site.kind not in kinds:
                why = f"{site.kind} layers are not selected (--layers)"
            if not why:
                takers.append(form)
            else:
                reasons.append(why)
        # several forms take it: a FormChoice where their rank tuples tell them apart, else the first
        distinct = {}
        for form in takers:
            distinct.setdefault(len(form.max_ranks(site)), form)
        if len(distinct) > 1:
            site.form = _choice(tuple(f.name for f in distinct.values())).name
            return
        if takers:
            site.form = takers[0].name
            return
        site.reason = reasons[0] if reasons else "no factorization enabled"
        site.weight = None  # nobody will read it: do not hold it (peak memory)

    return choose


def choose_forms(sites: list, enabled: tuple[str, ...] | None = None) -> None:
    """:func:`chooser` over a list of sites."""
    choose = chooser(enabled)
    for site in sites:
        choose(site)

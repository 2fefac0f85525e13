"""Tucker-2 of a kxk Conv: 1x1 input factor -> kxk core (the original geometry) -> 1x1 output factor (bias).

The math is :func:`onnx_tucker.decompose.tucker2`; this module adapts it to the Factorization protocol
and does the graph surgery (onnx-graphsurgeon) for its nodes.

Two-conv forms (issue 11): when one rank equals its mode's size, that factor is a square matrix a conv
can absorb, so it is folded into the core and the chain has two convs:
- ``R_out = C_out``: ``1x1 -> kxk`` (roles first, core; the core writes the output, with the bias);
- ``R_in = C_in``: ``kxk -> 1x1`` (roles core, last).
Both ranks full keeps all three convs (nothing to gain; it is the exactness check of the whole chain).
The measured budget offers both two-conv shapes next to the three-conv ones (``rank_options``); on GPUs
they were measured faster than three convs on small layers (issue 13).
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_tucker.chain import Chain
from onnx_tucker.decompose import max_ranks, tucker2
from onnx_tucker.errors import UsageError
from onnx_tucker.graph import unique_name
from onnx_tucker.ranks import Cost, energy_ranks, ratio_ranks, round_to_multiple, vbmf_ranks
from onnx_tucker.site import chain_bias

# Rank fractions the measured budget tries for each channel mode.
FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4)
SKEW = 2.0  # largest ratio between the two modes' rank fractions
# The other mode's fractions for the two-conv shapes (one mode whole): fewer, since each option is a
# whole-model probe and, at equal MACs, a two-conv chain has a much smaller rank than a three-conv one.
TWO_CONV_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2)
# Multiply-adds of one option's core refit in the measured budget's probes (projecting the patch moments), above
# which the probe refits the last factor alone: a probe runs for each of a layer's options, the calibration once.
PROBE_CORE_WORK = 4e9


def kxk_conv_reason(site) -> str:
    """'' for an ungrouped conv with a kernel larger than 1x1 (what the kxk forms take), else why not."""
    geometry = site.geometry
    if geometry is None:
        return "dense layer: factored by the SVD form (--layers dense)"
    if geometry.group != 1:
        return f"{site.kind} conv (group={geometry.group}): left alone"
    if geometry.is_pointwise:
        return "1x1 conv: already a channel mixer, nothing to factor spatially"
    return ""


class Tucker2Form:
    name = "tucker2"
    kinds = ("conv",)  # the site kinds it takes (--layers: kxk -> conv, 1x1 -> conv1x1, dense)
    ops = ("Conv",)
    roles = ("first", "core", "last")
    refits = ("core", "last")

    def eligible(self, site) -> str:
        return kxk_conv_reason(site)

    def max_ranks(self, site) -> tuple[int, int]:
        return max_ranks(site.weight.shape)

    def input_rank(self, site, ranks) -> int:
        """R_in: what the image-stem rule compares (R_out = 2 keeps a 3-channel input whole: the rule is not about it)."""
        return ranks[1]

    def rule_ranks(self, site, rule: str, ratio: float, energy: float) -> tuple[int, int]:
        if rule == "ratio":
            return ratio_ranks(site.shape.c_out, site.shape.c_in, ratio)
        if rule == "energy":
            return energy_ranks(site.weight, energy)
        if rule == "vbmf":
            return vbmf_ranks(site.weight)
        raise UsageError(f"unknown rank method {rule!r}: choose ratio, energy or vbmf")

    def ranks_for_macs(self, site, macs: float) -> tuple[int, int]:
        """The largest ``--ratio`` ranks (both modes cut by the same fraction) whose chain costs at most ``macs``
        (at least (1, 1)): bisection on the ratio, whose cost only grows with it."""
        shape, low, high = site.shape, 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if self.cost(site, ratio_ranks(shape.c_out, shape.c_in, mid)).macs <= macs else (low, mid)
        return ratio_ranks(shape.c_out, shape.c_in, low)

    def rank_options(self, site, rank_multiple: int = 1) -> list[tuple[int, int]]:
        """Distinct profitable (R_out, R_in) pairs: channel fractions from ``FRACTIONS`` for each mode,
        the two at most ``SKEW`` apart (measured on the seed CNN: the knapsack then often keeps R_in
        near R_out / 2, and the 5x drop went from -3.3 to -2.6 points against equal fractions); then
        the two-conv shapes, one mode whole and the other at ``TWO_CONV_FRACTIONS``."""
        shape = site.shape
        max_out, max_in = self.max_ranks(site)
        seen = []
        for f_out in FRACTIONS:
            for f_in in FRACTIONS:
                if max(f_out, f_in) > SKEW * min(f_out, f_in) + 1e-9:
                    continue
                r_out = round_to_multiple(min(max(1, round(f_out * shape.c_out)), max_out), rank_multiple, max_out)
                r_in = round_to_multiple(min(max(1, round(f_in * shape.c_in)), max_in), rank_multiple, max_in)
                if (r_out, r_in) not in seen and self.cost(site, (r_out, r_in)).macs < shape.macs():
                    seen.append((r_out, r_in))
        # the two-conv shapes: one mode kept whole, the other at a few fractions
        for f in TWO_CONV_FRACTIONS:
            r_out = round_to_multiple(min(max(1, round(f * shape.c_out)), max_out), rank_multiple, max_out)
            r_in = round_to_multiple(min(max(1, round(f * shape.c_in)), max_in), rank_multiple, max_in)
            for pair in ((shape.c_out, r_in), (r_out, shape.c_in)):
                if pair[0] <= max_out and pair[1] <= max_in and pair not in seen and self.cost(site, pair).macs < shape.macs():
                    seen.append(pair)
        return seen

    @staticmethod
    def folded(site, ranks) -> str | None:
        """Which factor a chain at ``ranks`` folds into its core: "last" (R_out = C_out), "first" (R_in = C_in) or None."""
        r_out, r_in = ranks
        full_out, full_in = r_out == site.shape.c_out, r_in == site.shape.c_in
        if full_out and not full_in:
            return "last"
        if full_in and not full_out:
            return "first"
        return None

    def cost(self, site, ranks) -> Cost:
        r_out, r_in = ranks
        shape = site.shape
        macs, params = shape.chain_macs(r_out, r_in), shape.chain_params(r_out, r_in)
        folded = self.folded(site, ranks)
        out_pixels = math.prod(shape.out_spatial) if shape.known else 1
        in_pixels = math.prod(shape.in_spatial) if shape.known else 1
        if folded == "last":  # no output 1x1; the core maps R_in -> C_out
            return Cost(macs=macs - shape.c_out * r_out * out_pixels, params=params - shape.c_out * r_out)
        if folded == "first":  # no input 1x1; the core reads C_in
            return Cost(macs=macs - r_in * shape.c_in * in_pixels, params=params - r_in * shape.c_in)
        return Cost(macs=macs, params=params)

    def fit(self, site, ranks, *, n_iter_max: int, method: str = "eig", input_covariance=None):
        r_out, r_in = ranks
        return tucker2(site.weight, r_out, r_in, n_iter_max=n_iter_max, method=method, input_covariance=input_covariance)

    def refit_from_moments(self, site, factors, moments):
        """The core refitted on the layer's patch moments given the input factor (the measured budget's probes:
        :func:`calibrate.core_from_moments`), where the calibration would refit the core too (a core before the
        last node, enough rows for its R_in*k*k unknowns) and the projection stays under ``PROBE_CORE_WORK``;
        else the factors as fitted."""
        from dataclasses import replace

        from onnx_tucker import calibrate

        if site.geometry is None or site.geometry.spatial_rank != 2 or self.folded(site, factors.ranks) == "last":
            return factors
        r_out, r_in = factors.ranks
        c_in, taps = site.shape.c_in, math.prod(site.shape.kernel)
        if moments.count < calibrate.MIN_ROWS_PER_UNKNOWN * r_in * taps:
            return factors
        if r_in * (c_in * taps) ** 2 + (r_in * taps) ** 2 * c_in * taps > PROBE_CORE_WORK:
            return factors
        gram, cross = moments.totals()
        core = calibrate.core_from_moments(factors.first, factors.core, factors.last, gram, cross, moments.bias)
        return replace(factors, core=core)

    def compose(self, site, factors, *, upto_last: bool = False) -> np.ndarray:
        # first then core as one (R_out, C_in*k*k) map: the core's output at each position
        # tensordot (BLAS), not einsum: a ResNet50 conv5 option took 1.7 s in einsum's loops, 0.06 s so
        inner = np.moveaxis(np.tensordot(factors.core.astype(np.float64), factors.first.astype(np.float64), axes=(1, 0)), -1, 1)
        inner = inner.reshape(factors.core.shape[0], -1)
        if upto_last and self.folded(site, factors.ranks) != "last":
            return inner
        if upto_last:  # 1x1 -> kxk: the core is the last node, so the map before it is the whole layer
            return factors.last.astype(np.float64) @ inner
        return (factors.last.astype(np.float64) @ inner).reshape(site.weight.shape)

    def constants(self, site, factors, taken: set[str]) -> dict:
        dtype = site.weight.dtype
        nd = site.weight.ndim - 2
        base = site.name
        folded = self.folded(site, factors.ranks)
        core = factors.core.astype(np.float64)
        if folded == "last":  # core' = U_out x core: (C_out, R_in, k...)
            core = np.tensordot(factors.last.astype(np.float64), core, axes=(1, 0))
        elif folded == "first":  # core' = core x U_in^T: (R_out, C_in, k...)
            core = np.moveaxis(np.tensordot(core, factors.first.astype(np.float64), axes=(1, 0)), -1, 1)
        constants = {}
        if folded != "first":
            constants["first"] = gs.Constant(unique_name(f"{base}_tucker_in_W", taken), factors.first.reshape(factors.first.shape + (1,) * nd).astype(dtype))
        constants["core"] = gs.Constant(unique_name(f"{base}_tucker_core_W", taken), core.astype(dtype))
        if folded != "last":
            constants["last"] = gs.Constant(unique_name(f"{base}_tucker_out_W", taken), factors.last.reshape(factors.last.shape + (1,) * nd).astype(dtype))
        return constants

    def emit(self, graph, site, constants: dict, taken: set[str]) -> Chain:
        """Replace ``site.node`` by 1x1 (first) -> core (original strides/pads/dilations) -> 1x1 (last, bias),
        without the roles ``constants`` lacks (the two-conv forms: the bias then goes on the core when it is last).

        The last conv writes the original output tensor, so graph outputs and consumers keep their
        names. ``site.weight`` is released: the graph no longer uses it, and holding every decomposed
        weight until the export added ~0.3x the model file to the peak (issue 5).
        """
        node = site.node
        nd = len(site.shape.kernel)
        base = site.name
        core = constants["core"]
        dtype = core.values.dtype
        ones = [1] * nd
        x = node.inputs[0]
        bias = chain_bias(node, taken)
        core_attrs = {"kernel_shape": list(site.shape.kernel)}
        for attr in ("auto_pad", "pads", "strides", "dilations"):
            if attr in node.attrs:
                core_attrs[attr] = node.attrs[attr]
        specs = {"first": ("tucker_in", {"kernel_shape": ones}), "core": ("tucker_core", core_attrs),
                 "last": ("tucker_out", {"kernel_shape": ones})}
        roles = [r for r in self.roles if r in constants]
        output = node.outputs[0].name
        made, current = {}, x
        for i, role in enumerate(roles):
            suffix, attrs = specs[role]
            is_last = i == len(roles) - 1
            inputs = [current, constants[role]] + ([bias] if is_last and bias is not None else [])
            outputs = list(node.outputs) if is_last else [gs.Variable(unique_name(f"{base}_{suffix}_out", taken), dtype=dtype)]
            made[role] = gs.Node("Conv", unique_name(f"{base}_{suffix}", taken), attrs=attrs, inputs=inputs, outputs=outputs)
            current = outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend(made.values())
        site.weight = None
        r_out = int(core.values.shape[0]) if "last" not in constants else int(constants["last"].values.shape[1])
        r_in = int(core.values.shape[1]) if "first" not in constants else int(constants["first"].values.shape[0])
        return Chain(
            layer=site.name, form=self.name, ranks=(r_out, r_in),
            nodes={role: n.name for role, n in made.items()},
            weights={role: constants[role].name for role in made},
            bias=bias.name if bias is not None else None, input=x.name, output=output,
        )

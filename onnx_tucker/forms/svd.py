"""SVD of a channel mixer: ``C_in -> R -> C_out`` as two nodes of the original op, the bias on the second.

- 1x1 Conv (group 1, 1-D/2-D/3-D): two 1x1 convs; the first carries the original strides and pads (a 1x1
  conv's pads add a zero border; the second conv sees the padded, strided grid).
- Gemm (transA=0; transB, alpha, beta and a bias C kept): ``Gemm(A, P, alpha)`` then ``Gemm(Z, Q, C, beta)``.
- MatMul with a constant 2-D weight on the right (any batch dimensions on the left): two MatMuls.

The second node writes the original output tensor. With calibration statistics the fit is input-whitened:
the SVD of ``W S^(1/2)`` minimises E||(W - W') x||^2. Opt-in (``--layers kxk,1x1,dense``): the default
keeps today's models (kxk convs only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_tucker.chain import Chain
from onnx_tucker.errors import UsageError
from onnx_tucker.graph import unique_name
from onnx_tucker.ranks import Cost, round_to_multiple
from onnx_tucker.site import chain_bias

FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


@dataclass(frozen=True)
class SVDFactors:
    first: np.ndarray  # (R, C_in)
    last: np.ndarray  # (C_out, R)
    relative_error: float


def _matrix(site) -> np.ndarray:
    """The weight as (out, in)."""
    w = site.weight
    if site.op == "Conv":
        return w.reshape(w.shape[0], w.shape[1]).astype(np.float64)
    return (w if site.extra.get("layout") == "NK" else w.T).astype(np.float64)


def stored(site, matrix: np.ndarray) -> np.ndarray:
    """An (out, in) matrix in the site's own weight layout."""
    if site.op == "Conv":
        return matrix.reshape(site.weight.shape if site.weight is not None else matrix.shape + (1,) * 2)
    return matrix if site.extra.get("layout") == "NK" else matrix.T


class SVDForm:
    name = "svd"
    kinds = ("conv1x1", "dense")  # the site kinds it takes (--layers: kxk -> conv, 1x1 -> conv1x1, dense)
    ops = ("Conv", "Gemm", "MatMul")
    roles = ("first", "last")
    refits = ("last",)

    def eligible(self, site) -> str:
        geometry = site.geometry
        if site.op in ("Gemm", "MatMul"):
            return ""
        if geometry.group != 1:
            return f"{site.kind} conv (group={geometry.group}): left alone"
        if not geometry.is_pointwise:
            return "kxk conv: factored by a Tucker form, not by SVD"
        return ""

    def max_ranks(self, site) -> tuple[int]:
        return (min(site.shape.c_out, site.shape.c_in),)

    def rule_ranks(self, site, rule: str, ratio: float, energy: float) -> tuple[int]:
        # --ratio keeps the fraction of the smaller channel count, like Tucker-2 keeps it of each mode;
        # the chain pays once R < C_in*C_out / (C_in + C_out), i.e. below ratio 0.5 for a square layer.
        if rule == "ratio":
            return (max(1, int(round(ratio * min(site.shape.c_out, site.shape.c_in), 9))),)
        if rule == "energy":
            from onnx_tucker.vbmf import energy_rank

            return (energy_rank(np.linalg.svd(_matrix(site), compute_uv=False), energy),)
        raise UsageError(f"rank method {rule!r} is not available for the SVD form: use ratio or energy")

    def rank_options(self, site, rank_multiple: int = 1) -> list[tuple[int]]:
        (limit,) = self.max_ranks(site)
        seen = []
        for f in FRACTIONS:
            r = round_to_multiple(min(max(1, round(f * limit)), limit), rank_multiple, limit)
            if (r,) not in seen and self.cost(site, (r,)).macs < site.shape.macs():
                seen.append((r,))
        return seen

    def cost(self, site, ranks) -> Cost:
        (r,) = ranks
        shape = site.shape
        params = r * (shape.c_in + shape.c_out)
        pixels = math.prod(shape.out_spatial) if shape.known else 1  # as ConvShape.macs
        return Cost(macs=params * pixels, params=params)

    def fit(self, site, ranks, *, n_iter_max: int = 0, method: str = "eig", input_covariance=None) -> SVDFactors:
        from onnx_tucker.decompose import _symmetric_sqrt, memo

        (r,) = ranks
        w = _matrix(site)
        root = inverse_root = None
        if input_covariance is not None:
            root, inverse_root = _symmetric_sqrt(input_covariance)
            w_fit = w @ root
        else:
            w_fit = w
        # one SVD per layer and covariance, whatever the rank (the measured budget asks for dozens)
        # the layout is part of the key (a bool: memo compares by identity): one weight read by a MatMul as (in, out)
        # and by a Gemm with transB as (out, in) took the other's SVD, transposed
        u, s, vt = memo(("svd", site.weight, input_covariance, site.extra.get("layout") == "NK"),
                        lambda: np.linalg.svd(w_fit, full_matrices=False))
        first = s[:r, None] * vt[:r]  # (R, C_in)
        if inverse_root is not None:
            first = first @ inverse_root
        last = u[:, :r]
        norm = np.linalg.norm(w)
        error = float(np.linalg.norm(w - last @ first) / norm) if norm > 0 else 0.0
        return SVDFactors(first=first, last=last, relative_error=error)

    def compose(self, site, factors, *, upto_last: bool = False) -> np.ndarray:
        if upto_last:
            return factors.first.astype(np.float64)
        return stored(site, factors.last @ factors.first)

    def constants(self, site, factors, taken: set[str]) -> dict:
        dtype, nd = site.weight.dtype, site.weight.ndim - 2
        if site.op != "Conv":  # each factor in the original's layout: (in, out), or (out, in) for Gemm transB=1
            nk = site.extra.get("layout") == "NK"
            return {
                "first": gs.Constant(unique_name(f"{site.name}_svd_in_W", taken), (factors.first if nk else factors.first.T).astype(dtype)),
                "last": gs.Constant(unique_name(f"{site.name}_svd_out_W", taken), (factors.last if nk else factors.last.T).astype(dtype)),
            }
        return {
            "first": gs.Constant(unique_name(f"{site.name}_svd_in_W", taken), factors.first.reshape(factors.first.shape + (1,) * nd).astype(dtype)),
            "last": gs.Constant(unique_name(f"{site.name}_svd_out_W", taken), factors.last.reshape(factors.last.shape + (1,) * nd).astype(dtype)),
        }

    def emit(self, graph, site, constants: dict, taken: set[str]) -> Chain:
        if site.op != "Conv":
            return self._emit_dense(graph, site, constants, taken)
        node = site.node
        nd = len(site.shape.kernel)
        first, last = constants["first"], constants["last"]
        x = node.inputs[0]
        bias = chain_bias(node, taken)
        mid = gs.Variable(unique_name(f"{site.name}_svd_mid", taken), dtype=first.values.dtype)
        first_attrs = {"kernel_shape": [1] * nd}
        for attr in ("auto_pad", "pads", "strides", "dilations"):
            if attr in node.attrs:
                first_attrs[attr] = node.attrs[attr]
        output = node.outputs[0].name
        n1 = gs.Node("Conv", unique_name(f"{site.name}_svd_in", taken), attrs=first_attrs, inputs=[x, first], outputs=[mid])
        n2 = gs.Node("Conv", unique_name(f"{site.name}_svd_out", taken), attrs={"kernel_shape": [1] * nd},
                     inputs=[mid, last] + ([bias] if bias is not None else []), outputs=list(node.outputs))
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend([n1, n2])
        site.weight = None
        return Chain(layer=site.name, form=self.name, ranks=(int(first.values.shape[0]),),
                     nodes={"first": n1.name, "last": n2.name}, weights={"first": first.name, "last": last.name},
                     bias=bias.name if bias is not None else None, input=x.name, output=output)

    def _emit_dense(self, graph, site, constants: dict, taken: set[str]) -> Chain:
        node = site.node
        first, last = constants["first"], constants["last"]
        x = node.inputs[0]
        mid = gs.Variable(unique_name(f"{site.name}_svd_mid", taken), dtype=first.values.dtype)
        output = node.outputs[0].name
        bias = None
        if node.op == "Gemm":
            trans_b = int(node.attrs.get("transB", 0))
            bias = chain_bias(node, taken)
            first_attrs = {"transB": trans_b, "alpha": float(node.attrs.get("alpha", 1.0))}
            last_attrs = {"transB": trans_b, "beta": float(node.attrs.get("beta", 1.0))}
            # before opset 11 Gemm's C is required: the first Gemm adds a zero (broadcast from one value)
            no_c = [] if (graph.opset or 11) >= 11 else [gs.Constant(unique_name(f"{site.name}_svd_in_C", taken),
                                                                      np.zeros(1, dtype=first.values.dtype))]
            n1 = gs.Node("Gemm", unique_name(f"{site.name}_svd_in", taken), attrs=first_attrs, inputs=[x, first] + no_c, outputs=[mid])
            n2 = gs.Node("Gemm", unique_name(f"{site.name}_svd_out", taken), attrs=last_attrs,
                         inputs=[mid, last] + ([bias] if bias is not None else []), outputs=list(node.outputs))
        else:
            n1 = gs.Node("MatMul", unique_name(f"{site.name}_svd_in", taken), inputs=[x, first], outputs=[mid])
            n2 = gs.Node("MatMul", unique_name(f"{site.name}_svd_out", taken), inputs=[mid, last], outputs=list(node.outputs))
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend([n1, n2])
        rank = first.values.shape[0] if site.extra.get("layout") == "NK" else first.values.shape[1]
        site.weight = None
        return Chain(layer=site.name, form=self.name, ranks=(int(rank),), nodes={"first": n1.name, "last": n2.name},
                     weights={"first": first.name, "last": last.name}, bias=bias.name if bias is not None else None,
                     input=x.name, output=output, channel_axis=-1)

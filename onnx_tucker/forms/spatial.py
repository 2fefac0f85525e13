"""Spatial SVD of a 2-D kxk Conv: ``kh x 1`` (C_in -> K) then ``1 x kw`` (K -> C_out, with the bias).

Jaderberg, Vedaldi and Zisserman (2014), scheme 2; AIMET calls it spatial SVD. The weight, read as a
``(C_in*kh, C_out*kw)`` matrix ``M[(i, h), (o, w)] = W[o, i, h, w]``, is a rank-K product: the first
conv holds ``V[k, i, h]``, the second ``H[o, k, w]``, and ``W[o, i, h, w] = sum_k H[o, k, w] V[k, i, h]``
exactly, padding and strides included: the first conv takes the vertical pads, strides and dilations,
the second the horizontal ones (a zero column of the padded input gives a zero column of K channels).

Why a second kxk form: at equal MACs it leaves a 3-10x smaller output error than Tucker-2 on every 3x3
layer of the BN-folded CIFAR ResNets (the Tucker core keeps full spatial support at a rank R^2 cost; the
product here keeps rank K across space). Measured in the README ("Spatial SVD").

With calibration statistics the fit is input-whitened: the SVD of ``P^(1/2) M``, P the second moment of the
``kh x 1`` patches the first conv reads (rows (channel, tap), measured in the statistics pass), which minimises
the output error for inputs correlated across channels and down the rows (feature maps are); without P, by
the channels' alone, ``(S^(1/2) (x) I_kh) M``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_tucker.chain import Chain
from onnx_tucker.errors import UsageError
from onnx_tucker.forms.tucker2 import Tucker2Form, kxk_conv_reason
from onnx_tucker.graph import unique_name
from onnx_tucker.ranks import Cost, ratio_ranks, round_to_multiple
from onnx_tucker.site import chain_bias
from onnx_tucker.vbmf import energy_rank

# Shares of the layer's MACs the measured budget tries (K from each): the knapsack's options.
MAC_FRACTIONS = (0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8)
# Multiply-adds of one option's joint refit in the measured budget's probes (its conjugate-gradient solves), above
# which the probe refits the last conv alone: a probe runs for each of a layer's dozen options, the calibration once.
PROBE_JOINT_WORK = 4e9
PROBE_JOINT_ROUNDS = 1  # a probe rates an option: one round of the calibration's two ...
PROBE_CG_ITERATIONS = 5  # ... and a quarter of its conjugate-gradient steps (ResNet-20: the same mean layer error as 10)


class SpatialFactors:
    def __init__(self, first: np.ndarray, last: np.ndarray, relative_error: float):
        self.first = first  # V: (K, C_in, kh)
        self.last = last  # H: (C_out, K, kw)
        self.relative_error = relative_error

    @property
    def ranks(self) -> tuple[int]:
        return (int(self.first.shape[0]),)


def _matrix(weight: np.ndarray) -> np.ndarray:
    """(C_in*kh, C_out*kw): rows (i, h), columns (o, w)."""
    o, i, kh, kw = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def _composed(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """``sum_k H[o,k,w] V[k,i,h]`` as an OIHW weight. tensordot (BLAS), not einsum: a ResNet50 conv5 option
    took 4.7 s in einsum's loops, 0.05 s so."""
    return np.tensordot(first, last, axes=(0, 1)).transpose(2, 0, 1, 3)


class SpatialSVDForm:
    name = "spatial"
    kinds = ("conv",)  # the site kinds it takes (--layers: kxk -> conv, 1x1 -> conv1x1, dense)
    ops = ("Conv",)
    roles = ("first", "last")
    refits = ("last",)

    def eligible(self, site) -> str:
        why = kxk_conv_reason(site)
        if why:
            return why
        geometry = site.geometry
        if geometry.spatial_rank != 2:
            return f"{geometry.spatial_rank}-D conv: spatial SVD splits 2-D kernels only"
        if 1 in geometry.kernel:
            return f"{'x'.join(map(str, geometry.kernel))} kernel: already one-dimensional"
        if geometry.pads is None:
            return "padding unknown (auto_pad SAME with an unknown input size)"
        return ""

    def max_ranks(self, site) -> tuple[int]:
        kh, kw = site.shape.kernel
        return (min(site.shape.c_in * kh, site.shape.c_out * kw),)

    def input_rank(self, site, ranks) -> int:
        """K in input channels' worth (K / kh, rounded up): what the image-stem rule compares (a 3-channel stem
        at K = 3 kept one channel's worth and lost 0.34 of its output, ResNet-56 at --ratio 0.5)."""
        return -(-ranks[0] // site.shape.kernel[0])

    def _macs_per_rank(self, site) -> tuple[int, int]:
        """(MACs, parameters) each unit of K costs."""
        shape = site.shape
        kh, kw = shape.kernel
        if shape.known:
            h_out, w_out = shape.out_spatial
            mid = h_out * shape.in_spatial[1]  # the first conv keeps the input's width
            per_macs = shape.c_in * kh * mid + shape.c_out * kw * h_out * w_out
        else:
            per_macs = shape.c_in * kh + shape.c_out * kw
        return per_macs, shape.c_in * kh + shape.c_out * kw

    def cost(self, site, ranks) -> Cost:
        (k,) = ranks
        per_macs, per_params = self._macs_per_rank(site)
        return Cost(macs=k * per_macs, params=k * per_params)

    def _rank_for_macs(self, site, macs: float) -> int:
        return max(1, min(int(macs // self._macs_per_rank(site)[0]), self.max_ranks(site)[0]))

    def ranks_for_macs(self, site, macs: float) -> tuple[int]:
        """The largest K whose chain costs at most ``macs`` (at least 1)."""
        return (self._rank_for_macs(site, macs),)

    def rule_ranks(self, site, rule: str, ratio: float, energy: float) -> tuple[int]:
        if rule == "ratio":
            # --ratio is a rank ratio for Tucker-2 ("halve every rank"); here it buys the same MACs,
            # so --ratio 0.5 costs the same with either form and the two compare at equal cost. At 1.0 it is
            # full rank, as for Tucker-2: --ratio 1.0 --force reproduces the model with either form.
            if ratio >= 1.0:
                return self.max_ranks(site)
            return (self._rank_for_macs(site, Tucker2Form().cost(site, ratio_ranks(site.shape.c_out, site.shape.c_in, ratio)).macs),)
        if rule == "energy":
            return (energy_rank(np.linalg.svd(_matrix(site.weight.astype(np.float64)), compute_uv=False), energy),)
        raise UsageError(f"rank method {rule!r} is not available for the spatial form: use ratio or energy")

    def rank_options(self, site, rank_multiple: int = 1) -> list[tuple[int]]:
        (limit,) = self.max_ranks(site)
        seen = []
        for f in MAC_FRACTIONS:
            k = round_to_multiple(self._rank_for_macs(site, f * site.shape.macs()), rank_multiple, limit)
            if (k,) not in seen and self.cost(site, (k,)).macs < site.shape.macs():
                seen.append((k,))
        return seen

    def patch_statistic(self, site) -> tuple[int, int, int, int, int]:
        """The vertical geometry (kh, stride, dilation, top pad, bottom pad) of the patches the first conv reads:
        with calibration the pipeline measures their second moment (``calibrate.input_covariances(vertical=)``)
        and leaves it in ``site.extra["patch_covariance"]`` for :meth:`fit`."""
        geometry = site.geometry
        top, _, bottom, _ = geometry.pads
        return geometry.kernel[0], geometry.strides[0], geometry.dilations[0], top, bottom

    def fit(self, site, ranks, *, n_iter_max: int = 0, method: str = "eig", input_covariance=None) -> SpatialFactors:
        """The rank-K SVD of the weight matrix, input-whitened where calibration statistics are given: by the second
        moment of the vertical patches the first conv reads where the site has it (neighbouring rows are strongly
        correlated in feature maps: 10 % less output error after the refit than by the channels' alone, small
        ResNet at --ratio 0.5), else by the channels' (S (x) I_kh)."""
        from onnx_tucker.decompose import _symmetric_sqrt, memo

        (k,) = ranks
        w = site.weight.astype(np.float64)
        c_out, c_in, kh, kw = w.shape
        patch = site.extra.get("patch_covariance") if input_covariance is not None else None
        statistic, inverse_root = (patch if patch is not None else input_covariance), None
        if patch is not None:
            root, inverse_root = _symmetric_sqrt(patch)
            fitted = root @ _matrix(w)  # rows (channel, tap), as the patches'
        elif input_covariance is not None:
            root, inverse_root = _symmetric_sqrt(input_covariance)
            fitted = _matrix(np.tensordot(root, w, axes=(1, 1)).transpose(1, 0, 2, 3))  # S^(1/2) on the input channels
        else:
            fitted = _matrix(w)
        # one SVD per layer and covariance, whatever the rank (the measured budget asks for a dozen)
        u, s, vt = memo(("spatial", site.weight, statistic), lambda: np.linalg.svd(fitted, full_matrices=False))
        first = (u[:, :k] * s[:k]).T.reshape(k, c_in, kh)
        if patch is not None:
            first = (inverse_root @ (u[:, :k] * s[:k])).T.reshape(k, c_in, kh)
        elif inverse_root is not None:
            first = np.tensordot(first, inverse_root, axes=(1, 0)).transpose(0, 2, 1)
        last = vt[:k].reshape(k, c_out, kw).transpose(1, 0, 2)
        norm = np.linalg.norm(w)
        composed = _composed(first, last)
        error = float(np.linalg.norm(w - composed) / norm) if norm > 0 else 0.0
        return SpatialFactors(first=first, last=last, relative_error=error)

    def refit_from_moments(self, site, factors: SpatialFactors, moments) -> SpatialFactors:
        """The first conv refitted with the last on the layer's patch moments (the measured budget's probes:
        :func:`calibrate.spatial_first_from_moments`), where the calibration's joint refit would refit it too (its
        rows guard) and the solves stay under ``PROBE_JOINT_WORK``; else the factors as fitted."""
        from onnx_tucker import calibrate

        k, c_in, kh = factors.first.shape
        c_out, _, kw = factors.last.shape
        d = c_in * kh
        if moments.count < calibrate.MIN_ROWS_PER_UNKNOWN * max(k * kw + 1, -(-k * d // c_out)):
            return factors
        if PROBE_JOINT_ROUNDS * PROBE_CG_ITERATIONS * k * (d * kw) ** 2 > PROBE_JOINT_WORK:
            return factors
        gram, cross = moments.totals()
        first = calibrate.spatial_first_from_moments(factors.first, factors.last, gram, cross, moments.bias,
                                                     rounds=PROBE_JOINT_ROUNDS, iterations=PROBE_CG_ITERATIONS)
        return SpatialFactors(first=first, last=factors.last, relative_error=factors.relative_error)

    def compose(self, site, factors, *, upto_last: bool = False) -> np.ndarray:
        first = factors.first.astype(np.float64)
        if upto_last:
            # the last conv's unknowns are H[o, (k, w)]: the map from a kxk input patch (i, h, w) to the
            # first conv's K outputs at each of the kw columns the last conv reads
            k, c_in, kh = first.shape
            kw = site.shape.kernel[1]
            return np.einsum("kih,wv->kwihv", first, np.eye(kw)).reshape(k * kw, c_in * kh * kw)
        return _composed(first, factors.last.astype(np.float64))

    def constants(self, site, factors, taken: set[str]) -> dict:
        dtype = site.weight.dtype
        return {
            "first": gs.Constant(unique_name(f"{site.name}_spatial_v_W", taken), factors.first[..., None].astype(dtype)),
            "last": gs.Constant(unique_name(f"{site.name}_spatial_h_W", taken), factors.last[:, :, None, :].astype(dtype)),
        }

    def emit(self, graph, site, constants: dict, taken: set[str]) -> Chain:
        """Replace ``site.node`` by ``kh x 1`` (vertical pads, strides, dilations) -> ``1 x kw`` (horizontal
        ones, the bias). The second conv writes the original output tensor."""
        node = site.node
        geometry = site.geometry
        (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
        top, left, bottom, right = geometry.pads
        first, last = constants["first"], constants["last"]
        x = node.inputs[0]
        bias = chain_bias(node, taken)
        mid = gs.Variable(unique_name(f"{site.name}_spatial_mid", taken), dtype=first.values.dtype)
        # SAME_* pads each axis from its own kernel, stride and input size, so each conv of the chain keeps the mode
        # and pads its axis as the original did at ANY input size (explicit pads hold for the size they came from)
        auto = node.attrs.get("auto_pad")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        same = auto in ("SAME_UPPER", "SAME_LOWER")
        v_pads = {"auto_pad": auto} if same else {"pads": [top, 0, bottom, 0]}
        h_pads = {"auto_pad": auto} if same else {"pads": [0, left, 0, right]}
        n1 = gs.Node("Conv", unique_name(f"{site.name}_spatial_v", taken), inputs=[x, first], outputs=[mid],
                     attrs={"kernel_shape": [kh, 1], "strides": [sh, 1], **v_pads, "dilations": [dh, 1]})
        n2 = gs.Node("Conv", unique_name(f"{site.name}_spatial_h", taken), inputs=[mid, last] + ([bias] if bias is not None else []),
                     outputs=list(node.outputs),
                     attrs={"kernel_shape": [1, kw], "strides": [1, sw], **h_pads, "dilations": [1, dw]})
        output = node.outputs[0].name
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend([n1, n2])
        site.weight = None
        return Chain(layer=site.name, form=self.name, ranks=(int(first.values.shape[0]),),
                     nodes={"first": n1.name, "last": n2.name}, weights={"first": first.name, "last": last.name},
                     bias=bias.name if bias is not None else None, input=x.name, output=output)

    @staticmethod
    def layout(site, chain) -> str:
        kh, kw = site.shape.kernel
        return f"{kh}x1 -> 1x{kw}"

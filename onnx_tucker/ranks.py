"""Rank rules and the MAC cost model: pure functions, no graph (spectral math lives in ``vbmf``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from onnx_tucker.errors import UsageError


def ratio_ranks(c_out: int, c_in: int, ratio: float) -> tuple[int, int]:
    """The seed's rule: R_out = max(1, int(ratio*C_out)), R_in = max(1, int(ratio*C_in))."""
    # round() first guards against 0.7*10 = 6.999... truncating to 6.
    return max(1, int(round(ratio * c_out, 9))), max(1, int(round(ratio * c_in, 9)))


def energy_ranks(weight, energy: float) -> tuple[int, int]:
    """Smallest (R_out, R_in) keeping ``energy`` of each channel unfolding's squared singular values.

    Mode 0 is the C_out x (C_in*k...) unfolding, mode 1 the C_in x (C_out*k...) one; each rank is
    at least 1 and at most the unfolding's numeric rank.
    """
    from onnx_tucker.vbmf import energy_rank

    energy = check_energy(energy)
    return tuple(_clamped(weight, mode, lambda s, shape: energy_rank(s, energy)) for mode in (0, 1))


def vbmf_ranks(weight) -> tuple[int, int]:
    """(R_out, R_in) from empirical variational Bayesian matrix factorisation of each unfolding.

    The rank estimate of Kim et al. 2016 (EVBMF, Nakajima et al. 2013; see ``onnx_tucker.vbmf``),
    at least 1 and at most the unfolding's numeric rank.
    """
    from onnx_tucker.vbmf import evbmf_rank_from_spectrum

    return tuple(_clamped(weight, mode, evbmf_rank_from_spectrum) for mode in (0, 1))


def check_energy(energy) -> float:
    if isinstance(energy, bool):  # True is 1.0 to float(): refused, as ratio=True and target_macs=True are
        raise UsageError(f"energy must be a number in (0, 1], got {energy!r}")
    try:
        value = float(energy)
    except (TypeError, ValueError):
        raise UsageError(f"energy must be a number in (0, 1], got {energy!r}") from None
    if not (0.0 < value <= 1.0):
        raise UsageError(f"energy must be in (0, 1], got {energy}")
    return value


def _clamped(weight, mode: int, rule) -> int:
    """``rule(singular values, unfolding shape)`` for one channel mode, clamped to [1, numeric rank]."""
    from onnx_tucker.vbmf import numeric_rank, unfolding_spectrum

    shape = (weight.shape[mode], weight.size // weight.shape[mode])
    s = unfolding_spectrum(weight, mode)
    return max(1, min(int(rule(s, shape)), numeric_rank(s, shape)))


RANKS_SYNTAX = "NAME=R (spatial SVD's K, an SVD's R) or NAME=R_out,R_in (Tucker-2), ranks whole numbers >= 1"


def parse_rank_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NAME=R_out,R_in"`` (or ``"NAME=K"``; NAME may be a 0-based layer index) -> (NAME, ranks). The last
    ``=`` splits, so a layer name may itself hold one."""
    name, sep, values = str(text).rpartition("=")
    if not sep or not name.strip():
        raise UsageError(f"--ranks {text!r}: expected {RANKS_SYNTAX}")
    return name.strip(), _rank_tuple(values.split(","), f"--ranks {text!r}")


def normalize_ranks(ranks) -> dict[str, tuple[int, ...]]:
    """The API's ``ranks``: ``{layer name or index: rank, or tuple of ranks}`` -> ``{str: tuple of ints}``."""
    if not isinstance(ranks, dict):
        raise UsageError(f"ranks must be a dict {{layer name: ranks}}, got {type(ranks).__name__}")
    out = {}
    for key, value in ranks.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        out[str(key)] = _rank_tuple(values, f"ranks[{key!r}]")
    return out


def _rank_tuple(values: list, what: str) -> tuple[int, ...]:
    ranks = []
    for v in values:
        try:
            r = int(str(v).strip())
        except ValueError:
            raise UsageError(f"{what}: expected {RANKS_SYNTAX}") from None
        if r < 1:  # int("2.5") already failed above: no fractional ranks
            raise UsageError(f"{what}: expected {RANKS_SYNTAX}")
        ranks.append(r)
    if not 1 <= len(ranks) <= 2:
        raise UsageError(f"{what}: expected {RANKS_SYNTAX}")
    return tuple(ranks)


def round_to_multiple(rank: int, multiple: int, limit: int) -> int:
    """Round ``rank`` to the nearest multiple of ``multiple`` (at least one multiple), capped at ``limit``."""
    if multiple <= 1:
        return min(rank, limit)
    rounded = max(multiple, int(math.floor(rank / multiple + 0.5)) * multiple)
    return min(rounded, limit)


@dataclass(frozen=True)
class Cost:
    """What a factorization's chain costs at some ranks: MACs at batch 1 and parameters."""

    macs: int
    params: int


@dataclass(frozen=True)
class ConvShape:
    """What the cost model needs of one Conv (batch 1). Spatial sizes are None when unknown."""

    c_out: int
    c_in: int
    kernel: tuple[int, ...]
    group: int = 1
    in_spatial: tuple[int, ...] | None = None
    out_spatial: tuple[int, ...] | None = None

    @property
    def known(self) -> bool:
        return self.in_spatial is not None and self.out_spatial is not None

    def params(self) -> int:
        return self.c_out * (self.c_in // self.group) * math.prod(self.kernel)

    def macs(self) -> int:
        """Multiply-accumulates of the original conv; falls back to params (one output pixel) if unknown. Both sizes
        must be known, as for the chains' costs: a declared output size after an unknown input (a graph output after a
        Loop) would otherwise weigh the layer in MACs and its chain in parameters."""
        pixels = math.prod(self.out_spatial) if self.known else 1
        return self.params() * pixels

    def chain_params(self, rank_out: int, rank_in: int) -> int:
        return rank_in * self.c_in + rank_out * rank_in * math.prod(self.kernel) + self.c_out * rank_out

    def chain_macs(self, rank_out: int, rank_in: int) -> int:
        """MACs of 1x1 (at input resolution) -> kxk core -> 1x1 (at output resolution)."""
        if not self.known:
            return self.chain_params(rank_out, rank_in)
        in_pixels, out_pixels = math.prod(self.in_spatial), math.prod(self.out_spatial)
        return (
            rank_in * self.c_in * in_pixels
            + rank_out * rank_in * math.prod(self.kernel) * out_pixels
            + self.c_out * rank_out * out_pixels
        )

"""Spectra of a conv weight's channel unfoldings and the EVBMF rank estimate: pure numpy/scipy math.

EVBMF is the empirical variational Bayesian matrix factorisation of Nakajima et al. (JMLR 2013,
"Global analytic solution of fully-observed variational Bayesian matrix factorization", and NIPS 2012,
"Perfect dimensionality recovery by variational Bayesian PCA"). With the noise variance sigma^2
estimated by minimising the free energy, the solution keeps exactly the singular values above
``sqrt(M * sigma^2 * (1 + tau_bar) * (1 + alpha / tau_bar))`` (alpha = L/M, tau_bar = 2.5129 sqrt(alpha)),
so the rank estimate needs only the singular values. Kim et al. 2016 ("Compression of deep CNNs for
fast and low power mobile applications") use it on the mode-0 and mode-1 unfoldings of each conv.
Written from the papers, checked against the widely used Python port (``VBMF.EVBMF``).
"""
from __future__ import annotations

import numpy as np

# Nakajima et al. 2012: tau_bar = 2.5129 * sqrt(alpha) (the numeric solution of their eq. (14)).
TAU_BAR_COEFF = 2.5129


def unfolding_spectrum(weight, mode: int) -> np.ndarray:
    """Singular values (descending, float64) of the mode-``mode`` unfolding of an OIHW weight."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"expected a weight with at least 2 dimensions, got shape {w.shape}")
    matrix = np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)
    return np.linalg.svd(matrix, compute_uv=False)


def numeric_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """numpy.linalg.matrix_rank's tolerance applied to given singular values."""
    if s.size == 0 or s[0] == 0:
        return 0
    return int(np.sum(s > s[0] * max(shape) * np.finfo(np.float64).eps))


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest k with sum(s[:k]^2) >= energy * sum(s^2) (at least 1)."""
    power = np.asarray(s, np.float64) ** 2
    total = float(power.sum())
    if total <= 0:
        return 1
    kept = np.cumsum(power) / total
    # a relative slack of 1e-12 so that energy=1.0 is not defeated by rounding in the cumulative sum
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s)))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """EVBMF free energy (up to constants) as a function of the noise variance (Nakajima 2013)."""
    alpha = L / M
    x = np.maximum(s**2 / (M * sigma2), 1e-300)
    big, small = x[x > xubar], x[x <= xubar]
    tau = _tau(big, alpha)
    return float(
        np.sum(small - np.log(small))
        + np.sum(big - tau)
        + np.sum(np.log((tau + 1) / big))
        + alpha * np.sum(np.log(tau / alpha + 1))
        + residual / (M * sigma2)
        + (L - len(s)) * np.log(sigma2)
    )


def evbmf_rank_from_spectrum(s: np.ndarray, shape: tuple[int, int]) -> int:
    """EVBMF rank of an L x M matrix (any orientation) with singular values ``s``; may be 0."""
    from scipy.optimize import minimize_scalar

    L, M = sorted(int(d) for d in shape)
    s = np.sort(np.asarray(s, np.float64))[::-1][:L]
    if L == 0 or s.size == 0 or s[0] <= 0:
        return 0
    H = len(s)
    alpha = L / M
    tau_bar = TAU_BAR_COEFF * np.sqrt(alpha)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # all L singular values are used (H == L)
    first_noise = int(min(np.ceil(L / (1 + alpha)) - 1, H))  # index of the first value assumed noise
    upper = (float(np.sum(s**2)) + residual) / (L * M)
    lower = max(s[first_noise] ** 2 / (M * xubar), float(np.mean(s[first_noise:] ** 2)) / M)
    if not lower > 0:
        lower = upper * 1e-12  # an exactly low-rank matrix: no noise left to estimate
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = float(
            minimize_scalar(_free_energy, args=(L, M, s, residual, xubar), bounds=(lower, upper), method="bounded").x
        )
    threshold = np.sqrt(M * sigma2 * xubar)
    return int(np.sum(s > threshold))


def evbmf_rank(matrix) -> int:
    """EVBMF rank estimate of a 2-D matrix."""
    matrix = np.asarray(matrix, np.float64)
    return evbmf_rank_from_spectrum(np.linalg.svd(matrix, compute_uv=False), matrix.shape)

"""Tucker-2 decomposition of a convolution weight: pure numpy/tensorly math.

An ONNX Conv weight is OIHW (out, in, spatial...), so the channel modes are
0 (out) and 1 (in); Keras's HWIO layout never reaches this module.
``W ~= core x_0 U_out x_1 U_in`` becomes three convolutions:
``first`` (R_in, C_in) = U_in^T as a 1x1 conv, ``core`` (R_out, R_in, k...) as the
kxk conv, and ``last`` (C_out, R_out) = U_out as a 1x1 conv.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import tensorly as tl
from tensorly.decomposition import partial_tucker

# HOOI iterations after the SVD initialisation; measured enough to converge (issue 5).
DEFAULT_ITERATIONS = 10


@dataclass(frozen=True)
class Tucker2:
    first: np.ndarray  # (R_in, C_in)
    core: np.ndarray  # (R_out, R_in, *kernel)
    last: np.ndarray  # (C_out, R_out)
    relative_error: float  # ||W - W'|| / ||W||

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.shape[0], self.core.shape[1]

    def reconstruct(self) -> np.ndarray:
        return reconstruct(self.first, self.core, self.last)


def max_ranks(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """The largest useful (R_out, R_in): the ranks of the two channel unfoldings can be no larger."""
    c_out, c_in, *kernel = weight_shape
    k = int(np.prod(kernel)) if kernel else 1
    return min(c_out, c_in * k), min(c_in, c_out * k)


def reconstruct(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    """W' = core x_0 last x_1 first^T, in OIHW."""
    w = np.tensordot(last, core, axes=(1, 0))  # (C_out, R_in, k...)
    w = np.tensordot(w, first, axes=(1, 0))  # (C_out, k..., C_in)
    return np.moveaxis(w, -1, 1)


def _top_eigenvectors(gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading ``rank`` eigenpairs (values descending) of a symmetric PSD matrix, signs fixed for determinism."""
    n = gram.shape[0]
    if gram.dtype == np.float32 and n > 64:
        # LAPACK's float32 divide-and-conquer: about 2x faster than numpy's eigh at n = 512 (measured, issue 5).
        values, vectors = scipy.linalg.eigh(gram, driver="evd", check_finite=False, overwrite_a=True)
    else:
        values, vectors = np.linalg.eigh(gram)
    top = vectors[:, ::-1][:, :rank]
    signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(rank)])
    signs[signs == 0] = 1.0
    return top * signs, values[::-1][:rank]


def _gram(m: np.ndarray) -> np.ndarray:
    """m @ m.T for a 2-D matrix (numpy uses SYRK for this pattern)."""
    return m @ m.T


# tensorly's ``partial_tucker`` tolerance (its default): it stops at the first iteration from its
# third on whose relative error changed by less than this. Our fits stop one iteration after that
# point (same iteration and start, errors fall monotonically): at equal or lower error (issue 5).
DEFAULT_TOL = 1e-4
TENSORLY_FIRST_CHECK = 3  # partial_tucker compares errors from its third iteration on
# The float32 estimate of the error change is trusted to this much: a change within it of the
# tolerance is taken as "tensorly goes on", so float32 rounding can only add iterations.
STOP_MARGIN = 2e-6
# float32 is used for the iterations when no fit can get the error below this (from the input
# mode's spectrum): float32 rounding (~1e-7 relative) is then negligible; near-exact low-rank
# weights stay in float64.
FLOAT32_MIN_ERROR = 1e-2


def hooi(weight: np.ndarray, rank_out: int, rank_in: int, n_iter_max: int, tol: float = DEFAULT_TOL):
    """HOSVD-initialised HOOI on modes 0 and 1, via eigendecompositions of small Gram matrices.

    The same iteration as tensorly's ``partial_tucker(init='svd')`` (output mode first), but each
    factor comes from a C x C Gram matrix instead of an SVD of the C x (C'k^2) unfolding, the error
    comes from the eigenvalues for free, and large lossy fits iterate in float32 (issue 5).
    It stops one iteration after the point where ``partial_tucker`` with ``tol`` would stop.
    A mode at full rank needs no iterations: its factor is the identity and the other
    mode's HOSVD factor is then optimal (and exact in float64).
    Returns (core, u_out, u_in), in float64 with orthonormal factors.
    """
    core, u_out, u_in, _ = _hooi(weight, rank_out, rank_in, n_iter_max, tol)
    return core, u_out, u_in


def _hooi(weight: np.ndarray, rank_out: int, rank_in: int, n_iter_max: int, tol: float = DEFAULT_TOL):
    """:func:`hooi` plus the relative error when it comes for free (lossy float32 fits), else None."""
    c_out, c_in = weight.shape[:2]
    full_out, full_in = rank_out >= c_out, rank_in >= c_in
    if not (full_out or full_in) and n_iter_max >= 1:
        fit = _hooi_iterations(weight.reshape(c_out, c_in, -1), rank_out, rank_in, n_iter_max, tol)
        if fit is not None:
            core, u_out, u_in, error = fit
            return core.reshape((rank_out, rank_in) + weight.shape[2:]), u_out, u_in, error
    w = np.ascontiguousarray(weight.reshape(c_out, c_in, -1), dtype=np.float64)
    if full_out and full_in:
        u_out, u_in = np.eye(c_out), np.eye(c_in)
    elif full_out:
        u_out = np.eye(c_out)
        u_in, _ = _top_eigenvectors(_gram(np.moveaxis(w, 1, 0).reshape(c_in, -1)), rank_in)
    elif full_in:
        u_in = np.eye(c_in)
        u_out, _ = _top_eigenvectors(_gram(w.reshape(c_out, -1)), rank_out)
    else:  # HOSVD only (n_iter_max = 0) or near-exact weights: float64 throughout
        u_out, u_in = _float64_iterations(w, rank_out, rank_in, n_iter_max, tol)
    core = np.tensordot(np.tensordot(u_out.T, w, axes=(1, 0)), u_in, axes=(1, 0))  # (R_out, K, R_in)
    core = np.moveaxis(core, -1, 1).reshape((rank_out, rank_in) + weight.shape[2:])
    return core, u_out, u_in, None


def _sum_of_squares(m: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", m, m, dtype=np.float64))  # float64 sum, no float64 copy


def _hooi_iterations(w: np.ndarray, rank_out: int, rank_in: int, n_iter_max: int, tol: float):
    """The lossy case in float32: (core (R_out, R_in, K), u_out, u_in, error), or None when the
    weight can be fitted so closely that float32 would limit the error (then float64 is used).

    W is held once, as (C_in, K, C_out) rows, so that each projection is one matrix product whose
    result already is (or is the transpose of) the unfolding whose Gram is needed: no transposed
    copies inside the loop (numpy computes ``a @ a.T`` and ``a.T @ a`` with SYRK).
    """
    c_out, c_in, k = w.shape
    w_iko = np.ascontiguousarray(np.transpose(w, (1, 2, 0)), dtype=np.float32)  # (C_in, K, C_out)
    norm2 = _sum_of_squares(w_iko.reshape(c_in, -1))
    if norm2 == 0.0:
        return None
    w_in = w_iko.reshape(c_in, k * c_out)  # mode-1 unfolding (column order k, c_out)
    # HOSVD start (tensorly's init='svd'): only the input factor is used, the first sweep replaces the output one.
    u_in, values = _top_eigenvectors(_gram(w_in), rank_in)
    # No fit keeps more than the input mode's top eigenvalues: this bounds every error from below.
    if max(norm2 - float(np.sum(values, dtype=np.float64)), 0.0) / norm2 < FLOAT32_MIN_ERROR**2:
        return None
    w_rows = w_iko.reshape(c_in * k, c_out)
    errors: list[float] = []
    core = None
    for _ in range(n_iter_max):
        # output mode: eigenvectors of the Gram of W x_1 U_in^T unfolded along mode 0; z holds its
        # transpose, (R_in*K, C_out)
        z = (u_in.T @ w_in).reshape(rank_in * k, c_out)
        u_out, _ = _top_eigenvectors(z.T @ z, rank_out)
        if _tensorly_stopped(errors, tol):
            # partial_tucker would have stopped after the previous sweep: this output-mode update
            # alone lowers the error below its result (each half-sweep maximises ||core||).
            # core = (W x_1 U_in^T) x_0 U_out^T: (R_in, K, R_out) -> (R_out, R_in, K)
            core = np.transpose((z @ u_out).reshape(rank_in, k, rank_out), (2, 0, 1))
            break
        # input mode: eigenvectors of the Gram of W x_0 U_out^T unfolded along mode 1, (C_in, K*R_out)
        y = (w_rows @ u_out).reshape(c_in, k * rank_out)
        u_in, values = _top_eigenvectors(_gram(y), rank_in)
        core_norm2 = float(np.sum(values, dtype=np.float64))  # ||core||^2 = sum of the kept eigenvalues
        errors.append(np.sqrt(max(norm2 - core_norm2, 0.0) / norm2))
    if core is None:
        # core = U_in^T (W x_0 U_out^T) from the last sweep: (R_in, K, R_out) -> (R_out, R_in, K)
        core = np.transpose((u_in.T @ y).reshape(rank_in, k, rank_out), (2, 0, 1))
    core = np.ascontiguousarray(core, dtype=np.float64)
    error = float(np.sqrt(max(norm2 - _sum_of_squares(core.reshape(rank_out, -1)), 0.0) / norm2))
    # float64 orthonormal factors (QR keeps the subspaces, fixes float32 rounding)
    return core, _orthonormal(u_out), _orthonormal(u_in), error


def _tensorly_stopped(errors: list[float], tol: float) -> bool:
    """Whether ``partial_tucker(tol=tol)`` stops after the last sweep of this error sequence."""
    return len(errors) >= TENSORLY_FIRST_CHECK and abs(errors[-2] - errors[-1]) < tol - STOP_MARGIN


def _past_tensorly_stop(errors: list[float], tol: float) -> bool:
    """True one sweep after ``partial_tucker(tol=tol)`` would have stopped on this error sequence."""
    return len(errors) > TENSORLY_FIRST_CHECK and _tensorly_stopped(errors[:-1], tol)


def _float64_iterations(w: np.ndarray, rank_out: int, rank_in: int, n_iter_max: int, tol: float):
    """HOSVD start and HOOI sweeps in float64 (no sweeps for ``n_iter_max=0``): (u_out, u_in)."""
    c_out, c_in, k = w.shape
    w_in = np.ascontiguousarray(np.moveaxis(w, 1, 0)).reshape(c_in, -1)
    w_out = w.reshape(c_out, -1)
    u_out, _ = _top_eigenvectors(_gram(w_out), rank_out)
    u_in, _ = _top_eigenvectors(_gram(w_in), rank_in)
    norm2 = float(np.sum(w * w))
    if norm2 == 0.0:
        return np.eye(c_out)[:, :rank_out], np.eye(c_in)[:, :rank_in]
    errors: list[float] = []
    for _ in range(n_iter_max):
        z = (u_in.T @ w_in).reshape(rank_in, c_out, k)
        u_out, _ = _top_eigenvectors(_gram(np.ascontiguousarray(np.moveaxis(z, 1, 0)).reshape(c_out, -1)), rank_out)
        y = (u_out.T @ w_out).reshape(rank_out, c_in, k)
        u_in, values = _top_eigenvectors(_gram(np.ascontiguousarray(np.moveaxis(y, 1, 0)).reshape(c_in, -1)), rank_in)
        errors.append(np.sqrt(max(norm2 - float(np.sum(values)), 0.0) / norm2))
        if _past_tensorly_stop(errors, tol):
            break
    return _orthonormal(u_out), _orthonormal(u_in)


def _orthonormal(u: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(u.astype(np.float64))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


METHODS = ("eig", "tensorly")


def tucker2(
    weight: np.ndarray,
    rank_out: int,
    rank_in: int,
    n_iter_max: int = DEFAULT_ITERATIONS,
    method: str = "eig",
    seed: int = 0,
    input_covariance: np.ndarray | None = None,
) -> Tucker2:
    """Tucker-2 of an OIHW weight on its channel modes, computed in float64.

    ``method="eig"`` (default) is our fast HOOI; ``method="tensorly"`` calls
    tensorly's ``partial_tucker`` (the seed's route), kept as the reference.
    Ranks above :func:`max_ranks` are clamped (they cannot improve the fit).
    Deterministic: SVD initialisation, fixed ``seed``.

    ``input_covariance`` (C_in x C_in second moment of the layer's input channels,
    from calibration data) makes the fit data-aware: the input mode is whitened so
    the decomposition minimises the expected output error E||(W - W') x||^2
    (channel-wise approximation) rather than ||W - W'||.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; choose from {', '.join(METHODS)}")
    weight = np.asarray(weight)
    if weight.ndim < 3:
        raise ValueError(f"expected a conv weight (out, in, spatial...), got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise ValueError("weight contains NaN or Inf")
    max_out, max_in = max_ranks(weight.shape)
    rank_out, rank_in = int(min(rank_out, max_out)), int(min(rank_in, max_in))
    if rank_out < 1 or rank_in < 1:
        raise ValueError(f"ranks must be at least 1, got ({rank_out}, {rank_in})")
    if input_covariance is not None:
        return _whitened_tucker2(weight.astype(np.float64), rank_out, rank_in, n_iter_max, method, seed, input_covariance)
    if method == "eig":
        core, u_out, u_in, error = _hooi(weight, rank_out, rank_in, n_iter_max)
        if error is not None:  # lossy float32 fit: ||W - W'||^2 = ||W||^2 - ||core||^2 (orthonormal factors)
            return Tucker2(first=u_in.T, core=core, last=u_out, relative_error=error)
    w64 = weight.astype(np.float64)
    if method != "eig":
        with tl.backend_context("numpy"):
            (core, (u_out, u_in)), _ = partial_tucker(
                w64, rank=[rank_out, rank_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd", random_state=seed
            )
        core, u_out, u_in = np.asarray(core), np.asarray(u_out), np.asarray(u_in)
    first = u_in.T
    approx = reconstruct(first, core, u_out)
    norm = np.linalg.norm(w64)
    error = float(np.linalg.norm(w64 - approx) / norm) if norm > 0 else 0.0
    return Tucker2(first=first, core=core, last=u_out, relative_error=error)


_MEMO = threading.local()  # per thread: [(inputs, result)], the last few per-layer results every rank option shares


def memo(inputs: tuple, compute):
    """``compute()``, reused while called with the very same objects (identity, kept alive here): the
    measured budget fits each layer at dozens of ranks, and a ResNet50's 2048-channel covariance root
    (an eigendecomposition) or weight SVD took seconds per rank (issue 15). Per thread: the budget fits
    layers on several threads at once, each its own layer's options."""
    entries = getattr(_MEMO, "entries", None)
    if entries is None:
        entries = _MEMO.entries = []
    for keys, result in entries:
        if len(keys) == len(inputs) and all(a is b for a, b in zip(keys, inputs)):
            return result
    result = compute()
    entries.insert(0, (inputs, result))
    del entries[4:]
    return result


def memo_entries() -> list:
    """This thread's memo, to hand to helper threads working on the same layer (:func:`adopt_memo`)."""
    return list(getattr(_MEMO, "entries", None) or [])


def adopt_memo(entries: list) -> None:
    """Start this thread's memo from another thread's (its results are read, never changed): threads solving
    one layer's options then share its covariance root and SVD instead of each computing them again."""
    _MEMO.entries = list(entries)


def _symmetric_sqrt(cov: np.ndarray, damping: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """S^(1/2) and S^(-1/2) of a damped PSD matrix (damping relative to its mean eigenvalue)."""
    if isinstance(cov, np.ndarray) and damping == 1e-3:
        return memo(("sqrt", cov), lambda: _symmetric_sqrt_of(cov, damping))
    return _symmetric_sqrt_of(cov, damping)


def _symmetric_sqrt_of(cov: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    cov = np.asarray(cov, dtype=np.float64)
    cov = (cov + cov.T) / 2
    values, vectors = np.linalg.eigh(cov)
    floor = damping * max(float(np.mean(np.abs(values))), 1e-12)
    values = np.maximum(values, 0.0) + floor
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _whitened_tucker2(w64, rank_out, rank_in, n_iter_max, method, seed, cov) -> Tucker2:
    if cov.shape != (w64.shape[1], w64.shape[1]):
        raise ValueError(f"input covariance {cov.shape} does not match {w64.shape[1]} input channels")
    root, inverse_root = _symmetric_sqrt(cov)
    whitened = np.moveaxis(np.tensordot(w64, root, axes=(1, 0)), -1, 1)  # W x_1 S^(1/2)
    fit = tucker2(whitened, rank_out, rank_in, n_iter_max=n_iter_max, method=method, seed=seed)
    first = fit.first @ inverse_root  # back to the original input space: (R_in, C_in)
    approx = reconstruct(first, fit.core, fit.last)
    norm = np.linalg.norm(w64)
    error = float(np.linalg.norm(w64 - approx) / norm) if norm > 0 else 0.0
    return Tucker2(first=first, core=fit.core, last=fit.last, relative_error=error)

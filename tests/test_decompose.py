import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_tucker.decompose import max_ranks, reconstruct, tucker2


def weight(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("method", ["eig", "tensorly"])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 16, 3, 5), (12, 6, 3), (6, 4, 3, 3, 3), (2, 32, 3, 3)])
def test_full_rank_is_exact(shape, method):
    w = weight(shape)
    t = tucker2(w, shape[0], shape[1], method=method)
    assert t.relative_error < 1e-12
    assert np.allclose(t.reconstruct(), w, atol=1e-10)


def test_factor_shapes_follow_oihw_modes():
    w = weight((32, 16, 3, 3))
    t = tucker2(w, 8, 4)
    assert t.first.shape == (4, 16)  # (R_in, C_in): input channels are mode 1
    assert t.core.shape == (8, 4, 3, 3)
    assert t.last.shape == (32, 8)  # (C_out, R_out): output channels are mode 0
    assert t.ranks == (8, 4)


def test_factors_are_orthonormal():
    t = tucker2(weight((32, 16, 3, 3)), 8, 4)
    assert np.allclose(t.first @ t.first.T, np.eye(4), atol=1e-10)
    assert np.allclose(t.last.T @ t.last, np.eye(8), atol=1e-10)


def test_low_rank_weight_is_recovered_exactly():
    rng = np.random.default_rng(1)
    core = rng.standard_normal((4, 3, 3, 3))
    u_out, _ = np.linalg.qr(rng.standard_normal((20, 4)))
    u_in, _ = np.linalg.qr(rng.standard_normal((10, 3)))
    w = reconstruct(u_in.T, core, u_out)
    assert tucker2(w, 4, 3).relative_error < 1e-10


def test_eig_matches_or_beats_tensorly_error():
    w = weight((64, 32, 3, 3), seed=3)
    ours = tucker2(w, 16, 8, method="eig")
    ref = tucker2(w, 16, 8, method="tensorly")
    assert ours.relative_error <= ref.relative_error + 1e-6


def test_error_falls_as_rank_grows():
    w = weight((32, 32, 3, 3))
    errors = [tucker2(w, r, r).relative_error for r in (4, 8, 16, 32)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10


def test_ranks_above_unfolding_rank_are_clamped():
    assert max_ranks((2, 32, 3, 3)) == (2, 18)
    t = tucker2(weight((2, 32, 3, 3)), 2, 32)
    assert t.ranks == (2, 18) and t.relative_error < 1e-12


def test_deterministic():
    w = weight((24, 12, 3, 3))
    a, b = tucker2(w, 6, 6), tucker2(w, 6, 6)
    assert np.array_equal(a.core, b.core) and np.array_equal(a.first, b.first)


def test_nan_weight_refused():
    w = weight((8, 8, 3, 3))
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tucker2(w, 4, 4)


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="method"):
        tucker2(weight((8, 8, 3, 3)), 4, 4, method="magic")


@settings(max_examples=25, deadline=None)
@given(
    c_out=st.integers(1, 12), c_in=st.integers(1, 12), k=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_full_rank_exact_on_random_shapes(c_out, c_in, k, seed):
    w = weight((c_out, c_in, *k), seed)
    t = tucker2(w, c_out, c_in)
    assert np.allclose(t.reconstruct(), w, atol=1e-9)


# --- issue 5: fewer sweeps, same sequence as tensorly -----------------------------------------


@pytest.mark.parametrize("shape,ranks", [((64, 64, 3, 3), (32, 32)), ((96, 48, 3, 3), (40, 20)), ((64, 3, 7, 7), (32, 1)), ((128, 128, 3, 3), (64, 64))])
def test_error_below_plain_tensorly_defaults(shape, ranks):
    """Lower error than ``partial_tucker`` with its own defaults (n_iter_max=100, tol=1e-4), not just equal."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    from threadpoolctl import threadpool_limits

    w = weight(shape, seed=7).astype(np.float32)
    with tl.backend_context("numpy"), threadpool_limits(1, "blas"):
        (core, (u_out, u_in)), _ = partial_tucker(w.astype(np.float64), rank=list(ranks), modes=[0, 1])
    ref = np.linalg.norm(w - reconstruct(u_in.T, core, u_out)) / np.linalg.norm(w)
    ours = tucker2(w, *ranks)
    assert ours.relative_error < ref


@pytest.mark.parametrize("shape,ranks", [((64, 64, 3, 3), (32, 32)), ((48, 96, 3, 3), (12, 40)), ((64, 3, 7, 7), (32, 1))])
def test_reported_error_is_the_reconstruction_error(shape, ranks):
    w = weight(shape, seed=2).astype(np.float32)
    t = tucker2(w, *ranks)
    w64 = w.astype(np.float64)
    actual = np.linalg.norm(w64 - t.reconstruct()) / np.linalg.norm(w64)
    assert abs(t.relative_error - actual) < 1e-6
    assert np.allclose(t.first @ t.first.T, np.eye(ranks[1]), atol=1e-10)
    assert np.allclose(t.last.T @ t.last, np.eye(ranks[0]), atol=1e-10)


def test_no_iterations_is_the_hosvd():
    w = weight((32, 24, 3, 3), seed=4)
    t = tucker2(w, 8, 6, n_iter_max=0)
    u_out = np.linalg.svd(w.reshape(32, -1), full_matrices=False)[0][:, :8]
    u_in = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(24, -1), full_matrices=False)[0][:, :6]
    assert np.allclose(np.abs(t.last.T @ u_out), np.eye(8), atol=1e-8)
    assert np.allclose(np.abs(t.first @ u_in), np.eye(6), atol=1e-8)


def test_float64_weights_near_exact_fit_stays_exact():
    """A weight that is low rank up to 1e-9 noise is fitted in float64 (float32 would stop at ~1e-7)."""
    rng = np.random.default_rng(5)
    u_out, _ = np.linalg.qr(rng.standard_normal((40, 6)))
    u_in, _ = np.linalg.qr(rng.standard_normal((30, 5)))
    w = reconstruct(u_in.T, rng.standard_normal((6, 5, 3, 3)), u_out) + 1e-9 * rng.standard_normal((40, 30, 3, 3))
    t = tucker2(w, 6, 5)
    assert t.relative_error < 1e-8


def test_every_rank_of_a_layer_reuses_its_covariance_root_and_svd(monkeypatch):
    """The measured budget fits a layer at dozens of ranks: the covariance's root and the weight's SVD are
    computed once per layer (memo, by identity), and give what a fresh computation gives."""
    import onnx_tucker.decompose as decompose

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12))
    cov = x.T @ x / 500
    calls = []
    real = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda m: calls.append(m.shape) or real(m))
    first = decompose._symmetric_sqrt(cov)
    again = decompose._symmetric_sqrt(cov)
    assert again is first and calls == [(12, 12)]
    fresh = decompose._symmetric_sqrt(cov.copy())  # another object: computed again, same values
    assert len(calls) == 2
    np.testing.assert_array_equal(fresh[0], first[0])

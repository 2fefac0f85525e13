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

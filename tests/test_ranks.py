"""Rank rules and the cost model: energy and VBMF find known ranks, rounding and the ratio rule by hand."""
import numpy as np
import pytest

from onnx_tucker.errors import UsageError
from onnx_tucker.ranks import ConvShape, energy_ranks, normalize_ranks, parse_rank_spec, ratio_ranks, round_to_multiple, vbmf_ranks
from onnx_tucker.vbmf import energy_rank, evbmf_rank


def low_rank_tensor(c_out, c_in, k, r_out, r_in, noise, seed=0):
    """core x_0 U_out x_1 U_in + noise: mode-0 rank r_out, mode-1 rank r_in (before the noise)."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, k, k))
    u_out = np.linalg.qr(rng.standard_normal((c_out, r_out)))[0]
    u_in = np.linalg.qr(rng.standard_normal((c_in, r_in)))[0]
    w = np.einsum("or,ris...->ois...", u_out, np.einsum("ci,ris...->rcs...", u_in, core.reshape(r_out, r_in, -1)))
    w = w.reshape(c_out, c_in, k, k)
    return (w + noise * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32)


# --- VBMF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, rank, noise", [((64, 576), 8, 0.05), ((300, 200), 12, 0.1), ((16, 144), 3, 0.01), ((40, 40), 5, 0.05)])
def test_vbmf_finds_the_true_rank_of_a_noisy_low_rank_matrix(shape, rank, noise):
    rng = np.random.default_rng(rank)
    a = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    a += noise * np.sqrt(rank) * rng.standard_normal(shape)
    assert evbmf_rank(a) == rank
    assert evbmf_rank(a.T) == rank  # orientation does not matter


def test_vbmf_finds_both_channel_ranks_of_a_conv_weight():
    w = low_rank_tensor(c_out=48, c_in=32, k=3, r_out=10, r_in=6, noise=0.02)
    assert vbmf_ranks(w) == (10, 6)


def test_vbmf_on_pure_noise_and_zeros_still_gives_a_usable_rank():
    rng = np.random.default_rng(0)
    r_out, r_in = vbmf_ranks(rng.standard_normal((16, 8, 3, 3)).astype(np.float32))
    assert 1 <= r_out <= 16 and 1 <= r_in <= 8
    assert vbmf_ranks(np.zeros((8, 4, 3, 3), np.float32)) == (1, 1)


# --- energy -----------------------------------------------------------------------------------------

def test_energy_rank_on_a_known_spectrum():
    s = np.sqrt([50.0, 30.0, 10.0, 6.0, 4.0])  # squared values sum to 100: cumulative 50, 80, 90, 96, 100 %
    assert [energy_rank(s, e) for e in (0.5, 0.51, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 2, 3, 3, 4, 5, 5]


def test_energy_ranks_of_a_conv_weight_with_a_known_spectrum():
    # mode-0 unfolding = U diag(s) V^T with orthonormal U, V: its squared singular values are s^2
    rng = np.random.default_rng(0)
    s = np.sqrt([40.0, 30.0, 20.0, 6.0, 4.0, 0, 0, 0])
    u = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    v = np.linalg.qr(rng.standard_normal((4 * 9, 8)))[0]
    w = (u @ np.diag(s) @ v.T).reshape(8, 4, 3, 3)
    assert energy_ranks(w, 0.7)[0] == 2
    assert energy_ranks(w, 0.9)[0] == 3
    assert energy_ranks(w, 1.0)[0] == 5  # never beyond the numeric rank
    r_out, r_in = energy_ranks(w, 1.0)
    assert r_in == 4  # the mode-1 unfolding is 4 x 72: full rank 4


def test_energy_full_and_tiny_fractions_bound_the_ranks():
    w = low_rank_tensor(c_out=24, c_in=12, k=3, r_out=24, r_in=12, noise=0.0)
    assert energy_ranks(w, 1.0) == (24, 12)
    assert energy_ranks(w, 1e-9) == (1, 1)
    r_out, r_in = energy_ranks(w, 0.5)
    assert energy_ranks(w, 0.9)[0] >= r_out and energy_ranks(w, 0.9)[1] >= r_in


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x"])
def test_energy_outside_0_1_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        energy_ranks(np.ones((4, 4, 3, 3), np.float32), bad)


# --- ratio rule and rounding ------------------------------------------------------------------------

def test_ratio_rule_edge_cases():
    assert ratio_ranks(10, 10, 0.7) == (7, 7)  # 0.7*10 = 6.9999999 in floating point
    assert ratio_ranks(64, 3, 0.5) == (32, 1)
    assert ratio_ranks(3, 1, 0.1) == (1, 1)  # never below 1
    assert ratio_ranks(128, 64, 1.0) == (128, 64)
    assert ratio_ranks(100, 30, 0.29) == (29, 8)  # 8.7 truncates


def test_round_to_multiple():
    assert round_to_multiple(13, 8, 64) == 16
    assert round_to_multiple(11, 8, 64) == 8
    assert round_to_multiple(12, 8, 64) == 16  # halves round up
    assert round_to_multiple(3, 8, 64) == 8  # at least one multiple
    assert round_to_multiple(60, 8, 62) == 62  # capped at the limit
    assert round_to_multiple(13, 1, 10) == 10
    assert round_to_multiple(13, 0, 64) == 13


# --- cost model -------------------------------------------------------------------------------------

def test_cost_model_by_hand():
    # 3x3 conv, 8 -> 16 channels, 10x10 input, stride 2 -> 5x5 output
    s = ConvShape(c_out=16, c_in=8, kernel=(3, 3), in_spatial=(10, 10), out_spatial=(5, 5))
    assert s.params() == 16 * 8 * 9 == 1152
    assert s.macs() == 1152 * 25 == 28800
    # ranks (R_out=4, R_in=2): 1x1 at 10x10: 2*8*100 = 1600; core 4*2*9*25 = 1800; 1x1 at 5x5: 16*4*25 = 1600
    assert s.chain_macs(4, 2) == 1600 + 1800 + 1600 == 5000
    assert s.chain_params(4, 2) == 2 * 8 + 4 * 2 * 9 + 16 * 4 == 152


def test_cost_model_grouped_and_unknown_spatial():
    g = ConvShape(c_out=16, c_in=8, kernel=(3, 3), group=4, out_spatial=(2, 2), in_spatial=(2, 2))
    assert g.params() == 16 * 2 * 9 and g.macs() == 16 * 2 * 9 * 4
    u = ConvShape(c_out=16, c_in=8, kernel=(3, 3))
    assert not u.known and u.macs() == u.params() == 1152
    assert u.chain_macs(4, 2) == u.chain_params(4, 2) == 152


@pytest.mark.parametrize("text, expected", [
    ("Conv__72=16,8", ("Conv__72", (16, 8))),
    ("/layer1/layer1.0/conv1/Conv=12", ("/layer1/layer1.0/conv1/Conv", (12,))),
    ("a=b=3", ("a=b", (3,))),  # the last '=' splits: names may hold one
    (" 3 = 5, 6 ", ("3", (5, 6))),
])
def test_rank_spec_parses_name_and_ranks(text, expected):
    assert parse_rank_spec(text) == expected


@pytest.mark.parametrize("text", ["conv", "=3", "conv=", "conv=0", "conv=1,2,3", "conv=a", "conv=1.5", "conv=-2", "conv=4,"])
def test_rank_spec_refuses_what_is_not_one_or_two_whole_ranks(text):
    with pytest.raises(UsageError, match="expected NAME=R"):
        parse_rank_spec(text)


def test_api_ranks_accept_ints_tuples_lists_and_index_keys():
    assert normalize_ranks({"x": 4, 2: (3, 4), "y": [5], "z": np.int64(6)}) == {"x": (4,), "2": (3, 4), "y": (5,), "z": (6,)}
    for bad in ({"x": 0}, {"x": 2.5}, {"x": True}, {"x": ()}, {"x": (1, 2, 3)}):
        with pytest.raises(UsageError):
            normalize_ranks(bad)


def test_a_conv_with_only_its_output_size_known_is_costed_in_parameters_like_its_chain():
    """A graph output after a Loop declares the conv's output size while its input size is unknown: the layer was
    weighed in MACs (output pixels) and its chain in parameters, so a chain that adds both looked profitable."""
    from onnx_tucker.ranks import ConvShape

    shape = ConvShape(c_out=32, c_in=16, kernel=(3, 3), in_spatial=None, out_spatial=(12, 12))
    assert not shape.known and shape.macs() == shape.params() == 32 * 16 * 9
    assert shape.chain_macs(32, 16) == shape.chain_params(32, 16) > shape.macs()  # full rank adds: never profitable


def test_energy_refuses_a_bool():
    """compress(energy=True) ran as energy 1.0 where ratio=True and target_macs=True are refused."""
    from onnx_tucker.errors import UsageError
    from onnx_tucker.ranks import check_energy

    with pytest.raises(UsageError, match="energy must be a number"):
        check_energy(True)
    assert check_energy(1) == 1.0

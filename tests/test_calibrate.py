"""Data-aware Tucker: whitening and refits reduce held-out output error; budgets meet the MAC target."""
import numpy as np
import onnx
import pytest

from conftest import conv_model, relative_error, residual_model, run_model
from onnx_tucker import UsageError, compress
from onnx_tucker.calibrate import input_covariances, with_outputs
from onnx_tucker.decompose import tucker2


def samples(n, seed, shape=(3, 10, 10)):
    rng = np.random.default_rng(seed)
    # Correlated channels and a non-zero mean, like real activations.
    base = rng.standard_normal((n, 1, *shape[1:])).astype(np.float32)
    return (0.8 * base + 0.4 * rng.standard_normal((n, *shape)) + 0.5).astype(np.float32)


def layer_error(model, compressed, tensor, feeds):
    a = run_model(with_outputs(model, [tensor]), feeds)[-1]
    b = run_model(with_outputs(compressed, [tensor]), feeds)[-1]
    return relative_error(a, b)


@pytest.mark.parametrize("refit", ["last", "core"])
def test_calibration_reduces_held_out_layer_error(refit):
    model = residual_model()
    calibration = {"x": samples(64, seed=1)}
    held_out = {"x": samples(32, seed=2)}
    plain, _ = compress(model, ratio=0.5)
    calibrated, report = compress(model, ratio=0.5, calibration=calibration, refit=refit)
    onnx.checker.check_model(calibrated)
    for tensor in ("a", "b", "d"):  # outputs of stem, block_conv and down
        assert layer_error(model, calibrated, tensor, held_out) < layer_error(model, plain, tensor, held_out)
    final_plain = relative_error(run_model(model, held_out)[0], run_model(plain, held_out)[0])
    final_cal = relative_error(run_model(model, held_out)[0], run_model(calibrated, held_out)[0])
    assert final_cal < final_plain
    layers = report.calibration["layers"]
    assert all(v["output_error_after"] <= v["output_error_before"] + 1e-9 for v in layers.values())


def test_refit_adds_a_bias_when_the_conv_had_none():
    model = conv_model(bias=False, attrs={"pads": [1, 1, 1, 1]})
    cal = {"x": np.random.default_rng(0).standard_normal((16, 8, 12, 12)).astype(np.float32) + 1.0}
    new, _ = compress(model, ratio=0.5, calibration=cal)
    last = next(n for n in new.graph.node if n.name == "conv_tucker_out")
    assert len(last.input) == 3 and last.input[2] == "conv_tucker_out_B"
    onnx.checker.check_model(new)


def test_full_rank_stays_exact_with_calibration():
    model = residual_model()
    cal = {"x": samples(32, seed=3)}
    new, _ = compress(model, ratio=1.0, force=True, calibration=cal)
    feeds = {"x": samples(8, seed=4)}
    assert relative_error(run_model(model, feeds)[0], run_model(new, feeds)[0]) < 1e-4


def test_whitened_decomposition_lowers_expected_output_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12, 3, 3))
    mixing = rng.standard_normal((12, 12)) * np.linspace(0.05, 2.0, 12)
    cov = mixing @ mixing.T
    plain, white = tucker2(w, 6, 4), tucker2(w, 6, 4, input_covariance=cov)

    def expected_error(t):
        d = (w - t.reconstruct()).transpose(0, 2, 3, 1).reshape(-1, 12)
        return float(np.einsum("ij,jk,ik->", d, cov, d))

    assert expected_error(white) < expected_error(plain)
    assert tucker2(w, 16, 12, input_covariance=cov).relative_error < 1e-10


def test_input_covariances_are_channel_second_moments():
    model = conv_model(c_in=4, c_out=6)
    x = np.random.default_rng(0).standard_normal((5, 4, 12, 12)).astype(np.float32)
    cov = input_covariances(model, {"x": x}, ["x"])["x"]
    flat = x.transpose(1, 0, 2, 3).reshape(4, -1).astype(np.float64)
    assert np.allclose(cov, flat @ flat.T / flat.shape[1], rtol=1e-5)


@pytest.mark.parametrize("rule", ["uniform", "greedy"])
@pytest.mark.parametrize("target", [0.6, 0.4, 0.25])
def test_budget_meets_the_mac_target_by_the_cost_model(target, rule):
    model = residual_model(channels=32)
    new, report = compress(model, target_macs=target, budget_rule=rule)
    t = report.totals()
    assert t["macs_after"] <= target * t["macs_before"]
    assert report.settings["rank_method"] == "target_macs"


def test_budget_with_calibration_uses_measured_sensitivity():
    model = residual_model(channels=32)
    new, report = compress(model, target_macs=0.4, calibration={"x": samples(32, seed=5)}, budget_rule="greedy")
    assert set(report.sensitivity) == {"stem", "block_conv", "down"}
    assert report.totals()["macs_after"] <= 0.4 * report.totals()["macs_before"]


def test_unreachable_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot be met"):
        compress(residual_model(), target_macs=0.01)

"""--latency-aware: layers whose chain is measured slower on the CPU EP are left whole, with the numbers."""
import onnx

from conftest import residual_model
from onnx_tucker import ModelError, compress
from onnx_tucker.latency import decide, slower_layers


def test_latency_aware_leaves_measured_slower_layers_whole():
    model = residual_model(channels=32, spatial=(16, 16))
    try:
        new, report = compress(model, ratio=0.5, latency_aware=True)
    except ModelError as exc:  # a loaded machine may measure every chain slower: then it says so
        assert "measured slower" in str(exc)
        return
    onnx.checker.check_model(new)
    left = report.settings["latency_aware"]["left_whole"]
    for record in report.layers:
        if record.layer in left:
            assert not record.decomposed and ("measured slower" in record.reason or "inside the noise" in record.reason)
            before, chain, verdict = left[record.layer]
            assert verdict in ("slower", "noise") and (chain >= before or verdict == "noise")
    assert {r.layer for r in report.decomposed}.isdisjoint(left)


def test_slower_layers_reports_only_decomposed_layers():
    model = residual_model(channels=32, spatial=(16, 16))
    new, report = compress(model, ratio=0.5)
    slow = slower_layers(model, new, batch=1, runs=5)
    assert set(slow) <= {r.layer for r in report.decomposed}
    assert all(verdict == "noise" or chain >= before for before, chain, verdict in slow.values())


def test_a_chain_is_kept_only_when_faster_in_every_round():
    """The decision rule behind repeatable --latency-aware runs (issue 12): disagreeing rounds are noise."""
    assert decide([(100, 90), (100, 95), (100, 80)]) == "faster"
    assert decide([(100, 90), (100, 105), (100, 95)]) == "noise"
    assert decide([(100, 110), (100, 95), (100, 120)]) == "slower"
    assert decide([(100, 100)]) == "slower"

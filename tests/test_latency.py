"""--latency-aware: layers whose chain is measured slower on the CPU EP are left whole, with the numbers."""
import onnx

from conftest import residual_model
from onnx_tucker import ModelError, compress
from onnx_tucker.latency import slower_layers


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
            assert not record.decomposed and "measured slower" in record.reason
            before, chain = left[record.layer]
            assert chain >= before
    assert {r.layer for r in report.decomposed}.isdisjoint(left)


def test_slower_layers_reports_only_decomposed_layers():
    model = residual_model(channels=32, spatial=(16, 16))
    new, report = compress(model, ratio=0.5)
    slow = slower_layers(model, new, batch=1, runs=5)
    assert set(slow) <= {r.layer for r in report.decomposed}
    assert all(chain >= before for before, chain in slow.values())

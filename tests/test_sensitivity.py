"""Measured curves: cached on disk (--curves), reused at another target, resumed after an interruption."""
import json

import numpy as np

from onnx_tucker import compress

from conftest import residual_model


def feeds(n=64, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 10, 10)).astype(np.float32)}


def test_curves_file_is_reused_at_another_target_and_gives_the_same_allocation(tmp_path):
    path = tmp_path / "curves.json"
    model, cal = residual_model(), feeds()
    first, r1 = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert r1.sensitivity["cached_layers"] == 0 and path.is_file()
    again, r2 = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert r2.sensitivity["cached_layers"] == len(r1.sensitivity["curves"])
    assert r2.sensitivity["curves"] == r1.sensitivity["curves"]
    assert [r.ranks for r in r2.layers] == [r.ranks for r in r1.layers]
    assert [i.SerializeToString() for i in again.graph.initializer] == [i.SerializeToString() for i in first.graph.initializer]
    _, r3 = compress(model, target_macs=0.45, calibration=cal, curves=str(path))  # another target: no new probe
    assert r3.sensitivity["cached_layers"] == len(r1.sensitivity["curves"])


def test_an_interrupted_run_resumes_with_the_layers_it_has(tmp_path):
    path = tmp_path / "curves.json"
    model, cal = residual_model(), feeds()
    _, full = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    data = json.loads(path.read_text())
    dropped = sorted(data["layers"])[0]
    del data["layers"][dropped]  # as if the run had stopped before this layer
    path.write_text(json.dumps(data))
    _, resumed = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert resumed.sensitivity["cached_layers"] == len(full.sensitivity["curves"]) - 1
    assert resumed.sensitivity["curves"] == full.sensitivity["curves"]


def test_other_calibration_data_or_model_invalidates_the_file(tmp_path):
    path = tmp_path / "curves.json"
    compress(residual_model(), target_macs=0.6, calibration=feeds(), curves=str(path))
    _, other_data = compress(residual_model(), target_macs=0.6, calibration=feeds(seed=1), curves=str(path))
    assert other_data.sensitivity["cached_layers"] == 0
    _, other_model = compress(residual_model(seed=3), target_macs=0.6, calibration=feeds(seed=1), curves=str(path))
    assert other_model.sensitivity["cached_layers"] == 0

"""Float16 models: compressed in fp16 (full rank exact within fp16 tolerance, real ranks equal to one conv
with the composed low-rank weight), through the measured budget with calibration, and fp16 conversion."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import conv_model, relative_error, residual_model, run_model
from onnx_tucker.chain import chains_of
from onnx_tucker.graph import Initializers
from onnx_tucker.pipeline import compress
from onnx_tucker.precision import to_float16, weight_dtype

FP16_TOL = 2e-2  # fp16 has an 11-bit mantissa; three convs in fp16 round three times


def _feeds(model, n=4, seed=0):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    elem = model.graph.input[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def test_to_float16_converts_weights_and_keeps_float32_io():
    model = residual_model()
    half = to_float16(model)
    assert weight_dtype(model) == "float32" and weight_dtype(half) == "float16"
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    feeds = _feeds(model)
    (a,), (b,) = run_model(model, feeds), run_model(half, feeds)
    assert relative_error(a, b) < FP16_TOL
    assert to_float16(half) is half


def test_float16_model_at_full_rank_reproduces_itself_within_fp16_tolerance():
    model = conv_model(c_in=8, c_out=16, dtype=np.float16, seed=3)
    new, report = compress(model, ratio=1.0, force=True)
    assert report.chains and all(c.form == "tucker2" for c in report.chains)
    inits = Initializers(new)
    assert {inits.array(n).dtype for c in report.chains for n in c.trainable()} == {np.dtype(np.float16)}
    feeds = _feeds(model)
    (a,), (b,) = run_model(model, feeds), run_model(new, feeds)
    assert b.dtype == np.float16
    assert relative_error(a.astype(np.float32), b.astype(np.float32)) < FP16_TOL


def test_float16_chain_at_real_ranks_equals_one_conv_with_the_composed_weight():
    model = conv_model(c_in=16, c_out=24, dtype=np.float16, seed=4)
    new, report = compress(model, ranks={"conv": (6, 5)}, force=True)
    (chain,) = chains_of(new)
    inits = Initializers(new)
    first = inits.array(chain.weights["first"]).astype(np.float64)[:, :, 0, 0]
    core = inits.array(chain.weights["core"]).astype(np.float64)
    last = inits.array(chain.weights["last"]).astype(np.float64)[:, :, 0, 0]
    composed = np.einsum("or,rskl,sc->ockl", last, core, first)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    Initializers(reference).set("W", composed.astype(np.float16))
    Initializers(reference).set("B", inits.array(chain.bias))
    feeds = _feeds(model, seed=1)
    (orig,), (ours,), (ref,) = run_model(model, feeds), run_model(new, feeds), run_model(reference, feeds)
    assert relative_error(ref.astype(np.float32), ours.astype(np.float32)) < FP16_TOL
    assert relative_error(orig.astype(np.float32), ours.astype(np.float32)) > 5 * FP16_TOL  # real ranks: not identities


def test_float16_model_through_the_measured_budget_and_calibration():
    model = to_float16(residual_model(), keep_io_types=True)  # Casts at both ends: inner tensors are fp16
    cal = _feeds(model, n=48, seed=2)
    new, report = compress(model, target_macs=0.6, calibration=cal)
    assert report.chains
    assert weight_dtype(new) == "float16"
    feeds = _feeds(model, seed=5)
    (a,), (b,) = run_model(model, feeds), run_model(new, feeds)
    assert np.isfinite(b).all() and a.shape == b.shape


@pytest.mark.parametrize("options", [{"ratio": 0.5}, {"target_macs": 0.6}], ids=["ratio", "budget"])
def test_float16_model_with_float16_inputs_calibrates(options):
    """A model whose graph input is float16 itself (no Casts) failed --calibrate: the refit's segment declared its
    input float, the default for a tensor of unknown type, as the types never read the graph's inputs."""
    model = to_float16(residual_model(), keep_io_types=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    cal = _feeds(model, n=48, seed=2)
    new, report = compress(model, calibration=cal, **options)
    assert report.chains and weight_dtype(new) == "float16"
    feeds = _feeds(model, seed=5)
    (a,), (b,) = run_model(model, feeds), run_model(new, feeds)
    assert b.dtype == np.float16 and np.isfinite(b).all() and a.shape == b.shape


def test_float16_model_from_the_converter_loads_from_its_file(tmp_path):
    """The converter appends its input Casts after their readers: the file failed the checker in load_model (the CLI's
    path), although onnxruntime runs it. It loads sorted now, and the CLI compresses it."""
    import onnx

    from onnx_tucker.cli import main
    from onnx_tucker.io import load_model

    model = to_float16(residual_model(), keep_io_types=True)
    path = tmp_path / "f16io.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    onnx.checker.check_model(loaded)
    assert main([str(path), str(tmp_path / "out.onnx"), "--ratio", "0.5"]) == 0
    assert weight_dtype(onnx.load(str(tmp_path / "out.onnx"))) == "float16"


def test_float16_layers_are_timed_in_float16(tmp_path):
    import json

    model = to_float16(residual_model(channels=32, spatial=(8, 8)))
    table = tmp_path / "t.json"
    _, report = compress(model, ratio=0.5, latency_aware=True, latency_table=str(table))
    keys = [k for k in json.loads(table.read_text())["entries"] if "|whole|" not in k]
    assert keys and all('"dtype": "float16"' in k for k in keys)
    assert report.latency["measured"]["speedup"] > 0

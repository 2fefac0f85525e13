"""Hostile input: mutated model bytes and hostile Conv attributes/weights.

Whatever the input, the CLI must: never print a traceback (nor an "internal error", which
would be a bug of ours), exit with 0, 1 or 2, leave no output (or temporary) file behind on
failure, leave the input byte-identical, and on success write a model that passes onnx.checker.
Most examples run ``cli.main`` in-process (fast); a sample runs the real CLI in a subprocess.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, residual_model
from onnx_tucker import cli

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True)
BASE_MODELS = {
    "conv": conv_model(c_in=4, c_out=8, spatial=(6, 6), attrs={"pads": [1, 1, 1, 1]}).SerializeToString(),
    "residual": residual_model(channels=8, spatial=(6, 6)).SerializeToString(),
}


def run_cli_inprocess(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def run_cli_subprocess(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, argv)], capture_output=True, text=True, env=env, timeout=120)
    return r.returncode, r.stderr


def check_contract(folder: Path, data: bytes, extra_args=(), runner=run_cli_inprocess) -> int:
    """Write ``data`` as a model, run the CLI on it and assert the contract; returns the exit code."""
    for p in folder.iterdir():
        p.unlink()
    src = folder / "in.onnx"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    out = folder / "out.onnx"
    code, err = runner([src, out, "--ratio", "0.5", *extra_args])
    assert code in (0, 1, 2), err
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    if code == 0:
        onnx.checker.check_model(onnx.load(str(out)))
        assert set(p.name for p in folder.iterdir()) <= {"in.onnx", "out.onnx", "out.onnx.data"}
    else:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("onnx-tucker: error: "), err
        assert sorted(p.name for p in folder.iterdir()) == ["in.onnx"]
    return code


@pytest.fixture
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- byte mutations ---------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw):
    base = BASE_MODELS[draw(st.sampled_from(sorted(BASE_MODELS)))]
    data = bytearray(base)
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "overwrite", "combo"]))
    if kind in ("flip", "combo"):
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
    if kind in ("truncate", "combo"):
        data = data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":  # a slice of the other model (or of itself) pasted somewhere
        other = BASE_MODELS[draw(st.sampled_from(sorted(BASE_MODELS)))]
        a = draw(st.integers(0, len(other) - 1))
        b = draw(st.integers(a, min(len(other), a + 400)))
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + other[a:b] + data[pos:]
    if kind == "overwrite":
        pos = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        data[pos : pos + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=80, **SETTINGS)
@given(data=mutated_bytes())
def test_mutated_model_bytes_never_crash(folder, data):
    check_contract(folder, data, ["--no-check"])


# --- attribute and weight mutations -----------------------------------------------------------

WEIGHT_DTYPES = [np.float32, np.float16, np.float64, np.int8]


@st.composite
def hostile_conv(draw):
    """A Conv model with hostile attributes/weights, not checked (the tool must do that)."""
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    c_in, c_out = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    group = draw(st.sampled_from([1, 1, 1, 2, c_in]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    spatial = [draw(st.integers(3, 6)) for _ in range(nd)]
    w_shape = [c_out, max(1, c_in // max(group, 1)), *kernel]
    if draw(st.booleans()):  # kernel/weight shape mismatch
        w_shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    dtype = draw(st.sampled_from(WEIGHT_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = rng.standard_normal(w_shape).astype(np.float64)
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "huge", "zero"]))
    if special == "nan":
        w.flat[0] = np.nan
    elif special == "inf":
        w.flat[-1] = -np.inf
    elif special == "huge":
        w *= 1e30
    elif special == "zero":
        w[:] = 0
    w = (w * 10).astype(dtype) if dtype is np.int8 else w.astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype if dtype is not np.int8 else np.float32))
    attrs = {}
    if draw(st.booleans()):
        attrs["pads"] = draw(st.lists(st.integers(-2, 2), min_size=2 * nd - 1, max_size=2 * nd + 1))
    if draw(st.booleans()):
        attrs["strides"] = draw(st.lists(st.integers(-1, 3), min_size=nd, max_size=nd + 1))
    if draw(st.booleans()):
        attrs["dilations"] = draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd))
    if draw(st.booleans()):
        attrs["kernel_shape"] = draw(st.lists(st.integers(0, 4), min_size=nd, max_size=nd))
    if draw(st.booleans()):
        attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "VALID", "NOTSET", "bogus"]))
    if group != 1 or draw(st.booleans()):
        attrs["group"] = group if draw(st.booleans()) else draw(st.integers(-1, 5))
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    bias_len = draw(st.sampled_from([None, c_out, c_out, c_out + 1, 0]))
    if bias_len is not None:
        inits.append(numpy_helper.from_array(np.ones(bias_len, dtype=w.dtype if dtype is not np.int8 else np.float32), "B"))
        inputs.append("B")
    x = helper.make_tensor_value_info("x", elem, ["N", c_in, *spatial])
    y = helper.make_tensor_value_info("y", elem, None)
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "hostile", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.sampled_from([11, 13, 17])))])
    return model.SerializeToString()


@settings(max_examples=80, **SETTINGS)
@given(data=hostile_conv())
def test_hostile_conv_attributes_and_weights_never_crash(folder, data):
    check_contract(folder, data, ["--no-check", "--force"])


@settings(max_examples=15, **SETTINGS)
@given(data=hostile_conv())
def test_hostile_conv_with_self_check_never_crashes(folder, data):
    """The onnxruntime self-check is part of the contract too (it runs on anything that compressed)."""
    check_contract(folder, data, ["--force"])


@settings(max_examples=3, **SETTINGS)
@given(data=st.one_of(mutated_bytes(), hostile_conv()))
def test_real_cli_subprocess_sample(folder, data):
    check_contract(folder, data, ["--force"], runner=run_cli_subprocess)


# --- specific hostile weights, stated -----------------------------------------------------------


def _weight_model(w: np.ndarray, elem) -> bytes:
    x = helper.make_tensor_value_info("x", elem, ["N", w.shape[1], 6, 6])
    y = helper.make_tensor_value_info("y", elem, ["N", w.shape[0], 6, 6])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "w", [x], [y], [numpy_helper.from_array(w, "W")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("dtype, args", [(np.float16, []), (np.float64, ["--no-check"])])
def test_float16_and_float64_weights_are_handled(folder, dtype, args):
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert check_contract(folder, _weight_model(w, elem), ["--force", *args]) == 0
    new = onnx.load(str(folder / "out.onnx"))
    assert {i.data_type for i in new.graph.initializer} == {elem}


def test_float64_model_self_check_is_refused_cleanly(folder):
    """onnxruntime's CPU provider has no float64 Conv: the self-check fails with one line, nothing written."""
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3))
    assert check_contract(folder, _weight_model(w, TensorProto.DOUBLE), ["--force"]) == 1
    code, err = run_cli_inprocess([folder / "in.onnx", folder / "out.onnx", "--force"])
    assert "onnxruntime" in err and "Conv" in err


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_refused_cleanly(folder, value):
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    w[3, 2, 1, 0] = value
    assert check_contract(folder, _weight_model(w, TensorProto.FLOAT), ["--force"]) == 1
    code, err = run_cli_inprocess([folder / "in.onnx", folder / "out.onnx", "--force"])
    assert "NaN or Inf" in err


def test_int8_weight_on_a_float_conv_is_refused_cleanly(folder):
    w = np.random.default_rng(0).integers(-100, 100, size=(16, 8, 3, 3)).astype(np.int8)
    assert check_contract(folder, _weight_model(w, TensorProto.FLOAT), ["--force"]) == 1

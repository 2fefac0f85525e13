"""One batched loop: outputs and intermediate tensors, models with a fixed batch (torch.onnx's default)."""
import numpy as np
import onnx
import pytest

from onnx_tucker.capture import capture, capture_named, fixed_batch
from onnx_tucker.graph import with_outputs
from onnx_tucker.runtime import make_session

from conftest import residual_model


def fixed_batch_model(batch: int) -> onnx.ModelProto:
    model = residual_model()
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def test_capture_equals_one_big_run_in_any_batch_size():
    model = residual_model()
    x = np.random.default_rng(0).standard_normal((37, 3, 10, 10)).astype(np.float32)
    whole = make_session(model).run(None, {"x": x})[0]
    for size in (1, 5, 64):
        np.testing.assert_allclose(capture(model, {"x": x}, batch_size=size)[0], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_models_run_in_their_batch_and_the_padding_is_dropped(batch):
    """A model exported for batch 1 (or 4) is fed in batches it accepts; 10 samples give 10 rows."""
    model = fixed_batch_model(batch)
    assert fixed_batch(model) == batch and fixed_batch(make_session(model)) == batch
    x = np.random.default_rng(1).standard_normal((10, 3, 10, 10)).astype(np.float32)
    got = capture(model, {"x": x}, batch_size=64)[0]
    expected = capture(residual_model(), {"x": x})[0]
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_intermediate_tensors_are_captured_by_name():
    model = residual_model()
    x = np.random.default_rng(2).standard_normal((6, 3, 10, 10)).astype(np.float32)
    values = capture_named(with_outputs(model, ["a_r", "d"]), {"x": x}, ["a_r", "d"], batch_size=4)
    assert values["a_r"].shape == (6, 16, 10, 10) and values["d"].shape == (6, 32, 5, 5)
    assert values["a_r"].min() >= 0  # after the ReLU
    assert fixed_batch(residual_model()) is None


def test_batches_shrink_only_when_the_fetched_tensors_would_not_fit():
    from onnx_tucker.capture import BATCH_BYTES, activation_bytes, batch_for_bytes
    from onnx_tucker.ranks import ConvShape

    small = ConvShape(c_out=16, c_in=16, kernel=(3, 3), in_spatial=(32, 32), out_spatial=(32, 32))
    big = ConvShape(c_out=256, c_in=64, kernel=(1, 1), in_spatial=(56, 56), out_spatial=(56, 56))
    assert activation_bytes(small, "in") == 4 * 16 * 32 * 32
    assert activation_bytes(big, "out") == 4 * 256 * 56 * 56
    assert activation_bytes(ConvShape(c_out=1, c_in=1, kernel=(1, 1)), "in") == 0  # unknown size
    assert batch_for_bytes(20 * activation_bytes(small, "in")) == 64  # a ResNet-20's inputs: batch kept
    assert batch_for_bytes(50 * activation_bytes(big, "out")) == BATCH_BYTES // (50 * activation_bytes(big, "out")) == 3
    assert batch_for_bytes(10 * BATCH_BYTES) == 1


def test_run_all_slices_a_fixed_batch_model_and_gives_extras_whole():
    """A probe-like session: the weight is a graph input fed whole to every slice; the images are fed in the
    model's own batch, told by ``fixed`` where the weight input hides it from the session."""
    from onnx import TensorProto, helper

    from onnx_tucker.capture import run_all

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = make_session(model)
    assert fixed_batch(session) is None  # the weight's 4 hides the batch of 1
    x = np.random.default_rng(1).standard_normal((7, 3, 6, 6)).astype(np.float32)
    got = run_all(session, {"x": x}, ["y"], extra={"w": w}, fixed=1)[0]
    want = np.concatenate([session.run(["y"], {"x": x[i : i + 1], "w": w})[0] for i in range(7)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_model_without_inputs_is_checked_in_one_run(tmp_path):
    """A model whose conv reads a constant has no graph inputs: the self-check's batching took the first feed of
    none and ended in an internal StopIteration. It runs once, and the check compares that run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = numpy_helper.from_array(rng.standard_normal((1, 16, 8, 8)).astype(np.float32), "x")
    w = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1] * 4)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], [x, w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "onnx_tucker", tmp_path / "m.onnx", tmp_path / "o.onnx", "--ratio", "1.0", "--force"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout and "cosine 1.0" in done.stdout

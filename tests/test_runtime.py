"""Sessions on a registered provider, and the inputs the tool feeds them."""
import os

import numpy as np
import pytest

from onnx_tucker import runtime as sessions
from onnx_tucker.errors import DataError, ModelError

from conftest import residual_model


def test_make_session_keeps_its_old_signature_and_profiles(tmp_path):
    model = residual_model()
    feeds = sessions.random_inputs(model, batch=2, seed=0)
    plain = sessions.make_session(model, "cpu", 1)
    profiled = sessions.make_session(model, "cpu", 1, None, profile_prefix=str(tmp_path / "p"),
                                    config={"session.intra_op.allow_spinning": "0"})
    a, b = plain.run(None, feeds)[0], profiled.run(None, feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    trace = profiled.end_profiling()
    assert os.path.exists(trace) and os.path.basename(trace).startswith("p")



def test_random_inputs_fill_the_batch_and_refuse_unknown_other_dimensions():
    feeds = sessions.random_inputs(residual_model(), batch=3, seed=0)
    assert feeds["x"].shape == (3, 3, 10, 10) and feeds["x"].dtype == np.float32
    model = residual_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(ModelError, match="unknown dimension 2"):
        sessions.random_inputs(model)


def test_load_inputs_checks_the_shape(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((2, 3, 9, 10), np.float32))
    with pytest.raises(DataError, match="have shape"):
        sessions.load_inputs(path, residual_model())


def test_a_fixed_batch_model_with_free_sizes_is_sized_from_its_data_at_its_own_batch():
    """A model fixed to batch 2 with dynamic H, W: the sizes read off the calibration arrays were given batch 1, and the
    input-shape check then refused them ('does not fit input x [2, 16, ?, ?]') though the user gave no --input-shape."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_tucker import compress
    from onnx_tucker.runtime import shapes_of_arrays

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1] * 4)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    cal = {"x": rng.standard_normal((64, 16, 12, 12)).astype(np.float32)}
    assert shapes_of_arrays(model, cal) == {"x": [2, 16, 12, 12]}
    _, report = compress(model, ratio=0.5, calibration=cal, input_shapes=shapes_of_arrays(model, cal))
    assert report.chains


def test_a_model_file_whose_name_is_not_utf8_opens():
    """onnxruntime takes a path as UTF-8 text: a file named with a byte that is not UTF-8 (`m\\xfe.onnx`, common on
    older Linux file systems) failed as 'incompatible constructor arguments'. Such a model is loaded and handed over."""
    import shutil
    import tempfile
    from pathlib import Path

    from onnx_tucker.runtime import make_session

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(os.fsdecode(tmp.encode()), os.fsdecode(b"m\xfe.onnx"))
        shutil.copy(Path(__file__).resolve().parents[1] / "models/cifar10_cnn.onnx", path)
        session = make_session(path)
        x = np.zeros((1, 32, 32, 3), np.float32)
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 10)


def test_worker_threads_keep_to_omp_num_threads(monkeypatch):
    """A Ray task holding one CPU has OMP_NUM_THREADS=1: its thread pools must not take the node's every CPU."""
    from onnx_tucker.runtime import worker_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert worker_threads() >= 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert worker_threads() >= 1

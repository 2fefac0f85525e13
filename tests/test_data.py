"""Labelled data files and top-1 accuracy: computed right on a hand-made set, bad files refused."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.data import load_labelled, predict, top1
from onnx_tucker.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def identity_classifier(classes=4):
    """y = softmax(x): the predicted class of a sample is the argmax of its own features."""
    g = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], axis=1)], "id",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", classes])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_top1_on_hand_made_labelled_set(tmp_path):
    x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]  # predictions: 0 1 2 3 0 1 2 3
    y = np.array([0, 1, 2, 3, 3, 3, 3, 3])  # 5 of 8 right (indices 0-3 and 7)
    path = tmp_path / "set.npz"
    np.savez(path, x_test=x, y_test=y.reshape(-1, 1))
    model = identity_classifier()
    feeds, labels = load_labelled(path, model)
    assert top1(predict(model, feeds, batch_size=3), labels) == pytest.approx(5 / 8)


def test_x_y_layout_and_one_hot_labels(tmp_path):
    x = np.eye(4, dtype=np.float32)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=np.eye(4))
    feeds, labels = load_labelled(path, identity_classifier())
    assert list(labels) == [0, 1, 2, 3]


def test_limit_takes_a_seeded_subset_not_a_leading_slice(tmp_path):
    x = np.repeat(np.eye(4, dtype=np.float32), 25, axis=0)  # grouped by class, like the CIFAR files
    path = tmp_path / "set.npz"
    np.savez(path, x_test=x, y_test=np.repeat(np.arange(4), 25))
    _, a = load_labelled(path, identity_classifier(), limit=20)
    _, b = load_labelled(path, identity_classifier(), limit=20)
    assert list(a) == list(b) and len(set(a)) > 1


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"x_test": np.zeros((4, 4), np.float32)}, "no labels"),
        ({"images": np.zeros((4, 4), np.float32)}, "no labelled arrays"),
        ({"x_test": np.zeros((4, 4), np.float32), "y_test": np.arange(3)}, "4 images but 3 labels"),
        ({"x_test": np.zeros((4, 4), np.float32), "y_test": np.array([0, 1, 2, 9])}, "model has 4 outputs"),
        ({"x_test": np.zeros((4, 5), np.float32), "y_test": np.arange(4)}, "model expects"),
        ({"x_test": np.zeros((4, 4), np.float32), "y_test": np.full(4, 0.5)}, "must be integers"),
    ],
)
def test_bad_labelled_files(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=needle):
        load_labelled(path, identity_classifier())


def test_not_an_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"hello")
    with pytest.raises(DataError, match="cannot read"):
        load_labelled(path, identity_classifier())


def test_compress_reports_accuracy_of_both_models(tmp_path):
    """--data on the committed model and its committed sample: top-1 of both, and the difference."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, "-m", "onnx_tucker", ROOT / "models/cifar10_cnn.onnx", out, "--ratio", "0.5",
         "--data", ROOT / "models/cifar10_test_sample.npz", "--data-limit", "100", "--report", report],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    import json

    acc = json.loads(report.read_text())["accuracy"]
    assert acc["samples"] == 100 and acc["original"] > 0.6
    assert acc["change"] == pytest.approx(acc["compressed"] - acc["original"])
    assert "top-1 on 100 labelled samples" in r.stdout


def test_compress_with_mismatched_labels_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_test=np.zeros((3, 32, 32, 3), np.uint8), y_test=np.array([1, 2, 11]))
    r = subprocess.run(
        [sys.executable, "-m", "onnx_tucker", ROOT / "models/cifar10_cnn.onnx", tmp_path / "o.onnx", "--data", bad],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 1 and "10 outputs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_a_data_path_that_is_there_but_not_a_file_says_what_it_is(tmp_path):
    """--data /dev/null, a FIFO or a folder said 'not found' for a path that exists."""
    import os

    from conftest import residual_model

    model = residual_model()
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    (tmp_path / "folder.npz").mkdir()
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "folder.npz", "a folder"), (Path("/dev/null"), "a character device"),
                       (tmp_path / "absent.npz", "not found")):
        with pytest.raises(DataError, match=kind):
            load_labelled(path, model)


@pytest.mark.parametrize("labels, needle", [
    (np.tile(np.arange(8) % 4, (3, 1)).T, "have shape [8, 3], but the model has 4 outputs"),  # copies of the index
    (np.tile(np.arange(8) % 4, (4, 1)).T, "have shape [8, 4] but their rows are neither one-hot"),  # as wide as the classes
    (np.full((8, 4), 0.5), "neither one-hot nor class probabilities"),  # rows summing to 2
    (np.array([[2.0, -1.0, 0.0, 0.0]] * 8), "neither one-hot"),  # sum 1, but a negative "probability"
    (np.zeros((8, 4, 2), np.int64), "have shape [8, 4, 2]"),
])
def test_2d_labels_that_are_not_one_hot_or_probabilities_are_refused_not_argmaxed(tmp_path, labels, needle):
    """(N, C) labels were argmaxed whatever they held: three copies of each class index gave a top-1 of chance."""
    path = tmp_path / "set.npz"
    np.savez(path, x_test=np.eye(4, dtype=np.float32)[np.arange(8) % 4], y_test=labels)
    with pytest.raises(DataError) as info:
        load_labelled(path, identity_classifier())
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_column_one_hot_and_probability_labels_are_still_read(tmp_path):
    x = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    y = np.arange(8) % 4
    probabilities = np.full((8, 4), 0.1, np.float32)
    probabilities[np.arange(8), y] = 0.7
    for labels in (y[:, None], y[:, None, None], np.eye(4, dtype=np.uint8)[y], np.eye(4, dtype=bool)[y], probabilities):
        path = tmp_path / "set.npz"
        np.savez(path, x_test=x, y_test=labels)
        assert list(load_labelled(path, identity_classifier())[1]) == list(y)


def test_compress_refuses_tiled_labels_in_one_line(tmp_path):
    """The repro: the committed sample's y_test tiled to (500, 3) gave 'top-1 10%' and exit 0."""
    sample = np.load(ROOT / "models/cifar10_test_sample.npz")
    bad = tmp_path / "tiled.npz"
    np.savez(bad, x_test=sample["x_test"][:20], y_test=np.tile(sample["y_test"][:20].reshape(-1, 1), (1, 3)))
    r = subprocess.run(
        [sys.executable, "-m", "onnx_tucker", ROOT / "models/cifar10_cnn.onnx", tmp_path / "o.onnx", "--data", bad],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "have shape [20, 3]" in r.stderr, r.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("value, needle", [(np.nan, "contain NaN or Inf"), (np.inf, "contain NaN or Inf"),
                                           (1e300, "overflow float32")])
def test_nan_inf_or_overflowing_data_and_inputs_are_refused(tmp_path, value, needle):
    """As calibration inputs are: fed on, NaN made compress's self-check blame the compressed model and bench pass."""
    from onnx_tucker.data import load_inputs

    x = np.eye(4)[np.arange(8) % 4]
    x[3, 1] = value
    path = tmp_path / "set.npz"
    np.savez(path, x_test=x, y_test=np.arange(8) % 4)
    with pytest.raises(DataError) as info:
        load_labelled(path, identity_classifier())
    assert str(info.value) == f"images in {path} for 'x' {needle}"
    with pytest.raises(DataError) as info:
        load_inputs(path, identity_classifier())
    assert str(info.value) == f"inputs in {path} for 'x' {needle}"


def test_bench_and_compress_refuse_nan_data_and_inputs_in_one_line(tmp_path):
    x = np.load(ROOT / "models/cifar10_test_sample.npz")["x_test"][:8].astype(np.float32)
    x[2, 0, 0, 0] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, x_test=x, y_test=np.zeros(8, np.int64))
    model = ROOT / "models/cifar10_cnn.onnx"
    for args, flag_word in (([model, tmp_path / "o.onnx", "--inputs", bad], "inputs"),
                            (["bench", model, "--runs", "1", "--warmup", "0", "--data", bad, "--no-progress"], "images")):
        r = subprocess.run([sys.executable, "-m", "onnx_tucker", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{flag_word} in {bad} for 'pixels' contain NaN or Inf" in r.stderr and "self-check" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("kwargs, needle", [
    ({"size": 2.5}, "calibration size: expected a positive whole number"),
    ({"size": 0}, "calibration size: expected a positive whole number"),
    ({"size": True}, "calibration size: expected a positive whole number"),
    ({"size": "8"}, "calibration size: expected a positive whole number"),
    ({"seed": 1.5}, "seed: expected a whole number"),
    ({"image_scale": 1 / 255}, "only for calibration from an image folder"),
])
def test_load_calibration_refuses_bad_arguments_as_usage_errors(tmp_path, kwargs, needle):
    """size=2.5 was a numpy TypeError from inside the seeded sampler."""
    from conftest import residual_model

    from onnx_tucker.data import load_calibration
    from onnx_tucker.errors import UsageError

    path = tmp_path / "c.npz"
    np.savez(path, x_train=np.random.default_rng(0).random((16, 3, 10, 10), np.float32))
    with pytest.raises(UsageError, match=needle):
        load_calibration(path, residual_model(), **kwargs)
    assert len(load_calibration(path, residual_model(), size=np.int64(8))["x"]) == 8  # numpy whole numbers are fine

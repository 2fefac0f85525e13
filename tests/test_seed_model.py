"""The seed's Keras CNN: architecture layer by layer, Keras -> ONNX conversion, layouts, compression."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seed_cnn():
    keras.utils.set_random_seed(0)
    return load_tool("train_cifar10").build_seed_cnn()


@pytest.fixture(scope="module")
def seed_onnx(seed_cnn):
    from onnx_tucker.convert import keras_to_onnx

    return keras_to_onnx(seed_cnn, output_name="probabilities")


def describe(model):
    """(kind, key settings) per layer, in order."""
    rows = []
    for layer in model.layers:
        cfg = layer.get_config()
        kind = type(layer).__name__
        if kind == "Conv2D":
            rows.append((kind, cfg["filters"], tuple(cfg["kernel_size"]), cfg["padding"], tuple(cfg["strides"])))
        elif kind == "BatchNormalization":
            rows.append((kind, cfg["momentum"], cfg["epsilon"]))
        elif kind == "Activation":
            rows.append((kind, cfg["activation"]))
        elif kind == "MaxPooling2D":
            rows.append((kind, tuple(cfg["pool_size"]), tuple(cfg["strides"])))
        elif kind == "Dense":
            rows.append((kind, cfg["units"]))
        elif kind == "Rescaling":
            rows.append((kind, round(cfg["scale"], 8), cfg["offset"]))
        else:
            rows.append((kind,))
    return rows


def expected_seed_architecture():
    relu, bn = ("Activation", "relu"), ("BatchNormalization", 0.9, 1e-4)
    rows = [("Rescaling", round(2 / 255, 8), -1.0)]
    for block, filters in enumerate((64, 128, 256)):
        for _ in range(2):
            rows += [("Conv2D", filters, (3, 3), "valid", (1, 1)), relu, bn]
        if block < 2:
            rows.append(("MaxPooling2D", (2, 2), (2, 2)))
    rows.append(("Flatten",))
    for _ in range(2):
        rows += [("Dense", 512), relu, bn]
    rows += [("Dense", 10), ("Activation", "softmax")]
    return rows


def test_architecture_matches_the_seed_layer_by_layer(seed_cnn):
    assert describe(seed_cnn) == expected_seed_architecture()
    assert tuple(seed_cnn.inputs[0].shape[1:]) == (32, 32, 3)


def test_committed_model_has_the_seed_architecture():
    model = keras.saving.load_model(ROOT / "models/cifar10_cnn.keras", compile=False)
    assert describe(model) == expected_seed_architecture()


def test_conversion_agrees_with_keras_on_raw_pixels(seed_cnn, seed_onnx):
    from onnx_tucker.runtime import make_session

    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(seed_cnn(x, training=False))
    got = make_session(seed_onnx).run(None, {seed_onnx.graph.input[0].name: x})[0]
    assert np.max(np.abs(expected - got)) < 1e-5
    dims = seed_onnx.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]  # NHWC, dynamic batch


def test_keras_hwio_kernel_becomes_onnx_oihw_weight(seed_cnn, seed_onnx):
    """The layout is tested, not assumed: Keras HWIO (3,3,64,64) == ONNX OIHW (64,64,3,3) transposed."""
    from onnx_tucker.pipeline import factorable_sites

    convs = [s for s in factorable_sites(seed_onnx)[1] if s.weight is not None]
    kernels = [layer.get_weights()[0] for layer in seed_cnn.layers if type(layer).__name__ == "Conv2D"]
    assert len(convs) == len(kernels) == 6
    for cand, hwio in zip(convs, kernels):
        assert np.array_equal(cand.weight, np.transpose(hwio, (3, 2, 0, 1)))


def test_seed_cnn_compresses_and_runs(seed_onnx):
    from onnx_tucker import compress
    from onnx_tucker.runtime import make_session

    new, report = compress(seed_onnx, ratio=0.5)
    onnx.checker.check_model(new)
    layers = {r.layer: r for r in report.layers}
    first = report.layers[0]
    assert not first.decomposed and "would not reduce MACs" in first.reason  # the seed's "skip the first conv"
    assert len(report.decomposed) == 5 and 2.3 < report.totals()["macs_reduction"] < 2.6
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    out = make_session(new).run(None, {new.graph.input[0].name: x})[0]
    assert out.shape == (4, 10) and np.allclose(out.sum(1), 1, atol=1e-5)
    assert layers


def test_seed_cnn_full_rank_is_exact(seed_onnx):
    from onnx_tucker import compress
    from onnx_tucker.runtime import make_session

    new, _ = compress(seed_onnx, ratio=1.0, force=True)
    x = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    name = seed_onnx.graph.input[0].name
    a = make_session(seed_onnx).run(None, {name: x})[0]
    b = make_session(new).run(None, {name: x})[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4


def test_convert_command_writes_agreeing_model(tmp_path, seed_cnn):
    src = tmp_path / "seed.keras"
    seed_cnn.save(src)
    out = tmp_path / "seed.onnx"
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", "convert", src, out], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "from_function" in r.stdout and "max abs difference" in r.stdout
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("content, needle", [(b"not a zip at all", "not a Keras model"), (b"PK\x03\x04garbage", "Keras model")])
def test_convert_rejects_files_that_are_not_keras_models(tmp_path, content, needle):
    src = tmp_path / "bad.keras"
    src.write_bytes(content)
    before = set(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", "convert", src, tmp_path / "o.onnx"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
    assert set(tmp_path.iterdir()) == before

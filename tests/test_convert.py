"""`onnx-tucker convert` on the Keras 3 applications (issue 11 item 5, issue 12 item 10).

Every keras.applications model (random weights, the smallest square input it accepts, 10 classes, logits out)
is converted, checked by onnx.checker, run in onnxruntime, compared with Keras, and compressed at ratio 0.5:
the procedure of tools/keras_applications.py, which wrote docs/keras_applications.md.

Time (each application is built, traced and converted: 5 s to 2 minutes on a 2-core VM), chosen with
ONNX_TUCKER_KERAS_APPS:
- unset (CI): the four applications of the user report (ResNet50, MobileNetV3Small, ConvNeXtTiny,
  EfficientNetV2B0) and the three cheap ones MobileNet, MobileNetV2, EfficientNetB0: 1.5 minutes on a quiet
  2-core VM (5 under load), 3.4 GB peak;
- ``families``: also the smallest member of every other family (DenseNet, Inception, NASNet, ResNetV2, VGG,
  Xception): 3.5 minutes more, 6.4 GB peak;
- ``all``: every application (about half an hour; ConvNeXtLarge/XLarge and EfficientNetV2L need 14 to 42 GB).
docs/keras_applications.md has every one's result.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")


def _tool():
    spec = importlib.util.spec_from_file_location("keras_applications", ROOT / "tools" / "keras_applications.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _tool()

# the smallest member of each family (the one the family's name is built around)
SMALLEST = {
    "ConvNeXt": "ConvNeXtTiny", "DenseNet": "DenseNet121", "EfficientNet": "EfficientNetB0",
    "EfficientNetV2": "EfficientNetV2B0", "InceptionResNetV2": "InceptionResNetV2", "InceptionV3": "InceptionV3",
    "MobileNet": "MobileNet", "MobileNetV2": "MobileNetV2", "MobileNetV3": "MobileNetV3Small", "NASNet": "NASNetMobile",
    "ResNet": "ResNet50", "ResNetV2": "ResNet50V2", "VGG": "VGG16", "Xception": "Xception",
}
# applications refused on purpose, with the reason's text: none (every one converts)
REFUSED: dict[str, str] = {}
DEFAULT = {"ResNet50", "MobileNetV3Small", "ConvNeXtTiny", "EfficientNetV2B0", "MobileNet", "MobileNetV2", "EfficientNetB0"}
LEVEL = os.environ.get("ONNX_TUCKER_KERAS_APPS", "")


def _params():
    params = []
    for name in tool.application_names():
        fam = tool.family(name)
        marks = [pytest.mark.slow]
        if LEVEL == "all" or name in DEFAULT:
            pass
        elif SMALLEST.get(fam) == name:
            if LEVEL != "families":
                marks.append(pytest.mark.skip(reason=f"smallest {fam}: runs with ONNX_TUCKER_KERAS_APPS=families or all "
                                                     "(3.5 minutes more; docs/keras_applications.md has its result)"))
        else:
            marks.append(pytest.mark.skip(
                reason=f"larger member of the {fam} family ({SMALLEST.get(fam, '?')} is the one tested): same layers, "
                       "more conversion time; runs with ONNX_TUCKER_KERAS_APPS=all (docs/keras_applications.md has it)"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_every_application_has_a_family_and_each_family_its_smallest_member():
    names = tool.application_names()
    assert len(names) >= 40
    assert {tool.family(n) for n in names} == set(SMALLEST)
    assert set(SMALLEST.values()) <= set(names) and DEFAULT <= set(SMALLEST.values())


@pytest.mark.parametrize("name", _params())
def test_keras_application_converts_agrees_and_compresses(name, record_property):
    row = tool.check_application(name, compress=False)
    if name in REFUSED:
        assert row["status"] == "refused" and REFUSED[name] in row["reason"] and "\n" not in row["reason"]
        return
    assert row["status"] == "converted", row
    model = row["onnx_model"]
    onnx.checker.check_model(model)                                   # (check_application ran it too)
    assert [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}] == \
        [model.graph.input[0].name]                                   # no constants left as inputs
    assert not {n.op_type for n in model.graph.node} & {"StatefulPartitionedCall", "PartitionedCall", "Erfc"}
    # within the tolerances, or (deep ResNets) onnxruntime no farther from a float64 run than TensorFlow's float32
    assert row["agrees"], row
    import onnx_tucker

    new, report = onnx_tucker.compress(model, ratio=0.5, n_iter_max=0)  # HOSVD: validity here, not fit quality
    onnx.checker.check_model(new)
    totals = report.totals()
    assert totals["convs"] == row["convs"]
    if not report.decomposed:
        assert report.notes, "nothing decomposed and no note"
    record_property("result", f"{name} {row['input']}: rel.err {row['rel_error']:.2g}, {totals['decomposed']}/{totals['convs']} convs decomposed")


# --- the command --------------------------------------------------------------------------------


def test_convert_command_folds_the_leftovers(tmp_path):
    """Normalization constants, a grouped conv (XLA) and exact GELU through `onnx-tucker convert`."""
    src, out = tmp_path / "tiny.keras", tmp_path / "tiny.onnx"
    from test_keras_fold import tiny_leftover_model

    tiny_leftover_model().save(src)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", "convert", src, out], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PASSED" in r.stdout
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert len(model.graph.input) == 1
    from onnx_tucker.runtime import make_session

    x = np.random.default_rng(1).uniform(0, 255, (3, 12, 12, 4)).astype(np.float32)
    assert make_session(model).run(None, {model.graph.input[0].name: x})[0].shape == (3, 10)


def test_convert_refuses_an_op_tf2onnx_cannot_map(tmp_path, monkeypatch):
    """An op tf2onnx has no handler for: one line naming it, exit 1, nothing written (Erfc's handler removed)."""
    from onnx_tucker import keras_fold
    from onnx_tucker.convert import keras_to_onnx
    from onnx_tucker.errors import ModelError

    monkeypatch.setattr(keras_fold, "CUSTOM_OP_HANDLERS", {})
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, activation="gelu")(inputs)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    with pytest.raises(ModelError, match=r"^tf2onnx could not convert these TensorFlow ops: Erfc$"):
        keras_to_onnx(model)


def test_an_opset_tf2onnx_cannot_write_is_one_model_error_line():
    """The API path (the command may refuse the value earlier, as an argument): tf2onnx's own refusal, one line."""
    from onnx_tucker.convert import keras_to_onnx
    from onnx_tucker.errors import ModelError

    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inputs)))
    with pytest.raises(ModelError) as err:
        keras_to_onnx(model, opset=99)
    assert "Opset 99" in str(err.value) and "\n" not in str(err.value)


def test_convert_refuses_non_finite_inputs_for_its_agreement_check(tmp_path):
    """`convert --inputs` with a NaN printed 'max abs difference nan' and then PASSED and wrote the model: NaN is
    not greater than any tolerance. Non-finite inputs are refused before the conversion, and a NaN difference fails."""
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    x[1, 2, 3, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "onnx_tucker", "convert", ROOT / "models/cifar10_cnn.keras", tmp_path / "o.onnx",
                        "--inputs", tmp_path / "nan.npz"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 1 and "contains NaN or Inf" in r.stderr and not (tmp_path / "o.onnx").exists()
    assert r.stderr.strip().count("\n") == 0


def _keras_file(tmp_path, name, build):
    path = tmp_path / f"{name}.keras"
    build().save(path)
    return path


def _convert(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "onnx_tucker", "convert", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_convert_asks_for_inputs_when_the_keras_input_has_open_sizes(tmp_path):
    """keras.Input((None, None, 3)): random inputs were drawn at shape (8, None, None, 3), an internal TypeError."""
    def build():
        inputs = keras.Input((None, None, 3))
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))

    r = _convert(_keras_file(tmp_path, "open", build), tmp_path / "o.onnx")
    assert r.returncode == 2 and "open sizes" in r.stderr and "--inputs" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_convert_tolerance_scales_with_large_outputs_and_errors_name_their_cause(tmp_path):
    """Logits of ~400 on 0..255 inputs differ by ~1e-4 in float32: the absolute 1e-4 refused a correct conversion.
    And a layer name TensorFlow refuses was reported as 'in user code: File ..., in serve', not the cause."""
    def logits():
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer="ones")(inputs)
        return keras.Model(inputs, keras.layers.Dense(5, kernel_initializer="ones")(keras.layers.Flatten()(x)))

    r = _convert(_keras_file(tmp_path, "logits", logits), tmp_path / "l.onnx")
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr[-800:]

    def spaced():
        inputs = keras.Input((8, 8, 3))
        return keras.Model(inputs, keras.layers.Flatten()(keras.layers.Conv2D(4, 3, name="my conv")(inputs)))

    r = _convert(_keras_file(tmp_path, "spaced", spaced), tmp_path / "s.onnx")
    assert r.returncode == 1 and "'my conv' is not a valid scope name" in r.stderr and r.stderr.strip().count("\n") == 0


def test_convert_judges_a_mixed_precision_model_at_float16_precision(tmp_path):
    """A mixed_float16 CNN was refused as 'Keras and onnxruntime disagree' at the default 1e-4 (both round to float16:
    0.03 apart at outputs of ~100); its default tolerance is now float16's, and a refusal names the layers' dtype."""
    def build():
        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            inputs = keras.Input((32, 32, 3))
            x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
            x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(64, 3, padding="same")(x))
            return keras.Model(inputs, keras.layers.Dense(10, dtype="float32")(x))
        finally:
            keras.mixed_precision.set_global_policy("float32")

    path = _keras_file(tmp_path, "mixed", build)
    r = _convert(path, tmp_path / "m.onnx")
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr[-800:]
    r = _convert(path, tmp_path / "n.onnx", "--tolerance", "1e-7")
    assert r.returncode == 1 and "layers in float16" in r.stderr and "--tolerance" in r.stderr and not (tmp_path / "n.onnx").exists()


def test_convert_says_when_keras_itself_gives_nan_and_when_inputs_are_not_an_archive(tmp_path):
    """Keras's own NaN output was reported as the two runtimes disagreeing by nan; an .npz without arrays as 'list index
    out of range' and a text file as numpy's advice about pickles."""
    def build():
        inputs = keras.Input((8, 8, 3))
        norm = keras.layers.BatchNormalization()
        model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(norm(keras.layers.Conv2D(4, 3)(inputs)))))
        gamma, beta, mean, variance = norm.get_weights()
        norm.set_weights([gamma, beta, mean, -np.ones_like(variance)])  # sqrt of a negative variance: NaN in Keras too
        return model

    r = _convert(_keras_file(tmp_path, "nan", build), tmp_path / "o.onnx")
    assert r.returncode == 1 and "the Keras model's own outputs are not finite" in r.stderr and r.stderr.strip().count("\n") == 0
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "text.npz").write_text("not an archive\n")
    for name, needle in (("empty.npz", "holds no arrays"), ("text.npz", "not a numpy .npz archive")):
        r = _convert(ROOT / "models/cifar10_cnn.keras", tmp_path / "o.onnx", "--inputs", tmp_path / name)
        assert r.returncode == 1 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_convert_keeps_the_keras_inputs_dtype(tmp_path):
    """A Keras model taking uint8 pixels became an ONNX model with a float32 input that those pixels could not feed."""
    def build():
        inputs = keras.Input((8, 8, 3), dtype="uint8")
        x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
        return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))

    r = _convert(_keras_file(tmp_path, "u8", build), tmp_path / "u8.onnx")
    assert r.returncode == 0, r.stderr[-800:]
    model = onnx.load(str(tmp_path / "u8.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

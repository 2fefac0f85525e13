"""Keras -> ONNX with tf2onnx. TensorFlow is imported here only, when a conversion is asked for.

tf2onnx's ``from_keras`` fails on Keras 3 models (KeyError on output names), so
the route used is tf2onnx on a ``tf.function`` that calls the model with a fixed
input signature (dynamic batch), through ``keras_fold.function_to_onnx``: the steps
of ``from_function`` with what they leave behind on Keras 3 applications folded
(captured constants, XLA-marked calls, Erfc) or refused with one line.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError, ModelError, first_line

ROUTE = "tf2onnx from_function(tf.function(model), input_signature), leftovers folded (keras_fold)"
DEFAULT_OPSET = 17


@dataclass
class Conversion:
    model: onnx.ModelProto
    route: str
    max_abs_diff: float | None
    input_name: str
    output_name: str


def load_keras(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Keras model not found: {path}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a Keras model (a .keras file is a zip archive)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
    except ImportError:
        raise ModelError("converting Keras models needs TensorFlow: pip install 'onnx-tucker[keras]'") from None
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        text = first_line(exc)
        raise ModelError(f"{path} is not a Keras model this tool can load: {text[:200]}") from None


def keras_to_onnx(model, opset: int = DEFAULT_OPSET, input_name: str | None = None, output_name: str | None = None) -> onnx.ModelProto:
    """Convert a loaded Keras 3 model (single input, single output) to ONNX, batch dimension dynamic."""
    import tensorflow as tf

    from onnx_tucker.keras_fold import function_to_onnx

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError("only single-input, single-output Keras models are converted")
    input_name = input_name or (model.inputs[0].name.split(":")[0] or "input")
    shape = [None] + list(model.inputs[0].shape[1:])
    signature = (tf.TensorSpec(shape, tf.float32, name=input_name),)

    @tf.function(input_signature=signature)
    def serve(x):
        return {"output": model(x, training=False)}

    onnx_model = function_to_onnx(serve, signature, opset)
    output_name = output_name or "output"
    _rename_output(onnx_model, onnx_model.graph.output[0].name, output_name)
    for value in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx_model.producer_name = "tf2onnx (via onnx-tucker convert)"
    return onnx_model


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def convert(path: str | os.PathLike, opset: int = DEFAULT_OPSET, samples: np.ndarray | None = None, seed: int = 0) -> Conversion:
    """Load a .keras file, convert it, and measure Keras vs onnxruntime agreement on ``samples``
    (or seeded random inputs in 0..255, the range of raw-pixel models)."""
    from onnx_tucker.runtime import make_session

    keras_model = load_keras(path)
    name = keras_model.layers[-1].name if keras_model.layers else "output"
    onnx_model = keras_to_onnx(keras_model, opset=opset, output_name=name)
    input_name = onnx_model.graph.input[0].name
    if samples is None:
        rng = np.random.default_rng(seed)
        samples = rng.uniform(0, 255, size=(8,) + tuple(keras_model.inputs[0].shape[1:])).astype(np.float32)
    expected = np.asarray(keras_model(samples, training=False))
    got = make_session(onnx_model).run(None, {input_name: samples.astype(np.float32)})[0]
    diff = float(np.max(np.abs(expected - got)))
    return Conversion(model=onnx_model, route=ROUTE, max_abs_diff=diff, input_name=input_name, output_name=name)

"""Keras -> ONNX with tf2onnx. TensorFlow is imported here only, when a conversion is asked for.

tf2onnx's ``from_keras`` fails on Keras 3 models (KeyError on output names), so
the route used is tf2onnx on a ``tf.function`` that calls the model with a fixed
input signature (dynamic batch), through ``keras_fold.function_to_onnx``: the steps
of ``from_function`` with what they leave behind on Keras 3 applications folded
(captured constants, XLA-marked calls, Erfc) or refused with one line.
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError, ModelError, UsageError, first_line

ROUTE = "tf2onnx from_function(tf.function(model), input_signature), leftovers folded (keras_fold)"
DEFAULT_OPSET = 17
# The opsets tf2onnx 1.17 (pinned in pyproject.toml) can write: its constants.OPSET_TO_IR_VERSION.
MIN_OPSET, MAX_OPSET = 7, 18


def check_opset(opset: int) -> int:
    """Refuse, before TensorFlow is even imported, an opset tf2onnx cannot write."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset} is not supported: tf2onnx converts to opsets {MIN_OPSET} to {MAX_OPSET}")
    return opset


@contextmanager
def quiet_native_stderr():
    """TensorFlow's C++ side writes to file descriptor 2 when it loads (absl's pre-init notice, oneDNN),
    whatever TF_CPP_MIN_LOG_LEVEL says, and tf2onnx logs warnings there: a failed conversion must
    still be one line. Native stderr goes to a temporary file meanwhile, replayed with ONNX_TUCKER_DEBUG."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            if os.environ.get("ONNX_TUCKER_DEBUG"):
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))


@dataclass
class Conversion:
    model: onnx.ModelProto
    route: str
    max_abs_diff: float | None
    input_name: str
    output_name: str
    max_abs_output: float | None = None  # the Keras output's largest magnitude: what the tolerance scales with
    compute_dtype: str = "float32"  # the narrowest float a layer computes in (mixed precision: float16 or bfloat16)
    keras_finite: bool = True  # whether the Keras model's own outputs were finite on the check inputs


def load_keras(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():  # a usage error, exit 2, as compress's missing input
        raise UsageError(f"Keras model not found: {path}")
    if not path.is_file():
        raise UsageError(f"Keras model is not a file: {path}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a Keras model (a .keras file is a zip archive)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_native_stderr():
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
    # the input's own dtype (a uint8 image model became a float32 one that its uint8 pixels could not feed)
    signature = (tf.TensorSpec(shape, tf.as_dtype(input_dtype(model)), name=input_name),)

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

    check_opset(opset)
    keras_model = load_keras(path)
    if len(keras_model.inputs) != 1 or len(keras_model.outputs) != 1:
        raise ModelError("only single-input, single-output Keras models are converted")
    want = tuple(keras_model.inputs[0].shape[1:])
    if samples is not None:
        samples = np.asarray(samples)
        if samples.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, samples.shape[1:])):
            raise DataError(f"inputs have shape {list(samples.shape)}, the Keras model expects {['N', *want]}")
        if len(samples) == 0:
            raise DataError(f"inputs hold no samples (shape {list(samples.shape)})")
        if samples.dtype.kind not in "biuf":
            raise DataError(f"inputs have dtype {samples.dtype}, which cannot be fed to the Keras model")
    elif any(w is None for w in want):  # random inputs need every size: one line now, not a TypeError after tf2onnx
        raise UsageError(f"the Keras model's input has open sizes {['N', *want]}: give real samples for the agreement "
                         "check with --inputs FILE.npz")
    name = keras_model.layers[-1].name if keras_model.layers else "output"
    with quiet_native_stderr():
        try:
            onnx_model = keras_to_onnx(keras_model, opset=opset, output_name=name)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"tf2onnx cannot convert {path} at opset {opset}: {_reason(exc)}") from None
        input_name = onnx_model.graph.input[0].name
        if samples is None:
            rng = np.random.default_rng(seed)
            samples = rng.uniform(0, 255, size=(8,) + want).astype(np.float32)
        samples = samples.astype(input_dtype(keras_model))
        try:
            expected = np.asarray(keras_model(samples, training=False))
        except Exception as exc:
            raise DataError(f"Keras cannot run the model on the given inputs: {first_line(exc, 200)}") from None
        session = make_session(onnx_model)
        try:
            got = session.run(None, {input_name: samples})[0]
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot run the converted model: {first_line(exc, 200)}") from None
    diff = float(np.max(np.abs(expected.astype(np.float64) - got)))
    finite = bool(np.isfinite(expected).all())
    return Conversion(model=onnx_model, route=ROUTE, max_abs_diff=diff, input_name=input_name, output_name=name,
                      max_abs_output=float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0)),
                      compute_dtype=compute_dtype(keras_model), keras_finite=finite)


def input_dtype(keras_model) -> str:
    """The numpy name of the Keras input's dtype (float32 where Keras does not say)."""
    dtype = getattr(keras_model.inputs[0], "dtype", None) or "float32"
    return str(getattr(dtype, "name", dtype))


def compute_dtype(keras_model) -> str:
    """'float16' or 'bfloat16' where any layer computes in it (a mixed-precision policy), else 'float32'."""
    found = {str(getattr(layer, "compute_dtype", "float32")) for layer in _all_layers(keras_model)}
    return next((d for d in ("bfloat16", "float16") if d in found), "float32")


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def _reason(exc: Exception) -> str:
    """The line of a TensorFlow error that says what is wrong. Its first line says only where in the traced code it
    happened ('in user code:'); the cause is the 'XError: ...' line inside, or, where Keras wraps it ('Exception
    encountered when calling ...'), the line after (a layer named 'my conv': "'my conv' is not a valid scope name")."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        found = re.match(r"^\w+(?:Error|Exception): (.*)$", line)
        if found:
            if found.group(1).startswith("Exception encountered") and i + 1 < len(lines):
                return lines[i + 1][:200]
            return line[:200]
    return first_line(exc, 200)

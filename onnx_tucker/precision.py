"""Float16 models: converting a float32 model for an fp16 benchmark, and telling a model's float type.

The tool compresses float16 models as they are: every fit, refit and budget runs in float32/64 on the
weights (``site`` loads them, the forms decompose in float64) and the factors are written back in the
weight's dtype, so an fp16 model stays fp16. ``bench --fp16`` times the fp16 versions of float32 models:
the conversion is onnxruntime's own (``onnxruntime.transformers.float16``, what ORT's and Olive's tooling
use), so it ships with the onnxruntime the tool already needs.
"""
from __future__ import annotations

import warnings
from collections import Counter

import onnx

from onnx_tucker.errors import UsageError

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64",
               onnx.TensorProto.BFLOAT16: "bfloat16"}


def weight_dtype(model: onnx.ModelProto) -> str:
    """The float type most of the model's weight values are stored in ("float32" for a model without any)."""
    counts: Counter = Counter()
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            size = 1
            for d in init.dims:
                size *= d
            counts[FLOAT_TYPES[init.data_type]] += size
    return counts.most_common(1)[0][0] if counts else "float32"


def to_float16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """A float16 copy of ``model`` (weights and activations; inputs and outputs stay float32 by default, so
    the same feeds and labels work, at the cost of one Cast at each end). An fp16 model comes back as is."""
    if weight_dtype(model) == "float16":
        return model
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise UsageError(f"float16 conversion needs onnxruntime's transformers tools ({exc}): pip install 'onnx-tucker[cpu]'") from None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "truncated to 1e-07" for every tiny weight: expected in fp16
        return convert_float_to_float16(copy, keep_io_types=keep_io_types)

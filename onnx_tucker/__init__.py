"""onnx-tucker: compress ONNX CNNs by Tucker-2 decomposition of their Conv layers."""
from __future__ import annotations

__version__ = "0.1.0"

from onnx_tucker.errors import DataError, ModelError, OnnxTuckerError, UsageError


def compress(model, ratio: float = 0.5, **options):
    """Compress an ``onnx.ModelProto`` (or a path); returns ``(new_model, report)``.

    See :func:`onnx_tucker.pipeline.compress` for the options.
    """
    from onnx_tucker.pipeline import compress as _compress

    return _compress(model, ratio=ratio, **options)


__all__ = ["compress", "OnnxTuckerError", "UsageError", "ModelError", "DataError", "__version__"]

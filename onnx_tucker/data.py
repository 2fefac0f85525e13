"""Labelled data files (.npz) and top-1 accuracy of a model on them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError
from onnx_tucker.runtime import graph_inputs, input_spec

# Accepted (images, labels) key pairs, in order of preference: keras layout first.
LABELLED_KEYS = (("x_test", "y_test"), ("x", "y"), ("x_train", "y_train"))


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read data file {path} (expected a .npz): {text[:200]}") from None


def num_classes(model: onnx.ModelProto) -> int | None:
    """Size of the last dimension of the first output, when it is known."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value"):
        return int(dims[-1].dim_value)
    return None


def load_labelled(path: str | os.PathLike, model: onnx.ModelProto, limit: int | None = None, seed: int = 0):
    """(feeds, labels) from a labelled .npz for a single-input classifier.

    ``limit`` takes a seeded random subset (the files may be grouped by class).
    """
    path = Path(path)
    arrays = _open_npz(path)
    for xk, yk in LABELLED_KEYS:
        if xk in arrays:
            if yk not in arrays:
                raise DataError(f"{path} has images '{xk}' but no labels '{yk}'")
            images, labels = arrays[xk], arrays[yk]
            break
    else:
        raise DataError(f"{path} has no labelled arrays: expected x_test/y_test or x/y (found {', '.join(sorted(arrays)) or 'nothing'})")
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise DataError("accuracy on labelled data needs a single-input model")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = labels.argmax(1)  # one-hot
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels in {path} must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise DataError(f"{path} has {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{path} holds no samples")
    classes = num_classes(model)
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels in {path} span {labels.min()}..{labels.max()}, but the model has {classes} outputs")
    dims, dtype = input_spec(inputs[0])
    if images.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], images.shape[1:])):
        want = ["N" if d is None else d for d in dims]
        raise DataError(f"images in {path} have shape {list(images.shape)}, the model expects {want}")
    if limit and limit < len(labels):
        pick = np.sort(np.random.default_rng(seed).choice(len(labels), limit, replace=False))
        images, labels = images[pick], labels[pick]
    return {inputs[0].name: images.astype(dtype)}, labels.astype(np.int64)


def predict(model, feeds: dict, batch_size: int = 100, provider: str = "cpu", progress: str | None = None) -> np.ndarray:
    """First output of ``model`` over all samples, in batches, with an optional tqdm bar."""
    from tqdm import tqdm

    from onnx_tucker.runtime import make_session

    session = make_session(model, provider)
    n = len(next(iter(feeds.values())))
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None)
    outs = [session.run(None, {k: v[s : s + batch_size] for k, v in feeds.items()})[0] for s in bar]
    return np.concatenate(outs)


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(outputs.reshape(len(labels), -1).argmax(1) == labels))

"""Labelled data files (.npz) and top-1 accuracy of a model on them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx

from onnx_tucker.errors import DataError, UsageError, first_line
from onnx_tucker.runtime import graph_inputs, input_spec

# Accepted (images, labels) key pairs, in order of preference: keras layout first.
LABELLED_KEYS = (("x_test", "y_test"), ("x", "y"), ("x_train", "y_train"))


def _missing(path: Path, what: str) -> DataError:
    """'not found' for a path that is not there; what it is, for one that is there but not a regular file (a folder,
    a FIFO, /dev/null): 'not found' sent people looking for a file that exists."""
    from onnx_tucker.outputs import describe

    return DataError(f"{what} not found: {path}" if not os.path.lexists(path) else f"{what} {path} is {describe(path)}, not a file")


def _open_npz(path: Path, what: str = "data file") -> dict[str, np.ndarray]:
    if not path.is_file():
        raise _missing(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        text = first_line(exc)
        raise DataError(f"cannot read {what} {path} (expected a .npz): {text[:200]}") from None
    for key, value in arrays.items():  # numpy hands back a member without the .npy header as raw bytes
        if not isinstance(value, np.ndarray):
            raise DataError(f"cannot read {what} {path}: member '{key}' is not a .npy array")
    return arrays


def _check_feedable(value: np.ndarray, dims: list, dtype, name: str, where: str) -> None:
    """One line for an array the model cannot be fed: wrong shape, no samples, a kind that cannot be cast, NaN or Inf
    (as calibration inputs are refused: fed on, they made the self-check blame the compressed model, and bench
    printed max|diff| nan and passed)."""
    want = ["N" if d is None else d for d in dims]
    if value.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], value.shape[1:])):
        raise DataError(f"{where} for '{name}' have shape {list(value.shape)}, the model expects {want}")
    if value.ndim and len(value) == 0:  # a scalar input (shape []) is one value, fed whole to every batch
        raise DataError(f"{where} for '{name}' hold no samples (shape {list(value.shape)})")
    if value.dtype.kind not in "biufc":  # strings, bytes, dates: astype would fail or make nonsense
        raise DataError(f"{where} for '{name}' have dtype {value.dtype}, which cannot be cast to the model's {np.dtype(dtype)}")
    if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
        raise DataError(f"{where} for '{name}' contain NaN or Inf")


def _cast(value: np.ndarray, dtype, name: str, where: str) -> np.ndarray:
    """``value`` as the model's dtype; one line where finite values overflow it (float64 1e300 to float32: Inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(dtype)
    if out.dtype.kind in "fc" and not np.all(np.isfinite(out)):
        raise DataError(f"{where} for '{name}' overflow {np.dtype(dtype)}")
    return out


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an .npz: one array per input name, or one array for a single-input model.

    A keras-layout labelled file (``x_test``/``x_train``/``x``) also works for a single-input model.
    Arrays that cannot be fed (wrong shape, empty, strings...) are one-line :class:`DataError` s.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "inputs file")
    arrays = _open_npz(path, "inputs file")
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    if all(n in arrays for n in names):
        chosen = {n: arrays[n] for n in names}
    elif len(names) == 1:
        key = next((k for k in ("x_test", "x_train", "x", "inputs") if k in arrays), None)
        if key is None and len(arrays) != 1:
            raise DataError(f"{path} has arrays {sorted(arrays)}; expected one named '{names[0]}' (or x/x_test)")
        chosen = {names[0]: arrays[key] if key is not None else next(iter(arrays.values()))}
    else:
        raise DataError(f"{path} must hold one array per model input: {', '.join(names)}")
    feeds = {}
    for vi in inputs:
        dims, dtype = input_spec(vi)
        _check_feedable(chosen[vi.name], dims, dtype, vi.name, f"inputs in {path}")
        feeds[vi.name] = _cast(chosen[vi.name], dtype, vi.name, f"inputs in {path}")
    counts = {len(v) for v in feeds.values() if v.ndim}  # a scalar input has no samples to count
    if len(counts) > 1:
        raise DataError(f"arrays in {path} have different sample counts: {sorted(counts)}")
    return feeds


def check_classifier(model: onnx.ModelProto) -> None:
    """Top-1 needs class scores per sample: refuse a model whose first output is known to be a scalar."""
    out = model.graph.output[0]
    t = out.type.tensor_type
    if out.type.HasField("tensor_type") and t.HasField("shape") and len(t.shape.dim) == 0:
        raise DataError(f"top-1 needs one row of class scores per sample, but the model's first output '{out.name}' is a scalar")


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
    check_classifier(model)
    classes = num_classes(model)
    labels = _class_indices(np.asarray(labels), path, classes)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels in {path} must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise DataError(f"{path} has {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{path} holds no samples")
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels in {path} span {labels.min()}..{labels.max()}, but the model has {classes} outputs")
    dims, dtype = input_spec(inputs[0])
    if images.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], images.shape[1:])):
        want = ["N" if d is None else d for d in dims]
        raise DataError(f"images in {path} have shape {list(images.shape)}, the model expects {want}")
    _check_feedable(images, dims, dtype, inputs[0].name, f"images in {path}")
    if limit and limit < len(labels):
        pick = np.sort(np.random.default_rng(seed).choice(len(labels), limit, replace=False))
        images, labels = images[pick], labels[pick]
    return {inputs[0].name: _cast(images, dtype, inputs[0].name, f"images in {path}")}, labels.astype(np.int64)


def _class_indices(labels: np.ndarray, path, classes: int | None) -> np.ndarray:
    """Labels as one class index per sample: (N,) or (N, 1) as they are; (N, C) rows only if they are one-hot
    (one 1, the rest 0) or class probabilities (>= 0, summing to 1), with C the model's class count where that is
    known. Any other 2-D array was argmaxed before: (N, 3) copies of the index gave a top-1 of chance."""
    if labels.ndim >= 2 and all(d == 1 for d in labels.shape[1:]):
        return labels.reshape(len(labels))
    if labels.ndim <= 1:
        return labels.reshape(-1)
    shape = list(labels.shape)
    want = f"[N, {classes}]" if classes is not None else "[N, classes]"
    if labels.ndim > 2 or labels.dtype.kind not in "biuf":
        raise DataError(f"labels in {path} have shape {shape} and dtype {labels.dtype}: expected one class index per "
                        f"sample (shape [N] or [N, 1]) or one-hot/probability rows {want}")
    if classes is not None and labels.shape[1] != classes:
        raise DataError(f"labels in {path} have shape {shape}, but the model has {classes} outputs: expected one class "
                        f"index per sample (shape [N] or [N, 1]) or one-hot/probability rows {want}")
    rows = labels.astype(np.float64)
    one_hot = bool(np.all((rows == 0) | (rows == 1)) and np.all(rows.sum(1) == 1))
    probabilities = labels.dtype.kind == "f" and bool(
        np.all(np.isfinite(rows)) and np.all(rows >= 0) and np.allclose(rows.sum(1), 1.0, rtol=0, atol=1e-3))
    if not (one_hot or probabilities):
        raise DataError(f"labels in {path} have shape {shape} but their rows are neither one-hot nor class probabilities "
                        f"(>= 0, summing to 1): give one class index per sample (shape [N] or [N, 1]) or rows {want}")
    return rows.argmax(1)


def predict(model, feeds: dict, batch_size: int = 100, provider: str = "cpu", progress: str | None = None) -> np.ndarray:
    """First output of ``model`` over all samples, in batches, with an optional tqdm bar."""
    from onnx_tucker.capture import capture

    outputs = capture(model, feeds, provider=provider, batch_size=batch_size, progress=progress)[0]
    if outputs.ndim == 0 or len(outputs) != len(next(iter(feeds.values()))):
        raise DataError("top-1 needs one row of class scores per sample, but the model's first output is a scalar")
    return outputs


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    if outputs.ndim == 0 or len(outputs) != len(labels):
        raise DataError(f"top-1 needs one row of class scores per sample: the model gave shape {list(outputs.shape)} for {len(labels)} samples")
    return float(np.mean(outputs.reshape(len(labels), -1).argmax(1) == labels))


# Keys of a calibration file for a single-input model, in order of preference (training data only).
CALIBRATION_KEYS = ("x_train", "x", "inputs")
from onnx_tucker.options import DEFAULT_CALIB_SIZE  # noqa: E402  (one default for every command)
# Fewest distinct samples the CLI calibrates on. Measured on the seed CNN at ratio 0.5 (the 500-image
# sample; plain Tucker 86.0%, original 87.6%), calibrating on n seeded training images: n = 1: 10.0%,
# 3: 30.2%, 8: 35.6%, 16: 56.0%, 32: 81.2%, 64: 83.6%, 256: 85.8%. Below 32 the fit falls apart;
# an all-zero, constant or one-image-repeated set (one distinct sample) took it to about 10%.
MIN_CALIB_SAMPLES = 32


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto, size: int | None = DEFAULT_CALIB_SIZE,
                     seed: int = 0, strict_size: bool = True, min_samples: int | None = None, *,
                     image_scale: float | None = None, image_mean=None, image_std=None,
                     input_shapes: dict | None = None, stream: bool = False) -> dict[str, np.ndarray]:
    """Calibration inputs ``{input name: array}`` from an .npz of *training* samples, or from a folder of
    JPEG/PNG images (what ``--calibrate DIR`` reads: :func:`onnx_tucker.images.stream_image_folder`).

    Accepted: one array per model input, by input name; for a single-input model also ``x_train``
    (keras layout), ``x`` or a file holding a single array. A file that only offers ``x_test`` is
    refused: calibrating on the test set would tune on it. ``size`` samples are taken as a seeded
    random subset (None: all); with ``strict_size`` a file holding fewer is an error, otherwise all
    of it is used. Arrays must match the model's input shapes, be castable to its input types
    (same kind: integers to floats yes, strings or complex to floats no) and be finite. With
    ``min_samples`` (the CLI passes :data:`MIN_CALIB_SAMPLES`), the samples used must hold at least
    that many distinct ones (:func:`check_calibration_support`).

    A folder: a seeded subset of ``size`` images, preprocessed as ``--calibrate DIR`` does them:
    ``(pixel * image_scale - image_mean) / image_std`` (defaults 1, 0, 1: raw 0..255; mean and std one number or
    one per channel), ``input_shapes`` for a model with a dynamic height/width. They are decoded into arrays, or
    with ``stream=True`` given as :class:`onnx_tucker.images.ImageStream` s (decoded batch by batch, as the CLI
    does; :func:`onnx_tucker.compress` takes them). The image options are refused for an .npz.
    """
    _check_calibration_options(size, seed, min_samples)
    path = Path(path)
    if path.is_dir():
        return _load_calibration_folder(path, model, size, seed, strict_size, min_samples, image_scale, image_mean,
                                        image_std, input_shapes, stream)
    given = [k for k, v in (("image_scale", image_scale), ("image_mean", image_mean), ("image_std", image_std)) if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only for calibration from an image folder, not from the .npz file {path}")
    arrays = _open_npz(path)
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    if names and all(n in arrays for n in names):
        chosen = {n: arrays[n] for n in names}
    elif len(names) == 1:
        key = next((k for k in CALIBRATION_KEYS if k in arrays), None)
        if key is None and len(arrays) == 1 and next(iter(arrays)) not in ("x_test", "y_test"):
            key = next(iter(arrays))
        if key is None:
            found = ", ".join(sorted(arrays)) or "nothing"
            if "x_test" in arrays:
                raise DataError(f"{path} holds only test data (x_test); calibration must use training data (x_train): found {found}")
            raise DataError(f"{path} has no calibration array: expected '{names[0]}', x_train or x (found {found})")
        chosen = {names[0]: arrays[key]}
    else:
        missing = [n for n in names if n not in arrays]
        raise DataError(f"{path} must hold one array per model input; missing {', '.join(missing)}")
    counts = set()
    feeds = {}
    for vi in inputs:
        dims, dtype = input_spec(vi)
        value = chosen[vi.name]
        want = ["N" if d is None else d for d in dims]
        if not dims:  # the measured budget, the refits and distillation draw samples along a batch axis
            raise DataError(f"calibration needs a batch axis on every input: '{vi.name}' is a scalar (shape []); "
                            "compress without --calibrate")
        if value.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], value.shape[1:])):
            raise DataError(f"calibration inputs for '{vi.name}' in {path} have shape {list(value.shape)}, the model expects {want}")
        if not np.can_cast(value.dtype, dtype, casting="same_kind"):
            raise DataError(f"calibration inputs for '{vi.name}' in {path} have dtype {value.dtype}, which cannot be cast to the model's {np.dtype(dtype)}")
        if value.dtype.kind not in "biufc":  # strings, dates...: can_cast says yes for some
            raise DataError(f"calibration inputs for '{vi.name}' in {path} have dtype {value.dtype}, which cannot be cast to the model's {np.dtype(dtype)}")
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise DataError(f"calibration inputs for '{vi.name}' in {path} contain NaN or Inf")
        counts.add(len(value))
        feeds[vi.name] = value
    if len(counts) != 1:
        raise DataError(f"calibration arrays in {path} have different sample counts: {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        raise DataError(f"{path} holds no calibration samples")
    if size is not None:
        if n < size and strict_size:
            raise DataError(f"{path} holds {n} calibration samples, fewer than the {size} asked for")
        if size < n:
            pick = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
            feeds = {k: v[pick] for k, v in feeds.items()}
    out = {}
    for vi in inputs:
        _, dtype = input_spec(vi)
        with np.errstate(over="ignore", invalid="ignore"):
            value = feeds[vi.name].astype(dtype)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):  # e.g. float64 overflowing float32
            raise DataError(f"calibration inputs for '{vi.name}' in {path} overflow {np.dtype(dtype)}")
        out[vi.name] = value
    if min_samples:
        check_calibration_support(out, path, min_samples)
    return out


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_calibration_options(size, seed, min_samples) -> None:
    """The API's numbers, checked before anything is read: ``size=2.5`` failed inside numpy's sampler."""
    if size is not None and not (_whole(size) and size >= 1):
        raise UsageError(f"calibration size: expected a positive whole number of samples (or None: all of them), got {size!r}")
    if not (_whole(seed) and seed >= 0):
        raise UsageError(f"seed: expected a whole number >= 0, got {seed!r}")
    if min_samples is not None and not (_whole(min_samples) and min_samples >= 0):
        raise UsageError(f"min_samples: expected a whole number >= 0 (or None), got {min_samples!r}")


def _image_numbers(value, default: tuple, what: str) -> tuple:
    if value is None:
        return default
    try:
        values = tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=object)).ravel())
    except (TypeError, ValueError):
        values = ()
    if not values or not all(np.isfinite(values)):
        raise UsageError(f"{what}: expected a finite number or one per channel, got {value!r}")
    return values


def _load_calibration_folder(path: Path, model, size, seed, strict_size, min_samples, image_scale, image_mean,
                             image_std, input_shapes, stream) -> dict:
    """:func:`load_calibration` of an image folder: the CLI's ``--calibrate DIR`` reader, with the .npz file's checks
    (fewer images than ``size`` with ``strict_size``, fewer distinct ones than ``min_samples``)."""
    from onnx_tucker.images import stream_image_folder

    scale = _image_numbers(image_scale, (1.0,), "image_scale")
    if len(scale) != 1 or scale[0] <= 0:
        raise UsageError(f"image_scale: expected a positive finite number like 1/255, got {image_scale!r}")
    streams = stream_image_folder(path, model, size if size is not None else sys.maxsize, seed=seed,
                                  scale=scale[0], mean=_image_numbers(image_mean, (0.0,), "image_mean"),
                                  std=_image_numbers(image_std, (1.0,), "image_std"), input_shapes=input_shapes)
    images = next(iter(streams.values()))
    n = len(images)
    if size is not None and n < size and strict_size:
        raise DataError(f"{path} holds {n} images, fewer than the {size} asked for")
    if min_samples and images.distinct < min_samples:
        held = f"{n} image{'s' if n != 1 else ''}" + (f" ({images.distinct} distinct files)" if images.distinct != n else "")
        raise DataError(f"{path} gives {held}: a data-aware fit needs at least {min_samples} distinct samples")
    return streams if stream else {name: np.asarray(s) for name, s in streams.items()}


def distinct_samples(feeds: dict[str, np.ndarray]) -> int:
    """How many different samples ``feeds`` holds (a sample: its values in every input)."""
    import hashlib

    n = len(next(iter(feeds.values())))
    seen = set()
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(feeds):
            h.update(np.ascontiguousarray(feeds[name][i]).tobytes())
        seen.add(h.digest())
    return len(seen)


def calibration_arrays(model: onnx.ModelProto, feeds: dict) -> dict:
    """The API's ``calibration`` checked against the model and cast to its inputs' dtypes, as the CLI's files are: an
    input without an array, an array of the wrong shape or kind, NaN or Inf, or a set of one repeated sample is a
    one-line DataError (uint8 pixels and float64 arrays used to reach onnxruntime, whose type error blamed the model).
    Streamed image folders (:class:`onnx_tucker.images.ImageStream`) were checked when they were opened."""
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DataError(f"calibration has no array for the model input '{missing[0]}' (it has: {', '.join(map(str, feeds)) or 'none'})")
    unknown = [k for k in feeds if k not in names]
    if unknown:
        raise DataError(f"calibration names no model input: '{unknown[0]}' (the inputs: {', '.join(names)})")
    out = {}
    for vi in inputs:
        value = feeds[vi.name]
        if not isinstance(value, np.ndarray):
            out[vi.name] = value  # a stream of our own loader
            continue
        dims, dtype = input_spec(vi)
        if not dims:
            raise DataError(f"calibration needs a batch axis on every input: '{vi.name}' is a scalar (shape [])")
        _check_feedable(value, dims, dtype, vi.name, "calibration inputs")
        out[vi.name] = value if value.dtype == np.dtype(dtype) else _cast(value, dtype, vi.name, "calibration inputs")
    counts = {len(v) for v in out.values() if np.ndim(v)}
    if len(counts) > 1:
        raise DataError(f"calibration arrays have different sample counts: {sorted(counts)}")
    if all(isinstance(v, np.ndarray) for v in out.values()) and len(next(iter(out.values()))) > 1 and distinct_samples(out) == 1:
        check_calibration_support(out, "the calibration arrays")  # all identical: one line, as the CLI says it
    return out


def check_calibration_support(feeds: dict[str, np.ndarray], path, min_samples: int = MIN_CALIB_SAMPLES) -> None:
    """Refuse a calibration set that cannot support a data-aware fit: fewer than ``min_samples``
    distinct samples. An all-zero, constant or one-image-repeated set holds one."""
    n = len(next(iter(feeds.values())))
    distinct = distinct_samples(feeds)
    if distinct == 1 and n > 1:
        raise DataError(f"the {n} calibration samples in {path} are all identical (no variation to fit): "
                        f"a data-aware fit needs at least {min_samples} distinct samples")
    if distinct < min_samples:
        held = f"{n} calibration sample{'s' if n != 1 else ''}" + (f" ({distinct} distinct)" if distinct != n else "")
        raise DataError(f"{path} gives {held}: a data-aware fit needs at least {min_samples} distinct samples")

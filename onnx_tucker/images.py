"""Calibration from a folder of images (``--calibrate DIR``): JPEG/PNG, recursive, sorted, a seeded subset.

Preprocessing, stated and taken from the model's input where possible:
- layout and size from the input's shape: NCHW when dim 1 is 1-4 channels, NHWC when the last dim is;
  each image is converted to that many channels' mode (L, RGB, RGBA: a colour image for a 1-channel model
  is an error, not a silent conversion), resized to H x W (bilinear, aspect ratio not kept);
- values: ``(pixel * scale - mean) / std`` per channel, defaults scale 1, mean 0, std 1: raw 0..255 floats,
  what the project's models take (they normalise inside). Give ``--image-scale 1/255 --image-mean ...``
  for a model that expects normalised input.
Streamed (issue 15): the seeded subset is chosen from the sorted recursive listing and each chosen file's
header is checked first (format, channels, and a PNG's chunks or a JPEG's end marker, so a file cut short is
refused too: the one-line errors come before any work); the pixels are then
decoded batch by batch as the loops consume them (:class:`ImageStream`), so a big folder need not fit in memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from onnx_tucker.errors import DataError, UsageError

EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{folder} holds no JPEG or PNG images (searched recursively)")
    return files


def input_layout(model) -> tuple[str, str, int, int, int]:
    """(input name, "NCHW"/"NHWC", channels, height, width) of a single 4-D image input."""
    from onnx_tucker.runtime import graph_inputs, input_spec

    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UsageError("calibration from an image folder needs a single-input model")
    dims, dtype = input_spec(inputs[0])
    if len(dims) != 4:
        raise UsageError(f"calibration from an image folder needs a 4-D image input, '{inputs[0].name}' has {len(dims)} dims")
    if dims[1] in (1, 2, 3, 4) and not (dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)):
        layout, channels, height, width = "NCHW", dims[1], dims[2], dims[3]
    elif dims[3] in (1, 2, 3, 4):
        layout, channels, height, width = "NHWC", dims[3], dims[1], dims[2]
    else:
        raise UsageError(f"cannot tell the image layout of input '{inputs[0].name}' {dims}: no 1-4 channel axis")
    if not height or not width:
        raise UsageError(f"input '{inputs[0].name}' has dynamic height/width: give --input-shape so images can be resized")
    return inputs[0].name, layout, channels, height, width


def load_image_folder(folder, model, size: int, seed: int = 0, scale: float = 1.0, mean=(0.0,), std=(1.0,),
                      input_shapes: dict | None = None) -> dict[str, np.ndarray]:
    """``{input name: array}`` of ``size`` (or all, if fewer) seeded images from ``folder``, preprocessed for ``model``."""
    return {name: np.asarray(stream) for name, stream in
            stream_image_folder(folder, model, size, seed, scale, mean, std, input_shapes).items()}


def stream_image_folder(folder, model, size: int, seed: int = 0, scale: float = 1.0, mean=(0.0,), std=(1.0,),
                        input_shapes: dict | None = None) -> dict[str, "ImageStream"]:
    """:func:`load_image_folder` as ``{input name: ImageStream}``: the same values, decoded when a loop takes a batch."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = image_files(folder)
    name, layout, channels, height, width = input_layout(_with_shapes(model, input_shapes))
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise UsageError(f"images cannot feed a {channels}-channel input")
    if size < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size, replace=False))
        files = [files[i] for i in pick]
    for flag, values in (("--image-mean", mean), ("--image-std", std)):
        if len(values) not in (1, channels):
            raise UsageError(f"{flag}: {len(values)} values for a {channels}-channel input: give 1 or {channels}")
    mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
    if np.any(std == 0):
        raise UsageError("--image-std must not be 0")
    digests = set()
    for path in files:  # before any work: headers, and whether the data is all there (no pixels decoded)
        try:
            data = Path(path).read_bytes()
            digests.add(hashlib.sha1(data).digest())
            with Image.open(io.BytesIO(data)) as image:
                _check_mode(path, image.mode, channels)
                _check_complete(image, data)
        except DataError:
            raise
        except UnidentifiedImageError:  # PIL's own text names the in-memory copy, not the file
            raise DataError(f"cannot read image {path}: cannot identify image file (not a JPEG or PNG PIL can read)") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error,
                Image.DecompressionBombError) as exc:  # what PIL raises for a broken file
            raise DataError(_unreadable(path, exc)) from None

    def decode(path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                _check_mode(path, image.mode, channels)
                if image.mode.startswith("I"):  # a 16-bit grey PNG: PIL's convert clips it at 255, so scale it to 0..255
                    grey = Image.fromarray(np.asarray(image, np.float32) * (255.0 / 65535.0), mode="F")
                    grey = np.asarray(grey.resize((width, height), Image.BILINEAR), np.float32)[..., None]
                    array = np.concatenate([np.repeat(grey, min(channels, 3), axis=2)]
                                           + ([np.full_like(grey, 255.0)] if channels == 4 else []), axis=2)
                else:
                    array = np.asarray(image.convert(mode).resize((width, height), Image.BILINEAR), np.float32)
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as exc:  # a file truncated after its header
            raise DataError(_unreadable(path, exc)) from None
        with np.errstate(over="ignore"):  # a scale too large for float32: Inf, refused by the statistics in one line
            out = (array.reshape(height, width, channels) * scale - mean) / std
        return np.ascontiguousarray(out.transpose(2, 0, 1)) if layout == "NCHW" else out
    shape = (channels, height, width) if layout == "NCHW" else (height, width, channels)
    from onnx_tucker.runtime import graph_inputs, input_spec

    stream = ImageStream(files, decode, shape, dtype=input_spec(graph_inputs(model)[0])[1])
    stream.distinct = len(digests)  # copies of one image count once
    return {name: stream}


class ImageStream:
    """A calibration array over image files, decoded on demand: ``len``, ``shape``, ``dtype``; a slice or an
    index array gives another stream (nothing decoded); ``np.asarray`` decodes its images (``capture.batches``
    does, one batch at a time). ``decoded`` counts the images decoded so far (shared by its views)."""

    ndim = 4
    dtype = np.dtype(np.float32)
    distinct = None  # files with different bytes among the folder's chosen ones (set by stream_image_folder)

    def __init__(self, files: list, decode, sample_shape: tuple, index: np.ndarray | None = None, counter: list | None = None,
                 dtype=np.float32):
        self.files, self.decode, self.sample_shape = files, decode, tuple(sample_shape)
        self.dtype = np.dtype(dtype)  # the model input's: a uint8 image model is fed rounded pixels, not float32
        self.index = np.arange(len(files)) if index is None else index
        self.counter = counter if counter is not None else [0]

    @property
    def decoded(self) -> int:
        return self.counter[0]

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.sample_shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            self.counter[0] += 1
            return _as_input(self.decode(self.files[self.index[key]]), self.dtype)
        return ImageStream(self.files, self.decode, self.sample_shape, self.index[key], self.counter, self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        for i, j in enumerate(self.index):
            out[i] = self.decode(self.files[j])
        self.counter[0] += len(self.index)
        out = _as_input(out, self.dtype)
        return out if dtype is None else out.astype(dtype)


def _as_input(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Decoded (float32) pixels as the input's dtype: integers rounded and clipped to its range."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _check_mode(path, mode: str, channels: int) -> None:
    """A colour image for a grey model is refused (no silent conversion); any image converts to RGB or RGBA (an alpha
    channel dropped, CMYK to RGB, as PIL's convert and torchvision's loaders do)."""
    if channels == 1 and mode not in GREY_MODES:
        raise DataError(f"{path} is a {mode} image with more channels than the model's {channels}")


GREY_MODES = ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "LA", "P")  # a palette image may be grey: converted to L


def _check_complete(image, data: bytes) -> None:
    """Refuse a file cut short after its header without decoding it (issue: a truncated image was caught only
    when a loop decoded it, after work had started). A PNG: PIL's ``verify`` reads every chunk to IEND and checks
    its CRC (no decompression). A JPEG: the end-of-image marker must follow the start of the
    first scan (entropy-coded data stuffs its 0xFF bytes, so it cannot hold one; an EXIF thumbnail's own marker comes
    before): a truncated scan lacks it, and PIL refuses to decode such a file. Both cost a pass over bytes already
    read for the copies check; neither decodes pixels, so a scan corrupted in the middle is still caught when decoded."""
    if image.format == "PNG":
        why = _png_problem(data)
        if why:
            raise OSError(f"the PNG data is cut short or corrupt ({why})")
    elif image.format in ("JPEG", "MPO"):
        scan = _jpeg_scan_start(data)
        if scan is not None and data.find(b"\xff\xd9", scan) < 0:
            raise OSError("image file is truncated (no end-of-image marker after the scan data)")


def _png_problem(data: bytes) -> str:
    """Why a PNG is cut short or its image data corrupt ('' when it is whole): the chunks walked to IEND, the CRC checked
    on the critical ones (IHDR, PLTE, IDAT: what decoding needs). A bad CRC on a metadata chunk (tEXt after the image)
    is not refused: PIL decodes such a file (its own ``verify`` refused it)."""
    i = 8  # after the signature
    while i + 8 <= len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        end = i + 8 + length + 4
        if end > len(data):
            return f"chunk {kind.decode('latin-1')!r} runs past the end of the file"
        if kind[:1].isupper() and zlib.crc32(data[i + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"bad checksum in chunk {kind.decode('latin-1')!r}"
        if kind == b"IEND":
            return ""
        i = end
    return "no IEND chunk"


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first scan's entropy-coded data: the marker segments from SOI walked by their lengths (an
    EXIF thumbnail inside APP1 is skipped whole). None where the walk does not find it: nothing is refused then."""
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker == 0xDA:  # start of scan: its header, then the data
            return i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _unreadable(path, exc) -> str:
    return f"cannot read image {path}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"


def _with_shapes(model, input_shapes):
    if not input_shapes:
        return model
    import onnx

    from onnx_tucker.graph import set_input_shapes

    light = onnx.ModelProto()
    light.graph.input.extend(model.graph.input)
    light.graph.initializer.extend([])
    set_input_shapes(light, input_shapes)
    return light


def parse_image_flags(scale: str | None, mean: str | None, std: str | None) -> dict:
    """``--image-scale``, ``--image-mean`` and ``--image-std`` as given on the command line -> {"scale", "mean", "std"}
    (defaults 1, 0, 1), or a one-line usage error (compress's and sweep's --calibrate DIR read them alike)."""
    try:
        value = eval_fraction(scale) if scale is not None else 1.0
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--image-scale: expected a number like 1/255, got {scale!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise UsageError(f"--image-scale: expected a positive finite number like 1/255, got {scale!r}")
    return {"scale": value,
            "mean": parse_floats(mean, "--image-mean") if mean is not None else (0.0,),
            "std": parse_floats(std, "--image-std") if std is not None else (1.0,)}


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(eval_fraction(t)) for t in str(text).split(","))
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    except ZeroDivisionError:  # '1/0': a usage error, as --image-scale 1/0 is, not an internal error
        raise UsageError(f"{what}: division by zero in {text!r}: expected comma-separated numbers like 0.5 or 1/255") from None
    if not values or not all(np.isfinite(values)):
        raise UsageError(f"{what}: expected finite numbers, got {text!r}")
    return values


def eval_fraction(text: str) -> float:
    """'0.5' or '1/255'."""
    text = text.strip()
    if "/" in text:
        num, _, den = text.partition("/")
        return float(num) / float(den)
    return float(text)


__all__ = ["load_image_folder", "stream_image_folder", "ImageStream", "image_files", "input_layout", "parse_floats", "EXTENSIONS", "os"]

"""Loading and saving ONNX models: external data aware, atomic, never touching the input."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnx_tucker.errors import ModelError, UsageError, first_line
from onnx_tucker.outputs import check_target

# Protobuf cannot serialise a message over 2 GiB; above this the output's weights go to a data file.
PROTOBUF_LIMIT = 2**31 - 1
DEFAULT_EXTERNAL_THRESHOLD = int(1.8 * 2**30)
THRESHOLD_ENV = "ONNX_TUCKER_EXTERNAL_THRESHOLD"


def threshold_from_env() -> int:
    """Size in bytes above which outputs get external data: $ONNX_TUCKER_EXTERNAL_THRESHOLD or 1.8 GB."""
    text = os.environ.get(THRESHOLD_ENV, "").strip()
    if not text:
        return DEFAULT_EXTERNAL_THRESHOLD
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{THRESHOLD_ENV} must be a size in bytes, got {text!r}") from None
    if value < 0:
        raise UsageError(f"{THRESHOLD_ENV} must be a size in bytes, got {text!r}")
    return min(value, DEFAULT_EXTERNAL_THRESHOLD)


def external_data_files(model: onnx.ModelProto, base_dir: Path, must_exist: bool = True) -> list[Path]:
    """The resolved data files a model's external tensors point to, refusing locations outside ``base_dir``.

    The location written in the model is checked lexically: relative, no ``..`` component. Symbolic
    links in the model's folder are the user's and are followed (a Hugging Face cache keeps the
    model and its data file as links into ``../blobs/``); a location cannot climb out by itself.
    """
    files = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location or "")
        if not info.location or location.is_absolute() or ".." in location.parts or not location.parts:
            raise ModelError(
                f"tensor '{tensor.name}' points to external data outside the model's folder ({info.location}): refused"
            )
        try:
            if "\x00" in info.location:
                raise ValueError("embedded null byte")
            target = (base_dir / location).resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # embedded NUL, loops, names too long
            raise ModelError(f"tensor '{tensor.name}' has an unusable external data location: {first_line(exc)}") from None
        if must_exist and not target.is_file():
            from onnx_tucker.outputs import describe

            what = "which does not exist" if not os.path.lexists(target) else f"which is {describe(target)}, not a file"
            raise ModelError(f"tensor '{tensor.name}' needs external data file '{info.location}', {what}")
        if target not in files:
            files.append(target)
    return files


def load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor's data into the model, following the user's links.

    onnx's loader refuses a data file that is a symbolic link; the location was checked by
    :func:`external_data_files`, so each tensor is read from the file its link resolves to.
    """
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        real = (base_dir / info.location).resolve()
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = real.name
        external_data_helper.load_external_data_for_tensor(tensor, str(real.parent))


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Load and check a model file; every failure is a one-line :class:`ModelError`/:class:`UsageError`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"input model not found: {path}")
    if not path.is_file():
        raise UsageError(f"input model is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"input model is an empty file: {path}")
    # Checking the file first (the checker parses it in C++ and frees it) keeps the peak at
    # ~2x the file; checking the parsed model serialises it again while it is held (3.2x, issue 5).
    # Any failure here is ignored: the steps below then run as before and report it as before.
    checked_file = check and _checker_passes(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelError(f"{path} is not a valid ONNX model (cannot parse it: {first_line(exc)})") from None
    if not model.graph.node and not model.graph.input and not model.graph.output:
        raise ModelError(f"{path} is not a valid ONNX model (it has no graph)")
    external = external_data_files(model, path.parent)
    try:
        load_external_data(model, path.parent)
    except Exception as exc:
        raise ModelError(f"cannot read the external data of {path}: {first_line(exc)}") from None
    # onnxruntime runs nodes in any order, the checker wants them sorted (onnxruntime's float16 converter
    # appends its Casts at the end): sort them, stably, rather than refuse a model that runs.
    resorted = not checked_file and sort_nodes(model.graph)
    # The file check stands for the model check only when every weight was in the file itself.
    if check and (resorted or not (checked_file and not external)):
        check_model(model, path)
    return model


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put ``graph``'s nodes in a topological order, keeping their order where it already is one; whether it
    changed anything. Nodes whose inputs never become available (a broken graph) keep their place at the end,
    for the checker to report."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    order, pending, passes = [], list(graph.node), 0
    while pending:  # each pass takes, in order, every node whose inputs are made
        passes += 1
        still = []
        for node in pending:
            if all(i in known for i in node.input):
                order.append(node)
                known.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            order += still
            break
        pending = still
    if passes == 1:  # one pass took every node: already sorted
        return False
    copies = [onnx.NodeProto() for _ in order]
    for new, old in zip(copies, order):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(copies)
    return True


def _checker_passes(path: Path) -> bool:
    """Whether ``onnx.checker`` accepts the model file as it is on disk (no Python copy made)."""
    try:
        onnx.checker.check_model(str(path))
    except Exception:
        return False
    _release_freed_memory()
    return True


def _release_freed_memory() -> None:
    """Give memory freed by C++ (protobuf in the checker) back to the OS where glibc allows it.

    Without it the heap keeps the checker's parsed copy resident, and the next phase's peak
    starts from there (measured: 1x the file more at rest after loading ResNet50, issue 5).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """``onnx.checker`` as a one-line error; models too large for protobuf are checked from their file."""
    try:
        if path is not None and model_size(model) > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        where = f"{path}" if path is not None else "the model"
        raise ModelError(f"{where} fails the ONNX checker: {first_line(exc)}") from None


def model_size(model: onnx.ModelProto) -> int:
    """Approximate serialised size in bytes, without serialising (which fails above 2 GiB)."""
    weights = sum(len(t.raw_data) or _tensor_nbytes(t) for t in external_data_helper._get_all_tensors(model))
    return weights + 1024 * len(model.graph.node)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count * 4


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse output paths (and output settings) that would fail or destroy something, before any work is done.

    The output must be a new path or a regular file (:func:`onnx_tucker.outputs.check_target`: never a
    device, FIFO, folder or symbolic link) in a writable folder, and neither the input nor its data.
    """
    threshold_from_env()
    out = check_target(output_path, what)
    if input_path is not None:
        inp = Path(input_path)
        if inp.exists() and (out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp))):
            if what == "output":
                raise UsageError("output path is the input path: refusing to overwrite the input model")
            raise UsageError(f"{what} {output_path} is the input model: refusing to overwrite it")
        # A model output writes OUT and possibly OUT.data, a side file (--report, --json) only itself: none of them may
        # be one of the input's data files.
        written = (out, out.parent / (out.name + ".data")) if what == "output" else (out,)
        existing = [p for p in written if os.path.isfile(p)]  # False for too long names
        if existing and inp.is_file():
            for data in input_data_files(inp):
                for p in existing:
                    if os.path.samefile(p, data):
                        who = "output" if what == "output" else f"{what} {output_path}"
                        raise UsageError(f"{who} would write over the input's external data file {data.name}: choose another name")
    return out


def input_data_files(path: Path) -> list[Path]:
    """The external data files a model file refers to (its weights are not read); [] if it cannot be parsed."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []  # load_model reports the parse failure
    return [f for f in external_data_files(model, path.parent, must_exist=False) if f.is_file()]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    external_data: bool | None = None,
    external_threshold: int | None = None,
    protected: list[Path] | tuple = (),
) -> Path | None:
    """Write ``model`` to ``path`` atomically; returns the external data file written, if any.

    The model is written into a temporary folder beside the target and renamed into
    place, so a failure leaves nothing behind (:class:`onnx_tucker.outputs.Outputs`, which
    also stages a model together with a command's other outputs). With external data (forced, or
    automatically above ``external_threshold`` bytes, default :func:`threshold_from_env`) the weights go to
    ``<name>.data`` next to the output, written fresh (never appended to), and never
    to a file in ``protected`` (the input's own model and data files).
    Saving with external data rewrites the tensors of ``model`` in place.
    """
    from onnx_tucker.outputs import Outputs

    with Outputs() as outputs:
        _, data_path = outputs.save_model(model, path, external_data, external_threshold, protected)
    return data_path


EXTERNAL_SIZE_THRESHOLD = 1024  # bytes (as onnx counts them): smaller tensors stay in the model file


def write_model_files(model: onnx.ModelProto, folder: Path, name: str, external_data: bool) -> None:
    """Write ``folder/name``, with its weights in ``folder/name.data`` if ``external_data``.

    The data file's location is the bare name, relative to the model's folder, and is written
    there whatever the current folder (onnx's own writer checks the location against the current
    folder, so a rerun from the output's folder, or an unrelated file of that name there, broke it).
    """
    folder = Path(folder)
    if external_data:
        data_name = name + ".data"
        if (folder / data_name).exists():
            raise ModelError(f"cannot write {name}: {data_name} already exists in the staging folder")
        for tensor in external_data_helper._get_initializer_tensors(model):
            if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_SIZE_THRESHOLD:
                external_data_helper.set_external_data(tensor, data_name)
        external_data_helper.write_external_data_tensors(model, str(folder))
    with open(folder / name, "wb") as f:
        write_serialized(model, f)
    if external_data and (folder / data_name).exists():
        # the data file gets the model file's permissions (onnx writes it 0600)
        os.chmod(folder / data_name, os.stat(folder / name).st_mode & 0o777)


def write_serialized(message, f) -> None:
    """Write ``message.SerializeToString(deterministic=True)`` to ``f`` without holding it whole.

    Protobuf's serialisation of a model is its fields in field-number order, so the graph is
    written field by field and its repeated messages (nodes, initializers...) one at a time:
    the largest piece held is one tensor. Serialising the whole model held it twice over
    (upb's buffer and the Python bytes: 1.4x the file for ResNet50, issue 5). Messages with
    unknown fields are serialised whole (their order would not be kept otherwise).
    Byte-identical output (tests compare).
    """
    for piece in _pieces(message):
        f.write(piece)


def _pieces(message):
    if _has_unknown_fields(message):
        yield message.SerializeToString(deterministic=True)
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            yield _single_field(message, field, value)
        elif _repeated(field):
            tag = _varint((field.number << 3) | 2)
            for item in value:
                data = item.SerializeToString(deterministic=True)
                yield tag + _varint(len(data)) + data
        elif field.message_type.name == "GraphProto" and not _has_unknown_fields(value):
            pieces = list(_lazy_pieces(value))
            size = sum(n for n, _ in pieces)
            yield _varint((field.number << 3) | 2) + _varint(size)
            for _, make in pieces:
                yield make()
        else:
            yield _single_field(message, field, value)


def _lazy_pieces(message):
    """(size, bytes factory) per piece of ``message``: sizes first (the parent's length prefix), bytes when written."""
    for field, value in message.ListFields():
        if field.message_type is not None and _repeated(field):
            tag = _varint((field.number << 3) | 2)
            for item in value:
                n = item.ByteSize()
                yield len(tag) + len(_varint(n)) + n, (lambda item=item, head=tag + _varint(n): head + item.SerializeToString(deterministic=True))
        else:
            data = _single_field(message, field, value)
            yield len(data), (lambda data=data: data)


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28 (``label`` is gone in 7)
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


def _single_field(message, field, value) -> bytes:
    """The serialisation of one field of ``message`` (a copy holding only that field)."""
    part = type(message)()
    if _repeated(field):
        getattr(part, field.name).extend(value)
    elif field.message_type is not None:
        getattr(part, field.name).CopyFrom(value)
    else:
        setattr(part, field.name, value)
    return part.SerializeToString(deterministic=True)


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf import unknown_fields

        return len(unknown_fields.UnknownFieldSet(message)) > 0
    except Exception:  # no API to tell: assume there are some
        return True


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

"""Run a model in batches on a provider and keep named tensors: the one loop behind calibration,
sensitivity, the self-check, top-1 and bench's agreement check.

Models exported with a fixed batch (torch.onnx's default is batch 1) are fed in batches of that
size; the last, short batch is padded by repeating its last sample and the padding is dropped from
the results, so the batch the caller asks for never reaches onnxruntime when the model refuses it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from onnx_tucker.errors import ModelError, first_line

DEFAULT_BATCH = 64
BATCH_BYTES = 512 << 20  # fetched tensors per batch when many layers' activations are kept (ResNet50 at 224 px)


def fixed_batch(model_or_session) -> int | None:
    """The batch size every real input is fixed to, or None when it is free (or unknown).

    Takes an ``onnx.ModelProto`` or an onnxruntime session (its inputs are the real inputs).
    """
    if isinstance(model_or_session, onnx.ModelProto):
        inits = {i.name for i in model_or_session.graph.initializer}
        dims = [[d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                for vi in model_or_session.graph.input if vi.name not in inits]
    elif hasattr(model_or_session, "get_inputs"):
        dims = [[d if isinstance(d, int) else None for d in i.shape] for i in model_or_session.get_inputs()]
    else:
        return None
    sizes = {d[0] if d else None for d in dims}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if isinstance(size, int) and size > 0 else None


def timing_batch(given: int | None, model) -> int:
    """The latency measurements' batch: the one given (``--latency-batch``), else the batch a fixed-batch export is
    made for (it runs no other), else 1."""
    return given or fixed_batch(model) or 1


def batch_size_for(model, wanted: int = DEFAULT_BATCH) -> int:
    """``wanted``, or the batch the model (or session) is fixed to."""
    return fixed_batch(model) or wanted


def batch_for_bytes(per_sample_bytes: int, wanted: int = DEFAULT_BATCH, budget: int = BATCH_BYTES) -> int:
    """``wanted``, or fewer so that a batch's fetched tensors (``per_sample_bytes`` each sample) stay in ``budget``:
    small models keep their batch (a CIFAR ResNet-20's inputs of every layer: ~1 MB a sample)."""
    return max(1, min(wanted, budget // max(int(per_sample_bytes), 1)))


def activation_bytes(shape, side: str = "in", itemsize: int = 4) -> int:
    """Bytes per sample of a site's input (``side="in"``) or output, from its cost-model shape (0 when unknown)."""
    import math

    spatial = shape.in_spatial if side == "in" else shape.out_spatial
    if spatial is None:
        return 0
    return itemsize * (shape.c_in if side == "in" else shape.c_out) * math.prod(spatial)


def samples_in(feeds: dict) -> int:
    """The samples in ``feeds``: the length of the first batched (not 0-d) array; 1 when every input is a scalar."""
    return next((len(v) for v in feeds.values() if np.ndim(v) > 0), 1)


def batches(feeds: dict, size: int, fixed: bool = False) -> Iterator[tuple[dict, int]]:
    """``(batch feeds, real rows)`` along axis 0; with ``fixed`` the last batch is padded to ``size``. A 0-d input (a
    scalar the graph takes, an If's condition) has no batch axis: every batch gets it whole."""
    n = samples_in(feeds)
    for start in range(0, n, size):
        # a streamed image folder decodes here
        batch = {k: np.asarray(v) if np.ndim(v) == 0 else np.asarray(v[start : start + size]) for k, v in feeds.items()}
        rows = min(size, n - start)
        if fixed and rows < size:
            batch = {k: v if v.ndim == 0 else np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)]) for k, v in batch.items()}
        yield batch, rows


def iterate(session, feeds: dict, names: list[str] | None, batch_size: int = DEFAULT_BATCH, extra: dict | None = None,
            fixed: bool = False, progress: str | None = None) -> Iterator[tuple[dict, list[np.ndarray]]]:
    """Run ``session`` over ``feeds`` batch by batch; yields ``(batch feeds, outputs)`` (padding removed).

    ``names``: the outputs to fetch (None: all); ``extra``: feeds given whole to every batch (probe weights).
    """
    from tqdm import tqdm

    n = samples_in(feeds)
    bar = tqdm(total=-(-n // batch_size), desc=progress, unit="batch", leave=False, disable=True if progress is None else None)
    try:
        for batch, rows in batches(feeds, batch_size, fixed):
            try:
                values = session.run(names, {**batch, **(extra or {})})
            except Exception as exc:  # a model that passes the checker but cannot run (e.g. wrong channel counts)
                raise ModelError(f"onnxruntime cannot run the model: {first_line(exc)}") from None
            bar.update()
            if rows < len(next(iter(batch.values()))):
                batch = {k: v[:rows] for k, v in batch.items()}
                values = [v[:rows] if np.ndim(v) else v for v in values]
            yield batch, values
    finally:
        bar.close()


def run_all(session, feeds: dict, names: list[str] | None = None, extra: dict | None = None,
            batch_size: int | None = None, fixed: int | None = None, progress: str | None = None) -> list[np.ndarray]:
    """``session.run`` over all of ``feeds`` (one sample a row), one array per output: in one call (or batches
    of ``batch_size``), and in padded batches of the model's own size when its batch is fixed (a probe of 128
    images on a torch export fixed to batch 1). ``extra``: feeds given whole to every batch (weights).
    ``fixed``: that batch, for a session whose other inputs hide it (a probe fed weights); default: read from
    the session. Scalar outputs are kept per batch (stacked): they have no sample axis to concatenate on."""
    if not feeds and not extra:  # a model without inputs (its values are constants): one run is all there is
        try:
            return session.run(names, {})
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot run the model: {first_line(exc)}") from None
    fixed = fixed or fixed_batch(session)
    n = len(next(iter(feeds.values()))) if feeds else 0
    size = fixed or batch_size or max(n, 1)
    chunks = [values for _, values in iterate(session, feeds, names, size, extra=extra, fixed=fixed is not None, progress=progress)]
    if not chunks:
        raise ModelError("no samples to run the model on")
    if len(chunks) == 1 and all(np.ndim(v) for v in chunks[0]):  # one call: its arrays as they are
        return list(chunks[0])
    return [np.concatenate([c[i] for c in chunks]) if np.ndim(chunks[0][i]) else np.stack([c[i] for c in chunks])
            for i in range(len(chunks[0]))]


def capture(model, feeds: dict, names: list[str] | None = None, provider: str = "cpu", batch_size: int = DEFAULT_BATCH,
            session=None, progress: str | None = None) -> list[np.ndarray]:
    """The named tensors (None: the graph outputs) of ``model`` over all of ``feeds``, one array each, in batches of
    ``batch_size`` (:func:`run_all`). Intermediate tensors must be graph outputs already (``graph.with_outputs``)."""
    from onnx_tucker.runtime import make_session

    return run_all(session or make_session(model, provider), feeds, names, batch_size=batch_size, progress=progress)


def capture_named(model, feeds: dict, names: list[str], **kwargs) -> dict[str, np.ndarray]:
    """:func:`capture` as ``{name: array}``."""
    return dict(zip(names, capture(model, feeds, names, **kwargs)))

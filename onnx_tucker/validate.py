"""Output agreement of two models on the same inputs (the compress command's self-check)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnx_tucker.errors import ModelError, first_line
from onnx_tucker.runtime import make_session


@dataclass
class OutputAgreement:
    name: str
    max_abs_diff: float
    relative_error: float  # ||a-b|| / ||a||
    cosine: float
    top1_agreement: float | None  # for classifier-shaped (N, C) outputs


def compare_outputs(name: str, a: np.ndarray, b: np.ndarray) -> OutputAgreement:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm_a, norm_b = np.linalg.norm(a64), np.linalg.norm(b64)
    diff = np.linalg.norm(a64 - b64)
    cosine = float(a64 @ b64 / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(diff == 0)
    top1 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float(np.mean(a.argmax(1) == b.argmax(1)))
    return OutputAgreement(
        name=name,
        max_abs_diff=float(np.max(np.abs(a64 - b64))) if a64.size else 0.0,
        relative_error=float(diff / norm_a) if norm_a > 0 else float(diff),
        cosine=cosine,
        top1_agreement=top1,
    )


def run(model, feeds: dict, provider: str = "cpu", batch_size: int = 64) -> list[np.ndarray]:
    """Run a model on feeds in batches along axis 0; returns one array per output."""
    session = make_session(model, provider)
    n = len(next(iter(feeds.values())))
    chunks = []
    for start in range(0, n, batch_size):
        try:
            chunks.append(session.run(None, {k: v[start : start + batch_size] for k, v in feeds.items()}))
        except Exception as exc:  # a model that passes the checker but cannot run (e.g. wrong channel counts)
            text = first_line(exc)
            raise ModelError(f"onnxruntime cannot run the model: {text}") from None
    # a scalar output (one per batch, e.g. a loss) is compared batch by batch
    return [np.concatenate([np.atleast_1d(c[i]) for c in chunks]) for i in range(len(chunks[0]))]


def compare_models(model_a, model_b, feeds: dict, provider: str = "cpu") -> list[OutputAgreement]:
    """Agreement of each output of ``model_b`` with ``model_a`` on ``feeds``."""
    session = make_session(model_a, provider)
    names = [o.name for o in session.get_outputs()]
    out_a = run(model_a, feeds, provider)
    out_b = run(model_b, feeds, provider)
    return [compare_outputs(n, a, b) for n, a, b in zip(names, out_a, out_b)]


def summary(agreements: list[OutputAgreement]) -> str:
    parts = []
    for g in agreements:
        text = f"{g.name}: max|diff| {g.max_abs_diff:.3g}, rel.err {g.relative_error:.3g}, cosine {g.cosine:.6f}"
        if g.top1_agreement is not None:
            text += f", top-1 agreement {100 * g.top1_agreement:.1f}%"
        parts.append(text)
    return "; ".join(parts)


def as_dicts(agreements: list[OutputAgreement]) -> list[dict]:
    return [asdict(g) for g in agreements]

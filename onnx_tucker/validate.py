"""The self-check: output agreement of two models on the same inputs, and a verdict that can fail.

Like Polygraphy's comparator, a check ends ``PASSED`` or ``FAILED`` with the reason, and the exit
code follows the verdict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnx_tucker.errors import ModelError

# On real inputs (labelled data or --inputs), an output this far from the original is a broken model,
# not a compressed one: a degenerate calibration set gave cosine 0.17 and 10% top-1 (issue 12).
COLLAPSE_COSINE = 0.5


class CompressedModelFails(ModelError):
    """The original runs, the compressed model does not: a failed self-check, not bad input."""


@dataclass
class OutputAgreement:
    name: str
    max_abs_diff: float
    relative_error: float  # ||a-b|| / ||a||
    cosine: float
    top1_agreement: float | None  # for classifier-shaped (N, C) outputs
    finite: bool = True  # every value of the new output is finite
    same_shape: bool = True
    same_dtype: bool = True


@dataclass
class Verdict:
    passed: bool
    reason: str

    def line(self) -> str:
        return ("PASSED" if self.passed else "FAILED") + f" | {self.reason}"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason}


@dataclass(frozen=True)
class Tolerances:
    min_agreement: float | None = None  # top-1 agreement with the original, 0..1
    max_rel_error: float | None = None  # per output
    min_cosine: float | None = None  # per output


def compare_outputs(name: str, a: np.ndarray, b: np.ndarray) -> OutputAgreement:
    same_shape, same_dtype = a.shape == b.shape, a.dtype == b.dtype
    finite = bool(np.all(np.isfinite(b))) if np.issubdtype(b.dtype, np.floating) else True
    if not same_shape:
        return OutputAgreement(name, float("inf"), float("inf"), 0.0, None, finite, False, same_dtype)
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
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
            finite=finite, same_shape=True, same_dtype=same_dtype,
        )


def run(model, feeds: dict, provider: str = "cpu", batch_size: int = 64) -> list[np.ndarray]:
    """Run a model on feeds in batches along axis 0; returns one array per output."""
    from onnx_tucker.capture import capture

    return capture(model, feeds, provider=provider, batch_size=batch_size)


def compare_models(model_a, model_b, feeds: dict, provider: str = "cpu") -> list[OutputAgreement]:
    """Agreement of each output of ``model_b`` with ``model_a`` on ``feeds``."""
    from onnx_tucker.runtime import make_session

    names = [o.name for o in make_session(model_a, provider).get_outputs()]
    out_a = run(model_a, feeds, provider)  # the original not running is the input's problem: raised as is
    try:
        out_b = run(model_b, feeds, provider)
    except ModelError as exc:
        raise CompressedModelFails(str(exc)) from None
    if len(out_a) != len(out_b):
        raise ModelError(f"the compressed model has {len(out_b)} outputs, the original {len(out_a)}")
    return [compare_outputs(n, a, b) for n, a, b in zip(names, out_a, out_b)]


def verdict(agreements: list[OutputAgreement], tolerances: Tolerances = Tolerances()) -> Verdict:
    """PASSED, or FAILED with every reason: non-finite values, shape or dtype changes, a tolerance missed."""
    problems = []
    for g in agreements:
        if not g.same_shape:
            problems.append(f"{g.name}: shape differs from the original")
            continue
        if not g.same_dtype:
            problems.append(f"{g.name}: dtype differs from the original")
        if not g.finite:
            problems.append(f"{g.name}: non-finite values (NaN/Inf)")
        if tolerances.max_rel_error is not None and not g.relative_error <= tolerances.max_rel_error:
            problems.append(f"{g.name}: relative error {g.relative_error:.3g} > {tolerances.max_rel_error:g}")
        if tolerances.min_cosine is not None and not g.cosine >= tolerances.min_cosine:
            problems.append(f"{g.name}: cosine {g.cosine:.3f} < {tolerances.min_cosine:g} (the output collapsed)")
        if tolerances.min_agreement is not None and g.top1_agreement is not None and g.top1_agreement < tolerances.min_agreement:
            problems.append(f"{g.name}: top-1 agreement {100 * g.top1_agreement:.1f}% < {100 * tolerances.min_agreement:.1f}%")
    if problems:
        return Verdict(False, "; ".join(problems))
    return Verdict(True, "all outputs finite, same shapes and dtypes" + (", within the tolerances" if tolerances != Tolerances() else ""))


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

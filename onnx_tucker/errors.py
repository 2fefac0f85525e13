"""The project's exception types.

Every failure a user can cause is one of these; the CLI prints its message on
one line and exits with its code, never with a traceback.
"""
from __future__ import annotations


class OnnxTuckerError(Exception):
    """A failure to report to the user as one line. ``exit_code`` 1: the model cannot be processed."""

    exit_code = 1


class UsageError(OnnxTuckerError):
    """Wrong usage: bad option values, bad paths (exit code 2)."""

    exit_code = 2


class ModelError(OnnxTuckerError):
    """The model cannot be read, checked or processed (exit code 1)."""

    exit_code = 1


class DataError(OnnxTuckerError):
    """An input/calibration/labelled data file that cannot be used (exit code 1)."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its message's first line, or its type's name. A first line that ends in a
    colon or "following indices" (onnxruntime's dimension errors) takes the next lines too: they say what was wrong."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:3]:
        if not (text.endswith(":") or text.endswith("following indices")):
            break
        text = f"{text} {line}"
    return text[:limit]

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
    """An exception as one short line: its message's first line, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__

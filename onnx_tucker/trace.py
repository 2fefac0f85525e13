"""Where a run's time goes, as it goes: each phase and step logs its wall time when it ends.

Through :mod:`logging` (logger ``onnx_tucker``), so a toolchain routes it as it routes the rest of its logs;
``onnx-tucker compress -v`` prints it on stderr. A run cut short at a time limit still shows how far it got
and what took the time (issue 15: a GPU run killed at 200 s had said nothing).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("onnx_tucker")
_start = time.perf_counter()
_sessions = {"count": 0, "seconds": 0.0}


def restart() -> None:
    """Times from now on (a command's start), and a fresh session count."""
    global _start
    _start = time.perf_counter()
    _sessions.update(count=0, seconds=0.0)


@contextmanager
def timed(what: str):
    """Logs ``what``'s wall time (and the time since the command started) when the block ends; a block ended
    by an error or a signal says it was cut short."""
    start, finished = time.perf_counter(), False
    try:
        yield
        finished = True
    finally:
        if log.isEnabledFor(logging.INFO):
            now = time.perf_counter()
            log.info("%s: %.1f s (at %.1f s)%s", what, now - start, now - _start, "" if finished else ", cut short")


def session_made(seconds: float) -> None:
    """Counts an onnxruntime session and the seconds its creation took (a CUDA session costs ~0.5 s)."""
    _sessions["count"] += 1
    _sessions["seconds"] += seconds


def sessions_line() -> str:
    return f"onnxruntime sessions: {_sessions['count']} created, {_sessions['seconds']:.1f} s"


_handler = None


def verbose(on: bool) -> None:
    """``-v``: the trace on stderr (the stream at this call), one line per step; off again for a command without
    it, so commands run one after another in one process (``cli.main``) each print only their own."""
    global _handler
    if _handler is not None:
        log.removeHandler(_handler)
        log.setLevel(logging.NOTSET)
        _handler = None
    if on:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("onnx-tucker: %(message)s"))
        log.addHandler(_handler)
        log.setLevel(logging.INFO)

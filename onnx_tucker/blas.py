"""One BLAS thread while the tool's small fits run, restored when the last of them is done.

threadpoolctl's limits are process-wide: two ``compress`` calls on two threads each saved "the original" and
restored it as they left, so whichever left last restored the other's limit of 1 and numpy stayed on one thread
for the rest of the process. Here the first caller in sets the limit and the last one out restores what was
there before any of them; calls nest freely (the pipeline's fit inside, the sensitivity's fits within).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

_lock = threading.Lock()
_state = {"inside": 0, "limiter": None, "controller": None}


@contextmanager
def one_blas_thread():
    from threadpoolctl import ThreadpoolController

    with _lock:
        if _state["inside"] == 0:
            if _state["controller"] is None:  # finds the BLAS libraries once (a search per fit cost ~4 ms)
                _state["controller"] = ThreadpoolController()
            _state["limiter"] = _state["controller"].limit(limits=1, user_api="blas")
        _state["inside"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["inside"] -= 1
            if _state["inside"] == 0:
                _state["limiter"].restore_original_limits()
                _state["limiter"] = None

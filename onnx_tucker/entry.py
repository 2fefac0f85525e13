"""The console script's first step: Ctrl-C or SIGTERM while the heavy modules load (numpy, tensorly, scipy, half a
second) ends in one line and 130/143, like later on, not in a traceback from deep inside an import."""
from __future__ import annotations

import os
import signal
import sys


def _early(signum, frame) -> None:
    # Nothing is written before the command starts, so there is nothing to unwind: leave at once. (Raising
    # KeyboardInterrupt inside an extension module's import could resurface at interpreter exit as exit -2.)
    try:
        sys.stderr.write("onnx-tucker: interrupted\n" if signum == signal.SIGINT else "onnx-tucker: terminated (SIGTERM)\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def main() -> int:
    previous = {s: signal.signal(s, _early) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from onnx_tucker.cli import main as run
        import onnx_tucker.outputs  # noqa: F401  (cli.main imports it before its own handling starts: load it here)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = run()
    # The command is over (outputs committed or removed, its line printed); the interpreter's teardown (0.3 s, 3 s
    # after TensorFlow) must not turn a finished run into a silent 143 with its output in place: ignore them now.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    return code

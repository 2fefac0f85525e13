"""The console script's first step: Ctrl-C or SIGTERM while the heavy modules load (numpy, tensorly, scipy, half a
second) ends in one line and 130/143, like later on, not in a traceback from deep inside an import."""
from __future__ import annotations

import signal
import sys


def main() -> int:
    received = []

    def early(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, early) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from onnx_tucker.cli import main as run
    except BaseException:
        if not received:  # a real import failure: its own message
            raise
        print("onnx-tucker: interrupted" if received[0] == signal.SIGINT else "onnx-tucker: terminated (SIGTERM)", file=sys.stderr)
        return 128 + received[0]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return run()

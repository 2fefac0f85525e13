"""``--ray``: independent pieces of work (a layer's distortion curve, a sweep setting) as Ray tasks.

Ray is the engine (``pip install 'onnx-tucker[ray]'``): it schedules the tasks over the cluster's
workers, retries a task whose worker died or that raised (``max_retries``), and moves the arrays
through its object store. Here are only the driver's parts: connect (:func:`cluster`), submit and
collect in input order with one progress bar over every worker (:func:`map_tasks`).

Tasks get plain values (numpy arrays, bytes, dicts, dataclasses without graph nodes) and return
plain values; the caller's results are the same as a local run's (``tests/test_fanout.py``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from onnx_tucker.errors import OnnxTuckerError, UsageError, first_line

RETRIES = 3  # a task is tried at most 1 + RETRIES times (a worker lost, or an exception) before the run fails
INSTALL = "pip install 'onnx-tucker[ray]'"


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs ray: {INSTALL}") from None
    return ray


def check_address(address) -> str:
    """``auto`` or a ``HOST:PORT`` / ``ray://HOST:PORT`` cluster address (checked, not yet connected)."""
    text = str(address).strip()
    if not text:
        raise UsageError("--ray: expected 'auto' or a cluster address like HEAD:6379")
    if text == "auto":
        return text
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray: expected 'auto' or a cluster address like HEAD:6379, got {text!r}")
    return text


@contextlib.contextmanager
def cluster(address: str):
    """Connected to Ray for the ``with`` block; yields the number of CPUs the cluster offers.

    ``auto``: the cluster this process or machine already belongs to (``ray.init`` done by the caller,
    ``RAY_ADDRESS``, or one started here with ``ray start``), else a new local one on this machine's
    CPUs. An address: that cluster's head (``HEAD:6379``, or ``ray://HEAD:10001`` through Ray Client).
    A connection this block made is closed at its end. The workers run this package's code as the
    driver has it (shipped with the job), with the packages installed on their machines.
    """
    ray = require_ray()
    address = check_address(address)
    owned = not ray.is_initialized()
    if owned and address != "auto":
        _reachable(address)
    elif owned and os.environ.get("RAY_ADDRESS") and os.environ["RAY_ADDRESS"] != "auto":
        try:  # auto joins RAY_ADDRESS's cluster: Ray waits minutes, printing its own warnings, if nothing is there
            _reachable(os.environ["RAY_ADDRESS"])
        except OnnxTuckerError as exc:
            raise OnnxTuckerError(f"{exc} (from RAY_ADDRESS, which --ray auto joins)") from None
        except ValueError:  # not HOST:PORT: Ray's own parsing says what it makes of it
            pass
    if owned:
        import logging

        runtime_env = {"py_modules": [str(Path(__file__).resolve().parent)]}
        kwargs = dict(address=None if address == "auto" else address, runtime_env=runtime_env,
                      logging_level=logging.ERROR, log_to_driver=False)
        if address == "auto" and not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False
        handlers = _signal_handlers()
        try:
            ray.init(**kwargs)
        except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError, ValueError...
            where = "a local Ray cluster" if address == "auto" else f"the Ray cluster at {address}"
            hint = ("" if address == "auto" or os.environ.get("RAY_AUTH_MODE") else
                    " (a cluster from `ray start` asks for its token: set RAY_AUTH_MODE=token, README 'Many machines')")
            raise OnnxTuckerError(f"--ray: cannot connect to {where}: {first_line(exc)}{hint}") from None
        finally:  # ray.init installs its own SIGTERM handler (a crash dump, exit 15): the command's unwinding comes back
            _restore(handlers)
    quiet = _quiet_task_errors() if owned else None
    try:
        yield int(ray.cluster_resources().get("CPU", 0))
    finally:
        if quiet is not None:
            quiet()
        if owned:
            ray.shutdown()


def _quiet_task_errors():
    """Keep Ray's own task-error lines ('(raylet) Task _task failed. There are 3 retries remaining...', tracebacks
    and all, printed on stdout by its driver thread) off the command's output: every failure that matters comes back
    as the command's one line. Ray's private printer is wrapped while the block runs; returns the undo (None where
    this Ray has no such printer)."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        return None

    def printer(data, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            return None
        return original(data, *args, **kwargs)

    worker.print_to_stdstream = printer

    def undo():
        worker.print_to_stdstream = original

    return undo



def _signal_handlers() -> dict:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(handlers: dict) -> None:
    import signal

    for s, handler in handlers.items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A one-line error now when nothing listens at the address (Ray itself would wait minutes for it)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise OnnxTuckerError(f"--ray: cannot connect to the Ray cluster at {address}: {exc.strerror or exc} "
                              f"(is `ray start --head` running there?)") from None



class _Refused:
    """A task's one-line error (``OnnxTuckerError``): the input's fault, the same on any retry, so not retried."""

    def __init__(self, error: OnnxTuckerError):
        self.error = error


def _task(fn, item, **shared):
    try:
        return fn(item, **shared)
    except OnnxTuckerError as exc:
        return _Refused(exc)


def map_tasks(fn, items: list, shared: dict | None = None, labels: list | None = None, weights: list | None = None,
              progress: bool = True, desc: str = "tasks", unit: str = "task", on_result=None) -> list:
    """``[fn(item, **shared) for item in items]`` as Ray tasks (inside :func:`cluster`), in input order.

    ``shared`` values go into the object store once and every task reads them from there. Results are
    collected as they finish, each advancing the bar by its ``weights`` entry (default 1). A task that
    still fails after :data:`RETRIES` retries raises a one-line error naming its ``labels`` entry.
    ``on_result(index, result)`` runs here, in the driver, as each result arrives (e.g. to cache it).
    """
    ray = require_ray()
    if not items:
        return []
    labels = labels or [str(i) for i in range(len(items))]
    weights = weights or [1] * len(items)
    remote = ray.remote(max_retries=RETRIES, retry_exceptions=True, num_cpus=1)(_task)
    refs = {name: ray.put(value) for name, value in (shared or {}).items()}
    pending = {remote.remote(fn, item, **refs): index for index, item in enumerate(items)}
    results = [None] * len(items)
    from tqdm import tqdm

    bar = tqdm(total=sum(weights), desc=desc, unit=unit, file=sys.stderr, leave=False,
               disable=None if progress else True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    raise OnnxTuckerError(f"--ray: {labels[index]} failed (retried up to {RETRIES} times): "
                                          f"{type(cause).__name__}: {first_line(cause)}") from None
                if isinstance(results[index], _Refused):  # the input's fault: as it would be raised locally
                    raise results[index].error
                if on_result is not None:
                    on_result(index, results[index])
                bar.update(weights[index])
    finally:
        for ref in pending:  # a failure: the rest is not needed
            ray.cancel(ref, force=True)
        bar.close()
    return results

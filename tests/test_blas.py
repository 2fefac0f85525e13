"""The one-BLAS-thread limit the fits run under, shared by concurrent calls."""
import threading

from threadpoolctl import threadpool_info

from onnx_tucker.blas import one_blas_thread


def _blas_threads():
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})


def test_overlapping_calls_restore_what_was_there_before_the_first():
    """Two compress calls on two threads each saved and restored threadpoolctl's process-wide limit: whichever left last
    restored the other's limit of 1, and numpy stayed on one thread for the rest of the process."""
    before = _blas_threads()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_blas_thread():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with one_blas_thread():
            second_in.set()
            first_out.wait(10)
            seen["inside"] = _blas_threads()  # the first has left: still limited while this one runs

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["inside"] in ([1], []) and _blas_threads() == before
    with one_blas_thread():
        with one_blas_thread():  # nested: the inner exit leaves the limit on
            pass
        assert _blas_threads() in ([1], [])
    assert _blas_threads() == before

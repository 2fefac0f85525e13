"""onnx_tucker.trace: where a run's time goes, logged as each step ends (compress -v)."""
import logging

import pytest

from onnx_tucker import trace


def test_a_step_is_logged_when_it_ends_even_by_an_error(caplog):
    trace.restart()
    with caplog.at_level(logging.INFO, logger="onnx_tucker"):
        with trace.timed("plan: moments of 3 layers"):
            pass
        with pytest.raises(ValueError):
            with trace.timed("refit"):
                raise ValueError("cut short")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("plan: moments of 3 layers: ") and " s (at " in messages[0]
    assert messages[1].startswith("refit: ")  # a run killed inside a phase still says it


def test_nothing_is_logged_below_info(caplog):
    with caplog.at_level(logging.WARNING, logger="onnx_tucker"):
        with trace.timed("statistics"):
            pass
    assert not caplog.records


def test_sessions_are_counted_from_the_command_start():
    from onnx_tucker.runtime import make_session
    from conftest import conv_model

    trace.restart()
    assert trace.sessions_line() == "onnxruntime sessions: 0 created, 0.0 s"
    make_session(conv_model())
    make_session(conv_model())
    assert trace.sessions_line().startswith("onnxruntime sessions: 2 created, ")
    trace.restart()
    assert trace.sessions_line().startswith("onnxruntime sessions: 0 created")


def test_a_step_cut_short_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="onnx_tucker"):
        with pytest.raises(KeyboardInterrupt):
            with trace.timed("plan: 264 probes on cuda"):
                raise KeyboardInterrupt
    assert caplog.records[-1].getMessage().endswith(", cut short")


def test_verbose_prints_once_per_command_and_is_off_for_the_next(capsys):
    """Commands run one after another in one process (cli.main): -v twice printed each line twice, and a later
    command without -v still printed the trace."""
    try:
        trace.verbose(True)
        trace.verbose(True)
        with trace.timed("statistics"):
            pass
        assert capsys.readouterr().err.count("onnx-tucker: statistics: ") == 1
        trace.verbose(False)
        with trace.timed("statistics"):
            pass
        assert "statistics" not in capsys.readouterr().err
    finally:
        trace.verbose(False)

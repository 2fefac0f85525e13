"""One-line messages made from exceptions."""
from onnx_tucker.errors import first_line


def test_first_line_keeps_what_onnxruntime_says_after_a_colon():
    exc = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the following indices\n"
                       " index: 0 Got: 13 Expected: 1\n Please fix either the inputs/outputs or the model.")
    assert first_line(exc).endswith("for the following indices index: 0 Got: 13 Expected: 1")
    assert "\n" not in first_line(exc)


def test_first_line_is_the_first_line_or_the_type():
    assert first_line(ValueError("bad value\nstack details")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 1000))) == 300

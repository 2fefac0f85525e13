"""The self-check can fail: non-finite outputs, shape or dtype changes, a model that does not run, tolerances."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.cli import main
from onnx_tucker.validate import CompressedModelFails, Tolerances, compare_models, compare_outputs, verdict

from conftest import residual_model


def test_identical_outputs_pass_and_the_reason_says_what_was_checked():
    a = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    v = verdict([compare_outputs("y", a, a.copy())], Tolerances(min_agreement=1.0, max_rel_error=0.0))
    assert v.passed and v.line().startswith("PASSED | ") and "within the tolerances" in v.reason


@pytest.mark.parametrize("b, needle", [
    (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a), "non-finite"),
    (lambda a: a[:, :5], "shape differs"),
    (lambda a: a.astype(np.float64), "dtype differs"),
])
def test_broken_outputs_fail(b, needle):
    a = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    v = verdict([compare_outputs("y", a, b(a))])
    assert not v.passed and needle in v.reason and v.line().startswith("FAILED | ")


def test_user_tolerances_fail_with_the_numbers():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 10)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32)
    g = compare_outputs("y", a, b)
    assert not verdict([g], Tolerances(max_rel_error=0.1)).passed
    assert "top-1 agreement" in verdict([g], Tolerances(min_agreement=0.99)).reason
    assert "collapsed" in verdict([compare_outputs("y", a, -a)], Tolerances(min_cosine=0.5)).reason
    assert verdict([g], Tolerances(max_rel_error=10.0)).passed


def test_a_compressed_model_that_does_not_run_is_a_failed_check_not_an_input_error():
    model = residual_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    w = next(i for i in broken.graph.initializer if i.name == "W2")
    w.CopyFrom(numpy_helper.from_array(np.zeros((16, 5, 3, 3), np.float32), "W2"))  # wrong input channels
    feeds = {"x": np.zeros((2, 3, 10, 10), np.float32)}
    with pytest.raises(CompressedModelFails):
        compare_models(model, broken, feeds)


def test_cli_failed_check_exits_1_writes_nothing_unless_kept(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    out = tmp_path / "out.onnx"
    # --max-rel-error 0 cannot hold for a real compression: FAILED, exit 1, nothing written
    assert main([str(src), str(out), "--ratio", "0.5", "--max-rel-error", "0"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: " in captured.out and "relative error" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("onnx-tucker: error: self-check FAILED")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    assert main([str(src), str(out), "--ratio", "0.5", "--max-rel-error", "0", "--keep-failed"]) == 1
    assert out.exists() and "written anyway" in capsys.readouterr().out
    assert main([str(src), str(tmp_path / "ok.onnx"), "--ratio", "0.5", "--max-rel-error", "10"]) == 0
    assert "PASSED: " in capsys.readouterr().out


def test_cli_collapse_on_real_inputs_fails_by_default(tmp_path, capsys):
    """A model whose outputs collapse on real inputs is FAILED without any tolerance given (issue 12)."""
    model = residual_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    x = np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x)
    # ranks of 1 everywhere wreck this model; the original's logits are far from the result's
    code = main([str(src), str(tmp_path / "o.onnx"), "--ratio", "0.05", "--force", "--inputs", str(tmp_path / "inputs.npz")])
    out = capsys.readouterr().out
    if code == 1:
        assert "collapsed" in out and not (tmp_path / "o.onnx").exists()
    else:  # the collapse floor is about real breakage: then the cosine really stayed above it
        assert "PASSED" in out

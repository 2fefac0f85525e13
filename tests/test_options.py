"""Options in one place: the API validates once, every command shares the groups, and a flag given where it
has no effect, or with a bad value, is a one-line usage error rather than silently ignored (issue 12)."""
import inspect

import onnx
import numpy as np
import pytest

from onnx_tucker import UsageError, compress
from onnx_tucker.cli import build_parser, main
from onnx_tucker.options import CompressOptions, check_fraction_list, check_int_list

from conftest import residual_model


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(path))
    return path


@pytest.mark.parametrize("args, needle", [
    (["--refit", "last"], "--refit only applies with --calibrate"),
    (["--calib-size", "64"], "--calib-size only applies with --calibrate"),
    (["--budget-rule", "uniform"], "--budget-rule only applies with --target-macs"),
    (["--target-macs", "0.5", "--curves", "c.json"], "--curves only applies with --target-macs and --calibrate"),
    (["--latency-batch", "4"], "--latency-batch only applies with --latency-aware"),
    (["--energy", "0.8"], "--energy only applies with --rank-method energy"),
    (["--iterations", "-5"], "whole number >= 0"),
    (["--rank-multiple", "two"], "positive integer"),
    (["--max-rel-error", "nan"], "finite number"),
    (["--min-agreement", "1.5"], "finite number in [0, 1]"),
    (["--no-check", "--max-rel-error", "0.1"], "no effect with --no-check"),
    (["--data-limit", "10"], "--data-limit only applies with --data"),
    (["--reconstruct-steps", "10"], "--reconstruct-steps only applies with --distill"),
    (["--distill", "--calibrate", "x.npz", "--reconstruct-steps", "-1"], "whole number >= 0"),
    (["--distill", "--calibrate", "x.npz", "--distill-steps", "0", "--reconstruct-steps", "0"], "nothing to train"),
    (["--target-macs", "0.5", "--probe-images", "256"], "--probe-images only applies with --target-macs and --calibrate"),
    (["--target-macs", "0.5", "--calibrate", "x.npz", "--probe-images", "0"], "whole number >= 1"),
    (["--ratio", "nan"], "(0, 1]"),
    (["--target-macs", "0"], "(0, 1]"),
    (["--distill-batch", "8"], "--distill-batch only applies with --distill"),
    (["--distill", "--calibrate", "x.npz", "--distill-batch", "0"], "positive integer"),
    (["--distill", "--calibrate", "x.npz", "--distill-steps", "0", "--distill-batch", "8"], "only applies with the global loss"),
    (["--ratio", "0.3", "--target-latency", "0.5"], "--ratio has no effect with --target-latency"),
])
def test_compress_flags_without_effect_or_with_bad_values_are_usage_errors(src, tmp_path, capsys, args, needle):
    assert main([str(src), str(tmp_path / "out.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("argv, needle", [
    (["bench", "M", "--batch", "1,,2"], "expected comma-separated"),
    (["bench", "M", "--providers", ""], "expected comma-separated providers"),
    (["bench", "M", "--providers", "cpu,tpu"], "unknown provider 'tpu'"),
    (["convert", "a.keras", "b.onnx", "--tolerance", "nan"], "finite number"),
    (["inspect", "M", "--ratios", "0.5,,0.25"], "expected comma-separated"),
])
def test_shared_list_and_number_flags_refuse_bad_values_everywhere(src, capsys, argv, needle):
    argv = [str(src) if a == "M" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_a_flag_means_the_same_in_every_command():
    """Flags shared by several subcommands come from one group: same help, same default."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    seen = {}
    for name, command in sub.choices.items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                seen.setdefault(flag, []).append((name, action.help, action.type is None))
    shared = {f: uses for f, uses in seen.items() if len(uses) > 1}
    assert {"--calibrate", "--calib-size", "--data", "--data-limit", "--threads", "--batch", "--rank-multiple", "--inputs"} <= set(shared)
    for flag, uses in shared.items():
        if flag in ("--batch", "--runs", "--inputs", "--data", "--json"):  # one meaning; defaults and what is written differ by command
            continue
        assert len({h for _, h, _ in uses}) == 1, (flag, uses)


def test_api_validates_once_and_its_docstring_lists_every_option():
    with pytest.raises(UsageError, match="unknown option"):
        compress(residual_model(), ratio=0.5, rnak_multiple=8)
    with pytest.raises(UsageError, match="positive integer"):
        compress(residual_model(), ratio=0.5, rank_multiple=0)
    with pytest.raises(UsageError, match="unknown budget rule"):
        compress(residual_model(), target_macs=0.5, budget_rule="greedy")
    doc = inspect.getdoc(compress) + inspect.getdoc(CompressOptions)
    for field in CompressOptions.__dataclass_fields__:
        assert field in doc, field


def test_list_parsers_refuse_empty_items():
    assert check_int_list("1, 32,1", "--batch") == [1, 32]
    assert check_fraction_list("0.5,0.25", "--ratios") == [0.5, 0.25]
    for bad in ("", "1,,2", ",1"):
        with pytest.raises(UsageError):
            check_int_list(bad, "--batch")


@pytest.mark.parametrize("kwargs, needle", [
    ({"forms": 5}, "forms: expected a list of form names"),
    ({"exclude": 0}, "exclude: expected a list of layer names or 0-based indices"),
    ({"exclude": [None]}, "exclude: expected a list of layer names or 0-based indices, got None"),
    ({"calibration": np.zeros((64, 3, 10, 10), np.float32)}, "calibration: expected {input name: array of samples}"),
    ({"calibration": "train.npz"}, "load_calibration(path, model)"),
    ({"calibration": {"x": [1, 2]}}, "calibration['x']: expected an array"),
    ({"distill": {"bogus": 1}, "calibration": {"x": np.zeros((64, 3, 10, 10), np.float32)}}, "distill: unknown option(s) bogus"),
    ({"distill": 5}, "distill: expected a dict"),
    ({"input_shapes": {"x": "abc"}}, "input_shapes['x']: expected positive whole dims"),
    ({"input_shapes": {"x": [1, 3, 0, 10]}}, "input_shapes['x']: expected positive whole dims"),
    ({"curves": "c.json"}, "curves only applies with target_macs"),
    ({"ray": "auto"}, "ray only applies with target_macs and calibration"),
    ({"layers": 5}, "layers: expected a list of layer kinds"),
    ({"calibration": {"x": np.zeros((0, 3, 10, 10), np.float32)}}, "calibration['x']: holds no samples"),
    ({"calibration": {"x": np.full((64, 3, 10, 10), np.nan, np.float32)}}, "calibration['x']: contains NaN or Inf"),
    ({"input_shapes": {"nope": [1, 3, 8, 8]}}, "input_shapes: the model has no input 'nope'"),
    ({"ratio": None, "target_macs": 0.5, "budget_rule": "uniform", "curves": "c.json",
      "calibration": {"x": np.zeros((64, 3, 10, 10), np.float32)}}, "not with budget_rule='uniform'"),
])
def test_api_options_of_the_wrong_shape_are_usage_errors(kwargs, needle):
    """What the CLI cannot send but a script can: one UsageError saying what was expected, not a TypeError deep inside."""
    kwargs = {"ratio": 0.5, **kwargs}
    with pytest.raises(UsageError) as info:
        compress(residual_model(), **{k: v for k, v in kwargs.items() if v is not None or k != "ratio"})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_recorded_settings_say_forms_layers_folding_and_distillation():
    """The output's `onnx_tucker.settings` left out --forms, --layers, the folding and --distill: a distilled and an
    undistilled model recorded the same settings."""
    import json as _json

    new, report = compress(residual_model(), ratio=0.5, forms=("spatial",), layers=("kxk",), fold_affine=False)
    settings = _json.loads({p.key: p.value for p in new.metadata_props}["onnx_tucker.settings"])
    assert (settings["forms"], settings["layers"], settings["fold_affine"], settings["distill"]) == (["spatial"], ["kxk"], False, None)
    assert report.settings["forms"] == ["spatial"]


@pytest.mark.parametrize("layers, forms, message", [
    (("hidden",), ("spatial",), r"^--forms spatial: --layers hidden factors nothing \(it prunes hidden channels\)"),
    (("kxk",), ("svd",), r"^--forms svd factors 1x1 and dense layers, none of --layers kxk: add 1x1 or dense"),
    (("1x1", "dense"), ("tucker2", "svd"), r"^--forms tucker2 factors kxk layers, none of --layers 1x1,dense"),
])
def test_a_form_that_factors_none_of_the_layers_asked_for_is_refused(layers, forms, message):
    """--layers hidden --forms spatial only pruned and --layers kxk --forms svd ran Tucker-2: a flag without effect."""
    from onnx_tucker.errors import UsageError
    from onnx_tucker.options import CompressOptions

    calibration = {"input": np.zeros((4, 3, 8, 8), np.float32)}  # --layers hidden needs some
    with pytest.raises(UsageError, match=message):
        CompressOptions.from_kwargs(ratio=0.5, layers=layers, forms=forms, calibration=calibration)
    # with a kind each form takes: fine
    CompressOptions.from_kwargs(ratio=0.5, layers=layers + ("kxk", "1x1"), forms=forms, calibration=calibration)

"""The report: the table shows each layer's form and ranks, the JSON keeps forms, chains and the verdict."""
import json

import numpy as np

import pytest

from onnx_tucker import compress
from onnx_tucker.report import distill_summary

from conftest import residual_model


def test_table_and_json_show_the_form_ranks_and_chains():
    _, report = compress(residual_model(), ratio=0.5, forms=("tucker2", "svd"), force=True)
    table = report.table()
    assert "form" in table.splitlines()[0] and "tucker2" in table and "svd" in table
    data = json.loads(report.to_json())
    forms = {layer["layer"]: layer["form"] for layer in data["layers"]}
    assert forms["block_conv"] == "tucker2" and forms["pointwise"] == "svd" and forms["grouped"] == ""
    assert [c["layer"] for c in data["chains"]] == [layer["layer"] for layer in data["layers"] if layer["decomposed"]]
    assert next(layer for layer in data["layers"] if layer["layer"] == "pointwise")["ranks"] == [5]
    assert data["verdict"] is None  # the API does not run the self-check; the CLI fills it in


CHECK = {"before": {"agreement": 0.9317, "kl": 0.0818}, "after": {"agreement": 0.9366, "kl": 0.0567},
         "reconstructed": {"agreement": 0.9512, "kl": 0.0533}, "holdout_samples": 205, "check_on": "holdout",
         "reconstruct": {"kept": 3, "chains": [{}, {}, {}]}, "seconds": 316.4, "device": "cpu"}


@pytest.mark.parametrize("returned, shown, metrics", [
    ("reconstructed", "the reconstructed model (the global phase did not pass the check)", "95.1%, KL 0.0818 -> 0.0533"),
    ("distilled", "the distilled model;", "93.7%, KL 0.0818 -> 0.0567"),
    ("compressed", "the compressed model unchanged", "93.2%, KL 0.0818 -> 0.0818"),
])
def test_distill_summary_names_the_kept_model_and_its_check(returned, shown, metrics):
    line = distill_summary(CHECK | {"returned": returned})
    assert line.startswith("distill: kept ") and shown in line and metrics in line, line
    assert "3/3 reconstruction units kept" in line and "205 held-out inputs" in line and "93.2% ->" in line and "(316 s on cpu)" in line


def test_distill_summary_says_when_the_global_phase_ran_again_from_the_compressed_model():
    twice = [{"from": "reconstructed", "after": None}, {"from": "compressed", "after": CHECK["after"]}]
    line = distill_summary(CHECK | {"returned": "distilled", "global_attempts": twice})
    assert "kept the model distilled from the compressed one (neither the reconstruction" in line
    once = distill_summary(CHECK | {"returned": "distilled", "global_attempts": twice[1:]})
    assert "kept the distilled model;" in once


def test_distill_summary_says_when_the_global_phase_diverged():
    """A diverged run (float16 Adam wrote NaN on its first step) said only 'kept the compressed model unchanged'."""
    line = distill_summary(CHECK | {"returned": "compressed", "diverged": True, "steps": 1, "steps_asked": 500})
    assert line.endswith("; the global phase diverged (loss not finite) after 1 of 500 steps"), line
    assert "diverged" not in distill_summary(CHECK | {"returned": "compressed", "diverged": False})


def test_distill_summary_without_reconstruction_or_holdout():
    stats = {"before": {"agreement": 0.9, "kl": 0.2}, "after": {"agreement": 0.92, "kl": 0.1}, "returned": "distilled",
             "reconstructed": None, "check_on": "train", "holdout_samples": 0, "reconstruct": None, "seconds": 3.2, "device": "cuda"}
    line = distill_summary(stats)
    assert "kept the distilled model" in line and "units" not in line and "the training inputs" in line and "(3 s on cuda)" in line


def test_a_layer_of_no_known_size_does_not_make_the_model_macs_unknown():
    """A conv whose weight is computed at run time has no size: it is listed with '?' and left out of the totals. It
    made the whole report say 'MACs unknown (give --input-shape)' on a model whose every size is static."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_tucker import compress
    from onnx_tucker.report import format_table

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="static", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["w"], ["w_relu"], name="computed_weight"),
             helper.make_node("Conv", ["x", "w_relu"], ["b"], name="dynamic", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "runtime_weight", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = compress(model, ratio=0.5)
    totals = report.totals()
    assert totals["macs_known"] and totals["macs_before"] == 16 * 8 * 9 * 144 and totals["macs_reduction"] > 1
    table = format_table(report)
    assert "unknown" not in table and "give --input-shape" not in table
    assert any(line.startswith("dynamic") and "?" in line for line in table.splitlines())

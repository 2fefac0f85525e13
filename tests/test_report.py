"""The report: the table shows each layer's form and ranks, the JSON keeps forms, chains and the verdict."""
import json

from onnx_tucker import compress

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

"""External data and size: load/save round trips, automatic external data above a threshold,
the output's data file never touching the input's, and external paths outside the model's folder refused."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

import onnx_tucker
from conftest import conv_model, relative_error, residual_model, run_model
from onnx_tucker.errors import ModelError, UsageError
from onnx_tucker.io import load_model, save_model, write_serialized

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, args)], capture_output=True, text=True, env=full_env, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save ``model`` with all weights above 64 bytes in one external file (default: <name>.data)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    location = location or path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=64)
    return path.parent / location


def feeds_for(model, batch=2, seed=1):
    x = model.graph.input[0]
    dims = [d.dim_value or batch for d in x.type.tensor_type.shape.dim]
    return {x.name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        external_data_helper.ExternalDataInfo(t).location
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }


# --- round trips ----------------------------------------------------------------------------


def test_model_with_external_data_loads_compresses_and_saves(tmp_path):
    src = residual_model()
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    data = save_external(src, path)
    assert data.is_file() and path.stat().st_size < 2000  # the weights really are outside
    model = load_model(path)
    assert not any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    new, report = onnx_tucker.compress(model, ratio=1.0, force=True)
    out = tmp_path / "out" / "model_r1.onnx"
    out.parent.mkdir()
    written = save_model(new, out, external_data=True)
    assert written == out.parent / "model_r1.onnx.data" and written.is_file()
    assert external_locations(out) == {"model_r1.onnx.data"}
    feeds = feeds_for(src)
    assert relative_error(run_model(src, feeds)[0], run_model(out, feeds)[0]) <= 1e-4
    onnx.checker.check_model(str(out))
    again = load_model(out)
    assert len(again.graph.initializer) == len(new.graph.initializer)


def test_external_data_in_a_subfolder_of_the_model_folder_is_accepted(tmp_path):
    (tmp_path / "weights").mkdir()
    save_external(residual_model(), tmp_path / "m.onnx", location="weights/m.bin")
    model = load_model(tmp_path / "m.onnx")
    assert numpy_helper.to_array(model.graph.initializer[0]).size > 0


def test_inline_save_leaves_no_data_file(tmp_path):
    out = tmp_path / "small.onnx"
    assert save_model(residual_model(), out) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]


# --- automatic external data ----------------------------------------------------------------


def test_output_above_threshold_goes_to_external_data_automatically(tmp_path):
    model = conv_model(c_in=32, c_out=64)  # 73 KiB of weights
    out = tmp_path / "big.onnx"
    feeds = feeds_for(model)
    expected = run_model(model, feeds)[0]
    written = save_model(model, out, external_threshold=16 * 1024)  # moves the weights of `model` out
    assert written == tmp_path / "big.onnx.data"
    assert written.stat().st_size >= 64 * 32 * 9 * 4
    assert out.stat().st_size < 16 * 1024
    assert written.stat().st_mode & 0o777 == out.stat().st_mode & 0o777  # not onnx's private 0600
    assert np.array_equal(expected, run_model(out, feeds)[0])


def test_output_below_threshold_stays_inline(tmp_path):
    out = tmp_path / "m.onnx"
    assert save_model(conv_model(), out, external_threshold=10**9) is None
    assert not (tmp_path / "m.onnx.data").exists()


def test_cli_threshold_from_environment(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_model(c_in=32, c_out=64), str(src))
    out = tmp_path / "out.onnx"
    r = cli(src, out, "--ratio", "0.5", "--no-check", env={"ONNX_TUCKER_EXTERNAL_THRESHOLD": "4096"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx.data").is_file()
    assert external_locations(out) == {"out.onnx.data"}
    onnx.checker.check_model(str(out))


def test_cli_bad_threshold_in_environment_is_a_usage_error(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_model(), str(src))
    r = cli(src, tmp_path / "out.onnx", "--no-check", env={"ONNX_TUCKER_EXTERNAL_THRESHOLD": "lots"})
    assert r.returncode == 2 and "ONNX_TUCKER_EXTERNAL_THRESHOLD" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


# --- the output's data file never touches the input's ----------------------------------------


def test_output_data_file_colliding_with_inputs_data_is_refused(tmp_path):
    src = tmp_path / "in.onnx"
    data = save_external(conv_model(c_in=16, c_out=32), src, location="out.onnx.data")  # the name OUT would use
    before = snapshot(tmp_path)
    r = cli(src, tmp_path / "out.onnx", "--ratio", "0.5", "--external-data")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "input" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before  # input model and its data byte-identical, nothing new
    assert data.is_file()


def test_output_path_equal_to_inputs_data_file_is_refused(tmp_path):
    src = tmp_path / "in.onnx"
    data = save_external(conv_model(c_in=16, c_out=32), src)
    before = snapshot(tmp_path)
    r = cli(src, data, "--ratio", "0.5")
    assert r.returncode == 2 and "external data" in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


def test_api_refuses_to_write_over_a_protected_file(tmp_path):
    protected = tmp_path / "m.onnx.data"
    protected.write_bytes(b"precious")
    with pytest.raises(UsageError, match="input"):
        save_model(conv_model(), tmp_path / "m.onnx", external_data=True, protected=[protected])
    assert protected.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]


def test_stale_output_data_file_is_replaced_not_appended_to(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_model(c_in=16, c_out=32), str(src))
    out = tmp_path / "out.onnx"
    stale = tmp_path / "out.onnx.data"
    stale.write_bytes(b"\xff" * 100_000)  # left over from an earlier run
    r = cli(src, out, "--ratio", "0.5", "--external-data")
    assert r.returncode == 0, r.stderr
    size_first = stale.stat().st_size
    assert size_first < 100_000
    r = cli(src, out, "--ratio", "0.5", "--external-data")  # a second run over its own output
    assert r.returncode == 0, r.stderr
    assert stale.stat().st_size == size_first
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    feeds = feeds_for(model)
    assert relative_error(run_model(src, feeds)[0], run_model(out, feeds)[0]) < 1.0


def test_input_with_external_data_untouched_by_a_successful_run(tmp_path):
    src = tmp_path / "in.onnx"
    save_external(residual_model(), src)
    before = snapshot(tmp_path)
    r = cli(src, tmp_path / "out.onnx", "--ratio", "0.5", "--external-data")
    assert r.returncode == 0, r.stderr
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"out.onnx", "out.onnx.data"}


def test_external_data_output_is_deterministic(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    for name in ("a", "b"):
        assert cli(src, tmp_path / f"{name}.onnx", "--no-check", "--external-data").returncode == 0
    assert digest(tmp_path / "a.onnx.data") == digest(tmp_path / "b.onnx.data")
    # the model files differ only by the data file's name they point to
    a = (tmp_path / "a.onnx").read_bytes().replace(b"a.onnx.data", b"X.onnx.data")
    b = (tmp_path / "b.onnx").read_bytes().replace(b"b.onnx.data", b"X.onnx.data")
    assert a == b


# --- external paths outside the model's folder ----------------------------------------------


def _point_outside(tmp_path: Path, location_for) -> Path:
    """A model whose tensors point at ``location_for(secret)``, with ``secret`` outside its folder."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(100_000, np.uint8).tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "m.onnx"
    save_external(conv_model(c_in=16, c_out=32), path, location="m.onnx.data")
    model = onnx.load(str(path), load_external_data=False)
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location_for(secret)
    (folder / "m.onnx.data").unlink()
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "location_for",
    [lambda s: "../secret.bin", lambda s: str(s), lambda s: "sub/../../secret.bin"],
    ids=["dotdot", "absolute", "nested_dotdot"],
)
def test_external_path_outside_model_folder_is_refused(tmp_path, location_for):
    path = _point_outside(tmp_path, location_for)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    before = snapshot(path.parent)
    r = cli(path, tmp_path / "out.onnx", "--no-check")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "outside the model's folder" in r.stderr
    assert snapshot(path.parent) == before and not (tmp_path / "out.onnx").exists()


def test_external_data_symlink_made_by_the_user_is_followed(tmp_path):
    # Issue 12: the location in the model is checked lexically (above); a link in the model's folder
    # is the user's own (a Hugging Face cache links model.onnx.data into ../blobs/), as for onnxruntime.
    path = _point_outside(tmp_path, lambda s: "m.onnx.data")
    (path.parent / "m.onnx.data").symlink_to(tmp_path / "secret.bin")
    model = load_model(path, check=False)
    assert all(not external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def test_missing_external_data_file_is_a_one_line_model_error(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_model(c_in=16, c_out=32), path).unlink()
    r = cli(path, tmp_path / "out.onnx")
    assert r.returncode == 1 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_truncated_external_data_file_is_a_one_line_model_error(tmp_path):
    path = tmp_path / "m.onnx"
    data = save_external(conv_model(c_in=16, c_out=32), path)
    data.write_bytes(data.read_bytes()[:100])
    r = cli(path, tmp_path / "out.onnx")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("location", ["bad\x00name", "", "."])
def test_unusable_external_location_is_a_one_line_model_error(tmp_path, location):
    path = _point_outside(tmp_path, lambda s: location)
    with pytest.raises(ModelError):
        load_model(path)


# --- memory (issue 5): streamed save, checker on the file -------------------------------------


def _serialized_models():
    rich = residual_model()
    rich.doc_string = "doc"
    rich.graph.doc_string = "graph doc"
    rich.metadata_props.add(key="k", value="v")
    rich.graph.value_info.add().name = "vi"
    rich.graph.sparse_initializer.add().values.name = "sparse"
    empty_graph = onnx.ModelProto(ir_version=8)
    empty_graph.graph.name = ""
    unknown = conv_model()
    unknown.graph.node[0].doc_string = "x"
    # an unknown field (number 999) on the graph and on the model: serialised whole, order kept
    unknown = onnx.ModelProto.FromString(unknown.SerializeToString() + b"\xba\x3e\x01a")
    graph_unknown = conv_model()
    graph_bytes = graph_unknown.graph.SerializeToString() + b"\xba\x3e\x01b"
    graph_unknown.graph.CopyFrom(onnx.GraphProto.FromString(graph_bytes))
    return [conv_model(), residual_model(), rich, onnx.ModelProto(), empty_graph, unknown, graph_unknown]


@pytest.mark.parametrize("index", range(7))
def test_streamed_serialisation_is_byte_identical(index):
    import io

    model = _serialized_models()[index]
    out = io.BytesIO()
    write_serialized(model, out)
    assert out.getvalue() == model.SerializeToString(deterministic=True)


def test_saved_inline_model_is_byte_identical_to_serialize(tmp_path):
    model = residual_model()
    save_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString(deterministic=True)


def test_checker_failure_on_file_still_reported_as_before(tmp_path):
    model = conv_model()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        load_model(path)
    assert load_model(path, check=False).graph.node[0].input[1] == "does_not_exist"


def test_external_data_model_is_still_checked_in_memory(tmp_path, monkeypatch):
    """With external data the file check does not stand for the loaded model's check."""
    import onnx_tucker.io as io_module

    path = tmp_path / "m.onnx"
    save_external(residual_model(), path)
    seen = []
    monkeypatch.setattr(io_module, "check_model", lambda model, p=None: seen.append(p))
    load_model(path)
    assert seen == [path]
    plain = tmp_path / "plain.onnx"
    onnx.save(residual_model(), str(plain))
    load_model(plain)
    assert seen == [path]  # checked from its file only


def test_nodes_out_of_order_are_sorted_on_load_and_the_model_checks(tmp_path):
    """onnxruntime's float16 converter appends its Casts after the nodes that read them: onnxruntime runs such a
    model, the checker refuses it; load_model sorts the nodes (stably) instead of refusing."""
    model = residual_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[1:] + nodes[:1])  # the first node last: a reader before its producer
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, path)
    with pytest.raises(Exception):
        onnx.checker.check_model(str(path))
    loaded = load_model(path)
    onnx.checker.check_model(loaded)
    assert [n.name for n in loaded.graph.node] == [n.name for n in nodes]  # the original order is the only one here
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(run_model(loaded, {"x": x})[0], run_model(residual_model(), {"x": x})[0], rtol=1e-6)


def test_sort_nodes_keeps_a_sorted_graph_as_it_is():
    from onnx_tucker.io import sort_nodes

    model = residual_model()
    before = model.SerializeToString()
    assert sort_nodes(model.graph) is False and model.SerializeToString() == before

"""bench: statistics on synthetic timings, interleaving, profile attribution, JSON schema, accuracy, CLI."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker import bench, compress
from onnx_tucker import providers
from onnx_tucker.providers import available_providers

from conftest import residual_model

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "onnx_tucker", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


# --- statistics ------------------------------------------------------------------------------------

def test_latency_percentiles_and_throughput_on_known_timings():
    seconds = np.arange(1, 101) / 1e3  # 1..100 ms
    stats = bench.latency_stats(seconds, batch=32)
    assert stats["runs"] == 100
    assert stats["median_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["max_ms"] == pytest.approx(100.0)
    assert stats["throughput_ips"] == pytest.approx(32 / 0.0505)


def test_pairwise_speedup_ignores_a_drift_that_hits_both_models():
    drift = np.concatenate([np.ones(50), 3 * np.ones(50)])  # the machine slows down 3x half-way
    base, model = 0.010 * drift, 0.005 * drift
    s = bench.paired_speedup(base, model)
    assert s["median"] == pytest.approx(2.0) and s["p10"] == pytest.approx(2.0) and s["p90"] == pytest.approx(2.0)
    assert s["pairs"] == 100


def test_pairwise_speedup_reports_its_spread():
    rng = np.random.default_rng(0)
    model = rng.uniform(1, 2, 1000)
    ratios = rng.uniform(1.5, 2.5, 1000)
    s = bench.paired_speedup(model * ratios, model)
    assert s["median"] == pytest.approx(np.median(ratios))
    assert s["p10"] < s["q1"] < s["median"] < s["q3"] < s["p90"]
    assert s["p10"] == pytest.approx(1.6, abs=0.03) and s["p90"] == pytest.approx(2.4, abs=0.03)
    with pytest.raises(ValueError):
        bench.paired_speedup([1.0, 2.0], [1.0])


def test_interleaving_rotates_who_goes_first():
    orders = [bench.interleaved_order(3, i) for i in range(6)]
    assert orders[:3] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for position in range(3):  # over 3 iterations each model takes each position once
        assert sorted(o[position] for o in orders[:3]) == [0, 1, 2]


def test_time_interleaved_runs_round_robin_and_times_each_run():
    calls, now = [], [0.0]

    def clock():
        return now[0]

    def runner(k, cost):
        def run():
            calls.append(k)
            now[0] += cost
        return run

    times = bench.time_interleaved([runner(0, 0.002), runner(1, 0.001)], runs=4, warmup=2, clock=clock)
    assert calls == [0, 1, 1, 0] + [0, 1, 1, 0, 0, 1, 1, 0]  # warm-up, then timed, never two runs of one model in a row per pair
    assert times == [[pytest.approx(0.002)] * 4, [pytest.approx(0.001)] * 4]
    assert bench.paired_speedup(*times)["median"] == pytest.approx(2.0)


def test_list_options_are_parsed_or_refused():
    assert bench.parse_providers("CPU, gpu,cuda") == ["cpu", "cuda"]
    assert bench.parse_batches("1,32,1") == [1, 32]
    for bad in ("0", "a", "", "1,,2"):
        with pytest.raises(bench.UsageError):
            bench.parse_batches(bad)
    for bad in ("tpu", "", "cpu,,cuda"):
        with pytest.raises(bench.UsageError):
            bench.parse_providers(bad)


def test_explicitly_requested_missing_provider_fails(monkeypatch):
    import onnx_tucker.providers as providers

    monkeypatch.setattr(providers, "available_providers", lambda: ["cpu"])
    monkeypatch.setattr(providers, "unavailable_reason", lambda p: "no NVIDIA GPU or driver found")
    assert bench.choose_providers(None) == (["cpu"], {"cuda": "no NVIDIA GPU or driver found"})
    with pytest.raises(bench.OnnxTuckerError, match="cuda execution provider not available: no NVIDIA GPU"):
        bench.choose_providers(["cuda", "cpu"])


# --- per-layer attribution -------------------------------------------------------------------------

def tiny_chain_model(decomposed: bool, prefix: str = "conv_tucker") -> onnx.ModelProto:
    """x -> conv (-> three tucker convs, recorded as a chain in the metadata) -> relu -> y."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    if decomposed:
        inits = [w("A", (2, 4, 1, 1)), w("C", (2, 2, 3, 3)), w("B", (4, 2, 1, 1))]
        convs = [
            helper.make_node("Conv", ["x", "A"], ["conv_tucker_in_out"], name=f"{prefix}_in"),
            helper.make_node("Conv", ["conv_tucker_in_out", "C"], ["conv_tucker_core_out"], name=f"{prefix}_core", pads=[1] * 4),
            helper.make_node("Conv", ["conv_tucker_core_out", "B"], ["c"], name=f"{prefix}_out"),
        ]
    else:
        inits = [w("W", (4, 4, 3, 3))]
        convs = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4)]
    graph = helper.make_graph(
        convs + [helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if decomposed:
        from onnx_tucker.chain import METADATA_KEY, Chain, dumps

        chain = Chain("conv", "tucker2", (2, 2), {"first": f"{prefix}_in", "core": f"{prefix}_core", "last": f"{prefix}_out"},
                      {"first": "A", "core": "C", "last": "B"}, None, "x", "c")
        model.metadata_props.add(key=METADATA_KEY, value=dumps([chain]))
    return model


def event(name, us, index="0"):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": us, "args": {"node_index": index}}


def test_profile_names_are_traced_back_through_fusions_and_nchwc():
    original, chain = tiny_chain_model(False), tiny_chain_model(True)
    assert bench.original_node("conv_kernel_time", original) == "conv"  # FusedConv keeps the name
    assert bench.original_node("y_nchwc_kernel_time", original) == "conv"  # Conv+Relu, named after relu's output
    assert bench.original_node("conv_tucker_in_out_nchwc", chain) == "conv_tucker_in"
    assert bench.original_node("y_nchwc", chain) == "conv_tucker_out"
    assert bench.original_node("ReorderOutput_token_3", chain) is None


def test_profile_names_are_traced_back_through_an_unfolded_batchnorm():
    """An export that kept BatchNormalization: onnxruntime fuses Conv+BN+Relu and names the kernel after the Relu's
    output; the walk back crosses the BN to the conv (it used to stop there and time the layer as nothing)."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    bn = [numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
         helper.make_node("Relu", ["n"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w, *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert bench.original_node("y_nchwc_kernel_time", model) == "conv"
    assert bench.original_node("n_nchwc_kernel_time", model) == "conv"


def test_per_layer_rows_compare_the_chain_with_the_original():
    original, chain = tiny_chain_model(False), tiny_chain_model(True)
    # two runs each; the first is warm-up and left out
    before = bench.kernel_times([event("y_nchwc", 999), event("y_nchwc", 300), event("ReorderInput", 5, "1"), event("ReorderInput", 5, "1")], skip_runs=1)
    after_events = [event("conv_tucker_in_out_nchwc", 40, "0"), event("conv_tucker_core_out_nchwc", 100, "1"), event("y_nchwc", 60, "2"),
                    event("ReorderOutput", 7, "3"), event("ReorderOutput", 8, "4")]  # two nodes, one name
    after = bench.kernel_times(after_events)
    a, b = bench.attribute(before, original), bench.attribute(after, chain)
    assert a == {"conv": 300.0, None: 5.0} and b[None] == 15.0
    [row] = bench.layer_rows(original, chain, a, b)
    assert row == {"layer": "conv", "form": "tucker2", "original_us": 300.0, "in_us": 40.0, "core_us": 100.0, "out_us": 60.0,
                   "parts": {"first": 40.0, "core": 100.0, "last": 60.0},
                   "chain_us": 200.0, "speedup": 1.5, "pays_off": True}
    assert bench.model_totals(chain, b, 1) == {"model_index": 1, "conv_us": 200.0, "other_us": 15.0, "total_us": 215.0}


def test_per_layer_rows_follow_the_chain_records_not_node_names():
    """Chains are found by the record the model carries: nodes named anything still count, and a model
    without records (not written by onnx-tucker) has no chains, whatever its node names say."""
    original = tiny_chain_model(False)
    renamed = tiny_chain_model(True, prefix="renamed_by_user")
    times = {"renamed_by_user_in": 10.0, "renamed_by_user_core": 20.0, "renamed_by_user_out": 30.0}
    [row] = bench.layer_rows(original, renamed, {"conv": 100.0}, times)
    assert row["chain_us"] == 60.0 and row["pays_off"]
    unrecorded = tiny_chain_model(True)
    del unrecorded.metadata_props[:]
    assert bench.layer_rows(original, unrecorded, {"conv": 100.0}, {"conv_tucker_in": 1.0}) == []


# --- accuracy on a hand-made labelled set ----------------------------------------------------------

def scores_model(shift_class0: float) -> onnx.ModelProto:
    """y = x + shift on class 0: with a big shift every sample is predicted as class 0."""
    shift = np.zeros((1, 4), np.float32)
    shift[0, 0] = shift_class0
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "S"], ["y"], name="add")], "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(shift, "S")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_top1_and_agreement_on_a_hand_made_labelled_set(tmp_path):
    x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1, 2, 3, 0]]  # predicted class = row index of the 1
    y = np.array([0, 1, 2, 3, 1, 2, 0, 1])  # 6 of 8 right for the plain model
    np.savez(tmp_path / "labelled.npz", x_test=x, y_test=y)
    paths = []
    for name, shift in (("plain", 0.0), ("always0", 10.0)):
        onnx.save(scores_model(shift), str(tmp_path / f"{name}.onnx"))
        paths.append(tmp_path / f"{name}.onnx")
    config = bench.BenchConfig(models=paths, providers=["cpu"], batches=[2], threads=1, warmup=1, runs=3,
                               data=str(tmp_path / "labelled.npz"), progress=False)
    result = bench.run_bench(config)
    plain, always0 = result["accuracy"]
    assert plain["labelled"] and plain["samples"] == 8
    assert plain["top1"] == pytest.approx(6 / 8) and plain["top1_agreement"] == 1.0 and plain["max_abs_diff"] == 0
    assert always0["top1"] == pytest.approx(2 / 8)  # labels 0 at rows 0 and 6
    assert always0["top1_agreement"] == pytest.approx(2 / 8)  # plain predicts 0 at rows 0 and 7
    assert always0["max_abs_diff"] == pytest.approx(10.0)


def test_json_has_the_documented_schema(tmp_path):
    onnx.save(scores_model(0.0), str(tmp_path / "a.onnx"))
    onnx.save(scores_model(0.5), str(tmp_path / "b.onnx"))
    config = bench.BenchConfig(models=[tmp_path / "a.onnx", tmp_path / "b.onnx"], batches=[1, 3], threads=1, warmup=0, runs=4, progress=False)
    result = json.loads(json.dumps(bench.run_bench(config)))  # JSON-clean
    assert result["schema"] == bench.SCHEMA
    assert set(result) == {"schema", "tool_version", "onnxruntime_version", "host", "settings", "providers", "models",
                           "results", "accuracy", "per_layer"}
    assert set(result["settings"]) == {"threads", "spinning", "warmup", "runs", "batches", "cudnn_conv_algo_search", "inputs", "interleaved",
                                       "precision", "cuda_graph"}
    assert result["settings"]["threads"] == 1 and result["settings"]["interleaved"] is True and result["settings"]["spinning"] is False
    assert set(result["providers"]) == {"requested", "benchmarked", "unavailable"} and "cpu" in result["providers"]["benchmarked"]
    cpu = [r for r in result["results"] if r["provider"] == "cpu"]
    assert [(r["batch"], r["model_index"]) for r in cpu] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    for r in result["results"]:
        assert tuple(r) == bench.RESULT_KEYS and r["runs"] == 4
        assert r["median_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert (r["speedup"] is None) == (r["model_index"] == 0)
        if r["speedup"]:
            assert tuple(r["speedup"]) == bench.SPEEDUP_KEYS
    assert not result["accuracy"][1]["labelled"] and result["accuracy"][1]["top1"] is None  # random inputs: agreement only
    assert result["per_layer"] is None


# --- the command, end to end -----------------------------------------------------------------------

@pytest.fixture
def residual_pair(saved_residual, tmp_path):
    compressed, _ = compress(residual_model(), ratio=0.5)
    out = tmp_path / "residual_r05.onnx"
    onnx.save(compressed, str(out))
    return saved_residual, out


def test_bench_cli_end_to_end_with_json_and_per_layer(residual_pair, tmp_path):
    original, compressed = residual_pair
    out = tmp_path / "bench.json"
    r = cli("bench", original, compressed, "--providers", "cpu", "--batch", "1,4", "--threads", "1",
            "--warmup", "2", "--runs", "10", "--per-layer", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "median ms" in r.stdout and "residual_r05.onnx" in r.stdout and "block_conv" in r.stdout and "pays off" in r.stdout
    assert "Traceback" not in r.stderr
    data = json.loads(out.read_text())
    assert len(data["results"]) == 4 and data["settings"]["threads"] == 1
    assert [p["batch"] for p in data["per_layer"]] == [1, 4]
    layers = {row["layer"] for row in data["per_layer"][0]["layers"]}
    assert layers == {"block_conv", "down"}  # the chains the compressed model records (the 3-channel stem stays whole)
    assert all(row["original_us"] > 0 and row["chain_us"] > 0 for row in data["per_layer"][0]["layers"])


@pytest.mark.skipif("cuda" in available_providers(), reason="CUDA is available here")
def test_bench_cli_asked_for_missing_cuda_exits_1_with_the_reason(saved_residual):
    r = cli("bench", saved_residual, "--providers", "cuda,cpu", "--runs", "1")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "cuda execution provider not available" in r.stderr
    assert "median ms" not in r.stdout


def test_bench_cli_refuses_bad_usage_in_one_line(saved_residual, tmp_path):
    for args in (("--providers", "tpu"), ("--batch", "0"), ("--runs", "0")):
        r = cli("bench", saved_residual, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("bench", tmp_path / "missing.onnx")
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.cuda
def test_bench_on_cuda_binds_io_on_the_device(residual_pair):
    if "cuda" not in available_providers():
        pytest.skip("CUDA EP not available")
    config = bench.BenchConfig(models=list(residual_pair), providers=["cuda"], batches=[1, 8], warmup=2, runs=20,
                               cudnn_algo="HEURISTIC", progress=False)
    result = bench.run_bench(config)
    assert result["settings"]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert all(r["session_providers"][0] == "CUDAExecutionProvider" and r["warmup"] >= bench.GPU_MIN_WARMUP for r in result["results"])
    feeds = bench.timing_feeds(residual_model(), 4)
    on_gpu = bench.run_outputs(residual_pair[1], feeds, "cuda", 1, providers.get("cuda").options("HEURISTIC"))
    on_cpu = bench.run_outputs(residual_pair[1], feeds, "cpu", 1, {})
    np.testing.assert_allclose(on_gpu[0], on_cpu[0], rtol=1e-3, atol=1e-3)


def test_a_batch_whose_inputs_would_not_fit_in_memory_is_refused():
    from conftest import residual_model

    model = residual_model()  # 3x10x10 float32: 1200 bytes a sample
    bench.check_batch_memory(model, [1, 32], limit=10**6)
    with pytest.raises(bench.UsageError, match="--batch 1000: the inputs alone would take"):
        bench.check_batch_memory(model, [1, 1000], limit=10**6)


# --- float16 copies and CUDA graph capture ---------------------------------------------------------

def test_fp16_bench_times_float16_copies_and_measures_their_agreement(residual_pair):
    config = bench.BenchConfig(models=list(residual_pair), providers=["cpu"], batches=[2], threads=1, warmup=1, runs=3,
                               progress=False, fp16=True)
    result = bench.run_bench(config)
    assert result["settings"]["precision"] == "float16"
    assert len(result["results"]) == 2
    first, second = result["accuracy"]
    assert first["top1_agreement"] == 1.0 and first["max_abs_diff"] == 0
    assert np.isfinite(second["max_abs_diff"])
    assert "float16 copies" in bench.summary_lines(result)[-1]


def test_fp16_agreement_is_measured_on_the_float16_copies(residual_pair, monkeypatch):
    seen = []
    real = bench.run_outputs
    monkeypatch.setattr(bench, "run_outputs", lambda path, *a, **k: seen.append(Path(path).name) or real(path, *a, **k))
    bench.run_bench(bench.BenchConfig(models=list(residual_pair), providers=["cpu"], batches=[1], threads=1, warmup=0, runs=1,
                                      progress=False, fp16=True))
    assert seen and all(name.startswith("fp16_") for name in seen)


def test_float16_copies_are_float16_and_keep_float32_inputs(residual_pair, tmp_path):
    from onnx_tucker.precision import weight_dtype

    models = [onnx.load(str(p)) for p in residual_pair]
    copies = bench.float16_copies(list(residual_pair), models, str(tmp_path))
    for copy in copies:
        model = onnx.load(str(copy))
        assert weight_dtype(model) == "float16"
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_cuda_graph_is_refused_on_a_provider_without_graph_capture(saved_residual):
    with pytest.raises(bench.UsageError, match="--cuda-graph: the cpu execution provider has no CUDA graph capture"):
        bench.run_bench(bench.BenchConfig(models=[Path(saved_residual)], providers=["cpu"], cuda_graph=True, progress=False))
    r = cli("bench", saved_residual, "--providers", "cpu", "--cuda-graph")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_graph_capture_and_fp16_reach_the_provider_options():
    assert providers.get("cuda").options("HEURISTIC", cuda_graph=True) == {
        "device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}
    assert "enable_cuda_graph" not in providers.get("cuda").options()
    trt = providers.get("tensorrt").options(cuda_graph=True, fp16=True)
    assert trt["trt_cuda_graph_enable"] == "True" and trt["trt_fp16_enable"] == "True"


def test_preallocated_outputs_give_the_same_values_as_a_plain_run(saved_residual):
    session = bench.open_session(Path(saved_residual), "cpu", 1, {})
    feeds = bench.timing_feeds(residual_model(), 3)
    fixed = bench.bind(session, feeds, "cpu", fixed_outputs=True)
    fixed()
    expected = session.run(None, feeds)
    for got, want in zip(fixed.outputs(), expected):
        np.testing.assert_array_equal(got, want)
    before = [v.data_ptr() for v in fixed.binding.get_outputs()]
    fixed()
    assert [v.data_ptr() for v in fixed.binding.get_outputs()] == before  # the addresses a CUDA graph replays


@pytest.mark.cuda
def test_bench_on_cuda_with_graph_capture_and_fp16(residual_pair):
    if "cuda" not in available_providers():
        pytest.skip("CUDA EP not available")
    config = bench.BenchConfig(models=list(residual_pair), providers=["cuda"], batches=[1, 8], warmup=2, runs=10,
                               progress=False, cuda_graph=True, fp16=True)
    result = bench.run_bench(config)
    assert result["settings"]["cuda_graph"] and result["settings"]["precision"] == "float16"
    assert all(r["session_providers"][0] == "CUDAExecutionProvider" for r in result["results"])
    assert all(np.isfinite(row["max_abs_diff"]) for row in result["accuracy"])


def test_models_with_other_input_shapes_are_one_line_errors(tmp_path):
    """A rank-2 and a rank-3 input of the same name: the bench ran into onnxruntime's error as an internal one."""
    from onnx_tucker.errors import ModelError

    def model(shape):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    paths = []
    for name, shape in (("a.onnx", ["N", 16]), ("b.onnx", ["N", 4, 16]), ("c.onnx", ["N", 17])):
        onnx.save(model(shape), str(tmp_path / name))
        paths.append(tmp_path / name)
    for other, said in ((paths[1], "x [N, 4, 16] against x [N, 16]"), (paths[2], "x [N, 17] against x [N, 16]")):
        with pytest.raises(ModelError, match=r"has other inputs than .*" + re.escape(said)):
            bench.check_models([paths[0], other])


# --- outputs matched by name, strict JSON ----------------------------------------------------------

def outputs_model(outputs: list[tuple[str, str, list]], batch="N") -> onnx.ModelProto:
    """x [batch, 4] -> one node per output: (name, op, shape); the graph lists the outputs in the given order."""
    nodes = [helper.make_node(op, ["x"], [name], name=f"{op}_{name}", **({"axes": [1]} if op == "ReduceMax" else {}))
             for name, op, _ in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, _, shape in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def strict_json(text: str):
    """JSON as a strict parser reads it (Python's json accepts Infinity and NaN; JSON.parse and jq do not)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_bench_matches_outputs_by_name_not_by_their_order(tmp_path):
    """The same model with its two outputs listed in reverse order: max|diff| inf and cosine 0 (and a JSON
    Infinity) next to 100% top-1 agreement, because outputs were paired by position."""
    outs = [("scores", "Relu", ["N", 4]), ("total", "ReduceMax", ["N", 1])]
    onnx.save(outputs_model(outs), str(tmp_path / "a.onnx"))
    onnx.save(outputs_model(outs[::-1]), str(tmp_path / "a_reversed.onnx"))
    r = cli("bench", tmp_path / "a.onnx", tmp_path / "a_reversed.onnx", "--providers", "cpu", "--threads", "1", "--warmup", "0",
            "--runs", "2", "--no-progress", "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    data = strict_json((tmp_path / "bench.json").read_text())
    row = data["accuracy"][1]
    assert row["max_abs_diff"] == 0 and row["cosine"] == pytest.approx(1.0) and row["top1_agreement"] == 1.0
    assert row["outputs_matched_by"] == "name" and row["unmatched_outputs"] == [] and row["shape_mismatch"] == []
    assert "inf" not in r.stdout and "by position" not in r.stdout


def test_outputs_sharing_no_name_are_compared_by_position_and_the_table_says_so():
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    rows = bench.accuracy_rows([[a, a[:, :1]], [a.copy(), a[:, :1].copy()]], None, "cpu",
                               names=[["scores", "total"], ["output_0", "output_1"]])
    assert rows[1]["outputs_matched_by"] == "position" and rows[1]["max_abs_diff"] == 0 and rows[1]["top1_agreement"] == 1.0
    # names shared in part: only the shared ones are compared, the others are listed
    rows = bench.accuracy_rows([[a, a[:, :1]], [a[:, :1] + 1, a.copy()]], None, "cpu", names=[["scores", "total"], ["extra", "scores"]])
    assert rows[1]["outputs_matched_by"] == "name" and rows[1]["max_abs_diff"] == 0
    assert rows[1]["unmatched_outputs"] == ["total", "extra"]
    result = {"accuracy": [{"model": f"m{r['model_index']}.onnx", **r} for r in
                           bench.accuracy_rows([[a], [a]], None, "cpu", names=[["scores"], ["logits"]])]}
    assert "note: m1.onnx has no output named as in m0.onnx: outputs compared by position" in bench.accuracy_table(result)


def test_an_output_of_another_shape_is_null_in_strict_json_not_infinity(tmp_path):
    onnx.save(outputs_model([("y", "Relu", ["N", 4])]), str(tmp_path / "a.onnx"))
    onnx.save(outputs_model([("y", "ReduceMax", ["N", 1])]), str(tmp_path / "b.onnx"))
    config = bench.BenchConfig(models=[tmp_path / "a.onnx", tmp_path / "b.onnx"], providers=["cpu"], batches=[1], threads=1,
                               warmup=0, runs=2, progress=False)
    result = bench.run_bench(config)
    row = result["accuracy"][1]
    assert row["max_abs_diff"] is None and row["cosine"] is None and row["shape_mismatch"] == ["y"]
    strict_json(json.dumps(result))  # what cli.cmd_bench writes
    assert strict_json(bench.to_json(result)) == strict_json(json.dumps(result))
    table = bench.accuracy_table(result)
    assert "shape differs" in table and "inf" not in table


def test_non_finite_numbers_become_null():
    value = {"a": float("inf"), "b": [np.float64("nan"), 1.5, np.float32(2.0)], "c": {"d": -float("inf"), "e": None, "f": "x"}}
    assert bench.json_ready(value) == {"a": None, "b": [None, 1.5, 2.0], "c": {"d": None, "e": None, "f": "x"}}
    with pytest.raises(ValueError):
        json.dumps(value, allow_nan=False)
    strict_json(bench.to_json(value))


# --- --fp16 --per-layer profiles the float16 copies ------------------------------------------------

def test_profile_names_of_a_float16_node_run_as_float32_are_traced_back():
    """onnxruntime's CPU EP runs a float16 Conv as float32 between inserted casts, renaming its tensors
    ``InsertedPrecisionFreeCast_<tensor>``: every layer of a float16 copy read 0 us."""
    original, chain = tiny_chain_model(False), tiny_chain_model(True)
    assert bench.original_node("InsertedPrecisionFreeCast_y_nchwc_kernel_time", original) == "conv"
    assert bench.original_node("InsertedPrecisionFreeCast_conv_tucker_core_out_nchwc_kernel_time", chain) == "conv_tucker_core"
    assert bench.original_node("InsertedPrecisionFreeCast_conv_tucker_in_out_kernel_time", chain) == "conv_tucker_in"


def test_fp16_per_layer_profiles_the_float16_copies_that_are_timed(residual_pair, monkeypatch):
    profiled = []
    real = bench.profile_model
    monkeypatch.setattr(bench, "profile_model", lambda path, *a, **k: profiled.append(Path(path).name) or real(path, *a, **k))
    result = bench.run_bench(bench.BenchConfig(models=list(residual_pair), providers=["cpu"], batches=[2], threads=1, warmup=0,
                                               runs=1, progress=False, fp16=True, per_layer=True))
    assert profiled and all(name.startswith("fp16_") for name in profiled), profiled
    [profile] = result["per_layer"]
    assert profile["precision"] == "float16"
    assert {row["layer"] for row in profile["layers"]} == {"block_conv", "down"}
    assert all(row["original_us"] > 0 and row["chain_us"] > 0 for row in profile["layers"]), profile["layers"]
    assert "float16 copies" in bench.per_layer_table(profile)


# --- without --batch: the batch the models are exported for ----------------------------------------

def test_without_a_batch_a_model_fixed_to_one_is_timed_at_it(tmp_path):
    onnx.save(outputs_model([("y", "Relu", [2, 4])], batch=2), str(tmp_path / "b2.onnx"))
    onnx.save(outputs_model([("y", "Relu", ["N", 4])]), str(tmp_path / "dynamic.onnx"))
    config = bench.BenchConfig(models=[tmp_path / "b2.onnx", tmp_path / "dynamic.onnx"], providers=["cpu"], threads=1, warmup=0,
                               runs=2, progress=False)
    assert config.batches is None
    result = bench.run_bench(config)
    assert result["settings"]["batches"] == [2] and {r["batch"] for r in result["results"]} == {2}
    assert bench.default_batches([tmp_path / "dynamic.onnx"], [onnx.load(str(tmp_path / "dynamic.onnx"))]) == [1]
    with pytest.raises(bench.UsageError, match="--batch 1 cannot run it"):  # asked for: still refused
        bench.run_bench(bench.BenchConfig(models=[tmp_path / "b2.onnx"], providers=["cpu"], batches=[1], runs=1, progress=False))


def test_models_fixed_to_different_batches_are_one_line_error(tmp_path):
    for batch in (2, 3):
        onnx.save(outputs_model([("y", "Relu", [batch, 4])], batch=batch), str(tmp_path / f"b{batch}.onnx"))
    config = bench.BenchConfig(models=[tmp_path / "b2.onnx", tmp_path / "b3.onnx"], providers=["cpu"], runs=1, progress=False)
    with pytest.raises(bench.UsageError, match=r"^b2.onnx is exported for batch 2 only and b3.onnx for batch 3 only: no batch runs them all"):
        bench.run_bench(config)


def test_bench_cli_without_batch_times_a_fixed_batch_model_at_its_batch(tmp_path):
    onnx.save(outputs_model([("y", "Relu", [2, 4])], batch=2), str(tmp_path / "b2.onnx"))
    r = cli("bench", tmp_path / "b2.onnx", "--providers", "cpu", "--threads", "1", "--runs", "2", "--no-progress", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["batches"] == [2]
    r = cli("bench", tmp_path / "b2.onnx", "--providers", "cpu", "--batch", "1", "--runs", "1", "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--batch 1 cannot run it" in r.stderr


def test_top1_on_the_labels_needs_only_the_models_own_class_scores():
    """With outputs matched by name, a model whose scores output has another name (probs / scores) beside a shared
    one lost its top-1 on the labels, not only the agreement that needs the pairing."""
    from onnx_tucker.bench import accuracy_rows

    rng = np.random.default_rng(0)
    probs, feat = rng.random((20, 10)), rng.random((20, 4))
    labels = probs.argmax(1).copy()
    labels[:5] = (labels[:5] + 1) % 10  # 15 of 20 right
    rows = accuracy_rows([[probs, feat], [probs, feat]], labels, "cpu", names=[["probs", "feat"], ["scores", "feat"]])
    assert [r["top1"] for r in rows] == [0.75, 0.75]
    assert rows[1]["top1_agreement"] is None and rows[1]["unmatched_outputs"] == ["probs", "scores"]


def test_json_over_a_models_external_data_file_is_refused(tmp_path, capsys):
    """`bench A.onnx B.onnx --json B.onnx.data` wrote the JSON over B's weights: B no longer loaded."""
    from onnx_tucker.cli import main

    cnn = Path(__file__).resolve().parents[1] / "models" / "cifar10_cnn.onnx"
    onnx.save(onnx.load(str(cnn)), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data")
    before = (tmp_path / "ext.onnx.data").read_bytes()
    assert main(["bench", str(cnn), str(tmp_path / "ext.onnx"), "--runs", "2", "--json", str(tmp_path / "ext.onnx.data")]) == 2
    assert "external data" in capsys.readouterr().err and (tmp_path / "ext.onnx.data").read_bytes() == before

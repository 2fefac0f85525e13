"""Measured curves: cached on disk (--curves), reused at another target, resumed after an interruption."""
import json

import numpy as np
import pytest

from onnx_tucker import compress
from onnx_tucker.runtime import make_session

from conftest import residual_model


def feeds(n=64, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 10, 10)).astype(np.float32)}


def test_curves_file_is_reused_at_another_target_and_gives_the_same_allocation(tmp_path):
    path = tmp_path / "curves.json"
    model, cal = residual_model(), feeds()
    first, r1 = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert r1.sensitivity["cached_layers"] == 0 and path.is_file()
    again, r2 = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert r2.sensitivity["cached_layers"] == len(r1.sensitivity["curves"])
    assert r2.sensitivity["curves"] == r1.sensitivity["curves"]
    assert [r.ranks for r in r2.layers] == [r.ranks for r in r1.layers]
    assert [i.SerializeToString() for i in again.graph.initializer] == [i.SerializeToString() for i in first.graph.initializer]
    _, r3 = compress(model, target_macs=0.45, calibration=cal, curves=str(path))  # another target: no new probe
    assert r3.sensitivity["cached_layers"] == len(r1.sensitivity["curves"])


def test_an_interrupted_run_resumes_with_the_layers_it_has(tmp_path):
    path = tmp_path / "curves.json"
    model, cal = residual_model(), feeds()
    _, full = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    data = json.loads(path.read_text())
    dropped = sorted(data["layers"])[0]
    del data["layers"][dropped]  # as if the run had stopped before this layer
    path.write_text(json.dumps(data))
    _, resumed = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert resumed.sensitivity["cached_layers"] == len(full.sensitivity["curves"]) - 1
    assert resumed.sensitivity["curves"] == full.sensitivity["curves"]


def test_other_calibration_data_or_model_invalidates_the_file(tmp_path):
    path = tmp_path / "curves.json"
    compress(residual_model(), target_macs=0.6, calibration=feeds(), curves=str(path))
    _, other_data = compress(residual_model(), target_macs=0.6, calibration=feeds(seed=1), curves=str(path))
    assert other_data.sensitivity["cached_layers"] == 0
    _, other_model = compress(residual_model(seed=3), target_macs=0.6, calibration=feeds(seed=1), curves=str(path))
    assert other_model.sensitivity["cached_layers"] == 0
    assert any("held curves of another model, calibration set or setting: measured again and replaced" in n for n in other_model.notes)
    _, same = compress(residual_model(seed=3), target_macs=0.6, calibration=feeds(seed=1), curves=str(path))
    assert not any("--curves" in n for n in same.notes)


@pytest.mark.parametrize("content", [b'{"my": "notes"}', b"\x08\x08\x12\x07pytorch", b'{"schema": "onnx-tucker.latency-table/1"}'])
def test_a_file_that_is_not_a_curves_file_is_refused_and_kept(tmp_path, content):
    """--curves on a model, notes or another cache: the tool used to overwrite it without a word."""
    from onnx_tucker.errors import UsageError

    path = tmp_path / "precious.json"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="is not an onnx-tucker curves file and would be overwritten"):
        compress(residual_model(), target_macs=0.6, calibration=feeds(), curves=str(path))
    assert path.read_bytes() == content


def test_moments_solve_equals_least_squares_on_the_rows():
    """The per-option refit from the layer's moments is the least-squares fit on the explicit rows."""
    from onnx_tucker.sensitivity import _Moments

    rng = np.random.default_rng(0)
    patches, inner = rng.standard_normal((500, 12)), rng.standard_normal((4, 12))
    target = patches @ rng.standard_normal((12, 6)) + 0.3
    moments = _Moments(bias=True)
    for part in np.array_split(np.arange(500), 3):  # summed batch by batch
        moments.add(patches[part], target[part])
    solution, error = moments.solve(inner)
    design = np.hstack([patches @ inner.T, np.ones((500, 1))])
    expected = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(solution, expected, rtol=1e-5, atol=1e-6)
    residual = np.linalg.norm(design @ expected - target) / np.linalg.norm(target)
    assert abs(error - residual) < 1e-6


def test_auto_probes_measure_every_chosen_option_and_fewer_than_all():
    """probes="auto" measures a few options per layer, predicts the rest, and refines until each option the
    budget keeps was measured; its measured points are exactly those of probes="all"."""
    model, cal = residual_model(channels=32), feeds()
    _, auto = compress(model, target_macs=0.5, calibration=cal, probes="auto")
    _, full = compress(model, target_macs=0.5, calibration=cal, probes="all")
    assert auto.sensitivity["probes"] < full.sensitivity["probes"] == full.sensitivity["options"]
    for record in auto.decomposed:
        [point] = [p for p in auto.sensitivity["curves"][record.layer] if tuple(p[2]) == tuple(record.ranks)]
        assert point[3], f"{record.layer}: the kept option was never measured"
    exact = {(layer, tuple(p[2])): p[1] for layer, curve in full.sensitivity["curves"].items() for p in curve}
    for layer, curve in auto.sensitivity["curves"].items():
        for macs, distortion, ranks, measured in curve:
            if measured:
                assert distortion == pytest.approx(exact[(layer, tuple(ranks))], rel=1e-6, abs=1e-12)


def test_big_inputs_are_measured_on_fewer_held_out_images():
    """The distortion's held-out images: 128 CIFAR-sized images as before, fewer (at least EVAL_MIN) for big
    inputs, so that a probe costs about the same input values; never more than a quarter of the data."""
    from onnx_tucker.sensitivity import EVAL_MIN, EVAL_SAMPLES, eval_samples

    assert eval_samples({"x": np.zeros((2048, 32, 32, 3), np.float32)}) == EVAL_SAMPLES == 128
    assert eval_samples({"x": np.zeros((512, 3, 10, 10), np.float32)}) == 128
    assert eval_samples({"x": np.zeros((512, 64, 64, 3), np.float32)}) == 32
    assert eval_samples({"x": np.zeros((512, 224, 224, 3), np.float32)}) == EVAL_MIN == 8
    assert eval_samples({"x": np.zeros((40, 3, 10, 10), np.float32)}) == 10


def test_probes_on_cuda_ask_cudnn_for_a_heuristic_algorithm(monkeypatch):
    """Probes measure outputs, not speed: on CUDA their session (one, the whole probe model: see
    test_whole_model_probes_measure_what_the_suffix_probes_measure) skips cuDNN's exhaustive algorithm timing.
    Run here on the CPU EP with the provider choice and session factory observed; the curves must equal a
    plain CPU run's (suffix models) to float rounding."""
    from onnx_tucker import sensitivity
    from onnx_tucker.runtime import make_session

    asked = []

    def observed(model, provider="cpu", threads=None, provider_options=None, **kw):
        asked.append((provider, provider_options))
        return make_session(model, "cpu", threads, **kw)

    model, cal = residual_model(), feeds()
    _, plain = compress(model, target_macs=0.6, calibration=cal, probes="all")
    monkeypatch.setattr(sensitivity, "fastest_available", lambda: "cuda")
    monkeypatch.setattr(sensitivity, "make_session", observed)
    _, probed = compress(model, target_macs=0.6, calibration=cal, probes="all")
    assert len(asked) == 1 and asked[0][0] == "cuda"  # the whole probe model, for every layer
    assert all(o["cudnn_conv_algo_search"] == "HEURISTIC" for _, o in asked)
    assert probed.sensitivity["curves"].keys() == plain.sensitivity["curves"].keys()
    for name, curve in plain.sensitivity["curves"].items():
        other = probed.sensitivity["curves"][name]
        assert [e[2] for e in other] == [e[2] for e in curve]
        np.testing.assert_allclose([e[1] for e in other], [e[1] for e in curve], rtol=1e-4, atol=1e-9)


def test_probe_images_sets_the_held_out_images_of_every_probe_and_the_cache_key(tmp_path):
    from onnx_tucker.sensitivity import eval_samples

    cal = feeds(n=256)
    assert eval_samples(cal) == 64  # 128 asked, at most a quarter of the data
    assert eval_samples(cal, 40) == 40
    big = {"x": np.broadcast_to(np.float32(0), (4096, 3, 64, 64))}  # shape only, no memory
    assert (eval_samples(big), eval_samples(big, 512)) == (32, 128)  # the cap on input values scales with the count asked
    path = tmp_path / "curves.json"
    model = residual_model()
    _, few = compress(model, target_macs=0.6, calibration=cal, curves=str(path), probe_images=40)
    assert few.sensitivity["eval_samples"] == 40
    _, again = compress(model, target_macs=0.6, calibration=cal, curves=str(path), probe_images=40)
    assert again.sensitivity["cached_layers"] == len(few.sensitivity["curves"])
    _, other = compress(model, target_macs=0.6, calibration=cal, curves=str(path), probe_images=20)
    assert other.sensitivity["cached_layers"] == 0 and other.sensitivity["eval_samples"] == 20  # other probes: remeasured


def test_options_fitted_on_several_threads_give_the_one_thread_curves(monkeypatch):
    """The per-option fits run layers side by side (all_option_errors); the curves, the allocation and the
    weights are those of one thread, bit for bit (each layer's fits are independent, one BLAS thread each)."""
    from onnx_tucker import sensitivity

    model, cal = residual_model(channels=32), feeds()
    runs, original = {}, sensitivity.all_option_errors
    for workers in (1, 3):
        monkeypatch.setattr(sensitivity, "all_option_errors",
                            lambda jobs, workers_=workers, progress=False, _f=original: _f(jobs, workers=workers_, progress=progress))
        runs[workers] = compress(model, target_macs=0.5, calibration=cal)
    (one, r1), (three, r3) = runs[1], runs[3]
    assert r3.sensitivity["curves"] == r1.sensitivity["curves"]
    assert [r.ranks for r in r3.layers] == [r.ranks for r in r1.layers]
    assert [i.SerializeToString() for i in three.graph.initializer] == [i.SerializeToString() for i in one.graph.initializer]


def test_the_covariance_memo_is_per_thread():
    """Each thread keeps its own few per-layer results: layers fitted side by side do not evict each other's."""
    import threading

    from onnx_tucker.decompose import memo

    key, seen = object(), []
    memo((key,), lambda: seen.append("main") or "main")
    other = threading.Thread(target=lambda: seen.append(memo((key,), lambda: "thread")))
    other.start()
    other.join()
    assert memo((key,), lambda: "again") == "main" and seen == ["main", "thread"]


def test_a_failing_layer_fit_stops_the_layers_still_queued(monkeypatch):
    """An error (or Ctrl-C) in one layer's fits cancels the layers not started: it surfaces at once."""
    import threading
    import time

    from onnx_tucker import sensitivity

    calls, release = [], threading.Event()

    def fits(job):
        calls.append(job)
        if job == 0:
            raise RuntimeError("layer 0 failed")
        release.wait(10)  # the other workers hold their layer until the error has surfaced
        return {}

    monkeypatch.setattr(sensitivity, "option_errors", fits)
    monkeypatch.setattr(sensitivity, "_fit_work", lambda job: -job)  # biggest first: here layer 0, then 1, ...
    start = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match="layer 0 failed"):
            sensitivity.all_option_errors(list(range(40)), workers=2)
        waited = time.perf_counter() - start
    finally:
        release.set()
    assert waited < 5, "the error waited for the layers still running"
    # two workers: layer 0, then at most one layer each before the rest was cancelled
    assert len(calls) <= 3


def _torch_export(net, outputs: list, size: int = 16):
    """``net`` exported by torch.onnx (dynamic batch) as a ModelProto."""
    import io

    import onnx

    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 3, size, size), buffer, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=outputs, dynamic_axes={"x": {0: "N"}, **{o: {0: "N"} for o in outputs}})
    return onnx.load_from_string(buffer.getvalue())


def _two_heads_model():
    """Two heads, the class scores written last: the stem feeds both, ``seg`` only the map output."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.seg = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 1, 1)
            self.down, self.top, self.fc = nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 32, 3, 1, 1), nn.Linear(32, 10)

        def forward(self, x):
            f = torch.relu(self.stem(x))
            return self.fc(torch.relu(self.top(torch.relu(self.down(f)))).mean((2, 3))), self.seg(f)

    torch.manual_seed(0)
    return _torch_export(Heads(), ["cls", "seg"])


def test_every_output_counts_in_the_measured_distortion():
    """Two heads, the class scores written last: a conv that feeds only the map output moves only that output. Its
    measured distortion was 0 at every rank (only output 0 was read), the knapsack cut it to the bone and the map was
    ruined; and a suffix cut after the first output's node could not load. Now its distortion is that map's
    relative error (halved: the mean over the two outputs), and the map keeps what the budget pays for."""
    from onnx_tucker.pipeline import factorable_sites
    from onnx_tucker.sensitivity import distortion_curves

    model = _two_heads_model()
    data = {"x": np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)}
    _, sites = factorable_sites(model)
    sites = [s for s in sites if s.eligible]
    curves = distortion_curves(model, sites, data, None, probes="all", progress=False)["curves"]
    seg = next(name for name in curves if "seg" in name)
    assert all(d > 1e-4 for _, d, _, measured, _ in curves[seg] if measured)
    top = next(name for name in curves if "top" in name)  # the last conv of the class head: not in the map's suffix
    assert all(d > 0 for _, d, _, measured, _ in curves[top] if measured)
    new, report = compress(model, target_macs=0.5, calibration=data)
    from conftest import run_model

    fresh = {"x": np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    (cls_a, seg_a), (cls_b, seg_b) = run_model(model, fresh), run_model(new, fresh)
    assert np.linalg.norm(seg_a - seg_b) / np.linalg.norm(seg_a) < 0.5
    assert report.totals()["macs_after"] <= 0.5 * report.totals()["macs_before"] * 1.001


def test_a_size_read_off_the_input_crosses_the_probe_cut_whole():
    """``F.interpolate(y, size=x.shape[-2:])``: the size is an int64 tensor computed before the layers and read after
    them, so it crosses every probe's cut. It was fed as if it had a row per image, and onnxruntime refused the
    Concat; it is fed whole now, and the measured budget runs."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 1, 1), nn.Conv2d(32, 5, 1)

        def forward(self, x):
            h, w = x.shape[-2:]
            y = self.out(torch.relu(self.b(torch.relu(self.a(x)))))
            return nn.functional.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    model = _torch_export(Seg(), ["y"])
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)}
    new, report = compress(model, target_macs=0.6, calibration=data)
    assert report.sensitivity is not None and report.decomposed


def test_the_curves_file_is_written_through_no_fixed_temporary_and_keeps_another_runs_layers(tmp_path):
    """The cache was written to FILE.tmp, then renamed: a leftover link there made a run overwrite what it pointed to
    (the input model), and two runs sharing the file raced on that name (one died with FileNotFoundError) and dropped
    each other's layers. Each write is now a temporary of its own; layers another run added are kept."""
    from onnx_tucker.sensitivity import CurveCache

    model = residual_model()
    data = feeds(16)
    victim = tmp_path / "model.onnx"
    victim.write_bytes(b"precious")
    (tmp_path / "cv.json.tmp").symlink_to(victim)
    first, second = (CurveCache(tmp_path / "cv.json", model, data, 1, 0) for _ in range(2))
    first.put("a", [(1, 1)], [(10, 0.5, (1, 1), True, 0.1)])
    second.put("b", [(2, 2)], [(20, 0.25, (2, 2), True, 0.2)])
    assert victim.read_bytes() == b"precious"
    layers = json.loads((tmp_path / "cv.json").read_text())["layers"]
    assert set(layers) == {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.json", "cv.json.tmp", "model.onnx"]  # no temporaries left


def test_api_cache_paths_are_checked_before_any_work(tmp_path):
    """compress(curves=..., latency_table=...) with a folder: refused at once, as the CLI refuses it (it failed with a raw
    IsADirectoryError after the measurements, leaving a temporary beside the folder)."""
    from onnx_tucker.errors import UsageError

    folder = tmp_path / "cache"
    folder.mkdir()
    for key in ("curves", "latency_table"):
        with pytest.raises(UsageError, match="not a regular file"):
            compress(residual_model(), target_macs=0.6, calibration=feeds(16), **{key: str(folder)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def _graph(nodes, inits, batch, outputs=("logits",), opset=13):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [batch, 10]) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv(nodes, inits, rng, name, x, c_in, c_out):
    from onnx import helper, numpy_helper

    w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
    inits += [numpy_helper.from_array(w, name + "_W"), numpy_helper.from_array(np.zeros(c_out, np.float32), name + "_B")]
    nodes += [helper.make_node("Conv", [x, name + "_W", name + "_B"], [name + "_y"], name=name, pads=[1] * 4),
              helper.make_node("Relu", [name + "_y"], [name + "_r"])]
    return name + "_r"


def _head(nodes, inits, rng, x, c, out="logits"):
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array((rng.standard_normal((10, c)) / 4).astype(np.float32), out + "_W")]
    nodes += [helper.make_node("GlobalAveragePool", [x], [out + "_g"]), helper.make_node("Flatten", [out + "_g"], [out + "_f"]),
              helper.make_node("Gemm", [out + "_f", out + "_W"], [out], transB=1)]


def _mask_model(batch):
    """c1 -> mask = a > 0.3 (bool, a row per image) crossing c2's cut -> Where(mask, c2, 0) -> c3 -> head."""
    from onnx import helper, numpy_helper

    rng, nodes, inits = np.random.default_rng(0), [], []
    a = _conv(nodes, inits, rng, "c1", "x", 3, 16)
    inits += [numpy_helper.from_array(np.array(0.3, np.float32), "thr"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes.append(helper.make_node("Greater", [a, "thr"], ["mask"]))
    b = _conv(nodes, inits, rng, "c2", a, 16, 16)
    nodes.append(helper.make_node("Where", ["mask", b, "zero"], ["bm"]))
    _head(nodes, inits, rng, _conv(nodes, inits, rng, "c3", "bm", 16, 16), 16)
    return _graph(nodes, inits, batch)


def _scale_model(batch):
    """Resize scales computed from the input's shape before c2 (float: Shape -> Slice -> Cast -> Div -> Concat), used after."""
    from onnx import TensorProto, helper, numpy_helper

    rng, nodes, inits = np.random.default_rng(0), [], []
    inits += [numpy_helper.from_array(np.array([2], np.int64), "st"), numpy_helper.from_array(np.array([4], np.int64), "en"),
              numpy_helper.from_array(np.array([8.0], np.float32), "eight"), numpy_helper.from_array(np.ones(2, np.float32), "ones"),
              numpy_helper.from_array(np.array([], np.float32), "roi")]
    nodes += [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Slice", ["shp", "st", "en"], ["hw"]),
              helper.make_node("Cast", ["hw"], ["hwf"], to=TensorProto.FLOAT), helper.make_node("Div", ["hwf", "eight"], ["s2"]),
              helper.make_node("Concat", ["ones", "s2"], ["scales"], axis=0)]
    b = _conv(nodes, inits, rng, "c2", _conv(nodes, inits, rng, "c1", "x", 3, 16), 16, 16)
    nodes.append(helper.make_node("Resize", [b, "roi", "scales"], ["up"], mode="nearest"))
    _head(nodes, inits, rng, _conv(nodes, inits, rng, "c3", "up", 16, 16), 16)
    return _graph(nodes, inits, batch)


def test_what_crosses_a_cut_is_told_by_its_values_not_its_dtype():
    """A batch-1 export: a bool mask with a row per image crossed c2's cut and was fed from the first image alone (its
    curve 0.86 off the dynamic export's); float scales computed from shapes were split into rows and onnxruntime refused
    them. Tensors equal on two different batches are fed whole, the rest by rows: both exports measure the same."""
    from onnx_tucker.pipeline import factorable_sites
    from onnx_tucker.sensitivity import distortion_curves

    data = {"x": np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32)}
    for build in (_mask_model, _scale_model):
        curves = []
        for batch in ("N", 1):
            model = build(batch)
            _, sites = factorable_sites(model)
            curves.append(distortion_curves(model, [s for s in sites if s.eligible], data, None, probes="all", progress=False)["curves"])
        for name in curves[0]:
            dynamic, fixed = (np.array([e[1] for e in c[name]]) for c in curves)
            np.testing.assert_allclose(fixed, dynamic, rtol=0.05, atol=1e-7, err_msg=f"{build.__name__} {name}")


def test_a_layer_on_a_dead_branch_measures_nothing_and_the_budget_runs():
    """A conv whose result reaches no graph output: its suffix had no output to run ('At least one output should be
    requested'). It moves no output, so its options measure 0."""
    rng, nodes, inits = np.random.default_rng(0), [], []
    a = _conv(nodes, inits, rng, "c1", "x", 3, 16)
    _head(nodes, inits, rng, _conv(nodes, inits, rng, "c2", a, 16, 16), 16)
    _conv(nodes, inits, rng, "dead", a, 16, 16)  # computed, read by nothing
    model = _graph(nodes, inits, "N")
    new, report = compress(model, target_macs=0.6, calibration={"x": np.random.default_rng(2).standard_normal((64, 3, 16, 16)).astype(np.float32)})
    curves = report.sensitivity["curves"]
    assert all(d == 0 for _, d, _, measured in curves["dead"] if measured) and any(d > 0 for _, d, _, _ in curves["c2"])


@pytest.mark.parametrize("probes", ["all", "auto"])
def test_whole_model_probes_measure_what_the_suffix_probes_measure(monkeypatch, probes):
    """On a GPU every probe runs the whole model in one session (a CUDA session per layer's suffix cost 0.5 s, ~80 of
    them for a ResNet50). Forced here on the CPU: two heads, so a layer moves one output and not the other, and
    the curves agree with the suffix probes' to float rounding."""
    from onnx_tucker import sensitivity
    from onnx_tucker.pipeline import factorable_sites

    model = _two_heads_model()
    data = {"x": np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)}
    _, sites = factorable_sites(model)
    sites = [s for s in sites if s.eligible]
    curves = {}
    for whole in (False, True):
        monkeypatch.setattr(sensitivity, "WHOLE_PROBES", whole)
        sessions = []
        monkeypatch.setattr(sensitivity, "make_session", lambda *a, **k: sessions.append(1) or make_session(*a, **k))
        curves[whole] = sensitivity.distortion_curves(model, sites, data, None, probes=probes, progress=False)["curves"]
        assert len(sessions) == (1 if whole else 1 + len(sites))  # the probe's own, plus a suffix per layer
    assert curves[True].keys() == curves[False].keys()
    for name in curves[False]:
        suffix, whole = curves[False][name], curves[True][name]
        assert [e[2] for e in suffix] == [e[2] for e in whole] and [e[3] for e in suffix] == [e[3] for e in whole]
        np.testing.assert_allclose([e[1] for e in whole], [e[1] for e in suffix], rtol=1e-4, atol=1e-9, err_msg=name)
        assert any(e[1] > 0 for e in whole if e[3])  # real distortions, not zeros on both sides
    assert sum(e[1] > 1e-3 for c in curves[True].values() for e in c if e[3]) >= 4


def test_options_solved_on_threads_share_the_layers_costly_work(monkeypatch):
    """The threads solving a layer's options ahead of its probes each computed the layer's covariance root again
    (per-thread memo): 25 -> 70 roots on 8 threads for the seed-like CNN, and a copy of each in memory. They now
    start from the calling thread's memo: as many roots as on one thread, and the same curves."""
    from onnx_tucker import decompose, sensitivity
    from onnx_tucker.pipeline import factorable_sites
    import onnx_tucker.runtime as runtime

    model = residual_model()
    data = feeds()
    _, sites = factorable_sites(model)
    sites = [s for s in sites if s.eligible]
    original = decompose._symmetric_sqrt_of
    from onnx_tucker.calibrate import input_covariances

    monkeypatch.setattr(sensitivity, "worker_threads", lambda: 4)
    monkeypatch.setattr(runtime, "worker_threads", lambda: 4)
    results = {}
    for feed_bytes in (1, sensitivity.FEED_BYTES):  # 1 byte: one option at a time, on the calling thread
        covariances = input_covariances(model, data, [s.input_name for s in sites])  # new objects: no memo hits across runs
        calls = []
        monkeypatch.setattr(decompose, "_symmetric_sqrt_of", lambda *a: calls.append(1) or original(*a))
        monkeypatch.setattr(sensitivity, "FEED_BYTES", feed_bytes)
        curves = sensitivity.distortion_curves(model, sites, data, covariances, probes="all", progress=False)["curves"]
        results[feed_bytes > 1] = (len(calls), curves)
    assert results[False][0] > 0 and results[True][0] == results[False][0]
    assert results[True][1] == results[False][1]

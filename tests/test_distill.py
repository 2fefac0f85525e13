"""Label-free distillation: only the named initializers change, seeded, never worse on the holdout."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_model
from onnx_tucker.errors import ModelError, UsageError

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
FLOAT = TensorProto.FLOAT
STEPS = 40


def _weights(seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    return {
        "W1": w(8, 3, 3, 3), "B1": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "W2": w(12, 8, 3, 3), "B2": (0.1 * rng.standard_normal(12)).astype(np.float32),
        "Wfc": w(6, 12), "Bfc": (0.1 * rng.standard_normal(6)).astype(np.float32),
    }


def _net(conv2_nodes, inits, layout="NCHW"):
    """x -> [Transpose] -> conv1 -> relu -> conv2 (given nodes, writing 'c2') -> relu -> GAP -> Flatten -> Gemm -> Softmax."""
    nodes = []
    x_shape = ["N", 3, 8, 8] if layout == "NCHW" else ["N", 8, 8, 3]
    first = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        first = "x_nchw"
    nodes += [
        helper.make_node("Conv", [first, "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        *conv2_nodes,
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "Wfc", "Bfc"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", FLOAT, x_shape)], [helper.make_tensor_value_info("probs", FLOAT, ["N", 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def tiny_pair(layout="NCHW", rank=2, seed=0):
    """(original, compressed): conv2 (12x8x3x3) replaced by a rank-``rank`` Tucker-2 chain (truncated HOSVD)."""
    w = _weights(seed)
    original = _net([helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])], w, layout)
    W = w["W2"].astype(np.float64)
    u_out = np.linalg.svd(W.reshape(12, -1), full_matrices=False)[0][:, :rank]
    u_in = np.linalg.svd(W.transpose(1, 0, 2, 3).reshape(8, -1), full_matrices=False)[0][:, :rank]
    core = np.einsum("oihw,or,is->rshw", W, u_out, u_in)
    chain_w = {
        "conv2_tucker_in_W": u_in.T[:, :, None, None].astype(np.float32),
        "conv2_tucker_core_W": core.astype(np.float32),
        "conv2_tucker_out_W": u_out[:, :, None, None].astype(np.float32),
    }
    inits = {k: v for k, v in w.items() if k != "W2"}
    inits.update(chain_w)
    chain = [
        helper.make_node("Conv", ["r1", "conv2_tucker_in_W"], ["conv2_tucker_in_out"], name="conv2_tucker_in", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["conv2_tucker_in_out", "conv2_tucker_core_W"], ["conv2_tucker_core_out"], name="conv2_tucker_core", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["conv2_tucker_core_out", "conv2_tucker_out_W", "B2"], ["c2"], name="conv2_tucker_out", kernel_shape=[1, 1]),
    ]
    return original, _net(chain, inits, layout)


def feeds_for(model, n=256, seed=1):
    shape = [n if isinstance(d, str) or d == 0 else d for d in
             [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]]
    rng = np.random.default_rng(seed)
    # smooth-ish images: upsampled noise, so flips and shifts give related but different inputs
    coarse = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    x = coarse.repeat(2, 2).repeat(2, 3) + 0.1 * rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    if shape[-1] == 3:
        x = x.transpose(0, 2, 3, 1).copy()
    return {"x": x}


def strip_values(model):
    """The model with every initializer's values removed (names, types and shapes kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        dims, dtype, name = list(init.dims), init.data_type, init.name
        init.Clear()
        init.dims.extend(dims)
        init.data_type, init.name = dtype, name
    return out.SerializeToString()


def init_arrays(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _distill(original, compressed, feeds, **kwargs):
    from onnx_tucker.distill import distill, tucker_trainable

    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("batch_size", 32)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("threads", 1)
    kwargs.setdefault("reconstruct_steps", 0)  # the global loss alone; the local phase: tests/test_reconstruct.py
    return distill(original, compressed, feeds, kwargs.pop("trainable", tucker_trainable(compressed)), **kwargs)


# --- what changes and what does not -------------------------------------------------------------------


@needs_torch
def test_only_trainable_initializers_change_and_graph_is_the_same():
    original, compressed = tiny_pair()
    before_bytes = compressed.SerializeToString()
    model, stats = _distill(original, compressed, feeds_for(original))
    assert stats["kept"], stats
    assert stats["after"]["kl"] < stats["before"]["kl"]
    assert stats["after"]["agreement"] >= stats["before"]["agreement"]
    assert compressed.SerializeToString() == before_bytes  # the input model is not modified
    assert strip_values(model) == strip_values(compressed)
    onnx.checker.check_model(model)
    old, new = init_arrays(compressed), init_arrays(model)
    trainable = {"conv2_tucker_in_W", "conv2_tucker_core_W", "conv2_tucker_out_W", "B2"}
    for name in old:
        assert new[name].dtype == old[name].dtype and new[name].shape == old[name].shape
        if name in trainable:
            assert not np.array_equal(new[name], old[name]), name
        else:
            np.testing.assert_array_equal(new[name], old[name])


@needs_torch
def test_distilled_model_matches_the_original_better_on_fresh_inputs():
    original, compressed = tiny_pair()
    model, stats = _distill(original, compressed, feeds_for(original), steps=120)
    assert stats["kept"]
    assert fresh_kl(original, model) < 0.8 * fresh_kl(original, compressed)


def fresh_kl(original, model) -> float:
    """KL(original || model) of the class distributions on 512 fresh inputs (not trained on)."""
    fresh = feeds_for(original, n=512, seed=7)
    want, got = run_model(original, fresh)[0], run_model(model, fresh)[0]
    return float(np.mean(np.sum(want * (np.log(want + 1e-12) - np.log(got + 1e-12)), 1)))


@needs_torch
def test_subset_of_trainable_only_those_change():
    original, compressed = tiny_pair()
    model, stats = _distill(original, compressed, feeds_for(original), trainable=["conv2_tucker_core_W"], holdout=0.0)
    assert stats["trainable_tensors"] == 1 and stats["check_on"] == "train"
    old, new = init_arrays(compressed), init_arrays(model)
    changed = {n for n in old if not np.array_equal(old[n], new[n])}
    assert changed <= {"conv2_tucker_core_W"}


# --- reproducibility and the never-worse rule ------------------------------------------------------


@needs_torch
def test_same_seed_same_result_other_seed_other_result():
    original, compressed = tiny_pair()
    feeds = feeds_for(original)
    a, sa = _distill(original, compressed, feeds, seed=3)
    b, sb = _distill(original, compressed, feeds, seed=3)
    c, _ = _distill(original, compressed, feeds, seed=4)
    assert a.SerializeToString() == b.SerializeToString()
    assert sa["loss"] == sb["loss"] and sa["after"] == sb["after"]
    assert a.SerializeToString() != c.SerializeToString()


@needs_torch
def test_absurd_learning_rate_returns_the_compressed_model_unchanged():
    original, compressed = tiny_pair()
    before = compressed.SerializeToString()
    model, stats = _distill(original, compressed, feeds_for(original), lr=1e3)
    assert not stats["kept"]
    assert model is compressed
    assert model.SerializeToString() == before
    assert stats["after"] is None or stats["after"]["kl"] >= stats["before"]["kl"] or stats["after"]["agreement"] < stats["before"]["agreement"]


@needs_torch
def test_stats_report_the_run():
    original, compressed = tiny_pair()
    _, stats = _distill(original, compressed, feeds_for(original, n=200), holdout=0.1)
    for key in ("steps", "lr", "batch_size", "temperature", "augment", "seed", "device", "teacher", "trainable_tensors",
                "trainable_values", "train_samples", "holdout_samples", "check_on", "before", "after", "kept", "loss",
                "train_seconds", "seconds"):
        assert key in stats, key
    assert stats["holdout_samples"] == 20 and stats["train_samples"] == 180 and stats["check_on"] == "holdout"
    assert stats["steps"] == STEPS and stats["trainable_tensors"] == 4 and stats["teacher"] == "onnxruntime"
    assert set(stats["before"]) == {"agreement", "kl", "measure"} and stats["before"]["measure"] == "kl" and stats["outputs"] == ["classes"]
    assert [c[0] for c in stats["check_curve"]] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert abs(stats["after"]["kl"] - stats["check_curve"][-1][1]) < 1e-4  # torch during training == onnxruntime after
    assert len(stats["loss"]["curve"]) == 10 and stats["loss"]["last"] < stats["loss"]["first"]


# --- augmentation ---------------------------------------------------------------------------------------


def test_image_layout_detection():
    from onnx_tucker.distill import image_layout

    assert image_layout((5, 32, 32, 3)) == "NHWC"
    assert image_layout((5, 3, 32, 32)) == "NCHW"
    assert image_layout((5, 1, 28, 28)) == "NCHW"
    assert image_layout((5, 28, 28, 1)) == "NHWC"
    assert image_layout((5, 16, 32, 32)) is None
    assert image_layout((5, 10)) is None
    assert image_layout((5, 3, 4, 4)) is None  # too small to be an image worth shifting


@needs_torch
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_augment_on_and_off(layout):
    original, compressed = tiny_pair(layout)
    feeds = feeds_for(original)
    on, s_on = _distill(original, compressed, feeds)
    off, s_off = _distill(original, compressed, feeds, augment=False)
    assert s_on["augment"] == [("x", layout)]
    assert s_off["augment"] is False
    assert s_on["kept"] and s_off["kept"]
    assert on.SerializeToString() != off.SerializeToString()


@needs_torch
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_augmented_samples_are_flips_and_reflect_shifts(layout):
    import torch

    from onnx_tucker.distill import _augment

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    xin = x if layout == "NCHW" else x.transpose(0, 2, 3, 1).copy()
    out = _augment(torch, {"x": torch.from_numpy(xin)}, {"x": layout}, torch.Generator().manual_seed(0))["x"].numpy()
    assert out.shape == xin.shape
    if layout == "NHWC":
        out = out.transpose(0, 3, 1, 2)
    pad = 1  # 8 px / 8
    kinds = set()
    for i in range(len(x)):
        found = None
        for flip in (False, True):
            img = x[i][:, :, ::-1] if flip else x[i]
            padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    if np.array_equal(padded[:, dy : dy + 8, dx : dx + 8], out[i]):
                        found = (flip, dy, dx)
        assert found is not None, i
        kinds.add(found)
    assert len(kinds) > 3  # the draws vary


@needs_torch
def test_augment_same_draws_for_nchw_and_nhwc():
    import torch

    from onnx_tucker.distill import _augment

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    a = _augment(torch, {"x": x}, {"x": "NCHW"}, torch.Generator().manual_seed(5))["x"]
    b = _augment(torch, {"x": x.permute(0, 2, 3, 1).contiguous()}, {"x": "NHWC"}, torch.Generator().manual_seed(5))["x"]
    assert torch.equal(a, b.permute(0, 3, 1, 2))


@needs_torch
def test_keep_worse_returns_the_trained_weights_anyway():
    original, compressed = tiny_pair()
    model, stats = _distill(original, compressed, feeds_for(original), lr=1e3, keep_worse=True)
    assert not stats["kept"] and stats["after"]["kl"] > stats["before"]["kl"]
    assert model is not compressed  # the trained (worse) weights come back
    assert strip_values(model) == strip_values(compressed)
    assert init_arrays(model)["conv2_tucker_core_W"].tolist() != init_arrays(compressed)["conv2_tucker_core_W"].tolist()


# --- float16 models and overridable initializers -----------------------------------------------------------


def _float16(model):
    from onnx_tucker.precision import to_float16

    model = to_float16(model)  # float16 weights and activations, float32 inputs and outputs (a Cast at each end)
    # the converter appends its Casts after the nodes that read them: put them in graph order again
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    todo, order = list(model.graph.node), []
    while todo:
        node = next(n for n in todo if all(not t or t in known for t in n.input))
        todo.remove(node)
        order.append(node)
        known.update(node.output)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model


@needs_torch
def test_a_float16_model_distils_in_float32_masters_and_stays_float16():
    """Adam stepping float16 values directly wrote NaN on its first step (epsilon 1e-8 is 0 in float16): the
    global phase always diverged and the model came back unchanged. Both phases train float32 masters."""
    original, compressed = (_float16(m) for m in tiny_pair())
    assert {i.data_type for i in compressed.graph.initializer} == {TensorProto.FLOAT16}
    feeds = feeds_for(original)
    model, stats = _distill(original, compressed, feeds, reconstruct_steps=150)
    assert not stats["diverged"] and stats["steps"] == stats["steps_asked"] == STEPS, stats
    (row,) = stats["reconstruct"]["chains"]
    assert row["kept"] and row["after"] < 0.9 * row["before"], row  # the local phase's held-out error falls
    assert stats["kept"] and stats["returned"] in ("distilled", "reconstructed")
    best = stats["after"] if stats["returned"] == "distilled" else stats["reconstructed"]
    assert best["kl"] < stats["before"]["kl"]
    assert strip_values(model) == strip_values(compressed)  # every initializer keeps its float16 type
    arrays = init_arrays(model)
    assert all(a.dtype == np.float16 and np.all(np.isfinite(a)) for a in arrays.values())
    assert not np.array_equal(arrays["conv2_tucker_core_W"], init_arrays(compressed)["conv2_tucker_core_W"])
    assert np.all(np.isfinite(run_model(model, feeds_for(original, n=64, seed=5))[0]))


def _overridable(model):
    """``model`` with every initializer also a graph input (IR >= 4), as torch.onnx.export writes it with
    keep_initializers_as_inputs=True."""
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer)
    return model


@needs_torch
def test_initializers_that_are_also_graph_inputs_distil_with_the_reconstruction_on():
    """The reconstruction's prefix models kept every graph input while dropping initializers: the sessions it
    built wanted the weights of the rest of the model fed ("Required inputs ... are missing")."""
    original, compressed = (_overridable(m) for m in tiny_pair())
    model, stats = _distill(original, compressed, feeds_for(original), reconstruct_steps=60)
    assert stats["reconstruct"]["chains"] and stats["reconstruct"]["kept"] == 1, stats["reconstruct"]
    assert stats["kept"]
    assert strip_values(model) == strip_values(compressed)  # the inputs stay as they were
    fresh = feeds_for(original, n=64, seed=5)
    assert run_model(model, fresh)[0].shape == (64, 6)


# --- helpers ---------------------------------------------------------------------------------------------


def test_tucker_trainable_names():
    from onnx_tucker.distill import tucker_trainable

    _, compressed = tiny_pair()
    assert tucker_trainable(compressed) == ["B2", "conv2_tucker_in_W", "conv2_tucker_core_W", "conv2_tucker_out_W"]
    # a bias also read by another node is left alone
    shared = onnx.ModelProto()
    shared.CopyFrom(compressed)
    shared.graph.node.append(helper.make_node("Add", ["c2", "B2"], ["unused"], name="extra"))
    assert "B2" not in tucker_trainable(shared)


def test_logits_are_the_softmax_input():
    from onnx_tucker.distill import logit_names

    original, _ = tiny_pair()
    assert logit_names(original) == ["logits"]
    no_softmax = onnx.ModelProto()
    no_softmax.CopyFrom(original)
    del no_softmax.graph.node[-1]
    no_softmax.graph.output[0].name = "logits"
    assert logit_names(no_softmax) == ["logits"]


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_torch_is_a_one_line_usage_error(monkeypatch):
    from onnx_tucker.distill import distill

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    original, compressed = tiny_pair()
    with pytest.raises(UsageError) as info:
        distill(original, compressed, feeds_for(original), ["conv2_tucker_core_W"])
    assert str(info.value) == "--distill needs torch: pip install 'onnx-tucker[distill]'"
    assert info.value.exit_code == 2


@needs_torch
def test_cuda_without_a_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    original, compressed = tiny_pair()
    with pytest.raises(UsageError, match="cuda"):
        _distill(original, compressed, feeds_for(original), device="cuda")
    with pytest.raises(UsageError, match="'cpu' or 'cuda'"):
        _distill(original, compressed, feeds_for(original), device="tpu")


@needs_torch
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps"), ({"lr": 0.0}, "learning rate"), ({"batch_size": 0}, "batch size"),
        ({"holdout": 1.0}, "holdout"), ({"temperature": -1.0}, "temperature"), ({"trainable": []}, "at least one"),
        ({"trainable": ["nope"]}, "'nope' is not an initializer"), ({"reconstruct_steps": -1}, "reconstruction steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    original, compressed = tiny_pair()
    with pytest.raises(UsageError, match=match):
        _distill(original, compressed, feeds_for(original, n=16), **kwargs)


@needs_torch
def test_bad_feeds_and_mismatched_models():
    original, compressed = tiny_pair()
    with pytest.raises(UsageError, match="lack the model input 'x'"):
        _distill(original, compressed, {"y": np.zeros((4, 3, 8, 8), np.float32)})
    with pytest.raises(UsageError, match="at least 2"):
        _distill(original, compressed, feeds_for(original, n=1))
    other = onnx.ModelProto()
    other.CopyFrom(compressed)
    other.graph.output[0].name = "renamed"
    other.graph.node[-1].output[0] = "renamed"
    with pytest.raises(ModelError, match="same inputs and outputs"):
        _distill(original, other, feeds_for(original, n=16))


@needs_torch
def test_threads_option_restores_torch_threads():
    import torch

    original, compressed = tiny_pair()
    threads = torch.get_num_threads()
    _distill(original, compressed, feeds_for(original, n=32), steps=2, threads=1)
    assert torch.get_num_threads() == threads


def test_the_reconstruction_passes_on_a_lower_kl_and_the_global_phase_needs_agreement_too():
    """The measured case (stop 17): one image fewer in agreement, a clearly lower KL, 0.76 test points better."""
    from onnx_tucker.distill import _better, _reconstruction_passes

    before, reconstructed = {"agreement": 0.971, "kl": 0.0363}, {"agreement": 0.966, "kl": 0.0281}
    assert _reconstruction_passes(reconstructed, before) and not _better(reconstructed, before)
    assert not _reconstruction_passes({"agreement": 0.99, "kl": 0.0364}, before)  # a higher KL fails whatever the agreement
    assert not _reconstruction_passes(None, before) and not _better(None, before)


# --- outputs that are not class scores ----------------------------------------------------------------


def _dense_map(model):
    """``model`` cut after relu2: a (N, 12, 8, 8) map in NCHW, as a segmentation head gives (no class axis last)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in out.graph.node if n.name not in ("gap", "flatten", "fc", "softmax")]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("r2", FLOAT, ["N", 12, 8, 8]))
    used = {i for n in keep for i in n.input}
    kept_inits = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    return out


def test_a_map_output_is_matched_by_its_values_not_a_softmax_over_its_width():
    """A KL over the last axis of an NCHW map ignores an offset per (channel, row): it would call a shifted map
    perfect. Map outputs are compared by their relative squared error instead, and have no top-1 agreement."""
    from onnx_tucker.distill import agreement_and_kl, output_kinds

    rng = np.random.default_rng(0)
    t = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    shifted = t + rng.standard_normal((4, 3, 5, 1)).astype(np.float32)  # a different offset per row
    assert output_kinds([t]) == ["values"] and output_kinds([t[:, :, 0, 0]]) == ["classes"]
    assert output_kinds([t[:, :1, 0, 0]]) == ["values"]  # one score per sample: a regression, not classes
    assert output_kinds([t], [True]) == ["classes"]  # a Softmax's input: classes on the last axis whatever the rank
    assert agreement_and_kl([t], [shifted], ["classes"])["kl"] < 1e-9  # what the old measure saw
    m = agreement_and_kl([t], [shifted])
    assert m["kl"] > 0.3 and m["agreement"] is None and m["measure"] == "relative error"
    mixed = agreement_and_kl([t[:, :, 0, 0], t], [t[:, :, 0, 0], shifted])
    assert mixed["agreement"] == 1.0 and mixed["measure"] == "kl + relative error"


@needs_torch
def test_a_segmentation_like_model_is_distilled_towards_the_original_map():
    from onnx_tucker.report import distill_summary
    from onnx_tucker.runtime import make_session

    original, compressed = (_dense_map(m) for m in tiny_pair())
    feeds = feeds_for(original)
    model, stats = _distill(original, compressed, feeds)
    assert stats["outputs"] == ["values"] and stats["before"]["agreement"] is None and stats["kept"]
    assert stats["after"]["kl"] < stats["before"]["kl"]
    fresh = feeds_for(original, n=128, seed=7)

    def error(m):
        t = make_session(original).run(None, fresh)[0]
        s = make_session(m).run(None, fresh)[0]
        return float(((s - t) ** 2).sum() / (t**2).sum())

    assert error(model) < error(compressed)
    line = distill_summary(stats)
    assert "relative squared error" in line and "agreement" not in line


@needs_torch
def test_an_op_the_executor_cannot_run_is_refused_before_any_work(monkeypatch):
    """--distill on a model with an op torch_exec lacks used to fail after the whole compression (minutes on a big
    model): now before it, one line naming the op and the node."""
    from onnx_tucker import compress, pipeline

    original, _ = tiny_pair()
    for node in original.graph.node:
        if node.name == "relu2":
            node.op_type = "Celu"  # onnxruntime runs it; the torch executor does not
    called = []
    monkeypatch.setattr(pipeline, "_compress", lambda *a, **k: called.append(1))
    with pytest.raises(ModelError, match=r"^--distill: the torch executor cannot run op 'Celu' \(node 'relu2'\); compress without --distill$"):
        compress(original, ratio=0.5, calibration=feeds_for(original), distill={})
    assert not called


@needs_torch
def test_a_node_the_executor_refuses_for_its_attributes_is_refused_before_any_work(monkeypatch):
    """A supported op with an attribute the executor refuses (BatchNormalization with training_mode=1) passed the
    op-name check and failed after the whole compression (73 s on a small torch export), without naming the node:
    the executor now runs the model on one calibration sample first, and says which node."""
    from onnx_tucker import compress, pipeline

    original, _ = tiny_pair()
    relu2 = next(n for n in original.graph.node if n.name == "relu2")
    for node in original.graph.node:  # relu2's readers read the BatchNormalization's output instead
        node.input[:] = ["bn_out" if i == relu2.output[0] else i for i in node.input]
    original.graph.output[0].name = "bn_out" if original.graph.output[0].name == relu2.output[0] else original.graph.output[0].name
    for name, value in (("bn_s", 1.0), ("bn_b", 0.0), ("bn_m", 0.0), ("bn_v", 1.0)):
        original.graph.initializer.append(numpy_helper.from_array(np.full(12, value, np.float32), name))
    position = list(original.graph.node).index(relu2) + 1
    original.graph.node.insert(position, helper.make_node("BatchNormalization", [relu2.output[0], "bn_s", "bn_b", "bn_m", "bn_v"],
                                                          ["bn_out", "bn_mean_out", "bn_var_out"], name="bn_train", training_mode=1))
    called = []
    monkeypatch.setattr(pipeline, "_compress", lambda *a, **k: called.append(1))
    with pytest.raises(ModelError, match=r"^--distill: the torch executor cannot run this model: BatchNormalization with "
                                         r"training_mode=1 is not supported \(node 'bn_train'\); compress without --distill$"):
        compress(original, ratio=0.5, calibration=feeds_for(original), distill={})
    assert not called
    monkeypatch.undo()
    compress(original, ratio=0.5, calibration=feeds_for(original))  # without --distill the model is no error


@needs_torch
def test_a_float16_models_logits_are_found_behind_its_output_cast():
    """The float16 converter puts a Cast after the final Softmax: the Softmax was not seen, and a float16 model was
    distilled on probabilities (KL near 1e-9, nothing to learn from). The logits are found through the Cast and
    exposed in their own type."""
    from onnx_tucker.distill import _with_outputs, logit_names

    original, _ = tiny_pair()
    half = _float16(original)
    softmax = next(n for n in half.graph.node if n.op_type == "Softmax")
    assert logit_names(half) == [softmax.input[0]] == logit_names(original)
    exposed = _with_outputs(half, logit_names(half))
    (logits,) = run_model(exposed, feeds_for(original, n=8))
    assert logits.dtype == np.float16 and logits.shape == (8, 6) and not np.allclose(logits.astype(np.float32).sum(1), 1.0)


def test_distill_options_are_checked_before_the_compression_and_take_numpy_numbers():
    """A bad seed, threads, holdout, temperature or feature weight raised ValueError/TypeError/RuntimeError after the fit
    and refit had run; numpy integers and floats were refused as 'must be a positive integer, got 2'."""
    from onnx_tucker.distill import _check_args
    from onnx_tucker.options import CompressOptions

    for bad in ({"seed": -1}, {"threads": -1}, {"holdout": None}, {"temperature": "2"}, {"feature_weight": "x"}):
        with pytest.raises(UsageError):
            CompressOptions.from_kwargs(calibration={"x": np.zeros((2, 1))}, distill=bad)
    checked = _check_args(np.int64(2), np.float32(1e-3), np.int64(16), 0.1, 4.0, 0, None, np.int64(3), None, 0.0)
    assert checked[0] == 2 and type(checked[0]) is int and type(checked[1]) is float and checked[7] == 3


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_distill_leaves_the_callers_torch_random_stream_alone():
    """distill reseeded torch's global generator (torch.manual_seed(0)): the caller's stream restarted."""
    import torch

    from onnx_tucker.distill import distill, tucker_trainable

    original, compressed = tiny_pair()
    torch.manual_seed(123)
    torch.rand(3)
    expected = torch.rand(5)
    torch.manual_seed(123)
    torch.rand(3)
    distill(original, compressed, feeds_for(original, 40), tucker_trainable(compressed), steps=2, reconstruct_steps=2, progress=False)
    assert torch.equal(torch.rand(5), expected)

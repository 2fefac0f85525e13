"""Real architectures: Keras applications (random weights, converted with the tool's converter) and
CNNs exported from PyTorch. For each: ratio 1.0 --force reproduces the outputs, ratio 0.5 gives a
valid model with fewer MACs that runs in onnxruntime, depthwise/grouped convs are left alone with
their reason. Small inputs (64x64, 10 classes) keep the whole file within a few minutes on 2 cores.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import onnx
import pytest

import onnx_tucker
from conftest import relative_error, run_model, torch_basic_block

SIZE = 64
CLASSES = 10
KERAS_APPS = ["ResNet50", "MobileNetV2", "VGG16", "DenseNet121", "EfficientNetB0"]
HAS_DEPTHWISE = {"MobileNetV2", "EfficientNetB0"}


def _feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict:
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    rng = np.random.default_rng(seed)
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _conv_groups(model: onnx.ModelProto) -> dict[str, int]:
    groups = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            groups[node.name] = next((a.i for a in node.attribute if a.name == "group"), 1)
    return groups


def check_full_rank_exact(model: onnx.ModelProto) -> None:
    feeds = _feeds(model)
    new, report = onnx_tucker.compress(model, ratio=1.0, force=True)
    onnx.checker.check_model(new)
    before, after = run_model(model, feeds), run_model(new, feeds)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert relative_error(a, b) <= 1e-4
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in new.graph.input if i.name in feeds] == list(feeds)
    assert report.decomposed, "nothing was decomposed"


def check_half_ratio(model: onnx.ModelProto, record_property, label: str):
    """Ratio 0.5 with every form (Tucker-2 for kxk convs, SVD for 1x1 convs; HOSVD only, no HOOI iterations:
    validity, not fit quality, is tested here)."""
    new, report = onnx_tucker.compress(model, ratio=0.5, n_iter_max=0, forms=("tucker2", "svd"))
    onnx.checker.check_model(new)
    outputs = run_model(new, _feeds(model))
    assert all(np.all(np.isfinite(o)) for o in outputs)
    totals = report.totals()
    assert totals["macs_after"] < totals["macs_before"]
    n_conv_before = sum(n.op_type == "Conv" for n in model.graph.node)
    n_conv_after = sum(n.op_type == "Conv" for n in new.graph.node)
    assert n_conv_after == n_conv_before + sum(len(c.nodes) - 1 for c in report.chains if c.channel_axis == 1)  # conv chains
    assert len(report.chains) == totals["decomposed"]
    summary = (
        f"{label}: {totals['decomposed']}/{totals['convs']} convs decomposed, MACs {totals['macs_before']:,} -> "
        f"{totals['macs_after']:,} ({totals['macs_reduction']:.2f}x), params {totals['params_before']:,} -> "
        f"{totals['params_after']:,}"
    )
    print(summary)
    record_property("totals", summary)
    # every grouped/depthwise conv is left alone with its reason
    groups = _conv_groups(model)
    for layer in report.layers:
        if groups.get(layer.layer, 1) > 1:
            assert not layer.decomposed
            assert "depthwise" in layer.reason or "grouped" in layer.reason, layer.reason
    return report


# --- Keras applications ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def keras_onnx(name: str) -> bytes:
    """Build keras.applications.<name>(weights=None), convert it once per session."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from onnx_tucker.convert import keras_to_onnx

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3), classes=CLASSES)
    return keras_to_onnx(model).SerializeToString()


@pytest.fixture(scope="module", params=KERAS_APPS)
def keras_app(request):
    return request.param, onnx.ModelProto.FromString(keras_onnx(request.param))


@pytest.mark.slow
def test_keras_application_full_rank_reproduces_outputs(keras_app):
    name, model = keras_app
    check_full_rank_exact(model)


@pytest.mark.slow
def test_keras_application_half_ratio_valid_with_fewer_macs(keras_app, record_property):
    name, model = keras_app
    report = check_half_ratio(model, record_property, f"keras {name} {SIZE}x{SIZE}")
    if name in HAS_DEPTHWISE:
        assert any("depthwise" in r.reason for r in report.layers)


# --- PyTorch-exported networks -------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _export(net, size=32, dynamic=True, **kwargs) -> onnx.ModelProto:
    torch = _torch()
    net.eval()
    buf = io.BytesIO()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(
        net, (x,), buf, dynamo=False, opset_version=17, input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None, **kwargs,
    )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return model


def _nets():
    torch = _torch()
    nn = torch.nn

    BasicBlock = torch_basic_block(torch)

    class SmallResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layers = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2))
            self.head = nn.Linear(128, CLASSES)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class ResNeXtBlock(nn.Module):
        """1x1 reduce -> grouped 3x3 (cardinality 8) -> 1x1 expand, plus a residual add."""

        def __init__(self, c, width, groups):
            super().__init__()
            self.reduce = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.grouped = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, groups=groups, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.expand = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.expand(self.grouped(self.reduce(x))))

    class ResNeXtLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU())
            self.blocks = nn.Sequential(ResNeXtBlock(64, 64, 8), ResNeXtBlock(64, 64, 8))
            self.head = nn.Conv2d(64, CLASSES, 3, 1, 1)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))

    class DepthwiseSeparable(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU6()]
            c = 32
            for c_out, stride in [(64, 1), (128, 2), (128, 1)]:
                layers += [
                    nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                    nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6(),
                ]
                c = c_out
            layers += [nn.Conv2d(c, 128, 3, 1, 1), nn.ReLU()]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(128, CLASSES)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

    return {"small_resnet": SmallResNet, "resnext_like": ResNeXtLike, "depthwise_separable": DepthwiseSeparable}


def _torch_model(name: str, **export_kwargs) -> onnx.ModelProto:
    torch = _torch()
    torch.manual_seed(0)
    net = _nets()[name]()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them into the convs matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return _export(net, **export_kwargs)


TORCH_NETS = ["small_resnet", "resnext_like", "depthwise_separable"]


@pytest.mark.parametrize("name", TORCH_NETS)
def test_torch_export_full_rank_reproduces_outputs(name):
    check_full_rank_exact(_torch_model(name))


@pytest.mark.parametrize("name", TORCH_NETS)
def test_torch_export_half_ratio_valid_with_fewer_macs(name, record_property):
    model = _torch_model(name)
    report = check_half_ratio(model, record_property, f"torch {name} 32x32")
    reasons = " ".join(r.reason for r in report.layers)
    if name == "resnext_like":
        assert "grouped conv (group=8)" in reasons
    if name == "depthwise_separable":
        assert "depthwise conv" in reasons


def test_torch_small_resnet_keeps_residual_adds_and_dynamic_batch():
    model = _torch_model("small_resnet")
    new, report = onnx_tucker.compress(model, ratio=0.5, n_iter_max=0)
    assert sum(n.op_type == "Add" for n in new.graph.node) == sum(n.op_type == "Add" for n in model.graph.node) == 3
    assert "BatchNormalization" not in {n.op_type for n in new.graph.node}  # folded by the exporter
    dim = new.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    for batch in (1, 5):
        assert run_model(new, _feeds(model, batch=batch))[0].shape == (batch, CLASSES)


def test_torch_export_with_initializers_as_inputs():
    """keep_initializers_as_inputs=True lists every weight as a graph input (the pre-IR-4 style)."""
    model = _torch_model("small_resnet", keep_initializers_as_inputs=True)
    assert len(model.graph.input) > 1
    check_full_rank_exact(model)


def test_torch_export_without_constant_folding_keeps_batchnorm_and_is_exact():
    model = _torch_model("small_resnet", do_constant_folding=False, training=_torch().onnx.TrainingMode.PRESERVE)
    check_full_rank_exact(model)


def test_cli_output_is_byte_identical_across_processes(tmp_path):
    """Determinism: the same input and options give the same bytes from two separate CLI processes."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "resnext.onnx"
    onnx.save(_torch_model("resnext_like"), str(src))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    digests = []
    for name in ("a.onnx", "b.onnx"):
        r = subprocess.run([sys.executable, "-m", "onnx_tucker", str(src), str(tmp_path / name), "--ratio", "0.5", "--no-check"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]

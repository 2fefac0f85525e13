"""Fixtures that build small, seeded ONNX models with onnx.helper: nothing is downloaded."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def conv_model(
    c_in: int = 8,
    c_out: int = 16,
    kernel=(3, 3),
    spatial=(12, 12),
    attrs: dict | None = None,
    bias: bool = True,
    opset: int = 17,
    ir_version: int | None = None,
    batch="N",
    seed: int = 0,
    dtype=np.float32,
    weight_as_input: bool = False,
    weight_via_constant: bool = False,
) -> onnx.ModelProto:
    """x -> Conv -> Relu -> y, with every Conv attribute settable."""
    rng = np.random.default_rng(seed)
    attrs = dict(attrs or {})
    group = attrs.get("group", 1)
    w = (rng.standard_normal((c_out, c_in // group, *kernel)) / np.sqrt(c_in * np.prod(kernel))).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, [batch, c_in, *spatial])
    y = helper.make_tensor_value_info("y", elem, None)
    inits, nodes, inputs = [], [], [x]
    conv_inputs = ["x", "W"]
    if weight_via_constant:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W_value")))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
        if weight_as_input:
            inputs.append(helper.make_tensor_value_info("W", elem, list(w.shape)))
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(dtype), "B"))
        if weight_as_input:
            inputs.append(helper.make_tensor_value_info("B", elem, [c_out]))
        conv_inputs.append("B")
    nodes.append(helper.make_node("Conv", conv_inputs, ["c"], name="conv", **attrs))
    nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "conv_test", inputs, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    # IR 10 (onnx 1.16) unless asked: newer onnx writes IR versions older onnxruntime builds refuse.
    model.ir_version = ir_version if ir_version is not None else 10
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def residual_model(channels: int = 16, spatial=(10, 10), seed: int = 0) -> onnx.ModelProto:
    """conv -> relu -> conv -> add(skip) -> conv(stride 2) -> grouped conv -> 1x1 conv -> GAP -> Flatten."""
    rng = np.random.default_rng(seed)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    c = channels
    inits = [
        w("W1", (c, 3, 3, 3)), w("B1", (c,)), w("W2", (c, c, 3, 3)), w("B2", (c,)),
        w("W3", (2 * c, c, 3, 3)), w("Wg", (2 * c, 2 * c // 8, 3, 3)), w("W1x1", (10, 2 * c, 1, 1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_r"], name="stem_relu"),
        helper.make_node("Conv", ["a_r", "W2", "B2"], ["b"], name="block_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a_r", "b"], ["s"], name="skip_add"),
        helper.make_node("Conv", ["s", "W3"], ["d"], name="down", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["d", "Wg"], ["g"], name="grouped", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["g", "W1x1"], ["p"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", FLOAT, ["N", 3, *spatial])],
        [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def run_model(model, feeds):
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


@pytest.fixture
def residual():
    return residual_model()


@pytest.fixture
def saved_residual(tmp_path):
    path = tmp_path / "residual.onnx"
    onnx.save(residual_model(), str(path))
    return path


@pytest.fixture(autouse=True)
def _latency_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The per-layer latency cache (``latency_table.default_path``) goes to a temporary folder, never ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def torch_basic_block(torch):
    """A ResNet basic block (conv-BN-ReLU, conv-BN, add, ReLU; a 1x1 conv-BN shortcut when the shape
    changes) as a torch module class: the BatchNorm-folded residual unit users export."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    return BasicBlock


def torch_fixed_batch_net(path, size: int = 16, seed: int = 0):
    """A torch export fixed to batch 1 whose flatten is a Reshape to the constant [1, -1 resolved]: the batch is
    baked into the graph, so only batches of 1 are right (what torch.onnx writes by default for ``x.view(x.size(0), -1)``)."""
    import torch

    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            x = nn.functional.adaptive_avg_pool2d(x, 4)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(seed)
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, size, size), str(path), dynamo=False, input_names=["input"],
                      output_names=["y"])
    return path

"""Sites: the layers of a graph a factorization could replace, each a typed record, or the reason it is not one.

``find_sites`` reads the graph (onnx-graphsurgeon) and never edits it. ``conv_geometry`` is the one parser
of Conv attributes (kernel, strides, dilations, group, pads with ``auto_pad`` resolved) that the rewrite,
the calibration refits and the sensitivity probes all use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnx_tucker.graph import unique_name
from onnx_tucker.ranks import ConvShape

SUPPORTED_DTYPES = (np.float32, np.float16, np.float64)


class GeometryError(ValueError):
    """Conv attributes that do not describe a valid convolution."""


@dataclass(frozen=True)
class Geometry:
    """A Conv's resolved geometry. ``pads`` is (begin..., end...) as in ONNX; None when ``auto_pad`` is
    SAME_* and the input size is unknown (the padding depends on it)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    group: int = 1
    auto_pad: str = "NOTSET"

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel)

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)

    def output_spatial(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        if self.pads is None:
            raise GeometryError("padding unknown")
        nd = self.spatial_rank
        return tuple(
            (in_spatial[i] + self.pads[i] + self.pads[i + nd] - (self.kernel[i] - 1) * self.dilations[i] - 1) // self.strides[i] + 1
            for i in range(nd)
        )

    def as_2d(self) -> tuple | None:
        """(kernel, strides, pads [t, l, b, r], dilations) of a 2-D ungrouped conv with known padding, else None."""
        if self.spatial_rank != 2 or self.group != 1 or self.pads is None:
            return None
        return list(self.kernel), list(self.strides), list(self.pads), list(self.dilations)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def conv_geometry(attrs: dict, weight_shape: tuple[int, ...], in_spatial: tuple | None = None) -> Geometry:
    """The geometry of a Conv from its attributes (ONNX defaults filled in); raises :class:`GeometryError`."""
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    if "kernel_shape" in attrs and list(attrs["kernel_shape"]) != list(kernel):
        raise GeometryError(f"kernel_shape {list(attrs['kernel_shape'])} does not match weight {list(weight_shape)}")
    strides = tuple(int(s) for s in attrs.get("strides", [1] * nd))
    dilations = tuple(int(d) for d in attrs.get("dilations", [1] * nd))
    for name, values in (("strides", strides), ("dilations", dilations)):
        if len(values) != nd or any(v < 1 for v in values):
            raise GeometryError(f"invalid {name} {list(values)}")
    auto_pad = _text(attrs.get("auto_pad", "NOTSET")) or "NOTSET"
    if auto_pad == "NOTSET":
        pads = tuple(int(p) for p in attrs.get("pads", [0] * (2 * nd)))
        if len(pads) != 2 * nd or any(p < 0 for p in pads):
            raise GeometryError(f"invalid pads {list(pads)}")
    elif auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(auto_pad, kernel, strides, dilations, in_spatial)
    else:
        raise GeometryError(f"invalid auto_pad {auto_pad!r}")
    return Geometry(kernel, strides, dilations, pads, int(attrs.get("group", 1)), auto_pad)


def _same_pads(auto_pad, kernel, strides, dilations, in_spatial) -> tuple | None:
    """SAME_*: output size ceil(in / stride); the odd pixel at the end (UPPER) or the start (LOWER)."""
    nd = len(kernel)
    if in_spatial is None or len(in_spatial) != nd or any(not isinstance(d, int) or d <= 0 for d in in_spatial):
        return None
    begin, end = [0] * nd, [0] * nd
    for axis in range(nd):
        out = math.ceil(in_spatial[axis] / strides[axis])
        total = max((out - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - in_spatial[axis], 0)
        small, big = total // 2, total - total // 2
        begin[axis], end[axis] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    return tuple(begin + end)


@dataclass
class Site:
    """One candidate layer: eligible (empty ``reason``) with its weight and geometry, or the reason it is not.

    ``weight`` is loaded once per source (``weight_key``) and released by the rewrite; ``shape`` is the
    cost model's view (channels, kernel, spatial sizes at batch 1).
    """

    node: gs.Node
    name: str
    op: str
    weight: np.ndarray | None = None
    weight_key: str = ""
    geometry: Geometry | None = None
    shape: ConvShape | None = None
    input_name: str = ""
    output_name: str = ""
    input_shape: tuple | None = None
    output_shape: tuple | None = None
    reason: str = ""  # empty when eligible
    form: str = ""  # the factorization chosen for it
    extra: dict = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return not self.reason

    @property
    def kind(self) -> str:
        """What kind of layer it is, in words the table and ``--layers`` use."""
        if self.geometry is None:
            return "dense" if self.op in ("Gemm", "MatMul") else self.op.lower()
        if self.geometry.group != 1:
            c_in_per_group = self.shape.c_in // self.geometry.group if self.shape else 0
            return "depthwise" if c_in_per_group == 1 and self.shape and self.geometry.group == self.shape.c_out else "grouped"
        return "conv1x1" if self.geometry.is_pointwise else "conv"

    def bias_values(self) -> np.ndarray | None:
        """The constant bias (None when there is none); raises ValueError when it is computed at run time."""
        if self.op == "MatMul":
            return None
        inputs = self.node.inputs
        if len(inputs) < 3 or inputs[2] is None or not inputs[2].name:
            return None
        value, why = resolve_constant(inputs[2])
        if value is None:
            raise ValueError(f"bias of {self.name} is not a constant ({why})")
        value = np.asarray(value).reshape(-1)
        return np.broadcast_to(value, (self.shape.c_out,)).copy() if self.shape is not None else value


def constant_values(tensor: gs.Constant) -> np.ndarray:
    """A Constant's values, read from its TensorProto without caching them on the graph.

    ``tensor.values`` keeps the numpy copy it loads inside the graph, so every Conv weight,
    decomposed or not, stayed in memory twice and was exported from that copy (issue 5:
    peak memory); here only the weights the caller keeps stay loaded.
    """
    lazy = tensor._values
    return lazy.load() if isinstance(lazy, LazyValues) else np.asarray(tensor.values)


def chain_bias(node: gs.Node, taken: set[str]) -> gs.Tensor | None:
    """The bias input a chain's last node takes over from ``node`` (None without one). A constant produced by a
    node (``Constant``, through ``Identity``) becomes an initializer of its own, as the refit and the affine folding
    change a chain's bias in place; a bias computed at run time stays the tensor it was."""
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
    if bias is None or isinstance(bias, gs.Constant):
        return bias
    value, _ = resolve_constant(bias)
    if value is None:
        return bias
    return gs.Constant(unique_name(f"{node.name or 'node'}_bias", taken), np.array(value))


def resolve_constant(tensor: gs.Tensor, depth: int = 0) -> tuple[np.ndarray | None, str]:
    """The constant value behind a tensor, following Identity/Transpose/Constant; else (None, why)."""
    if isinstance(tensor, gs.Constant):
        return constant_values(tensor), ""
    if depth > 8 or not tensor.inputs:
        return None, "weight is computed at run time (not a constant)"
    producer = tensor.inputs[0]
    if producer.op == "Constant" and "value" in producer.attrs:
        value = producer.attrs["value"]
        return np.asarray(constant_values(value) if isinstance(value, gs.Constant) else value), ""
    if producer.op == "Identity":
        return resolve_constant(producer.inputs[0], depth + 1)
    if producer.op == "Transpose":
        value, why = resolve_constant(producer.inputs[0], depth + 1)
        if value is None:
            return None, why
        return np.transpose(value, producer.attrs.get("perm")), ""
    if producer.op == "DequantizeLinear":
        return None, "weight is dequantized at run time (quantized model): left alone"
    return None, f"weight is computed at run time (by a {producer.op} node)"


def node_label(node: gs.Node) -> str:
    return node.name or f"{node.op}_{node.outputs[0].name}"


def find_sites(graph: gs.Graph, shapes: dict[str, tuple] | None = None, choose=None, ops=("Conv",)) -> list[Site]:
    """Every Conv of the top-level graph as a :class:`Site`, with the structural reason where it is unusable.

    Whether a form can factor it (group, kernel size) is the form's call: ``choose(site)`` (e.g.
    ``factorization.choose_form``) runs on each usable site as it is found, and a weight no form takes is
    dropped at once, so only the weights that will be factored are ever held together (issue 5: peak memory).
    ``site.extra["defect"]`` tells a structural reason (the model's) from a form's decision.
    ``shapes`` maps tensor names to inferred shapes (batch 1), used for the cost model and SAME_* padding.
    ``ops``: the ONNX ops to list ("Conv"; "Gemm" and "MatMul" when dense layers are asked for).
    Layers inside If/Loop bodies are not visited: they are left as they are.
    """
    shapes = shapes or {}
    found = []
    loaded: dict[str, np.ndarray] = {}  # weight key -> values: a weight shared by several convs is held once
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx") or node.op not in ops:
            continue
        if node.op != "Conv":
            site = _dense_site(node, shapes, loaded, choose, _batch_of(graph, shapes))
            if site is not None:
                found.append(site)
            continue
        site = Site(node=node, name=node_label(node), op="Conv")
        found.append(site)
        if len(node.inputs) < 2:
            site.reason = "malformed Conv (no weight input)"
            continue
        site.input_name, site.output_name = node.inputs[0].name, node.outputs[0].name
        site.input_shape, site.output_shape = shapes.get(site.input_name), shapes.get(site.output_name)
        weight, why = resolve_constant(node.inputs[1])
        if weight is None:
            site.reason = why
            continue
        if weight.dtype.type not in SUPPORTED_DTYPES:
            site.reason = f"weight dtype {weight.dtype} is not a float type this tool decomposes"
            continue
        if weight.ndim < 3:
            site.reason = f"weight has rank {weight.ndim}; a Conv weight needs at least 3 dimensions"
            continue
        c_out, c_in_per_group, *kernel = weight.shape
        nd = len(kernel)
        in_sp = _spatial_from(site.input_shape, nd)
        try:
            site.geometry = conv_geometry(node.attrs, weight.shape, in_sp)
        except GeometryError as exc:
            site.reason = str(exc)
            continue
        group = site.geometry.group
        site.shape = ConvShape(
            c_out=c_out, c_in=c_in_per_group * group, kernel=tuple(kernel), group=group,
            in_spatial=in_sp, out_spatial=_spatial_from(site.output_shape, nd),
        )
        if not np.all(np.isfinite(weight)):
            site.reason = "weight contains NaN or Inf"
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias, _ = resolve_constant(node.inputs[2])
            if bias is not None and bias.shape != (c_out,):
                site.reason = f"bias shape {list(bias.shape)} does not match {c_out} output channels"
                continue
        site.extra["defect"] = False
        site.weight_key = node.inputs[1].name  # a weight shared by several convs is decomposed once
        site.weight = loaded.get(site.weight_key, weight)
        if choose is not None:
            choose(site)
        if site.weight is not None:
            loaded.setdefault(site.weight_key, site.weight)
    for site in found:  # a site refused before the forms saw it: the model's own defect
        site.extra.setdefault("defect", True)
    return found


def _batch_of(graph: gs.Graph, shapes: dict) -> int:
    """The batch the shapes were inferred at: the first input's first dim there (``--input-shape`` may have set
    it), else the batch the model is fixed to, else 1."""
    if not graph.inputs:
        return 1
    shape = shapes.get(graph.inputs[0].name) or graph.inputs[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else 1


def _dense_site(node: gs.Node, shapes: dict, loaded: dict, choose, batch: int = 1) -> Site | None:
    """A Gemm, or a MatMul whose right operand is a constant 2-D weight, as a site (None: not a dense layer).

    ``weight`` is kept in its stored layout (``extra["layout"]``: "KN" for B as (in, out), "NK" for
    transB=1); the cost model sees it as channels (c_in=K, c_out=N) over the rows each sample has: every
    axis of its input but the last, divided by the model's ``batch`` (torch's attention runs its input
    projection on a sequence-first (L, N, E) tensor and its output one on (L*N, E), so the batch is not
    always the first axis)."""
    if len(node.inputs) < 2:
        return None
    weight, why = resolve_constant(node.inputs[1])
    if node.op == "MatMul" and weight is None:
        return None  # activations times activations (attention): not a layer with weights
    site = Site(node=node, name=node_label(node), op=node.op)
    site.input_name, site.output_name = node.inputs[0].name, node.outputs[0].name
    site.input_shape, site.output_shape = shapes.get(site.input_name), shapes.get(site.output_name)
    if weight is None:
        site.reason = why
        return site
    if weight.dtype.type not in SUPPORTED_DTYPES:
        site.reason = f"weight dtype {weight.dtype} is not a float type this tool decomposes"
        return site
    if weight.ndim != 2:
        site.reason = f"weight has rank {weight.ndim}: only a 2-D weight is a dense layer"
        return site
    if not np.all(np.isfinite(weight)):
        site.reason = "weight contains NaN or Inf"
        return site
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0)) == 1
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)) != 0:
        site.reason = "Gemm with transA=1: its input features are not the last axis: left alone"
        return site
    k, n = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
    rows = None
    if site.input_shape is not None and len(site.input_shape) >= 2:
        outer = tuple(site.input_shape[:-1])
        if all(isinstance(d, int) and d > 0 for d in outer):
            total = math.prod(outer)
            rows = (total // batch if total % batch == 0 else total,)
    site.shape = ConvShape(c_out=int(n), c_in=int(k), kernel=(), in_spatial=rows, out_spatial=rows)
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        bias, _ = resolve_constant(node.inputs[2])
        if bias is None or bias.size not in (1, n):
            site.reason = "Gemm bias C is not a constant per-output vector: left alone"
            return site
    site.extra.update(defect=False, layout="NK" if trans_b else "KN", channel_axis=-1)
    site.weight_key = node.inputs[1].name
    site.weight = loaded.get(site.weight_key, weight)
    if choose is not None:
        choose(site)
    if site.weight is not None:
        loaded.setdefault(site.weight_key, site.weight)
    return site


def _spatial_from(shape, nd: int):
    if shape is None or len(shape) != nd + 2:
        return None
    dims = tuple(shape[2:])
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None

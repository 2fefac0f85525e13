"""Graph surgery with onnx-graphsurgeon: find eligible Convs (or why not), replace one Conv by three.

No linear algebra here: weights are read and new weights are placed, nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, check_duplicate_node_names
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnx_tucker.ranks import ConvShape

SUPPORTED_DTYPES = (np.float32, np.float16, np.float64)


@dataclass
class Candidate:
    """One Conv node of the graph: eligible with its weight, or not with a reason."""

    node: gs.Node
    name: str
    weight: np.ndarray | None = None
    weight_key: str = ""
    shape: ConvShape | None = None
    reason: str = ""  # empty when eligible
    extra: dict = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return not self.reason


def constant_values(tensor: gs.Constant) -> np.ndarray:
    """A Constant's values, read from its TensorProto without caching them on the graph.

    ``tensor.values`` keeps the numpy copy it loads inside the graph, so every Conv weight,
    decomposed or not, stayed in memory twice and was exported from that copy (issue 5:
    peak memory); here only the weights the caller keeps stay loaded.
    """
    lazy = tensor._values
    return lazy.load() if isinstance(lazy, LazyValues) else np.asarray(tensor.values)


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
    return node.name or f"Conv_{node.outputs[0].name}"


def find_candidates(graph: gs.Graph, shapes: dict[str, tuple] | None = None) -> list[Candidate]:
    """Every Conv of the top-level graph, each eligible or with the reason it is left alone.

    ``shapes`` maps tensor names to inferred shapes (from ``onnx.shape_inference``),
    used for the cost model. Convs inside If/Loop bodies are not visited: they are left as they are.
    """
    shapes = shapes or {}
    found = []
    loaded: dict[str, np.ndarray] = {}  # weight key -> values: a weight shared by several convs is held once
    for node in graph.nodes:
        if node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        cand = Candidate(node=node, name=node_label(node))
        found.append(cand)
        if len(node.inputs) < 2:
            cand.reason = "malformed Conv (no weight input)"
            continue
        weight, why = resolve_constant(node.inputs[1])
        if weight is None:
            cand.reason = why
            continue
        if weight.dtype.type not in SUPPORTED_DTYPES:
            cand.reason = f"weight dtype {weight.dtype} is not a float type this tool decomposes"
            continue
        if weight.ndim < 3:
            cand.reason = f"weight has rank {weight.ndim}; a Conv weight needs at least 3 dimensions"
            continue
        group = int(node.attrs.get("group", 1))
        c_out, c_in_per_group, *kernel = weight.shape
        if "kernel_shape" in node.attrs and list(node.attrs["kernel_shape"]) != list(kernel):
            cand.reason = f"kernel_shape {list(node.attrs['kernel_shape'])} does not match weight {list(weight.shape)}"
            continue
        nd = len(kernel)
        in_shape = shapes.get(node.inputs[0].name)
        out_shape = shapes.get(node.outputs[0].name)
        in_sp = _spatial_from(in_shape, nd)
        out_sp = _spatial_from(out_shape, nd)
        cand.shape = ConvShape(
            c_out=c_out, c_in=c_in_per_group * group, kernel=tuple(kernel), group=group,
            in_spatial=in_sp, out_spatial=out_sp,
        )
        if group != 1:
            kind = "depthwise" if c_in_per_group == 1 and group == c_out else "grouped"
            cand.reason = f"{kind} conv (group={group}): left alone"
            continue
        if all(k == 1 for k in kernel):
            cand.reason = "1x1 conv: already a channel mixer, nothing to factor spatially"
            continue
        if not np.all(np.isfinite(weight)):
            cand.reason = "weight contains NaN or Inf"
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias, why = resolve_constant(node.inputs[2])
            if bias is not None and bias.shape != (c_out,):
                cand.reason = f"bias shape {list(bias.shape)} does not match {c_out} output channels"
                continue
        for attr in ("strides", "dilations"):
            values = node.attrs.get(attr)
            if values is not None and (len(values) != nd or any(v < 1 for v in values)):
                cand.reason = f"invalid {attr} {list(values)}"
                break
        pads = node.attrs.get("pads")
        if not cand.reason and pads is not None and (len(pads) != 2 * nd or any(p < 0 for p in pads)):
            cand.reason = f"invalid pads {list(pads)}"
        if cand.reason:
            continue
        cand.weight_key = _weight_key(node.inputs[1])
        cand.weight = loaded.setdefault(cand.weight_key, weight)
    return found


def _spatial_from(shape, nd: int):
    if shape is None or len(shape) != nd + 2:
        return None
    dims = tuple(shape[2:])
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None


def _weight_key(tensor: gs.Tensor) -> str:
    """Identity of the weight's source, so a weight shared by several convs is decomposed once."""
    return tensor.name


def unique_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def taken_names(graph: gs.Graph) -> set[str]:
    names = {n.name for n in graph.nodes if n.name}
    names.update(graph.tensors().keys())
    return names


def replace_conv(
    graph: gs.Graph,
    cand: Candidate,
    first: gs.Constant,
    core: gs.Constant,
    last: gs.Constant,
    taken: set[str],
) -> list[gs.Node]:
    """Replace ``cand.node`` by 1x1 (first) -> core (original strides/pads/dilations) -> 1x1 (last, bias).

    The last conv writes the original output tensor, so graph outputs and
    consumers keep their names. Call ``graph.cleanup().toposort()`` afterwards.
    ``cand.weight`` is released (set to None): the graph no longer uses it, and holding every
    decomposed weight until the export added ~0.3x the model file to the peak (issue 5).
    """
    node = cand.node
    nd = len(cand.shape.kernel)
    base = cand.name
    dtype = first.values.dtype
    ones = [1] * nd
    x = node.inputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
    mid1 = gs.Variable(unique_name(f"{base}_tucker_in_out", taken), dtype=dtype)
    mid2 = gs.Variable(unique_name(f"{base}_tucker_core_out", taken), dtype=dtype)
    core_attrs = {"kernel_shape": list(cand.shape.kernel)}
    for attr in ("auto_pad", "pads", "strides", "dilations"):
        if attr in node.attrs:
            core_attrs[attr] = node.attrs[attr]
    n1 = gs.Node("Conv", unique_name(f"{base}_tucker_in", taken), attrs={"kernel_shape": ones}, inputs=[x, first], outputs=[mid1])
    n2 = gs.Node("Conv", unique_name(f"{base}_tucker_core", taken), attrs=core_attrs, inputs=[mid1, core], outputs=[mid2])
    last_inputs = [mid2, last] + ([bias] if bias is not None else [])
    n3 = gs.Node("Conv", unique_name(f"{base}_tucker_out", taken), attrs={"kernel_shape": ones}, inputs=last_inputs, outputs=list(node.outputs))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend([n1, n2, n3])
    cand.weight = None
    return [n1, n2, n3]


def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """gs graph -> ModelProto keeping the template's ir_version, opsets, metadata and producer.

    The same model as ``gs.export_onnx(graph, do_type_check=False)`` with the template's fields
    (tests compare the bytes), but built in place: gs builds a GraphProto and then copies all of it
    into the model (two copies of every weight at once), and exports every initializer before
    adding any (issue 5: peak memory).
    """
    graph.cleanup().toposort()
    model = onnx.ModelProto()
    model.ir_version = template.ir_version
    _export_graph(graph, model.graph)
    model.opset_import.extend(template.opset_import)
    copy_template_fields(model, template)
    return model


def copy_template_fields(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """The original's model-level fields on an exported model, and its initializer-inputs."""
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.functions[:]
    model.functions.extend(template.functions)
    # gs drops initializers from the graph inputs; IR < 4 requires every initializer to be
    # listed there, and later IRs keep the original's overridable initializer-inputs.
    listed = {i.name for i in model.graph.input}
    originally_listed = {i.name for i in template.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed and (model.ir_version < 4 or init.name in originally_listed):
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def _export_graph(graph: gs.Graph, out: onnx.GraphProto) -> None:
    """``OnnxExporter.export_graph`` (onnx-graphsurgeon 0.5/0.6) writing straight into ``out``, one weight at a time."""
    check_duplicate_node_names(graph.nodes, level=G_LOGGER.WARNING)
    out.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    out.name = graph.name
    out.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    out.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensor_map = graph.tensors()
    constants = [t for t in tensor_map.values() if isinstance(t, gs.Constant)]
    for tensor in constants:
        if not isinstance(tensor._values, SparseValues):
            out.initializer.append(OnnxExporter.export_tensor_proto(tensor))
    for tensor in constants:
        if isinstance(tensor._values, SparseValues):
            out.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(tensor))
    for tensor in graph.inputs + graph.outputs:
        tensor_map.pop(tensor.name, None)
    out.value_info.extend(
        OnnxExporter.export_value_info_proto(t, False)
        for t in tensor_map.values()
        if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    )
    if graph.doc_string:
        out.doc_string = graph.doc_string

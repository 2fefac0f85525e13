"""Every direct edit of an ONNX protobuf: shape-inference skeleton, exposed tensors, probe and suffix
models, initializer ownership, metadata and the export of an onnx-graphsurgeon graph.

No linear algebra here; the forms' surgery goes through onnx-graphsurgeon and ends in :func:`export`.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, check_duplicate_node_names
from onnx_graphsurgeon.ir.tensor import SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnx_tucker.errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialise a message over 2 GiB
PROBE = "onnx_tucker_probe"


# --- names ----------------------------------------------------------------------------------------

def unique_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when every top-level node has a name, else a copy where each unnamed one is called
    ``<op>_<first output>`` (what the tables call it): node names are optional in ONNX, and the probes, cuts and
    chain records find nodes by name."""
    if all(node.name for node in model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {n.name for n in named.graph.node if n.name}
    for node in named.graph.node:
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{node.output[0] if node.output else 'node'}", taken)
    return named


def taken_names(graph: gs.Graph) -> set[str]:
    names = {n.name for n in graph.nodes if n.name}
    names.update(graph.tensors().keys())
    return names


# --- shapes and types -----------------------------------------------------------------------------

def shape_skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """``model`` without float initializers over ``keep_bytes``, each listed as a graph input of its type and shape."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    listed = {i.name for i in model.graph.input}
    integer = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    for init in model.graph.initializer:
        if init.data_type in integer or init.ByteSize() <= keep_bytes:
            graph.initializer.append(init)
        elif init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def set_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> None:
    """Give graph inputs fixed dims in place (``--input-shape``), for shape inference on a skeleton."""
    for vi in model.graph.input:
        if shapes and vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[vi.name]:
                dims.add().dim_value = int(d)


def _inferred(model: onnx.ModelProto, data_prop: bool = False, input_shapes: dict | None = None) -> onnx.ModelProto | None:
    skeleton = shape_skeleton(model)
    set_input_shapes(skeleton, input_shapes)
    if skeleton.ByteSize() > PROTOBUF_LIMIT:
        return None  # shape inference serialises the model
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=data_prop)
    except Exception:
        return None


def infer_shapes(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict[str, tuple]:
    """Tensor name -> shape (ints where known, batch taken as 1) from ONNX shape inference.

    Inference runs on a skeleton without the large weights (they become typed graph inputs):
    it would otherwise serialise and copy every weight twice (issue 5: peak memory), and
    models over 2 GB get shapes too. {} when inference fails: the cost model falls back to parameters.
    ``input_shapes`` ({input: dims}) fixes dynamic input dims for the inference only (the model is not changed).
    """
    inferred = _inferred(model, data_prop=True, input_shapes=input_shapes)
    if inferred is None:
        return {}
    shapes = _shapes_of(inferred)
    produced = [t for node in model.graph.node for t in node.output if t]
    if any(None in dims[1:] for dims in shapes.values()) or any(t not in shapes for t in produced):
        # Sizes computed at run time from constants (torch's ZeroPad2d writes its pads as a Concat/Slice/Cast chain,
        # its flatten(2) a Reshape to a Concat of Shape slices) stop inference, with unknown dims or no shape at
        # all: fold those subgraphs (onnx-graphsurgeon, on onnxruntime) and infer again.
        folded = _folded(model, input_shapes)
        if folded is not None:
            for name, dims in _shapes_of(folded).items():
                if name not in shapes or dims.count(None) < shapes[name].count(None):
                    shapes[name] = dims
    return shapes


def _folded(model: onnx.ModelProto, input_shapes: dict | None) -> onnx.ModelProto | None:
    """The inferred skeleton after constant folding, or None when folding or inference fails."""
    import onnx_graphsurgeon as gs

    skeleton = shape_skeleton(model)
    # a free batch taken as 1 (the cost model counts at batch 1): Keras's Flatten at opset <= 13 reshapes to a
    # Concat of the input's Shape, batch included, which folds only when the batch is known
    inits = {i.name for i in model.graph.initializer}
    at_batch_1 = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and not dims[0].dim_value and all(d.dim_value > 0 for d in dims[1:]):
            at_batch_1[vi.name] = [1] + [d.dim_value for d in dims[1:]]
    set_input_shapes(skeleton, {**at_batch_1, **(input_shapes or {})})
    if skeleton.ByteSize() > PROTOBUF_LIMIT:
        return None
    try:
        # shapes first: onnx-graphsurgeon folds Shape -> Gather/Slice only where the dims it reads are known
        # (a dynamic-batch channel split or shuffle reads C, H, W off a tensor inside the graph)
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True))
        graph.fold_constants(error_ok=True).cleanup()
        return onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=False, data_prop=True)
    except Exception:
        return None


def _shapes_of(inferred: onnx.ModelProto) -> dict[str, tuple]:
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(1 if i == 0 else None)  # batch 1 for the cost model
        shapes[vi.name] = tuple(dims)
    return shapes


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type from shape inference ({} when it fails)."""
    inferred = _inferred(model)
    if inferred is None:
        return {}
    graph = inferred.graph
    # the inputs too: a segment that starts at a float16 graph input must declare it float16, not the default float
    return {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info) + list(graph.output)
            if v.type.tensor_type.elem_type}


# --- exposing tensors, probe and suffix models ---------------------------------------------------

def from_bytes(model) -> onnx.ModelProto:
    """``model`` itself, or parsed from its serialized bytes (how a model crosses to a Ray task)."""
    if isinstance(model, (bytes, bytearray)):
        proto = onnx.ModelProto()
        proto.ParseFromString(model)
        return proto
    return model


def with_outputs(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors (typed from ``types``, else by inference)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    expose(exposed, names, types)
    return exposed


def prefix_model(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that computes only the named tensors (its outputs): the nodes they depend on.

    onnxruntime runs every node of a graph whatever outputs are fetched, so a layer's input captured
    through :func:`with_outputs` costs the whole model; this costs the model up to that layer. A graph
    with subgraphs (If, Loop, Scan: their outer-scope reads are not node inputs) gets :func:`with_outputs`.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return with_outputs(model, names, types)
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed, stack = set(), list(names)
    while stack:
        index = producers.get(stack.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        stack.extend(t for t in graph.node[index].input if t)
    used = {t for i in needed for t in graph.node[i].input}
    prefix = onnx.ModelProto()
    prefix.CopyFrom(model)
    del prefix.graph.node[:]
    prefix.graph.node.extend(graph.node[i] for i in sorted(needed))
    keep = [init for init in graph.initializer if init.name in used]
    del prefix.graph.initializer[:]
    prefix.graph.initializer.extend(keep)
    # An initializer also listed as a graph input (overridable, IR >= 4) goes with its input entry: left alone,
    # the entry would be an input the prefix needs fed. The real inputs all stay (the callers feed them all).
    dropped = {init.name for init in graph.initializer} - {init.name for init in keep}
    if dropped & {i.name for i in graph.input}:
        inputs = [i for i in graph.input if i.name not in dropped]
        del prefix.graph.input[:]
        prefix.graph.input.extend(inputs)
    del prefix.graph.output[:]
    known = {o.name: o for o in graph.output}
    types = _types_for(model, [n for n in names if n not in known], types)
    for name in dict.fromkeys(names):
        if name in known:
            prefix.graph.output.append(known[name])
        else:
            prefix.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None))
    return prefix


def _types_for(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None) -> dict[str, int]:
    """``types``, completed by shape inference when it lacks one of ``names`` (a float16 model's tensors
    are not float; inference runs on the weightless skeleton, so it is cheap)."""
    types = dict(types or {})
    if any(name not in types for name in names):
        types = {**tensor_types(model), **types}
    return types


def expose(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> None:
    """Add ``names`` to ``model``'s outputs in place, typed from ``types`` or else by shape inference."""
    existing = {o.name for o in model.graph.output}
    types = _types_for(model, [n for n in names if n not in existing], types)
    for name in names:
        if name not in existing:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            existing.add(name)


def probe_model(model: onnx.ModelProto, sites: list) -> tuple[onnx.ModelProto, dict]:
    """``model`` with each site's weight and bias fed as graph inputs, and its input/output exposed.

    Returns the probe and ``{site name: (weight input, bias input or None, site input, site output)}``.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {}
    by_name = {n.name: n for n in probe.graph.node}
    graph_outputs = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in model.graph.input}
    taken = {t for n in probe.graph.node for t in list(n.input) + list(n.output)}
    taken |= {i.name for i in probe.graph.initializer} | graph_inputs | graph_outputs
    for i, site in enumerate(sites):
        node = by_name[site.node.name]
        w_name = unique_name(f"{PROBE}_W{i}", taken)
        b_name = unique_name(f"{PROBE}_B{i}", taken) if node.op_type != "MatMul" else None  # a MatMul has no bias
        node.input[1] = w_name
        dtype = onnx.helper.np_dtype_to_tensor_dtype(site.weight.dtype)
        probe.graph.input.append(onnx.helper.make_tensor_value_info(w_name, dtype, list(site.weight.shape)))
        if b_name is not None:
            if len(node.input) > 2:
                node.input[2] = b_name
            else:
                node.input.append(b_name)
            probe.graph.input.append(onnx.helper.make_tensor_value_info(b_name, dtype, [site.shape.c_out]))
        for tensor in (node.input[0], node.output[0]):
            if tensor not in graph_outputs and tensor not in graph_inputs:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, dtype, None))
                graph_outputs.add(tensor)
        names[site.name] = (w_name, b_name, node.input[0], node.output[0])
    return probe, names


def cut(probe: onnx.ModelProto, node_name: str) -> list[str] | None:
    """Tensors the model needs from node ``node_name`` on (in its topological order) that come from
    before it: activations, graph inputs and probe weights. None when a later node holds a subgraph
    (its outer-scope references are invisible here), and the whole model must run instead."""
    nodes = list(probe.graph.node)
    return cut_at(probe, next(i for i, n in enumerate(nodes) if n.name == node_name))


def cut_at(probe: onnx.ModelProto, index: int) -> list[str] | None:
    """:func:`cut` before the node at ``index``."""
    tail = list(probe.graph.node)[index:]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in tail for a in n.attribute):
        return None
    produced = {o for n in tail for o in n.output}
    initializers = {i.name for i in probe.graph.initializer}
    return [t for t in dict.fromkeys(t for n in tail for t in n.input) if t and t not in produced and t not in initializers]


def suffix_model(probe: onnx.ModelProto, node_name: str, output, cut_values: dict) -> onnx.ModelProto:
    """The part of ``probe`` from node ``node_name`` on, taking ``cut_values``' tensors as inputs, with the graph
    output ``output`` (a name, or a list of names) as its outputs."""
    outputs = [output] if isinstance(output, str) else list(output)
    nodes = list(probe.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node_name)
    tail = nodes[index:]
    needed = set(t for n in tail for t in n.input)
    inputs = [
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), None)
        for name, value in cut_values.items()
    ]
    graph = onnx.helper.make_graph(
        tail, f"{probe.graph.name}_suffix", inputs,
        [o for name in outputs for o in probe.graph.output if o.name == name],
        [i for i in probe.graph.initializer if i.name in needed],
    )
    suffix = onnx.helper.make_model(graph, opset_imports=probe.opset_import, ir_version=probe.ir_version)
    suffix.functions.extend(probe.functions)
    return suffix


def segment_model(model: onnx.ModelProto, start: int, stop: int, outputs: list[str], types: dict[str, int]) -> onnx.ModelProto | None:
    """The nodes ``start:stop`` of ``model`` as a model: its inputs are :func:`cut_at` ``start``, its outputs
    the named tensors (made in the segment). None when the graph holds subgraphs (outer-scope reads
    are not node inputs). How the refit runs a model forward once, a segment per layer."""
    inputs = cut_at(model, start)
    if inputs is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                             for n in model.graph.node for a in n.attribute):
        return None
    nodes = list(model.graph.node)[start:stop]
    needed = {t for n in nodes for t in n.input}
    # A constant node before the segment (Clip's bounds in a torch export, an Identity of a shared weight) is copied
    # in with the constant nodes it reads, not fed: its value is not one row per image, and feeding it would stop
    # the one-pass forward (constant_outputs).
    constants = constant_outputs(model)
    position = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    wanted, stack = set(), [t for t in inputs if t in needed and t in constants]
    while stack:
        at = position[stack.pop()]
        if at in wanted or start <= at < stop:
            continue
        wanted.add(at)
        stack.extend(i for i in model.graph.node[at].input if i in constants)
    copied = [model.graph.node[i] for i in sorted(wanted)]  # graph order
    nodes = copied + nodes
    needed |= {t for n in copied for t in n.input}
    used = [t for t in inputs if t in needed and t not in constants]
    graph = onnx.helper.make_graph(
        nodes, f"{model.graph.name}_segment",
        [onnx.helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT, None) for t in used],
        [onnx.helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT, None) for t in outputs],
        [i for i in model.graph.initializer if i.name in needed],
    )
    segment = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    segment.functions.extend(model.functions)
    return segment


NOT_CONSTANT_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def constant_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that makes it, for tensors that do not depend on the graph inputs: ``Constant`` nodes
    and nodes fed only by initializers and such tensors (torch's ``Identity`` of a shared weight, a ``Cast`` of a
    constant), in graph order. Their values are not one row per image: segments copy these nodes in."""
    known = {i.name for i in model.graph.initializer} | {""}
    made = {}
    for node in model.graph.node:
        if node.op_type in NOT_CONSTANT_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                   for a in node.attribute):
            continue
        if all(i in known or i in made for i in node.input):
            for o in node.output:
                if o:
                    made[o] = node
    return made


# --- consumers and initializers -------------------------------------------------------------------

def consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def feeds_only_relu(model: onnx.ModelProto, name: str) -> bool:
    """True when every consumer of tensor ``name`` is a Relu (and it is not a graph output)."""
    if any(o.name == name for o in model.graph.output):
        return False
    users = consumers(model, name)
    return bool(users) and all(n.op_type == "Relu" for n in users)


def add_initializer(model: onnx.ModelProto, value: np.ndarray, name: str) -> onnx.TensorProto:
    """A new initializer, also listed among the graph inputs where IR < 4 requires every initializer to be."""
    init = model.graph.initializer.add()
    init.CopyFrom(numpy_helper.from_array(value, name))
    list_if_old_ir(model, init)
    return init


def list_if_old_ir(model: onnx.ModelProto, init: onnx.TensorProto) -> None:
    """IR < 4 lists every initializer among the graph inputs (the checker refuses one that is not): a new one too."""
    if model.ir_version < 4:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


class Initializers:
    """Name -> initializer of one model, with ownership: a node about to change a shared initializer gets a copy."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.by_name = {i.name: i for i in model.graph.initializer}

    def __getitem__(self, name: str) -> onnx.TensorProto:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.by_name[name])

    def set(self, name: str, value: np.ndarray) -> None:
        self.by_name[name].CopyFrom(numpy_helper.from_array(value, name))

    def owned(self, node: onnx.NodeProto, index: int, fresh_name: str) -> onnx.TensorProto:
        """The initializer at ``node.input[index]``, copied first if other nodes share it."""
        init = self.by_name[node.input[index]]
        if len(consumers(self.model, init.name)) > 1:
            copy = self.model.graph.initializer.add()
            copy.CopyFrom(init)
            copy.name = unique_name(fresh_name, set(self.by_name))
            self.by_name[copy.name] = copy
            list_if_old_ir(self.model, copy)
            node.input[index] = copy.name
            return copy
        return init

    def bias(self, node: onnx.NodeProto, channels: int, dtype, fresh_name: str) -> onnx.TensorProto:
        """``node``'s bias initializer (input 2), created as zeros when it has none, copied when shared."""
        if len(node.input) > 2 and node.input[2] in self.by_name:
            return self.owned(node, 2, fresh_name)
        if len(node.input) > 2 and node.input[2]:
            raise ValueError(f"bias of {node.name} is not a constant: cannot refit it")
        bias = self.model.graph.initializer.add()
        bias.CopyFrom(numpy_helper.from_array(np.zeros(channels, dtype=dtype), unique_name(fresh_name, set(self.by_name))))
        self.by_name[bias.name] = bias
        list_if_old_ir(self.model, bias)
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(bias.name)
        else:
            node.input[2] = bias.name
        return bias


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


# --- metadata -------------------------------------------------------------------------------------

def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set (or, with an empty value, remove) ``metadata_props`` entries, keeping the others in order."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        if value:
            model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def json_metadata(model: onnx.ModelProto, key: str, default=None):
    try:
        return json.loads(metadata(model)[key])
    except (KeyError, ValueError):
        return default


# --- export ---------------------------------------------------------------------------------------

def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """gs graph -> ModelProto keeping the template's ir_version, opsets, metadata and producer.

    The same model as ``gs.export_onnx(graph, do_type_check=False)`` with the template's fields
    (tests compare the bytes), but built in place: gs builds a GraphProto and then copies all of it
    into the model (two copies of every weight at once), and exports every initializer before
    adding any (issue 5: peak memory).
    """
    graph.cleanup().toposort()
    # gs exports a Constant node's tensor by naming the TensorProto it imported, which is the template's own:
    # the caller's model would come back changed (a name "" set), so those names are cleared again below.
    unnamed = [a.t for n in template.graph.node for a in n.attribute
               if a.type == onnx.AttributeProto.TENSOR and not a.t.HasField("name")]
    model = onnx.ModelProto()
    model.ir_version = template.ir_version
    _export_graph(graph, model.graph)
    for tensor in unnamed:
        if tensor.name == "":
            tensor.ClearField("name")
    model.opset_import.extend(template.opset_import)
    copy_template_fields(model, template)
    return model


def check_chain_nodes(model: onnx.ModelProto, chains: list) -> None:
    """Each node the chains wrote against its operator's schema at the model's opsets (cheap, where the whole
    model's checker is not: size, and inputs some exporters write that the checker refuses). A failure is the
    tool's bug, said before anything is written, even under ``--no-check``."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    written = {name for chain in chains for name in chain.nodes.values()}
    for node in model.graph.node:
        if node.name in written:
            try:
                onnx.checker.check_node(node, ctx)
            except onnx.checker.ValidationError as exc:
                raise ModelError(f"the chain node {node.name!r} is not valid ONNX at this model's opsets "
                                 f"({str(exc).splitlines()[0].rstrip('.')}): an onnx-tucker bug, please report it") from None


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

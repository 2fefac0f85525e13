"""What tf2onnx leaves behind on Keras 3 models, folded before conversion or refused after it.

``tf2onnx.convert.from_function`` converts with ``continue_on_error=True``, so whatever it cannot
map stays in the ONNX graph and the model fails later (in onnxruntime, or in the compressor).
Three leftovers were found on the Keras 3 applications:

- **Captured constants as graph inputs** (EfficientNetV2's ``Normalization`` mean and variance, and
  any tensor a layer holds as a plain constant rather than a variable): ``from_function`` passes every
  non-resource input of the concrete function to tf2onnx as a graph input, captures included, so
  they became ONNX inputs with no value. Here only the signature's own inputs are inputs; freezing
  turns the captures into constants, which tf2onnx then folds.
- **XLA-marked function calls** (ConvNeXt's grouped 7x7 convs: Keras's TensorFlow backend wraps a
  grouped conv in ``tf.function(jit_compile=True)`` because TensorFlow's CPU kernel lacks it): grappler
  never inlines a function marked for XLA, so each stayed a ``StatefulPartitionedCall``. The marks are
  removed from the frozen graph before tf2onnx's grappler pass, which then inlines the body (a plain
  ``Conv2D`` with fewer kernel input channels than input channels: an ONNX grouped ``Conv``).
- **``Erfc``** (exact GELU, ``0.5 * x * erfc(-x / sqrt(2))``), which tf2onnx 1.17 does not map:
  converted here as ``1 - Erf(x)``.

Anything else tf2onnx could not map is refused with one line naming the ops (:class:`ModelError`), and
a failure inside TensorFlow's freezing or tf2onnx is one line too.

Memory: tf2onnx's optimizers deep-copy the graph before each step and the copies were left to pile up
(ResNet50: 7.7 GB peak for 94 MB of weights); each step now starts with a garbage collection (3.1 GB).
"""
from __future__ import annotations

import numpy as np
import onnx

from onnx_tucker.errors import ModelError, first_line

# attributes that keep grappler from inlining a function call (function_optimizer.cc MarkedForXlaCompilation)
XLA_MARKS = ("_XlaMustCompile", "_XlaCompile", "_xla_compile_id", "_XlaScope", "_noinline")


def unmark_xla(graph_def) -> int:
    """Remove the XLA compile marks from every node and function of ``graph_def`` (in place); return how many."""
    removed = 0

    def strip(attr_map) -> int:
        names = [k for k in XLA_MARKS if k in attr_map]
        for k in names:
            del attr_map[k]
        return len(names)

    for node in graph_def.node:
        removed += strip(node.attr)
    for function in graph_def.library.function:
        removed += strip(function.attr)
        for node in function.node_def:
            removed += strip(node.attr)
    return removed


def _erfc(ctx, node, name, args):
    """tf2onnx custom handler: Erfc(x) = 1 - Erf(x)."""
    from tf2onnx import utils

    out = node.output[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(out))
    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    sub = ctx.insert_new_node_on_output("Sub", out, name=utils.make_name(f"{name}_erfc"), inputs=[one.output[0], out])
    ctx.copy_shape(out, sub.output[0])
    ctx.copy_dtype(out, sub.output[0])


CUSTOM_OP_HANDLERS = {"Erfc": (_erfc, [])}
# op domains onnxruntime implements beyond the ONNX schemas (tf2onnx emits a few contrib ops)
RUNTIME_DOMAINS = ("com.microsoft",)


def function_to_onnx(function, input_signature, opset: int) -> onnx.ModelProto:
    """A ``tf.function`` with a fixed ``input_signature`` -> ONNX, graph inputs = the signature's tensors only.

    The same steps as ``tf2onnx.convert.from_function`` (freeze, grappler, convert), with the leftovers
    described in the module docstring folded; output tensors are renamed after the function's output
    dict keys and inputs after the signature's names, as ``from_function`` does.
    """
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = function.get_concrete_function(*input_signature)
    n_inputs = len(tf.nest.flatten(concrete.structured_input_signature))
    input_names = [t.name for t in concrete.inputs[:n_inputs]]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    renames = tf2onnx.convert.tensor_names_from_structed(concrete, input_names, output_names)
    try:
        frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
        graph_def = frozen.graph.as_graph_def(add_shapes=True)
        unmark_xla(graph_def)
        graph_def = tf2onnx.tf_loader.fix_freezing_errors_part2(graph_def)
        model = _convert_graph_def(graph_def, concrete.name, input_names, output_names, opset, renames)
    except Exception as exc:  # TensorFlow's freezing or tf2onnx gave up: the model cannot be converted this way
        raise ModelError(f"tf2onnx could not convert the model: {type(exc).__name__}: {first_line(exc, 200)}") from exc
    check_leftovers(model, expected_inputs=[renames.get(n, n) for n in input_names])
    return model


def _collecting(optimizers):
    """tf2onnx's optimizers, each preceded by a garbage collection.

    ``optimize_graph`` deep-copies the whole graph, constants included, before every optimizer of every pass;
    the copies are cyclic and Python's collector let them pile up: ResNet50 (94 MB of weights) peaked at 7.1 GB
    in the optimizers (ResNet101 went past 11 GB). With a collection before each, and everything older than the
    conversion frozen out of the collector's scans (``_convert_graph_def``), 2.9 GB, and 7 s instead of 14.
    """
    import gc
    from collections import OrderedDict

    def collect_then(factory):
        def make():
            gc.collect()
            return factory()

        return make

    return OrderedDict((name, collect_then(factory)) for name, factory in optimizers.items())


def _convert_graph_def(graph_def, name, input_names, output_names, opset, renames) -> onnx.ModelProto:
    """``tf2onnx.convert.from_graph_def`` (grappler, then tf2onnx), its optimizers made to collect garbage."""
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import optimizer

    common = getattr(tf2onnx.convert, "_convert_common", None)
    if common is None or not hasattr(optimizer, "_get_optimizers"):  # another tf2onnx than the pinned 1.17
        model, _ = tf2onnx.convert.from_graph_def(
            graph_def, name=name, input_names=input_names, output_names=output_names, opset=opset,
            custom_op_handlers=CUSTOM_OP_HANDLERS, tensors_to_rename=renames,
        )
        return model
    import gc

    with tf.device("/cpu:0"):
        with tf.Graph().as_default():  # grappler's meta graph export needs graph mode
            graph_def = tf2onnx.tf_loader.tf_optimize(input_names, output_names, graph_def)
        gc.freeze()  # the objects alive now (TensorFlow, Keras, the caller's) are not scanned by the collections
        try:
            model, _ = common(
                graph_def, name=name, continue_on_error=True, opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS,
                input_names=input_names, output_names=output_names, tensors_to_rename=renames,
                optimizers=_collecting(optimizer._get_optimizers()),
            )
        finally:
            gc.unfreeze()
    return model


def unknown_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in the main graph (and subgraphs) that no registered ONNX schema knows (onnxruntime's own
    ``com.microsoft`` ops excepted), sorted."""
    unknown = set()
    stack = [model.graph]
    opsets = {o.domain: o.version for o in model.opset_import}
    while stack:
        graph = stack.pop()
        for node in graph.node:
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain in RUNTIME_DOMAINS:
                continue
            try:
                onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
            except onnx.defs.SchemaError:
                unknown.add(node.op_type if not domain else f"{domain}.{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return sorted(unknown)


def check_leftovers(model: onnx.ModelProto, expected_inputs: list[str]) -> None:
    """Refuse (one line) a conversion that kept TensorFlow ops or grew graph inputs the model does not have."""
    ops = unknown_ops(model)
    if ops:
        raise ModelError(f"tf2onnx could not convert these TensorFlow ops: {', '.join(ops)[:200]}")
    inits = {i.name for i in model.graph.initializer}
    extra = [i.name for i in model.graph.input if i.name not in inits and i.name not in expected_inputs]
    if extra:
        raise ModelError(f"the converted model has inputs with no value ({', '.join(extra)[:200]}): not converted")

"""``passes.Passes``: a model's tensors unit after unit from one forward pass, as prefix models would give them with the
weights as they stand when the pass reaches each tensor."""
import numpy as np
import onnx

from conftest import residual_model, run_model
from onnx_tucker.graph import with_outputs
from onnx_tucker.passes import Passes


def _index(model, name):
    return next(i for i, node in enumerate(model.graph.node) if node.name == name)


def _tensor(model, name, feeds):
    return run_model(with_outputs(model, [name]), feeds)[-1]


def _scale(model, initializer, factor):
    init = next(i for i in model.graph.initializer if i.name == initializer)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(factor), initializer))


def test_tensors_follow_weights_changed_before_the_pass_reaches_them():
    original = residual_model()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    feeds = {"x": np.random.default_rng(0).standard_normal((70, 3, 10, 10)).astype(np.float32)}  # 2 batches of 64
    passes = Passes(model, feeds)
    a_r, s = passes.at(model, ["a_r", "s"], _index(model, "down"))  # both cross the cut before the stride-2 conv
    np.testing.assert_allclose(a_r, _tensor(model, "a_r", feeds), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s, _tensor(model, "s", feeds), rtol=1e-6, atol=1e-6)
    assert passes.forward.usable and passes.forward.index == _index(model, "down")

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    _scale(rewritten, "W3", -2.0)  # "down" rewritten before the pass runs it (a new model, same graph): what follows sees it
    (g,) = passes.at(rewritten, ["g"], _index(model, "pointwise"))
    np.testing.assert_allclose(g, _tensor(rewritten, "g", feeds), rtol=1e-5, atol=1e-5)
    assert not np.allclose(g, _tensor(original, "g", feeds), atol=1e-3)
    assert passes.forward.usable and passes.forward.index == _index(model, "pointwise")


def test_a_tensor_behind_the_cut_comes_from_a_prefix_model_of_the_model_as_it_stands():
    model = residual_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 3, 10, 10)).astype(np.float32)}
    passes = Passes(model, feeds)
    passes.at(model, ["g"], _index(model, "pointwise"))
    _scale(model, "W1", 0.5)  # the stem, long behind the cut
    (a_r,) = passes.at(model, ["a_r"], _index(model, "block_conv"))
    np.testing.assert_allclose(a_r, _tensor(model, "a_r", feeds), rtol=1e-6, atol=1e-6)
    assert passes.forward.usable  # a tensor behind the cut is not a failure of the pass: later ones still come from it

"""A model's tensors over fixed inputs, unit after unit in graph order, from one forward pass.

The local reconstruction (``reconstruct``) and pruning's refit (``prune.refit_in_order``) both need, for
each unit in turn, tensors of the model as it stands (the units before already rewritten) and of the
original: a prefix model from the inputs per unit runs the network once a unit, which grows with the
square of the depth. ``Passes`` runs it once, a segment at a time (``calibrate._Forward``)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx


class Passes:
    """Tensors of a model over fixed inputs, for one unit after the other: the model runs forward once, a
    segment at a time (``calibrate._Forward``), instead of a session from the inputs per unit (ResNet-56:
    two passes of about 5 s a unit, 27 units). A tensor the forward does not hold at the cut (a shortcut
    conv placed after the unit's first node) comes from a pruned prefix model, as does everything after
    the forward had to give up on the graph."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
        from onnx_tucker.calibrate import _Forward

        self.feeds = feeds
        self.forward = _Forward(model, feeds, np.arange(len(next(iter(feeds.values())))))

    def at(self, model: onnx.ModelProto, tensors: Sequence[str], index: int) -> list[np.ndarray]:
        """``tensors`` as ``model`` (the weights reconstructed so far, same graph) computes them, the forward
        advanced to node ``index``."""
        from onnx_tucker.calibrate import _collect

        forward = self.forward
        forward.model = model
        values = []
        for tensor in tensors:
            value = None
            if forward.usable:
                behind = index < forward.index
                value = forward._advance(index, tensor)
                if value is None and not behind and forward.index != index:  # the segment itself failed
                    forward.usable = False
            values.append(np.asarray(value) if value is not None else _collect(model, self.feeds, tensor))
        return values

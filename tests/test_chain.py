"""Chains: every rewrite returns its record, the model carries it, and later steps find the chain by it."""
import json

import numpy as np
import onnx

from onnx_tucker import compress
from onnx_tucker.chain import METADATA_KEY, Chain, chains_of, dumps

from conftest import residual_model


def test_each_rewrite_records_its_form_ranks_nodes_and_initializers():
    model = residual_model()
    new, report = compress(model, ratio=0.5)
    assert [c.layer for c in report.chains] == [r.layer for r in report.decomposed]
    nodes = {n.name: n for n in new.graph.node}
    inits = {i.name for i in new.graph.initializer}
    for chain, record in zip(report.chains, report.decomposed):
        assert chain.form == record.form == "tucker2" and tuple(chain.ranks) == tuple(record.ranks)
        first, core, last = (nodes[chain.nodes[r]] for r in ("first", "core", "last"))
        assert first.input[0] == chain.input and last.output[0] == chain.output
        assert core.input[0] == first.output[0] and last.input[0] == core.output[0]
        for role, weight in chain.weights.items():
            assert weight in inits and nodes[chain.nodes[role]].input[1] == weight
        ranks = onnx.numpy_helper.to_array(next(i for i in new.graph.initializer if i.name == chain.weights["core"])).shape[:2]
        assert tuple(ranks) == tuple(chain.ranks)


def test_the_written_model_carries_the_chains_and_they_round_trip():
    new, report = compress(residual_model(), ratio=0.5)
    meta = {p.key: p.value for p in new.metadata_props}
    assert json.loads(meta[METADATA_KEY]) == [c.to_dict() for c in report.chains]
    assert [c.to_dict() for c in chains_of(new)] == [c.to_dict() for c in report.chains]
    assert chains_of(residual_model()) == []


def test_calibration_refit_keeps_the_records_true_when_it_creates_or_copies_initializers():
    """The refit creates a bias for a conv that had none and copies shared weights: the chain follows."""
    model = residual_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 3, 10, 10)).astype(np.float32)}
    new, report = compress(model, ratio=0.5, calibration=feeds, refit="last")
    nodes = {n.name: n for n in new.graph.node}
    inits = {i.name for i in new.graph.initializer}
    for chain in chains_of(new):
        last = nodes[chain.nodes["last"]]
        assert chain.bias in inits and last.input[2] == chain.bias
        assert set(chain.trainable()) <= inits


def test_trainable_lists_every_factor_and_the_bias_once():
    c = Chain("l", "tucker2", (2, 3), {"first": "n1", "core": "n2", "last": "n3"}, {"first": "A", "core": "B", "last": "C"}, "b", "x", "y")
    assert c.trainable() == ["A", "B", "C", "b"] and c.last_role == "last"
    assert Chain.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_roles_keep_their_data_flow_order_through_the_metadata():
    """The metadata JSON sorts keys; a two-conv chain (first, core) must still end with its core."""
    chain = Chain(layer="c", form="tucker2", ranks=(16, 4), nodes={"first": "a", "core": "b"},
                  weights={"first": "wa", "core": "wb"}, bias=None, input="x", output="y")
    [back] = [Chain.from_dict(d) for d in json.loads(dumps([chain]))]
    assert back.roles == ["first", "core"] and back.last_role == "core"
    old = json.loads(dumps([chain]))[0]
    del old["roles"]  # a record from before roles were stored: the canonical order
    assert Chain.from_dict(old).roles == ["first", "core"]

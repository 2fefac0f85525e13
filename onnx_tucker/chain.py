"""Chains: what a rewrite produced for one layer (form, ranks, nodes and initializers, by role).

The report keeps them and the written model carries them in its metadata (``onnx_tucker.chains``), so
calibration, sensitivity, ``bench --per-layer`` and latency-aware mode find each chain's nodes by record,
never by matching node names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

METADATA_KEY = "onnx_tucker.chains"
ROLE_ORDER = ("first", "core", "last")  # data-flow order of the roles, for records written without "roles"


@dataclass
class Chain:
    layer: str  # the original node's name
    form: str  # the factorization's registry name
    ranks: tuple
    nodes: dict[str, str]  # role -> node name, in data-flow order ("first", "core", "last" for Tucker-2)
    weights: dict[str, str]  # role -> initializer name of that node's weight
    bias: str | None  # the last node's bias initializer (None: no bias)
    input: str  # tensor the chain reads
    output: str  # tensor the chain writes (the original layer's output)
    channel_axis: int = 1  # where the channels are in the input/output tensors: 1 (NC...) for convs, -1 for dense
    extra: dict = field(default_factory=dict)

    @property
    def roles(self) -> list[str]:
        return list(self.nodes)

    @property
    def last_role(self) -> str:
        return self.roles[-1]

    def node_names(self) -> list[str]:
        return list(self.nodes.values())

    def trainable(self) -> list[str]:
        """The initializers this chain owns: every factor's weight and the bias (what distillation trains)."""
        folded = self.extra.get("folded_affine", {}).get("bias")
        return list(dict.fromkeys(list(self.weights.values()) + ([self.bias] if self.bias else []) + ([folded] if folded else [])))

    def to_dict(self) -> dict:
        # "roles" keeps the data-flow order: the metadata JSON is written with sorted keys
        return {"layer": self.layer, "form": self.form, "ranks": list(self.ranks), "nodes": dict(self.nodes), "roles": self.roles,
                "weights": dict(self.weights), "bias": self.bias, "input": self.input, "output": self.output,
                "channel_axis": self.channel_axis, **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Chain":
        order = d.get("roles") or sorted(d["nodes"], key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER))
        return cls(layer=d["layer"], form=d["form"], ranks=tuple(d["ranks"]), nodes={r: d["nodes"][r] for r in order},
                   weights=dict(d["weights"]), bias=d.get("bias"), input=d["input"], output=d["output"],
                   channel_axis=int(d.get("channel_axis", 1)), extra=dict(d.get("extra", {})))


def dumps(chains: list[Chain]) -> str:
    return json.dumps([c.to_dict() for c in chains], sort_keys=True)


def chains_of(model) -> list[Chain]:
    """The chain records a model written by onnx-tucker carries ([] for any other model)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return [Chain.from_dict(d) for d in json.loads(prop.value)]
            except (ValueError, KeyError, TypeError):
                return []
    return []

"""Per-layer records -> terminal table and JSON."""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

from onnx_tucker.trace import timed


@dataclass
class LayerRecord:
    layer: str
    kernel: list  # weight shape, OIHW
    ranks: tuple = ()
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    macs_known: bool = False
    relative_error: float | None = None
    decomposed: bool = False
    reason: str = ""
    op: str = "Conv"
    form: str = ""  # the factorization used ("" when left whole)
    layout: str = ""  # the chain's nodes, e.g. "1x1 -> 3x3 -> 1x1" or the two-conv "1x1 -> 3x3"
    original_us: float | None = None  # the layer alone, timed on the latency provider (latency_table)
    chain_us: float | None = None  # its chain at ``ranks``, timed interleaved with it
    pruned: bool = False  # its hidden channels were pruned (--layers hidden): sizes before -> after
    kept: str = ""  # "kept/channels" of the pruned unit it belongs to

    @classmethod
    def from_site(cls, site) -> "LayerRecord":
        kernel = list(site.weight.shape) if site.weight is not None else []
        rec = cls(layer=site.name, kernel=kernel, reason=site.reason, op=site.op)
        if site.shape is not None:
            # (out, in, k...) for every op, as inspect shows it: a MatMul's raw weight is (in, out)
            rec.kernel = [site.shape.c_out, site.shape.c_in // site.shape.group, *site.shape.kernel]
            rec.params_before = rec.params_after = site.shape.params()
            rec.macs_before = rec.macs_after = site.shape.macs()
            rec.macs_known = site.shape.known
        return rec


@dataclass
class Report:
    ratio: float
    force: bool
    tool_version: str
    layers: list = field(default_factory=list)
    check: dict | None = None
    accuracy: dict | None = None
    calibration: dict | None = None
    sensitivity: dict | None = None
    settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # one-line remarks for the user (fallbacks taken)
    chains: list = field(default_factory=list)  # chain.Chain of every rewrite, in graph order
    verdict: dict | None = None  # the self-check's {"passed", "reason"}
    distill: dict | None = None  # label-free distillation's statistics (steps, holdout agreement before/after, kept)
    latency: dict | None = None  # per-layer table times, predicted and measured whole-model latency (latency_table)
    timings: dict = field(default_factory=dict)  # wall seconds per phase, in the order they ran (``phase``)
    form_choice: dict | None = None  # a rule with several forms: {"rule", "metric", "layers": {layer: {"form", "errors", "written"}}}
    sizes_static: bool = False  # every input's size known: unknown MACs then come from shape inference, not the input
    pruning: dict | None = None  # --layers hidden: the units found, the channels each kept, its refit's error

    @property
    def decomposed(self) -> list:
        return [r for r in self.layers if r.decomposed]

    @property
    def pruned_units(self) -> int:
        """How many units' hidden channels were pruned (--layers hidden); 0 without pruning."""
        return (self.pruning or {}).get("pruned", 0)

    def totals(self) -> dict:
        t = {
            "convs": len(self.layers),
            "decomposed": len(self.decomposed),
            "pruned": sum(r.pruned for r in self.layers),
            "params_before": sum(r.params_before for r in self.layers),
            "params_after": sum(r.params_after for r in self.layers),
            "macs_before": sum(r.macs_before for r in self.layers),
            "macs_after": sum(r.macs_after for r in self.layers),
            # a layer of no known size at all (its weight computed at run time) counts in neither total, and does not
            # make the model's MACs unknown: --input-shape would not give it a size
            "macs_known": all(r.macs_known for r in self.layers if r.kernel),
        }
        t["macs_reduction"] = t["macs_before"] / t["macs_after"] if t["macs_after"] else math.inf
        t["params_reduction"] = t["params_before"] / t["params_after"] if t["params_after"] else math.inf
        return t

    def to_dict(self) -> dict:
        return {
            "tool_version": self.tool_version,
            "ratio": self.ratio,
            "force": self.force,
            "layers": [asdict(r) | {"ranks": list(r.ranks)} for r in self.layers],
            "totals": self.totals(),
            "check": self.check,
            "accuracy": self.accuracy,
            "calibration": self.calibration,
            "sensitivity": self.sensitivity,
            "settings": self.settings,
            "notes": self.notes,
            "chains": [c.to_dict() for c in self.chains],
            "verdict": self.verdict,
            "distill": self.distill,
            "latency": self.latency,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "form_choice": self.form_choice,
            "pruning": self.pruning,
        }

    @contextmanager
    def phase(self, name: str, traced: bool = True):
        """Adds the wall time of the block to ``timings[name]`` (where a run's time goes: people size
        budgets and machines by it, and a GPU run shows which phases the GPU sped up)."""
        start = time.perf_counter()
        try:
            with timed(name) if traced else nullcontext():  # a phase run per layer is traced once, as a total
                yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def timing_line(self) -> str:
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.timings.items() if seconds >= 0.05]
        return "time: " + (", ".join(parts) if parts else "-")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def table(self) -> str:
        return format_table(self)


def _n(value: int) -> str:
    if value >= 10**9:
        return f"{value / 1e9:.2f}G"
    if value >= 10**6:
        return f"{value / 1e6:.2f}M"
    if value >= 10**3:
        return f"{value / 1e3:.1f}k"
    return str(value)


def format_table(report: Report) -> str:
    headers = ["layer", "kernel", "form", "ranks", "params", "MACs", "rel.err", "note"]
    rows = []
    for r in report.layers:
        kernel = "x".join(str(k) for k in r.kernel) if r.kernel else "?"
        if r.pruned and not r.decomposed:
            rows.append([
                r.layer, kernel, "prune", r.kept, f"{_n(r.params_before)} -> {_n(r.params_after)}",
                f"{_n(r.macs_before)} -> {_n(r.macs_after)}" if r.macs_known else "unknown*",
                f"{r.relative_error:.4f}" if r.relative_error is not None else "-", r.reason,
            ])
        elif r.decomposed:
            rows.append([
                r.layer, kernel, r.form, ",".join(str(x) for x in r.ranks),
                f"{_n(r.params_before)} -> {_n(r.params_after)}",
                f"{_n(r.macs_before)} -> {_n(r.macs_after)}" if r.macs_known else "unknown*",
                f"{r.relative_error:.4f}",
                ((f"pruned {r.kept}, then " if r.pruned else "") + "decomposed" + (f": {r.layout}" if r.layout else "")
                 + (f" ({r.original_us:.0f} -> {r.chain_us:.0f} us)" if r.original_us is not None and r.chain_us is not None else "")),
            ])
        else:
            size = _n(r.macs_before) if r.macs_known else ("unknown*" if r.kernel else "?")
            rows.append([r.layer, kernel, "-", "-", _n(r.params_before) if r.kernel else "?", size, "-", r.reason])
    t = report.totals()
    rows.append([
        "TOTAL (convs)", "", "", f"{t['decomposed']}/{t['convs']}",
        f"{_n(t['params_before'])} -> {_n(t['params_after'])}",
        f"{_n(t['macs_before'])} -> {_n(t['macs_after'])} ({t['macs_reduction']:.2f}x)" if t["macs_known"] else "unknown*",
        "", "",
    ])
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    widths[-1] = min(widths[-1], 60)
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if not t["macs_known"]:
        from onnx_tucker.runtime import unknown_sizes_note

        lines.append(unknown_sizes_note(report.sizes_static))
    lines.extend(f"note: {note}" for note in report.notes)
    if report.distill:
        lines.append(distill_summary(report.distill))
    return "\n".join(lines)


_RETURNED = {"distilled": "the distilled model", "reconstructed": "the reconstructed model (the global phase did not pass the check)",
             "compressed": "the compressed model unchanged (nothing passed the check)"}


def distill_summary(stats: dict) -> str:
    """One line on what ``--distill`` did: which model it kept, and that model's agreement and KL with the original
    on the held-out inputs against the compressed model's (the check it passed)."""
    returned, before = stats["returned"], stats["before"]
    chosen = {"distilled": stats["after"], "reconstructed": stats["reconstructed"], "compressed": before}[returned]
    local = stats["reconstruct"]
    units = f"{local['kept']}/{len(local['chains'])} reconstruction units kept, " if local else ""
    where = f"{stats['holdout_samples']} held-out inputs" if stats["check_on"] == "holdout" else "the training inputs"
    agreement = (f"agreement with the original {100 * before['agreement']:.1f}% -> {100 * chosen['agreement']:.1f}%, "
                 if before.get("agreement") is not None and chosen.get("agreement") is not None else "")
    measure = {"kl": "KL", "relative error": "relative squared error"}.get(before.get("measure", "kl"), "KL + relative squared error")
    if returned == "distilled" and len(stats.get("global_attempts") or ()) > 1:
        kept = "the model distilled from the compressed one (neither the reconstruction nor the distillation from it passed the check)"
    else:
        kept = _RETURNED[returned]
    diverged = (f"; the global phase diverged (loss not finite) after {stats.get('steps')} of {stats.get('steps_asked')} steps"
                if stats.get("diverged") else "")
    return (f"distill: kept {kept}; {units}on {where} {agreement}{measure} {before['kl']:.4g} -> {chosen['kl']:.4g}"
            f" ({stats['seconds']:.0f} s on {stats['device']}){diverged}")

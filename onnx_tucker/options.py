"""Options in one place: the validated options object of ``compress`` (the Python API and every command),
and the argument groups the commands share, so that a flag means the same everywhere.

Each group (as Polygraphy's tools share theirs) adds its flags to a parser and turns parsed arguments
into checked values once; ``compress``, ``sweep``, ``inspect`` and ``bench`` list the groups they need.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import numpy as np

from onnx_tucker.decompose import DEFAULT_ITERATIONS, METHODS
from onnx_tucker.errors import UsageError

RANK_METHODS = ("ratio", "energy", "vbmf")
BUDGET_RULES = ("auto", "measured", "uniform")
REFITS = ("core", "last", "none")
DEFAULT_CALIB_SIZE = 2048  # measured: 512 -> 2048 samples took the 3x drop from 2.63 to 1.84 points; 4096 no better


# --- value checks (each raises a one-line UsageError) ---------------------------------------------

def check_ratio(ratio, what: str = "ratio") -> float:
    if isinstance(ratio, bool):  # float(True) is 1.0: a slip, not a ratio
        raise UsageError(f"{what} must be a number in (0, 1], got {ratio!r}")
    try:
        # a float32/float16 as the decimal it prints as: float(np.float32(0.7)) is 0.69999999, one rank less on 8 layers
        value = float(str(ratio)) if isinstance(ratio, np.floating) and ratio.dtype.itemsize < 8 else float(ratio)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0) or not math.isfinite(value):
        raise UsageError(f"{what} must be in (0, 1], got {ratio}")
    return value


def check_share(value, what: str = "prune share") -> float | str:
    """A number in [0, 1] (``--prune-share``: 0 prunes nothing, 1 factors nothing), or "auto"."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number in [0, 1] or auto, got {value!r}")
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in [0, 1] or auto, got {value!r}") from None
    if not 0.0 <= share <= 1.0:  # NaN fails this too
        raise UsageError(f"{what} must be in [0, 1] or auto, got {value}")
    return share


def _check_int(value, what: str, minimum: int, expected: str) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise UsageError(f"{what}: expected {expected}, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise UsageError(f"{what}: expected {expected}, got {value!r}")
    if number > MAX_INT:  # a count this large is a slip, and fails deep inside (an int32 thread count, an allocation)
        raise UsageError(f"{what}: {value} is too large (at most {MAX_INT})")
    return number


MAX_INT = 2**31 - 1


def check_positive_int(value, what: str) -> int:
    return _check_int(value, what, 1, "a positive integer")


def check_count(value, what: str) -> int:
    """A whole number >= 0."""
    return _check_int(value, what, 0, "a whole number >= 0")


def check_rank_multiple(value, what: str = "rank_multiple"):
    """A positive integer, or "auto" (chosen per provider from measurements)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return check_positive_int(value, what)
    except UsageError:
        raise UsageError(f"{what}: expected a positive integer or auto, got {value!r}") from None


def check_fraction_list(text: str, what: str) -> list[float]:
    """Comma-separated fractions in (0, 1]; an empty item is an error, not skipped."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"{what}: expected comma-separated fractions in (0, 1], got {text!r}")
    return list(dict.fromkeys(check_ratio(t, what) for t in items))


def check_int_list(text: str, what: str) -> list[int]:
    """Comma-separated positive integers; an empty item is an error, not skipped."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"{what}: expected comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(check_positive_int(t, what) for t in items))


def check_tolerance(value, what: str, low: float = 0.0, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or not (low <= number <= high):
        raise UsageError(f"{what}: expected a finite number in [{low:g}, {high:g}], got {value!r}")
    return number


# --- the options object ---------------------------------------------------------------------------

@dataclass
class CompressOptions:
    """Every option of :func:`onnx_tucker.compress` (and of the commands that compress).

    ratio: rank ratio in (0, 1] for ``rank_method="ratio"``: R = max(1, int(ratio * C)) per channel mode.
    force: decompose every eligible layer, even where its chain would not reduce MACs.
    rank_multiple: round every rank to a multiple of N (>= 1), or "auto": the multiple (1, 4, 8, 16) whose chains
        run fastest per MAC on ``provider``, measured on the largest layers (``latency_table.choose_multiple``).
    n_iter_max: HOOI iterations after the SVD start (>= 0, default 10).
    method: "eig" (our HOOI, default) or "tensorly" (``partial_tucker``, the reference).
    ranks: {layer name or 0-based index: rank tuple}, overriding the rule for those layers, used as given (not
        rounded to ``rank_multiple``): ``(R_out, R_in)`` for Tucker-2, ``(K,)`` for spatial SVD, ``(R,)`` for an SVD;
        checked against the model (unknown layers, wrong lengths, ranks above a mode's size: UsageError).
    exclude: layer names or 0-based indices (graph order) to leave whole.
    rank_method: "ratio" (default), "energy" (keep ``energy`` of each unfolding's spectrum) or "vbmf".
    energy: fraction in (0, 1] for ``rank_method="energy"``.
    target_macs: whole-model conv MACs at most this fraction of the original (a budget; overrides the rule).
    budget_rule: with ``target_macs``: "auto" (measured with calibration, else uniform), "measured", "uniform".
    calibration: {input name: samples} from TRAINING data: data-aware fit and refits.
    refit: with calibration: "core" (core by reduced-rank regression, then the last factor; default),
        "last" (only the last 1x1 conv and bias) or False / "none".
    whiten: with calibration: fit the input factor in the metric of the input's channel covariance.
    latency_aware: leave whole the layers whose chain is not measured faster than the original layer on
        ``provider`` (each timed alone at ``latency_batch``, interleaved with the original; ``latency_table``).
    latency_batch: batch size of every latency measurement (``latency_aware``, ``target_latency``, "auto" multiple).
    target_latency: with ``calibration``: per-layer ranks with the least measured distortion whose predicted
        whole-model latency on ``provider`` is at most this fraction of the original's (a budget; overrides the rule).
    provider: the execution provider the latencies are measured on ("cpu" default, "cuda", "tensorrt").
    latency_table: the per-layer latency cache file (default ``~/.cache/onnx-tucker/latency.json``).
    forms: factorization names to use, tried in order per layer (default ``factorization.DEFAULT_FORMS``:
        Tucker-2 on kxk convs); ``("tucker2", "svd")`` also factors 1x1 convs. See ``factorization.FORMS``.
    layers: which kinds of layer to factor: "kxk" (kxk convs, Tucker-2; the default), "1x1" (1x1 convs, SVD),
        "dense" (Gemm, and MatMul with a constant 2-D weight, SVD), e.g. ("kxk", "1x1", "dense"); "hidden" prunes
        hidden channels: of inverted residual blocks, between two convs, of a pooled classifier's conv (``onnx_tucker.prune``; needs
        ``calibration``; with ``target_macs`` alone, with ``ratio`` beside other kinds).
    fold_affine: fold a per-channel Mul/Add (a BatchNorm after a ReLU, also through a MaxPool when its
        scales are positive) into the first 1x1 conv of the chain it feeds: exact, and faster on the CPU (default True).
    curves: a file for the measured budget's distortion curves: reused by a later run on the same model and
        calibration data (at any target), and resumed after an interruption.
    probes: how the measured budget measures its curves: "auto" (a few whole-model probes per layer, the
        rest predicted from each option's layer-output error, then refined where the budget chooses; the
        default) or "all" (a whole-model probe for every option: the exact curves, several times slower).
    probe_images: held-out calibration images each whole-model probe runs on (default 128; fewer for big
        inputs, at most a quarter of the calibration set). More cost time in proportion and steady the
        allocation against the choice of calibration subset (ResNet-20 at 2x, four subsets: 512 images gave
        -1.11 points on average against -1.33, in 49 s against 25 s).
    distill: after the fit (and refit), train the chains' weights so the compressed model's outputs match
        the original's on the calibration inputs (label-free, needs ``calibration`` and torch): a dict of
        ``onnx_tucker.distill.distill`` keyword options ({} for its measured defaults), or None (off).
    input_shapes: {input name: dims} for inputs with dynamic spatial sizes: the cost model counts MACs at
        these sizes (without it such layers' MACs are unknown and profitability is judged on parameters).
    prune_share: with ``layers`` "hidden" and another kind and ``target_macs`` T: pruning meets T ** prune_share of
        the original's MACs and the factoring the rest (in [0, 1]: 0 prunes nothing, 1 factors nothing; None:
        ``hybrid.PRUNE_SHARE``, 0.5; "auto": each of ``hybrid.SHARES`` tried, the one whose output moves least on
        calibration images kept).
    ray: measure the measured budget's curves as Ray tasks, one per layer (``onnx_tucker.fanout``, needs
        ``pip install 'onnx-tucker[ray]'``): "auto" (this machine's cluster, or a new local one) or a cluster
        address like "HEAD:6379"; None (default) measures here. The curves and ranks are the same.
    """

    ratio: float = 0.5
    force: bool = False
    rank_multiple: int = 1
    n_iter_max: int = DEFAULT_ITERATIONS
    method: str = "eig"
    ranks: dict = field(default_factory=dict)
    exclude: tuple = ()
    rank_method: str = "ratio"
    energy: float = 0.9
    target_macs: float | None = None
    budget_rule: str = "auto"
    calibration: dict | None = None
    refit: str | bool = "core"
    whiten: bool = True
    latency_aware: bool = False
    latency_batch: int = 1
    target_latency: float | None = None
    provider: str = "cpu"
    latency_table: str | None = None
    forms: tuple | None = None
    layers: tuple | None = None
    input_shapes: dict | None = None
    fold_affine: bool = True
    curves: str | None = None
    probes: str = "auto"
    probe_images: int = 128  # sensitivity.EVAL_SAMPLES (not imported here: options stay light)
    distill: dict | None = None
    ray: str | None = None
    prune_share: float | str | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> "CompressOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)}: see help(onnx_tucker.compress)")
        return cls(**kwargs).validated()

    def validated(self) -> "CompressOptions":
        from onnx_tucker.ranks import check_energy

        self.ratio = check_ratio(self.ratio)
        for flag in ("force", "latency_aware", "whiten", "fold_affine"):
            if not isinstance(getattr(self, flag), bool):
                raise UsageError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        self.rank_multiple = check_rank_multiple(self.rank_multiple)
        self.n_iter_max = check_count(self.n_iter_max, "iterations")
        self.latency_batch = check_positive_int(self.latency_batch, "latency_batch")
        if self.method not in METHODS:
            raise UsageError(f"unknown decomposition method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.rank_method not in RANK_METHODS:
            raise UsageError(f"unknown rank method {self.rank_method!r}: choose ratio, energy or vbmf")
        self.energy = check_energy(self.energy)
        if self.target_macs is not None:
            self.target_macs = check_ratio(self.target_macs, "target MACs")
        if self.target_latency is not None:
            self.target_latency = check_ratio(self.target_latency, "target latency")
            if self.target_macs is not None:
                raise UsageError("give one budget: target MACs or target latency, not both")
        if self.latency_aware or self.target_latency is not None or self.rank_multiple == "auto":
            from onnx_tucker.providers import require

            self.provider = require(self.provider).key  # one line saying why it is missing
        else:
            from onnx_tucker.providers import get

            self.provider = get(self.provider).key
        if self.budget_rule not in BUDGET_RULES:
            raise UsageError(f"unknown budget rule {self.budget_rule!r}: choose auto, measured or uniform")
        if self.probes not in ("auto", "all"):
            raise UsageError(f"unknown probes mode {self.probes!r}: choose auto or all")
        self.probe_images = _check_int(self.probe_images, "probe_images", 1, "a whole number >= 1")
        if self.refit is True:
            self.refit = "core"
        if self.refit in (None, "none"):
            self.refit = False
        if self.refit not in ("core", "last", False):
            raise UsageError(f"unknown refit {self.refit!r}: choose core, last or none")
        if isinstance(self.exclude, str):
            self.exclude = tuple(e.strip() for e in self.exclude.split(",") if e.strip())
        self.exclude = _names(self.exclude, "exclude", "layer names or 0-based indices")
        self._check_types()
        from onnx_tucker.ranks import normalize_ranks

        self.ranks = normalize_ranks(self.ranks)
        if self.ranks and (self.target_macs is not None or self.target_latency is not None):
            raise UsageError("--ranks sets ranks by hand and a budget (--target-macs, --target-latency) chooses them: give one")
        if self.forms is not None:
            from onnx_tucker.factorization import get_form

            forms = self.forms.split(",") if isinstance(self.forms, str) else self.forms
            self.forms = tuple(get_form(f).name for f in _names(forms, "forms", "form names such as 'tucker2'"))
        if self.layers is not None:
            from onnx_tucker.factorization import layer_plan

            layers = self.layers.split(",") if isinstance(self.layers, str) else self.layers
            self.layers = tuple(dict.fromkeys(_names(layers, "layers", "layer kinds such as 'kxk'")))  # hidden,hidden is hidden
            if not self.layers:  # () factored nothing and recorded the default; None is the default
                raise UsageError("layers: name at least one kind (kxk, 1x1, dense), or None for the default")
            layer_plan(self.layers, self.forms)  # refuses unknown kinds
            if self.forms is not None:
                self._check_forms_apply()
            if "hidden" in self.layers:
                self._check_hidden()
        if self.prune_share is not None:
            self.prune_share = check_share(self.prune_share, "prune_share")
            if not (self.layers and "hidden" in self.layers and len(self.layers) > 1 and self.target_macs is not None):
                raise UsageError("--prune-share splits a --target-macs between pruning and factoring: it needs --layers "
                                 "hidden with another kind (e.g. hidden,kxk) and --target-macs")
        if self.curves is not None and self.layers and "hidden" in self.layers:
            raise UsageError("--curves does not apply with --layers hidden: the measured budget's curves would be those of "
                             "a pruned model, which changes with the target and the share")
        measured = ((self.target_macs is not None and self.budget_rule != "uniform") or self.target_latency is not None) \
            and self.calibration is not None
        if self.curves is not None and not measured:
            raise UsageError("curves only applies with target_macs (or target_latency) and calibration (the measured budget), "
                             "not with budget_rule='uniform'" if self.budget_rule == "uniform" else
                             "curves only applies with target_macs (or target_latency) and calibration (the measured budget)")
        if self.ray is not None and (self.target_macs is None or self.calibration is None or self.budget_rule == "uniform"):
            raise UsageError("ray only applies with target_macs and calibration (the measured budget's curves)")
        # the API's cache files get the CLI's checks, before any work (a folder failed only after the measurements)
        if self.curves is not None:
            self.curves = check_cache_file(str(self.curves), "curves")
        if self.latency_table is not None:
            self.latency_table = check_cache_file(str(self.latency_table), "latency_table")
        if self.ray is not None:
            from onnx_tucker.fanout import check_address, require_ray

            self.ray = check_address(self.ray)
            require_ray()
        return self

    def _check_forms_apply(self) -> None:
        """A form named in ``forms`` that factors none of the kinds in ``layers`` would be ignored: refused, as a flag
        that has no effect is (``--layers hidden --forms spatial`` only pruned; ``--layers kxk --forms svd`` ran Tucker-2)."""
        from onnx_tucker.factorization import LAYER_KINDS, PRUNED_KIND, get_form

        asked = {LAYER_KINDS[k][0] for k in self.layers if k != PRUNED_KIND}
        for name in self.forms:
            kinds = getattr(get_form(name), "kinds", None)
            if kinds is None or set(kinds) & asked:
                continue
            listed = ",".join(self.layers)
            if not asked:
                raise UsageError(f"--forms {name}: --layers {listed} factors nothing (it prunes hidden channels); add a kind "
                                 f"to factor (e.g. --layers {listed},kxk) or drop --forms")
            takes = [k for k, (kind, _) in LAYER_KINDS.items() if kind in kinds]
            raise UsageError(f"--forms {name} factors {' and '.join(takes)} layers, none of --layers {listed}: add "
                             f"{' or '.join(takes)} to --layers or drop it from --forms")

    def _check_hidden(self) -> None:
        """``--layers hidden`` (``onnx_tucker.prune``) keeps channels by a ratio or a MAC budget, refitted on calibration data."""
        if self.calibration is None:
            raise UsageError("--layers hidden needs calibration data (--calibrate): the pruned blocks are refitted on it")
        if self.rank_method != "ratio" or self.ranks:
            raise UsageError("--layers hidden keeps a share of each block's channels: give --ratio or --target-macs, not "
                             + ("--ranks" if self.ranks else f"--rank-method {self.rank_method}"))
        if self.target_latency is not None or self.latency_aware:
            raise UsageError("--layers hidden takes a MAC budget (--target-macs), not a latency one")
        if self.rank_multiple == "auto":
            raise UsageError("--layers hidden keeps a multiple of --rank-multiple N channels: give a number (8 or 16 on the CPU EP), not auto")
        if self.budget_rule == "uniform":
            raise UsageError("--layers hidden splits --target-macs by the blocks' measured errors: --budget-rule uniform does not apply")

    def _check_types(self) -> None:
        """The API's dict options have the shapes the CLI would build: one-line errors instead of a traceback deep inside."""
        import inspect

        if self.calibration is not None:
            if not isinstance(self.calibration, dict) or not self.calibration:
                raise UsageError("calibration: expected {input name: array of samples} "
                                 "(onnx_tucker.data.load_calibration(path, model) reads a .npz file or an image folder)")
            for name, value in self.calibration.items():
                if not hasattr(value, "shape") or len(value.shape) < 1:
                    raise UsageError(f"calibration[{name!r}]: expected an array with one sample per row, got {type(value).__name__}")
                if value.shape[0] == 0:
                    raise UsageError(f"calibration[{name!r}]: holds no samples (shape {list(value.shape)})")
                # an array in memory (a streamed image folder is checked as it decodes): NaN made 'weight contains NaN'
                if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
                    raise UsageError(f"calibration[{name!r}]: contains NaN or Inf")
        if self.input_shapes is not None:
            if not isinstance(self.input_shapes, dict):
                raise UsageError("input_shapes: expected {input name: [dims]}")
            for name, dims in self.input_shapes.items():
                if isinstance(dims, str) or not hasattr(dims, "__iter__") or not all(
                        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims):
                    raise UsageError(f"input_shapes[{name!r}]: expected positive whole dims such as [1, 3, 224, 224], got {dims!r}")
        if self.distill is not None:
            if not isinstance(self.distill, dict):
                raise UsageError("distill: expected a dict of onnx_tucker.distill.distill options ({} for its defaults)")
            from onnx_tucker.distill import distill

            allowed = set(inspect.signature(distill).parameters) - {"original", "compressed", "feeds", "trainable"}
            unknown = sorted(set(self.distill) - allowed)
            if unknown:
                raise UsageError(f"distill: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
            # their values too, before the compression runs (a bad seed used to surface as a ValueError after the refit)
            from onnx_tucker.distill import _check_args

            defaults = {k: p.default for k, p in inspect.signature(distill).parameters.items() if k in allowed}
            given = defaults | self.distill
            _check_args(*(given[k] for k in ("steps", "lr", "batch_size", "holdout", "temperature", "reconstruct_steps",
                                             "reconstruct_blocks", "seed", "threads", "feature_weight")))


def _names(values, what: str, expected: str) -> tuple:
    """``values`` as a tuple of names (str, or int for a layer index), or a one-line error."""
    try:
        items = tuple(values)
    except TypeError:
        raise UsageError(f"{what}: expected a list of {expected}, got {type(values).__name__}") from None
    # numpy integers are indices too (exclude=np.array([1, 2]) was refused where ranks={np.int64(1): ...} was taken)
    items = tuple(int(v) if isinstance(v, np.integer) else v for v in items)
    bad = [v for v in items if not isinstance(v, (str, int)) or isinstance(v, (bool, np.bool_))]
    if bad:
        raise UsageError(f"{what}: expected a list of {expected}, got {bad[0]!r}")
    return items


def settings_of(opts: CompressOptions, report_decomposed: bool = True) -> dict:
    """The settings a report and the output's metadata record."""
    return {
        "rank_method": "target_macs" if opts.target_macs is not None else
                       "target_latency" if opts.target_latency is not None else opts.rank_method,
        "ratio": opts.ratio if opts.target_macs is None and opts.target_latency is None and opts.rank_method == "ratio" else None,
        "energy": opts.energy if opts.rank_method == "energy" and opts.target_macs is None and opts.target_latency is None else None,
        "target_macs": opts.target_macs,
        "target_latency": opts.target_latency,
        "calibration_samples": int(len(next(iter(opts.calibration.values())))) if opts.calibration else 0,
        "refit": (opts.refit or "none") if opts.calibration else None,
        "rank_multiple": opts.rank_multiple,
        "force": opts.force,
        # what else shaped the model: a distilled and an undistilled output recorded the same settings
        "forms": list(opts.forms) if opts.forms else None,
        "layers": list(opts.layers) if opts.layers else None,
        "fold_affine": opts.fold_affine,
        "distill": None if opts.distill is None else {k: v for k, v in opts.distill.items() if isinstance(v, (int, float, str, bool))},
        # and the rest of what changes the written model: two different models recorded the same settings without them
        "budget_rule": opts.budget_rule if opts.target_macs is not None else None,
        "probes": ("all" if opts.target_latency is not None else opts.probes)  # the latency knapsack probes every option
                  if opts.calibration and (opts.target_macs is not None or opts.target_latency is not None) else None,
        "probe_images": opts.probe_images if opts.calibration and (opts.target_macs is not None or opts.target_latency is not None) else None,
        "exclude": [str(e) for e in opts.exclude] or None,
        "prune_share": opts.prune_share,
        "ranks": {str(k): list(v) for k, v in opts.ranks.items()} or None,
        "iterations": opts.n_iter_max,
        "method": opts.method,
    }


# --- argument groups shared by the commands --------------------------------------------------------

def _type(check, *args):
    """An argparse ``type`` from a checker (its UsageError becomes the one-line usage error)."""
    return lambda text: check(text, *args)


class RankArgs:
    """Ranks: the rule, rounding and which layers to leave whole."""

    @staticmethod
    def add(parser, ratio: bool = True) -> None:
        from onnx_tucker.ranks import check_energy, parse_rank_spec

        if ratio:
            parser.add_argument("--ratio", type=_type(check_ratio), default=None,
                                help="rank ratio R in (0, 1]: R_in=int(R*C_in), R_out=int(R*C_out) (default 0.5)")
        parser.add_argument("--force", action="store_true", help="decompose every eligible conv, even where MACs would not fall")
        parser.add_argument("--exclude", action="append", default=None, metavar="LAYERS",
                            help="comma-separated conv names or 0-based indices to leave alone (e.g. 0 for the first conv; "
                            "may be repeated)")
        parser.add_argument("--ranks", action="append", type=_type(parse_rank_spec), default=None, metavar="NAME=R[,R]",
                            help="this layer's ranks, used as given (repeat for more layers; NAME or a 0-based index as in "
                            "inspect): R_out,R_in for Tucker-2, K for spatial SVD, R for an SVD; the rule picks the rest")
        parser.add_argument("--rank-multiple", type=_type(check_rank_multiple, "--rank-multiple"), default=1, metavar="N|auto",
                            help=RANK_MULTIPLE_HELP)
        parser.add_argument("--rank-method", choices=RANK_METHODS, default="ratio",
                            help="per-layer rank rule: ratio (R*C, default), energy (keep a fraction --energy of each "
                            "channel unfolding's squared singular values) or vbmf (EVBMF estimate, Kim et al. 2016)")
        parser.add_argument("--energy", type=lambda t: _energy(t, check_energy), default=None, metavar="F",
                            help="fraction of spectral energy kept by --rank-method energy, in (0, 1] (default 0.9)")
        parser.add_argument("--iterations", type=_type(check_count, "--iterations"), default=None, metavar="N",
                            help=f"HOOI iterations after the SVD start (default {DEFAULT_ITERATIONS})")
        parser.add_argument("--method", choices=METHODS, default="eig",
                            help="decomposition routine (default: eig, our fast HOOI; tensorly: partial_tucker)")
        add_layers_argument(parser)
        parser.add_argument("--no-fold", action="store_true",
                            help="keep a Mul/Add (BatchNorm after a ReLU) that feeds a chain as it is, instead of folding it "
                            "exactly into the chain's first 1x1 conv")
        add_forms_argument(parser)

    @staticmethod
    def parse(args) -> dict:
        if args.energy is not None and args.rank_method != "energy":
            raise UsageError("--energy only applies with --rank-method energy")
        options = {"force": args.force, "rank_multiple": args.rank_multiple, "method": args.method,
                   "rank_method": args.rank_method, "energy": 0.9 if args.energy is None else args.energy}
        if getattr(args, "ratio", None) is not None:
            # a flag that changes nothing is an error (README: "a flag given where it has no effect")
            for flag, value in (("--target-macs", getattr(args, "target_macs", None)),
                                ("--target-latency", getattr(args, "target_latency", None))):
                if value is not None:
                    raise UsageError(f"--ratio has no effect with {flag}, which chooses every layer's ranks: give one of the two")
            if args.rank_method != "ratio":
                raise UsageError(f"--ratio has no effect with --rank-method {args.rank_method}")
            options["ratio"] = args.ratio
        if args.exclude:  # every --exclude counts (a repeated flag kept only the last one)
            options["exclude"] = tuple(dict.fromkeys(e.strip() for given in args.exclude for e in given.split(",") if e.strip()))
        if args.ranks:
            names = [name for name, _ in args.ranks]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise UsageError(f"--ranks gives {', '.join(twice)} more than once")
            options["ranks"] = dict(args.ranks)
        if args.iterations is not None:
            options["n_iter_max"] = args.iterations
        if args.no_fold:
            options["fold_affine"] = False
        if args.layers is not None:
            options["layers"] = parse_layers(args.layers)
        if args.forms is not None:
            options["forms"] = parse_forms(args.forms)
        return options


def _energy(text, check_energy):
    try:
        return check_energy(text)
    except UsageError as exc:
        raise UsageError(f"--energy: {exc}") from None


def add_layers_argument(parser) -> None:
    """``--layers``: shared by compress, inspect and sweep."""
    parser.add_argument("--layers", default=None, metavar="KINDS",
                        help="which layers to factor: kxk (kxk convs, Tucker-2; the default), 1x1 (1x1 convs, SVD), "
                        "dense (Gemm/MatMul with a constant weight, SVD), e.g. kxk,1x1,dense; hidden prunes hidden channels "
                        "instead: of inverted residual blocks (1x1 -> depthwise -> 1x1, MobileNet), between two convs "
                        "(conv -> ReLU -> conv: a ResNet block, a VGG) and of a pooled classifier's last conv, refitted on "
                        "--calibrate data")


def add_prune_share_argument(parser) -> None:
    """``--prune-share``: shared by compress and sweep (``onnx_tucker.hybrid``)."""
    parser.add_argument("--prune-share", type=_type(check_share, "--prune-share"), default=None, metavar="S|auto",
                        help="with --layers hidden and another kind (e.g. hidden,kxk): how a MAC target T (--target-macs, "
                        "each of sweep's --targets) is split: pruning takes the conv MACs to T**S of the original, rank "
                        "cuts the rest (S in [0, 1]; default 0.5; auto: tries 0, 0.25, 0.5, 0.75 and 1 and keeps the "
                        "model whose outputs move least on the calibration images, about 4-5x the time)")


def add_forms_argument(parser) -> None:
    """``--forms``: shared by compress and inspect."""
    parser.add_argument("--forms", default=None, metavar="LIST",
                        help="factorizations to use: tucker2 (kxk convs, the default), svd (1x1 convs: two 1x1 convs), "
                        "spatial (kxk convs: kx1 -> 1xk), e.g. tucker2,svd; where two take the same layer (tucker2,spatial) "
                        "the measured budget picks one per layer; with a rank rule (--ratio) each layer gets the first form's MACs and the form "
                        "with the least error at them")


def parse_forms(text: str) -> tuple:
    """``--forms`` text -> registered form names (an unknown one is a one-line error)."""
    from onnx_tucker.factorization import get_form

    items = [f.strip() for f in text.split(",")]
    if not all(items):
        raise UsageError(f"--forms: expected comma-separated factorization names, got {text!r}")
    return tuple(get_form(f).name for f in items)


def parse_layers(text: str) -> tuple:
    """``--layers`` text -> kinds (checked against the known kinds by ``factorization.layer_plan``)."""
    from onnx_tucker.factorization import layer_plan

    items = [k.strip() for k in text.split(",")]
    if not all(items):
        raise UsageError(f"--layers: expected comma-separated kinds (kxk, 1x1, dense, hidden), got {text!r}")
    layer_plan(tuple(items))  # an unknown kind is a usage error now, not after the data is loaded
    return tuple(items)


class BudgetArgs:
    """A MAC budget for the whole model."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--target-macs", type=_type(check_ratio, "--target-macs"), metavar="F",
                            help="choose per-layer ranks so the model's conv MACs are at most F x the original (e.g. 0.33)")
        parser.add_argument("--budget-rule", choices=BUDGET_RULES, default=None,
                            help="with --target-macs: 'measured' spends ranks by each layer's measured effect on the output "
                            "(needs --calibrate; the default with it), 'uniform' uses one ratio for all layers (default without)")
        parser.add_argument("--curves", metavar="FILE.json",
                            help="keep the measured budget's distortion curves in FILE: a later run on the same model and "
                            "calibration data reuses them at any --target-macs, and an interrupted run resumes")
        parser.add_argument("--probes", choices=("auto", "all"), default=None,
                            help="measured budget: 'auto' probes a few ranks per layer, predicts the rest from the layer's "
                            "output error and refines where the budget chooses (default); 'all' probes every rank (slower)")
        parser.add_argument("--probe-images", type=_type(_check_int, "--probe-images", 1, "a whole number >= 1"), default=None, metavar="N",
                            help="measured budget: held-out calibration images each probe runs on (default 128; at most a quarter "
                            "of the calibration set, fewer for inputs bigger than CIFAR's); more take longer in proportion "
                            "and make the allocation steadier across calibration subsets")

        add_prune_share_argument(parser)

    @staticmethod
    def parse(args) -> dict:
        if args.budget_rule is not None and args.target_macs is None:
            raise UsageError("--budget-rule only applies with --target-macs")
        budget = args.target_macs is not None or getattr(args, "target_latency", None) is not None
        # the measured budget's own flags: a uniform budget measures nothing (it bisects one ratio)
        measured = budget and getattr(args, "calibrate", None) and args.budget_rule != "uniform"
        for flag, value in (("--curves", args.curves), ("--probes", args.probes), ("--probe-images", getattr(args, "probe_images", None))):
            if value is not None and not measured:
                raise UsageError(f"{flag} only applies with --target-macs and --calibrate (the measured budget)"
                                 + (", not with --budget-rule uniform" if args.budget_rule == "uniform" else ""))
        if not budget:
            return {} if args.prune_share is None else {"prune_share": args.prune_share}  # refused with its reason
        options = {"target_macs": args.target_macs, "budget_rule": args.budget_rule or "auto"} if args.target_macs is not None else {}
        if args.prune_share is not None:
            options["prune_share"] = args.prune_share
        if args.probes is not None:
            options["probes"] = args.probes
        if getattr(args, "probe_images", None) is not None:
            options["probe_images"] = args.probe_images
        if args.curves is not None:
            options["curves"] = check_cache_file(args.curves, "--curves")
        return options


class RayArgs:
    """Fan the independent work out over a Ray cluster (needs ``pip install 'onnx-tucker[ray]'``)."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--ray", metavar="ADDRESS|auto",
                            help="fan the independent work out as Ray tasks (compress: the measured budget's curves, one task per "
                            "layer; sweep: one task per setting): 'auto' (this machine's Ray cluster, or a new local one on its CPUs) "
                            "or a cluster's head address, e.g. HEAD:6379 (README 'Many machines'); the results are the same as without")

    @staticmethod
    def parse(args, needs_measured: bool = True) -> dict:
        if args.ray is None:
            return {}
        if needs_measured and (getattr(args, "target_macs", None) is None or not getattr(args, "calibrate", None)
                               or getattr(args, "budget_rule", None) == "uniform"):
            raise UsageError("--ray only applies with --target-macs and --calibrate (the measured budget's curves)")
        from onnx_tucker.fanout import require_ray, check_address

        address = check_address(args.ray)
        require_ray()  # a missing ray is a usage error now, before any work
        return {"ray": address}


class CalibrationArgs:
    """Data-aware compression from TRAINING samples."""

    @staticmethod
    def add(parser, refit: bool = True) -> None:
        parser.add_argument("--calibrate", metavar="TRAIN.npz|DIR",
                            help="data-aware decomposition from calibration inputs: an .npz of TRAINING data (x_train, by input name, "
                            "or one array) or a folder of JPEG/PNG images (recursive; resized to the model's input)")
        parser.add_argument("--image-scale", default=None, metavar="F",
                            help="with --calibrate DIR: pixel values (0..255) times F, e.g. 1/255 (default 1: raw pixels)")
        parser.add_argument("--image-mean", default=None, metavar="LIST",
                            help="with --calibrate DIR: per-channel mean subtracted after scaling (default 0)")
        parser.add_argument("--image-std", default=None, metavar="LIST",
                            help="with --calibrate DIR: per-channel std divided by after the mean (default 1)")
        parser.add_argument("--calib-size", type=_type(check_positive_int, "--calib-size"), default=None, metavar="N",
                            help=f"calibration samples, a seeded random subset (default {DEFAULT_CALIB_SIZE}; all of a smaller file, with a note)")
        if refit:  # sweep always refits as compress does by default: it has no --refit
            parser.add_argument("--refit", choices=REFITS, default=None,
                                help="with --calibrate: refit the core by reduced-rank regression and then the last 1x1 conv "
                                "(default), only the last 1x1 conv, or none")

    @staticmethod
    def parse(args, model, data_path: str | None = None, say=None, input_shapes: dict | None = None) -> dict:
        """Loads the calibration samples (one line on stderr when the file holds fewer than asked)."""
        image_flags = (("--image-scale", args.image_scale), ("--image-mean", args.image_mean), ("--image-std", args.image_std))
        if not args.calibrate:
            for flag, value in (("--refit", getattr(args, "refit", None)), ("--calib-size", args.calib_size)) + image_flags:
                if value is not None:
                    raise UsageError(f"{flag} only applies with --calibrate")
            return {}
        from pathlib import Path

        from onnx_tucker.data import MIN_CALIB_SAMPLES, load_calibration

        if data_path and Path(args.calibrate).resolve() == Path(data_path).resolve():
            raise UsageError("--calibrate and --data are the same file: calibrate on training data, measure on test data")
        size = args.calib_size or DEFAULT_CALIB_SIZE
        if Path(args.calibrate).is_dir():
            from onnx_tucker.images import parse_image_flags, stream_image_folder

            calibration = stream_image_folder(  # decoded batch by batch as the loops take them
                args.calibrate, model, size, input_shapes=input_shapes,
                **parse_image_flags(args.image_scale, args.image_mean, args.image_std))
            stream = next(iter(calibration.values()))
            count = len(stream)
            if count < MIN_CALIB_SAMPLES:
                from onnx_tucker.errors import DataError

                raise DataError(f"{args.calibrate} holds {count} images, fewer than the {MIN_CALIB_SAMPLES} a calibration needs")
            if stream.distinct is not None and stream.distinct < MIN_CALIB_SAMPLES:  # as a .npz file's samples are checked
                from onnx_tucker.errors import DataError

                raise DataError(f"{args.calibrate} gives {count} images ({stream.distinct} distinct files): a data-aware fit needs "
                                f"at least {MIN_CALIB_SAMPLES} distinct samples")
        else:
            for flag, value in image_flags:
                if value is not None:
                    raise UsageError(f"{flag} only applies to --calibrate with an image folder")
            calibration = load_calibration(args.calibrate, model, size=size, strict_size=False, min_samples=MIN_CALIB_SAMPLES)
        got = len(next(iter(calibration.values())))
        if got < size and say is not None:
            say(f"note: {args.calibrate} holds {got} calibration samples, fewer than the {size} asked for: using all {got}")
        refit = getattr(args, "refit", None) or "core"
        return {"calibration": calibration, "refit": False if refit == "none" else refit}


class DistillArgs:
    """Label-free distillation after compressing (needs torch: pip install 'onnx-tucker[distill]')."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--distill", action="store_true",
                            help="train the new factors so the compressed model's outputs match the original's on the "
                            "--calibrate inputs (no labels; a held-out part decides whether the result is kept)")
        parser.add_argument("--distill-steps", type=_type(check_count, "--distill-steps"), default=None, metavar="N",
                            help="training steps of the global loss (default: measured, see docs/distill.md); 0: the "
                            "local reconstruction alone")
        parser.add_argument("--distill-lr", type=lambda t: check_tolerance(t, "--distill-lr", 1e-8, 1.0), default=None, metavar="LR",
                            help="Adam learning rate (default: measured, see docs/distill.md)")
        parser.add_argument("--distill-batch", type=_type(check_positive_int, "--distill-batch"), default=None, metavar="N",
                            help="inputs per step of the global loss (default 64); fewer hold less memory on big models "
                            "(ResNet50 at 224 px: about 10 GB at 64)")
        parser.add_argument("--reconstruct-steps", type=_type(check_count, "--reconstruct-steps"), default=None, metavar="N",
                            help="before distilling, fit each chain (or residual block) alone to the original's activated "
                            "output, N steps each; 0: off (default: measured, see docs/distill.md)")
        parser.add_argument("--reconstruct-blocks", type=_type(check_positive_int, "--reconstruct-blocks"), default=None, metavar="N",
                            help="residual blocks in a row reconstructed as one, fitted to the last one's output "
                            "(default: measured, see docs/distill.md); 1: each block alone")
        parser.add_argument("--no-augment", action="store_true", help="no flips or shifts of image inputs while distilling")
        parser.add_argument("--distill-device", choices=("cpu", "cuda"), default=None, help="torch device (default cpu)")

    @staticmethod
    def parse(args) -> dict:
        extras = (("--distill-steps", args.distill_steps), ("--distill-lr", args.distill_lr), ("--distill-batch", args.distill_batch),
                  ("--distill-device", args.distill_device), ("--no-augment", args.no_augment or None),
                  ("--reconstruct-steps", args.reconstruct_steps), ("--reconstruct-blocks", args.reconstruct_blocks))
        if not args.distill:
            for flag, value in extras:
                if value is not None:
                    raise UsageError(f"{flag} only applies with --distill")
            return {}
        if not args.calibrate:
            raise UsageError("--distill needs --calibrate: it trains on those inputs (no labels)")
        settings = {}
        if args.distill_steps == 0 and args.reconstruct_steps == 0:
            raise UsageError("--distill-steps 0 with --reconstruct-steps 0 leaves nothing to train")
        if args.distill_steps is not None:
            settings["steps"] = args.distill_steps
        if args.distill_lr is not None:
            settings["lr"] = args.distill_lr
        if args.distill_batch is not None:
            if args.distill_steps == 0:
                raise UsageError("--distill-batch only applies with the global loss (--distill-steps is 0)")
            settings["batch_size"] = args.distill_batch
        if args.distill_device is not None:
            settings["device"] = args.distill_device
        if args.no_augment:
            settings["augment"] = False
        if args.reconstruct_steps is not None:
            settings["reconstruct_steps"] = args.reconstruct_steps
        if args.reconstruct_blocks is not None:
            if args.reconstruct_steps == 0:
                raise UsageError("--reconstruct-blocks only applies with reconstruction (--reconstruct-steps is 0)")
            settings["reconstruct_blocks"] = args.reconstruct_blocks
        return {"distill": settings}


CACHE_SCHEMAS = {"--curves": "onnx-tucker.curves/", "--latency-table": "onnx-tucker.latency-table/"}
CACHE_SCHEMAS |= {"curves": CACHE_SCHEMAS["--curves"], "latency_table": CACHE_SCHEMAS["--latency-table"]}  # the API's names


def check_cache_file(text: str, flag: str) -> str:
    """A cache file the tool reads and rewrites (``--curves``, ``--latency-table``): a new one in an existing folder,
    an empty file, or one this tool wrote (any version of its schema). Anything else would be overwritten: refused."""
    from pathlib import Path

    path = Path(text)
    if path.is_symlink():  # renaming over it would replace the link; writing through it, what it points to
        raise UsageError(f"{flag}: {path} is a symbolic link: give the file itself")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag}: {path} exists and is not a regular file")
    if not path.parent.is_dir():
        raise UsageError(f"{flag}: folder does not exist: {path.parent}")
    check_own_cache(path, flag)
    return str(path)


def check_own_cache(path, flag: str) -> dict | None:
    """Refuse to rewrite a non-empty file that is not this tool's ``flag`` cache (a model, notes, another tool's JSON).
    Returns the file's parsed content (None for a new or empty file)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        data = None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not (isinstance(schema, str) and schema.startswith(CACHE_SCHEMAS[flag])):
        raise UsageError(f"{flag}: {path} is not an onnx-tucker {flag.lstrip('-')} file and would be overwritten: "
                         "give a new path (or delete the file)")
    return data


RANK_MULTIPLE_HELP = ("round ranks to multiples of N, or auto: the largest of 1, 4, 8, 16 whose rounded-up ranks cost no time on "
                      "--provider (measured on the two largest layers, cached)")
PROVIDER_HELP = ("execution provider the latencies are measured on: cpu (default), cuda, tensorrt; also what "
                 "'--rank-multiple auto' measures on")
LATENCY_BATCH_HELP = "batch size of the latency measurements (default 1, or the batch a fixed-batch model is exported for)"
LATENCY_TABLE_HELP = ("per-layer latency cache (default ~/.cache/onnx-tucker/latency.json): a rerun on the same "
                      "provider, device, onnxruntime, batch and shapes measures nothing")


class MultipleArgs:
    """``--rank-multiple N|auto`` and where "auto" measures (inspect, sweep); compress has the full LatencyArgs."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--rank-multiple", type=_type(check_rank_multiple, "--rank-multiple"), default=1, metavar="N|auto",
                            help=RANK_MULTIPLE_HELP)
        parser.add_argument("--provider", default=None, metavar="NAME", help=PROVIDER_HELP)
        parser.add_argument("--latency-batch", type=_type(check_positive_int, "--latency-batch"), default=None, metavar="N",
                            help=LATENCY_BATCH_HELP)
        parser.add_argument("--latency-table", default=None, metavar="FILE.json", help=LATENCY_TABLE_HELP)

    @staticmethod
    def parse(args) -> dict:
        """{"provider", "batch", "table"} when the multiple is "auto", else {} (a measuring flag without it is an error)."""
        if args.rank_multiple != "auto":
            for flag, value in (("--provider", args.provider), ("--latency-batch", args.latency_batch), ("--latency-table", args.latency_table)):
                if value is not None:
                    raise UsageError(f"{flag} only applies with --rank-multiple auto")
            return {}
        from onnx_tucker.providers import require

        table = check_cache_file(args.latency_table, "--latency-table") if args.latency_table is not None else None
        # batch None: the model's own (a fixed-batch export runs no other), else 1; the command fills it in once it loads the model
        return {"provider": require(args.provider or "cpu").key, "batch": args.latency_batch, "table": table}


class LatencyArgs:
    """Latency-aware compression."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--latency-aware", action="store_true",
                            help="time each layer and its chain alone on --provider (interleaved) and leave whole those whose chain "
                            "is not faster; the table shows both times")
        parser.add_argument("--target-latency", type=_type(check_ratio, "--target-latency"), metavar="F",
                            help="with --calibrate: choose per-layer ranks so the predicted whole-model latency on --provider is at "
                            "most F x the original's (measured per-layer times against measured distortion); reports predicted "
                            "and measured latency")
        parser.add_argument("--latency-batch", type=_type(check_positive_int, "--latency-batch"), default=None, metavar="N",
                            help=LATENCY_BATCH_HELP)
        parser.add_argument("--provider", default=None, metavar="NAME", help=PROVIDER_HELP)
        parser.add_argument("--latency-table", default=None, metavar="FILE.json", help=LATENCY_TABLE_HELP)

    @staticmethod
    def parse(args) -> dict:
        target = getattr(args, "target_latency", None)
        auto = getattr(args, "rank_multiple", None) == "auto"
        measuring = args.latency_aware or target is not None or auto
        for flag, value in (("--latency-batch", args.latency_batch), ("--provider", args.provider),
                            ("--latency-table", args.latency_table)):
            if value is not None and not measuring:
                raise UsageError(f"{flag} only applies with --latency-aware, --target-latency or --rank-multiple auto")
        if target is not None:
            if getattr(args, "target_macs", None) is not None:
                raise UsageError("give one budget: --target-macs or --target-latency, not both")
            if not getattr(args, "calibrate", None):
                raise UsageError("--target-latency needs --calibrate (it spends latency against measured distortion)")
        if not measuring:
            return {}
        options = {"latency_batch": args.latency_batch or 1}
        if args.latency_aware:
            options["latency_aware"] = True
        if target is not None:
            options["target_latency"] = target
        if args.provider is not None:
            from onnx_tucker.providers import require

            options["provider"] = require(args.provider).key
        if args.latency_table is not None:
            options["latency_table"] = check_cache_file(args.latency_table, "--latency-table")
        return options


def add_input_shape_argument(parser) -> None:
    """``--input-shape [NAME:]DIMS`` (repeatable), for models with dynamic input sizes: one meaning in every command."""
    parser.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS",
                        help="fixed dims for an input with dynamic sizes, e.g. 1x3x224x224 (repeatable): the size MACs are "
                        "counted at and random inputs are drawn at (compress's default: the size of its --calibrate, --data "
                        "or --inputs arrays); a written model keeps its dynamic dims")


def parse_input_shapes(items: list[str] | None, inputs) -> dict | None:
    """``--input-shape [NAME:]1x3x224x224`` (repeatable) -> {name: [dims]}; the name may be left out for a single-input
    model. ``inputs``: the model's graph inputs (``runtime.graph_inputs``), whose known dims the given ones must match
    (a 3-channel NHWC model given 1x3x224x224 is refused here, not computed at the wrong size); or just their names."""
    if not items:
        return None
    input_names = [item if isinstance(item, str) else item.name for item in inputs]
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition(":")
        if not name:
            if len(input_names) != 1:
                raise UsageError(f"--input-shape {item!r}: name the input (NAME:DIMS), the model has inputs {', '.join(input_names)}")
            name = input_names[0]
        if name not in input_names:
            raise UsageError(f"--input-shape: the model has no input {name!r} (inputs: {', '.join(input_names)})")
        parts = dims.replace(",", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--input-shape {item!r}: expected dims like 1x3x224x224") from None
        if not values or min(values) < 1:
            raise UsageError(f"--input-shape {item!r}: expected positive dims like 1x3x224x224")
        shapes[name] = values
    check_input_shapes(shapes, inputs, "--input-shape")
    return shapes


def check_input_shapes(shapes: dict | None, inputs, what: str = "input_shapes") -> None:
    """Each of ``shapes`` ({input: dims}) names a graph input of ``inputs`` (``runtime.graph_inputs``) and fits
    its known dims: else a UsageError, before any work."""
    if not shapes:
        return
    known = {}
    for item in inputs:
        if isinstance(item, str):
            known[item] = None
        else:
            dims = item.type.tensor_type.shape.dim
            known[item.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    for name, values in shapes.items():
        if name not in known:
            raise UsageError(f"{what}: the model has no input {name!r} (inputs: {', '.join(known)})")
        model_dims = known[name]
        values = list(values)
        if model_dims is not None and (len(values) != len(model_dims) or any(d and d != v for d, v in zip(model_dims, values))):
            shown = "x".join("?" if d is None else str(d) for d in model_dims)
            given = "x".join(map(str, values))
            raise UsageError(f"{what} {given} does not fit input {name!r} ({shown})")


class CheckArgs:
    """The self-check of the output (onnxruntime, CPU): what it runs on and when it fails."""

    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--inputs", metavar="FILE.npz", help="inputs for the self-check (one array per model input)")
        parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime self-check of the output")
        parser.add_argument("--check-batch", type=_type(check_positive_int, "--check-batch"), default=None, metavar="N",
                            help="batch size of the random self-check inputs (default 8)")
        parser.add_argument("--min-agreement", type=lambda t: check_tolerance(t, "--min-agreement", 0.0, 1.0), metavar="F",
                            help="FAILED when top-1 agreement with the original is below F (0..1)")
        parser.add_argument("--max-rel-error", type=lambda t: check_tolerance(t, "--max-rel-error"), metavar="E",
                            help="FAILED when any output's relative error ||a-b||/||a|| is above E")
        parser.add_argument("--keep-failed", action="store_true", help="write the output even when the self-check FAILS (still exit 1)")
        add_input_shape_argument(parser)

    @staticmethod
    def parse(args) -> dict:
        if args.no_check:
            for flag, value in (("--min-agreement", args.min_agreement), ("--max-rel-error", args.max_rel_error),
                                ("--check-batch", args.check_batch), ("--inputs", args.inputs)):
                if value is not None:
                    raise UsageError(f"{flag} has no effect with --no-check")
        if args.check_batch is not None:  # the batch of the random inputs, which --inputs and --data replace
            given = next((flag for flag, value in (("--inputs", args.inputs), ("--data", getattr(args, "data", None))) if value), None)
            if given:
                raise UsageError(f"--check-batch has no effect with {given}: the self-check runs on its samples")
        return {"min_agreement": args.min_agreement, "max_rel_error": args.max_rel_error,
                "check_batch": args.check_batch or 8, "keep_failed": args.keep_failed}


class DataArgs:
    """Labelled test data for top-1."""

    @staticmethod
    def add(parser, required: bool = False) -> None:
        parser.add_argument("--data", required=required, metavar="FILE.npz",
                            help="labelled data (x_test/y_test or x/y): report top-1 of the models")
        parser.add_argument("--data-limit", type=_type(check_positive_int, "--data-limit"), metavar="N",
                            help="use a seeded random subset of N labelled samples")

    @staticmethod
    def parse(args) -> dict:
        if args.data_limit is not None and not args.data:
            raise UsageError("--data-limit only applies with --data")
        return {}


class RuntimeArgs:
    """onnxruntime sessions for timing: providers, threads, batches."""

    @staticmethod
    def add(parser, batch_default: str = "1", providers: bool = True, runs_default: int = 100) -> None:
        if providers:
            parser.add_argument("--providers", metavar="LIST",
                                help="comma-separated execution providers (see `onnx-tucker bench --help`; default: every one available; "
                                "a named one that is missing is an error)")
        parser.add_argument("--batch", default=batch_default, metavar="LIST", help=f"comma-separated batch sizes (default {batch_default})")
        parser.add_argument("--threads", type=_type(check_positive_int, "--threads"), default=min(2, os.cpu_count() or 1), metavar="N",
                            help="intra-op threads per session (default 2, or fewer CPUs)")
        parser.add_argument("--runs", type=_type(check_positive_int, "--runs"), default=runs_default, metavar="N",
                            help=f"timed interleaved runs per model (default {runs_default})")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    @staticmethod
    def parse(args) -> dict:
        from onnx_tucker.providers import parse_providers

        return {
            "providers": parse_providers(args.providers) if getattr(args, "providers", None) is not None else None,
            "batches": check_int_list(args.batch, "--batch"),
        }

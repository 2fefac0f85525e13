"""Data-aware Tucker from calibration activations (captured with onnxruntime).

Two tools, both measured in docs/calibration.md:
- ``input_covariances``: second moment of each conv's input channels on the
  original model, used by ``decompose.tucker2`` to whiten the input mode.
- ``refit_last_convs``: layer after layer in graph order, a least-squares refit of
  each chain's last 1x1 conv (weight and bias) so that, fed the *compressed*
  model's own activations, it reproduces the *original* layer's output: each layer
  corrects what the earlier ones changed.
"""
from __future__ import annotations

import time
from contextlib import closing

import numpy as np
import onnx
import scipy.linalg

from threadpoolctl import threadpool_limits

from onnx_tucker.capture import batch_for_bytes, batch_size_for, capture_named, fixed_batch, iterate
from onnx_tucker.errors import DataError
from onnx_tucker.graph import Initializers, constant_outputs, consumers, feeds_only_relu, nodes_by_name, prefix_model, with_outputs
from onnx_tucker.providers import fastest_available, probe_options
from onnx_tucker.runtime import make_session, worker_threads
from onnx_tucker.trace import log, timed
from onnx_tucker.site import GeometryError, conv_geometry

MAX_ROWS = 30_000
ROW_SPREAD = 4  # candidate positions per sampled row: the images a layer's rows come from hold >= 4 x MAX_ROWS positions
MIN_IMAGES = 512  # ... and are at least this many (128 calibration images in all ruined a refit: issue 12 finding)
MIN_ROWS_PER_UNKNOWN = 20
CORE_RIDGE = 1e-2  # the core refit shrinks towards the Tucker solution: it has many unknowns
CORE_RELU_ITERATIONS = 3  # majorize-minimize rounds of the core refit on the error a following ReLU lets through
# Alternating rounds of the spatial SVD chain's joint refit (both convs on the real rows; 0: the last conv only)
SPATIAL_JOINT_ROUNDS = 2  # ResNet-56 --ratio 0.5: 1 round -1.47, 2 -1.36, 4 -1.39 (0: -2.28), each ~4 s more
SPATIAL_JOINT_WORK = 2e11  # multiply-adds of its patch Gram matrix and solves per layer, above which it refits the last conv
# only: 256 channels x 3x3 on 30000 rows (1.6e11, ~10 s here) pass, 512 (6.4e11) do not
SPATIAL_CG_ITERATIONS = 20  # the preconditioned solve is within 1e-5 of its limit by then (ResNet-56, small ResNet)
BATCH = 64
COV_POSITIONS = 64  # spatial positions per sample for the input covariances
FLUSH_COLUMNS = 1024  # sampled positions buffered per tensor before their Gram product


def _session(model: onnx.ModelProto):
    """A session for the calibration passes (covariances, reference rows, the refit's forward segments):
    on the fastest provider, like the probes, with cuDNN's heuristic algorithm choice (``probe_options``)."""
    provider = fastest_available()
    return make_session(model, provider, provider_options=probe_options(provider))


def input_covariances(model: onnx.ModelProto, feeds: dict, tensor_names: list[str], seed: int = 0,
                      axes: dict[str, int] | None = None, batch_size: int = BATCH,
                      vertical: dict | None = None) -> dict:
    """Channel second moment E[x x^T] (over samples and positions) of each named NC... tensor
    (channels on ``axes[name]``: 1 by default, -1 for a dense layer's features).

    Estimated on at most ``COV_POSITIONS`` random positions per sample: plenty for a C x C
    moment, and it keeps calibration time flat in the image size. ``batch_size``: fewer samples a batch
    where every layer's input of a big model would not fit (``capture.batch_for_bytes``).

    ``vertical``: {key: (tensor, kh, stride, dilation, top pad, bottom pad)}: also, under each key, the
    (C*kh) x (C*kh) second moment of the NCHW tensor's vertical ``kh x 1`` patches, rows ordered (channel,
    tap): what a spatial SVD's first conv reads, neighbouring rows' correlation included. Same pass.
    """
    vertical = dict(vertical or {})
    names = list(dict.fromkeys(list(tensor_names) + [spec[0] for spec in vertical.values()]))
    exposed = with_outputs(model, names)
    session = _session(exposed)
    rng = np.random.default_rng(seed)
    sums = {n: None for n in list(names) + list(vertical)}
    counts = {n: 0 for n in sums}
    pending = {n: [] for n in sums}

    def flush(key):
        if pending[key]:
            x = np.concatenate(pending[key], axis=1) if len(pending[key]) > 1 else pending[key][0]
            pending[key] = []
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
                gram = (x @ x.T).astype(np.float64)  # float32 products, float64 sums across batches
            sums[key] = gram if sums[key] is None else sums[key] + gram

    def add(key, x):
        # columns buffered up to FLUSH_COLUMNS: a model fixed to batch 1 gives one column per image and a
        # 4096-wide layer then cost a 4096^2 product per image (88 s against 4 s for the same model batched)
        pending[key].append(x)
        counts[key] += x.shape[1]
        if sum(p.shape[1] for p in pending[key]) >= FLUSH_COLUMNS:
            flush(key)

    for _, values in iterate(session, feeds, names, batch_size_for(model, batch_size), fixed=fixed_batch(model) is not None):
        by_name = dict(zip(names, values))
        for name in dict.fromkeys(tensor_names):
            value = by_name[name]
            if (axes or {}).get(name, 1) != 1:
                value = np.moveaxis(value, (axes or {})[name], 1) if value.ndim > 2 else value
            flat = value.reshape(value.shape[0], value.shape[1], -1)
            if flat.shape[2] > COV_POSITIONS:
                flat = flat[:, :, rng.choice(flat.shape[2], COV_POSITIONS, replace=False)]
            add(name, np.moveaxis(flat, 1, 0).reshape(value.shape[1], -1).astype(np.float32, copy=False))
        for key, (name, *geometry) in vertical.items():
            add(key, _vertical_patches(by_name[name], *geometry, rng=rng))
    for key in sums:
        flush(key)
        if sums[key] is not None and not np.isfinite(sums[key]).all():
            tensor = vertical[key][0] if key in vertical else key
            raise DataError(f"the calibration data overflows the statistics at tensor '{tensor}' (float32 products): "
                            "the inputs are far larger than the model expects; check their scale (--image-scale, --image-std)")
    return {n: sums[n] / max(counts[n], 1) for n in sums if sums[n] is not None}


def _vertical_patches(value: np.ndarray, kh: int, stride: int, dilation: int, top: int, bottom: int, rng) -> np.ndarray:
    """(C*kh, samples*positions): the ``kh x 1`` patches a conv with these vertical geometry reads (zeros where it
    reads the padding) at up to ``COV_POSITIONS`` random output positions, rows ordered (channel, tap)."""
    n, c, height, width = value.shape
    rows = (height + top + bottom - dilation * (kh - 1) - 1) // stride + 1
    picked = rng.choice(rows * width, min(COV_POSITIONS, rows * width), replace=False)
    row, column = np.divmod(picked, width)
    taps = row[None, :] * stride - top + (np.arange(kh) * dilation)[:, None]  # (kh, positions), in the unpadded map
    inside = (taps >= 0) & (taps < height)
    # gathered from the map itself, zero where a tap falls in the padding (padding the batch copied it whole per layer)
    patches = value[:, :, np.clip(taps, 0, height - 1), column[None, :]]  # (N, C, kh, positions)
    patches = np.where(inside, patches, np.zeros((), patches.dtype))
    return np.moveaxis(patches.reshape(n, c * kh, -1), 1, 0).reshape(c * kh, -1).astype(np.float32, copy=False)


def _flat(value: np.ndarray, axis: int = 1) -> np.ndarray:
    """(N, C, spatial...) with channels on ``axis`` -> (rows, C), rows ordered sample-major."""
    return np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])


# A chain whose output goes only into a residual Add is fitted to what the Add must give (the original
# Add's output less the compressed model's other branch), so that each block also cancels the error
# that earlier blocks pass down the shortcut, instead of reproducing its own conv alone.
RESIDUAL_TARGET = True


def residual_merge(model: onnx.ModelProto, tensor: str) -> tuple[str, str] | None:
    """(the Add's output, its other input) when ``tensor``'s only consumer is an Add of two computed
    tensors (not a constant: that is a bias), else None."""
    users = consumers(model, tensor)
    if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2 or tensor in {o.name for o in model.graph.output}:
        return None
    add = users[0]
    constants = {i.name for i in model.graph.initializer} | set(constant_outputs(model))
    other = [t for t in add.input if t != tensor]
    if len(other) != 1 or other[0] in constants:
        return None
    return add.output[0], other[0]


def refit_chains(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict, chains: list,
                 ridge: float = 1e-6, seed: int = 0, mode: str = "last", relu_aware: bool = True,
                 residual: bool | None = None) -> dict:
    """Sequential least-squares refit of each chain's last node; edits ``compressed`` (and ``chains``) in place.

    ``mode="last"`` refits the last 1x1 conv and bias; ``mode="core"`` also refits the core by
    reduced-rank regression, for forms that have one, where there are enough calibration rows.
    ``residual`` (default ``RESIDUAL_TARGET``): a chain that feeds a residual Add is fitted to the
    original Add's output less the compressed model's other Add input (``residual_merge``).
    Returns per-layer output errors (relative, on the calibration rows) before and after.
    """
    start = time.perf_counter()
    nodes = nodes_by_name(compressed)
    inits = Initializers(compressed)
    chains = [c for c in chains if c.nodes.get(c.last_role) in nodes]
    n = len(next(iter(feeds.values())))
    residual = RESIDUAL_TARGET if residual is None else residual
    outputs = {c.output for c in chains}
    merges = {c.output: m for c in chains if residual and (m := residual_merge(compressed, c.output)) is not None and m[0] not in outputs}
    with timed(f"refit: the original's rows at {len(chains)} layers"):
        picks, images, per_image, target_rows = _reference_rows(original, feeds, chains, seed, {k: m[0] for k, m in merges.items()})
    # The compressed model runs forward once over the images any layer's rows come from, a segment per
    # chain (issue 15: one prefix pass per chain cost a ResNet50 ~26 whole passes).
    chosen = np.unique(np.concatenate([images[c.output] for c in chains])) if chains else np.arange(0)
    forward = _Forward(compressed, feeds if len(chosen) == n else {k: v[chosen] for k, v in feeds.items()}, chosen)
    result = {"layers": {}, "samples": int(n)}
    # relu_solve's many small per-channel solves go side by side on threads (_each_channel).
    position = {nd.name: i for i, nd in enumerate(compressed.graph.node)}

    def refits_core(chain) -> bool:
        # The core refit has R_in*k*k unknowns per output channel: with too few calibration
        # rows (late layers with small feature maps) it over-fits, so refit only the last conv.
        last, core = nodes[chain.nodes[chain.last_role]], nodes.get(chain.nodes.get("core", ""))
        return (mode == "core" and core is not None and core.name != last.name and _is_2d_conv(core)
                and len(picks[chain.output]) >= MIN_ROWS_PER_UNKNOWN * _core_unknowns(core, inits))

    def refits_spatial(chain) -> bool:  # both convs of a spatial SVD chain, fitted together (_refit_spatial)
        return (mode == "core" and SPATIAL_JOINT_ROUNDS > 0 and chain.form == "spatial" and chain.nodes.get("first") in nodes
                and _is_2d_conv(nodes[chain.nodes["first"]]) and _spatial_last(nodes[chain.nodes[chain.last_role]]))

    def first_change(chain) -> int:  # where the chain's refit first changes a weight: its core or first node, or its last node
        if refits_spatial(chain):
            return position[chain.nodes["first"]]
        return position[chain.nodes["core"] if refits_core(chain) else chain.nodes[chain.last_role]]
    # In the compressed graph's order, so the forward pass never has to go back (a ResNet's shortcut conv
    # is a later site than its block's first conv but comes first in the graph). Only independent branches
    # swap places, so every chain still sees the same earlier refits.
    order = sorted(chains, key=first_change)
    merged_into = {}
    forward_seconds, solves_start = [0.0], time.perf_counter()
    # One BLAS thread throughout: threaded BLAS (solve, eigh, X.T @ X) rounds differently on each thread count, and
    # a model must be the same bytes on every machine; it also made ResNet-20's refit 15 % slower on 2 cores.
    with threadpool_limits(limits=1, user_api="blas"), closing(target_rows):
        for chain in order:
            last = nodes[chain.nodes[chain.last_role]]
            core_node = nodes.get(chain.nodes.get("core", ""))
            target = target_rows[chain.output].astype(np.float64)
            pick = picks[chain.output]  # flat positions within the chain's chosen images

            def collect(tensor, node):  # the tensor, computed with every earlier refit in place
                begun = time.perf_counter()
                try:
                    return forward.value(tensor, node, images[chain.output], per_image[chain.output])
                finally:
                    forward_seconds[0] += time.perf_counter() - begun
            relu = relu_aware and feeds_only_relu(compressed, chain.output)
            offset = None
            core_path = refits_core(chain)
            spatial_path = refits_spatial(chain)
            cut = nodes[chain.nodes["first"]] if spatial_path else core_node if core_path else last
            if chain.output in merges:  # the other branch, where it is already computed at the refit's cut
                found = forward.peek(merges[chain.output][1], cut, images[chain.output], per_image[chain.output])
                if found is not None:
                    other, mapper = found
                    rows = _picked_rows(other, mapper(pick), chain.channel_axis)
                    if rows.shape == target.shape:
                        target = target_rows[merges[chain.output][0]].astype(np.float64) - rows
                        merged_into[chain.output] = merges[chain.output][0]
                        # the ReLU after the Add sees this chain's output plus the other branch
                        if relu_aware and feeds_only_relu(compressed, merges[chain.output][0]):
                            relu, offset = True, rows.astype(np.float64)
            if spatial_path:
                first = nodes[chain.nodes["first"]]
                f, f_pick = collect(first.input[0], first)
                layer = _refit_spatial(chain, first, last, inits, f, f_pick(pick), target, ridge, relu, offset)
                if layer is not None:
                    result["layers"][chain.layer] = layer
                    continue
                # too few rows, too costly or another geometry: the last conv alone, on the first conv's real output
            if (core_node is not None and core_node.name == last.name) or _spatial_last(last):  # the output comes from a kxk (or 1xk) conv
                result["layers"][chain.layer] = _refit_kxk_last(compressed, chain, last, inits, collect, pick, target, ridge, relu, offset)
                continue
            if core_path:
                f, f_pick = collect(core_node.input[0], core_node)
                geometry = _core_geometry(core_node, inits, f.shape[2:])
                if geometry is not None:
                    result["layers"][chain.layer] = _refit_core_and_last(compressed, chain, core_node, last, inits, f, f_pick(pick), target,
                                                                         geometry, ridge, relu, offset)
                    continue
            z, z_pick = collect(last.input[0], last)
            z = _picked_rows(z, z_pick(pick), chain.channel_axis).astype(np.float64)
            result["layers"][chain.layer] = _refit_last(chain, last, inits, z, target, ridge, relu=relu, offset=offset)
    log.info("refit: forward passes %.1f s, solves %.1f s", forward_seconds[0], time.perf_counter() - solves_start - forward_seconds[0])
    for chain in order:  # say which refits aimed at a residual Add's output
        if chain.layer in result["layers"] and chain.output in merged_into:
            result["layers"][chain.layer]["target"] = f"residual Add '{merged_into[chain.output]}' less its other input"
    result["layers"] = {c.layer: result["layers"][c.layer] for c in chains if c.layer in result["layers"]}  # site order
    result["capture"] = "one forward pass, a segment per chain" if forward.usable else "a prefix model per chain"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _reference_rows(original, feeds: dict, chains: list, seed: int, extra: dict | None = None) -> tuple[dict, dict, dict, "_RowStore"]:
    """Per chain output: flat positions within its chosen images, the chosen images, its positions per
    image and the original layer's rows there. The original model runs once, batch by batch, and keeps
    only the chosen rows (a ResNet50's 53 layer outputs over 512 images would not fit in memory).
    ``extra`` ({chain output: another tensor of its shape}) keeps that tensor's rows at the same positions."""
    extra = {k: v for k, v in (extra or {}).items() if v not in {c.output for c in chains}}
    targets = list(dict.fromkeys([c.output for c in chains] + list(extra.values())))
    axes = {c.output: c.channel_axis for c in chains}
    axes.update({v: axes[k] for k, v in extra.items()})
    twin = {v: k for k, v in extra.items()}  # an extra tensor takes its chain output's positions
    rng = np.random.default_rng(seed)
    n = len(next(iter(feeds.values())))
    picks, images, global_rows, store = {}, {}, {}, None
    exposed = with_outputs(original, targets)
    session = _session(exposed)
    fixed = fixed_batch(session)
    if fixed is None:  # every layer's output of a batch is fetched at once: size the batch on one sample's
        one = session.run(targets, {k: np.asarray(v[:1]) for k, v in feeds.items()})
        size = batch_for_bytes(sum(v.nbytes for v in one), BATCH)
    done = 0
    for batch, values in iterate(session, feeds, targets, fixed or size, fixed=fixed is not None):
        count_here = len(next(iter(batch.values())))
        for name, value in zip(targets, values):
            axis = axes[name]
            if name in twin:
                continue
            if name not in picks:  # the first batch gives each layer's positions per image and channels
                per_image = value.size // value.shape[axis] // count_here
                # The rows come from a seeded subset of the images, large enough that the rows stay spread
                # (ROW_SPREAD x MAX_ROWS positions, at least MIN_IMAGES images): each layer's input is then
                # captured on that subset only (a ResNet-20's 32x32 layers: 512 of 2048 images).
                count = min(n, max(MIN_IMAGES, -(-ROW_SPREAD * MAX_ROWS // per_image)))
                chosen = np.sort(rng.choice(n, count, replace=False)) if count < n else np.arange(n)
                local = np.sort(rng.choice(count * per_image, min(count * per_image, MAX_ROWS), replace=False))
                picks[name], images[name] = local, chosen
                global_rows[name] = (chosen[local // per_image] * per_image + local % per_image, per_image)
        for name in twin:
            global_rows.setdefault(name, global_rows[twin[name]])
        if store is None:
            store = _RowStore(sum(len(global_rows[t][0]) * v.shape[axes[t]] * v.itemsize for t, v in zip(targets, values)))
        for name, value in zip(targets, values):
            flat, per_image = global_rows[name]
            lo, hi = np.searchsorted(flat, [done * per_image, (done + count_here) * per_image])
            if hi > lo:
                store.append(name, _flat(value, axes[name])[flat[lo:hi] - done * per_image])
        done += count_here
    return picks, images, {t: v[1] for t, v in global_rows.items() if t not in twin}, store if store is not None else _RowStore(0)


SPILL_BYTES = 512 << 20


class _RowStore:
    """The original layers' rows, appended batch by batch: in memory, or, past ``SPILL_BYTES`` in all (a
    ResNet50's 43 layers x 30000 rows: 2.1 GB), in files of a temporary folder, read back one layer at a
    time when its refit comes. ``close`` removes the folder."""

    def __init__(self, expected_bytes: int):
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="onnx_tucker_rows_") if expected_bytes > SPILL_BYTES else None
        self.chunks, self.files = {}, {}

    def append(self, name: str, rows: np.ndarray) -> None:
        if self.folder is None:
            self.chunks.setdefault(name, []).append(rows)
            return
        import os

        path, _, _ = self.files.setdefault(name, (os.path.join(self.folder, f"{len(self.files)}.bin"), rows.dtype, rows.shape[1]))
        with open(path, "ab") as f:
            f.write(np.ascontiguousarray(rows).tobytes())

    def __getitem__(self, name: str) -> np.ndarray:
        if self.folder is None:
            return np.concatenate(self.chunks[name]) if name in self.chunks else np.zeros((0, 0), np.float32)
        path, dtype, channels = self.files[name]
        return np.fromfile(path, dtype).reshape(-1, channels)

    def close(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def _picked_rows(value: np.ndarray, pick: np.ndarray, axis: int = 1) -> np.ndarray:
    """(N, C, spatial...) -> (rows, C) at flat positions ``pick`` (sample-major, like :func:`_flat`), copying only those."""
    moved = np.moveaxis(value, axis, -1)
    if moved.ndim == 2:  # a dense layer's (samples, features): one row per sample
        return moved[pick]
    n_idx, rest = np.divmod(pick, int(np.prod(moved.shape[1:-1], dtype=np.int64)))
    return moved[(n_idx, *np.unravel_index(rest, moved.shape[1:-1]))]


class _Forward:
    """The compressed model run forward once over the refit's images, a segment at a time: the tensors
    that cross the current cut are kept (for those images), and each chain's input is computed from
    them with every earlier refit in place, as a prefix model would, at the cost of the segment.

    Falls back to a prefix model per tensor (the old way, exact whatever the graph) when a tensor lies
    behind the cut, a cut holds a tensor that is not one row per image (a shape tensor), or the graph has
    subgraphs; after such a fallback the kept state may be stale, so every later tensor takes it too."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, chosen: np.ndarray):
        from onnx_tucker.graph import tensor_types

        self.model, self.feeds, self.chosen = model, feeds, chosen
        self.index, self.state, self.usable = 0, dict(feeds), True
        self.types = tensor_types(model) if len(model.graph.node) else {}
        self.batch = batch_size_for(model, BATCH)
        self.fixed = fixed_batch(model) is not None

    def value(self, tensor: str, node, images: np.ndarray, per_image: int):
        """(array over some images, pick mapper): ``mapper(local)`` turns flat positions within ``images``
        (``per_image`` output positions each) into flat positions within the returned array's images."""
        value = self._decoded(tensor, self._advance(self._index(node), tensor)) if self.usable else None
        if value is None:  # the old way: a prefix model over the layer's images
            self.usable = False
            sub = self.feeds if len(images) == len(self.chosen) else {k: v[np.searchsorted(self.chosen, images)] for k, v in self.feeds.items()}
            return _collect(self.model, sub, tensor), lambda local: local
        return value, self._mapper(images, per_image)

    def peek(self, tensor: str, node, images: np.ndarray, per_image: int):
        """``value``'s (array, mapper) where the one-pass forward holds ``tensor`` at ``node``'s cut, else None:
        never the prefix-model fallback (an optional tensor must not slow every later chain down)."""
        value = self._decoded(tensor, self._advance(self._index(node), tensor)) if self.usable else None
        return None if value is None else (value, self._mapper(images, per_image))

    def _index(self, node) -> int:
        return next(i for i, nd in enumerate(self.model.graph.node) if nd.name == node.name)

    def _decoded(self, tensor: str, value):
        """A graph input read straight from the calibration feeds (a core conv on the image: the ``kxk -> 1x1``
        stem) is a streamed image folder there: decoded once, as an array the patches can index."""
        if value is not None and not isinstance(value, np.ndarray):
            value = self.state[tensor] = np.asarray(value)
        return value

    def _mapper(self, images: np.ndarray, per_image: int):
        """Flat positions within ``images`` -> flat positions within the kept state's images (``chosen``)."""
        where = np.searchsorted(self.chosen, images)
        if len(where) == len(self.chosen):
            return lambda local: local

        def mapper(local):
            n_idx, rest = np.divmod(local, per_image)
            return where[n_idx] * per_image + rest
        return mapper

    def _advance(self, index: int, tensor: str):
        """Run the nodes up to ``index`` (exclusive) from the current cut; the tensor's value, or None (fall back)."""
        from onnx_tucker.graph import constant_outputs, cut_at, segment_model

        if index < self.index:
            return None
        if index > self.index:
            after = cut_at(self.model, index)
            if after is None:
                return None
            constants = constant_outputs(self.model)  # copied into each segment, never kept as state
            after = [t for t in after if t not in constants]
            produced = {o for nd in list(self.model.graph.node)[self.index:index] for o in nd.output}
            wanted = [t for t in dict.fromkeys(after + [tensor]) if t in produced]
            if not wanted:  # the nodes in between make nothing that crosses the cut (only Constant nodes)
                if any(t not in self.state for t in after):
                    return None
                self.state = {t: self.state[t] for t in dict.fromkeys(after)}
                self.index = index
                return self.state.get(tensor)
            segment = segment_model(self.model, self.index, index, wanted, self.types)
            if segment is None:
                return None
            inputs = [i.name for i in segment.graph.input]
            if not inputs or any(not self._per_image(self.state[t]) for t in inputs):
                return None  # no per-image input (a segment computing constants only, e.g. Identity of a weight)
            session = _session(segment)
            # written batch by batch into arrays for every image (no list of chunks to concatenate: at a
            # ResNet50's stem, 512 images' activations are 1.6 GB a tensor)
            new, done = {}, 0
            for batch, values in iterate(session, {t: self.state[t] for t in inputs}, wanted, self.batch, fixed=self.fixed):
                rows = len(next(iter(batch.values())))
                for t, v in zip(wanted, values):
                    if not isinstance(v, np.ndarray) or v.ndim < 1 or v.dtype.kind != "f" or len(v) != rows:
                        return None  # not one row per image (a shape tensor)
                    if t not in new:
                        new[t] = np.empty((len(self.chosen),) + v.shape[1:], v.dtype)
                    new[t][done : done + rows] = v
                done += rows
            if done != len(self.chosen):
                return None
            if any(t not in new and t not in self.state for t in after):
                return None
            self.state = {t: new[t] if t in new else self.state[t] for t in dict.fromkeys(after)}
            self.index = index
        return self.state.get(tensor)

    def _per_image(self, value) -> bool:  # an array, or a streamed image folder (decoded batch by batch)
        return hasattr(value, "__array__") and value.ndim >= 1 and len(value) == len(self.chosen) and value.dtype.kind == "f"


RELU_ITERATIONS = 3
RELU_RIDGE = 1e-3
RELU_ROWS = 16_000  # rows per layer for the per-channel ReLU-aware solves
# Multiply-adds of one ReLU-aware iteration (rows x C_out x unknowns^2) above which it is skipped (the
# linear refit is kept): the seed CNN's largest layer at 3/4 ranks needs 1.5e11; a ResNet50's conv5
# layers 1.2e12 each, minutes apiece on 2 cores (issue 15).
RELU_WORK = 2e11
# Through a residual Add the ReLU-aware solve bought about 0.1 point over the linear residual fit on the
# CIFAR ResNets (all under 5e9), and on a ResNet50 its cost pushed the budget past 10 minutes: a lower cap.
RESIDUAL_RELU_WORK = 2e10


def relu_solve(design: np.ndarray, target: np.ndarray, solution: np.ndarray, ridge: float,
               iterations: int = RELU_ITERATIONS, max_rows: int = RELU_ROWS, seed: int = 0,
               offset: np.ndarray | None = None) -> np.ndarray:
    """Least squares on what the ReLU lets through: per output channel, the rows where the
    original or the fitted pre-activation is positive (elsewhere both are cut to 0 and any
    error is invisible downstream). Iterated, since the fitted side moves. One Gram matrix per
    channel, so it runs on a row subsample in float32 (the solve itself is float64); ``solution``
    is returned as it is where that would cost more than ``RELU_WORK`` (:func:`relu_too_costly`).
    ``offset`` (rows x C_out): what is added before the ReLU, as a residual Add's other branch: the
    ReLU then sees ``design @ solution + offset`` and the original ``target + offset``."""
    if relu_too_costly(design, target, max_rows, offset):
        return solution
    offset = np.zeros((1, target.shape[1])) if offset is None else offset
    if len(design) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(design), max_rows, replace=False))
        design, target = design[keep], target[keep]
        offset = offset[keep] if len(offset) > 1 else offset
    d32 = design.astype(np.float32)
    eye = np.eye(design.shape[1])
    # Where the original is cut by the ReLU, reaching 0 is enough: aiming at the negative
    # value would spend the fit on error nobody downstream sees.
    relu_target = np.maximum(target + offset, 0) - offset
    with threadpool_limits(limits=1, user_api="blas"):  # the same rounding on any machine
        whole = (d32.T @ d32).astype(np.float64)
    for _ in range(iterations):
        active = (target + offset > 0) | ((design @ solution + offset) > 0)
        with threadpool_limits(limits=1, user_api="blas"):
            rhs = design.T @ np.where(active, relu_target, 0.0)  # every channel's right-hand side in one product

        def channel(c: int) -> np.ndarray:
            mask = active[:, c]
            count = int(mask.sum())
            if count < MIN_ROWS_PER_UNKNOWN * len(eye):  # (nearly) dead channel: too few rows to refit
                return solution[:, c]
            if 2 * count > len(mask):  # most rows pass: the whole Gram matrix less the cut rows' (half the work or less)
                cut = d32[~mask]
                gram = whole - (cut.T @ cut).astype(np.float64)
            else:
                rows = d32[mask]
                gram = (rows.T @ rows).astype(np.float64)
            lam = RELU_RIDGE * np.trace(gram) / len(gram) + 1e-12  # shrink towards the linear fit
            return np.linalg.solve(gram + lam * eye, rhs[:, c] + lam * solution[:, c])
        solution = np.stack(_each_channel(channel, target.shape[1]), axis=1)
    return solution


def _each_channel(work, count: int) -> list:
    """``work(c)`` for every channel, side by side on the CPUs (``runtime.worker_threads``), one BLAS
    thread each: many small Gram products and solves, which threaded BLAS runs 2-3x slower (0.97 s against
    2.35 s for a ResNet-20 layer on a loaded 2-core machine), and which a 16-core GPU machine should not do
    on one core (issue 15: a ResNet50's refit was half its 2-minute budget there). Each channel is computed
    alone, so the numbers are the same in any order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(worker_threads(), count)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            return [work(c) for c in range(count)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(work, range(count)))


def relu_too_costly(design: np.ndarray, target: np.ndarray, max_rows: int = RELU_ROWS, offset=None) -> bool:
    """Whether one ReLU-aware iteration would exceed ``RELU_WORK`` multiply-adds (then :func:`relu_solve` is
    skipped); ``RESIDUAL_RELU_WORK`` for a ReLU after a residual Add (``offset`` given)."""
    work = RESIDUAL_RELU_WORK if offset is not None else RELU_WORK
    return min(len(design), max_rows) * target.shape[1] * design.shape[1] ** 2 > work


def _relu_label(design: np.ndarray, target: np.ndarray, offset=None) -> str:
    """How the refit treated the ReLU: the error is measured after it either way; the per-channel solve may
    have been skipped for its cost (:func:`relu_too_costly`), and the label says so."""
    return " (after the ReLU; ReLU-aware solve skipped: too costly)" if relu_too_costly(design, target, offset=offset) else " (after the ReLU)"


def _owned_last(chain, last, inits):
    """The last node's weight and bias initializers, owned by this chain (copied if shared, bias created;
    a MatMul has no bias: None)."""
    role = chain.last_role
    weight_init = inits.owned(last, 1, f"{chain.weights[role]}")
    w = inits.array(weight_init.name)
    chain.weights[role] = weight_init.name
    if last.op_type == "MatMul":
        return weight_init, w, None
    out_channels = w.shape[0] if _out_first(last) else w.shape[1]
    bias = inits.bias(last, out_channels, w.dtype, f"{chain.nodes[role]}_B")
    chain.bias = bias.name
    return weight_init, w, bias


def _out_first(node) -> bool:
    """Whether the node's weight is stored (out, in, ...): a Conv, or a Gemm with transB=1."""
    if node.op_type == "Conv":
        return True
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)


def _beta(node) -> float:
    return next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0


def _refit_last(chain, last, inits, z, target, ridge, relu: bool = False, offset=None) -> dict:
    """Least squares for the last node's weight (and bias, where it has one), given its input rows ``z``
    (``offset``: what a residual Add adds before the ReLU, see :func:`relu_solve`)."""
    weight_init, w, bias = _owned_last(chain, last, inits)
    matrix = w.reshape(w.shape[0], -1) if _out_first(last) else w.T  # (out, in)
    beta = _beta(last)
    b0 = beta * inits.array(bias.name).astype(np.float64).reshape(-1) if bias is not None else 0.0
    before = z @ matrix.T.astype(np.float64) + b0
    if bias is None:  # MatMul: no intercept
        gram = z.T @ z
        gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
        solution = np.linalg.solve(gram, z.T @ target)
        if relu:
            solution = relu_solve(z, target, solution, ridge, offset=offset)
        result = _scored(before, z @ solution, target, "last factor", z, relu, offset)
        if _kept(result):
            inits.set(weight_init.name, solution.astype(w.dtype) if not _out_first(last) else solution.T.reshape(w.shape).astype(w.dtype))
        return result

    def store(solution):
        weights = solution[:-1].T.reshape(w.shape) if _out_first(last) else solution[:-1]
        inits.set(weight_init.name, weights.astype(w.dtype))
        inits.set(bias.name, (solution[-1] / beta).astype(w.dtype))
    design = np.hstack([z, np.ones((len(z), 1))])
    gram = design.T @ design
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    solution = np.linalg.solve(gram, design.T @ target)  # (R_out + 1, C_out)
    if relu:
        solution = relu_solve(design, target, solution, ridge, offset=offset)
    result = _scored(before, design @ solution, target, "last conv", design, relu, offset)
    if _kept(result):
        store(solution)
    return result


def _refit_kxk_last(model, chain, last, inits, collect, pick, target, ridge, relu, offset=None) -> dict:
    """Least squares for a kxk last conv (weight and bias) on the im2col rows of its real input, shrunk
    towards the fitted core (it has R_in*k*k unknowns per output channel); skipped with too few rows."""
    if not _is_2d_conv(last) or len(pick) < MIN_ROWS_PER_UNKNOWN * (_core_unknowns(last, inits) + 1):
        return {"refit": "none (a kxk last conv needs a 2-D ungrouped conv and enough calibration rows)",
                "output_error_before": None, "output_error_after": None}
    f, mapper = collect(last.input[0], last)
    pick = mapper(pick)
    geometry = _core_geometry(last, inits, f.shape[2:])
    if geometry is None:
        return {"refit": "none (unsupported core geometry)", "output_error_before": None, "output_error_after": None}
    weight_init, w, bias = _owned_last(chain, last, inits)
    p = _patches(f, pick, _output_hw(f.shape[2:], geometry), geometry).astype(np.float64)
    design = np.hstack([p, np.ones((len(p), 1))])
    prior = np.vstack([w.reshape(w.shape[0], -1).T.astype(np.float64), inits.array(bias.name).astype(np.float64)[None, :]])
    before = design @ prior
    gram = design.T @ design
    lam = max(ridge, CORE_RIDGE) * np.trace(gram) / len(gram) + 1e-12
    solution = np.linalg.solve(gram + lam * np.eye(len(gram)), design.T @ target + lam * prior)
    if relu:
        solution = relu_solve(design, target, solution, ridge, offset=offset)
    result = _scored(before, design @ solution, target, "kxk last conv", design, relu, offset)
    if _kept(result):
        inits.set(weight_init.name, solution[:-1].T.reshape(w.shape).astype(w.dtype))
        inits.set(bias.name, solution[-1].astype(w.dtype))
    return result


def _spatial_h_step(v, gram, cross, mean_p, mean_t, prior, shrink):
    """The spatial chain's last conv given its first, from the patches' moments: ridge least squares (towards
    ``prior``) of the centred targets on the first conv's centred outputs at the ``kw`` columns. ``v`` (K, D),
    ``gram`` (D, kw, D, kw) and ``cross`` (D*kw, C_out) of the centred patches (D = C_in*kh, (channel, tap)
    rows), ``mean_p`` (D, kw). Returns H as (K*kw, C_out), rows (k, w), and the bias (C_out,)."""
    k, (d, kw) = v.shape[0], mean_p.shape
    gz = np.einsum("kd,dwev,le->kwlv", v, gram, v, optimize=True).reshape(k * kw, k * kw)
    zt = np.einsum("kd,dwo->kwo", v, cross.reshape(d, kw, -1), optimize=True).reshape(k * kw, -1)
    lam = shrink * np.trace(gz) / len(gz) + 1e-12
    h = np.linalg.solve(gz + lam * np.eye(len(gz)), zt + lam * prior)
    return h, mean_t - np.einsum("kd,dw->kw", v, mean_p).reshape(-1) @ h


def _spatial_v_step(h, gram, cross, prior, shrink, iterations=None):
    """The spatial chain's first conv V (K, D) given its last, ``h`` (K*kw, C_out): the ridge least squares
    (towards ``prior``) of ``sum_{w,w'} H_w^T H_w' V G_w'w + lam V = sum_w H_w^T C_w + lam prior`` by conjugate
    gradients from ``prior``, preconditioned by the Kronecker product of the block diagonal's two sides (the
    equations' matrix is (K*D) square: 6528 for a 64-channel 3x3 layer at half its MACs, a dense solve per round
    would cost more than the rest of the refit)."""
    iterations = SPATIAL_CG_ITERATIONS if iterations is None else iterations
    k, d = prior.shape
    kw = gram.shape[1]
    hm = h.reshape(k, kw, -1)  # [k, w, o]
    q = np.einsum("awo,bvo->wvab", hm, hm)  # Q[w, v] = H_w^T H_v
    diag = sum(np.trace(q[w, w]) * np.trace(gram[:, w, :, w]) for w in range(kw)) / (k * d)
    lam = shrink * diag + 1e-12
    # The operator sum_{w,v} Q[w,v] X G[:, v, :, w] as two plain products (laid out once, not per iteration):
    # rows (a, v, w) of Q against X, then against G with rows (v, w, d).
    q_rows = q.transpose(2, 1, 0, 3).reshape(k * kw * kw, k)
    g_rows = np.ascontiguousarray(gram.transpose(1, 3, 0, 2)).reshape(kw * kw * d, d)

    def operator(x):
        return (q_rows @ x).reshape(k, kw * kw * d) @ g_rows + lam * x
    a = sum(q[w, w] for w in range(kw))
    scale = np.trace(a) / k + 1e-12
    a_inv = np.linalg.inv(a + 1e-6 * scale * np.eye(k))
    b_inv = np.linalg.inv(sum(gram[:, w, :, w] for w in range(kw)) + (lam / scale) * np.eye(d))
    rhs = np.einsum("awo,dwo->ad", hm, cross.reshape(d, kw, -1)) + lam * prior
    x = prior.astype(np.float64, copy=True)
    r = rhs - operator(x)
    z = a_inv @ r @ b_inv
    direction, rz = z.copy(), float(np.vdot(r, z))
    tol = 1e-16 * float(np.vdot(rhs, rhs))
    for _ in range(iterations):
        if float(np.vdot(r, r)) <= tol:
            break
        ad = operator(direction)
        step = rz / float(np.vdot(direction, ad))
        x += step * direction
        r -= step * ad
        z = a_inv @ r @ b_inv
        rz, rz_old = float(np.vdot(r, z)), rz
        direction = z + (rz / rz_old) * direction
    return x


def _centred_moments(gram: np.ndarray, cross: np.ndarray, bias: bool):
    """Uncentred moments of patch rows (a ones column last where ``bias``) and their products with the outputs ->
    (Gram, cross products) of the centred rows, the rows' mean and the outputs' mean: with a bias the intercept
    absorbs the means, as in the calibration's refits; without, the moments as they are and zero means."""
    width = gram.shape[0] - (1 if bias else 0)
    g, c = gram[:width, :width], cross[:width]
    if not bias:
        return g, c, np.zeros(width), np.zeros(cross.shape[1])
    count = gram[-1, -1]
    mean_p, mean_t = gram[:width, -1] / count, cross[-1] / count
    return g - count * np.outer(mean_p, mean_p), c - count * np.outer(mean_p, mean_t), mean_p, mean_t


def spatial_first_from_moments(first: np.ndarray, last: np.ndarray, gram: np.ndarray, cross: np.ndarray, bias: bool,
                               rounds: int = SPATIAL_JOINT_ROUNDS, shrink: float = CORE_RIDGE,
                               iterations: int | None = None) -> np.ndarray:
    """A spatial chain's first conv V (K, C_in, kh) refitted with its last ``last`` (C_out, K, kw) by
    :func:`_refit_spatial`'s alternating steps (no ReLU), from a layer's uncentred moments: ``gram`` of its kxk
    patch rows ((channel, tap, column), a ones column last where ``bias``) and ``cross`` with its outputs. The
    measured budget's probes use it, so that they rate a spatial option with the first conv the calibration will
    fit (refitting the last conv alone under-rated them). The caller solves the last conv given the V returned."""
    k, c_in, kh = first.shape
    d = c_in * kh
    g, c, mean_p, mean_t = _centred_moments(gram, cross, bias)
    kw = len(g) // d
    g = g.reshape(d, kw, d, kw)
    mean_p = mean_p.reshape(d, kw)
    v = first.astype(np.float64).reshape(k, d)
    h = last.astype(np.float64).transpose(1, 2, 0).reshape(k * kw, -1)  # rows (k, w)
    for _ in range(rounds):
        h, _b = _spatial_h_step(v, g, c, mean_p, mean_t, h, shrink)
        v = _spatial_v_step(h, g, c, v, shrink, iterations)
    return v.reshape(k, c_in, kh)


def _refit_spatial(chain, first, last, inits, f, pick, target, ridge, relu=False, offset=None) -> dict | None:
    """Both convs of a spatial SVD chain (``kh x 1`` V, then ``1 x kw`` H with the bias) fitted together to the
    refit's target on the kxk patches of the chain's real input: alternating least squares, H given V, then V given H.

    The whitened SVD fitted V to the original weight in the metric of the vertical patches alone (blind to the
    correlation between the columns the last conv combines, to the drift of the compressed model's input and to
    the ReLU); the last conv's refit then had to live with it. Here V follows the data too, as Tucker-2's core
    does in its reduced-rank refit. V's normal equations, ``sum_{w,w'} H_w^T H_w' V G_w'w = sum_w H_w^T C_w``
    (``G_w'w`` the patches' Gram block between columns w' and w, ``C_w`` the targets' cross moments), are solved
    by conjugate gradients from the current V, preconditioned by their block diagonal's Kronecker approximation;
    each round aims the rows a following ReLU cuts in both the original and the fit at the fit's own value (a
    majorizer of the error after the ReLU, as in the core's refit). Returns None (the caller refits the last conv
    alone, or nothing) where the two convs do not compose into one kxk conv, where there are too few rows for the
    unknowns, or where the Gram matrix and the solves would cost more than ``SPATIAL_JOINT_WORK``."""
    g1 = _core_geometry(first, inits, f.shape[2:])
    if g1 is None:
        return None
    mid_hw = _output_hw(f.shape[2:], g1)
    g2 = _core_geometry(last, inits, mid_hw)
    if g2 is None:
        return None
    (kh, one), (sh, s_one), (pt, pl_first, pb, pr_first), (dh, d_one) = g1
    (h_one, kw), (sh_one, sw), (pt_last, pl, pb_last, pr), (dh_one, dw) = g2
    if (one, s_one, d_one, h_one, sh_one, dh_one) != (1,) * 6 or (pl_first, pr_first, pt_last, pb_last) != (0,) * 4:
        return None
    k, c_in = (int(x) for x in inits[first.input[1]].dims[:2])
    d, c_out = c_in * kh, int(inits[last.input[1]].dims[0])
    # Enough rows for both solves, as the last conv's refit asks (K*kw + 1 unknowns per output channel), and as many
    # per unknown of V (K*C_in*kh, shared by the C_out outputs): the seed CNN's last 3x3 conv (4x4 maps) has too few,
    # and fitted anyway it lost a point of top-1 while its calibration error halved.
    if len(pick) < MIN_ROWS_PER_UNKNOWN * max(k * kw + 1, -(-k * d // c_out)):
        return None
    if len(pick) * (d * kw) ** 2 + SPATIAL_CG_ITERATIONS * SPATIAL_JOINT_ROUNDS * k * d * d * kw * kw > SPATIAL_JOINT_WORK:
        return None
    geometry = ((kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw))
    v_init = inits.owned(first, 1, chain.weights["first"])
    chain.weights["first"] = v_init.name
    v_stored = inits.array(v_init.name)
    v = v_stored.astype(np.float64).reshape(k, d)  # rows (channel, tap), as the patches'
    h_init, hw, bias = _owned_last(chain, last, inits)
    dtype = hw.dtype
    h_sol = hw.reshape(c_out, k, kw).transpose(1, 2, 0).reshape(k * kw, c_out).astype(np.float64)  # rows (k, w)
    b = inits.array(bias.name).astype(np.float64)

    pc = _patches(f, pick, _output_hw(mid_hw, g2), geometry).astype(np.float32)  # (N, C*kh*kw): (channel, tap, column)
    n = len(pc)
    mean_p = pc.reshape(n, d, kw).mean(0, dtype=np.float64)  # (d, kw)
    # the patches column by column, (N*kw, d): the first conv's outputs at the kw columns are one product
    by_column = pc.reshape(n, d, kw).transpose(0, 2, 1).reshape(n * kw, d)
    pc -= mean_p.reshape(1, -1).astype(np.float32)
    gram = (pc.T @ pc).astype(np.float64).reshape(d, kw, d, kw)  # G[d, w, d', w']
    off = 0.0 if offset is None else offset
    shrink = max(ridge, CORE_RIDGE)

    def features(vv):  # the first conv's output at the kw columns the last conv reads: (N, K*kw), columns (k, w)
        return (by_column @ vv.T.astype(np.float32)).reshape(n, kw, k).transpose(0, 2, 1).reshape(n, k * kw).astype(np.float64)

    z = features(v)
    before = z @ h_sol + b
    aimed = target
    for _ in range(SPATIAL_JOINT_ROUNDS):
        mean_t = aimed.mean(0)
        cross = (pc.T @ (aimed - mean_t).astype(np.float32)).astype(np.float64)  # (C*kh*kw, C_out)
        h_sol, b = _spatial_h_step(v, gram, cross, mean_p, mean_t, h_sol, shrink)
        v = _spatial_v_step(h_sol, gram, cross, v, shrink)
        h_sol, b = _spatial_h_step(v, gram, cross, mean_p, mean_t, h_sol, shrink)
        z = features(v)
        if relu:
            aimed = np.where(target + off > 0, target, np.minimum(z @ h_sol + b + off, 0) - off)
    design = np.hstack([z, np.ones((n, 1))])
    solution = np.vstack([h_sol, b[None, :]])
    if relu:  # the last conv and bias again, per channel on the rows the ReLU lets through
        solution = relu_solve(design, target, solution, ridge, offset=offset)
    result = _scored(before, design @ solution, target, "first + last conv, joint", design, relu, offset)
    if _kept(result):
        inits.set(v_init.name, v.reshape(v_stored.shape).astype(dtype))
        inits.set(h_init.name, solution[:-1].reshape(k, kw, c_out).transpose(2, 0, 1).reshape(hw.shape).astype(dtype))
        inits.set(bias.name, solution[-1].astype(dtype))
    return result


def _kept(result: dict) -> bool:
    """Whether a refit is kept: never one that is worse than the factors it replaces on the calibration rows."""
    if result["output_error_after"] <= result["output_error_before"]:
        return True
    result["output_error_after"] = result["output_error_before"]
    result["refit"] += ": not kept (no better than the fit)"
    return False


def _scored(before, after, target, what, design=None, relu=False, offset=None) -> dict:
    """:func:`_errors`, after the ReLU where one follows (on what it lets through, a residual Add's ``offset`` added
    first), the label saying how the ReLU was treated (``design``: the rows :func:`relu_solve` was given)."""
    if not relu:
        return _errors(before, after, target, what)
    off = 0.0 if offset is None else offset
    clip = (lambda v: np.maximum(v + off, 0))  # noqa: E731
    return _errors(clip(before), clip(after), clip(target), what + _relu_label(design, target, offset))


def _errors(before, after, target, what) -> dict:
    norm = np.linalg.norm(target) or 1.0
    return {
        "refit": what,
        "output_error_before": float(np.linalg.norm(before - target) / norm),
        "output_error_after": float(np.linalg.norm(after - target) / norm),
    }


def _core_unknowns(core_node, inits) -> int:
    dims = inits[core_node.input[1]].dims
    return int(np.prod(dims[1:]))


def _node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _spatial_last(node: onnx.NodeProto) -> bool:
    """A 2-D conv whose kernel is more than one pixel (a spatial SVD's ``1 x kw`` last conv)."""
    return _is_2d_conv(node) and any(k != 1 for k in _node_attrs(node).get("kernel_shape", [1]))


def _is_2d_conv(node: onnx.NodeProto) -> bool:
    attrs = _node_attrs(node)
    return node.op_type == "Conv" and len(attrs.get("kernel_shape", [])) == 2 and attrs.get("group", 1) == 1


def _core_geometry(core_node, inits, in_hw):
    """(kernel, strides, pads [t, l, b, r], dilations) of a 2-D ungrouped core conv (SAME_* resolved on ``in_hw``), else None."""
    try:
        geometry = conv_geometry(_node_attrs(core_node), tuple(inits[core_node.input[1]].dims), tuple(int(d) for d in in_hw))
    except GeometryError:
        return None
    return geometry.as_2d()


def patches_at(x: np.ndarray, n_idx: np.ndarray, oh: np.ndarray, ow: np.ndarray, geometry) -> np.ndarray:
    """im2col rows (C-major like OIHW) of ``x`` (N, C, H, W) at output positions (n, oh, ow)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geometry
    # Gathered from ``x`` itself, zero where a tap falls in the padding: padding the whole batch first
    # copied every activation (a ResNet50 batch: hundreds of MB per layer for a few rows).
    rows = oh[:, None] * sh - pt + np.arange(kh)[None, :] * dh  # (P, kh)
    cols = ow[:, None] * sw - pl + np.arange(kw)[None, :] * dw  # (P, kw)
    inside = ((rows >= 0) & (rows < x.shape[2]))[:, :, None] & ((cols >= 0) & (cols < x.shape[3]))[:, None, :]  # (P, kh, kw)
    rows, cols = np.clip(rows, 0, x.shape[2] - 1), np.clip(cols, 0, x.shape[3] - 1)
    # The channel axis left a slice: the index arrays are (P, kh, kw), not (P, C, kh, kw), and each gathers a
    # channel vector (3-8x faster than indexing every element: it was a third of a ResNet-56's pruning time).
    patches = x[n_idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (P, kh, kw, C)
    patches[~inside] = 0
    return patches.transpose(0, 3, 1, 2).reshape(len(n_idx), -1)


def _patches(f: np.ndarray, pick: np.ndarray, out_hw: tuple, geometry) -> np.ndarray:
    """im2col rows of the core's input ``f`` at flat output positions ``pick`` (n, oh, ow raveled)."""
    n_idx, rest = np.divmod(pick, out_hw[0] * out_hw[1])
    oh, ow = np.divmod(rest, out_hw[1])
    return patches_at(f, n_idx, oh, ow, geometry)


def _refit_core_and_last(model, chain, core_node, last, inits, f, pick, target, geometry, ridge, relu=False, offset=None) -> dict:
    """Reduced-rank regression of core+last on the first conv's real output.

    Fits the combined kxk conv (C_out x R_in*k*k) by least squares, shrunk towards
    the Tucker solution, then keeps its best rank-R_out part (the top principal
    directions of its fitted outputs): the optimal core and last factor for the
    data, given the input factor.
    """
    core_init = inits.owned(core_node, 1, chain.weights["core"])
    chain.weights["core"] = core_init.name
    core = inits.array(core_init.name).astype(np.float64)  # (R_out, R_in, kh, kw)
    last_init, lw, bias = _owned_last(chain, last, inits)
    dtype = lw.dtype
    u = lw.reshape(lw.shape[0], -1).astype(np.float64)  # (C_out, R_out)
    b0 = inits.array(bias.name).astype(np.float64)
    r_out = core.shape[0]
    out_hw = _output_hw(f.shape[2:], geometry)
    p = _patches(f, pick, out_hw, geometry).astype(np.float64)
    prior = (u @ core.reshape(r_out, -1)).T  # (R_in*k*k, C_out): the Tucker conv
    before = p @ prior + b0
    mean_p, mean_t = p.mean(0), target.mean(0)
    pc, tc = p - mean_p, target - mean_t
    gram = pc.T @ pc
    lam = max(ridge, CORE_RIDGE) * np.trace(gram) / len(gram) + 1e-12
    factor = scipy.linalg.cho_factor(gram + lam * np.eye(len(gram)))
    full, fitted, v, new_bias = _reduced_rank(pc, mean_p, factor, tc, mean_t, lam * prior, r_out)
    if relu:
        # The ReLU after the layer hides any error where the original and the fit are both <= 0. Each
        # round aims those rows at the fit's own value (a majorizer of the error after the ReLU, tight at
        # the current fit), so the rank-R_out core is spent on what the next layer sees.
        off = 0.0 if offset is None else offset
        rows = pc.astype(np.float32)  # the rounds' products in float32: 2x faster (each solve stays float64)
        for _ in range(CORE_RELU_ITERATIONS):
            current = ((fitted @ v) + mean_p @ full @ v) @ v.T + new_bias  # p @ full @ v v^T + bias
            aimed = np.where(target + off > 0, target, np.minimum(current + off, 0) - off)
            mean_a = aimed.mean(0)
            full, fitted, v, new_bias = _reduced_rank(rows, mean_p, factor, aimed - mean_a, mean_a, lam * prior, r_out)
    new_core = (full @ v).T.reshape(core.shape)
    after = p @ (full @ v @ v.T) + new_bias
    if relu:  # then the last factor and bias again, for the error the ReLU lets through
        design = np.hstack([p @ full @ v, np.ones((len(p), 1))])
        solution = relu_solve(design, target, np.vstack([v.T, new_bias[None, :]]), ridge, offset=offset)
        v, new_bias = solution[:-1].T, solution[-1]
        after = design @ solution
    inits.set(core_init.name, new_core.astype(dtype))
    inits.set(last_init.name, v.reshape(lw.shape).astype(dtype))
    inits.set(bias.name, new_bias.astype(dtype))
    return _scored(before, after, target, "core + last conv" if relu else "core + last conv (reduced-rank regression)",
                   design if relu else None, relu, offset)


def _reduced_rank(pc, mean_p, factor, tc, mean_t, shrink, rank):
    """Ridge least squares of centred targets ``tc`` on centred patches ``pc`` (float64 or float32; the solve
    is float64 either way), given ``factor``, the Cholesky factor of their shrunk Gram matrix, and ``shrink``,
    the pull towards the prior; then its best rank-``rank`` part. Returns the combined kxk weight, its centred
    outputs, the output subspace ``v`` (C_out x rank) and the bias."""
    full = scipy.linalg.cho_solve(factor, (pc.T @ tc.astype(pc.dtype, copy=False)).astype(np.float64, copy=False) + shrink)
    fitted = (pc @ full.astype(pc.dtype, copy=False)).astype(np.float64, copy=False)
    _, vectors = np.linalg.eigh(fitted.T @ fitted)
    v = vectors[:, ::-1][:, :rank]
    return full, fitted, v, mean_t - mean_p @ (full @ v @ v.T)


def core_from_moments(first: np.ndarray, core: np.ndarray, last: np.ndarray, gram: np.ndarray, cross: np.ndarray,
                      bias: bool, shrink: float = CORE_RIDGE) -> np.ndarray:
    """A Tucker-2 chain's core (R_out, R_in, kh, kw) refitted given its input factor ``first`` (R_in, C_in), as
    :func:`_refit_core_and_last` does on the first conv's real output (the reduced-rank regression, shrunk towards
    the Tucker solution; no ReLU), from a layer's uncentred moments: ``gram`` of its kxk patch rows ((channel,
    tap) with a ones column last where ``bias``) and ``cross`` with its outputs. The measured budget's probes use
    it, so that they rate a Tucker-2 option with the core the calibration will fit; the caller solves the last
    factor given it."""
    r_in, c_in = first.shape
    r_out = core.shape[0]
    g, c, _, _ = _centred_moments(gram, cross, bias)
    taps = len(g) // c_in
    u = first.astype(np.float64)

    def projected(rows):  # (C_in*taps, ...) -> (R_in*taps, ...): the patches of the input factor's output
        return np.tensordot(u, rows.reshape(c_in, taps, -1), axes=(1, 0)).reshape(r_in * taps, -1)
    g, c = projected(projected(g).T).T, projected(c)  # centring commutes with the (linear) projection
    prior = (last.astype(np.float64) @ core.astype(np.float64).reshape(r_out, -1)).T  # (R_in*taps, C_out)
    lam = shrink * np.trace(g) / len(g) + 1e-12
    full = scipy.linalg.cho_solve(scipy.linalg.cho_factor(g + lam * np.eye(len(g))), c + lam * prior)
    _, vectors = np.linalg.eigh(full.T @ g @ full)  # the fitted outputs' second moment
    v = vectors[:, ::-1][:, :r_out]
    return (full @ v).T.reshape(core.shape)


def _output_hw(in_hw, geometry) -> tuple[int, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geometry
    h = (in_hw[0] + pt + pb - (kh - 1) * dh - 1) // sh + 1
    w = (in_hw[1] + pl + pr - (kw - 1) * dw - 1) // sw + 1
    return h, w


def _collect(model: onnx.ModelProto, feeds: dict, name: str) -> np.ndarray:
    """One tensor of ``model`` over all of ``feeds``."""
    return capture_named(prefix_model(model, [name]), feeds, [name], batch_size=batch_size_for(model, BATCH))[name]

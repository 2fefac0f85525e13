"""Convert every keras.applications model (random weights, smallest input it accepts, 10 classes) with
onnx-tucker's converter and check the result: onnx.checker, onnxruntime, agreement with Keras, and
``onnx_tucker.compress(model, ratio=0.5)``. Writes a Markdown table (and JSON) of the results.

    python tools/keras_applications.py --out docs/keras_applications            # every application
    python tools/keras_applications.py ConvNeXtTiny EfficientNetV2B0 --out /tmp/two

tests/test_convert.py runs ``check_application`` on the same applications (the smallest of each family
by default). Nothing is downloaded (``weights=None``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SIZES = (32,)          # tried first; a model that refuses says the size it needs ("at least 75x75")
CLASSES = 10
SAMPLES = 4            # inputs of the agreement check: seeded pixels 0..255 through preprocess_input
TOLERANCE = 1e-4       # `onnx-tucker convert --tolerance` default (max abs difference of the softmax outputs)
VARIANCE_FLOOR = 0.1   # see set_batchnorm_statistics
REL_TOLERANCE = 1e-4   # relative error of the logits (the softmax of a random-weight net is often one-hot)
ROUNDING_MARGIN = 1.5  # past the tolerances: agrees if onnxruntime is within 1.5x TensorFlow's own float32 error


def application_names() -> list[str]:
    import keras

    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


FAMILIES = ("ConvNeXt", "DenseNet", "EfficientNetV2", "EfficientNet", "InceptionResNetV2", "InceptionV3", "MobileNetV3",
            "MobileNetV2", "MobileNet", "NASNet", "VGG", "Xception")


def family(name: str) -> str:
    """ConvNeXtTiny -> ConvNeXt, EfficientNetV2B0 -> EfficientNetV2, ResNet50V2 -> ResNetV2, VGG16 -> VGG."""
    if name.startswith("ResNet"):
        return "ResNetV2" if name.endswith("V2") else "ResNet"
    return next((f for f in FAMILIES if name.startswith(f)), name)


def build(name: str, seed: int = 0):
    """keras.applications.<name>(weights=None, classes=10, no final softmax) at the smallest square input it accepts."""
    import keras

    ctor = getattr(keras.applications, name)
    size = SIZES[0]
    for _ in range(4):
        keras.utils.set_random_seed(seed)
        try:
            return ctor(weights=None, input_shape=(size, size, 3), classes=CLASSES, classifier_activation=None), size
        except ValueError as exc:
            found = re.search(r"at least (\d+)", str(exc))
            if not found or int(found.group(1)) <= size:
                raise
            size = int(found.group(1))
    raise ValueError(f"{name}: no input size accepted")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_inputs(name: str, size: int, n: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """Seeded pixels uniform in 0..255 through the application's own ``preprocess_input`` (the identity for the
    families that preprocess inside the model: ConvNeXt, EfficientNet(V2), MobileNetV3), so every net sees the
    input range it is built for."""
    import importlib

    import keras

    pixels = np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype(np.float32)
    module = importlib.import_module(getattr(keras.applications, name).__module__)
    return np.asarray(module.preprocess_input(pixels.copy()), dtype=np.float32)


def set_batchnorm_statistics(model, x: np.ndarray) -> None:
    """Every BatchNormalization's moving mean/variance := its batch statistics on ``x`` (one training-mode call
    with momentum 0), each variance plus VARIANCE_FLOOR times the layer's mean variance.

    With the initial statistics (0 and 1) random-weight nets can fade to nothing (MobileNet's logits were about
    1e-21 at 32x32) and any comparison passes; normalized activations keep it meaningful, and the statistics
    tf2onnx folds into the convs are not trivial. The floor: a random net leaves some channels almost constant,
    and dividing by their near-zero variance amplified float32 rounding (ResNet50: TensorFlow itself 1.0e-4 and
    onnxruntime 5.9e-5 relative error from a float64 Keras run of the same weights, 1.2e-4 between the two)."""
    import keras

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
        variance = np.asarray(layer.moving_variance)
        layer.moving_variance.assign(variance + VARIANCE_FLOOR * variance.mean())


def float64_reference(name: str, size: int, model, x: np.ndarray) -> np.ndarray:
    """The same application built in float64 with ``model``'s weights, run on ``x``: the exact answer both
    float32 runs (TensorFlow, onnxruntime) round away from."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        ctor = getattr(keras.applications, name)
        twin = ctor(weights=None, input_shape=(size, size, 3), classes=CLASSES, classifier_activation=None)
        twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
        return np.asarray(twin(x.astype(np.float64), training=False), np.float64)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def check_application(name: str, compress: bool = True, row: dict | None = None) -> dict:
    """Build, convert, check; a dict row for the table (``row``, filled as the steps go, if given).
    Conversion refusals (ModelError) are rows, not errors."""
    import keras
    import onnx

    import onnx_tucker
    from onnx_tucker.convert import keras_to_onnx
    from onnx_tucker.errors import ModelError
    from onnx_tucker.runtime import make_session

    row = {} if row is None else row
    row.update(application=name, family=family(name))
    t0 = time.perf_counter()
    model, size = build(name)
    set_batchnorm_statistics(model, sample_inputs(name, size, n=16, seed=1))
    row.update(input=f"{size}x{size}", params=int(model.count_params()), build_s=round(time.perf_counter() - t0, 1))
    t0 = time.perf_counter()
    try:
        onnx_model = keras_to_onnx(model, output_name="output")
    except ModelError as exc:
        row.update(status="refused", reason=str(exc), convert_s=round(time.perf_counter() - t0, 1))
        return row
    row["convert_s"] = round(time.perf_counter() - t0, 1)
    onnx.checker.check_model(onnx_model)
    row["checker"] = True
    x = sample_inputs(name, size)
    expected = np.asarray(model(x, training=False))
    got = make_session(onnx_model).run(None, {onnx_model.graph.input[0].name: x})[0]
    row["rel_error"] = float(np.linalg.norm(expected - got) / max(np.linalg.norm(expected), 1e-30))
    row["max_abs_diff"] = float(np.max(np.abs(softmax(expected) - softmax(got))))
    row["agrees"] = bool(row["max_abs_diff"] <= TOLERANCE and row["rel_error"] <= REL_TOLERANCE)
    if not row["agrees"]:  # rounding or a wrong conversion? ask a float64 run of the same weights
        exact = float64_reference(name, size, model, x)
        row["tf_vs_float64"] = float(np.linalg.norm(expected - exact) / np.linalg.norm(exact))
        row["ort_vs_float64"] = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
        row["agrees"] = bool(row["ort_vs_float64"] <= ROUNDING_MARGIN * row["tf_vs_float64"])
    row["status"] = "converted" if row["agrees"] else "disagrees"
    row["convs"] = sum(n.op_type == "Conv" for n in onnx_model.graph.node)
    if compress:
        t0 = time.perf_counter()
        _, report = onnx_tucker.compress(onnx_model, ratio=0.5)
        totals = report.totals()
        row.update(compress_s=round(time.perf_counter() - t0, 1), decomposed=int(totals["decomposed"]),
                   macs_reduction=round(float(totals["macs_reduction"]), 2))
        if report.notes:
            row["compress_note"] = "; ".join(report.notes)
    row["onnx_model"] = onnx_model
    keras.backend.clear_session()
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Keras applications through `onnx-tucker convert`",
        "",
        f"Produced by `{command}` (2-core CPU VM shared with other jobs: the seconds are indicative only).",
        f"Each application: `keras.applications.X(weights=None, input_shape=(S, S, 3), classes={CLASSES})` at the smallest",
        f"S it accepts (32 tried first), BatchNormalization statistics set to those of 16 seeded inputs, variances plus",
        f"{VARIANCE_FLOOR:g} x their layer's mean (so random-weight activations neither vanish nor amplify float32 rounding), converted by `onnx_tucker.convert.keras_to_onnx` (opset 17), `onnx.checker`,",
        f"run in onnxruntime (CPU) on {SAMPLES} seeded inputs (pixels uniform in 0..255 through the application's `preprocess_input`) and compared",
        f"with Keras. Built with `classifier_activation=None`, so both the logits are compared (relative error, at most",
        f"{REL_TOLERANCE:g}: a random-weight net's softmax is often one-hot, which hides differences) and their softmax (max abs",
        f"difference, at most {TOLERANCE:g}: what `onnx-tucker convert` checks with its default `--tolerance`). Past",
        "those, the same application is built in float64 with the same weights: the conversion still counts as",
        f"agreeing if onnxruntime's relative error from that exact answer is within {ROUNDING_MARGIN:g}x TensorFlow's own. Then",
        "`onnx_tucker.compress(model, ratio=0.5)` (\"decomposed\": convs factored out of all Conv nodes, and the MAC reduction",
        "of the whole model's convs).",
        "",
        "What `onnx_tucker/keras_fold.py` fixed (tf2onnx 1.17 converts with `continue_on_error`, so these stayed in the",
        "graph): ConvNeXtTiny kept 18 `StatefulPartitionedCall` nodes (one per block: Keras runs its grouped",
        "7x7 convs through an XLA-compiled `tf.function`, which grappler never inlines) and 18 `Erfc` (exact GELU), so onnxruntime refused",
        "the model; EfficientNetV2 kept its `Normalization` mean and variance as graph inputs without values (tf2onnx's",
        "`from_function` lists captured constants as inputs), so the agreement check crashed. Anything tf2onnx cannot",
        "map is now refused in one line naming the ops (none of the applications is).",
        "",
        "The script resumes from its JSON (rows already there are kept), so it can also be run one application per",
        "process, as here; `peak GB` is that process's peak resident memory (TensorFlow, tf2onnx and the checks together).",
        "",
        "| application | input | params | status | convert s | logits rel. err | softmax max abs diff | decomposed / convs | conv MACs fewer | compress s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        status = r["status"] if r["status"] != "refused" else f"refused: {r['reason']}"
        if "ort_vs_float64" in r:
            status += (f" (float32 rounding: vs a float64 run, onnxruntime {r['ort_vs_float64']:.2g},"
                       f" TensorFlow {r['tf_vs_float64']:.2g})")
        if r["status"] in ("error", "not run"):
            status = f"{r['status']}: {r['reason']}"
        diff = f"{r['max_abs_diff']:.2g}" if "max_abs_diff" in r else "-"
        rel = f"{r['rel_error']:.2g}" if "rel_error" in r else "-"
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else "-"
        dec = f"{r['decomposed']} / {r['convs']}" if "decomposed" in r else "-"
        red = f"{r['macs_reduction']:.2f}x" if "macs_reduction" in r else "-"
        lines.append(
            f"| {r['application']} | {r.get('input', '-')} | {params} | {status} | {r.get('convert_s', '-')} | "
            f"{rel} | {diff} | {dec} | {red} | {r.get('compress_s', '-')} | {r.get('peak_rss_gb', '-')} |"
        )
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines += ["", "Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)}).", ""]
    measured = [r for r in rows if r.get("peak_rss_gb") and r.get("params", 0) > 40e6]
    if counts.get("not run") and measured:
        per_m = max(r["peak_rss_gb"] / (r["params"] / 1e6) for r in measured)
        lines += [
            f"\"not run\": stopped by `--max-rss-gb`, not refused by the converter. The peak grows about {per_m:.2f} GB per",
            "million parameters (largest ratio among the converted applications above 40M parameters), so those need about "
            + ", ".join(f"{r['application']} {per_m * r['params'] / 1e6:.0f} GB" for r in rows if r["status"] == "not run" and "params" in r)
            + ".",
            "",
        ]
    return "\n".join(lines)


def resident_gb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in GB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def watch_memory(limit_gb: float, on_exceed) -> None:
    """Call ``on_exceed()`` then exit (code 3) as soon as the resident memory passes ``limit_gb``: tf2onnx needs
    many times a model's weight bytes, and on a shared machine the kernel's OOM killer may pick another process."""
    import threading

    def poll():
        while True:
            if resident_gb() > limit_gb:
                on_exceed()
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="applications (default: every keras.applications model)")
    parser.add_argument("--skip", default="", help="comma-separated applications to leave out")
    parser.add_argument("--no-compress", action="store_true", help="convert and check only")
    parser.add_argument("--out", required=True, help="output stem: writes STEM.md and STEM.json")
    parser.add_argument("--max-rss-gb", type=float, default=0, help="stop (and record why) above this resident memory")
    args = parser.parse_args(argv)
    names = args.names or application_names()
    skip = {s for s in args.skip.split(",") if s}
    rows = []
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    if json_path.exists():  # resume: keep the rows already measured
        rows = json.loads(json_path.read_text())
    done = {r["application"] for r in rows}
    command = "python tools/keras_applications.py " + " ".join(sys.argv[1:] if argv is None else argv)
    current = {}

    def save(rows_now):
        rows_now.sort(key=lambda r: (r["family"], r.get("params", 0), r["application"]))
        json_path.write_text(json.dumps(rows_now, indent=1) + "\n")
        md_path.write_text(markdown(rows_now, command))

    if args.max_rss_gb:
        watch_memory(args.max_rss_gb, lambda: save(rows + [{
            **{k: v for k, v in current.items() if k in ("application", "family", "input", "params", "build_s")},
            "status": "not run", "reason": f"stopped above {args.max_rss_gb:g} GB resident memory (this machine's share)"}]))
    for name in names:
        if name in skip or name in done:
            continue
        current.clear()
        current.update(application=name, family=family(name))
        t0 = time.perf_counter()
        try:
            row = check_application(name, compress=not args.no_compress, row=current)
        except Exception as exc:  # a tool crash is a row too, so the table shows it
            row = {"application": name, "family": family(name), "status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        row = {k: v for k, v in row.items() if k != "onnx_model"}
        row["total_s"] = round(time.perf_counter() - t0, 1)
        row["peak_rss_gb"] = round(resident_gb("VmHWM"), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

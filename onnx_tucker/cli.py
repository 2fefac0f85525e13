"""Command line: ``onnx-tucker IN OUT --ratio R`` (compress), ``inspect``.

The CLI parses and prints; the work is in the modules it calls. Every
``OnnxTuckerError`` becomes one line on stderr and its exit code (2: usage,
1: a model or data that cannot be processed); no traceback reaches the user.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnx_tucker import __version__
from onnx_tucker.capture import timing_batch
from onnx_tucker.decompose import DEFAULT_ITERATIONS
from onnx_tucker.errors import ModelError, OnnxTuckerError, UsageError, first_line
from onnx_tucker.options import (BudgetArgs, CalibrationArgs, CheckArgs, DataArgs, DistillArgs, LatencyArgs, MultipleArgs, RankArgs, RayArgs,
                                 RuntimeArgs,
                                 add_forms_argument, add_input_shape_argument, add_layers_argument, add_prune_share_argument, parse_forms, parse_layers,
                                 check_fraction_list, check_int_list, check_positive_int, check_tolerance, parse_input_shapes)

SUBCOMMANDS = ("compress", "inspect", "convert", "bench", "sweep")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-tucker",
        description="Compress ONNX CNNs by Tucker-2 decomposition of their Conv layers. "
        "'onnx-tucker IN.onnx OUT.onnx --ratio R' is short for 'onnx-tucker compress ...'.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-tucker {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser("compress", help="replace each profitable layer by its low-rank chain (Tucker-2 for kxk convs)")
    c.add_argument("input", help="input .onnx model")
    c.add_argument("output", help="output .onnx model (written atomically; never the input)")
    RankArgs.add(c)
    BudgetArgs.add(c)
    CalibrationArgs.add(c)
    RayArgs.add(c)
    DistillArgs.add(c)
    LatencyArgs.add(c)
    CheckArgs.add(c)
    DataArgs.add(c)
    c.add_argument("--report", metavar="PATH", help="write the per-layer report as JSON (- : to stdout, the table then to stderr)")
    c.add_argument("--external-data", action="store_true", help="store the output's weights in OUT.data (automatic above 1.8 GB)")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the final PASSED/FAILED line")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print each phase and step's wall time on stderr as it ends (where a run's time goes; logger 'onnx_tucker')")

    k = sub.add_parser("convert", help="convert a Keras model (.keras) to ONNX with tf2onnx and check the two agree")
    k.add_argument("input", help="Keras model (.keras)")
    k.add_argument("output", help="output .onnx model")
    k.add_argument("--opset", type=lambda t: check_positive_int(t, "--opset"), default=17, help="ONNX opset (default 17)")
    k.add_argument("--inputs", metavar="FILE.npz", help="inputs for the agreement check (default: seeded random 0..255)")
    k.add_argument("--tolerance", type=lambda t: check_tolerance(t, "--tolerance"), default=None,
                   help="largest max-abs difference accepted, times the largest output magnitude where that is above 1 "
                   "(default 1e-4; 1e-2 for a model with float16 layers, 5e-2 with bfloat16 ones)")

    i = sub.add_parser("inspect", help="list the Conv layers, their MACs and what each ratio would save")
    i.add_argument("input", help="input .onnx model")
    i.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated rank ratios (default 0.25,0.5,0.75)")
    MultipleArgs.add(i)
    i.add_argument("--json", metavar="PATH", help="write the listing as JSON (- : to stdout, the table then to stderr)")
    add_layers_argument(i)
    add_forms_argument(i)
    add_input_shape_argument(i)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    from onnx_tucker.providers import CUDNN_ALGOS, PROVIDERS

    b = sub.add_parser("bench", help="time models on onnxruntime's execution providers, interleaved; speedup vs the first")
    b.add_argument("models", nargs="+", help="models to time; the first is the baseline for speedups and agreement")
    RuntimeArgs.add(b, batch_default="1, or the batch the models are exported for", runs_default=100)
    b.set_defaults(batch=None)  # not given: bench.default_batches picks
    b.add_argument("--spin", action="store_true", help="let idle intra-op threads spin (onnxruntime's default; off here: it skews interleaved runs)")
    b.add_argument("--warmup", type=int, default=10, metavar="N", help="warm-up runs per model (default 10; at least 20 on GPU providers)")
    b.add_argument("--cudnn-algo", choices=CUDNN_ALGOS, default="EXHAUSTIVE", help="CUDA EP cudnn_conv_algo_search (default EXHAUSTIVE)")
    b.add_argument("--data", metavar="FILE.npz", help="labelled data (x_test/y_test or x/y): top-1 of each model and agreement with the first")
    b.add_argument("--inputs", metavar="FILE.npz", help="inputs for timing and output agreement (default: seeded random)")
    add_input_shape_argument(b)
    b.add_argument("--per-layer", action="store_true", help="profile each decomposed layer's chain against the original layer (CPU EP)")
    b.add_argument("--fp16", action="store_true", help="time float16 copies of the models (inputs/outputs stay float32; TensorRT also gets trt_fp16_enable)")
    b.add_argument("--cuda-graph", action="store_true", help="onnxruntime's CUDA graph capture (cuda and tensorrt providers): replays without per-node launches")
    b.add_argument("--json", metavar="PATH", help="write every number as JSON (schema onnx-tucker.bench/1, see onnx_tucker/bench.py; - : to stdout, "
                   "the tables then to stderr)")
    b.epilog = "providers: " + ", ".join(f"{p.key} ({p.ort_name})" for p in PROVIDERS.values())


def cmd_compress(args) -> int:
    from onnx_tucker.data import load_inputs
    from onnx_tucker.io import check_output_path, external_data_files, load_model, model_size, PROTOBUF_LIMIT
    from onnx_tucker.outputs import check_paths
    from onnx_tucker.pipeline import compress
    from onnx_tucker.runtime import random_inputs
    from onnx_tucker.validate import COLLAPSE_COSINE, CompressedModelFails, Tolerances, Verdict, as_dicts, compare_models, summary, verdict

    out = check_output_path(args.input, args.output)
    report_file = args.report if args.report != "-" else None  # "-": the JSON on stdout (the table goes to stderr)
    if report_file:
        check_output_path(args.input, report_file, "--report")
    data_out = {"the output's data file": f"{out}.data"}
    check_paths(reads={"the input model": args.input, "--data": args.data, "--inputs": args.inputs, "--calibrate": args.calibrate},
                writes={"output": out, "--report": report_file, "--curves": getattr(args, "curves", None),
                        "--latency-table": getattr(args, "latency_table", None),
                        **(data_out if args.external_data else {})},
                may_write={} if args.external_data else data_out)
    say = (lambda *a: None) if args.quiet else print
    from onnx_tucker import trace

    trace.verbose(args.verbose)
    trace.restart()
    note = lambda text: print(f"onnx-tucker: notice: {text.removeprefix('note: ')}", file=sys.stderr)  # noqa: E731
    check = CheckArgs.parse(args)
    DataArgs.parse(args)
    options = {**RankArgs.parse(args), **BudgetArgs.parse(args), **LatencyArgs.parse(args), **DistillArgs.parse(args),
               **RayArgs.parse(args)}
    started = time.perf_counter()
    model = load_model(args.input)
    from onnx_tucker.bench import check_batch_memory, check_latency_batch_memory
    from onnx_tucker.runtime import graph_inputs

    if args.check_batch:
        check_batch_memory(model, [args.check_batch], flag="--check-batch")
    input_shapes = parse_input_shapes(args.input_shape, graph_inputs(model))
    if "latency_batch" in options:
        options["latency_batch"] = timing_batch(getattr(args, "latency_batch", None), model)
        check_latency_batch_memory(model, options["latency_batch"], input_shapes=input_shapes)
    if input_shapes:
        options["input_shapes"] = input_shapes
    options.update(CalibrationArgs.parse(args, model, args.data, say=note, input_shapes=input_shapes))
    labelled = None
    if args.data:
        from onnx_tucker.data import load_labelled

        labelled = load_labelled(args.data, model, limit=args.data_limit)
    feeds = load_inputs(args.inputs, model) if args.inputs else None
    if not input_shapes:  # a dynamic model's MACs at the size of the real arrays given
        from onnx_tucker.runtime import shapes_of_arrays

        for source in (options.get("calibration"), labelled[0] if labelled is not None else None, feeds):
            input_shapes = shapes_of_arrays(model, source) if isinstance(source, dict) else None
            if input_shapes:
                options["input_shapes"] = input_shapes
                break
    real_inputs = feeds is not None or labelled is not None
    if feeds is None and labelled is not None:  # real data beats random inputs for the self-check
        feeds = {k: v[:64] for k, v in labelled[0].items()}
    if feeds is None and not args.no_check:
        feeds = random_inputs(model, batch=check["check_batch"], seed=0, shapes=input_shapes)
    loaded = time.perf_counter() - started  # the model, the labelled data and the calibration set
    new_model, report = compress(model, **options)
    report.timings = {"load": loaded, **report.timings}
    tolerances = Tolerances(min_agreement=check["min_agreement"], max_rel_error=check["max_rel_error"],
                            min_cosine=COLLAPSE_COSINE if real_inputs else None)
    check_source = args.inputs or (f"first 64 samples of {args.data}" if labelled is not None else f"random, seed 0, batch {check['check_batch']}")

    def self_check(original, compressed) -> Verdict:
        nonlocal agreements
        try:
            agreements = compare_models(original, compressed, feeds)
        except CompressedModelFails as exc:
            report.check = {"inputs": check_source, "outputs": [], "error": str(exc)}
            return Verdict(False, f"the compressed model does not run: {exc}")
        report.check = {"inputs": check_source, "outputs": as_dicts(agreements)}
        return verdict(agreements, tolerances)

    agreements = []
    result = None
    in_memory = model_size(new_model) <= PROTOBUF_LIMIT and model_size(model) <= PROTOBUF_LIMIT
    if not args.no_check and in_memory:
        with report.phase("check"):
            result = self_check(model, new_model)
        if not result.passed and not check["keep_failed"]:
            return _failed(report, result, say, written=None)
    protected = [Path(args.input)] + external_data_files(model, Path(args.input).parent)
    # staged beside OUT; renamed into place with the report only when nothing below has failed
    with report.phase("save"):
        staged, data_file = args.outputs.save_model(new_model, out, external_data=args.external_data or None, protected=protected)
    if not args.no_check and not in_memory:
        with report.phase("check"):
            result = self_check(Path(args.input), staged)
        if not result.passed and not check["keep_failed"]:
            args.outputs.discard()
            return _failed(report, result, say, written=None)
    if labelled is not None:
        with report.phase("accuracy"):
            report.accuracy = accuracy_of(model, staged, *labelled, source=args.data)
    report.timings["total"] = time.perf_counter() - started
    report.verdict = result.to_dict() if result is not None else None
    if args.report:
        _write_json(args, args.report, report.to_json(), "--report")
    args.outputs.commit()
    say(report.table())
    t = report.totals()
    say(f"wrote {out}" + (f" (+ {data_file.name})" if data_file else ""))
    if report.check and agreements:
        say("self-check (onnxruntime CPU): " + summary(agreements))
    if report.accuracy:
        a = report.accuracy
        say(
            f"top-1 on {a['samples']} labelled samples ({a['data']}): original {100 * a['original']:.2f}%, "
            f"compressed {100 * a['compressed']:.2f}% ({100 * a['change']:+.2f} points), agreement {100 * a['agreement']:.2f}%"
        )
    say(report.timing_line())
    if args.verbose:
        trace.log.info(trace.sessions_line())
    if result is not None and not result.passed:  # --keep-failed: written, still a failure
        print(f"FAILED: {result.reason} (written anyway: --keep-failed)")
        print(f"onnx-tucker: error: self-check FAILED: {result.reason} (written anyway: --keep-failed)", file=sys.stderr)
        return 1
    if not report.decomposed and not report.pruned_units:
        print(f"PASSED: 0/{t['convs']} convs decomposed, nothing pays: wrote the input model unchanged")
        return 0
    check_note = "; self-check skipped (--no-check)" if result is None else "; self-check " + result.reason
    macs = (f"MACs {t['macs_reduction']:.2f}x fewer" if t["macs_known"] else
            "MACs unknown (shape inference stops before some layers)" if report.sizes_static else "MACs unknown (give --input-shape)")
    pruned = f", {t['pruned']} pruned" if t["pruned"] else ""
    print(f"PASSED: {t['decomposed']}/{t['convs']} convs decomposed{pruned}, {macs}, params {t['params_reduction']:.2f}x fewer{check_note}")
    return 0


def _failed(report, result, say, written) -> int:
    """The self-check failed: the table, the agreement, and one FAILED line; nothing written."""
    say(report.table())
    print(f"FAILED: {result.reason}; nothing written (--keep-failed writes it anyway)")
    print(f"onnx-tucker: error: self-check FAILED: {result.reason}; nothing written", file=sys.stderr)
    return 1


def accuracy_of(original, compressed, feeds, labels, source: str) -> dict:
    from onnx_tucker.data import predict, top1

    a = predict(original, feeds, progress="top-1 original")
    b = predict(compressed, feeds, progress="top-1 compressed")
    acc_a, acc_b = top1(a, labels), top1(b, labels)
    return {
        "data": str(source), "samples": int(len(labels)), "original": acc_a, "compressed": acc_b,
        "change": acc_b - acc_a, "agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
    }


# convert's default tolerance by the narrowest float the Keras model computes in (mixed precision): a float16 model's
# own Keras and onnxruntime outputs differ by ~3e-4 of the output's size (both round to float16), 0.03 absolute at 114
CONVERT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def cmd_convert(args) -> int:
    from onnx_tucker.convert import check_opset, convert
    from onnx_tucker.io import check_output_path
    from onnx_tucker.outputs import check_paths

    out = check_output_path(args.input, args.output)
    check_paths(reads={"the Keras model": args.input, "--inputs": args.inputs}, writes={"output": out},
                may_write={"the output's data file": f"{out}.data"})
    check_opset(args.opset)
    samples = None
    if args.inputs:
        from onnx_tucker.errors import DataError

        try:
            with np.load(args.inputs, allow_pickle=False) as data:
                if not hasattr(data, "files"):  # a bare .npy array, or a pickle np.load refused above
                    raise DataError(f"inputs file {args.inputs} is not a numpy .npz archive")
                if not data.files:
                    raise DataError(f"inputs file {args.inputs} holds no arrays")
                key = next((k for k in ("x_test", "x", "x_train") if k in data.files), data.files[0])
                samples = data[key][:32].astype(np.float32)
        except DataError:
            raise
        except Exception as exc:
            why = "not a numpy .npz archive" if "pickled" in str(exc) else first_line(exc, 200)
            raise DataError(f"cannot read inputs file {args.inputs}: {why}") from None
        if not np.isfinite(samples).all():
            raise DataError(f"inputs file {args.inputs} ('{key}') contains NaN or Inf: the agreement check needs finite inputs")
    result = convert(args.input, opset=args.opset, samples=samples)
    print(f"converted with {result.route}, opset {args.opset}")
    print(f"Keras vs onnxruntime: max abs difference {result.max_abs_diff:.3g} on {'given' if args.inputs else 'seeded random'} inputs")
    if not result.keras_finite:  # nothing to compare against: "they disagree by nan" blamed the conversion
        raise ModelError("the Keras model's own outputs are not finite (NaN or Inf) on these inputs: nothing to check the "
                         "conversion against, not written")
    # relative to the outputs' size where that is above 1: logits of ~400 on 0..255 inputs differ by ~1e-4 in float32;
    # a mixed-precision model rounds to its float16/bfloat16 layers' precision in both runtimes
    tolerance = args.tolerance if args.tolerance is not None else CONVERT_TOLERANCE[result.compute_dtype]
    allowed = tolerance * max(1.0, result.max_abs_output or 0.0)
    if not result.max_abs_diff <= allowed:  # NaN (onnxruntime's outputs not finite) fails too
        raise ModelError(f"Keras and onnxruntime disagree (max abs difference {result.max_abs_diff:.3g} > {allowed:.3g}"
                         f"{', layers in ' + result.compute_dtype if result.compute_dtype != 'float32' else ''}; "
                         "--tolerance sets the limit): not written")
    args.outputs.save_model(result.model, out)
    args.outputs.commit()
    print(f"PASSED: wrote {out} (input '{result.input_name}', output '{result.output_name}')")
    return 0


def size_of(shape) -> int:
    """What inspect's reductions compare: MACs, or parameters where the spatial sizes are unknown (as compress judges)."""
    return shape.macs() if shape.known else shape.params()


def cmd_inspect(args) -> int:
    from onnx_tucker.factorization import get_form, rounded_ranks
    from onnx_tucker.io import load_model
    from onnx_tucker.pipeline import factorable_sites

    try:
        ratios = check_fraction_list(args.ratios, "--ratios")
    except UsageError as exc:
        raise UsageError(str(exc)) from None
    if args.json and args.json != "-":
        from onnx_tucker.io import check_output_path

        check_output_path(args.input, args.json, "--json")
    layers = parse_layers(args.layers) if args.layers is not None else None
    if layers and "hidden" in layers:
        raise UsageError("inspect lists the layers a rank cut takes: --layers hidden (pruning) is planned on calibration "
                         "data by compress, not listed here")
    auto = MultipleArgs.parse(args)
    if args.json and args.json != "-" and auto.get("table"):  # the listing must not replace the timings cache
        from onnx_tucker.outputs import check_paths

        check_paths(reads={"the input model": args.input}, writes={"--json": args.json, "--latency-table": auto["table"]})
    forms = parse_forms(args.forms) if args.forms is not None else None  # unknown names: refused before the model loads
    model = load_model(args.input)
    from onnx_tucker.factorization import not_worth_it
    from onnx_tucker.runtime import graph_inputs

    input_shapes = parse_input_shapes(args.input_shape, graph_inputs(model))
    if auto:
        from onnx_tucker.bench import check_latency_batch_memory

        auto["batch"] = timing_batch(auto["batch"], model)
        check_latency_batch_memory(model, auto["batch"], input_shapes=input_shapes)
    _, sites = factorable_sites(model, forms, input_shapes, layers=layers)
    if not sites:
        print("no Conv layers")
        if args.json:  # a script reads the file whatever the model holds
            _write_json(args, args.json, json.dumps({"layers": [], "macs_total": 0, "macs_known": True,
                                                     "rank_multiple": args.rank_multiple}, indent=2), "--json")
        return 0
    unknown = any(s.shape is not None and not s.shape.known for s in sites)
    # what compress weighs a chain against (its "crumbs" rule), and what it counts where MACs are unknown
    total_macs = sum(s.shape.macs() for s in sites if s.shape is not None)
    total_params = sum(s.shape.params() for s in sites if s.shape is not None)
    multiple = args.rank_multiple
    if auto:
        from onnx_tucker.latency_table import resolve_multiple

        choice = resolve_multiple([s for s in sites if s.eligible], auto["provider"], auto["batch"], auto["table"])
        multiple = choice["multiple"]
        print(f"--rank-multiple auto: {multiple} on {choice['provider']}, batch {choice['batch']} (summed chain time against unrounded "
              "ranks: " + ", ".join(f"{m}: {v:.2f}" for m, v in choice["scores"].items()) + ")")
    rows, listing = [], []
    total_before = 0
    total_after = {r: 0 for r in ratios}
    for index, site in enumerate(sites):
        s = site.shape
        entry = {"index": index, "layer": site.name, "op": site.op, "kind": site.kind, "form": site.form or None,
                 "op_shape": None, "macs": None, "params": None, "eligible": site.eligible, "reason": site.reason, "ratios": {}}
        if s is not None:
            entry["op_shape"] = [s.c_out, s.c_in // s.group, *s.kernel]
            entry["macs"], entry["params"] = (s.macs() if s.known else None), s.params()
            total_before += size_of(s)
        whole = {}  # reason -> the ratios at which compress would leave the layer whole for it
        for r in ratios:
            after = size_of(s) if s is not None else 0
            if site.eligible:
                form = get_form(site.form)
                ranks = form.rule_ranks(site, "ratio", r, 1.0)
                if hasattr(form, "choose"):  # --forms tucker2,spatial: the form compress would write at this ratio
                    # with compress's default HOOI iterations: at 0 Tucker-2 looked worse than it fits (cnn conv4 at 0.3)
                    ranks, _ = form.choose(site, ranks, rank_multiple=multiple, n_iter_max=DEFAULT_ITERATIONS)
                    form = form.resolve(site, ranks)
                ranks = rounded_ranks(form, site, ranks, multiple)
                cost = form.cost(site, ranks)
                why = not_worth_it(site, ranks, cost, total_macs, total_params)
                entry["ratios"][str(r)] = {"form": form.name, "ranks": list(ranks), "macs": cost.macs if s.known else None,
                                           "params": cost.params, "profitable": not why, **({"left_whole": why} if why else {})}
                if why:
                    whole.setdefault(why, []).append(f"x{r:g}")
                after = after if why else (cost.macs if s.known else cost.params)
            total_after[r] += after
        listing.append(entry)
        cells = [str(index), site.name, entry["kind"] or "?", entry["form"] or "-", "x".join(map(str, entry["op_shape"])) if entry["op_shape"] else "?",
                 f"{entry['macs']:,}" if entry["macs"] is not None else ("unknown*" if s is not None else "?")]
        for r in ratios:
            info = entry["ratios"].get(str(r))
            cells.append(f"{size_of(s) / (info['macs'] if s.known else info['params']):.2f}x" if info and info["profitable"] else "-")
        cells.append(site.reason if not site.eligible else "; ".join(f"{', '.join(at)}: {why}" for why, at in whole.items()))
        rows.append(cells)
    headers = ["#", "layer", "kind", "form", "weight", "MACs"] + [f"x{r:g}" for r in ratios] + ["note"]
    rows.append(["", "TOTAL", "", "", "", "unknown*" if unknown else f"{total_before:,}"]
                + [f"{total_before / max(1, total_after[r]):.2f}x" if total_before else "-" for r in ratios] + [""])
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("#: the index --exclude and --ranks accept for the layer; "
          "xR: MAC reduction of that layer (and of the model) at ratio R, layers that compress would leave whole counted whole")
    if unknown:
        from onnx_tucker.runtime import sizes_static, unknown_sizes_note

        print(unknown_sizes_note(sizes_static(model, input_shapes), "the xR columns are parameter reductions"))
    if args.json:
        _write_json(args, args.json, json.dumps({"layers": listing, "macs_total": None if unknown else total_before,
                                                 "macs_known": not unknown, "rank_multiple": multiple,
                                                 **({"rank_multiple_auto": choice} if auto else {})}, indent=2), "--json")
    return 0


def cmd_bench(args) -> int:
    from onnx_tucker import bench

    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    paths = [Path(m) for m in args.models]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"model not found: {path}" if not path.exists() else f"model is not a file: {path}")
    if args.json and args.json != "-" and Path(args.json).resolve() in {p.resolve() for p in paths}:
        raise UsageError("--json must not overwrite a model")
    if args.json and args.json != "-":
        from onnx_tucker.outputs import check_paths

        from onnx_tucker.io import input_data_files

        data_files = [f for path in paths for f in input_data_files(path)]  # --json over one destroyed that model
        check_paths(reads={"a model": paths, "a model's external data": data_files, "--data": args.data, "--inputs": args.inputs},
                    writes={"--json": args.json})
    batch_given = args.batch is not None
    runtime = RuntimeArgs.parse(args if batch_given else argparse.Namespace(**{**vars(args), "batch": "1"}))
    input_shapes = None
    if args.input_shape:
        if args.inputs:
            raise UsageError("--input-shape sizes the random inputs: not with --inputs, whose arrays have their size")
        from onnx_tucker.io import load_model
        from onnx_tucker.runtime import graph_inputs

        input_shapes = parse_input_shapes(args.input_shape, graph_inputs(load_model(paths[0])))
    config = bench.BenchConfig(
        models=paths,
        providers=runtime["providers"],
        batches=runtime["batches"] if batch_given else None,
        threads=args.threads, spinning=args.spin, warmup=args.warmup, runs=args.runs, cudnn_algo=args.cudnn_algo,
        data=args.data, inputs=args.inputs, per_layer=args.per_layer, progress=not args.no_progress,
        fp16=args.fp16, cuda_graph=args.cuda_graph, input_shapes=input_shapes,
    )
    result = bench.run_bench(config)
    for line in bench.summary_lines(result):
        print(line)
    print(bench.latency_table(result))
    if result["accuracy"]:
        print(bench.accuracy_table(result))
    for profile in result["per_layer"] or []:
        print(bench.per_layer_table(profile))
    if args.json:
        _write_json(args, args.json, bench.to_json(result), "--json")
        args.outputs.commit()
        if args.json != "-":
            print(f"wrote {args.json}")
    return 0


def add_sweep_parser(sub) -> None:
    s = sub.add_parser(
        "sweep", help="compress at several ratios or MAC targets; table, JSON and plot of top-1 against MACs and latency",
        description="Compress IN.onnx at each setting, measure top-1 on labelled TEST data and CPU latency "
        "(interleaved with the original), and write DIR/sweep.md, sweep.json, sweep.png and the compressed models. "
        "Calibration data (--calibrate) must come from TRAINING data, never from the test set that --data measures on.",
    )
    s.add_argument("input", help="input .onnx model")
    DataArgs.add(s, required=True)
    CalibrationArgs.add(s, refit=False)
    group = s.add_mutually_exclusive_group()
    group.add_argument("--ratios", metavar="LIST", help="comma-separated rank ratios (default 0.25,0.5,0.75)")
    group.add_argument("--targets", metavar="LIST", help="comma-separated whole-model MAC targets, fractions of the original (e.g. 0.5,0.33,0.2)")
    s.add_argument("--out-dir", default="sweep", metavar="DIR", help="folder for sweep.md/json/png and the models (default ./sweep)")
    RuntimeArgs.add(s, batch_default="1,32", providers=False, runs_default=30)
    MultipleArgs.add(s)
    RayArgs.add(s)
    add_layers_argument(s)
    add_prune_share_argument(s)


def cmd_sweep(args) -> int:
    from onnx_tucker import sweep

    if not Path(args.input).is_file():
        raise UsageError(f"input model not found: {args.input}")
    if args.calib_size is not None and not args.calibrate:
        raise UsageError("--calib-size only applies with --calibrate")
    images = {}
    if any(v is not None for v in (args.image_scale, args.image_mean, args.image_std)):
        if not (args.calibrate and Path(args.calibrate).is_dir()):
            raise UsageError("--image-scale/--image-mean/--image-std only apply with --calibrate DIR (a folder of images)")
        from onnx_tucker.images import parse_image_flags

        flags = parse_image_flags(args.image_scale, args.image_mean, args.image_std)
        images = {f"image_{name}": value for name, value in flags.items()}  # data.load_calibration's keywords
    layers = parse_layers(args.layers) if args.layers is not None else None
    if args.prune_share is not None and not (args.targets and layers and "hidden" in layers and len(set(layers)) > 1):
        raise UsageError("--prune-share splits each of --targets between pruning and factoring: it needs --targets and "
                         "--layers hidden with another kind (e.g. hidden,kxk)")
    config = sweep.SweepConfig(
        model=Path(args.input), data=Path(args.data),
        ratios=check_fraction_list(args.ratios, "--ratios") if args.ratios else [],
        targets=check_fraction_list(args.targets, "--targets") if args.targets else [],
        calibrate=Path(args.calibrate) if args.calibrate else None, calib_size=args.calib_size,
        out_dir=Path(args.out_dir), data_limit=args.data_limit, threads=args.threads,
        batches=tuple(check_int_list(args.batch, "--batch")), runs=args.runs, rank_multiple=args.rank_multiple,
        multiple_at=MultipleArgs.parse(args), progress=not args.no_progress, ray=RayArgs.parse(args, needs_measured=False).get("ray"),
        layers=layers, images=images, prune_share=args.prune_share,
    )
    result = sweep.run_sweep(config, args.outputs)  # models and tables land together at the end, or not at all
    paths = sweep.write_outputs(result, config.out_dir, args.outputs)
    args.outputs.commit()
    print(sweep.markdown_table(result))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    failed = [r for r in result["results"] if r["error"]]
    print(f"PASSED: {len(result['results']) - len(failed)}/{len(result['results'])} settings compressed and measured")
    return 0


PATH_ARGUMENTS = ("input", "output", "report", "json", "data", "inputs", "calibrate", "curves", "latency_table", "out_dir")


def _refuse_empty_paths(args) -> None:
    """A path given as '' (an unset shell variable) was taken as not given: `--report ""` wrote no report, exit 0."""
    for name in PATH_ARGUMENTS:
        if getattr(args, name, None) == "":
            flag = name if name in ("input", "output") else "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: the path is empty")
    if any(m == "" for m in getattr(args, "models", None) or []):
        raise UsageError("a model path is empty")


COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "convert": cmd_convert, "bench": cmd_bench, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A descriptor closed at start (`>&-`) leaves sys.stdout / sys.stderr None: what is said goes nowhere, as the
    # caller asked, instead of an AttributeError after the model was written. A JSON asked on stdout is refused.
    stdout_closed = sys.stdout is None
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    # 'onnx-tucker IN OUT ...' means 'onnx-tucker compress IN OUT ...'.
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compress")
    from onnx_tucker.outputs import command_outputs, interrupted_by
    from onnx_tucker import providers

    providers.QUIET_DEFAULT_LOGGER = True  # the command's own sessions log at errors only (see providers.onnxruntime)
    try:
        # SIGTERM unwinds like Ctrl-C; the command's staged outputs are committed at its end or removed
        with command_outputs() as outputs:
            args = build_parser().parse_args(argv)
            if not args.command:
                build_parser().print_help()
                return 2
            args.outputs = outputs
            _refuse_empty_paths(args)
            if stdout_closed and "-" in (getattr(args, "report", None), getattr(args, "json", None)):
                raise UsageError("standard output is closed: the JSON asked for on it ('-') has nowhere to go")
            if "-" not in (getattr(args, "report", None), getattr(args, "json", None)):
                code = COMMANDS[args.command](args)
                sys.stdout.flush()  # a full device fails here, reported as such, not at interpreter exit
                return code
            # --report - / --json -: the JSON alone on stdout (for a pipe), everything said for people on stderr
            args.stdout = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", 2))
    except BrokenPipeError:  # stdout's reader left (`| head`): quiet, as a program killed by SIGPIPE, no traceback at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    except OnnxTuckerError as exc:
        if interrupted_by():  # the signal's exception was turned into an error on its way out
            return _interrupted(interrupted_by())
        _say_error(f"onnx-tucker: error: {exc}")
        return exc.exit_code
    except OSError as exc:
        if interrupted_by():
            return _interrupted(interrupted_by())
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT):
            # stdout on a full device or a closed descriptor: not a bug of ours, and the outputs are in place
            _say_error(f"onnx-tucker: error: cannot write to standard output: {exc.strerror}")
            return 1
        if os.environ.get("ONNX_TUCKER_DEBUG"):
            raise
        _say_error(f"onnx-tucker: internal error: {type(exc).__name__}: {first_line(exc)} (set ONNX_TUCKER_DEBUG=1 for a traceback)")
        return 1
    except Exception as exc:  # a bug of ours: still one line, unless debugging
        if interrupted_by():
            return _interrupted(interrupted_by())
        if os.environ.get("ONNX_TUCKER_DEBUG"):
            raise
        text = first_line(exc)
        _say_error(f"onnx-tucker: internal error: {type(exc).__name__}: {text} (set ONNX_TUCKER_DEBUG=1 for a traceback)")
        return 1


def _say_error(line: str) -> None:
    """The one error line on stderr; a stderr that cannot take it (closed, read-only) does not change the exit code."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _write_json(args, target: str, text: str, what: str) -> None:
    """A command's JSON: staged for ``target``, or written to stdout now when it is ``-``: before the files are
    committed, so a stdout that cannot take it (a full device) leaves no output behind either."""
    if target == "-":
        args.stdout.write(text.rstrip("\n") + "\n")
        args.stdout.flush()
    else:
        args.outputs.write_text(target, text, what)


def _interrupted(signum: int) -> int:
    """Ctrl-C (SIGINT) or SIGTERM: one line, exit 128 + the signal's number (130, 143)."""
    import signal

    print("onnx-tucker: interrupted" if signum == signal.SIGINT else f"onnx-tucker: terminated ({signal.Signals(signum).name})",
          file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``onnx-tucker IN OUT --ratio R`` (compress), ``inspect``.

The CLI parses and prints; the work is in the modules it calls. Every
``OnnxTuckerError`` becomes one line on stderr and its exit code (2: usage,
1: a model or data that cannot be processed); no traceback reaches the user.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from onnx_tucker import __version__
from onnx_tucker.errors import ModelError, OnnxTuckerError, UsageError, first_line

SUBCOMMANDS = ("compress", "inspect", "convert", "bench", "sweep")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(message)


def _ratio(text: str) -> float:
    from onnx_tucker.pipeline import check_ratio

    return check_ratio(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise UsageError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"expected a positive integer, got {text!r}")
    return value


def _energy(text: str) -> float:
    from onnx_tucker.ranks import check_energy

    try:
        return check_energy(text)
    except UsageError as exc:
        raise UsageError(f"--energy: {exc}") from None


def add_rank_method_arguments(parser) -> None:
    parser.add_argument("--rank-method", choices=("ratio", "energy", "vbmf"), default="ratio",
                        help="per-layer rank rule: ratio (R*C, default), energy (keep a fraction --energy of each "
                        "channel unfolding's squared singular values) or vbmf (EVBMF estimate, Kim et al. 2016)")
    parser.add_argument("--energy", type=_energy, default=0.9, metavar="F",
                        help="fraction of spectral energy kept by --rank-method energy, in (0, 1] (default 0.9)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-tucker",
        description="Compress ONNX CNNs by Tucker-2 decomposition of their Conv layers. "
        "'onnx-tucker IN.onnx OUT.onnx --ratio R' is short for 'onnx-tucker compress ...'.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-tucker {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser("compress", help="replace each profitable Conv by a Tucker-2 chain of three Convs")
    c.add_argument("input", help="input .onnx model")
    c.add_argument("output", help="output .onnx model (written atomically; never the input)")
    c.add_argument("--ratio", type=_ratio, default=0.5, help="rank ratio R in (0, 1]: R_in=int(R*C_in), R_out=int(R*C_out) (default 0.5)")
    c.add_argument("--force", action="store_true", help="decompose every eligible conv, even where MACs would not fall")
    c.add_argument("--exclude", default="", metavar="LAYERS", help="comma-separated conv names or 0-based indices to leave alone (e.g. 0 for the first conv)")
    c.add_argument("--rank-multiple", type=_positive_int, default=1, metavar="N", help="round ranks to multiples of N")
    add_rank_method_arguments(c)
    c.add_argument("--iterations", type=int, default=None, metavar="N", help="HOOI iterations after the SVD start (default 10)")
    c.add_argument("--method", choices=("eig", "tensorly"), default="eig", help="decomposition routine (default: eig, our fast HOOI; tensorly: partial_tucker)")
    c.add_argument("--latency-aware", action="store_true", help="profile each decomposed layer on the CPU EP and leave whole those whose chain is slower")
    c.add_argument("--latency-batch", type=_positive_int, default=1, metavar="N", help="batch size for --latency-aware (default 1)")
    c.add_argument("--target-macs", type=_fraction, metavar="F", help="choose per-layer ranks so the model's conv MACs are at most F x the original (e.g. 0.33)")
    c.add_argument("--budget-rule", choices=("auto", "measured", "uniform"), default="auto",
                   help="with --target-macs: 'measured' spends ranks by each layer's measured effect on the output "
                        "(needs --calibrate; the default with it), 'uniform' uses one ratio for all layers (default without)")
    c.add_argument("--calibrate", metavar="TRAIN.npz", help="data-aware decomposition from calibration inputs (training data only: x_train, by input name, or one array)")
    c.add_argument("--calib-size", type=_positive_int, default=2048, metavar="N", help="calibration samples, a seeded random subset (default 2048)")
    c.add_argument("--refit", choices=("core", "last", "none"), default="core",
                   help="with --calibrate: refit the core by reduced-rank regression and then the last 1x1 conv (default), "
                        "only the last 1x1 conv, or none")
    c.add_argument("--inputs", metavar="FILE.npz", help="inputs for the self-check (one array per model input)")
    c.add_argument("--no-check", action="store_true", help="skip the onnxruntime self-check of the output")
    c.add_argument("--check-batch", type=_positive_int, default=8, metavar="N", help="batch size of the random self-check inputs (default 8)")
    c.add_argument("--data", metavar="FILE.npz", help="labelled data (x_test/y_test or x/y): report top-1 of both models")
    c.add_argument("--data-limit", type=_positive_int, metavar="N", help="use a seeded random subset of N labelled samples")
    c.add_argument("--report", metavar="PATH", help="write the per-layer report as JSON")
    c.add_argument("--external-data", action="store_true", help="store the output's weights in OUT.data (automatic above 1.8 GB)")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the final PASSED/FAILED line")

    k = sub.add_parser("convert", help="convert a Keras model (.keras) to ONNX with tf2onnx and check the two agree")
    k.add_argument("input", help="Keras model (.keras)")
    k.add_argument("output", help="output .onnx model")
    k.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    k.add_argument("--inputs", metavar="FILE.npz", help="inputs for the agreement check (default: seeded random 0..255)")
    k.add_argument("--tolerance", type=float, default=1e-4, help="largest max-abs difference accepted (default 1e-4)")

    i = sub.add_parser("inspect", help="list the Conv layers, their MACs and what each ratio would save")
    i.add_argument("input", help="input .onnx model")
    i.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated ratios to show (default 0.25,0.5,0.75)")
    i.add_argument("--json", metavar="PATH", help="write the listing as JSON")
    add_bench_parser(sub)
    add_sweep_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="time models on onnxruntime's CPU/CUDA providers, interleaved; speedup vs the first")
    b.add_argument("models", nargs="+", help="models to time; the first is the baseline for speedups and agreement")
    b.add_argument("--providers", metavar="LIST", help="comma-separated: cpu,cuda,tensorrt (default: every one available; a named one that is missing is an error)")
    b.add_argument("--batch", default="1", metavar="LIST", help="comma-separated batch sizes (default 1)")
    b.add_argument("--threads", type=_positive_int, default=min(2, os.cpu_count() or 1), metavar="N", help="intra-op threads per session (default 2, or fewer CPUs)")
    b.add_argument("--spin", action="store_true", help="let idle intra-op threads spin (onnxruntime's default; off here: it skews interleaved runs)")
    b.add_argument("--warmup", type=int, default=10, metavar="N", help="warm-up runs per model (default 10; at least 20 on GPU providers)")
    b.add_argument("--runs", type=_positive_int, default=100, metavar="N", help="timed runs per model (default 100)")
    b.add_argument("--cudnn-algo", choices=("EXHAUSTIVE", "HEURISTIC", "DEFAULT"), default="EXHAUSTIVE", help="CUDA EP cudnn_conv_algo_search (default EXHAUSTIVE)")
    b.add_argument("--data", metavar="FILE.npz", help="labelled data (x_test/y_test or x/y): top-1 of each model and agreement with the first")
    b.add_argument("--inputs", metavar="FILE.npz", help="inputs for timing and output agreement (default: seeded random)")
    b.add_argument("--per-layer", action="store_true", help="profile each decomposed layer's three convs against the original conv (CPU EP)")
    b.add_argument("--json", metavar="PATH", help="write every number as JSON (schema onnx-tucker.bench/1, see onnx_tucker/bench.py)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_compress(args) -> int:
    from onnx_tucker.data import load_inputs
    from onnx_tucker.io import check_output_path, external_data_files, load_model, model_size, PROTOBUF_LIMIT
    from onnx_tucker.outputs import check_paths
    from onnx_tucker.pipeline import compress
    from onnx_tucker.runtime import random_inputs
    from onnx_tucker.validate import as_dicts, compare_models, summary

    out = check_output_path(args.input, args.output)
    if args.report:
        check_output_path(args.input, args.report, "--report")
    data_out = {"the output's data file": f"{out}.data"}
    check_paths(reads={"the input model": args.input, "--data": args.data, "--inputs": args.inputs, "--calibrate": args.calibrate},
                writes={"output": out, "--report": args.report, **(data_out if args.external_data else {})},
                may_write={} if args.external_data else data_out)
    model = load_model(args.input)
    options = {"force": args.force, "rank_multiple": args.rank_multiple, "method": args.method,
               "rank_method": args.rank_method, "energy": args.energy}
    if args.target_macs is not None:
        options["target_macs"] = args.target_macs
        options["budget_rule"] = args.budget_rule
    if args.latency_aware:
        options["latency_aware"], options["latency_batch"] = True, args.latency_batch
    if args.calibrate:
        from onnx_tucker.data import MIN_CALIB_SAMPLES, load_calibration

        if args.data and Path(args.calibrate).resolve() == Path(args.data).resolve():
            raise UsageError("--calibrate and --data are the same file: calibrate on training data, measure on test data")
        options["calibration"] = load_calibration(args.calibrate, model, size=args.calib_size, strict_size=False,
                                                  min_samples=MIN_CALIB_SAMPLES)
        used = len(next(iter(options["calibration"].values())))
        if used < args.calib_size:
            print(f"onnx-tucker: notice: {args.calibrate} holds {used} calibration samples, fewer than --calib-size "
                  f"{args.calib_size}: calibrating on all {used}", file=sys.stderr)
        options["refit"] = False if args.refit == "none" else args.refit
    if args.exclude:
        options["exclude"] = tuple(e.strip() for e in args.exclude.split(",") if e.strip())
    if args.iterations is not None:
        options["n_iter_max"] = args.iterations
    labelled = None
    if args.data:
        from onnx_tucker.data import load_labelled

        labelled = load_labelled(args.data, model, limit=args.data_limit)
    feeds = load_inputs(args.inputs, model) if args.inputs else None
    if feeds is None and labelled is not None:  # real data beats random inputs for the self-check
        feeds = {k: v[:64] for k, v in labelled[0].items()}
    if feeds is None and not args.no_check:
        feeds = random_inputs(model, batch=args.check_batch, seed=0)
    new_model, report = compress(model, ratio=args.ratio, **options)
    say = (lambda *a: None) if args.quiet else print
    checked_in_memory = False
    check_source = args.inputs or (f"first 64 samples of {args.data}" if labelled is not None else f"random, seed 0, batch {args.check_batch}")
    if not args.no_check and model_size(new_model) <= PROTOBUF_LIMIT and model_size(model) <= PROTOBUF_LIMIT:
        agreements = compare_models(model, new_model, feeds)
        report.check = {"inputs": check_source, "outputs": as_dicts(agreements)}
        checked_in_memory = True
    protected = [Path(args.input)] + external_data_files(model, Path(args.input).parent)
    # staged beside OUT; renamed into place with the report only when nothing below has failed
    staged, data_file = args.outputs.save_model(new_model, out, external_data=args.external_data or None, protected=protected)
    if not args.no_check and not checked_in_memory:
        agreements = compare_models(Path(args.input), staged, feeds)
        report.check = {"inputs": check_source, "outputs": as_dicts(agreements)}
    if labelled is not None:
        report.accuracy = accuracy_of(model, staged, *labelled, source=args.data)
    if args.report:
        args.outputs.write_text(args.report, report.to_json(), "--report")
    args.outputs.commit()
    say(report.table())
    t = report.totals()
    say(f"wrote {out}" + (f" (+ {data_file.name})" if data_file else ""))
    if report.check:
        say("self-check (onnxruntime CPU): " + summary(agreements))
    if report.accuracy:
        a = report.accuracy
        say(
            f"top-1 on {a['samples']} labelled samples ({a['data']}): original {100 * a['original']:.2f}%, "
            f"compressed {100 * a['compressed']:.2f}% ({100 * a['change']:+.2f} points), agreement {100 * a['agreement']:.2f}%"
        )
    print(
        f"PASSED: {t['decomposed']}/{t['convs']} convs decomposed, MACs {t['macs_reduction']:.2f}x fewer, "
        f"params {t['params_reduction']:.2f}x fewer"
    )
    return 0


def accuracy_of(original, compressed, feeds, labels, source: str) -> dict:
    from onnx_tucker.data import predict, top1

    a = predict(original, feeds, progress="top-1 original")
    b = predict(compressed, feeds, progress="top-1 compressed")
    acc_a, acc_b = top1(a, labels), top1(b, labels)
    return {
        "data": str(source), "samples": int(len(labels)), "original": acc_a, "compressed": acc_b,
        "change": acc_b - acc_a, "agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
    }


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
                key = next((k for k in ("x_test", "x", "x_train") if k in data.files), data.files[0])
                samples = data[key][:32].astype(np.float32)
        except Exception as exc:
            raise DataError(f"cannot read inputs file {args.inputs}: {first_line(exc, 200)}") from None
    result = convert(args.input, opset=args.opset, samples=samples)
    print(f"converted with {result.route}, opset {args.opset}")
    print(f"Keras vs onnxruntime: max abs difference {result.max_abs_diff:.3g} on {'given' if args.inputs else 'seeded random'} inputs")
    if result.max_abs_diff > args.tolerance:
        raise ModelError(f"Keras and onnxruntime disagree (max abs difference {result.max_abs_diff:.3g} > {args.tolerance}): not written")
    args.outputs.save_model(result.model, out)
    args.outputs.commit()
    print(f"PASSED: wrote {out} (input '{result.input_name}', output '{result.output_name}')")
    return 0


def cmd_inspect(args) -> int:
    from onnx_tucker.io import load_model
    from onnx_tucker.pipeline import check_ratio, infer_shapes
    from onnx_tucker.ranks import ratio_ranks
    from onnx_tucker.decompose import max_ranks
    import onnx_graphsurgeon as gs
    from onnx_tucker.rewrite import find_candidates

    try:
        ratios = [check_ratio(r) for r in args.ratios.split(",") if r.strip()]
    except UsageError as exc:
        raise UsageError(f"--ratios: {exc}") from None
    if args.json:
        from onnx_tucker.io import check_output_path

        check_output_path(args.input, args.json, "--json")
    model = load_model(args.input)
    candidates = find_candidates(gs.import_onnx(model), infer_shapes(model))
    rows, listing = [], []
    total_before = 0
    total_after = {r: 0 for r in ratios}
    for cand in candidates:
        entry = {"layer": cand.name, "op_shape": None, "macs": None, "eligible": cand.eligible, "reason": cand.reason, "ratios": {}}
        s = cand.shape
        if s is not None:
            entry["op_shape"] = [s.c_out, s.c_in // s.group, *s.kernel]
            entry["macs"] = s.macs()
            total_before += s.macs()
        for r in ratios:
            after = s.macs() if s is not None else 0
            if cand.eligible:
                mo, mi = max_ranks(cand.weight.shape)
                ro, ri = ratio_ranks(s.c_out, s.c_in, r)
                chain = s.chain_macs(min(ro, mo), min(ri, mi))
                entry["ratios"][str(r)] = {"ranks": [min(ro, mo), min(ri, mi)], "macs": chain, "profitable": chain < s.macs()}
                after = min(after, chain)
            total_after[r] += after
        listing.append(entry)
        cells = [cand.name, "x".join(map(str, entry["op_shape"])) if entry["op_shape"] else "?", f"{entry['macs']:,}" if entry["macs"] is not None else "?"]
        for r in ratios:
            info = entry["ratios"].get(str(r))
            cells.append(f"{s.macs() / info['macs']:.2f}x" if info and info["profitable"] else "-")
        cells.append("" if cand.eligible else cand.reason)
        rows.append(cells)
    if not candidates:
        print("no Conv layers")
        return 0
    headers = ["layer", "weight", "MACs"] + [f"x{r:g}" for r in ratios] + ["note"]
    rows.append(["TOTAL", "", f"{total_before:,}"] + [f"{total_before / max(1, total_after[r]):.2f}x" for r in ratios] + [""])
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("xR: MAC reduction of that layer (and of the model) at ratio R, with unprofitable layers left alone")
    if args.json:
        args.outputs.write_text(args.json, json.dumps({"layers": listing, "macs_total": total_before}, indent=2), "--json")
    return 0


def cmd_bench(args) -> int:
    from onnx_tucker import bench

    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    paths = [Path(m) for m in args.models]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"model not found: {path}")
    if args.json and Path(args.json).resolve() in {p.resolve() for p in paths}:
        raise UsageError("--json must not overwrite a model")
    if args.json:
        from onnx_tucker.outputs import check_paths

        check_paths(reads={"a model": paths, "--data": args.data, "--inputs": args.inputs}, writes={"--json": args.json})
    config = bench.BenchConfig(
        models=paths,
        providers=bench.parse_providers(args.providers) if args.providers else None,
        batches=bench.parse_batches(args.batch),
        threads=args.threads, spinning=args.spin, warmup=args.warmup, runs=args.runs, cudnn_algo=args.cudnn_algo,
        data=args.data, inputs=args.inputs, per_layer=args.per_layer, progress=not args.no_progress,
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
        args.outputs.write_text(args.json, json.dumps(result, indent=2), "--json")
        args.outputs.commit()
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
    s.add_argument("--data", required=True, metavar="TEST.npz", help="labelled test data (x_test/y_test or x/y) for top-1")
    s.add_argument("--calibrate", metavar="TRAIN.npz", help="calibration inputs from TRAINING data only (x_train, x, one array per "
                   "input name, or a single array); makes the decomposition data-aware")
    s.add_argument("--calib-size", type=_positive_int, metavar="N", help="seeded random subset of N calibration samples "
                   "(default: 2048, or all if the file has fewer; an explicit N larger than the file is an error)")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--ratios", metavar="LIST", help="comma-separated rank ratios (default 0.25,0.5,0.75)")
    group.add_argument("--targets", metavar="LIST", help="comma-separated whole-model MAC targets, fractions of the original (e.g. 0.5,0.33,0.2)")
    s.add_argument("--out-dir", default="sweep", metavar="DIR", help="folder for sweep.md/json/png and the models (default ./sweep)")
    s.add_argument("--data-limit", type=_positive_int, metavar="N", help="use a seeded random subset of N labelled samples")
    s.add_argument("--threads", type=_positive_int, default=min(2, os.cpu_count() or 1), metavar="N", help="onnxruntime intra-op threads for timing (default 2)")
    s.add_argument("--batch", default="1,32", metavar="LIST", help="batch sizes to time (default 1,32)")
    s.add_argument("--runs", type=_positive_int, default=30, metavar="N", help="timed interleaved runs per model and batch (default 30)")
    s.add_argument("--rank-multiple", type=_positive_int, default=1, metavar="N", help="round ranks to multiples of N")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_sweep(args) -> int:
    from onnx_tucker import sweep
    from onnx_tucker.bench import parse_batches

    if not Path(args.input).is_file():
        raise UsageError(f"input model not found: {args.input}")
    config = sweep.SweepConfig(
        model=Path(args.input), data=Path(args.data),
        ratios=sweep.parse_fractions(args.ratios, "--ratios") if args.ratios else [],
        targets=sweep.parse_fractions(args.targets, "--targets") if args.targets else [],
        calibrate=Path(args.calibrate) if args.calibrate else None, calib_size=args.calib_size,
        out_dir=Path(args.out_dir), data_limit=args.data_limit, threads=args.threads,
        batches=tuple(parse_batches(args.batch)), runs=args.runs, rank_multiple=args.rank_multiple,
        progress=not args.no_progress,
    )
    result = sweep.run_sweep(config)
    paths = sweep.write_outputs(result, config.out_dir)
    print(sweep.markdown_table(result))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    failed = [r for r in result["results"] if r["error"]]
    print(f"PASSED: {len(result['results']) - len(failed)}/{len(result['results'])} settings compressed and measured")
    return 0


COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "convert": cmd_convert, "bench": cmd_bench, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # 'onnx-tucker IN OUT ...' means 'onnx-tucker compress IN OUT ...'.
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compress")
    from onnx_tucker.outputs import command_outputs, interrupted_by

    try:
        # SIGTERM unwinds like Ctrl-C; the command's staged outputs are committed at its end or removed
        with command_outputs() as outputs:
            args = build_parser().parse_args(argv)
            if not args.command:
                build_parser().print_help()
                return 2
            args.outputs = outputs
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", 2))
    except OnnxTuckerError as exc:
        if interrupted_by():  # the signal's exception was turned into an error on its way out
            return _interrupted(interrupted_by())
        print(f"onnx-tucker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug of ours: still one line, unless debugging
        if interrupted_by():
            return _interrupted(interrupted_by())
        if os.environ.get("ONNX_TUCKER_DEBUG"):
            raise
        text = first_line(exc)
        print(f"onnx-tucker: internal error: {type(exc).__name__}: {text} (set ONNX_TUCKER_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def _interrupted(signum: int) -> int:
    """Ctrl-C (SIGINT) or SIGTERM: one line, exit 128 + the signal's number (130, 143)."""
    import signal

    print("onnx-tucker: interrupted" if signum == signal.SIGINT else f"onnx-tucker: terminated ({signal.Signals(signum).name})",
          file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())

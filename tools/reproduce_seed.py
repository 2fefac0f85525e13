"""Reproduce the seed report's two experiments on the committed CIFAR-10 model.

    python tools/reproduce_seed.py                      # full: CIFAR-10 test set, x = 1/8 .. 7/8
    python tools/reproduce_seed.py --fast               # CI: 100 test images, x in {2/8, 4/8}

1. Reconstruction loss ||W - W'||^2 of the seed's layer (the second conv, 64->64)
   against R1 (input rank, R2 = 64) and against R2 (output rank, R1 = 64), 1..64.
2. Test top-1 against the rank fraction x, every conv except the first decomposed
   with the seed's rule (``force`` semantics, as the seed did), and the cost
   model's default (unprofitable convs left alone) beside it; with MACs, params
   and onnxruntime CPU latency (batch 1 and 32, median of interleaved runs).

Writes docs/seed_reconstruction.png, docs/seed_accuracy.png, docs/seed_results.json
and prints the markdown table (also written to docs/seed_results.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_tucker import compress  # noqa: E402
from onnx_tucker.data import load_labelled, predict, top1  # noqa: E402
from onnx_tucker.decompose import tucker2  # noqa: E402
from onnx_tucker.pipeline import factorable_sites  # noqa: E402
from onnx_tucker.runtime import make_session  # noqa: E402


def seed_layer_weight(model: onnx.ModelProto) -> tuple[str, np.ndarray]:
    convs = [s for s in factorable_sites(model)[1] if s.weight is not None]
    second = convs[1]
    return second.name, second.weight


def reconstruction_curves(weight: np.ndarray, max_rank: int = 64):
    ranks = list(range(1, max_rank + 1))
    c_out, c_in = weight.shape[:2]
    w2 = float(np.sum(weight.astype(np.float64) ** 2))
    loss_r1 = [tucker2(weight, c_out, r).relative_error ** 2 * w2 for r in ranks]  # R1: input rank
    loss_r2 = [tucker2(weight, r, c_in).relative_error ** 2 * w2 for r in ranks]  # R2: output rank
    return ranks, loss_r1, loss_r2


def median_latency_ms(models: list, feeds_by_batch: dict, runs: int, threads: int = 2) -> list[dict]:
    """Median latency per model and batch size, runs interleaved across models."""
    # Spinning off: an idle session's spinning threads would steal the 2 cores from the timed one.
    sessions = [make_session(m, threads=threads, config={"session.intra_op.allow_spinning": "0"}) for m in models]
    result = [dict() for _ in models]
    for batch, feeds in feeds_by_batch.items():
        times = [[] for _ in models]
        for s in sessions:  # warm-up
            s.run(None, feeds)
        for _ in range(runs):
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[i].append((time.perf_counter() - t0) * 1e3)
        for i in range(len(models)):
            result[i][batch] = float(np.median(times[i]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/cifar10_cnn.onnx"))
    parser.add_argument("--data", default=None, help="labelled test .npz (default: ../shared/data/cifar10/cifar10_test.npz, else the committed sample)")
    parser.add_argument("--fast", action="store_true", help="small subset and two settings (CI)")
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size")
    parser.add_argument("--latency-only", action="store_true", help="reuse top-1 from OUT_DIR/seed_results.json; redo latency and plots")
    args = parser.parse_args(argv)

    data = args.data
    if data is None:
        full = ROOT.parent / "shared/data/cifar10/cifar10_test.npz"
        data = str(full if full.exists() else ROOT / "models/cifar10_test_sample.npz")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(args.model)
    fractions = [2, 4] if args.fast else list(range(1, 8))
    runs = 2 if args.fast else args.runs
    feeds, labels = load_labelled(data, model, limit=100 if args.fast else None)

    layer, weight = seed_layer_weight(model)
    ranks, loss_r1, loss_r2 = reconstruction_curves(weight, max_rank=weight.shape[0])

    previous = json.loads((out_dir / "seed_results.json").read_text()) if args.latency_only else None
    if previous:
        base_top1 = previous["original_top1"]
        known = {(r["x"], r["mode"]): r["top1"] for r in previous["rows"]}
    else:
        base_top1 = top1(predict(model, feeds, progress="original"), labels)
    rows, models = [], [model]
    for k in fractions:
        x = k / 8
        for mode, options in (("seed rule (all but first)", {"force": True, "exclude": ("0",)}), ("cost model", {})):
            new, report = compress(model, ratio=x, **options)
            t = report.totals()
            if previous:
                acc = known[(f"{k}/8", mode)]
            else:
                acc = top1(predict(new, feeds, progress=f"x={k}/8 {mode}"), labels)
            rows.append({
                "x": f"{k}/8", "ratio": x, "mode": mode, "decomposed": t["decomposed"],
                "macs": t["macs_after"], "macs_reduction": t["macs_reduction"], "params": t["params_after"],
                "top1": acc, "top1_change": acc - base_top1,
            })
            models.append(new)
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    batches = {b: {name: rng.uniform(0, 255, (b, 32, 32, 3)).astype(np.float32)} for b in (1, 32)}
    latency = median_latency_ms(models, batches, runs)
    base_latency = latency[0]
    for row, lat in zip(rows, latency[1:]):
        row["latency_b1_ms"], row["latency_b32_ms"] = lat[1], lat[32]
        row["speedup_b32"] = base_latency[32] / lat[32]

    base_t = compress(model, ratio=1.0, force=True)[1].totals()
    table = [
        f"Data: {Path(data).name}, {len(labels)} images. Original: top-1 {100 * base_top1:.2f}%, conv MACs "
        f"{base_t['macs_before'] / 1e6:.2f}M, conv params {base_t['params_before'] / 1e6:.3f}M, latency "
        f"{base_latency[1]:.2f} ms (batch 1), {base_latency[32]:.2f} ms (batch 32), onnxruntime CPU, 2 threads.",
        "",
        "| x | rule | convs decomposed | conv MACs | MAC reduction | conv params | top-1 | top-1 change | latency b1 (ms) | latency b32 (ms) | speedup b32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['x']} | {r['mode']} | {r['decomposed']} | {r['macs'] / 1e6:.2f}M | {r['macs_reduction']:.2f}x | "
            f"{r['params'] / 1e6:.3f}M | {100 * r['top1']:.2f}% | {100 * r['top1_change']:+.2f} | "
            f"{r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} | {r['speedup_b32']:.2f}x |"
        )
    text = "\n".join(table)
    print(text)
    (out_dir / "seed_results.md").write_text(text + "\n")
    (out_dir / "seed_results.json").write_text(json.dumps({
        "data": Path(data).name, "samples": int(len(labels)), "original_top1": base_top1,
        "original_latency_ms": base_latency, "layer": layer, "ranks": ranks,
        "loss_vs_r1": loss_r1, "loss_vs_r2": loss_r2, "rows": rows,
    }, indent=1))
    plot(out_dir, layer, ranks, loss_r1, loss_r2, rows, base_top1)
    return 0


def plot(out_dir: Path, layer: str, ranks, loss_r1, loss_r2, rows, base_top1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, loss_r1, label="vs R1 (input rank), R2 = 64")
    ax.plot(ranks, loss_r2, label="vs R2 (output rank), R1 = 64", linestyle="--")
    ax.set_xlabel("rank")
    ax.set_ylabel(r"reconstruction loss $\|W - W'\|^2$")
    ax.set_title("Seed layer: second conv (64->64)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "seed_reconstruction.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("seed rule (all but first)", "o-"), ("cost model", "s--")):
        sel = [r for r in rows if r["mode"] == mode]
        ax.plot([r["ratio"] for r in sel], [100 * r["top1"] for r in sel], style, label=mode)
    ax.axhline(100 * base_top1, color="gray", linestyle=":", label="original")
    ax.set_xlabel("rank fraction x (R = int(x * C))")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title("Top-1 against rank fraction, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "seed_accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

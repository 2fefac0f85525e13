"""What the distill holdout check sees against what the test set says, to judge its acceptance rules.

For one compressed CIFAR-10 model: the local reconstruction, returned whatever the check says, then the global phase
from it (``keep_worse``); for the compressed, reconstructed and distilled models the held-out agreement / KL with the
original (what ``distill`` decides on) and the top-1 change on the full test set. One JSON line per run on stdout and
appended to ``--out``. Defaults as ``distill``'s (2048 seeded training images, 10 % held out, one thread).

    python tools/check_rules.py models/cifar10_resnet.onnx C.onnx --out docs/check_rules.jsonl
    python tools/check_rules.py --render docs/check_rules.jsonl   # what each rule returns, row by row

``--render``: for each row, the model ``distill``'s rule of stop 30 returned (the global phase from the reconstruction
only where that passed, then of the passing two the lower KL) and the rule of stop 31 (the global phase from the
reconstruction always; the distilled model whenever it passes against the compressed one, else the reconstruction
if it passes), with its test change. "from compressed" marks the global phase run from the compressed model, which a
row does not measure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cifar_runs import emit, load_labelled, predict, top1  # noqa: E402


def _better(m: dict, before: dict) -> bool:  # distill._better, on a row's dicts
    return m["kl"] < before["kl"] and m["agreement"] >= before["agreement"]


def picks(row: dict) -> tuple[str, str]:
    """(stop 30's pick, stop 31's pick) among "compressed", "reconstructed", "distilled", "from compressed"."""
    c, r, d = row["hold_compressed"], row["hold_reconstructed"], row["hold_distilled"]
    recon = r["kl"] < c["kl"]
    if not recon:
        old = "from compressed"
    else:
        passing = [(m["kl"], name) for m, name, ok in ((d, "distilled", _better(d, c)), (r, "reconstructed", True)) if ok]
        old = min(passing)[1]
    new = "distilled" if _better(d, c) else "reconstructed" if recon else "from compressed"
    return old, new


def render(rows: list[dict]) -> str:
    test = {"compressed": "test_compressed", "reconstructed": "test_reconstructed", "distilled": "test_distilled"}
    lines = ["| compressed model | test: compressed / reconstructed / distilled | holdout agreement / KL: compressed | "
             "reconstructed | distilled | stop 30 returns | stop 31 returns |", "| --- | --- | --- | --- | --- | --- | --- |"]
    totals = [0.0, 0.0]
    for row in rows:
        hold = [f"{100 * row[k]['agreement']:.1f} % / {row[k]['kl']:.4f}" for k in ("hold_compressed", "hold_reconstructed", "hold_distilled")]
        cells = []
        for i, pick in enumerate(picks(row)):
            value = row.get("test_from_compressed") if pick == "from compressed" else row[test[pick]]
            cells.append(f"{pick} ({'not measured' if value is None else f'{value:+.2f}'})")
            totals[i] += value or 0.0
        lines.append(f"| {Path(row['original']).stem} / {Path(row['compressed']).stem} | {row['test_compressed']:+.2f} / "
                     f"{row['test_reconstructed']:+.2f} / {row['test_distilled']:+.2f} | {' | '.join(hold)} | {' | '.join(cells)} |")
    lines.append(f"| sum of the returned models' changes (measured ones) | | | | | {totals[0]:+.2f} | {totals[1]:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render([json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]))
        return 0
    import torch

    import onnx_tucker.distill as distill_module
    from onnx_tucker.data import load_calibration
    from onnx_tucker.reconstruct import chains_in

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("compressed")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    original, compressed = onnx.load(args.original), onnx.load(args.compressed)
    feeds, labels = load_labelled(Path(args.data) / "cifar10_test.npz", original)
    base = top1(predict(original, feeds), labels)
    calibration = load_calibration(Path(args.data) / "cifar10_train.npz", original, size=2048)
    trainable = list(dict.fromkeys(t for c in chains_in(compressed) for t in c.trainable()))

    def change(model) -> float:
        return round(100 * (top1(predict(model, feeds), labels) - base), 2)

    rules = distill_module._reconstruction_passes
    distill_module._reconstruction_passes = lambda m, before: m is not None  # return the reconstruction whatever the check says
    try:
        reconstructed, stats = distill_module.distill(original, compressed, calibration, trainable, steps=0, threads=1, progress=False)
    finally:
        distill_module._reconstruction_passes = rules
    distilled, global_stats = distill_module.distill(original, reconstructed, calibration, trainable, reconstruct_steps=0, threads=1,
                                                     progress=False, keep_worse=True)
    emit({"original": args.original, "compressed": args.compressed,
          "test_compressed": change(compressed), "test_reconstructed": change(reconstructed), "test_distilled": change(distilled),
          "hold_compressed": stats["before"], "hold_reconstructed": stats["reconstructed"], "hold_distilled": global_stats["after"]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

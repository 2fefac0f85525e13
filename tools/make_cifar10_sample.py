"""Write a small labelled sample of the CIFAR-10 *test* set for a fresh checkout.

    python tools/make_cifar10_sample.py --data ../shared/data/cifar10 --per-class 50

Seeded and stratified (the files are grouped by class: never take a leading slice).
Output: models/cifar10_test_sample.npz with x_test (N,32,32,3) uint8 and y_test (N,1) uint8.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="models/cifar10_test_sample.npz")
    args = parser.parse_args(argv)
    test = np.load(Path(args.data) / "cifar10_test.npz")
    x, y = test["x_test"], test["y_test"].reshape(-1)
    rng = np.random.default_rng(args.seed)
    picks = np.concatenate([rng.choice(np.flatnonzero(y == c), args.per_class, replace=False) for c in range(10)])
    picks = rng.permutation(picks)
    np.savez_compressed(args.out, x_test=x[picks], y_test=y[picks].reshape(-1, 1).astype(np.uint8), classes=test["classes"])
    print(f"wrote {args.out}: {len(picks)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per 3x3 layer, at equal MACs: Tucker-2 (r, r), Tucker-2 at its best (R_in, R_out), spatial SVD, and Tucker-2 whose
core is itself split spatially (1x1 -> kh x 1 -> 1 x kw -> 1x1), each with a least-squares refit on real inputs.

An experiment, not a form (stop 27, docs/results_calibration.md "Stop 27"): would a four-conv chain or a wider
rank skew leave less output error than the forms the tool has? The errors are the relative pre-activation
output errors on the same rows (tools/form_layer_errors.py's method); the ranks of the last two are searched on
a grid (an oracle per layer: more than the measured budget could pick).

- Tucker-2 best: input factor from the input-whitened weight, core + bias by least squares on the projected
  patches, cut to R_out by reduced-rank regression; (R_in, R_out) searched with ``max/min <= --skew``.
- separable core: the same input factor (R_in); the full core refit, split by an SVD of it read as an
  ``(R_in*kh, C_out*kw)`` matrix whitened by the factor's output covariance (rank K), then the ``1 x kw`` conv
  and the output factor by reduced-rank regression to R_out. MACs per output pixel (stride 1):
  ``R_in*C_in + K*kh*R_in + K*kw*R_out + R_out*C_out``.

    python tools/exp_layer_forms.py models/cifar10_resnet20.onnx --fractions 0.5,0.2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from form_layer_errors import _lstsq, _rows, _whiten, layer_errors, layers_3x3  # noqa: E402


def _reduced_rank(p, y, rank):
    fit = p @ _lstsq(p, y)
    v = np.linalg.svd(fit - fit.mean(0), full_matrices=False)[2][:rank].T
    return fit @ v @ v.T + fit.mean(0) @ (np.eye(y.shape[1]) - v @ v.T)


def _input_factor(w, x, r_in):
    import torch
    import torch.nn.functional as F

    i = w.shape[1]
    flat = x.permute(0, 2, 3, 1).reshape(-1, i).numpy()
    root, inverse = _whiten(flat.T @ flat / len(flat))
    u = np.linalg.svd(root @ w.transpose(1, 0, 2, 3).reshape(i, -1), full_matrices=False)[0]
    first = (inverse @ u[:, :r_in]).T
    return F.conv2d(x, torch.from_numpy(first[:, :, None, None].copy()))


def _error(estimate, y):
    return float(np.sum((estimate - y) ** 2) / np.sum(y**2))


def tucker_error(w, x, y, stride, pad, r_in, r_out):
    kh, kw = w.shape[2:]
    z = _input_factor(w, x, r_in)
    p = np.hstack([_rows(z, (kh, kw), stride[0], pad[0]), np.ones((len(y), 1))])
    return _error(_reduced_rank(p, y, r_out), y)


def separable_core_error(w, x, y, stride, pad, r_in, k, r_out):
    import torch
    import torch.nn.functional as F

    o, _, kh, kw = w.shape
    z = _input_factor(w, x, r_in)
    p = np.hstack([_rows(z, (kh, kw), stride[0], pad[0]), np.ones((len(y), 1))])
    core = _lstsq(p, y)[:-1].T.reshape(o, r_in, kh, kw)  # patch rows are (channel, kh, kw)
    zf = z.permute(0, 2, 3, 1).reshape(-1, r_in).numpy()
    root, inverse = _whiten(zf.T @ zf / len(zf))
    m = np.tensordot(root, core, axes=(1, 1)).transpose(1, 0, 2, 3).transpose(1, 2, 0, 3).reshape(r_in * kh, o * kw)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    vertical = np.tensordot((u[:, :k] * s[:k]).T.reshape(k, r_in, kh), inverse, axes=(1, 0)).transpose(0, 2, 1)
    zs = F.conv2d(z, torch.from_numpy(vertical[..., None].copy()), None, (stride[0], 1), (pad[0], 0))
    ps = np.hstack([_rows(zs, (1, kw), (1, stride[1]), (0, pad[1])), np.ones((len(y), 1))])
    return _error(_reduced_rank(ps, y, r_out), y)


def _grid(c, steps=8):
    return range(max(1, c // steps), c + 1, max(1, c // steps))


def best_tucker(w, x, y, stride, pad, macs, skew):
    o, i = w.shape[:2]
    best = (np.inf, None)
    for r_in in _grid(i, 16):
        r_out = min(o, int((macs - r_in * i) // (9 * r_in + o)))  # the largest R_out the MACs allow
        if r_out >= 1 and max(r_in / r_out, r_out / r_in) <= skew:
            best = min(best, (tucker_error(w, x, y, stride, pad, r_in, r_out), (r_in, r_out)), key=lambda t: t[0])
    return best


def best_separable(w, x, y, stride, pad, macs, skew):
    o, i, kh, kw = w.shape
    best = (np.inf, None)
    for r_in in _grid(i):
        for r_out in _grid(o):
            if max(r_in / r_out, r_out / r_in) > skew:
                continue
            rest = macs - r_in * i - r_out * o
            k = min(int(rest // (r_in * kh * stride[1] + kw * r_out)) if rest > 0 else 0, r_in * kh, r_out * kw)
            if k >= 1:
                e = separable_core_error(w, x, y, stride, pad, r_in, k, r_out)
                best = min(best, (e, (r_in, k, r_out)), key=lambda t: t[0])
    return best


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--fractions", default="0.5,0.2", help="MAC fractions of each layer to compare at")
    ap.add_argument("--skew", type=float, default=2.0, help="largest R_in/R_out ratio searched (the budget's: 2)")
    ap.add_argument("--images", type=int, default=96, help="calibration images whose rows are fitted and scored")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    fractions = [float(f) for f in args.fractions.split(",")]
    totals = {f: np.zeros(4) for f in fractions}
    print("layer | C_out x C_in | per fraction: Tucker-2 (r,r) / Tucker-2 best (R_in,R_out) / spatial (K) / separable core (R_in,K,R_out)")
    for n, w, b, x, stride, pad in layers_3x3(args.model, args.data, args.images):
        y = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), stride, pad).permute(0, 2, 3, 1).reshape(-1, w.shape[0]).numpy()
        cells = []
        for f in fractions:
            macs = w.size * f
            r, e_t, k, e_s = layer_errors(w, b, x, stride, pad, f)
            e_b, ranks_b = best_tucker(w, x, y, stride, pad, macs, args.skew)
            e_c, ranks_c = best_separable(w, x, y, stride, pad, macs, args.skew)
            totals[f] += [e_t, e_b, e_s, e_c]
            cells.append(f"F={f}: {e_t:.4f} ({r}) / {e_b:.4f} {ranks_b} / {e_s:.4f} ({k}) / {e_c:.4f} {ranks_c}")
        print(f"{n.name} | {w.shape[0]}x{w.shape[1]} | " + " | ".join(cells), flush=True)
    for f, t in totals.items():
        print(f"sum over layers at F={f}: Tucker-2 {t[0]:.4f}, Tucker-2 best {t[1]:.4f}, spatial {t[2]:.4f}, separable core {t[3]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

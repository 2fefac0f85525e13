"""Per 3x3 layer of a model: Tucker-2 against spatial SVD at equal MACs, each with a least-squares refit on real inputs.

For every ungrouped 3x3 conv (more than 4 input channels) the layer's inputs are captured on 256 seeded training
images (128 used); at each MAC fraction F both forms get the ranks that cost F of the layer's MACs:

- Tucker-2 ``(r, r)``: input factor from the input-whitened weight, then core and bias by least squares on the
  projected 3x3 patches, cut to rank r on the output side (reduced-rank regression): the calibrated method's
  core + last refit without the ReLU.
- spatial ``K``: SVD of the weight as a ``(C_in*3, C_out*3)`` matrix whitened by the input's channel covariance
  (what ``forms/spatial.py`` does with calibration), then the 1x3 conv and bias by least squares.

Printed: the relative output error (pre-activation, on the same rows) of each. No top-1 here: tools/forms_ab.py.

    python tools/form_layer_errors.py models/cifar10_resnet20.onnx --fractions 0.5,0.33
    python tools/form_layer_errors.py models/cifar10_resnet20.onnx --fractions 0.5 --transposed   # the other orientation
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_tucker.capture import capture_named  # noqa: E402
from onnx_tucker.data import load_calibration  # noqa: E402


def _attr(node, name, default):
    return next((list(a.ints) for a in node.attribute if a.name == name), default)


def _lstsq(a, b, ridge=1e-6):
    gram = a.T @ a
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    return np.linalg.solve(gram, a.T @ b)


def _rows(x, kernel, stride, pad):
    import torch.nn.functional as F

    p = F.unfold(x, kernel, padding=pad, stride=stride)
    return p.permute(0, 2, 1).reshape(-1, p.shape[1]).numpy()


def _whiten(cov):
    values, vectors = np.linalg.eigh(cov)
    values = np.clip(values, 1e-8 * values.max(), None)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def layer_errors(w, b, x, stride, pad, fraction):
    import torch
    import torch.nn.functional as F

    o, i, kh, kw = w.shape
    y = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), stride, pad).permute(0, 2, 3, 1).reshape(-1, o).numpy()
    macs = o * i * kh * kw * fraction
    flat = x.permute(0, 2, 3, 1).reshape(-1, i).numpy()
    root, inverse = _whiten(flat.T @ flat / len(flat))
    # Tucker-2 (r, r): 9 r^2 + r (i + o) = macs
    r = int(np.floor((-(i + o) + np.sqrt((i + o) ** 2 + 4 * kh * kw * macs)) / (2 * kh * kw)))
    r = max(1, min(r, i, o))
    u = np.linalg.svd(root @ w.transpose(1, 0, 2, 3).reshape(i, -1), full_matrices=False)[0]
    first = (inverse @ u[:, :r]).T
    z = F.conv2d(x, torch.from_numpy(first[:, :, None, None].copy()))
    p = np.hstack([_rows(z, (kh, kw), stride[0], pad[0]), np.ones((len(y), 1))])
    fit = p @ _lstsq(p, y)
    v = np.linalg.svd(fit - fit.mean(0), full_matrices=False)[2][:r].T
    tucker = fit @ v @ v.T + fit.mean(0) @ (np.eye(o) - v @ v.T)
    # spatial K: K (i kh s_w + o kw) = macs per output pixel (the first conv runs at the input's width)
    k = max(1, min(int(macs // (i * kh * stride[1] + o * kw)), i * kh, o * kw))
    m = np.tensordot(root, w, axes=(1, 1)).transpose(1, 0, 2, 3).transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
    us, s, _ = np.linalg.svd(m, full_matrices=False)
    vert = np.tensordot((us[:, :k] * s[:k]).T.reshape(k, i, kh), inverse, axes=(1, 0)).transpose(0, 2, 1)
    zs = F.conv2d(x, torch.from_numpy(vert[..., None].copy()), None, (stride[0], 1), (pad[0], 0))
    ps = np.hstack([_rows(zs, (1, kw), (1, stride[1]), (0, pad[1])), np.ones((len(y), 1))])
    spatial = ps @ _lstsq(ps, y)
    norm = np.sum(y**2)
    return r, float(np.sum((tucker - y) ** 2) / norm), k, float(np.sum((spatial - y) ** 2) / norm)


def layers_3x3(model_path, data_dir, images: int):
    """(node, weight, bias, inputs, strides, pads) of every ungrouped 3x3 conv with more than 4 input channels, its
    inputs captured on 256 seeded training images (the first ``images`` kept), float64: what these tools compare on."""
    import torch

    model = onnx.load(model_path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits and inits[n.input[1]].shape[2:] == (3, 3)
             and not any(a.name == "group" and a.i != 1 for a in n.attribute)
             and inits[n.input[1]].shape[1] > 4]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for n in convs:
        exposed.graph.output.append(helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    feeds = load_calibration(Path(data_dir) / "cifar10_train.npz", model, size=256)
    acts = capture_named(exposed, feeds, [n.input[0] for n in convs])
    for n in convs:
        w = inits[n.input[1]].astype(np.float64)
        b = inits[n.input[2]].astype(np.float64) if len(n.input) > 2 else np.zeros(w.shape[0])
        x = torch.from_numpy(acts[n.input[0]][:images].astype(np.float64))
        yield n, w, b, x, _attr(n, "strides", [1, 1]), _attr(n, "pads", [1, 1, 1, 1])[:2]


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--fractions", default="0.5,0.33", help="MAC fractions to compare at")
    ap.add_argument("--transposed", action="store_true",
                    help="also the spatial error of the other orientation (1 x kw first, then kh x 1), at the first fraction")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(ROOT.parent / "shared/data/cifar10")))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    fractions = [float(f) for f in args.fractions.split(",")]
    print("layer | C_out x C_in | " + " | ".join(f"F={f}: Tucker-2 (r) / spatial (K)" for f in fractions))
    for n, w, b, x, stride, pad in layers_3x3(args.model, args.data, 128):
        cells = []
        for f in fractions:
            r, et, k, es = layer_errors(w, b, x, stride, pad, f)
            cells.append(f"{et:.4f} ({r}) / {es:.4f} ({k})")
        if args.transposed:  # the same layer on transposed images is the other orientation
            *_, other = layer_errors(w.transpose(0, 1, 3, 2).copy(), b, x.transpose(2, 3).contiguous(), stride[::-1], pad[::-1], fractions[0])
            cells.append(f"1 x kw first: {other:.4f}")
        print(f"{n.name} | {w.shape[0]}x{w.shape[1]} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

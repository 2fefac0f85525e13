"""Model-level A/B: spatial form with full vertical-patch whitening vs channel-only (S (x) I_kh)."""
import sys, json
from pathlib import Path
import numpy as np, onnx, torch
import torch.nn.functional as F
from onnx import helper
sys.path.insert(0, "/work/main/tools")
from cifar_runs import models_of, measured_compress
from onnx_tucker.pipeline import factorable_sites
from onnx_tucker.capture import capture_named
from onnx_tucker.forms import spatial as sp
from onnx_tucker.decompose import _symmetric_sqrt

PATCH = {}
orig_fit = sp.SpatialSVDForm.fit

def fit(self, site, ranks, *, n_iter_max=0, method="eig", input_covariance=None):
    cov = PATCH.get(site.name) if input_covariance is not None else None
    if cov is None:
        return orig_fit(self, site, ranks, n_iter_max=n_iter_max, method=method, input_covariance=input_covariance)
    (k,) = ranks
    w = site.weight.astype(np.float64)
    c_out, c_in, kh, kw = w.shape
    root, inv = _symmetric_sqrt(cov)
    M = sp._matrix(w)
    u, s, vt = np.linalg.svd(root @ M, full_matrices=False)
    first = (inv @ (u[:, :k] * s[:k])).T.reshape(k, c_in, kh)
    last = vt[:k].reshape(k, c_out, kw).transpose(1, 0, 2)
    composed = sp._composed(first, last)
    return sp.SpatialFactors(first=first, last=last, relative_error=float(np.linalg.norm(w - composed) / np.linalg.norm(w)))

def patch_covs(model, calibration, sites, batch=256):
    exposed = onnx.ModelProto(); exposed.CopyFrom(model)
    names = list(dict.fromkeys(s.input_name for s in sites))
    for n in names:
        exposed.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    (key, x), = calibration.items()
    acc = {s.name: 0 for s in sites}; cnt = {s.name: 0 for s in sites}
    for i in range(0, len(x), batch):
        acts = capture_named(exposed, {key: x[i:i + batch]}, names)
        for s in sites:
            g = s.geometry
            (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
            top, left, bottom, right = g.pads
            a = torch.from_numpy(acts[s.input_name].astype(np.float64))
            a = F.pad(a, (0, 0, top, bottom))
            p = F.unfold(a, (kh, 1), dilation=(dh, 1), stride=(sh, 1))  # (N, C*kh, L) rows (i, h)
            p = p.permute(0, 2, 1).reshape(-1, p.shape[1]).numpy()
            acc[s.name] = acc[s.name] + p.T @ p; cnt[s.name] += len(p)
    return {k: acc[k] / cnt[k] for k in acc}

runs = sys.argv[1].split(); rng = int(sys.argv[2]); arms = sys.argv[3].split(",")
for name, setting, model, calibration, feeds, labels, base in models_of(runs, Path("/work/shared/data/cifar10"), rng):
    graph, sites = factorable_sites(model, ("spatial",))
    eligible = [s for s in sites if s.eligible and s.form == "spatial"]
    kw = {"ratio": float(setting[1:])} if setting[0] == "r" else {"target_macs": float(setting[1:])}
    for arm in arms:
        PATCH.clear()
        if arm == "col":
            PATCH.update(patch_covs(model, calibration, eligible))
            sp.SpatialSVDForm.fit = fit
        else:
            sp.SpatialSVDForm.fit = orig_fit
        m, rep = measured_compress(model, calibration, feeds, labels, base, forms=("spatial",), **kw)
        print(json.dumps({"model": name, "setting": setting, "rng": rng, "arm": arm, **m}), flush=True)

"""Progressive compression: compress to an easy target, reconstruct, fold the chains back into whole convs,
compress that further, reconstruct against the ORIGINAL. vs one-shot with the same reconstruction steps."""
import sys, json, time
from pathlib import Path
import numpy as np, onnx
from onnx import numpy_helper
sys.path.insert(0, "/work/main/tools")
from cifar_runs import models_of
from onnx_tucker.pipeline import compress
from onnx_tucker.distill import distill
from onnx_tucker.reconstruct import chains_in

import torch
torch.set_num_threads(1)
import onnx_tucker.distill as _d
_orig_better = _d._better
_d._better = lambda m, b: m is not None

def compose_back(original, compressed):
    """The original graph with each chain's composed weight and bias in its layer's conv."""
    inits = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer}
    out = onnx.ModelProto(); out.CopyFrom(original)
    oinit = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    for ch in chains_in(compressed):
        ws = [inits[ch.weights[r]].astype(np.float64) for r in ch.roles]
        w = ws[0]
        for nxt in ws[1:]:
            # nxt (O, K, bh, bw) after w (K, I, ah, aw): kernel extents add on each axis (one of them is 1)
            o, k, bh, bw = nxt.shape; _, i, ah, aw = w.shape
            c = np.zeros((o, i, ah + bh - 1, aw + bw - 1))
            for y in range(bh):
                for x in range(bw):
                    c[:, :, y:y + ah, x:x + aw] += np.tensordot(nxt[:, :, y, x], w, axes=(1, 0))
            w = c
        node = nodes[ch.layer]
        t = oinit[node.input[1]]
        assert tuple(t.dims) == w.shape, (ch.layer, t.dims, w.shape)
        t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
        if ch.bias:
            b = inits[ch.bias]
            t = oinit[node.input[2]]
            t.CopyFrom(numpy_helper.from_array(b.astype(np.float32), t.name))
    return out

def recon(orig, comp, cal, steps, rep):
    trainable = list(dict.fromkeys(t for c in rep.chains for t in c.trainable()))
    import os; m, st = distill(orig, comp, cal, trainable, steps=0, reconstruct_steps=steps, threads=1, progress=False, holdout=float(os.environ.get("HOLDOUT", "0.1")))
    return m, st

def acc(m, feeds, labels):
    from cifar_runs import top1 as t1, predict as pr
    return t1(pr(m, feeds), labels)

name_setting, rng, arm = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stages = [float(s) for s in sys.argv[4].split(",")]
forms = tuple(sys.argv[5].split(",")) if len(sys.argv) > 5 else ("tucker2",)
total = int(sys.argv[6]) if len(sys.argv) > 6 else 1600
for name, setting, model, cal, feeds, labels, base in models_of([name_setting], Path("/work/shared/data/cifar10"), rng):
    t0 = time.time()
    cur = model
    rows = []
    todo = stages if arm == "prog" else stages[-1:]
    per = total // len(todo)
    for i, t in enumerate(todo):
        comp, rep = compress(cur, calibration=cal, target_macs=t, forms=forms)
        a0 = acc(comp, feeds, labels)
        m, st = recon(model, comp, cal, per, rep)
        a1 = acc(m, feeds, labels)
        rows.append({"target": t, "compressed": round(100 * (a0 - base), 2), "reconstructed": round(100 * (a1 - base), 2),
                     "macs": round(rep.totals()["macs_reduction"], 3), "returned": st.get("returned"), "check_before": st["before"], "check_recon": st.get("reconstructed"), "would_pass": _orig_better(st.get("reconstructed"), st["before"])})
        print(json.dumps(rows[-1]), flush=True)
        if i < len(todo) - 1:
            cur = compose_back(model, m)
            print("composed back:", round(100 * (acc(cur, feeds, labels) - base), 2), flush=True)
    print(json.dumps({"model": name, "arm": arm, "stages": todo, "forms": forms, "steps": total, "rng": rng, "rows": rows,
                      "final": rows[-1]["reconstructed"], "seconds": round(time.time() - t0)}), flush=True)

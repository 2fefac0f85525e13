"""Per kxk conv: the (R_out, R_in) pair with the least refit output error within the MACs ``--ratio R`` gives Tucker-2
(an experiment of stop 27, docs/results_calibration.md "Stop 27"); prints the ``--ranks`` flags that write those shapes.

The error is tools/exp_layer_forms.py's (input factor from the input-whitened weight, core and bias by least squares on
64 seeded calibration images' rows, cut to R_out by reduced-rank regression), searched over R_in in steps of C_in/16
with R_out the largest the MACs allow, at most 4x apart.

    python tools/exp_rank_shape.py models/cifar10_resnet.onnx 0.5 > flags.txt
    onnx-tucker models/cifar10_resnet.onnx out.onnx --ratio 0.5 $(cat flags.txt) --calibrate ../shared/data/cifar10/cifar10_train.npz \
        --data ../shared/data/cifar10/cifar10_test.npz
"""
import sys, numpy as np, onnx, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "tools"))
from exp_layer_forms import tucker_error
from onnx import helper
from onnx_tucker.capture import capture_named
from onnx_tucker.data import load_calibration
from onnx_tucker.pipeline import factorable_sites
from onnx_tucker.forms.tucker2 import Tucker2Form
from onnx_tucker.ranks import ratio_ranks
torch.set_num_threads(2)
path, ratio = sys.argv[1], float(sys.argv[2])
model = onnx.load(path)
_, sites = factorable_sites(model)
sites = [s for s in sites if s.eligible and s.weight is not None and s.weight.ndim == 4 and s.shape.c_in > 3]
exposed = onnx.ModelProto(); exposed.CopyFrom(model)
for s in sites: exposed.graph.output.append(helper.make_tensor_value_info(s.input_name, onnx.TensorProto.FLOAT, None))
feeds = load_calibration(ROOT.parent / "shared/data/cifar10/cifar10_train.npz", model, size=256, seed=3)
acts = capture_named(exposed, feeds, [s.input_name for s in sites])
form = Tucker2Form()
flags = []
for s in sites:
    node = s.node
    w = s.weight.astype(np.float64); b = np.zeros(w.shape[0])
    x = torch.from_numpy(acts[s.input_name][:64].astype(np.float64))
    stride = list(node.attrs.get("strides", [1, 1])); pad = list(node.attrs.get("pads", [1, 1, 1, 1]))[:2]
    y = F.conv2d(x, torch.from_numpy(w), None, stride, pad).permute(0, 2, 3, 1).reshape(-1, w.shape[0]).numpy()
    base = ratio_ranks(s.shape.c_out, s.shape.c_in, ratio)
    budget = form.cost(s, base).macs
    e0 = tucker_error(w, x, y, stride, pad, base[1], base[0])
    best = (e0, base)
    o, i = s.shape.c_out, s.shape.c_in
    for r_in in range(max(1, i // 16), i + 1, max(1, i // 16)):
        r_out = max((r for r in range(1, o + 1) if form.cost(s, (r, r_in)).macs <= budget), default=0)
        if r_out < 1 or max(r_in / r_out, r_out / r_in) > 4: continue
        e = tucker_error(w, x, y, stride, pad, r_in, r_out)
        if e < best[0]: best = (e, (r_out, r_in))
    print(s.name, base, f"{e0:.4f}", "->", best[1], f"{best[0]:.4f}", file=sys.stderr, flush=True)
    flags.append(f"--ranks={s.name}={best[1][0]},{best[1][1]}")
print(" ".join(flags))

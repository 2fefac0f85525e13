import sys, json
sys.path.insert(0, "/work/main/tools")
from pathlib import Path
import numpy as np, onnx, torch
torch.set_num_threads(1)
from cifar_runs import load_labelled, predict, top1
from onnx_tucker.data import load_calibration
from onnx_tucker.distill import distill
from onnx_tucker.reconstruct import chains_in
orig = onnx.load("models/cifar10_resnet.onnx")
comp = onnx.load(sys.argv[1])
lrs = [float(x) for x in sys.argv[2].split(",")]
feeds, labels = load_labelled(Path("/work/shared/data/cifar10/cifar10_test.npz"), orig)
base = top1(predict(orig, feeds), labels)
cal = load_calibration(Path("/work/shared/data/cifar10/cifar10_train.npz"), orig, size=2048)
chains = chains_in(comp)
allt = list(dict.fromkeys(t for c in chains for t in c.trainable()))
p = Path(sys.argv[1] + ".rec.onnx")
if not p.exists():
    rec, st = distill(orig, comp, cal, allt, steps=0, threads=1, progress=False)
    onnx.save(rec, str(p)); print("recon", st["returned"], round(100 * (top1(predict(rec, feeds), labels) - base), 2), flush=True)
rec = onnx.load(str(p))
biases = [c.bias for c in chains if c.bias]
for lr in lrs:
    m, st = distill(orig, rec, cal, biases, reconstruct_steps=0, lr=lr, threads=1, progress=False, keep_worse=True)
    print(json.dumps({"lr": lr, "returned": st["returned"], "before": st["before"], "after": st["after"], "n": st["trainable_values"],
                      "top1": round(100 * (top1(predict(m, feeds), labels) - base), 2)}), flush=True)

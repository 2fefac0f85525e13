"""Train CIFAR-10 development models in PyTorch and export them to ONNX (BatchNorm folded).

Three networks of the kinds users deploy, all conv -> BatchNorm -> ReLU (ReLU6 in MobileNetV2)
with a final linear classifier:

- ``resnet20``: the classic CIFAR ResNet-20 (3 stages x 3 basic blocks, 16-32-64 channels),
  1x1 conv + BN projection shortcuts where the shape changes, so the export is conv-only;
- ``vgg11_bn``: VGG-11 with BatchNorm, CIFAR variant (one 3x3 conv stack, five max-pools,
  linear classifier on the 1x1 map); ``--vgg-width`` scales the channels (0.5: 32..256);
- ``mobilenetv2``: MobileNetV2 CIFAR variant (stride-1 stem and first two stages at 32x32,
  inverted residuals 1x1 expand / 3x3 depthwise / 1x1 project); ``--mbv2-width`` multiplier;
- ``resnet56``: the deeper CIFAR ResNet-56 (9 blocks a stage), kept out of development: the
  "pretrained-style" model that the tool was not tuned on.

Input of every exported model: ``input``, float32 **NHWC raw pixels 0..255**, shape (N, 32, 32, 3),
exactly the layout of the .npz files (``x_train``/``x_test`` uint8 cast to float) and of the
Keras models in models/. The model's first ops transpose to NCHW and normalise per channel
(x/255 - mean)/std with the CIFAR-10 training mean/std (Transpose, Mul, Add in the ONNX graph).
Output: ``logits`` (N, 10), no softmax.

    python tools/train_torch_cifar10.py --arch all --threads 1 \
        --data ../shared/data/cifar10 --epochs resnet20=30,vgg11_bn=15,mobilenetv2=10

Train data only: a seeded 2000-image hold-out of the training set is the validation set;
top-1 on the full test set is measured once, at the end, with torch and with onnxruntime.
With ``--minutes arch=M,...`` each network trains for a wall-clock budget instead of a number of
epochs: the one-cycle learning rate follows the fraction of the budget spent, so a run on a shared
CPU ends on time (with fewer steps when contended); the log records the steps and epochs done.
Writes models/cifar10_<arch>.onnx, .train.json (rewritten after every epoch) and .pt (state dict).
``--device cuda`` trains on a GPU (``--bf16`` then autocasts on the GPU). Without ``cifar10_test.npz``
in ``--data`` (a GPU machine that was sent only training images) the test top-1 is left out, and
``--evaluate`` fills it in later from the exported ONNX with onnxruntime on the CPU.
``--bench`` only measures training throughput (images/s, forward+backward at the batch size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("resnet20", "vgg11_bn", "mobilenetv2", "resnet56")
# Per-channel statistics of the CIFAR-10 training images (RGB, on the 0..1 scale).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Preprocess(nn.Module):
    """NHWC raw pixels 0..255 -> NCHW normalised: permute, then x * scale + shift per channel."""

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))

    def forward(self, x):
        return x.permute(0, 3, 1, 2) * self.scale + self.shift


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- ResNet-20
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth=20, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.pre = Preprocess()
        self.stem = conv_bn(3, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(self.pre(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- VGG-11-BN
class VGGCifar(nn.Module):
    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, width=1.0, num_classes=10):
        super().__init__()
        self.pre = Preprocess()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = int(round(v * width))
                layers.append(conv_bn(cin, cout))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(self.pre(x)), 1))


# ---------------------------------------------------------------- MobileNetV2
def _make_divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Cifar(nn.Module):
    # (expansion t, channels c, repeats n, stride s); CIFAR variant: stem stride 1 and the
    # second stage's stride 2 -> 1, so the first two stages run at 32x32 (final map 4x4).
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width=1.0, last_channels=1280, stage2_stride=1, num_classes=10):
        super().__init__()
        self.pre = Preprocess()
        cin = _make_divisible(32 * width)
        layers = [conv_bn(3, cin, 3, 1, act=nn.ReLU6)]
        for t, c, n, s in self.CFG:
            s = stage2_stride if c == 24 else s
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _make_divisible(last_channels * max(1.0, width))
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(self.pre(x)), 1), 1))


def build(arch: str, args) -> nn.Module:
    if arch == "resnet20":
        return ResNetCifar(20)
    if arch == "vgg11_bn":
        return VGGCifar(args.vgg_width)
    if arch == "mobilenetv2":
        return MobileNetV2Cifar(args.mbv2_width, args.mbv2_last, args.mbv2_stage2_stride)
    if arch == "resnet56":
        return ResNetCifar(56)
    raise ValueError(arch)


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 32x32 image through the convs and linear layers."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 32, 32, 3))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


# ---------------------------------------------------------------- data
def load_cifar10(data_dir: Path, need_train: bool = True):
    """(x_train, y_train, x_test, y_test); the test pair is (None, None) when its file is absent."""
    x_train = y_train = x_test = y_test = None
    if need_train:
        tr = np.load(data_dir / "cifar10_train.npz", allow_pickle=False)
        x_train, y_train = tr["x_train"], tr["y_train"].reshape(-1).astype(np.int64)
    if (data_dir / "cifar10_test.npz").exists():
        te = np.load(data_dir / "cifar10_test.npz", allow_pickle=False)
        x_test, y_test = te["x_test"], te["y_test"].reshape(-1).astype(np.int64)
    elif not need_train:
        raise SystemExit(f"error: {data_dir / 'cifar10_test.npz'} not found")
    return x_train, y_train, x_test, y_test


def augment(padded: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 32x32 crop of the 4-pixel zero-padded images and random horizontal flip (NHWC uint8)."""
    oy, ox = rng.integers(0, 9, len(idx)), rng.integers(0, 9, len(idx))
    flip = rng.random(len(idx)) < 0.5
    out = np.empty((len(idx), 32, 32, 3), np.uint8)
    for k, (i, y, x, f) in enumerate(zip(idx, oy, ox, flip)):
        crop = padded[i, y : y + 32, x : x + 32]
        out[k] = crop[:, ::-1] if f else crop
    return out


def to_tensor(x_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).float()  # NHWC 0..255; the model permutes


@torch.no_grad()
def evaluate(model, x, y, batch=500, bf16=False, device="cpu"):
    model.eval()
    correct, loss = 0, 0.0
    for s in range(0, len(x), batch):
        xb, yb = to_tensor(x[s : s + batch]).to(device), torch.from_numpy(y[s : s + batch]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(xb).float()
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    return correct / len(x), loss / len(x)


# ---------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: Path):
    import onnx

    model = model.eval()
    x = torch.zeros(2, 32, 32, 3)
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    if "BatchNormalization" in ops:
        raise RuntimeError(f"{path}: BatchNormalization left in the exported graph")
    return m, ops


def ort_top1(path: Path, x, y, batch=500):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input": x[s : s + batch].astype(np.float32)})[0] for s in range(0, len(x), batch)]
    return float(np.mean(np.concatenate(outs).argmax(1) == y)), np.concatenate(outs)


# ---------------------------------------------------------------- training
def bench(arch, args):
    torch.manual_seed(0)
    model = build(arch, args).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(args.batch_size, 32, 32, 3) * 255
    y = torch.randint(0, 10, (args.batch_size,))
    times = []
    for step in range(args.bench_steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times[2:]))
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"arch": arch, "bf16": args.bf16, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
                      "batch": args.batch_size, "step_s": round(per_step, 4), "images_per_s": round(args.batch_size / per_step, 1),
                      "epoch_48k_min": round(48000 / (args.batch_size / per_step) / 60, 2), "params": params,
                      "macs": count_macs(model)}), flush=True)


def one_cycle(frac: float, max_lr: float, pct_start: float, div: float, final_div: float) -> float:
    """OneCycleLR's cosine shape as a function of the fraction of training done (0..1)."""
    lo, hi, end = max_lr / div, max_lr, max_lr / div / final_div
    frac = min(max(frac, 0.0), 1.0)
    if frac < pct_start:
        a, b, t = lo, hi, frac / pct_start
    else:
        a, b, t = hi, end, (frac - pct_start) / (1.0 - pct_start)
    return b + (a - b) * (1.0 + np.cos(np.pi * t)) / 2.0


def train(arch, epochs, minutes, args, data):
    """Train for ``epochs`` epochs, or, when ``minutes`` is set, for that much wall-clock time
    (the learning-rate schedule then follows the fraction of the time budget spent, so the run
    ends on time whatever the CPU contention; the log records the steps actually done)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x_train))  # the files are grouped by class
    val_idx, fit_idx = order[: args.val_size], order[args.val_size :]
    if args.max_steps:
        fit_idx = fit_idx[: args.max_steps * args.batch_size]
    x_val, y_val = x_train[val_idx], y_train[val_idx]
    padded = np.pad(x_train, ((0, 0), (4, 4), (4, 4), (0, 0)))

    model = build(arch, args)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model)
    device = torch.device(args.device)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 and args.no_bn_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(fit_idx) // args.batch_size  # drop the last partial batch
    total_steps = epochs * steps_per_epoch
    budget_s = minutes * 60.0 if minutes else None
    lr_at = lambda frac: one_cycle(frac, args.lr, args.pct_start, args.div_factor, args.final_div_factor)  # noqa: E731
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"cifar10_{arch}"
    log_path = stem.with_suffix(".train.json")
    arch_desc = {
        "resnet20": "ResNet-20 (3x3 basic blocks, 16-32-64, 1x1 conv+BN projection shortcuts)",
        "resnet56": "ResNet-56 (3x3 basic blocks, 9 a stage, 16-32-64, 1x1 conv+BN projection shortcuts)",
        "vgg11_bn": f"VGG-11-BN CIFAR variant, width x{args.vgg_width}",
        "mobilenetv2": f"MobileNetV2 CIFAR variant, width x{args.mbv2_width}, last conv {_make_divisible(args.mbv2_last * max(1.0, args.mbv2_width))}",
    }[arch]
    log = {
        "arch": arch, "description": arch_desc, "params": params, "macs": macs, "epochs": None if budget_s else epochs,
        "time_budget_min": minutes,
        "steps_per_epoch": steps_per_epoch, "batch_size": args.batch_size,
        "fit_images": len(fit_idx), "val_images": len(val_idx),
        "optimizer": {"type": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": args.wd, "no_bn_decay": args.no_bn_decay},
        "schedule": {"type": "one-cycle cosine (OneCycleLR shape, fixed momentum) over " + ("wall-clock time" if budget_s else "steps"), "max_lr": args.lr, "pct_start": args.pct_start, "div_factor": args.div_factor,
                     "final_div_factor": args.final_div_factor},
        "label_smoothing": args.label_smoothing, "augmentation": "random crop 32 of 4-pixel zero pad, horizontal flip p=0.5",
        "seed": args.seed, "bf16_autocast": args.bf16, "channels_last": args.channels_last,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type if device.type == "cpu" else
        f"{device.type}: {torch.cuda.get_device_name(device)}",
        "input": "input: float32 NHWC (N,32,32,3) raw pixels 0..255; model transposes to NCHW and normalises (x/255-mean)/std",
        "normalisation": {"mean": CIFAR_MEAN, "std": CIFAR_STD},
        "output": "logits: (N,10), no softmax",
        "data": str(args.data), "command": " ".join([Path(sys.executable).name] + sys.argv),
        "history": [],
    }
    plan = f"{minutes} min wall-clock budget" if budget_s else f"{epochs} epochs"
    print(f"[{arch}] {arch_desc}: {params} params, {macs / 1e6:.1f} M MACs, {plan} x {steps_per_epoch} steps/epoch", flush=True)
    start = time.time()
    done, lr, epoch, finished = 0, lr_at(0.0), 0, False
    while not finished:
        model.train()
        perm = rng.permutation(fit_idx)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for step in range(steps_per_epoch):
            frac = (time.time() - start) / budget_s if budget_s else done / total_steps
            if frac >= 1.0:
                finished = True
                break
            lr = lr_at(frac)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = to_tensor(augment(padded, idx, rng)).to(device, non_blocking=True)
            yb = torch.from_numpy(y_train[idx]).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = model(xb).float()
            loss = criterion(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(idx)
            if epoch == 0 and step in (19, 99):
                rate = seen / (time.time() - t0)
                proj = f"{minutes * 60 * rate / len(fit_idx):.1f} epochs in the budget" if budget_s else \
                    f"training {epochs * len(fit_idx) / rate / 60:.0f} min"
                print(f"[{arch}] epoch 1 step {step + 1}: {rate:.0f} img/s, projected epoch {len(fit_idx) / rate / 60:.1f} min, {proj}",
                      flush=True)
        if not budget_s and done >= total_steps:
            finished = True
        if seen == 0:
            break
        epoch += 1
        train_s = time.time() - t0
        val_acc, val_loss = evaluate(model, x_val, y_val, bf16=args.bf16, device=device)
        row = {"epoch": epoch, "steps": seen // args.batch_size, "lr_end": round(lr, 6), "loss": round(loss_sum / seen, 4),
               "train_acc": round(correct / seen, 4), "val_loss": round(val_loss, 4), "val_acc": round(val_acc, 4),
               "epoch_s": round(train_s, 1), "images_per_s": round(seen / train_s, 1), "elapsed_s": round(time.time() - start, 1)}
        log["history"].append(row)
        log_path.write_text(json.dumps(log, indent=1))
        print(f"[{arch}] " + json.dumps(row), flush=True)
    log["train_seconds"] = round(time.time() - start, 1)
    log["steps_done"] = done
    log["epochs_done"] = round(done / steps_per_epoch, 2)
    if budget_s:
        log["epochs"] = log["epochs_done"]

    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    torch.save(model.state_dict(), stem.with_suffix(".pt"))
    onnx_path = stem.with_suffix(".onnx")
    _, ops = export_onnx(model, onnx_path)
    log.update({
        "wall_seconds": round(time.time() - start, 1),
        "onnx": onnx_path.name,
        "onnx_ops": {op: ops.count(op) for op in sorted(set(ops))},
        "final_val_acc": log["history"][-1]["val_acc"] if log["history"] else None,
    })
    if x_test is None:
        log_path.write_text(json.dumps(log, indent=1))
        print(f"[{arch}] done in {log['wall_seconds'] / 60:.1f} min; wrote {onnx_path} (no test file: "
              f"run --evaluate where cifar10_test.npz is)", flush=True)
        return
    test_torch, _ = evaluate(model, x_test, y_test)  # float32, no autocast: what the ONNX model computes
    test_ort, ort_out = ort_top1(onnx_path, x_test, y_test)
    with torch.no_grad():
        torch_out = torch.cat([model(to_tensor(x_test[s : s + 500])) for s in range(0, 1000, 500)]).numpy()
    log.update({
        "test_images": len(x_test),
        "test_top1_torch": round(test_torch, 4),
        "test_top1_onnxruntime": round(test_ort, 4),
        "max_abs_logit_diff_torch_vs_ort_first1000": float(np.abs(torch_out - ort_out[:1000]).max()),
    })
    log_path.write_text(json.dumps(log, indent=1))
    print(f"[{arch}] done in {log['wall_seconds'] / 60:.1f} min: test top-1 torch {test_torch:.4f}, onnxruntime {test_ort:.4f}; "
          f"wrote {onnx_path}", flush=True)


def evaluate_exported(arch: str, args, x_test, y_test):
    """Test top-1 of an exported model (onnxruntime, CPU) written into its log: for models trained
    where the test set was not at hand."""
    stem = Path(args.out_dir) / f"cifar10_{arch}"
    log_path = stem.with_suffix(".train.json")
    log = json.loads(log_path.read_text())
    test_ort, _ = ort_top1(stem.with_suffix(".onnx"), x_test, y_test)
    log.update({"test_images": len(x_test), "test_top1_onnxruntime": round(test_ort, 4),
                "test_evaluated": "later, with --evaluate (onnxruntime, CPU)"})
    log_path.write_text(json.dumps(log, indent=1))
    print(f"[{arch}] test top-1 onnxruntime {test_ort:.4f} ({len(x_test)} images); updated {log_path}", flush=True)


def parse_epochs(text: str, archs, kind=int) -> dict:
    if "=" not in text:
        return {a: kind(text) for a in archs}
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = kind(v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="all", choices=ARCHS + ("all",))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="folder with cifar10_train.npz, cifar10_test.npz")
    p.add_argument("--out-dir", default=str(ROOT / "models"))
    p.add_argument("--epochs", default="10", help="N for every arch, or arch=N,arch=N")
    p.add_argument("--minutes", default=None,
                   help="train for a wall-clock budget instead of epochs: M for every arch, or arch=M,arch=M (float minutes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="OneCycle peak learning rate")
    p.add_argument("--pct-start", type=float, default=0.25)
    p.add_argument("--div-factor", type=float, default=10.0)
    p.add_argument("--final-div-factor", type=float, default=100.0)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--no-bn-decay", action="store_true", help="no weight decay on BN and bias parameters")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vgg-width", type=float, default=1.0)
    p.add_argument("--mbv2-width", type=float, default=1.0)
    p.add_argument("--mbv2-last", type=int, default=1280)
    p.add_argument("--mbv2-stage2-stride", type=int, default=1, choices=(1, 2),
                   help="stride of the 24-channel stage: 1 (CIFAR variant, 32x32) or 2 (ImageNet's, 16x16; ~3x cheaper)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training (AMX/AVX512-BF16 CPUs); export is float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device to train on: cpu or cuda")
    p.add_argument("--evaluate", action="store_true",
                   help="only measure the test top-1 of the exported models in --out-dir and write it into their logs")
    p.add_argument("--max-steps", type=int, default=0, help="smoke test: at most this many steps per epoch")
    p.add_argument("--bench", action="store_true", help="only measure training images/s")
    p.add_argument("--bench-steps", type=int, default=10)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    archs = ARCHS if args.arch == "all" else (args.arch,)
    if args.evaluate:
        _, _, x_test, y_test = load_cifar10(Path(args.data), need_train=False)
        for arch in archs:
            evaluate_exported(arch, args, x_test, y_test)
        return
    if args.bench:
        for arch in archs:
            bench(arch, args)
        return
    epochs = parse_epochs(args.epochs, archs)
    minutes = parse_epochs(args.minutes, archs, float) if args.minutes else {}
    data = load_cifar10(Path(args.data))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), archs {archs}, " + (f"minutes {minutes}" if minutes else f"epochs {epochs}"), flush=True)
    for arch in archs:
        train(arch, epochs.get(arch, 10), minutes.get(arch), args, data)


if __name__ == "__main__":
    main()

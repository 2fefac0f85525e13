"""ResNet50 and VGG16 (ImageNet shapes, 224 px, seeded random weights) as ONNX, without torchvision.

The GPU check (tools/gpu_check.sh) builds them on the device machine, which reaches no registry and may
lack torchvision; the architectures are the published ones (ResNet50 v1.5: stride in the 3x3 conv; VGG16
configuration D), exported with BatchNorm folded into the convs (torch.onnx, eval mode), dynamic batch.

    python tools/zoo_models.py resnet50 /tmp/resnet50.onnx
    python tools/zoo_models.py vgg16 /tmp/vgg16.onnx
    python tools/zoo_models.py noise /tmp/noise.npz --shape 64,3,224,224    # seeded inputs for --calibrate
    python tools/zoo_models.py images /tmp/imgs --shape 512,32,32,3         # seeded noise PNGs (--calibrate DIR)
"""
from __future__ import annotations

import argparse

import numpy as np


def resnet50():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def vgg16():
    from torch import nn

    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 1000))


def export(name: str, path: str, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    net = {"resnet50": resnet50, "vgg16": vgg16}[name]().eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so the folded convs are not plain He-init weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        torch.onnx.export(net, torch.randn(1, 3, 224, 224), path, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("resnet50", "vgg16", "noise", "images"))
    parser.add_argument("out")
    parser.add_argument("--shape", default="64,3,224,224", help="noise: the array's shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    if args.what == "noise":
        np.savez(args.out, x=np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    elif args.what == "images":
        from pathlib import Path

        from PIL import Image

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(args.seed).integers(0, 256, shape, dtype=np.uint8)
        for i, image in enumerate(pixels):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    else:
        export(args.what, args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

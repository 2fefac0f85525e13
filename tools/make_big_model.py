"""Write a model over the 2 GB protobuf limit, with external data, to exercise the big-model path.

A chain of N Conv(256 -> 256, 15x15, pads 7) + Relu on a 1x256x8x8 input: each weight is
59 MB of float32, so the default 38 layers hold 2.24 GB. Weights are seeded and written
straight to the data file, one layer at a time (peak memory ~ one layer, not the model).

    python tools/make_big_model.py /tmp/big/big.onnx            # 38 layers, 2.24 GB
    /usr/bin/time -v onnx-tucker /tmp/big/big.onnx /tmp/big/out.onnx --ratio 0.5 --no-check
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def make(path: Path, layers: int, channels: int, kernel: int, spatial: int, seed: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    rng = np.random.default_rng(seed)
    shape = (channels, channels, kernel, kernel)
    scale = 1.0 / np.sqrt(channels * kernel * kernel)
    inits, nodes = [], []
    offset = 0
    x = "input"
    with open(data_path, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
            raw = w.tobytes()
            f.write(raw)
            t = TensorProto(name=f"conv{i}_W", data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
            offset += len(raw)
            inits.append(t)
            y = f"conv{i}_out"
            nodes.append(helper.make_node("Conv", [x, f"conv{i}_W"], [y], name=f"conv{i}", pads=[kernel // 2] * 4))
            x = f"relu{i}_out" if i < layers - 1 else "output"
            nodes.append(helper.make_node("Relu", [y], [x], name=f"relu{i}"))
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, spatial, spatial])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, spatial, spatial])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tools/make_big_model.py")
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return offset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=38)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--kernel", type=int, default=15)
    p.add_argument("--spatial", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    size = make(a.output, a.layers, a.channels, a.kernel, a.spatial, a.seed)
    print(f"wrote {a.output} ({os.path.getsize(a.output):,} bytes) + {a.output.name}.data ({size:,} bytes, {size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()

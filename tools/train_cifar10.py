"""Train the seed report's VGG-style CNN on CIFAR-10 (Keras 3).

The architecture is the seed's exactly (../shared/seed/): six valid 3x3 convs
64-64-128-128-256-256, each followed by ReLU then BatchNormalization(momentum
0.9, epsilon 1e-4), 2x2 max-pool after the 2nd and 4th, Flatten, Dense 512-512
with ReLU+BN, Dense 10 softmax. The seed's input scaling (x/255*2-1) is the
model's first layer, so the model takes raw float pixels 0..255, NHWC.

    python tools/train_cifar10.py --data ../shared/data/cifar10 --epochs 20

Without --data it loads ``keras.datasets.cifar10`` (needs a network).
The model is saved after every epoch, so an interrupted run still leaves the
best model so far.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def build_seed_cnn(num_classes: int = 10):
    """The seed's architecture, with its input scaling as the first layer."""
    import keras
    from keras import layers

    momentum, epsilon = 0.9, 1e-4
    model = keras.Sequential(name="seed_cifar10_cnn")
    model.add(keras.Input(shape=(32, 32, 3), name="pixels"))
    model.add(layers.Rescaling(scale=2.0 / 255.0, offset=-1.0, name="scale_to_pm1"))
    for block, filters in enumerate((64, 128, 256)):
        for j in range(2):
            model.add(layers.Conv2D(filters, 3, padding="valid", name=f"conv{2 * block + j + 1}"))
            model.add(layers.Activation("relu"))
            model.add(layers.BatchNormalization(momentum=momentum, epsilon=epsilon))
        if block < 2:
            model.add(layers.MaxPooling2D(pool_size=2, strides=2))
    model.add(layers.Flatten())
    for k in range(2):
        model.add(layers.Dense(512, name=f"fc{k + 1}"))
        model.add(layers.Activation("relu"))
        model.add(layers.BatchNormalization(momentum=momentum, epsilon=epsilon))
    model.add(layers.Dense(num_classes, name="logits"))
    model.add(layers.Activation("softmax", name="probabilities"))
    return model


def build_resnet(num_classes: int = 10, width: int = 32):
    """A second architecture for the calibration experiments: a small pre-activation-free ResNet
    (same-padded 3x3 convs, BN after conv, residual adds, strided stages, global average pool)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(32, 32, 3), name="pixels")
    x = layers.Rescaling(scale=2.0 / 255.0, offset=-1.0, name="scale_to_pm1")(inputs)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"s{stage}b{block}_conv1")(x)
            y = layers.ReLU()(layers.BatchNormalization()(y))
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"s{stage}b{block}_conv2")(y)
            y = layers.BatchNormalization()(y)
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.BatchNormalization()(
                    layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"s{stage}b{block}_proj")(shortcut)
                )
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Activation("softmax", name="probabilities")(layers.Dense(num_classes, name="logits")(x))
    return keras.Model(inputs, outputs, name="resnet_cifar10")


ARCHITECTURES = {"seed": build_seed_cnn, "resnet": build_resnet}


def load_cifar10(data: str | None):
    """(x_train, y_train, x_test, y_test) as uint8 NHWC images and int labels."""
    if data is None:
        import keras

        (xtr, ytr), (xte, yte) = keras.datasets.cifar10.load_data()
    else:
        root = Path(data)
        train = np.load(root / "cifar10_train.npz") if root.is_dir() else np.load(root)
        xtr, ytr = train["x_train"], train["y_train"]
        test_path = root / "cifar10_test.npz" if root.is_dir() else None
        if test_path is not None and test_path.exists():
            test = np.load(test_path)
            xte, yte = test["x_test"], test["y_test"]
        else:
            xte, yte = None, None
    ytr = ytr.reshape(-1).astype(np.int64)
    yte = None if yte is None else yte.reshape(-1).astype(np.int64)
    return xtr, ytr, xte, yte


def augment(images: np.ndarray, rng: np.random.Generator, shift: int = 4) -> np.ndarray:
    """Random horizontal flips and shifts of up to ``shift`` pixels (reflect padding)."""
    n = len(images)
    flip = rng.random(n) < 0.5
    out = images.copy()
    out[flip] = out[flip, :, ::-1]
    padded = np.pad(out, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    dy = rng.integers(0, 2 * shift + 1, n)
    dx = rng.integers(0, 2 * shift + 1, n)
    rows = dy[:, None] + np.arange(32)[None, :]
    cols = dx[:, None] + np.arange(32)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with cifar10_train.npz/cifar10_test.npz, or one train .npz")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=0, help="train on a seeded subset (quick runs)")
    parser.add_argument("--out", default="models/cifar10_cnn.keras")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="seed", help="seed: the report's CNN (default); resnet: a second architecture")
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(args.seed)
    xtr, ytr, xte, yte = load_cifar10(args.data)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(xtr))
    if args.subset:
        order = order[: args.subset]
    # 2000 held-out training images watch for over-fitting; the test set is only reported.
    n_val = min(2000, len(order) // 10)
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_val, y_val = xtr[val_idx].astype(np.float32), ytr[val_idx]
    x_fit, y_fit = xtr[train_idx], ytr[train_idx]

    steps_per_epoch = int(np.ceil(len(x_fit) / args.batch_size))
    steps = args.epochs * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=args.lr, warmup_steps=max(1, steps // 20)
    )
    build = ARCHITECTURES[args.arch]
    model = build()
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=5e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".train.json")
    history = []

    def save_weights_only_model():
        # A fresh, uncompiled copy: the file holds weights, not optimizer state.
        clean = build()
        clean.set_weights(model.get_weights())
        tmp = out.with_name(out.stem + ".tmp.keras")
        clean.save(tmp)
        os.replace(tmp, out)

    start = time.time()
    for epoch in range(args.epochs):
        # Numpy augmentation keeps the script backend-agnostic (TensorFlow, JAX, torch).
        x_aug = augment(x_fit, rng)
        perm = rng.permutation(len(x_aug))
        logs = model.fit(
            x_aug[perm], y_fit[perm], batch_size=args.batch_size, epochs=epoch + 1, initial_epoch=epoch,
            validation_data=(x_val, y_val), verbose=0, shuffle=False,
        ).history
        row = {k: round(float(v[-1]), 4) for k, v in logs.items() if k != "learning_rate"}
        row["epoch"] = epoch + 1
        row["time_s"] = round(time.time() - start, 1)
        history.append(row)
        save_weights_only_model()
        log_path.write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
        print(json.dumps(row), flush=True)

    result = {"args": vars(args), "history": history, "train_seconds": round(time.time() - start, 1)}
    if xte is not None:
        _, acc = model.evaluate(xte.astype(np.float32), yte, verbose=0, batch_size=500)
        result["test_top1"] = round(float(acc), 4)
        print(f"test top-1: {acc:.4f}")
    log_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

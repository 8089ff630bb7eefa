"""Train the MnistCNN shipped as lowbit_workbench/data/mnist_cnn.safetensors.

    python scripts/train_mnist.py [--epochs 8] [--seed 0] [--out PATH]

Trains on the "train" split (first 8,000 MNIST test images), prints the loss of each epoch, the accuracy
on the "eval" split (last 2,000) and the wall time, then writes the weights. The write goes to a temp
file renamed into place, so an interrupted run never leaves a broken weights file. Same seed and epochs
give a byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from lowbit_workbench.vision import MNIST_WEIGHTS, evaluate_mnist, save_mnist_model, train_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=MNIST_WEIGHTS)
    args = parser.parse_args()

    start = time.perf_counter()

    def log(epoch: int, loss: float, seconds: float) -> None:
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  {seconds:.1f}s", flush=True)

    model = train_mnist(epochs=args.epochs, seed=args.seed, log=log)
    train_seconds = time.perf_counter() - start
    acc = evaluate_mnist(model, "eval")
    save_mnist_model(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"eval accuracy {acc:.2f}%  (2000 images)")
    print(f"training time {train_seconds:.1f}s, total {time.perf_counter() - start:.1f}s")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()

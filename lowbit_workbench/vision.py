"""Small vision models: an MNIST conv net with shipped weights, a ResNet-18 for speed runs, BN folding.

MNIST data is the 10,000-image test set in `lowbit_workbench/data/mnist/` (see the README there), split
by position: "train" is the first 8,000 images, "eval" the last 2,000.
`lowbit_workbench/data/mnist_cnn.safetensors` holds an `MnistCNN` trained by `scripts/train_mnist.py` on
"train" only.

Weights are read and written with safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import copy
import functools
import gzip
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.surgery import fold_conv_bn

from . import DATA_DIR, data_file

MNIST_DIR = DATA_DIR / "mnist"
MNIST_WEIGHTS = DATA_DIR / "mnist_cnn.safetensors"

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SPLITS = {"train": slice(0, 8000), "eval": slice(8000, 10000)}

_IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
_LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
_WEIGHTS_FORMAT = "lowbit.vision.MnistCNN/1"


# ---------------------------------------------------------------- data


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">u4", count=1 + dims)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: IDX magic {int(header[0])}, expected {magic}")
    shape = tuple(int(d) for d in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Cached because decompressing takes a noticeable fraction of a second and tests call this often.
    images = _read_idx(data_file("mnist", _IMAGES_FILE), 2051, 3)
    labels = _read_idx(data_file("mnist", _LABELS_FILE), 2049, 1)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise ValueError(f"unexpected MNIST shapes {images.shape} and {labels.shape}")
    return images, labels


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [n, 1, 28, 28] normalized with mean 0.1307 / std 0.3081, labels int64 [n]).

    `split` is "train" (first 8,000 test-set images) or "eval" (last 2,000). The split is by position,
    so it never changes between runs or machines.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {sorted(MNIST_SPLITS)}")
    images, labels = _mnist_arrays()
    part = MNIST_SPLITS[split]
    x = torch.from_numpy(images[part].astype(np.float32)).div_(255.0)
    x = x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    y = torch.from_numpy(labels[part].astype(np.int64))
    return x, y


# ---------------------------------------------------------------- MNIST model


class MnistCNN(nn.Module):
    """Three conv stages and a two-layer head, about 0.1M parameters.

    Stage 3 is depthwise-separable (a groups=64 3x3 conv then a 1x1 conv) so quantization code meets a
    grouped convolution. Every conv is followed directly by a BatchNorm2d, which `fold_batchnorm` removes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 7 -> 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels each way, filling with the background value."""
    n, _, h, w = x.shape
    background = -MNIST_MEAN / MNIST_STD
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    # One gather for the whole batch: row and column indices of each image's window in the padded batch.
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_mnist(
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_shift: int = 2,
    num_threads: int = 1,
    log: Callable[[int, float, float], None] | None = None,
) -> MnistCNN:
    """Train an `MnistCNN` on the "train" split; the same arguments give the same weights, bit for bit.

    Adam with a one-cycle learning-rate schedule, random shifts of up to `max_shift` pixels as the only
    augmentation. Runs in this process with seeded generators for init, order and augmentation, and with
    deterministic algorithms on. It uses `num_threads` intra-op threads (default 1): how a kernel splits
    its reductions across threads changes float rounding, so a fixed count keeps the machine's core count out
    of the result, and at these tensor sizes extra threads mostly add synchronization cost.
    The global RNG state, determinism flag and thread count are restored afterwards.
    `log(epoch, mean_loss, seconds)` is called after each epoch.
    """
    x_train, y_train = load_mnist("train")
    n = len(x_train)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    old_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MnistCNN()
            data_gen = torch.Generator().manual_seed(seed + 1)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
            )
            model.train()
            for epoch in range(epochs):
                start = time.perf_counter()
                order = torch.randperm(n, generator=data_gen)
                total = 0.0
                for i in range(0, n, batch_size):
                    idx = order[i:i + batch_size]
                    xb = x_train[idx]
                    if max_shift > 0:
                        xb = _random_shift(xb, max_shift, data_gen)
                    loss = F.cross_entropy(model(xb), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item() * len(idx)
                if log is not None:
                    log(epoch, total / n, time.perf_counter() - start)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(old_threads)
    return model.eval()


@torch.no_grad()
def evaluate_mnist(model: nn.Module, split: str = "eval", batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent on `split`, in eval mode (the model's mode is restored after)."""
    x, y = load_mnist(split)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(x)


def save_mnist_model(model: MnistCNN, path: str | os.PathLike) -> None:
    """Write the state dict as safetensors, to a temp file renamed into place so readers never see half."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": _WEIGHTS_FORMAT})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are meant to be readable like any data file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_mnist_model(path: str | os.PathLike | None = None) -> MnistCNN:
    """An `MnistCNN` in eval mode with weights from `path`, by default the shipped ones."""
    path = Path(path) if path is not None else MNIST_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no MNIST weights at {path}; run scripts/train_mnist.py to create them")
    model = MnistCNN()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


# ---------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a strided 1x1 conv + BN projects the shortcut when needed."""

    # (conv, bn) attribute pairs applied back to back, for fold_batchnorm.
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool, fc."""

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_ch = 64
        for i, blocks in enumerate(layers):
            out_ch = 64 * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_ch, out_ch, stride)]
            stage += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        # The usual He init for convs; fc keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet:
    """A ResNet-18 (11.7M parameters at 1000 classes) with random weights fixed by `seed`, in eval mode.

    Untrained: meant for speed measurements, not accuracy. The global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet((2, 2, 2, 2), num_classes)
    return model.eval()


# ---------------------------------------------------------------- BN folding


def _fold_module(module: nn.Module) -> int:
    folded = 0
    if isinstance(module, nn.Sequential):
        children = list(module._modules.items())
        for (_, first), (name, second) in itertools.pairwise(children):
            if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                fold_conv_bn(first, second)
                module._modules[name] = nn.Identity()
                folded += 1
    for conv_name, bn_name in getattr(module, "conv_bn_pairs", ()):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fold_conv_bn(conv, bn)
            setattr(module, bn_name, nn.Identity())
            folded += 1
    for child in module.children():
        folded += _fold_module(child)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model`, in eval mode, with each BatchNorm2d that directly follows a Conv2d folded into it.

    Pairs are found as adjacent children of an nn.Sequential, or as attribute names listed in a module's
    `conv_bn_pairs` (as `BasicBlock` and `ResNet` do). The BN becomes nn.Identity and the conv gains a bias,
    so the copy computes what the original computes in eval mode. The original is not modified.
    """
    folded = copy.deepcopy(model)
    _fold_module(folded)
    return folded.eval()

import time

import pytest
import torch
from torch import nn

from lowbit_workbench import vision


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    # Fresh BNs have mean 0 / var 1 / weight 1 / bias 0, which would make folding nearly a no-op.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_load_mnist_splits():
    x_tr, y_tr = vision.load_mnist("train")
    x_ev, y_ev = vision.load_mnist("eval")
    assert x_tr.shape == (8000, 1, 28, 28) and x_ev.shape == (2000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.shape == (8000,) and y_ev.shape == (2000,)
    y = torch.cat([y_tr, y_ev])
    assert int(y.min()) == 0 and int(y.max()) == 9
    # The known label distribution of the MNIST test set.
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Normalized: background pixels sit at -mean/std, the whole set is roughly zero-mean unit-variance.
    assert float(x_tr.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert abs(float(x_tr.mean())) < 0.05 and abs(float(x_tr.std()) - 1) < 0.05
    # Split by position: first 8000 then last 2000, the same on every call.
    assert y_tr[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.equal(vision.load_mnist("eval")[0], x_ev)


@pytest.mark.parametrize("name", ["test", "val", "", "Train"])
def test_load_mnist_bad_split(name):
    with pytest.raises(ValueError, match="unknown MNIST split"):
        vision.load_mnist(name)


def test_shipped_model_accuracy():
    assert vision.MNIST_WEIGHTS.stat().st_size < 1_000_000
    start = time.perf_counter()
    model = vision.load_mnist_model()
    acc = vision.evaluate_mnist(model, "eval")
    assert time.perf_counter() - start < 10
    assert acc >= 97.5
    assert not model.training


def test_save_load_roundtrip(tmp_path):
    model = vision.load_mnist_model()
    path = tmp_path / "m.safetensors"
    vision.save_mnist_model(model, path)
    again = vision.load_mnist_model(path)
    x = vision.load_mnist("eval")[0][:16]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_load_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        vision.load_mnist_model(tmp_path / "none.safetensors")


def test_mnist_cnn_has_grouped_conv():
    convs = [m for m in vision.MnistCNN().modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups > 1 for c in convs)


def test_fold_batchnorm_mnist():
    model = vision.load_mnist_model()
    folded = vision.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = vision.load_mnist("eval")[0][:64]
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert _rel_err(out, ref) < 1e-5
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_fold_batchnorm_resnet18():
    model = vision.resnet18(num_classes=10)
    _randomize_bn(model)
    folded = vision.fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 20  # stem + 2 per block x 8 + 3 downsample projections
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel_err(folded(x), model(x)) < 1e-5


def test_resnet18_shape_and_params():
    model = vision.resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # the standard ResNet-18 count
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000)
    assert vision.resnet18(num_classes=7).fc.out_features == 7


def test_resnet18_seeded():
    state = torch.get_rng_state()
    a, b, c = vision.resnet18(seed=0), vision.resnet18(seed=0), vision.resnet18(seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.conv1.weight, b.conv1.weight) and torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)

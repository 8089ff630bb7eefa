"""Nested checkpoints (lowbit.nested): one save, loads at 8, 4, 3 and 2 bits reading only what each needs."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.checkpoint import CheckpointError


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()


X = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))


def rel_err(m):
    with torch.no_grad():
        ref = model()(X)
        return float((m(X) - ref).norm() / ref.norm())


def quantized(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(model(), recipe)


@pytest.mark.parametrize("base", ["int8-g128", "int8-g128-asym", "int8", "int4-g128", "int4-g64-hqq"])
def test_full_width_is_the_saved_model(tmp_path, base):
    q = quantized(base)
    lowbit.save(q, tmp_path / "n", nested=True)
    manifest = json.loads((tmp_path / "n" / "lowbit.json").read_text())
    assert manifest["layers"]["0"]["nested"]["bits"] == int(base[3])
    assert set(manifest["tensor_sha256"]) >= {"0.plane0", "2.bias"}
    back = lowbit.load(tmp_path / "n", model=model())
    assert torch.equal(back(X), q(X))
    assert [r["recipe"] for r in lowbit.summary(back)] == [r["recipe"] for r in lowbit.summary(q)]


@pytest.mark.parametrize("base", ["int8-g128-asym", "int8-g128"])
def test_lower_widths_read_less_and_hold_up(tmp_path, base):
    q = quantized(base)
    lowbit.save(q, tmp_path / "n", nested=True)
    read = {}
    for b in (8, 4, 3, 2):
        m = lowbit.load(tmp_path / "n", model=model(), bits=b)
        read[b] = m.lowbit_nested["bytes_read"]
        rows = lowbit.summary(m)
        assert all(r["recipe"] == (f"int{b}-g128" if b < 8 else base) for r in rows), rows
        if b < 8:
            dedicated = quantized(f"int{b}-g128")
            assert [r["kernel"] for r in rows] == [r["kernel"] for r in lowbit.summary(dedicated)]
            assert [r["bits_per_weight"] for r in rows] == [r["bits_per_weight"] for r in lowbit.summary(dedicated)]
            # Codes from the 8-bit ones with their own least-squares scales: no worse than rounding anew.
            assert rel_err(m) <= 1.05 * rel_err(dedicated), b
    assert read[8] > read[4] > read[3] > read[2]
    # Per weight: b bits of codes and two 16-bit values per group of 128, plus the biases.
    weights = 256 * 512 + 512 * 128
    biases = 4 * (512 + 128)
    for b in (4, 3, 2):
        assert read[b] == weights * b // 8 + weights // 128 * 4 + biases


def test_only_the_needed_tensors_are_read(tmp_path):
    q = quantized("int4-g128")
    path = lowbit.save(q, tmp_path / "n", nested=True)
    # Damage the least significant plane of the first layer: a 2-bit load never reads it; a full one does.
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    size = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, JSON header, data
    header = json.loads(bytes(data[8:8 + size]))
    data[8 + size + header["0.plane3"]["data_offsets"][0]] ^= 0xFF
    file.write_bytes(bytes(data))
    two = lowbit.load(path, model=model(), bits=2)
    assert two.lowbit_nested["bits"] == 2
    with pytest.raises(CheckpointError, match="0.plane3"):
        lowbit.load(path, model=model())


def test_nested_errors(tmp_path):
    q = quantized("int4-g128")
    lowbit.save(q, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not saved nested"):
        lowbit.load(tmp_path / "plain", model=model(), bits=2)
    lowbit.save(q, tmp_path / "n", nested=(4, 2))
    with pytest.raises(CheckpointError, match="widths"):
        lowbit.load(tmp_path / "n", model=model(), bits=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a8 = lowbit.quantize(model(), "w8a8-dynamic", backend="reference")
    with pytest.raises(ValueError, match="no weight-only integer layer"):
        lowbit.save(w8a8, tmp_path / "w", nested=True)
    assert not (tmp_path / "w").exists()
    # A wider load than stored gives the stored width.
    four = lowbit.load(tmp_path / "n", model=model(), bits=8)
    assert torch.equal(four(X), q(X))


def test_embedding_tables_nest_too(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(300, 128), nn.Linear(128, 64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(m, "int8-g128")
    ids = torch.randint(0, 300, (4, 9))
    lowbit.save(q, tmp_path / "n", nested=True)
    assert torch.equal(lowbit.load(tmp_path / "n", model=copy.deepcopy(m)).eval()(ids), q(ids))
    four = lowbit.load(tmp_path / "n", model=copy.deepcopy(m), bits=4)
    assert [r["recipe"] for r in lowbit.summary(four)] == ["int4-g128", "int4-g128"]
    assert four.lowbit_nested["bytes_read"] == (300 + 64) * 128 // 2 + (300 + 64) * 4 + 4 * 64

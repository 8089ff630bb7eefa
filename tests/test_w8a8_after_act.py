"""W8A8 dynamic layers fed by an elementwise activation: found during calibration, saved, and traced with
lowbit's opaque row quantization (the same codes as the torch-op form the compiler would fuse)."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import lowbit_cpu, onednn
from lowbit.w8a8 import W8A8Linear

pytestmark = pytest.mark.skipif(not lowbit_cpu.available() or not onednn.available(),
                                reason="needs lowbit._C and oneDNN's int8 kernels")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 48), nn.Linear(48, 16)).eval()


def calibration():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 64, generator=gen) for _ in range(4)]


def test_found_in_calibration_and_saved(tmp_path):
    q = lowbit.quantize(model(), "w8a8-dynamic", calibration=calibration(), keep_float_if_slower=False)
    flags = {name: m.after_act for name, m in q.named_modules() if isinstance(m, W8A8Linear)}
    # "3" reads GELU's output (through an eval-mode dropout); "0" reads the input, "4" a linear's output.
    assert flags == {"0": False, "3": True, "4": False}
    assert "input from an activation" in repr(q[3])
    lowbit.save(q, tmp_path / "m")
    loaded = lowbit.load(tmp_path / "m", model=model())
    assert {n: m.after_act for n, m in loaded.named_modules() if isinstance(m, W8A8Linear)} == flags
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_without_calibration_nothing_is_assumed():
    q = lowbit.quantize(model(), "w8a8-dynamic", keep_float_if_slower=False)
    assert not any(m.after_act for m in q.modules() if isinstance(m, W8A8Linear))


def test_traced_with_the_opaque_quantization_same_bits():
    if not onednn.int_mm_dynamic():
        pytest.skip("no int8 x int8 matmul with int32 results here (VNNI): traced W8A8 runs one opaque op")
    q = lowbit.quantize(model(), "w8a8-dynamic", calibration=calibration(), keep_float_if_slower=False)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(32, 64)  # past the GEMV's few rows: the traced int8-matmul form
    with torch.no_grad():
        eager = q(x)
        traced = torch.compile(copy.deepcopy(q), backend=record)(x)
        aot = torch.compile(copy.deepcopy(q), backend="aot_eager")(x)
    assert torch.equal(traced, eager) and torch.equal(aot, eager)
    graph = graphs[0]
    # layer "3" only; the others quantize in torch ops the compiler fuses with the op before
    assert graph.count("target=torch.ops.lowbit.quantize_rows_s8") == 1
    assert graph.count("target=torch._int_mm") == 3

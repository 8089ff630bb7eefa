"""Dynamic W8A8 on int8 x int8 products (torch._int_mm): the C++ quantize/epilogue ops against their
torch-op forms (bit for bit: what a compiled or exported graph computes) and against the reference kernel."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.backends import lowbit_cpu, onednn, ops
from lowbit.w8a8 import W8A8Linear, fake_quant_rows

needs_kernel = pytest.mark.skipif(not lowbit_cpu.available(), reason="lowbit._C not available")
needs_int_mm = pytest.mark.skipif(not (onednn.available() and onednn.int_mm_dynamic()),
                                  reason="the int8 x int8 path runs on CPUs with VNNI only (this one has none, "
                                         "or oneDNN / lowbit._C is missing)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4 + torch.rand(m, 1, generator=g)
    x[0] = 0.0  # the smallest step
    if m > 2:
        x[1] = x[1].abs() + 1  # all positive: zero point 0
        x[2] = -x[2].abs() - 1  # all negative: zero point 255
    return x


@needs_kernel
@pytest.mark.parametrize("m,k", [(1, 7), (37, 203), (128, 384), (9, 1536)])
def test_s8_codes_are_the_u8_codes_shifted_and_the_torch_form_matches(m, k):
    C = lowbit_cpu.ops()
    x = activations(m, k, seed=m + k)
    q, s, z = C.quantize_rows_s8(x)
    qu, su, zu = C.quantize_rows_u8(x)
    assert q.dtype == torch.int8 and torch.equal(q.int(), qu.int() - 128)
    assert torch.equal(s, su) and torch.equal(z, zu)
    qt, st, zt = ops.quantize_rows_s8_traceable(x)
    assert torch.equal(q, qt) and torch.equal(s, st) and torch.equal(z, zt)
    # dequantized: what the reference kernel feeds its float matmul
    assert torch.equal((q.float() + 128 - z[:, None]) * s[:, None], fake_quant_rows(x))


@needs_kernel
def test_s8_quantize_rejects_nan():
    x = torch.randn(4, 16)
    x[1, 5] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        lowbit_cpu.ops().quantize_rows_s8(x)


@needs_kernel
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
def test_int_epilogue_is_the_torch_form_bit_for_bit(bias, relu):
    g = torch.Generator().manual_seed(1)
    m, n = 33, 70  # a tail after the 8-wide vectors
    acc = torch.randint(-2**20, 2**20, (m, n), dtype=torch.int32, generator=g)
    sx, sw = torch.rand(m, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    zx = torch.randint(0, 256, (m,), dtype=torch.int32, generator=g)
    csw, b = torch.randn(n, generator=g), (torch.randn(n, generator=g) if bias else None)
    y = lowbit_cpu.ops().int_row_epilogue(acc, sx, zx, sw, csw, b, relu)
    assert torch.equal(y, ops.int_row_epilogue_traceable(acc, sx, zx, sw, csw, b, relu))
    ref = acc.double() * sx[:, None].double() * sw.double() + (sx * (128 - zx)).double()[:, None] * csw.double()
    ref = ref + (b.double() if bias else 0)
    assert rel_err(y, ref.relu() if relu else ref) < 1e-6


@needs_int_mm
@pytest.mark.parametrize("k,n,rows", [(384, 1536, 128), (37, 5, 9), (1536, 384, 33)])
def test_layer_on_int_mm_matches_the_reference_and_its_compiled_form(k, n, rows):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), "w8a8-dynamic", backend="onednn")[0]
    assert isinstance(q, W8A8Linear) and q.kernel_name == "onednn"
    x = activations(rows, k, seed=k) * 2
    with torch.no_grad():
        y = q(x)
        # the reference kernel computes the same codes times the dequantized weight in float32
        assert rel_err(y, F.linear(fake_quant_rows(x), q.dequantized_weight(), q.bias)) < 1e-6
        q.set_kernel("reference")
        assert rel_err(y, q(x)) < 1e-6
        q.set_kernel("onednn")
        torch._dynamo.reset()
        yc = torch.compile(q, fullgraph=True)(x)
    assert torch.equal(yc, y)  # same codes, same rounding steps


def test_real_model_layers_match_the_reference_on_real_activations():
    """all-MiniLM-L6-v2's own linears on their own inputs (captured from a float forward)."""
    if not (onednn.available() and onednn.int_mm_dynamic()):
        pytest.skip("the int8 x int8 path runs on CPUs with VNNI only")
    from lowbit import hf

    try:
        path = hf.resolve_model_path(hf.MINILM)
        model, tok = hf.load_hf_model(path)
    except Exception as e:  # noqa: BLE001 - not every checkout has the model
        pytest.skip(f"all-MiniLM-L6-v2 not available here: {e}")
    layer = model.encoder.layer[0]
    linears = {"query": layer.attention.self.query, "fc1": layer.intermediate.dense, "fc2": layer.output.dense}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0].reshape(-1, a[0].shape[-1])))
             for name, m in linears.items()]
    batch = tok(["A man is playing a guitar.", "The quantized model keeps its accuracy on real text."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    for name, lin in linears.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), "w8a8-dynamic", backend="onednn")[0]
        x = seen[name]
        with torch.no_grad():
            y = q(x)
            assert rel_err(y, F.linear(fake_quant_rows(x), q.dequantized_weight(), q.bias)) < 1e-6, name
            assert rel_err(y, lin(x)) < 0.02, name

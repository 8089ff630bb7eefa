"""lowbit's int8-activation GEMV (lowbit_cpu.linear_q8, kernel "lowbit_q8") on every path this CPU runs.

Reference: the activations rounded as the kernel documents (per block of 32 columns of the padded K,
q = round(x * 127 / max|x|), step max|x| / 127), in float64, times the dequantized weight. The kernel's
integer sums are exact, so it matches that reference up to float32 summation order; its distance to the
float-activation result is the activations' rounding, checked to stay in a stated band.
"""

import copy

import pytest
import torch
from torch import nn

from lowbit.backends import lowbit_cpu

pytestmark = pytest.mark.skipif(
    not lowbit_cpu.available() or lowbit_cpu.q8_path() == "none",
    reason="lowbit._C not built (or built without the int8-activation GEMV), or CPU without AVX2+FMA",
)

TOL = 1e-5
# Odd N, K not a multiple of 32 (per-channel), groups of 32/64/128/96 and per-channel.
SHAPES = [(37, 256, 32), (45, 384, 64), (33, 512, 128), (29, 200, 200), (7, 192, 96), (70, 328, 328), (40, 96, 96)]
ROWS = (1, 2, 5, 17)  # 17: more rows than the per-thread scratch takes


def canonical(n, k, bits, g, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.05 + 0.001
    zero = torch.randint(0, 2**bits, (n, k // g), generator=gen).float()
    zero = zero + torch.rand(n, k // g, generator=gen) - 0.5
    return codes, scale, zero


def weight(codes, scale, zero, g):
    return (codes.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it (blocks of 32 columns from column 0), in float64."""
    m, k = x.shape
    nb = (k + 31) // 32
    blocks = torch.zeros(m, nb * 32)
    blocks[:, :k] = x
    blocks = blocks.view(m, nb, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return (q.double() * (amax.double() / 127)).view(m, -1)[:, :k]


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# "vnni": AVX-512 VNNI (runs on the avx512 kernel path); "avx2": vpmaddubsw (the avx2 path).
@pytest.fixture(params=["vnni", "avx2"])
def path(request):
    isa = "avx512" if request.param == "vnni" else "avx2"
    if isa not in lowbit_cpu.isas():
        pytest.skip(f"int8-activation path {request.param} not run: this CPU lacks avx512f/bw/vl/vbmi "
                    f"(it runs {', '.join(lowbit_cpu.isas())})")
    before = lowbit_cpu.isa()
    lowbit_cpu.set_isa(isa)
    if lowbit_cpu.q8_path() != request.param:
        lowbit_cpu.set_isa(before)
        pytest.skip(f"int8-activation path {request.param} not run: this CPU lacks avx512_vnni")
    yield request.param
    lowbit_cpu.set_isa(before)


@pytest.mark.parametrize("bits", lowbit_cpu.Q8_BITS)
@pytest.mark.parametrize("half", [False, True], ids=["f32-scales", "f16-scales"])
def test_path_matches_reference(path, bits, half):
    for n, k, g in SHAPES:
        codes, scale, zero = canonical(n, k, bits, g, seed=bits * 100 + n)
        if half:
            scale, zero = scale.half(), zero.half()
        packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
        w = weight(codes, scale.float(), zero.float(), g)
        bias = torch.randn(n)
        for m in ROWS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            x[0, :32] *= 100  # blocks of very different ranges in one row
            y = lowbit_cpu.linear_q8(x, packed, bits, g, n, k, bias)
            float_ref = x.double() @ w.T + bias.double()
            ref = q8_activations(x) @ w.T + bias.double()
            err = rel_err(y, ref)
            assert err < TOL, f"{path} bits={bits} n={n} k={k} g={g} m={m}: {err:.2e}"
            # The rounding of the activations moves the result by well under 2% (8-bit steps per block).
            assert rel_err(y, float_ref) < 0.02


@pytest.mark.parametrize("bits", lowbit_cpu.Q8_BITS)
def test_largest_sums_stay_exact(path, bits):
    """Every code at its maximum against activations at +-127 steps: the largest integer sums each path's
    accumulators see (int16 pairs on AVX2, int3's products carrying 2^7) must not saturate or wrap."""
    n, k, g = 40, 512, 128
    codes = torch.full((n, k), 2**bits - 1, dtype=torch.uint8)
    codes[1::2, ::3] = 0  # some rows mixed
    scale = torch.full((n, k // g), 0.01)
    zero = torch.zeros(n, k // g)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    w = weight(codes, scale, zero, g)
    x = torch.ones(2, k)
    x[1] = -1.0
    x[1, 64:96] = 3.0  # one block of the other sign
    y = lowbit_cpu.linear_q8(x, packed, bits, g, n, k)
    ref = q8_activations(x) @ w.T
    assert rel_err(y, ref) < TOL, f"{path} bits={bits}"


def test_scratch_reuse_across_shapes():
    """Few-row calls keep their rounded activations in memory reused across calls: a call after calls of
    other widths (the scratch grown, then partly overwritten) gives the bits of the first call."""
    layers = []
    for n, k, g in [(64, 512, 128), (40, 2048, 32), (33, 96, 96)]:
        codes, scale, zero = canonical(n, k, 4, g, seed=k)
        layers.append((lowbit_cpu.prepack(codes, scale, zero, 4, g), n, k, g, torch.randn(3, k)))
    first = [lowbit_cpu.linear_q8(x, p, 4, g, n, k) for p, n, k, g, x in layers]
    for _ in range(2):
        for (p, n, k, g, x), y in zip(reversed(layers), reversed(first)):
            assert torch.equal(lowbit_cpu.linear_q8(x, p, 4, g, n, k), y)
            assert torch.equal(lowbit_cpu.linear(x, p, 4, g, n, k), lowbit_cpu.linear(x.clone(), p, 4, g, n, k))


def test_zero_and_tiny_blocks():
    n, k, g, bits = 32, 128, 32, 4
    codes, scale, zero = canonical(n, k, bits, g, seed=3)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    x = torch.zeros(2, k)
    x[1, 40] = 1e-30  # one tiny value alone in its block: exact after rounding (it is the block's max)
    y = lowbit_cpu.linear_q8(x, packed, bits, g, n, k)
    assert torch.equal(y[0], torch.zeros(n))
    ref = (x.double() @ weight(codes, scale, zero, g).T)[1]
    assert rel_err(y[1], ref) < TOL


def test_refuses_other_bits():
    codes, scale, zero = canonical(32, 64, 1, 32, seed=1)
    packed = lowbit_cpu.prepack(codes, scale, zero, 1, 32)
    with pytest.raises(ValueError, match="8, 4, 3, 2"):
        lowbit_cpu.linear_q8(torch.randn(1, 64), packed, 1, 32, 32, 64)
    with pytest.raises(RuntimeError, match="8/4/3/2-bit"):
        lowbit_cpu._C.linear_q8(torch.randn(1, 64), packed["qweight"], 1, 32, 32, 64)


def test_kernel_by_name_and_in_a_route():
    import lowbit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 64)).eval()
    x = torch.randn(3, 256)
    plain = lowbit.quantize(copy.deepcopy(model), "int4-g32", backend="lowbit_cpu")
    q8 = lowbit.quantize(copy.deepcopy(model), "int4-g32", backend="lowbit_q8<=2,lowbit_cpu")
    rows = lowbit.summary(q8)
    assert rows[0]["kernel"] == "lowbit_q8<=2,lowbit_cpu" and rows[0]["act_dtype"] == "int8"
    with torch.no_grad():
        few, many = q8(x[:2]), q8(x)
        assert torch.equal(many, plain(x))  # 3 rows: past the bound, the float-activation kernel
        cos = torch.nn.functional.cosine_similarity(few, plain(x[:2]), dim=-1)
        assert not torch.equal(few, plain(x[:2])) and cos.min().item() > 0.999
    # backend="auto" never picks it: the activations' rounding is the user's choice.
    from lowbit.backends import AUTO_ORDER
    assert "lowbit_q8" not in AUTO_ORDER
    with pytest.raises(ValueError, match="lowbit_q8"):
        lowbit.quantize(copy.deepcopy(model), "kmeans4", backend="lowbit_q8")


def test_traced_op_gives_the_same_bits():
    from lowbit.backends import ops

    n, k, g, bits = 64, 256, 64, 4
    codes, scale, zero = canonical(n, k, bits, g, seed=5)
    qw = lowbit_cpu.prepack(codes, scale, zero, bits, g)["qweight"]
    x = torch.randn(2, k)
    eager = ops.linear_q8(x, qw, bits, g, n, k)
    graph = torch.compile(lambda t: ops.linear_q8(t, qw, bits, g, n, k) * 1.0, backend="aot_eager")(x)
    assert torch.equal(eager, graph)


def test_direct_eager_call_follows_the_layer():
    import lowbit
    from lowbit.modules import QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96)).eval()
    q = lowbit.quantize(copy.deepcopy(model), "int4-g32", backend="lowbit_q8<=4,lowbit_cpu")
    layer = q[0]
    assert isinstance(layer, QuantLinear) and layer._fast is not None
    twin = copy.deepcopy(layer)
    # A copy's direct call reads the copy's own packed weight, not the original's.
    assert twin._fast[2] is twin._route[0][2]
    assert twin._fast[2]["qweight"].data_ptr() != layer._fast[2]["qweight"].data_ptr()
    x = torch.randn(2, 3, 128)  # 6 rows: past the bound, through the route's second kernel
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))
        assert torch.equal(layer(x), layer._route[1][1].run(x.reshape(6, 128), layer._route[1][2], layer.spec,
                                                               layer.bias).reshape(2, 3, 96))
        few = x[:1, :2]
        assert torch.equal(layer(few), lowbit_cpu.linear_q8(few, layer._fast[2], 4, 32, 96, 128, layer.bias))

"""lowbit's CPU kernel (lowbit._C through lowbit.backends.lowbit_cpu) against a float reference.

Reference: y_ref = x @ W.T (+ bias) in float64, W = (codes - zero) * scale from the canonical data.
The kernel works in float32 and sums per group, so it is held to ||y - y_ref|| / ||y_ref|| < 1e-5
(a float32 matmul of these sizes lands around 1e-7).
"""


import pytest
import torch

from lowbit.backends import lowbit_cpu

pytestmark = pytest.mark.skipif(
    not lowbit_cpu.available(),
    reason="lowbit._C not built or CPU without AVX2+FMA (build: pip install --no-build-isolation -e .)",
)

TOL = 1e-5
BITS = (1, 2, 3, 4, 8)


def canonical(n, k, bits, g, seed=0, fractional_zero=False):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.05 + 0.001
    zero = torch.randint(0, 2**bits, (n, k // g), generator=gen).float()
    if fractional_zero:
        zero = zero + torch.rand(n, k // g, generator=gen) - 0.5
    return codes, scale, zero


def dequant_ref(codes, scale, zero, g):
    return (codes.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(x, codes, scale, zero, g, bias=None):
    y = x.double() @ dequant_ref(codes, scale, zero, g).T
    return y if bias is None else y + bias.double()


# (n, k, group_size): odd N everywhere; group sizes 32, 64, 128 and per-channel (including a K that is
# not a multiple of 8, so the padding of K is exercised).
SHAPES = [(37, 256, 32), (45, 384, 64), (33, 512, 128), (29, 200, 200), (40, 256, 256)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_matches_reference(bits, n, k, g, m):
    codes, scale, zero = canonical(n, k, bits, g, seed=bits * 1000 + k + m)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    for b in (None, bias):
        y = lowbit_cpu.linear(x, packed, bits, g, n, k, b)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert rel_err(y, reference(x, codes, scale, zero, g, b)) < TOL


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("path", [1, 2])  # 1: streaming GEMV, 2: dequantize + GEMM
@pytest.mark.parametrize("m", [1, 5, 130])
def test_both_paths_any_m(bits, path, m):
    n, k, g = 70, 320, 64
    codes, scale, zero = canonical(n, k, bits, g, seed=7, fractional_zero=True)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    y = lowbit_cpu._C.linear(x, packed["qweight"], bits, g, n, k, bias, path)
    assert rel_err(y, reference(x, codes, scale, zero, g, bias)) < TOL


def test_leading_dims_and_dtypes():
    n, k, g, bits = 37, 256, 32, 4
    codes, scale, zero = canonical(n, k, bits, g)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    x = torch.randn(2, 3, 5, k)
    y = lowbit_cpu.linear(x, packed, bits, g, n, k)
    assert y.shape == (2, 3, 5, n)
    ref = reference(x.reshape(-1, k), codes, scale, zero, g).reshape(2, 3, 5, n)
    assert rel_err(y, ref) < TOL
    # A non-contiguous input gives the same result as its contiguous copy.
    xt = torch.randn(k, 6).t()
    assert torch.equal(lowbit_cpu.linear(xt, packed, bits, g, n, k),
                       lowbit_cpu.linear(xt.contiguous(), packed, bits, g, n, k))
    # bf16 in, bf16 out (computed in float32 from the upcast input).
    xb = torch.randn(4, k).to(torch.bfloat16)
    yb = lowbit_cpu.linear(xb, packed, bits, g, n, k)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb.float(), reference(xb.float(), codes, scale, zero, g)) < 1e-2
    # Empty batch.
    assert lowbit_cpu.linear(torch.randn(0, k), packed, bits, g, n, k).shape == (0, n)


@pytest.mark.parametrize("bits", BITS)
def test_deterministic(bits):
    n, k, g = 45, 384, 128
    codes, scale, zero = canonical(n, k, bits, g, seed=3)
    p1 = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    p2 = lowbit_cpu.prepack(codes.clone(), scale.clone(), zero.clone(), bits, g)
    assert torch.equal(p1["qweight"], p2["qweight"])  # re-derived buffers are byte-identical
    for m in (1, 4, 300):
        x = torch.randn(m, k)
        y1 = lowbit_cpu.linear(x, p1, bits, g, n, k)
        y2 = lowbit_cpu.linear(x.clone(), p2, bits, g, n, k)
        assert torch.equal(y1, y2)
        # The same values at an address off the allocator's alignment give the same bits.
        shifted = torch.empty(m * k + 1)[1:].view(m, k).copy_(x)
        assert torch.equal(lowbit_cpu.linear(shifted, p1, bits, g, n, k), y1)


# Tiles (32 rows each) against threads: fewer tiles than 4 per thread take fixed shares; more are shared
# out with stealing from the back of a slower thread's share (lowbit_cpu.cpp parallel_chunks).
@pytest.mark.parametrize("n", [40, 300, 2000])
@pytest.mark.parametrize("q8", [False, True])
def test_gemv_independent_of_thread_count(n, q8):
    k, g, bits = 512, 64, 4
    codes, scale, zero = canonical(n, k, bits, g)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    x = torch.randn(3, k)

    def run():
        if q8:
            return lowbit_cpu.linear_q8(x, packed, bits, g, n, k)
        return lowbit_cpu._C.linear(x, packed["qweight"], bits, g, n, k, None, 1)

    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    assert rel_err(outs[0], reference(x, codes, scale, zero, g)) < (2e-2 if q8 else TOL)


@pytest.mark.parametrize("bits", BITS)
def test_dequant_matches_canonical(bits):
    n, k, g = 37, 256, 64
    codes, scale, zero = canonical(n, k, bits, g, fractional_zero=True)
    packed = lowbit_cpu.prepack(codes, scale, zero, bits, g)
    w = lowbit_cpu.dequant(packed, bits, g, n, k)
    ref = dequant_ref(codes, scale, zero, g)
    assert w.shape == (n, k)
    # scale * code - scale * zero with one rounding against (code - zero) * scale in float64.
    assert (w.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item() + 1e-7


def test_supports():
    assert lowbit_cpu.supports(2048, 2048, 4, 128)
    assert lowbit_cpu.supports(8192, 2048, 2, 32)
    assert lowbit_cpu.supports(2048, 8192, 8, 8192)  # per-channel
    assert lowbit_cpu.supports(37, 100, 3, 100)  # per-channel, K not a multiple of 8
    assert lowbit_cpu.supports(7, 192, 3, 96)  # groups: any multiple of 32
    assert not lowbit_cpu.supports(16, 256, 5, 32)  # no 5-bit layout
    assert not lowbit_cpu.supports(16, 256, 4, 16)  # group below 32
    assert not lowbit_cpu.supports(16, 250, 4, 32)  # K not a multiple of the group
    assert not lowbit_cpu.supports(0, 256, 4, 32)
    for n, k, bits, g in [(16, 256, 5, 32), (16, 256, 4, 16), (16, 250, 4, 32)]:
        assert lowbit_cpu._C.supports(n, k, bits, g) == lowbit_cpu.supports(n, k, bits, g)


def test_bad_input_raises():
    n, k, g = 16, 64, 32
    codes, scale, zero = canonical(n, k, 2, g)
    with pytest.raises(RuntimeError, match="does not fit"):
        lowbit_cpu.prepack(codes | 4, scale, zero, 2, g)  # a code of 4+ in 2 bits
    with pytest.raises(ValueError):
        lowbit_cpu.prepack(codes, scale, zero, 4, 16)
    packed = lowbit_cpu.prepack(codes, scale, zero, 2, g)
    with pytest.raises(RuntimeError):
        lowbit_cpu.linear(torch.randn(1, k + 1), packed, 2, g, n, k)
    with pytest.raises(RuntimeError, match="does not match"):
        lowbit_cpu.linear(torch.randn(1, k), packed, 4, g, n, k)  # buffer packed for 2 bits


@pytest.mark.parametrize("k", [16, 40, 48, 72, 200, 384])
def test_torch_int8pack_takes_only_the_inputs_it_computes_right(k):
    # PyTorch's int8 weight-only op returns inf/NaN or crashes for K % 16 == 8: such layers go elsewhere.
    from lowbit import core
    from lowbit.backends import KERNELS, LayerSpec, StoredWeight
    from lowbit.formats import AffineScheme

    spec = LayerSpec(n=32, k=k, bits=8, group_size=k, symmetric=True)
    kernel = KERNELS["torch_int8pack"]
    if k % 16:
        assert not kernel.supports(spec)
        return
    assert kernel.supports(spec)
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(1, 256, (32, k), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(32, 1, generator=g) + 0.5, torch.full((32, 1), 128.0)
    state = {"qweight": core.pack_bits(codes, 8), "scale": scale, "zero_point": zero}
    prep = kernel.prepare(StoredWeight(AffineScheme(8, symmetric=True), state, (32, k)), spec)
    for m in (1, 4, 33):
        x = torch.randn(m, k, generator=g)
        ref = x @ ((codes.float() - zero) * scale).T
        y = kernel.run(x, prep, spec, None).float()
        assert ((y - ref).abs().max() / ref.abs().max()) < 2e-2

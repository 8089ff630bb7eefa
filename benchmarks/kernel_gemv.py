"""Decode-time matmul speed of lowbit's CPU kernel against torch, on one Llama-3.2-1B decoder layer.

One run prints, for batch 1: ms per token (the layer's seven linears), speed-up over float32 F.linear and
achieved GB/s (packed weight + scale bytes read per token / time), next to the machine's read
bandwidth measured in the same run; then batch 4, the GEMV vs dequant+GEMM crossover, and a large-M
(M=512) correctness and timing line.

Four copies of the layer are cycled so the weights (60.8M) come from DRAM, not the 32 MB L3.

    python benchmarks/kernel_gemv.py [--iters 40] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.backends import lowbit_cpu  # noqa: E402

# Llama-3.2-1B decoder layer linears, [out, in].
SHAPES = {
    "q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
    "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192),
}
COPIES = 4


def read_bandwidth() -> float:
    t = torch.ones(256 * 1024 * 1024)  # 1 GiB
    best = float("inf")
    for _ in range(5):
        s = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - s)
    del t
    return 2**30 / best / 1e9


def timeit(fn, copies, iters: int, warmup: int = 8) -> float:
    """Median seconds of one layer pass, cycling through the copies."""
    for i in range(warmup):
        fn(copies[i % len(copies)])
    times = []
    for i in range(iters):
        s = time.perf_counter()
        fn(copies[i % len(copies)])
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def rand_canonical(n, k, bits, g, gen):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.02 + 0.001
    zero = torch.randint(0, 2**bits, (n, k // g), generator=gen).float()
    return codes, scale, zero


def dequant_ref(codes, scale, zero, g):
    return (codes.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Method:
    def __init__(self, name, build, run):
        self.name, self.build, self.run = name, build, run


def fp_method(dtype):
    def build(gen):
        layer = {nm: torch.randn(n, k, generator=gen).to(dtype) for nm, (n, k) in SHAPES.items()}
        return layer, sum(nbytes(w) for w in layer.values())

    def run(x, layer):
        xx = x.to(dtype)
        return [F.linear(xx, w) for w in layer.values()]
    return build, run


def torch_int8():
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            s = (torch.rand(n, generator=gen) * 0.01).to(torch.bfloat16)
            layer[nm] = (w, s)
        return layer, sum(nbytes(*v) for v in layer.values())

    def run(x, layer):
        xx = x.to(torch.bfloat16)
        return [torch._weight_int8pack_mm(xx, w, s) for w, s in layer.values()]
    return build, run


def torch_int4(g):
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            codes, scale, zero = rand_canonical(n, k, 4, g, gen)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            sz = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            layer[nm] = (packed, sz.to(torch.bfloat16))
        return layer, sum(nbytes(*v) for v in layer.values())

    def run(x, layer):
        xx = x.to(torch.bfloat16)
        return [torch.ops.aten._weight_int4pack_mm_for_cpu(xx, w, g, sz) for w, sz in layer.values()]
    return build, run


def ours(bits, g):
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            gs = k if g is None else g
            codes, scale, zero = rand_canonical(n, k, bits, gs, gen)
            layer[nm] = (lowbit_cpu.prepack(codes, scale, zero, bits, gs), n, k, gs)
        return layer, sum(nbytes(p["qweight"], p["sb"]) for p, *_ in layer.values())

    def run(x, layer):
        return [lowbit_cpu.linear(x, p, bits, gs, n, k) for p, n, k, gs in layer.values()]
    return build, run


def clone_layer(layer):
    def cl(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {a: cl(b) for a, b in v.items()}
        if isinstance(v, tuple):
            return tuple(cl(b) for b in v)
        return v
    return {nm: cl(v) for nm, v in layer.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not lowbit_cpu.available():
        sys.exit("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    nweights = sum(n * k for n, k in SHAPES.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; layer: {nweights / 1e6:.1f}M weights, "
          f"{COPIES} copies cycled, median of {args.iters}")
    bw = read_bandwidth()
    print(f"read bandwidth (torch.sum over 1 GiB float32): {bw:.1f} GB/s")

    methods = [
        ("fp32 F.linear", *fp_method(torch.float32)),
        ("bf16 F.linear", *fp_method(torch.bfloat16)),
        ("torch int8pack (bf16 act)", *torch_int8()),
        ("torch int4pack g128 (bf16 act)", *torch_int4(128)),
        ("lowbit int8 per-channel", *ours(8, None)),
        ("lowbit int4-g128", *ours(4, 128)),
        ("lowbit int4-g32", *ours(4, 32)),
        ("lowbit int3-g64", *ours(3, 64)),
        ("lowbit int2-g32", *ours(2, 32)),
    ]
    results = {}
    print(f"\n{'batch 1':34s} {'ms/token':>9s} {'vs fp32':>8s} {'MB/token':>9s} {'GB/s':>6s} {'% of bw':>7s}")
    x1 = torch.randn(1, 2048, generator=gen)
    x1d = torch.randn(1, 8192, generator=gen)
    x4 = torch.randn(4, 2048, generator=gen)
    x4d = torch.randn(4, 8192, generator=gen)
    built = {}
    for name, build, run in methods:
        layer, nb = build(gen)
        copies = [layer] + [clone_layer(layer) for _ in range(COPIES - 1)]
        built[name] = (copies, nb, run)

        def one(layer, run=run, x=x1, xd=x1d):
            # down takes the 8192-wide input; the other six the 2048-wide one.
            items = list(layer.items())
            sub_a = dict(items[:-1])
            sub_b = dict(items[-1:])
            run(x, sub_a)
            run(xd, sub_b)
        t = timeit(one, copies, args.iters)
        results[name] = t
        base = results["fp32 F.linear"]
        print(f"{name:34s} {t * 1e3:9.3f} {base / t:7.2f}x {nb / 1e6:9.1f} {nb / t / 1e9:6.1f} "
              f"{100 * nb / t / 1e9 / bw:6.0f}%")

    print(f"\n{'batch 4 (per forward of 4 tokens)':34s} {'ms':>9s} {'vs fp32':>8s}")
    res4 = {}
    for name in ("fp32 F.linear", "torch int4pack g128 (bf16 act)", "torch int8pack (bf16 act)",
                 "lowbit int8 per-channel", "lowbit int4-g128", "lowbit int3-g64", "lowbit int2-g32"):
        copies, nb, run = built[name]

        def four(layer, run=run):
            items = list(layer.items())
            run(x4, dict(items[:-1]))
            run(x4d, dict(items[-1:]))
        t = timeit(four, copies, args.iters)
        res4[name] = t
        print(f"{name:34s} {t * 1e3:9.3f} {res4['fp32 F.linear'] / t:7.2f}x")

    # Crossover: streaming GEMV against dequantize-then-GEMM, int4-g128, the whole layer.
    print("\nGEMV vs dequant+GEMM (lowbit int4-g128, ms per forward of M rows):")
    copies, nb, _ = built["lowbit int4-g128"]
    fp_copies = built["fp32 F.linear"][0]
    saved = lowbit_cpu.gemv_max_m()
    print(f"{'M':>5s} {'gemv':>9s} {'deq+mm':>9s} {'fp32':>9s}")
    for M in (1, 2, 4, 8, 12, 16, 32, 64):
        xm = torch.randn(M, 2048, generator=gen)
        xmd = torch.randn(M, 8192, generator=gen)
        row = []
        for path_m in (10**9, 0):
            lowbit_cpu.set_gemv_max_m(path_m)

            def f(layer, xm=xm, xmd=xmd):
                for nm, (p, n, k, gs) in layer.items():
                    lowbit_cpu.linear(xmd if nm == "down" else xm, p, 4, gs, n, k)
            row.append(timeit(f, copies, max(10, args.iters // 4), warmup=3))

        def g(layer, xm=xm, xmd=xmd):
            for nm, w in layer.items():
                F.linear(xmd if nm == "down" else xm, w)
        row.append(timeit(g, fp_copies, max(10, args.iters // 4), warmup=3))
        print(f"{M:5d} " + " ".join(f"{t * 1e3:9.3f}" for t in row))
    lowbit_cpu.set_gemv_max_m(saved)
    print(f"(linear() uses the GEMV for M <= {saved})")

    # Large M: correctness against float32 dequant + matmul, and timing.
    print("\nlarge M = 512 (one layer; error on the gate projection vs float32 x @ dequant(W).T):")
    M = 512
    n, k = SHAPES["gate"]
    xs = torch.randn(M, k, generator=gen)
    for bits, g in ((8, None), (4, 128), (3, 64), (2, 32)):
        gs = k if g is None else g
        codes, scale, zero = rand_canonical(n, k, bits, gs, gen)
        p = lowbit_cpu.prepack(codes, scale, zero, bits, gs)
        ref = xs @ dequant_ref(codes, scale, zero, gs).T
        y = lowbit_cpu.linear(xs, p, bits, gs, n, k)
        err = ((y - ref).norm() / ref.norm()).item()
        print(f"  int{bits}-{'pc' if g is None else 'g' + str(g)}: rel err {err:.2e}")
    xm = torch.randn(M, 2048, generator=gen)
    xmd = torch.randn(M, 8192, generator=gen)
    copies = built["lowbit int4-g128"][0]

    def f(layer):
        for nm, (p, n, k, gs) in layer.items():
            lowbit_cpu.linear(xmd if nm == "down" else xm, p, 4, gs, n, k)

    def g(layer):
        for nm, w in layer.items():
            F.linear(xmd if nm == "down" else xm, w)
    t_ours = timeit(f, copies, 10, warmup=2)
    t_fp = timeit(g, fp_copies, 10, warmup=2)
    print(f"  M=512 layer: lowbit int4-g128 {t_ours * 1e3:.1f} ms, fp32 F.linear {t_fp * 1e3:.1f} ms "
          f"({t_fp / t_ours:.2f}x)")


if __name__ == "__main__":
    main()

"""Decode-time matmul speed of lowbit's CPU kernel against torch, on one Llama-3.2-1B decoder layer.

One run prints:
  * batch 1: ms per token for the layer's seven linears, speed-up over float32 F.linear, and achieved
    GB/s (bytes of packed weights + scales read per token / time), next to the machine's read
    bandwidth (torch.sum over 1 GiB, measured in the same run, before and after);
  * batch 4: ms per forward of 4 tokens;
  * GEMV vs dequantize+GEMM for growing M (the crossover linear() uses);
  * M = 512: error against float32 x @ dequant(W).T, and timing.

Four copies of the layer are cycled so the 60.8M weights come from DRAM, not the 32 MB L3. The methods
are timed in rounds (a few warm-up passes, then a few timed passes of each method in turn), so they all see
the same machine conditions: on a shared or virtualised host the absolute numbers drift from minute to
minute, the ratios much less. Reported: median per layer pass (and the fastest pass).

    python benchmarks/kernel_gemv.py [--iters 40] [--threads N] [--isa avx2|avx512]
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
from lowbit.backends import lowbit_cpu
from lowbit.hw import cpu_features, cpu_name

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


def rand_canonical(n, k, bits, g, gen):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.02 + 0.001
    zero = torch.randint(0, 2**bits, (n, k // g), generator=gen).float()
    return codes, scale, zero


def dequant_ref(codes, scale, zero, g):
    return (codes.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# Each method: build(gen) -> (layer dict, bytes read per token); run(xs, layer) with xs = {K: x}.

def fp_method(dtype):
    def build(gen):
        layer = {nm: torch.randn(n, k, generator=gen).to(dtype) for nm, (n, k) in SHAPES.items()}
        return layer, sum(nbytes(w) for w in layer.values())

    def run(xs, layer):
        for w in layer.values():
            F.linear(xs[dtype][w.shape[1]], w)
    return build, run, dtype


def torch_int8():
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            s = (torch.rand(n, generator=gen) * 0.01).to(torch.bfloat16)
            layer[nm] = (w, s)
        return layer, sum(nbytes(*v) for v in layer.values())

    def run(xs, layer):
        for w, s in layer.values():
            torch._weight_int8pack_mm(xs[torch.bfloat16][w.shape[1]], w, s)
    return build, run, torch.bfloat16


def torch_int4(g):
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            codes, scale, zero = rand_canonical(n, k, 4, g, gen)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            # The op computes (q - 8) * s + z; canonical is (q - zero) * s, so z = (8 - zero) * s.
            sz = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            layer[nm] = (packed, sz.to(torch.bfloat16), k)
        return layer, sum(nbytes(p, sz) for p, sz, _ in layer.values())

    def run(xs, layer):
        for w, sz, k in layer.values():
            torch.ops.aten._weight_int4pack_mm_for_cpu(xs[torch.bfloat16][k], w, g, sz)
    return build, run, torch.bfloat16


def ours(bits, g):
    def build(gen):
        layer = {}
        for nm, (n, k) in SHAPES.items():
            gs = k if g is None else g
            codes, scale, zero = rand_canonical(n, k, bits, gs, gen)
            layer[nm] = (lowbit_cpu.prepack(codes, scale, zero, bits, gs), n, k, gs)
        return layer, sum(nbytes(*p.values()) for p, *_ in layer.values())

    def run(xs, layer):
        for p, n, k, gs in layer.values():
            lowbit_cpu.linear(xs[torch.float32][k], p, bits, gs, n, k)
    return build, run, torch.float32


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


def round_robin(entries, iters, warmup, block=4):
    """entries: {name: fn(i)}. Rounds of `block` timed calls of each method in turn, each run preceded
    by `warmup` untimed calls, until every method has `iters` timings. Returns {name: [seconds]}.

    Blocks give each method a warm start (the previous method may have left a core idle, and an idle
    core takes milliseconds to get back to speed on this VM); rounds spread every method over the
    same stretch of time, so drift in the machine's speed hits them all alike.
    """
    times = {name: [] for name in entries}
    i = 0
    while any(len(t) < iters for t in times.values()):
        for name, fn in entries.items():
            for _ in range(warmup):
                fn(i)
                i += 1
            for _ in range(min(block, iters - len(times[name]))):
                s = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - s)
                i += 1
    return times


def make_inputs(m, gen):
    xs = {k: torch.randn(m, k, generator=gen) for k in (2048, 8192)}
    return {dt: {k: x.to(dt) for k, x in xs.items()} for dt in (torch.float32, torch.bfloat16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per method (>= 20)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--isa", default=None, help="lowbit kernel path (default: the best this CPU runs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not lowbit_cpu.available():
        sys.exit("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)")
    if args.isa:
        lowbit_cpu.set_isa(args.isa)
    print(f"CPU {cpu_name()}; features: {' '.join(f for f, ok in cpu_features().items() if ok)}")
    print(f"lowbit kernel path: {lowbit_cpu.isa()} (this CPU can run: {', '.join(lowbit_cpu.isas())})")
    gen = torch.Generator().manual_seed(0)
    nweights = sum(n * k for n, k in SHAPES.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; layer: {nweights / 1e6:.1f}M weights, "
          f"{COPIES} copies cycled, median of {args.iters} timed passes per method")
    bw0 = read_bandwidth()
    print(f"read bandwidth (torch.sum over 1 GiB float32, best of 5): {bw0:.1f} GB/s")

    methods = {
        "fp32 F.linear": fp_method(torch.float32),
        "bf16 F.linear": fp_method(torch.bfloat16),
        "torch int8pack (bf16 act)": torch_int8(),
        "torch int4pack g128 (bf16 act)": torch_int4(128),
        "lowbit int8 per-channel": ours(8, None),
        "lowbit int4-g128": ours(4, 128),
        "lowbit int4-g32": ours(4, 32),
        "lowbit int3-g64": ours(3, 64),
        "lowbit int2-g32": ours(2, 32),
    }
    built = {}
    for name, (build, run, _) in methods.items():
        layer, nb = build(gen)
        built[name] = ([layer] + [clone_layer(layer) for _ in range(COPIES - 1)], nb, run)

    def entries(names, xs):
        return {nm: (lambda i, c=built[nm][0], r=built[nm][2]: r(xs, c[i % COPIES])) for nm in names}

    # ---- batch 1
    x1 = make_inputs(1, gen)
    t1 = round_robin(entries(list(built), x1), args.iters, warmup=4)
    base = statistics.median(t1["fp32 F.linear"])
    print(f"\n{'batch 1':32s} {'ms/token':>9s} {'(min)':>7s} {'vs fp32':>8s} {'MB/token':>9s} {'GB/s':>6s} "
          f"{'of bw':>6s}")
    for name, ts in t1.items():
        t = statistics.median(ts)
        nb = built[name][1]
        print(f"{name:32s} {t * 1e3:9.3f} {min(ts) * 1e3:7.3f} {base / t:7.2f}x {nb / 1e6:9.1f} "
              f"{nb / t / 1e9:6.1f} {100 * nb / t / 1e9 / bw0:5.0f}%")

    # ---- batch 4
    x4 = make_inputs(4, gen)
    names4 = ["fp32 F.linear", "torch int8pack (bf16 act)", "torch int4pack g128 (bf16 act)",
              "lowbit int8 per-channel", "lowbit int4-g128", "lowbit int3-g64", "lowbit int2-g32"]
    t4 = round_robin(entries(names4, x4), max(20, args.iters // 2), warmup=3)
    base4 = statistics.median(t4["fp32 F.linear"])
    print(f"\n{'batch 4 (one forward, 4 tokens)':32s} {'ms':>9s} {'ms/token':>9s} {'vs fp32':>8s}")
    for name, ts in t4.items():
        t = statistics.median(ts)
        print(f"{name:32s} {t * 1e3:9.3f} {t * 250:9.3f} {base4 / t:7.2f}x")

    # ---- crossover: streaming GEMV against dequantize-then-GEMM (int4-g128, whole layer)
    copies = built["lowbit int4-g128"][0]
    fp_copies = built["fp32 F.linear"][0]
    print(f"\nGEMV vs dequant+GEMM, lowbit int4-g128, ms per forward of M rows "
          f"(linear() takes the GEMV for M <= {lowbit_cpu.gemv_max_m()}):")
    print(f"{'M':>5s} {'gemv':>9s} {'deq+mm':>9s} {'fp32':>9s}")
    for m in (1, 4, 8, 16, 32, 64, 128, 256, 512):
        xm = make_inputs(m, gen)[torch.float32]

        def ours_path(i, path, xm=xm):
            for p, n, k, gs in copies[i % COPIES].values():
                lowbit_cpu._C.linear(xm[k], p["qweight"], 4, gs, n, k, None, path)

        def fp(i, xm=xm):
            for w in fp_copies[i % COPIES].values():
                F.linear(xm[w.shape[1]], w)
        n_it = 20 if m <= 16 else (8 if m <= 64 else 3)
        tc = round_robin({"gemv": lambda i: ours_path(i, 1), "deq": lambda i: ours_path(i, 2), "fp32": fp},
                         n_it, warmup=1, block=2)
        cols = (statistics.median(tc[c]) * 1e3 for c in ("gemv", "deq", "fp32"))
        print(f"{m:5d} " + " ".join(f"{t:9.2f}" for t in cols))

    # ---- large M: correctness and timing
    m = 512
    print(f"\nM = {m}: relative error ||y - y_ref|| / ||y_ref|| on the gate projection, y_ref = "
          f"float32 x @ dequant(W).T")
    n, k = SHAPES["gate"]
    xs = torch.randn(m, k, generator=gen)
    for bits, g in ((8, None), (4, 128), (4, 32), (3, 64), (2, 32)):
        gs = k if g is None else g
        codes, scale, zero = rand_canonical(n, k, bits, gs, gen)
        p = lowbit_cpu.prepack(codes, scale, zero, bits, gs)
        ref = xs @ dequant_ref(codes, scale, zero, gs).T
        y = lowbit_cpu.linear(xs, p, bits, gs, n, k)
        err = ((y - ref).norm() / ref.norm()).item()
        y1 = lowbit_cpu._C.linear(xs[:8], p["qweight"], bits, gs, n, k, None, 1)
        err1 = ((y1 - ref[:8]).norm() / ref[:8].norm()).item()
        fmt = "pc  " if g is None else f"g{g:<3d}"
        print(f"  int{bits}-{fmt}: {err:.2e} (auto path), {err1:.2e} (GEMV, 8 rows)")
    xm = make_inputs(m, gen)[torch.float32]

    def ours_big(i):
        for p, n, k, gs in copies[i % COPIES].values():
            lowbit_cpu.linear(xm[k], p, 4, gs, n, k)

    def fp_big(i):
        for w in fp_copies[i % COPIES].values():
            F.linear(xm[w.shape[1]], w)
    tb = round_robin({"ours": ours_big, "fp32": fp_big}, 5, warmup=1, block=1)
    to, tf = statistics.median(tb["ours"]), statistics.median(tb["fp32"])
    print(f"  M={m} layer: lowbit int4-g128 {to * 1e3:.1f} ms, fp32 F.linear {tf * 1e3:.1f} ms "
          f"({tf / to:.2f}x)")

    bw1 = read_bandwidth()
    print(f"\nread bandwidth again at the end: {bw1:.1f} GB/s")


if __name__ == "__main__":
    main()

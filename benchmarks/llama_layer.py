"""Decode (batch 1) through the linear layers of one Llama-3.2-1B-shaped decoder layer.

Shapes: hidden 2048, intermediate 8192, 32 query / 8 key-value heads of 64 -> q, k, v, o, gate, up, down.
Each variant is timed round-robin with the others in this one run; four copies of the layer are cycled so
the weights do not sit in the 32 MiB L3 cache. Prints time per token, speed-up against fp32 F.linear,
the bytes of weights read per token, the GB/s achieved, and the machine's read bandwidth measured now.

Scales are rounded to float16 first (--f32-scales keeps them), so lowbit's kernel runs its packed form
with 16-bit scales. Besides the bytes the checkpoint holds, each weight-only format is counted as its
codes plus 4 bytes per group (a 16-bit scale and zero point; per-channel int8: 4 bytes per row), and the
share of the read bandwidth on that count is printed. lowbit's kernel runs on every instruction-set path
this CPU can execute (AVX-512, AVX2), each timed in the same round-robin; the CPU's features are printed.
The kernel lowbit_q8 is lowbit's GEMV with the activations rounded to int8 per 32 columns (integer dot
products: AVX-512 VNNI, or AVX2); it changes the results slightly, so it runs only when asked for.

The read bandwidth is a torch.sum over 1 GiB (all threads), timed as one more variant of the same
round-robin, its buffer on the same kind of pages as lowbit's packed weights (2 MB pages where Linux grants
them; lowbit asks for them for packed weights of 2 MB and more; the memory on 2 MB pages is printed): kernels
and bandwidth share the time window and the statistic (median), so a neighbour's load on the memory system
moves both. The best of separate measurements is printed too. One more row, "torch.sum per layer", reads
int4-g128's bytes of each layer as a torch.sum per layer, seven calls per token like the kernels make: the
share of the 1 GiB read that any kernel called once per layer can expect (each call starts and drains its
streams, and the caller runs between calls).

    python benchmarks/llama_layer.py [--iters 30] [--recipes int8 int4-g128 ...] [--isas avx2]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import lowbit
from lowbit.backends import lowbit_cpu
from lowbit.bench import time_interleaved
from lowbit.hw import cpu_features, cpu_name, huge_pages_mode, measure_read_bandwidth, read_buffer

SHAPES = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
          "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}
COPIES = 4
READ = "read 1 GiB (torch.sum)"
PER_LAYER_SUM = "torch.sum per layer (int4-g128's bytes)"


def huge_pages_mb() -> str:
    """The process's memory on transparent huge pages (Linux), as text."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return f"{int(line.split()[1]) / 1024:.0f} MB"
    except OSError:
        pass
    return "unknown (not Linux)"


def layer() -> nn.ModuleDict:
    return nn.ModuleDict({n: nn.Linear(i, o, bias=False) for n, (o, i) in SHAPES.items()})


def run_layer(m: nn.ModuleDict, x_h: torch.Tensor, x_i: torch.Tensor) -> None:
    for name, lin in m.items():
        lin(x_i if name == "down" else x_h)


def weight_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def counted_bytes(m: nn.Module) -> int:
    """Codes plus 4 bytes per group (16-bit scale and zero point) of every quantized layer; float
    layers count their weights as stored."""
    total = 0
    for mod in m.modules():
        spec = getattr(mod, "spec", None)
        if spec is not None and getattr(spec, "bits", None) and hasattr(mod, "scale"):
            total += spec.n * spec.k * spec.bits // 8 + spec.n * (spec.k // spec.group_size) * 4
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def round_scales_to_half(m: nn.Module) -> None:
    """Scale and zero point of every quantized layer rounded to float16 values, kernels re-derived."""
    for mod in m.modules():
        if hasattr(mod, "set_kernel") and "scale" in mod._buffers:
            for name in ("scale", "zero_point"):
                if name in mod._buffers:
                    mod._buffers[name].copy_(mod._buffers[name].half().float())
            mod.set_kernel(mod.kernel_name)


def with_isa(isa: str, fn):
    def run():
        lowbit_cpu.set_isa(isa)
        fn()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--recipes", nargs="*",
                    default=["int8", "int4-g128", "int4-g32", "int3-g64", "int2-g32", "w8a8-dynamic"])
    ap.add_argument("--kernels", nargs="*", default=["auto", "lowbit_q8", "torch_int4pack", "torch_int8pack"],
                    help="kernels to compare for each recipe (skipped where they do not apply)")
    ap.add_argument("--isas", nargs="*", default=None,
                    help="lowbit kernel paths to time (default: every path this CPU can run)")
    ap.add_argument("--f32-scales", action="store_true", help="keep float32 scales (no rounding to float16)")
    ap.add_argument("--per-layer", action="store_true",
                    help="also time every layer of each backend=auto variant against its float layer")
    args = ap.parse_args()
    isas = args.isas if args.isas is not None else lowbit_cpu.isas()
    feats = [f for f, ok in cpu_features().items() if ok]
    print(f"CPU {cpu_name()}; features: {' '.join(feats)}")
    print(f"lowbit kernel paths this CPU can run: {', '.join(lowbit_cpu.isas()) or 'none'}; "
          f"default: {lowbit_cpu.isa()}; timed: {', '.join(isas)}")
    q8_paths = {}  # the int8-activation GEMV's instructions on each path
    for isa in isas:
        before = lowbit_cpu.isa()
        lowbit_cpu.set_isa(isa)
        q8_paths[isa] = f" ({lowbit_cpu.q8_path()})"
        lowbit_cpu.set_isa(before)
    torch.manual_seed(0)
    base = [layer().eval() for _ in range(COPIES)]
    for m in base:
        for lin in m.values():
            nn.init.normal_(lin.weight, std=0.02)
    variants: dict[str, tuple[list[nn.Module], torch.dtype, str]] = {"fp32 F.linear": (base, torch.float32, "")}
    autos: dict[str, nn.ModuleDict] = {}
    variants["bf16 F.linear"] = ([copy.deepcopy(m).to(torch.bfloat16) for m in base], torch.bfloat16, "")
    for recipe in args.recipes:
        for kernel in args.kernels:
            try:
                q = lowbit.quantize(copy.deepcopy(base[0]), recipe, backend=kernel)
            except ValueError:
                continue  # this kernel does not take this recipe
            if not args.f32_scales:
                round_scales_to_half(q)
            kname = lowbit.summary(q)[0]["kernel"]
            if kernel == "auto":
                autos[recipe] = q
                for note in q.lowbit_float_layers:
                    print(f"{recipe}: {note['layer']} kept in float ({note['reason']})")
            copies = [q] + [copy.deepcopy(q) for _ in range(COPIES - 1)]
            # lowbit's GEMV (a route starting with it: the 1-row call takes it) on every path this CPU runs
            for isa in (isas if kname.split("<=")[0] in ("lowbit_cpu", "lowbit_q8") else [""]):
                label = f"{recipe} [{kname}{' ' + isa if isa else ''}{q8_paths.get(isa, '') if kname == 'lowbit_q8' else ''}]"
                if label not in variants:
                    variants[label] = (copies, torch.float32, isa)
    x = {torch.float32: (torch.randn(1, 2048), torch.randn(1, 8192))}
    x[torch.bfloat16] = tuple(t.to(torch.bfloat16) for t in x[torch.float32])

    def make(ms, dt):
        return lambda: [run_layer(m, *x[dt]) for m in ms]

    fns = {name: with_isa(isa, make(ms, dt)) if isa else make(ms, dt) for name, (ms, dt, isa) in variants.items()}
    best_bw = measure_read_bandwidth()
    big = read_buffer(1 << 30)  # 1 GiB of float32, every page written, on the pages packed weights get
    fns[READ] = lambda: torch.sum(big)
    # int4-g128's bytes per layer: codes plus a 16-bit scale and zero point per group of 128
    sums = [[read_buffer(o * i // 2 + o * (i // 128) * 4) for o, i in SHAPES.values()] for _ in range(COPIES)]
    fns[PER_LAYER_SUM] = lambda: [torch.sum(b) for bufs in sums for b in bufs]
    times = time_interleaved(fns, warmup=3, iters=args.iters, max_seconds=240)
    best_bw = max(best_bw, measure_read_bandwidth())
    bw = big.numel() * 4 / times.pop(READ) / 1e9
    ref = times["fp32 F.linear"] / COPIES
    print(f"threads {torch.get_num_threads()}, read bandwidth in the round-robin {bw:.1f} GB/s (median; best of "
          f"separate measurements {best_bw:.1f} GB/s): shares below are of {bw:.1f}; memory on 2 MB pages: "
          f"{huge_pages_mb()} (transparent huge pages: {huge_pages_mode() or 'unknown'})")
    print("Counted MB: codes + 4 bytes per group (16-bit scale and zero point); int8 per-channel 4 per row.")
    print("| variant | ms/token | speed-up vs fp32 | weight MB stored | GB/s | % of read bandwidth | counted MB "
          "| % of read bandwidth (counted) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    t = times.pop(PER_LAYER_SUM) / COPIES
    mb = sum(b.numel() * 4 for b in sums[0]) / 1e6
    print(f"| {PER_LAYER_SUM} | {t * 1e3:.2f} | | {mb:.1f} | {mb / 1e3 / t:.1f} | {100 * mb / 1e3 / t / bw:.0f}% "
          f"| {mb:.1f} | {100 * mb / 1e3 / t / bw:.0f}% |")
    for name, (ms, _, _) in variants.items():
        t = times[name] / COPIES
        mb = weight_bytes(ms[0]) / 1e6
        cmb = counted_bytes(ms[0]) / 1e6
        print(f"| {name} | {t * 1e3:.2f} | {ref / t:.2f}x | {mb:.1f} | {mb / 1e3 / t:.1f} | "
              f"{100 * mb / 1e3 / t / bw:.0f}% | {cmb:.1f} | {100 * cmb / 1e3 / t / bw:.0f}% |")
    if args.per_layer:
        per_layer(base[0], autos, x[torch.float32], args.iters)


def per_layer(float_layer: nn.ModuleDict, autos: dict[str, nn.ModuleDict], xs, iters: int) -> None:
    """Each layer of each backend=auto variant against the same float layer, timed round-robin."""
    print("\n| recipe (backend=auto) | layer | module | speed-up vs its float layer |")
    print("| --- | --- | --- | --- |")
    worst = float("inf")
    for recipe, q in autos.items():
        for name in SHAPES:
            xin = xs[1] if name == "down" else xs[0]
            fl, ql = float_layer[name], q[name]
            t = time_interleaved({"f": lambda fl=fl, xin=xin: fl(xin), "q": lambda ql=ql, xin=xin: ql(xin)},
                                 warmup=3, iters=iters)
            ratio = t["f"] / t["q"]
            kept = isinstance(ql, nn.Linear)
            worst = min(worst, ratio) if not kept else worst
            print(f"| {recipe} | {name} | {'float (kept)' if kept else type(ql).__name__} | {ratio:.2f}x |")
    print(f"slowest quantized layer: {worst:.2f}x of its float layer")


if __name__ == "__main__":
    main()

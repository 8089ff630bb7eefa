"""ResNet-18 at batch 8 x 3 x 224 x 224: lowbit's static int8 (W8A8) convolutions against fp32 and other
toolkits, timed round-robin in one process (medians after warm-up).

The model is `lowbit_workbench.vision.resnet18()` (random weights, fixed seed) with its BatchNorms folded into the
convolutions: the fp32 reference is that folded model, eager, NCHW (lowbit folds BN itself when quantizing).
Inputs and calibration are deterministic synthetic images: smooth random fields plus fine noise, normalised
per image, different seeds for calibration and for the timed batch. Printed: speed-up against the fp32
reference and the mean cosine of the logits to fp32's.

Variants (`--variants`, comma list; fp32 is always there):
  fp32-cl           fp32 eager, channels_last weights and input
  fp32-compile      torch.compile(freezing=True) of the fp32 model (compiled before timing)
  w8a8-static       lowbit static int8, kernel per layer chosen by timing (slower layers kept in float)
  w8a8-static-all   the same with keep_float_if_slower=False: every conv and the fc in int8
  torch-ao-fx       torch.ao FX static quantization, x86 backend (deprecated, eager)
  ort-fp32          the ONNX export in ONNX Runtime, float32
  ort-static        ONNX Runtime quantize_static, QDQ, per-channel weights, MinMax calibration

`--per-layer`: instead, quantize with every layer in int8, capture the input each quantized conv/linear
sees in the quantized model, and time each against its float original (with the ReLU it absorbed, if
any) on that input, round-robin; layers slower than float are flagged.

    python benchmarks/resnet18.py [--iters 20] [--variants ...] [--calib-batches 8] [--per-layer]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowbit
from lowbit import bench
from lowbit_workbench import peers
from lowbit_workbench.vision import fold_batchnorm, resnet18

BATCH = 8
VARIANTS = ("fp32", "fp32-cl", "fp32-compile", "w8a8-static", "w8a8-static-all", "torch-ao-fx", "ort-fp32",
            "ort-static")
LABELS = {
    "fp32": "fp32 eager, BN folded (reference)",
    "fp32-cl": "fp32 eager, channels_last",
    "fp32-compile": "fp32 torch.compile (freezing)",
    "w8a8-static": "lowbit w8a8-static",
    "w8a8-static-all": "lowbit w8a8-static, every layer",
    "torch-ao-fx": "torch.ao FX static (x86 backend)",
    "ort-fp32": "ONNX Runtime fp32",
    "ort-static": "ONNX Runtime quantize_static (QDQ, per-channel)",
}


def synthetic_images(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 224, 224] float32: low-frequency random fields (bicubic-upsampled 8x8 noise) plus a quarter
    as much pixel noise, each image normalised to mean 0, std 1 like ImageNet-normalised photos."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=224, mode="bicubic", align_corners=False)
    x = coarse + 0.25 * torch.randn(n, 3, 224, 224, generator=g)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return x / x.std(dim=(1, 2, 3), keepdim=True)


def quantize_lowbit(model: nn.Module, calib: list[torch.Tensor], every_layer: bool) -> tuple[nn.Module, list[str]]:
    kwargs = {"keep_float_if_slower": False} if every_layer else {}
    with warnings.catch_warnings(record=True):  # summarised in the notes instead
        warnings.simplefilter("always")
        q = lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=calib, **kwargs)
    notes = []
    kinds: dict[str, int] = {}
    for row in lowbit.summary(q):
        kinds[row["kernel"]] = kinds.get(row["kernel"], 0) + 1
    notes.append("kernels: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    for attr, what in (("lowbit_float_layers", "kept in float"), ("lowbit_slower_layers", "slower than float")):
        layers = getattr(q, attr, [])
        if layers:
            notes.append(f"{len(layers)} layer(s) {what} by lowbit's timing: "
                         + ", ".join(f"{n['layer']} {n['speedup']:.2f}x" for n in layers))
    return q, notes


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def build(names: list[str], model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor, work: Path):
    built: dict[str, tuple[nn.Module, list[str]]] = {"fp32": (model, [])}
    onnx_fp32 = None
    for name in names:
        if name == "fp32":
            continue
        t0 = time.perf_counter()
        try:
            notes: list[str] = []
            if name == "fp32-cl":
                m = _ChannelsLast(copy.deepcopy(model))
            elif name == "fp32-compile":
                m = peers.compile_frozen(copy.deepcopy(model))
            elif name in ("w8a8-static", "w8a8-static-all"):
                m, notes = quantize_lowbit(model, calib, name.endswith("-all"))
            elif name == "torch-ao-fx":
                m = peers.torch_ao_static_fx(copy.deepcopy(model), (x,), [(c,) for c in calib])
            elif name in ("ort-fp32", "ort-static"):
                if onnx_fp32 is None:
                    onnx_fp32 = peers.export_onnx(model, {"x": x}, work / "fp32.onnx", dynamic=(0,))
                path = onnx_fp32
                if name == "ort-static":
                    path = peers.ort_quantize_static(onnx_fp32, work / "static.onnx", [{"x": c} for c in calib],
                                                     linears_only=False, op_types=None)
                m = peers.OrtModel(path)
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        except Exception as e:  # noqa: BLE001 - one failing toolkit must not end the comparison
            print(f"skip {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        print(f"built {name} in {time.perf_counter() - t0:.1f} s")
        built[name] = (m, notes)
    return built


def whole_model(args, model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor) -> None:
    names = ["fp32"] + [n.strip() for n in args.variants.split(",") if n.strip() and n.strip() != "fp32"]
    with tempfile.TemporaryDirectory(prefix="resnet18-") as tmp:
        built = build(names, model, calib, x, Path(tmp))
        outs = {}
        with torch.inference_mode():
            for name, (m, _) in built.items():
                t0 = time.perf_counter()
                outs[name] = m(x)  # compiles where there is a compiler
                if time.perf_counter() - t0 > 5.0:
                    print(f"first call of {name}: {time.perf_counter() - t0:.1f} s")
        load0 = os.getloadavg()[0]
        times = bench.time_interleaved({name: (lambda m=m: m(x)) for name, (m, _) in built.items()},
                                       warmup=2, iters=args.iters, max_seconds=args.max_seconds)
        load1 = os.getloadavg()[0]
    ref = times["fp32"]
    print(f"\nResNet-18, batch {BATCH} x 3 x 224 x 224, {args.iters} interleaved rounds; 1-min load average "
          f"{load0:.2f} before timing, {load1:.2f} after (this run included)")
    print("| variant | ms/batch | images/s | speed-up vs fp32 | cosine of logits to fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, (_, notes) in built.items():
        t = times[name]
        cos = bench.cosine_to(outs["fp32"], outs[name])
        print(f"| {LABELS[name]} | {t * 1e3:.1f} | {BATCH / t:.1f} | {ref / t:.2f}x | {cos:.5f} |")
    for name, (_, notes) in built.items():
        for n in notes:
            print(f"- {name}: {n}")


def per_layer(args, model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor) -> None:
    q, notes = quantize_lowbit(model, calib, every_layer=True)
    float_names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    quantized = {n: m for n, m in q.named_modules()
                 if n in float_names and not isinstance(m, (nn.Conv2d, nn.Linear))}
    inputs: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(mod, args_):
            inputs[name] = args_[0].detach().clone()
        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in quantized.items()]
    with torch.inference_mode():
        q(x)
    for h in handles:
        h.remove()

    def float_fn(mod: nn.Module, inp: torch.Tensor, relu: bool):
        return (lambda: F.relu(mod(inp))) if relu else (lambda: mod(inp))

    fns = {}
    fused = {}
    for name, qm in quantized.items():
        inp = inputs[name]
        fused[name] = getattr(qm, "relu", False) is True
        fns[f"{name}|float"] = float_fn(model.get_submodule(name), inp, fused[name])
        fns[f"{name}|int8"] = lambda m=qm, inp=inp: m(inp)
    load0 = os.getloadavg()[0]
    times = bench.time_interleaved(fns, warmup=3, iters=args.iters, max_seconds=args.max_seconds)
    load1 = os.getloadavg()[0]
    print(f"\nResNet-18 per layer, lowbit w8a8-static (every layer), input as seen in the quantized model at batch "
          f"{BATCH}; {args.iters} interleaved rounds; 1-min load average {load0:.2f} before, "
          f"{load1:.2f} after (this run included)")
    print("| layer | weight | input | float ms | int8 ms | speed-up | |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    total_f = total_q = 0.0
    slower = 0
    for name, qm in quantized.items():
        tf, tq = times[f"{name}|float"], times[f"{name}|int8"]
        total_f += tf
        total_q += tq
        fm = model.get_submodule(name)
        shape = "x".join(str(s) for s in fm.weight.shape)
        flag = "SLOWER" if tf / tq < 1.0 else ""
        slower += bool(flag)
        relu = " +relu" if fused[name] else ""
        inp = inputs[name]
        cl = " channels_last" if inp.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last) else ""
        print(f"| {name}{relu} | {shape} | {list(inp.shape)}{cl} | {tf * 1e3:.2f} | {tq * 1e3:.2f} | "
              f"{tf / tq:.2f}x | {flag} |")
    print(f"| all {len(quantized)} layers | | | {total_f * 1e3:.2f} | {total_q * 1e3:.2f} | "
          f"{total_f / total_q:.2f}x | {slower} slower |")
    for n in notes:
        print(f"- {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20, help="timed rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--calib-batches", type=int, default=8, help=f"calibration batches of {BATCH} images")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="time budget for the timed rounds")
    ap.add_argument("--per-layer", action="store_true", help="time each quantized layer against its float original")
    ap.add_argument("--user-autotune-cache", action="store_true",
                    help="let lowbit reuse its cached kernel timings instead of timing afresh in this run")
    args = ap.parse_args()
    cache = peers.private_autotune_cache("resnet18-autotune-", args.user_autotune_cache)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; peers: "
          + ", ".join(f"{k} {v or 'missing'}" for k, v in peers.versions().items()))
    model = fold_batchnorm(resnet18())
    calib = [synthetic_images(BATCH, seed=1000 + i) for i in range(args.calib_batches)]
    x = synthetic_images(BATCH, seed=0)
    if args.per_layer:
        per_layer(args, model, calib, x)
    else:
        whole_model(args, model, calib, x)
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()

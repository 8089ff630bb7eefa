"""all-MiniLM-L6-v2 with int8 weights and int8 activations: lowbit against fp32 and other toolkits.

One process, every variant timed round-robin with the others (medians after warm-up), at each batch size
and sequence 128. Printed per variant: speed-up against fp32 eager at each batch, the mean cosine of
mean-pooled embeddings to fp32's (on the largest batch timed), and STS-B dev Spearman x100.

Variants (`--variants`, comma list; fp32 is always there as the reference):
  fp32              the Hugging Face model, eager float32
  fp32-compiled     the same under torch.compile(freezing=True), for reference
  w8a8-dynamic      lowbit, int8 weights, activations quantized per call
  w8a8-static       lowbit, int8 weights, activation ranges from calibration (STS-B train sentences)
  w8a8-dynamic-compiled  lowbit w8a8-dynamic under torch.compile(freezing=True), as torchao is timed
  w8a8-dynamic-floatattn[-compiled]  the same with the model's own float32 attention (w8a8 recipes run
                    attention's matmuls in bf16 where the CPU has AVX-512 BF16, see lowbit.attention)
  w8a8-*-all        the same with keep_float_if_slower=False: every linear quantized, even where lowbit's
                    kernel timing says float is faster on this machine
  int8              lowbit weight-only int8, for reference
  torchao           torchao Int8DynamicActivationInt8WeightConfig + torch.compile(freezing=True)
  torch-ao-dynamic  torch.ao.quantization.quantize_dynamic, per-channel weights
  ort-fp32          the ONNX export run by ONNX Runtime, float32
  ort-dynamic       ONNX Runtime quantize_dynamic, per-channel int8 weights
  ort-static        ONNX Runtime quantize_static, QDQ, per-channel weights, MinMax calibration

The peers need `pip install lowbit[peers]`; a variant whose toolkit is missing or fails is skipped with
the reason. The lowbit/torchao ratios (torchao's median / lowbit's, above 1: lowbit faster) are printed
for lowbit eager and compiled at each batch, with the CPU's features and the W8A8 kernel path. Compiled
variants run STS-B eagerly (see build_variants). A variant whose first timed call is more than `--max-slowdown` times slower than fp32 is not
interleaved (it would take the run hostage): its one call is reported instead, marked "1 call".
lowbit's kernel choice (backend="auto") is timed afresh in this run, in a temporary autotune cache, unless
`--user-autotune-cache`. Every lowbit variant gets the calibration batches (static ranges; input shapes).

    python benchmarks/minilm_w8a8.py [--iters 10] [--variants fp32,w8a8-dynamic,...] [--batches 32,1]
                                     [--calib-batches 16] [--no-stsb]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowbit
from lowbit import bench, hf
from lowbit_workbench import peers
from lowbit_workbench.calib import timing_texts
from lowbit_workbench.evaluate import eval_stsb, load_stsb

SEQ = 128
VARIANTS = ("fp32", "fp32-compiled", "w8a8-dynamic", "w8a8-dynamic-compiled", "w8a8-dynamic-floatattn",
            "w8a8-dynamic-floatattn-compiled", "w8a8-static", "w8a8-dynamic-all", "w8a8-static-all", "int8", "torchao",
            "torch-ao-dynamic", "ort-fp32", "ort-dynamic", "ort-static")
LOWBIT = ("w8a8-dynamic", "w8a8-dynamic-floatattn", "w8a8-static", "w8a8-dynamic-all", "w8a8-static-all", "int8")
LABELS = {
    "fp32": "fp32 eager (reference)",
    "fp32-compiled": "fp32, compiled",
    "w8a8-dynamic-compiled": "lowbit w8a8-dynamic, compiled",
    "w8a8-dynamic": "lowbit w8a8-dynamic",
    "w8a8-dynamic-floatattn": "lowbit w8a8-dynamic, float32 attention",
    "w8a8-dynamic-floatattn-compiled": "lowbit w8a8-dynamic, float32 attention, compiled",
    "w8a8-static": "lowbit w8a8-static",
    "w8a8-dynamic-all": "lowbit w8a8-dynamic, every layer",
    "w8a8-static-all": "lowbit w8a8-static, every layer",
    "int8": "lowbit int8 (weight-only)",
    "torchao": "torchao int8 dyn-act int8-weight, compiled",
    "torch-ao-dynamic": "torch.ao quantize_dynamic (per-channel)",
    "ort-fp32": "ONNX Runtime fp32",
    "ort-dynamic": "ONNX Runtime quantize_dynamic (per-channel)",
    "ort-static": "ONNX Runtime quantize_static (QDQ, per-channel)",
}


@dataclass
class Variant:
    name: str
    model: nn.Module  # timed and compared: model(**batch).last_hidden_state
    stsb_model: nn.Module | None  # what eval_stsb runs; None: not evaluated
    notes: list[str] = field(default_factory=list)
    single: dict[int, float] = field(default_factory=dict)  # batch -> seconds of one call, if not interleaved
    seconds: dict[int, float] = field(default_factory=dict)  # batch -> median seconds per call
    cosine: float | None = None
    spearman: float | None = None


def calibration_batches(tokenizer, n: int, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    """`n` batches of STS-B train sentences (both sides, spread over the split), cut to 128 tokens."""
    s1, s2, _ = load_stsb("train")
    sentences = [s for pair in zip(s1, s2) for s in pair]
    step = max(1, len(sentences) // (n * batch))
    picked = sentences[::step][: n * batch]
    return [dict(tokenizer(picked[i: i + batch], padding=True, truncation=True, max_length=SEQ,
                           return_tensors="pt"))
            for i in range(0, len(picked), batch)]


def lowbit_w8a8_missing() -> str | None:
    """Why lowbit cannot quantize to w8a8 yet, or None when it can."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), "w8a8-dynamic")
    except Exception as e:  # noqa: BLE001 - any failure means the recipe is not usable here
        return f"{type(e).__name__}: {e}"
    return None


def kernel_note(model: nn.Module) -> str:
    try:
        from lowbit_workbench.demo import kernel_note as note

        return note(model)
    except Exception:  # noqa: BLE001 - the note is informative only
        return ""


def int_mm_check() -> str:
    """torch._int_mm (torchao's int8 matmul) against a float32 matmul of the same shape, on this CPU."""
    a = torch.randint(-127, 128, (256, 384), dtype=torch.int8)
    b = torch.randint(-127, 128, (384, 1536), dtype=torch.int8)
    af, bf = a.float(), b.float()
    t = bench.time_interleaved({"int": lambda: torch._int_mm(a, b), "fp32": lambda: af @ bf}, warmup=1, iters=3)
    return (f"torch._int_mm [256x384]x[384x1536] takes {t['int'] * 1e3:.1f} ms here, a float32 matmul of the "
            f"same shape {t['fp32'] * 1e3:.2f} ms ({t['int'] / t['fp32']:.0f}x)")


def machine_line() -> str:
    """The CPU, its int8-relevant features and the path lowbit's dynamic W8A8 layers take on it."""
    from lowbit import attention
    from lowbit.backends import onednn
    from lowbit.backends.ops import GEMV_MAX_ROWS
    from lowbit.hw import cpu_features, cpu_name

    feats = [k for k, v in cpu_features().items() if v]
    if not onednn.available():
        path = "reference (oneDNN int8 ops or lowbit._C missing)"
    elif onednn.int_mm_dynamic():
        path = "int8 x int8 torch._int_mm (oneDNN s8s8s32) + lowbit per-row quantize/epilogue"
    else:
        path = f"oneDNN qlinear u8 x s8 (weights |w| <= {onednn.weight_qmax()}) + lowbit per-row quantize/epilogue"
    return (f"CPU: {cpu_name()}; features: {', '.join(feats) or 'none detected'}\n"
            f"lowbit W8A8 dynamic path: {path}; <= {GEMV_MAX_ROWS} rows: lowbit int8 GEMV\n"
            f"lowbit W8A8 attention (transformers models): {attention.path()}")


def build_lowbit(name: str, model: nn.Module, calib: list[dict]) -> Variant:
    recipe = name.removesuffix("-all")
    kwargs = {"keep_float_if_slower": False} if name.endswith("-all") else {}
    with warnings.catch_warnings(record=True):  # the float/slower layers are summarised below instead
        warnings.simplefilter("always")
        q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib, **kwargs)
    notes = [f"kernels: {kernel_note(q)}"]
    for attr, what in (("lowbit_float_layers", "kept in float"), ("lowbit_slower_layers", "slower than float")):
        layers = getattr(q, attr, [])
        if layers:
            if len(layers) <= 4:
                detail = ", ".join(f"{n['layer']} {n['speedup']:.2f}x" for n in layers)
            else:
                ratios = sorted(n["speedup"] for n in layers)
                detail = f"{ratios[0]:.2f}x..{ratios[-1]:.2f}x of float"
            notes.append(f"{len(layers)} layer(s) {what} by lowbit's timing: {detail}")
    return Variant(name, q, q, notes)


def build_variants(names: list[str], model: nn.Module, tokenizer, calib: list[dict], work: Path) -> dict:
    variants: dict[str, Variant] = {"fp32": Variant("fp32", model, model)}
    missing = lowbit_w8a8_missing() if any(n.startswith("w8a8") for n in names) else None
    onnx_fp32: Path | None = None
    for name in names:
        if name == "fp32":
            continue
        if name.startswith("w8a8") and missing:
            print(f"skip {name}: lowbit cannot quantize to w8a8 yet ({missing})")
            continue
        t0 = time.perf_counter()
        try:
            if name in LOWBIT:
                v = build_lowbit(name, model, calib)
            elif name.removesuffix("-compiled") in LOWBIT:
                # The quantized model of the variant without -compiled (the same layers, kernels and codes),
                # compiled; STS-B runs it eagerly, like torchao's (one compile per sequence length otherwise).
                plain = name.removesuffix("-compiled")
                base = variants.get(plain) or build_lowbit(plain, model, calib)
                v = Variant(name, peers.compile_frozen(base.model), base.model, list(base.notes))
            elif name == "fp32-compiled":
                v = Variant(name, peers.compile_frozen(copy.deepcopy(model)), None)
            elif name == "torchao":
                q = peers.torchao_int8_dynamic(copy.deepcopy(model))
                # Timed compiled; STS-B runs the same quantized module eagerly (its many sequence lengths
                # would each trigger a recompile) through the same torch._int_mm matmul.
                v = Variant(name, peers.compile_frozen(q), q, [int_mm_check()])
            elif name == "torch-ao-dynamic":
                q = peers.torch_ao_dynamic(copy.deepcopy(model))
                v = Variant(name, q, q)
            elif name.startswith("ort-"):
                if onnx_fp32 is None:
                    onnx_fp32 = peers.export_onnx(model, calib[0], work / "fp32.onnx", dynamic=(0, 1))
                if name == "ort-fp32":
                    path = onnx_fp32
                elif name == "ort-dynamic":
                    path = peers.ort_quantize_dynamic(onnx_fp32, work / "dynamic.onnx")
                else:
                    path = peers.ort_quantize_static(onnx_fp32, work / "static.onnx", calib)
                om = peers.OrtModel(path)
                v = Variant(name, om, om)
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        except Exception as e:  # noqa: BLE001 - one failing toolkit must not end the comparison
            print(f"skip {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        print(f"built {name} in {time.perf_counter() - t0:.1f} s")
        variants[name] = v
    return variants


def time_batch(variants: dict[str, Variant], tokenizer, b: int, args, cosine: bool) -> None:
    inputs = bench.sample_batch(tokenizer, timing_texts(b), SEQ)
    mask = inputs["attention_mask"]
    first: dict[str, float] = {}
    pooled: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, v in variants.items():
            t0 = time.perf_counter()
            v.model(**inputs)  # first call: compiles where there is a compiler
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = v.model(**inputs)
            first[name] = time.perf_counter() - t0
            pooled[name] = hf.mean_pool(out.last_hidden_state, mask)
            if warm > 5 * first[name] + 1.0:
                print(f"  batch {b}: {name} first call {warm:.1f} s (compile), then {first[name]:.2f} s")
    if cosine:
        for name, v in variants.items():
            v.cosine = bench.cosine_to(pooled["fp32"], pooled[name])
    fns = {}
    for name, v in variants.items():
        if name != "fp32" and first[name] > args.max_slowdown * first["fp32"]:
            v.single[b] = first[name]
            v.seconds[b] = first[name]
        else:
            fns[name] = lambda m=v.model: m(**inputs)
    times = bench.time_interleaved(fns, warmup=1, iters=args.iters, max_seconds=args.max_seconds)
    for name, t in times.items():
        variants[name].seconds[b] = t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10, help="timed rounds per batch size")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--batches", default="32,1", help="comma list of batch sizes to time (sequence 128)")
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 32 sentences")
    ap.add_argument("--max-slowdown", type=float, default=8.0,
                    help="a variant slower than this many times fp32 is timed by one call, not interleaved")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="time budget per batch size")
    ap.add_argument("--no-stsb", action="store_true", help="skip STS-B dev Spearman")
    ap.add_argument("--stsb-max-slowdown", type=float, default=4.0,
                    help="skip STS-B for a variant more than this many times slower than fp32 at some batch")
    ap.add_argument("--user-autotune-cache", action="store_true",
                    help="let lowbit reuse its cached kernel timings instead of timing afresh in this run")
    args = ap.parse_args()
    cache = peers.private_autotune_cache("minilm-w8a8-autotune-", args.user_autotune_cache)
    names = ["fp32"] + [n.strip() for n in args.variants.split(",") if n.strip() and n.strip() != "fp32"]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    load0 = os.getloadavg()[0]
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; peers: "
          + ", ".join(f"{k} {v or 'missing'}" for k, v in peers.versions().items()))
    with peers.quiet():  # transformers imports torchao when it is installed, which logs deprecations
        model, tokenizer = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    calib = calibration_batches(tokenizer, args.calib_batches)
    with tempfile.TemporaryDirectory(prefix="minilm-w8a8-") as tmp:
        variants = build_variants(names, model, tokenizer, calib, Path(tmp))
        print(f"1-min load average before timing: {os.getloadavg()[0]:.2f}, at start {load0:.2f} (this run included)")
        for b in batches:
            print(f"timing batch {b} x {SEQ} tokens: {', '.join(variants)}")
            time_batch(variants, tokenizer, b, args, cosine=b == max(batches))
        load1 = os.getloadavg()[0]
        ref_s = variants["fp32"].seconds
        if not args.no_stsb:
            for name, v in variants.items():
                if v.stsb_model is None:
                    continue
                done = next((u for u in variants.values() if u is not v and u.stsb_model is v.stsb_model
                             and u.spearman is not None), None)
                if done is not None:  # the same eager module (a compiled variant's): the same score
                    v.spearman = done.spearman
                    continue
                slowdown = max(v.seconds[b] / ref_s[b] for b in batches)
                if slowdown > args.stsb_max_slowdown:
                    v.notes.append(f"STS-B not run: {slowdown:.0f}x slower than fp32 here "
                                   f"(limit --stsb-max-slowdown {args.stsb_max_slowdown:g})")
                    continue
                t0 = time.perf_counter()
                with peers.quiet():
                    v.spearman = eval_stsb(v.stsb_model, tokenizer)
                print(f"STS-B {name}: {v.spearman:.2f} ({time.perf_counter() - t0:.0f} s)")

    ref = variants["fp32"]
    print(f"\nall-MiniLM-L6-v2, sequence {SEQ}; speed-up = fp32 eager median / variant median, same run, "
          f"{args.iters} interleaved rounds; cosine on batch {max(batches)}; 1-min load average {load1:.2f} "
          f"after timing, this run included")
    head = "| variant | " + " | ".join(f"b{b} ms | b{b} speed-up" for b in batches)
    print(head + " | cosine to fp32 | STS-B Spearman | drop |")
    print("|" + " --- |" * (1 + 2 * len(batches) + 3))
    footnotes: list[str] = []
    for name, v in variants.items():
        cells = []
        for b in batches:
            t = v.seconds.get(b)
            mark = " (1 call)" if b in v.single else ""
            cells += ["-", "-"] if t is None else [f"{t * 1e3:.1f}{mark}", f"{ref.seconds[b] / t:.2f}x"]
        cos = "-" if v.cosine is None else f"{v.cosine:.5f}"
        sp = "-" if v.spearman is None else f"{v.spearman:.2f}"
        drop = "-" if v.spearman is None or ref.spearman is None else f"{ref.spearman - v.spearman:+.2f}"
        print(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {cos} | {sp} | {drop} |")
        footnotes += [f"{name}: {n}" for n in v.notes if n]
    for n in footnotes:
        print(f"- {n}")
    ao = variants.get("torchao")
    for name in ("w8a8-dynamic", "w8a8-dynamic-compiled", "w8a8-dynamic-floatattn", "w8a8-dynamic-floatattn-compiled"):
        v = variants.get(name)
        if v is None or ao is None:
            continue
        cells = [f"b{b} {ao.seconds[b] / v.seconds[b]:.2f}x" for b in batches if b in v.seconds and b in ao.seconds]
        print(f"{LABELS[name]} / torchao compiled (speed, >1: lowbit faster): {', '.join(cells)}")
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()

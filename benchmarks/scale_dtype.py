"""Accuracy and size of weight-only recipes with float16 scales and zero points (the default) against
float32 ones (`-fp32scales`), side by side in one run.

    python benchmarks/scale_dtype.py minilm [--recipes int8 int4-g128 ...] [--calib 128]
    python benchmarks/scale_dtype.py lm [--model runs/tiny-llama] [--recipes ...] [--calib 128] [--seq 256]

minilm: STS-B dev Spearman of all-MiniLM-L6-v2 (calibration: the first N STS-B train sentences).
lm: held-out perplexity of the small Llama-style LM (calibration: random train windows).
Bytes: what the quantized layers store (codes, scales, zero points, bias; float layers not counted).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import lowbit
from lowbit.modules import QuantModule

DEFAULT = ["int8", "int4-g128", "int4-g32", "int3-g64", "int2-g32",
           "int4-g128-gptq", "int4-g128-hqq", "int4-g128-awq", "int3-g64-gptq", "int3-g64-hqq",
           "int2-g32-gptq", "int2-g32-hqq"]


def stored(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the quantized layers' canonical tensors, layers whose scales stayed float32)."""
    total = wide = 0
    for m in model.modules():
        if isinstance(m, QuantModule):
            total += m.nbytes
            scale = m.canonical_state().get("scale")
            wide += scale is not None and scale.dtype == torch.float32
    return total, wide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["minilm", "lm"])
    ap.add_argument("--model-path", default=None, help="lm: model folder (default: runs/tiny-llama)")
    ap.add_argument("--recipes", nargs="*", default=DEFAULT)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256, help="lm: calibration window length")
    ap.add_argument("--backend", default="dequant",
                    help="kernel for every layer (default dequant: float32 arithmetic, no timing, so both "
                         "sides compute alike; auto lets timing pick, which may differ between them)")
    ap.add_argument("--no-fp32", action="store_true", help="skip scoring the float model")
    args = ap.parse_args()
    if args.model == "minilm":
        from lowbit import hf
        from lowbit_workbench.calib import default_text_calibration
        from lowbit_workbench.evaluate import eval_stsb

        model, tok = hf.load_hf_model(hf.MINILM)
        calib = default_text_calibration(tok, n=args.calib, batch_size=16, max_length=128)

        def score(m):
            return eval_stsb(m, tok)

        metric, fmt = "STS-B", "{:.2f}"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit_workbench import lm

        folder = args.model_path or lm.tiny_llama_path()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        corpus = lm.load_corpus()
        calib = lm.calibration_batches(tok, args.calib, args.seq, seed=0, batch_size=8)

        def score(m):
            return lm.held_out_perplexity(m, tok, corpus=corpus)["all"]

        metric, fmt = "ppl", "{:.3f}"
    if not args.no_fp32:
        print(f"fp32 {metric} {fmt.format(score(model))}; backend {args.backend}", flush=True)
    print(f"| recipe | {metric} fp32 scales | {metric} fp16 scales | diff | bytes fp32 -> fp16 | saved |"
          " float32 left | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        row = []
        for r in (recipe + "-fp32scales", recipe):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = lowbit.quantize(copy.deepcopy(model), r, calibration=calib, backend=args.backend)
            row.append((score(q), *stored(q), time.perf_counter() - t0))
            del q
        (a, ba, _, ta), (b, bb, wide, tb) = row
        diff = f"{b - a:+.3f}" if metric == "STS-B" else f"{b / a - 1:+.3%}"
        print(f"| {recipe} | {fmt.format(a)} | {fmt.format(b)} | {diff} | {ba / 1e6:.3f} -> {bb / 1e6:.3f} MB | "
              f"{1 - bb / ba:.1%} | {wide} | {ta:.0f} / {tb:.0f} |", flush=True)


if __name__ == "__main__":
    main()

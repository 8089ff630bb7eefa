"""Held-out perplexity of the small Llama-style LM (scripts/train_lm.py) under each method and width.

    python benchmarks/lm_ppl.py [--recipes int4-g128 int4-g128-gptq ...] [--calib 128] [--seq 256]

Calibration: random windows of the *train* split (never the held-out text that is scored). Perplexity:
strided, windows of 256 tokens moved by 128 (lowbit.perplexity). For each width, "gap closed" is the
share of round-to-nearest's perplexity gap to fp32 that the method removes: (rtn - method) / (rtn - fp32).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit_workbench import lm

WIDTHS = ["int4-g128", "int3-g128", "int2-g64"]
METHODS = ["", "-gptq", "-awq", "-hqq"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: runs/tiny-llama)")
    ap.add_argument("--recipes", nargs="*", default=[w + m for w in WIDTHS for m in METHODS])
    ap.add_argument("--calib", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq", type=int, default=256, help="calibration window length")
    args = ap.parse_args()
    folder = args.model or lm.tiny_llama_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    corpus = lm.load_corpus()
    calib = lm.calibration_batches(tok, args.calib, args.seq, seed=0, batch_size=8)
    fp32 = lm.held_out_perplexity(model, tok, corpus=corpus)
    print(f"model {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"calibration {args.calib} x {args.seq} train tokens")
    sources = list(fp32)
    print(f"| recipe | {' | '.join(sources)} | vs fp32 | gap closed | quantize s |")
    print(f"|---|{'---|' * len(sources)}---|---|---|")
    print(f"| fp32 | {' | '.join(f'{fp32[s]:.2f}' for s in sources)} | | | |", flush=True)
    rtn = {}
    for recipe in args.recipes:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib)
        took = time.perf_counter() - t0
        ppl = lm.held_out_perplexity(q, tok, corpus=corpus)
        width = recipe.rsplit("-", 1)[0] if recipe.endswith(("-gptq", "-awq", "-hqq", "-rtn")) else recipe
        if width == recipe:
            rtn[width] = ppl["all"]
        closed = ""
        if width != recipe and width in rtn and rtn[width] > fp32["all"]:
            closed = f"{(rtn[width] - ppl['all']) / (rtn[width] - fp32['all']):.0%}"
        print(f"| {recipe} | {' | '.join(f'{ppl[s]:.2f}' for s in sources)} | "
              f"{ppl['all'] / fp32['all'] - 1:+.1%} | {closed} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""What rounding the activations to int8 costs: the int8-activation kernel (lowbit_q8) against lowbit's
float-activation kernel (lowbit_cpu) on the same quantized weights, on real data.

* The small Llama-style LM (scripts/train_lm.py): held-out perplexity (windows of 256, stride 128).
* all-MiniLM-L6-v2: STS-B dev Spearman x100, and cosine of the embeddings to the float-activation ones.

Both kernels read the same packed weights; lowbit_q8 runs every call here (not only decode-sized ones),
so every matmul of the evaluation sees int8 activations.

    python benchmarks/q8_accuracy.py [--lm runs/tiny-llama] [--recipes int8 int4-g128 ...] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.backends import lowbit_cpu
from lowbit.hf import encode, resolve_model_path
from lowbit_workbench import lm
from lowbit_workbench.evaluate import eval_stsb

RECIPES = ["int8", "int4-g128", "int4-g32", "int3-g64", "int2-g32"]
KERNELS = ("lowbit_cpu", "lowbit_q8")


def quantized(model: torch.nn.Module, recipe: str, kernel: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(copy.deepcopy(model), recipe, backend=kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", default=None, help="LM folder (default: runs/tiny-llama)")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    print(f"kernel path {lowbit_cpu.isa()}, int8-activation instructions {lowbit_cpu.q8_path()}")

    folder = args.lm or lm.tiny_llama_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    corpus = lm.load_corpus()
    fp32 = lm.held_out_perplexity(model, tok, corpus=corpus)["all"]
    print(f"\nLM {folder}: fp32 perplexity {fp32:.3f}")
    print("| recipe | ppl lowbit_cpu | ppl lowbit_q8 | q8 / cpu |")
    print("| --- | --- | --- | --- |")
    for recipe in args.recipes:
        ppl = {k: lm.held_out_perplexity(quantized(model, recipe, k), tok, corpus=corpus)["all"] for k in KERNELS}
        print(f"| {recipe} | {ppl['lowbit_cpu']:.3f} | {ppl['lowbit_q8']:.3f} | "
              f"{ppl['lowbit_q8'] / ppl['lowbit_cpu']:.4f} |", flush=True)

    if args.skip_minilm:
        return
    folder = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    print(f"\nall-MiniLM-L6-v2: fp32 STS-B dev {eval_stsb(model, tok):.2f}")
    print("| recipe | STS-B lowbit_cpu | STS-B lowbit_q8 | drop | embedding cosine q8 vs cpu (mean / min) |")
    print("| --- | --- | --- | --- | --- |")
    sentences = [f"sentence number {i} about quantized models running on a CPU" for i in range(64)]
    for recipe in args.recipes:
        qs = {k: quantized(model, recipe, k) for k in KERNELS}
        score = {k: eval_stsb(q, tok) for k, q in qs.items()}
        emb = {k: encode(q, tok, sentences, batch_size=32, max_length=128) for k, q in qs.items()}
        cos = torch.nn.functional.cosine_similarity(emb["lowbit_cpu"], emb["lowbit_q8"], dim=1)
        print(f"| {recipe} | {score['lowbit_cpu']:.2f} | {score['lowbit_q8']:.2f} | "
              f"{score['lowbit_cpu'] - score['lowbit_q8']:+.2f} | {cos.mean():.6f} / {cos.min():.6f} |", flush=True)


if __name__ == "__main__":
    main()

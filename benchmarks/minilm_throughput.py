"""all-MiniLM-L6-v2 encode throughput: fp32 against each recipe at batch 1 and 32, sequence 128.

All variants are timed round-robin in this one run; cosine compares mean-pooled embeddings with fp32's.

    python benchmarks/minilm_throughput.py [--recipes bf16 int8 ...] [--iters 10]
"""

from __future__ import annotations

import argparse
import copy

import lowbit
from lowbit import bench, hf
from lowbit_workbench.calib import timing_texts
from lowbit_workbench.demo import kernel_note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=list(lowbit.RECIPES))
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    model, tokenizer = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    models = {"fp32": model}
    for r in args.recipes:
        models[r] = lowbit.quantize(copy.deepcopy(model), r)
    for b in args.batches:
        print(f"\nbatch {b}, sequence 128")
        print("| recipe | ms/batch | sequences/s | speed-up vs fp32 | cosine to fp32 | kernels |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in bench.compare(models, tokenizer, timing_texts(b), seq=128, iters=args.iters):
            print(f"| {row['model']} | {row['latency_ms']:.1f} | {b / row['latency_ms'] * 1e3:.1f} | "
                  f"{row['speedup']:.2f}x | {row['cosine']:.5f} | {kernel_note(models[row['model']])} |")


if __name__ == "__main__":
    main()

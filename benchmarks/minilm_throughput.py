"""all-MiniLM-L6-v2 encode throughput: fp32 against each recipe at batch 1 and 32, sequence 128.

All variants are timed round-robin in this one run; cosine compares mean-pooled embeddings with fp32's.
Kernel choices are timed afresh in this run (a temporary autotune cache) unless --user-autotune-cache;
the kernels column shows what each layer runs, by row count where it changes ("a<=256,b": kernel a for
calls of up to 256 rows, b above). A batch of 32 x 128 tokens is 4,096 rows per linear layer, batch 1 is 128.

    python benchmarks/minilm_throughput.py [--recipes bf16 int8 ...] [--iters 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch

import lowbit
from lowbit import bench, hf, hw
from lowbit_workbench.calib import default_text_calibration, timing_texts
from lowbit_workbench.demo import kernel_note
from lowbit_workbench.peers import private_autotune_cache

# The weight-only recipes (float activations): the ones whose speed depends on the kernel chosen per row count.
WEIGHT_ONLY = ("bf16", "fp16", "int8", "int4-g128", "int4-g32", "int3-g64", "int2-g32", "int4-g128-hqq",
               "int4-g128-gptq", "int3-g64-gptq", "kmeans4", "kmeans4-g64")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=list(WEIGHT_ONLY))
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--user-autotune-cache", action="store_true",
                    help="let lowbit reuse its cached kernel timings instead of timing afresh in this run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = private_autotune_cache("minilm-throughput-autotune-", args.user_autotune_cache)
    feats = ", ".join(k for k, v in hw.cpu_features().items() if v) or "none detected"
    print(f"{hw.cpu_name()}; features: {feats}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"1-min load average {os.getloadavg()[0]:.2f}")
    model, tokenizer = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    calibration = None
    models = {"fp32": model}
    print("| recipe | quantize s | slower than float (layers) |")
    print("| --- | --- | --- |")
    for r in args.recipes:
        kwargs = {}
        if lowbit.parse_recipe(r).needs_calibration:
            calibration = calibration or default_text_calibration(tokenizer, n=64, batch_size=16, max_length=128)
            kwargs["calibration"] = calibration
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # summarised in the table
            models[r] = lowbit.quantize(copy.deepcopy(model), r, **kwargs)
        slow = getattr(models[r], "lowbit_slower_layers", [])
        print(f"| {r} | {time.perf_counter() - t0:.1f} | {len(slow)}"
              + (f": {slow[0]['reason']}" if slow else "") + " |")
    for b in args.batches:
        print(f"\nbatch {b}, sequence 128 ({b * 128} rows per linear); 1-min load average {os.getloadavg()[0]:.2f}")
        print("| recipe | ms/batch | sequences/s | speed-up vs fp32 | cosine to fp32 | kernels |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in bench.compare(models, tokenizer, timing_texts(b), seq=128, iters=args.iters):
            print(f"| {row['model']} | {row['latency_ms']:.1f} | {b / row['latency_ms'] * 1e3:.1f} | "
                  f"{row['speedup']:.2f}x | {row['cosine']:.5f} | {kernel_note(models[row['model']])} |")
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2 under torch.compile: eager and compiled lowbit side by side, with fp32 eager and compiled.

Every variant is timed round-robin in this one run (medians), at batch 32 and batch 1, sequence 128.
"vs eager" is the compiled model against the same model run eagerly; "cosine vs eager" compares their
mean-pooled embeddings. Compile time (the first call at each shape) is printed apart, not in the latency.

    python benchmarks/minilm_compile.py [--recipes int4-g128 w8a8-dynamic] [--w8a8-backend auto] [--freeze]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

import lowbit
from lowbit import bench, hf, hw
from lowbit_workbench.calib import timing_texts
from lowbit_workbench.demo import kernel_note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=["int4-g128", "w8a8-dynamic"])
    ap.add_argument("--w8a8-backend", default="auto",
                    help="kernel for the W8A8 recipes' layers (auto: measured per layer, may keep slow ones in float)")
    ap.add_argument("--batches", nargs="*", type=int, default=[32, 1])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--freeze", action="store_true", help="inductor's freezing (weights as constants)")
    ap.add_argument("--no-float-compiled", action="store_true", help="skip compiling the fp32 model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = ", ".join(name for name, has in hw.cpu_features().items() if has)
    print(f"CPU: {hw.cpu_name()} ({hw.cpu_count()} cores; {feats}); torch {torch.__version__} "
          f"({hw.torch_cpu_capability()}, {torch.get_num_threads()} threads); freezing={args.freeze}")
    model, tokenizer = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    models = {"fp32": model.eval()}
    for r in args.recipes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "slower than float" notes: the kernels column says what runs
            w8a8 = lowbit.parse_recipe(r).act is not None
            models[r] = lowbit.quantize(copy.deepcopy(model), r, backend=args.w8a8_backend if w8a8 else "auto")
    to_compile = {n: m for n, m in models.items() if not (n == "fp32" and args.no_float_compiled)}
    compiled = bench.compile_models(to_compile, freeze=args.freeze)
    for b in args.batches:
        rows = bench.compare(models, tokenizer, timing_texts(b), seq=128, iters=args.iters, compiled=compiled)
        print(f"\nbatch {b}, sequence 128")
        print("| model | ms/batch | speed-up vs fp32 eager | vs eager | cosine to fp32 | cosine vs eager | "
              "compile s | kernels |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            eager = r["model"].removesuffix(bench.COMPILED)
            vs = f"{r['speedup_eager']:.2f}x" if "compile_s" in r else ""
            cos = f"{r['cosine_eager']:.7f}" if "compile_s" in r else ""
            took = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
            print(f"| {r['model']} | {r['latency_ms']:.1f} | {r['speedup']:.2f}x | {vs} | {r['cosine']:.5f} | {cos} | "
                  f"{took} | {kernel_note(models[eager])} |")


if __name__ == "__main__":
    main()

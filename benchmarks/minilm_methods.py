"""STS-B dev Spearman of all-MiniLM-L6-v2 under recipes fitted by each method.

    python benchmarks/minilm_methods.py [--recipes int4-g128 int4-g128-gptq ...] [--calib 128]

Calibration: the first N STS-B *train* sentences (dev is what is scored). Prints one row per recipe with
the drop against fp32 measured in the same run and the time quantization took.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import lowbit
from lowbit import hf
from lowbit_workbench.calib import default_text_calibration
from lowbit_workbench.evaluate import eval_stsb

DEFAULT = ["int4-g128", "int4-g128-gptq", "int4-g128-awq", "int4-g128-hqq",
           "int3-g64", "int3-g64-gptq", "int3-g64-awq", "int3-g64-hqq",
           "int2-g32", "int2-g32-gptq", "int2-g32-awq", "int2-g32-hqq"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=DEFAULT)
    ap.add_argument("--calib", type=int, default=128, help="STS-B train sentences for calibration")
    ap.add_argument("--backend", default="auto", help="auto, or a kernel (reference: W8A8 arithmetic in float)")
    args = ap.parse_args()
    model, tok = hf.load_hf_model(hf.MINILM)
    calib = default_text_calibration(tok, n=args.calib, batch_size=16, max_length=128)
    fp32 = eval_stsb(model, tok)
    print(f"fp32 STS-B dev Spearman {fp32:.2f}")
    print(f"{'recipe':18s} {'spearman':>8s} {'drop':>6s} {'quantize s':>10s}")
    for recipe in args.recipes:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib, backend=args.backend)
        took = time.perf_counter() - t0
        score = eval_stsb(q, tok)
        print(f"{recipe:18s} {score:8.2f} {score - fp32:+6.2f} {took:10.1f}", flush=True)


if __name__ == "__main__":
    main()

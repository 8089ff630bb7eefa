"""Wall time of `lowbit.quantize(minilm, recipe)`, kernel timing included: on an empty autotune cache (cold, the
first quantization on a machine) and again with the timings cached (warm). The model is loaded before the
clock starts; each recipe's cold run is the first quantization of that recipe in this process.

    python benchmarks/quantize_time.py [--recipes w8a8-dynamic int4-g128] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import tempfile
import time
import warnings

import torch

import lowbit
from lowbit import hf, hw


def timed(model: torch.nn.Module, recipe: str, profile: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a loaded machine the wall time also counts waiting."""
    prof = cProfile.Profile() if profile else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers kept in float or slower: not what is measured here
        lowbit.quantize(model, recipe)
    if prof:
        prof.disable()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=["w8a8-dynamic"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print where the cold run's time goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = ", ".join(k for k, v in hw.cpu_features().items() if v) or "none detected"
    print(f"{hw.cpu_name()}; features: {feats}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"1-min load average {os.getloadavg()[0]:.2f}")
    model, _ = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    print("| recipe | cold cache: wall s | CPU s | warm cache: wall s | CPU s |")
    print("| --- | --- | --- | --- | --- |")
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory(prefix="lowbit-quantize-time-") as cache:
            os.environ["LOWBIT_CACHE_DIR"] = cache
            cold = timed(copy.deepcopy(model), recipe, args.profile)
            warm = timed(copy.deepcopy(model), recipe, False)
        print(f"| {recipe} | {cold[0]:.2f} | {cold[1]:.2f} | {warm[0]:.2f} | {warm[1]:.2f} |")
    print(f"1-min load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2 quantized by lowbit, exported to ONNX and run by ONNX Runtime: same numbers, and how fast.

For each recipe: quantize (STS-B train sentences as calibration where the recipe needs data), export with
`lowbit.export.onnx` (which itself checks the file in ONNX Runtime, optimizations off and on), then on
STS-B dev (every sentence of both sides, mean pooling, max length 128):
  - cosine between ONNX Runtime's embedding and lowbit's own of each sentence (mean and minimum): the file
    carries lowbit's codes, so only float rounding may differ;
  - STS-B dev Spearman x100 of ONNX Runtime's embeddings and of lowbit's;
and timing at batch 1 and batch 32 x 128 tokens, round-robin in one process (medians): the ORT file against
fp32 in ONNX Runtime (the float model's own export) and against lowbit's model in PyTorch (eager).

    python benchmarks/export_onnx.py [--recipes int8,int4-g32,...] [--iters 10] [--batches 1,32]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowbit
import lowbit.export
from lowbit import bench, hf
from lowbit_workbench import peers
from lowbit_workbench.calib import timing_texts
from lowbit_workbench.evaluate import load_stsb, spearman

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_w8a8 import calibration_batches  # the same STS-B train sentences as the W8A8 benchmark

SEQ = 128
RECIPES = ("int8", "int4-g32", "int4-g128-gptq", "w8a8-dynamic", "w8a8-static")


def stsb(model, tokenizer) -> tuple[torch.Tensor, float]:
    """Mean-pooled embeddings of every STS-B dev sentence (side 1 then side 2), and the Spearman x100."""
    s1, s2, gold = load_stsb("dev")
    with torch.inference_mode():
        emb = hf.encode(model, tokenizer, s1 + s2, batch_size=32, max_length=SEQ)
    cos = torch.nn.functional.cosine_similarity(emb[: len(s1)], emb[len(s1):], dim=1)
    return emb, 100.0 * spearman(cos.numpy(), gold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--iters", type=int, default=10, help="timed rounds per batch size")
    ap.add_argument("--batches", default="1,32", help="comma list of batch sizes (sequence 128)")
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 32 sentences")
    ap.add_argument("--keep", default=None, help="folder to keep the .onnx files in (default: a temp folder)")
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, 1-min load {os.getloadavg()[0]:.2f}")
    with peers.quiet():
        model, tokenizer = hf.load_hf_model(hf.resolve_model_path(hf.MINILM))
    calib = calibration_batches(tokenizer, args.calib_batches)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-export-onnx-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32_onnx = peers.export_onnx(model, calib[0], work / "fp32.onnx", dynamic=(0, 1))
        fp32_ort = peers.OrtModel(fp32_onnx)
        inputs = {b: bench.sample_batch(tokenizer, timing_texts(b), SEQ) for b in batches}
        for recipe in recipes:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib)
            t1 = time.perf_counter()
            try:
                path = lowbit.export.onnx(q, calib[0], work / f"{recipe}.onnx", output_names=["last_hidden_state"])
            except lowbit.export.ExportError as e:
                print(f"{recipe}: export refused: {e}", flush=True)
                continue
            t2 = time.perf_counter()
            om = peers.OrtModel(path)
            emb_lb, rho_lb = stsb(q, tokenizer)
            emb_ort, rho_ort = stsb(om, tokenizer)
            cos = torch.nn.functional.cosine_similarity(emb_lb.double(), emb_ort.double(), dim=1)
            row = {"recipe": recipe, "quantize_s": t1 - t0, "export_s": t2 - t1,
                   "mb": path.stat().st_size / 1e6, "fp32_mb": fp32_onnx.stat().st_size / 1e6,
                   "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
                   "rho_lowbit": rho_lb, "rho_ort": rho_ort}
            for b in batches:
                x = inputs[b]
                fns = {"ort": lambda m=om, x=x: m(**x), "ort_fp32": lambda x=x: fp32_ort(**x),
                       "lowbit": lambda m=q, x=x: m(**x)}
                t = bench.time_interleaved(fns, warmup=2, iters=args.iters)
                row[b] = t
            rows.append(row)
            print(f"{recipe}: quantized in {row['quantize_s']:.1f} s, exported and checked in "
                  f"{row['export_s']:.1f} s; {row['mb']:.1f} MB (fp32 file {row['fp32_mb']:.1f} MB); {row}",
                  flush=True)
    print()
    head = "| recipe | file MB | cosine ORT vs lowbit (mean / min) | STS-B lowbit | STS-B ORT | diff |"
    sep = "| --- | --- | --- | --- | --- | --- |"
    for b in batches:
        head += f" b{b}: ORT ms | vs fp32 ORT | vs lowbit |"
        sep += " --- | --- | --- |"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['recipe']} | {r['mb']:.1f} | {r['cos_mean']:.6f} / {r['cos_min']:.6f} | "
                f"{r['rho_lowbit']:.2f} | {r['rho_ort']:.2f} | {r['rho_ort'] - r['rho_lowbit']:+.3f} |")
        for b in batches:
            t = r[b]
            line += (f" {t['ort'] * 1e3:.1f} | {t['ort_fp32'] / t['ort']:.2f}x | "
                     f"{t['lowbit'] / t['ort']:.2f}x |")
        print(line)
    print("\n'vs fp32 ORT' and 'vs lowbit' are speed-ups of the quantized ORT file (>1: the file is faster), "
          "measured round-robin in this run.")


if __name__ == "__main__":
    main()

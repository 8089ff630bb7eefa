"""GPTQ (or any recipe) on the small LM against another tool's weights: KL from fp32 and held-out perplexity.

    python benchmarks/lm_kl.py --dump-calib runs/calib                # calibration windows for a peer tool
    python benchmarks/lm_kl.py [--recipes int3-g128-gptq ...] [--seeds 0 1 2] \\
        [--peer llmc=runs/llmc/llmc_w{bits}_s{seed}.safetensors]

Decoder linears only: the input embeddings and the LM head stay float, as the peers quantize by default.
Calibration: 128 windows of 256 train tokens per seed (lowbit_workbench.lm.calibration_batches), the same
windows for every tool (--dump-calib writes them as calib_s{seed}.pt, an int64 tensor [128, 256]).
Scored on the held-out text cut into windows of 256 tokens (no overlap):
- perplexity;
- KL: the mean KL divergence per token of the quantized model's next-token distribution from the fp32
  model's, the damage itself (perplexity can fall below fp32's by chance);
- against each peer, the mean per-window difference of negative log-likelihood with its standard error
  over windows, so a perplexity gap can be read against the noise of the text it is measured on.
A peer's file holds its dequantized weights (float tensors named as the model's state dict), as
`benchmarks/peer_llmc_gptq.py` writes them from llm-compressor (run in that tool's own environment).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit_workbench import lm


def windows_of(tok, width: int = 256) -> torch.Tensor:
    ids = torch.cat(list(lm.encode_sources(tok, lm.load_corpus(), "held_out").values()))
    n = ids.numel() // width
    return ids[: n * width].reshape(n, width)


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(windows[i:i + batch]).logits.float(), -1)
                      for i in range(0, windows.shape[0], batch)])


def score(lp: torch.Tensor, ref: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean NLL of the next token and mean KL(fp32 || model)."""
    nll = -lp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0]
    kl = (ref.exp() * (ref - lp)).sum(-1)
    return nll.mean(1), kl.mean(1)


def bits_of(recipe: str) -> int:
    return int(recipe.split("-")[0].removeprefix("int"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: runs/tiny-llama)")
    ap.add_argument("--recipes", nargs="*", default=["int4-g128-gptq", "int3-g128-gptq", "int2-g64-gptq"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--peer", action="append", default=[],
                    help="NAME=PATH with {bits} and {seed} in PATH: another tool's dequantized weights")
    ap.add_argument("--dump-calib", default=None, help="write the calibration windows here and stop")
    args = ap.parse_args()
    folder = args.model or lm.tiny_llama_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if args.dump_calib:
        out = Path(args.dump_calib)
        out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            batches = lm.calibration_batches(tok, args.calib, args.seq, seed=seed, batch_size=8)
            torch.save(torch.cat([b["input_ids"] for b in batches]), out / f"calib_s{seed}.pt")
        print(f"wrote calib_s{{{','.join(map(str, args.seeds))}}}.pt to {out}")
        return
    peers = dict(p.split("=", 1) for p in args.peer)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    windows = windows_of(tok)
    ref = log_probs(model, windows)
    fp_nll, _ = score(ref, ref, windows)
    print(f"{windows.shape[0]} held-out windows of {windows.shape[1]} tokens; fp32 perplexity "
          f"{math.exp(fp_nll.mean()):.3f}; calibration {args.calib} x {args.seq} train tokens per seed")
    print("| recipe | seed | tool | perplexity | KL (1e-3) | dNLL vs lowbit (1e-4, +- s.e.) | quantize s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    layers = {"model.embed_tokens": "float", "lm_head": "float"}
    for recipe in args.recipes:
        for seed in args.seeds:
            calib = lm.calibration_batches(tok, args.calib, args.seq, seed=seed, batch_size=8)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = lowbit.quantize(copy.deepcopy(model), {**layers, "*": recipe}, calibration=calib)
            took = time.perf_counter() - t0
            own = score(log_probs(q, windows), ref, windows)
            print(f"| {recipe} | {seed} | lowbit | {math.exp(own[0].mean()):.3f} | {own[1].mean() * 1e3:.3f} | | "
                  f"{took:.0f} |", flush=True)
            for name, pattern in peers.items():
                path = Path(pattern.format(bits=bits_of(recipe), seed=seed))
                if not path.is_file():
                    print(f"| {recipe} | {seed} | {name} | (no file {path}) | | | |")
                    continue
                other = copy.deepcopy(model)
                state = load_file(str(path))
                result = other.load_state_dict(state, strict=False)
                if result.unexpected_keys:
                    raise ValueError(f"{path}: tensors the model does not have: {result.unexpected_keys[:3]}")
                theirs = score(log_probs(other, windows), ref, windows)
                d = theirs[0] - own[0]
                print(f"| {recipe} | {seed} | {name} | {math.exp(theirs[0].mean()):.3f} | "
                      f"{theirs[1].mean() * 1e3:.3f} | {d.mean() * 1e4:+.2f} +- {d.std() / math.sqrt(d.numel()) * 1e4:.2f} "
                      f"| |", flush=True)


if __name__ == "__main__":
    main()

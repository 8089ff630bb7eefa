"""The small LM exported to GGUF and run in llama.cpp: perplexity and speed beside lowbit's own.

    python benchmarks/gguf_llama_cpp.py --model runs/tiny-llama --llama-cpp-bin LLAMA_CPP/build/bin

For fp32 (-> F32), int8 (symmetric, -> Q8_0), int4-g32 symmetric (-> Q4_0) and int4-g32 (-> Q4_1): quantize
with lowbit (every layer, none kept in float), export with lowbit.export.gguf (which checks the file's
weights against lowbit's), then
  - perplexity on the held-out text of the LM corpus (lowbit_workbench.lm) with llama.cpp's own protocol,
    computed both by `llama-perplexity` and here on lowbit's model: the text tokenized whole (BOS first),
    cut into non-overlapping chunks of --ctx tokens, each chunk's first token replaced by BOS, and only
    the second half of each chunk scored;
  - the token ids llama.cpp's tokenizer (read from the GGUF file) gives for that text against the Hugging
    Face tokenizer's;
  - decode and prefill speed: `llama-bench` (tg --gen tokens, pp --ctx tokens) against lowbit's model
    (model.generate with its KV cache, greedy, --gen new tokens; one forward of --ctx tokens), on
    --threads threads, the best of 5 runs each.
llama.cpp is not part of lowbit: pass the folder of its built tools (llama-perplexity, llama-bench,
llama-tokenize). Without it, or when they do not run, the llama.cpp columns are skipped and the reason
is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.export import gguf as export_gguf
from lowbit.perplexity import token_ids
from lowbit_workbench import lm

VARIANTS = {  # name -> recipe (None: the float model) and the GGUF type its linears become
    "fp32": (None, "F32"),
    "int8": ("int8", "Q8_0"),
    "int4-g32-sym": (lowbit.QuantConfig("int", 4, 32, symmetric=True), "Q4_0"),
    "int4-g32": ("int4-g32", "Q4_1"),
}
TOOLS = ("llama-perplexity", "llama-bench", "llama-tokenize")


def chunked_perplexity(model: torch.nn.Module, ids: torch.Tensor, n_ctx: int, bos: int | None,
                       batch: int = 8) -> tuple[float, int]:
    """llama-perplexity's protocol on `ids` (the whole text's tokens): chunks of n_ctx, first token set to
    BOS, tokens n_ctx/2 + 1 .. n_ctx - 1 of each chunk scored. Returns (perplexity, tokens scored)."""
    n_chunk = len(ids) // n_ctx
    chunks = ids[:n_chunk * n_ctx].reshape(n_chunk, n_ctx).clone()
    if bos is not None:
        chunks[:, 0] = bos
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n_chunk, batch):
            x = chunks[i:i + batch]
            logits = model(input_ids=x, use_cache=False).logits[:, first:n_ctx - 1].double()
            targets = x[:, first + 1:]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1))
            nll -= logp.sum().item()
            count += targets.numel()
    return math.exp(nll / count), count


def lowbit_speed(model: torch.nn.Module, prompt: torch.Tensor, n_ctx: int, n_gen: int,
                 reps: int = 5) -> tuple[float, float]:
    """(decode tokens/s of model.generate with its KV cache, greedy, n_gen new tokens after `prompt`;
    prefill tokens/s of one forward over n_ctx tokens), the best of `reps` runs after a warm-up (on a
    shared machine the best run is the one least slowed by others; llama-bench's are taken alike)."""
    x = prompt[:n_ctx].unsqueeze(0)
    start = prompt[:8].unsqueeze(0)
    gen_kw = {"max_new_tokens": n_gen, "min_new_tokens": n_gen, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(start, **gen_kw)
        model(input_ids=x, use_cache=False)
        decode, prefill = [], []
        for _ in range(reps):
            t = time.perf_counter()
            out = model.generate(start, **gen_kw)
            decode.append((out.shape[1] - start.shape[1]) / (time.perf_counter() - t))
            t = time.perf_counter()
            model(input_ids=x, use_cache=False)
            prefill.append(n_ctx / (time.perf_counter() - t))
    return max(decode), max(prefill)


def run(cmd: list[str], timeout: float = 1800) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {r.returncode}: {(r.stderr or r.stdout)[-800:]}")
    return r.stdout + r.stderr


def llama_perplexity(bin_dir: Path, gguf: Path, text_file: Path, n_ctx: int, threads: int) -> float:
    out = run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
               "-t", str(threads), "-tb", str(threads), "--no-escape", "--no-warmup"])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"llama-perplexity printed no final estimate: {out[-800:]}")
    return float(m.group(1))


def llama_tokens(bin_dir: Path, gguf: Path, text_file: Path) -> list[int]:
    out = run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(text_file), "--ids", "--no-escape",
               "--log-disable"])
    m = re.search(r"^\[([0-9, ]*)\]\s*$", out, re.MULTILINE)
    if not m:
        raise RuntimeError(f"llama-tokenize printed no ids: {out[-400:]}")
    return [int(t) for t in m.group(1).split(",") if t.strip()]


def llama_bench(bin_dir: Path, gguf: Path, n_ctx: int, n_gen: int, threads: int) -> tuple[float, float]:
    """(tg tokens/s, pp tokens/s) of llama-bench, the best of its 5 repetitions."""
    out = run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(n_ctx), "-n",
               str(n_gen), "-r", "5", "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    tg = next(max(r["samples_ts"]) for r in rows if r["n_gen"] > 0)
    pp = next(max(r["samples_ts"]) for r in rows if r["n_prompt"] > 0)
    return tg, pp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the LM's folder (default: runs/tiny-llama)")
    ap.add_argument("--llama-cpp-bin", default=None, help="folder of llama-perplexity, llama-bench, llama-tokenize")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ctx", type=int, default=256, help="perplexity chunk and prefill length")
    ap.add_argument("--gen", type=int, default=128, help="tokens decoded for the speed figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None, help="where to keep the GGUF files (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.model or lm.tiny_llama_path())
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    text = lm.held_out_text(lm.load_corpus())
    # llama-perplexity's -f drops one trailing newline: give both sides the same string.
    text = text.removesuffix("\n")
    ids = token_ids(tok, text)  # with the tokenizer's BOS first, as llama.cpp adds it

    skip = None
    bin_dir = Path(args.llama_cpp_bin) if args.llama_cpp_bin else None
    if bin_dir is None:
        skip = "no --llama-cpp-bin given"
    elif missing := [t for t in TOOLS if not (bin_dir / t).is_file()]:
        skip = f"{', '.join(missing)} not found in {bin_dir}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    print(f"model {folder}; held-out text {len(text)} characters, {len(ids)} tokens; chunks of {args.ctx}; "
          f"{args.threads} threads; {cpu} ({'AVX-512' if avx512 else 'no AVX-512'})")

    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = out_dir / "held_out.txt"
    text_file.write_bytes(text.encode("utf-8"))
    rows = []
    tokens_checked = False
    for name in args.variants:
        recipe, qtype = VARIANTS[name]
        model = copy.deepcopy(base)
        if recipe is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lowbit.quantize(model, recipe, keep_float_if_slower=False)
        path = export_gguf(model, out_dir / f"tiny-llama-{name}.gguf", tokenizer=tok,
                                  echo=lambda s, name=name: print(f"  [{name}] {s}"))
        ppl, scored = chunked_perplexity(model, ids, args.ctx, tok.bos_token_id)
        decode, prefill = lowbit_speed(model, ids, args.ctx, args.gen)
        row = {"variant": name, "gguf": qtype, "mib": path.stat().st_size / 2**20, "ppl": ppl, "scored": scored,
               "decode": decode, "prefill": prefill}
        if skip is None:
            try:
                if not tokens_checked:
                    theirs = llama_tokens(bin_dir, path, text_file)
                    same = theirs == ids.tolist()
                    where = next((i for i, (a, b) in enumerate(zip(theirs, ids.tolist())) if a != b),
                                 min(len(theirs), len(ids)))
                    print(f"token ids: llama.cpp's tokenizer (from the GGUF file) gives {len(theirs)}, Hugging Face's "
                          f"{len(ids)}: " + ("identical" if same else f"they differ first at position {where}"))
                    tokens_checked = True
                row["llama_ppl"] = llama_perplexity(bin_dir, path, text_file, args.ctx, args.threads)
                row["llama_tg"], row["llama_pp"] = llama_bench(bin_dir, path, args.ctx, args.gen, args.threads)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                skip = f"llama.cpp failed on {path.name}: {e}"
        rows.append(row)
        print(f"  [{name}] lowbit ppl {ppl:.4f} ({scored} tokens scored), decode {decode:.1f} tok/s"
              + (f"; llama.cpp ppl {row['llama_ppl']:.4f}" if "llama_ppl" in row else ""), flush=True)

    print()
    print("| variant | GGUF | MiB | ppl lowbit | ppl llama.cpp | ratio | decode tok/s lowbit | llama.cpp tg | "
          "prefill tok/s lowbit | llama.cpp pp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        has = "llama_ppl" in r
        ratio = f"{r['llama_ppl'] / r['ppl']:.4f}" if has else "-"
        print(f"| {r['variant']} | {r['gguf']} | {r['mib']:.2f} | {r['ppl']:.3f} | "
              f"{r['llama_ppl']:.3f} | {ratio} | {r['decode']:.0f} | {r['llama_tg']:.0f} | "
              f"{r['prefill']:.0f} | {r['llama_pp']:.0f} |" if has else
              f"| {r['variant']} | {r['gguf']} | {r['mib']:.2f} | {r['ppl']:.3f} | - | - | {r['decode']:.0f} | - | "
              f"{r['prefill']:.0f} | - |")
    if skip is not None:
        print(f"\nllama.cpp skipped: {skip}")
    else:
        worst = max(abs(r["llama_ppl"] / r["ppl"] - 1) for r in rows)
        print(f"\nlargest perplexity difference llama.cpp vs lowbit: {worst:.3%} "
              f"({'within' if worst <= 0.005 else 'OUTSIDE'} 0.5%)")
    print(f"GGUF files in {out_dir}")


if __name__ == "__main__":
    main()

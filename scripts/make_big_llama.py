"""Write a random-initialized Llama-shaped model as sharded fp32 safetensors, to test quantizing models
larger than memory (`lowbit quantize DIR --recipe int4-g128-gptq ...` reads it block by block).

    python scripts/make_big_llama.py --out runs/big-llama --tokenizer runs/tiny-llama

Defaults: hidden 2048, 34 layers, intermediate 8192, 32 heads / 8 KV heads (Llama-3.2-1B's layer shape,
deeper): 8.4 GB of fp32 weights. The vocabulary is the given tokenizer's, so the result can generate text
(random weights: the text is noise, but every step of loading and generating runs). Tensors are made and
written one shard at a time: memory stays around one shard. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from lowbit.hf import skeleton_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None, help="folder of a tokenizer to ship (sets the vocabulary)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size without --tokenizer")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True) if args.tokenizer else None
    config = LlamaConfig(vocab_size=len(tok) if tok else args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=getattr(tok, "eos_token_id", None))
    config.architectures = ["LlamaForCausalLM"]
    shapes = {n: tuple(p.shape) for n, p in skeleton_from_config(config, True).state_dict().items()
              if not n.endswith("inv_freq")}
    limit = int(args.shard_gb * 2**30)
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():  # assign tensors to shards first: file names carry the count
        nbytes = 4 * int(torch.Size(shape).numel())
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    shards.append(cur)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                g = torch.Generator().manual_seed(args.seed * 100003 + list(shapes).index(name))
                shape = shapes[name]
                tensors[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
                weight_map[name] = fname
                total += 4 * tensors[name].numel()
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            print(f"wrote {fname} ({sum(t.numel() for t in tensors.values()) * 4 / 1e9:.2f} GB)", flush=True)
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{out}: {n / 1e9:.2f} B parameters, {total / 1e9:.2f} GB fp32 in {len(shards)} shards, "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

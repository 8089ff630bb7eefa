"""Train the small Llama-style causal LM that lowbit measures language-model quantization on.

    python scripts/train_lm.py [--steps 700] [--out runs/tiny-llama] [--seed 0]

Data: the train parts of the lowbit_workbench/data/lm corpus (WikiText-2 valid, tiny-shakespeare, Python's pydoc topics;
see lowbit_workbench.lm). First a byte-level BPE tokenizer is trained on them, then a LlamaForCausalLM (RoPE,
RMSNorm, SwiGLU, grouped-query attention, untied input and output embeddings) with AdamW, linear warmup
and cosine decay. Batches are windows of the concatenated train tokens in an order fixed by --seed, so
the same flags on the same machine give the same model. Prints the parameter count, the train loss every
--log-every steps, the wall time and the held-out perplexity per source against a unigram baseline.

The result is a Hugging Face folder (config.json, model.safetensors, tokenizer files, training.json)
loadable offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder). It is written to a
temp folder beside --out and renamed into place, so an interrupted run never leaves a broken model.

Time: about 12 minutes for the default 700 steps on 2 idle CPU cores (~2000 tokens/s). If other work
holds a core, OpenMP's spinning worker threads slow training down several-fold; starting the script with
OMP_WAIT_POLICY=PASSIVE in the environment avoids most of that (it costs ~25% on idle cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit_workbench import lm

VOCAB_SIZE = 8192
CONTEXT = 256
MODEL = {
    "hidden_size": 256,
    "intermediate_size": 768,  # 3x hidden; a multiple of 128 so int4-g128 groups fit every layer
    "num_hidden_layers": 4,
    "num_attention_heads": 8,  # head dim 32
    "num_key_value_heads": 2,  # grouped-query attention, 4 query heads per KV head
    "max_position_embeddings": CONTEXT,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
BOS, EOS = "<s>", "</s>"


def train_tokenizer(corpus: dict[str, lm.Split], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the train parts; every encoding starts with BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = (line for split in corpus.values() for line in split.train.splitlines(keepends=True))
    tok.train_from_iterator(lines, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   model_max_length=CONTEXT)


def batch_order(n_tokens: int, seq_len: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Start offsets of the windows of every step: each epoch cuts the token stream into windows from a
    random offset below seq_len and visits them in a random order (the last partial batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        offset = int(torch.randint(0, seq_len, (1,), generator=gen))
        n_windows = (n_tokens - offset) // seq_len
        starts = offset + seq_len * torch.randperm(n_windows, generator=gen)
        order.extend(starts[i: i + batch_size] for i in range(0, n_windows - batch_size + 1, batch_size))
    return order[:steps]


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor * peak` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def save_atomic(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, summary: dict, out: Path) -> None:
    """Write the folder beside `out`, then swap it in with renames."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The generic class name keeps the folder loadable by transformers 4.x too (5.x maps it to its
        # tokenizers backend).
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=8, help=f"windows of {CONTEXT} tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=lm.TINY_LLAMA_DIR)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)

    start = time.perf_counter()
    corpus = lm.load_corpus()
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE)
    ids = lm.train_ids(tokenizer, corpus)
    print(f"tokenizer: vocab {len(tokenizer)}, {ids.numel():,} train tokens "
          f"({time.perf_counter() - start:.1f}s)", flush=True)

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **MODEL)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    print(f"model: {n_params:,} parameters ({n_params - n_embed:,} outside the embeddings and LM head); "
          f"{torch.get_num_threads()} threads", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    order = batch_order(ids.numel(), CONTEXT, args.batch_size, args.steps, args.seed)
    offsets = torch.arange(CONTEXT)
    epochs = args.steps * args.batch_size * CONTEXT / ids.numel()
    print(f"training: {args.steps} steps x {args.batch_size} x {CONTEXT} tokens ({epochs:.2f} epochs), "
          f"peak lr {args.lr:g}, warmup {warmup}", flush=True)

    model.train()
    train_start = time.perf_counter()
    window_loss, window_steps, last_loss = 0.0, 0, float("nan")
    for step, starts in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        batch = ids[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window_loss += loss.item()
        window_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last_loss = window_loss / window_steps
            seconds = time.perf_counter() - train_start
            print(f"step {step + 1}/{args.steps}  loss {last_loss:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}"
                  f"  {seconds:.0f}s  {(step + 1) * args.batch_size * CONTEXT / seconds:.0f} tok/s", flush=True)
            window_loss, window_steps = 0.0, 0
    train_seconds = time.perf_counter() - train_start
    print(f"training time {train_seconds:.1f}s ({train_seconds / 60:.1f} min)", flush=True)

    eval_start = time.perf_counter()
    ppl = lm.held_out_perplexity(model, tokenizer, max_length=CONTEXT, stride=CONTEXT // 2)
    held = lm.encode_sources(tokenizer, corpus, "held_out")
    unigram = {source: lm.unigram_perplexity(ids, held_ids, len(tokenizer)) for source, held_ids in held.items()}
    weights = {source: held_ids.numel() - 1 for source, held_ids in held.items()}
    unigram["all"] = math.exp(sum(weights[s] * math.log(unigram[s]) for s in held) / sum(weights.values()))
    print(f"held-out perplexity (max_length {CONTEXT}, stride {CONTEXT // 2}; "
          f"{time.perf_counter() - eval_start:.0f}s):")
    for source in ppl:
        tokens = f"{weights[source]:,} tokens" if source in weights else f"{sum(weights.values()):,} tokens"
        print(f"  {source:16s} {ppl[source]:9.2f}   unigram baseline {unigram[source]:9.2f}   ({tokens})")

    summary = {
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": CONTEXT, "peak_lr": args.lr,
        "warmup": warmup, "seed": args.seed, "train_tokens": ids.numel(), "epochs": round(epochs, 3),
        "parameters": n_params, "train_seconds": round(train_seconds, 1), "final_train_loss": round(last_loss, 4),
        "held_out_perplexity": {k: round(v, 3) for k, v in ppl.items()},
        "unigram_perplexity": {k: round(v, 3) for k, v in unigram.items()},
        "eval": {"max_length": CONTEXT, "stride": CONTEXT // 2},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    save_atomic(model, tokenizer, summary, args.out)
    print(f"total time {time.perf_counter() - start:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2: post-training quantization against QAT with distillation, STS-B dev Spearman.

    python benchmarks/qat_minilm.py [--recipe int4-g32-a8-dynamic] [--epochs 1] [--lr 2e-5]

QAT: lowbit.qat.prepare on the float model, trained on the STS-B *train* sentences (no labels) to match
the float teacher: mean squared error of every layer's hidden states plus of the mean-pooled sentence
embedding (lowbit.qat.distillation_loss with hidden pairs). Then lowbit.qat.convert, and the converted
model is scored. fp32, PTQ and QAT rows come from the same run.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
import warnings

import torch

import lowbit
from lowbit import hf, qat
from lowbit_workbench.calib import default_text_calibration
from lowbit_workbench.evaluate import eval_stsb, load_stsb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="int4-g32-a8-dynamic")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learn-scales", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, tok = hf.load_hf_model(hf.MINILM)
    fp32 = eval_stsb(model, tok)
    print(f"fp32 STS-B dev Spearman {fp32:.2f}", flush=True)
    calib = default_text_calibration(tok, n=128, batch_size=16, max_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptq = lowbit.quantize(copy.deepcopy(model), args.recipe, calibration=calib, keep_float_if_slower=False)
    ptq_score = eval_stsb(ptq, tok)
    print(f"PTQ {args.recipe}: {ptq_score:.2f} ({ptq_score - fp32:+.2f})", flush=True)
    del ptq

    s1, s2, _ = load_stsb("train")
    sentences = sorted(set(s1 + s2))
    random.Random(args.seed).shuffle(sentences)
    teacher = copy.deepcopy(model).eval()
    qat.prepare(model, args.recipe, learn_scales=args.learn_scales)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = int(args.epochs * len(sentences) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.05 * steps + 1)) * (1 - s / steps))
    t0 = time.perf_counter()
    for step in range(steps):
        i = (step * args.batch_size) % len(sentences)
        batch = tok(sentences[i:i + args.batch_size], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
        s_out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        s_emb, t_emb = hf.mean_pool(s_out.last_hidden_state, mask), hf.mean_pool(t_out.last_hidden_state, mask)
        pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:])) + [(s_emb, t_emb)]
        loss = qat.distillation_loss(None, None, hidden=pairs)  # an encoder: no logits, hidden states only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {float(loss.detach()):.5f} {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    fake = eval_stsb(model, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.convert(model)
    score = eval_stsb(q, tok)
    print(f"QAT {args.recipe}: fake-quantized {fake:.2f}, converted {score:.2f} ({score - fp32:+.2f}); "
          f"PTQ {ptq_score:.2f}; fp32 {fp32:.2f}; {steps} steps, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()

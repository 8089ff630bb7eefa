"""Quantization-aware training of the MNIST CNN, on one process or many.

    python scripts/qat_mnist.py --recipe int4-a8 --out runs/mnist-int4-a8
    torchrun --nproc_per_node=2 scripts/qat_mnist.py --recipe int4-a8 --grad-compression int8

Starts from the shipped float model (or from a seeded random init with --from-scratch), trains under
lowbit.qat with the float model as distillation teacher, converts, and (rank 0 only) saves the
quantized checkpoint and a JSON record: accuracy of float / post-training / QAT fake-quantized /
converted, the loss curve, and under torchrun the gradient bytes each step sent, counted at the hook
(payload) and on the loopback interface (/proc/net/dev, what gloo really put on the wire).

Under torchrun each process takes every WORLD_SIZE-th example of the same seeded order, so the global
batch and the data seen per step are the same as on one process. Backend: gloo on CPU, nccl with CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lowbit
from lowbit import distributed
from lowbit_workbench import vision


def loopback_bytes() -> int | None:
    """Bytes sent on the loopback interface so far (Linux), or None where that cannot be read."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmit bytes
    except (OSError, ValueError, IndexError):
        return None
    return None


@torch.no_grad()
def eval_loss(model: torch.nn.Module, split: str = "eval") -> float:
    x, y = vision.load_mnist(split)
    was = model.training
    model.eval()
    loss = float(F.cross_entropy(model(x), y))
    model.train(was)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="int4-a8")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (split across processes)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-4; 1e-3 for "
                    "ternary/binary and from scratch)")
    ap.add_argument("--learn-scales", action="store_true", help="LSQ: train the weight scales")
    ap.add_argument("--no-distill", action="store_true", help="cross-entropy only (no float teacher)")
    ap.add_argument("--from-scratch", action="store_true", help="random init instead of the shipped model")
    ap.add_argument("--grad-compression", default="none", choices=distributed.SCHEMES)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between points of the loss curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="checkpoint directory (rank 0 writes it)")
    ap.add_argument("--record", type=Path, default=None, help="JSON record of the run (rank 0)")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1 if world > 1 else torch.get_num_threads())
    say = print if rank == 0 else (lambda *a, **k: None)

    x, y = vision.load_mnist("train")
    calib = [x[i:i + 100] for i in range(0, 1000, 100)]
    if args.from_scratch:
        model = vision.MnistCNN().eval()
    else:
        model = vision.load_mnist_model()
    teacher = None if (args.no_distill or args.from_scratch) else copy.deepcopy(model).eval()
    record = {"recipe": args.recipe, "world_size": world, "grad_compression": args.grad_compression,
              "fp32": vision.evaluate_mnist(model)}
    if not args.from_scratch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ptq = lowbit.quantize(copy.deepcopy(model), args.recipe, calibration=calib, keep_float_if_slower=False)
        record["ptq"] = vision.evaluate_mnist(ptq)
        say(f"fp32 {record['fp32']:.2f}%  PTQ {args.recipe} {record['ptq']:.2f}%", flush=True)

    model.train()
    lowbit.qat.prepare(model, args.recipe, learn_scales=args.learn_scales)
    net = model
    stats = None
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
        stats = distributed.compress_gradients(net, args.grad_compression)
    slow = args.from_scratch or lowbit.parse_recipe(args.recipe).kind in ("ternary", "binary")
    lr = args.lr or (1e-3 if slow else 3e-4)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(x) // args.batch_size
    steps = args.steps or int(args.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, lo_start, t0 = [], loopback_bytes(), time.perf_counter()
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        batch = order[(step % per_epoch) * args.batch_size:][: args.batch_size]
        xb = vision._random_shift(x[batch], 2, gen)[rank::world]  # same augmentation on every process
        yb = y[batch][rank::world]
        out = net(xb)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(xb)
            loss = lowbit.qat.distillation_loss(out, soft, yb, alpha=0.5)
        else:
            loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            point = {"step": step + 1, "train_loss": float(loss.detach())}
            if rank == 0:  # the objective on all training images, and the loss on the held-out ones
                point["full_train_loss"] = eval_loss(model, "train")
                point["eval_loss"] = eval_loss(model)
            curve.append(point)
            say(f"step {step + 1}/{steps}  loss {point['train_loss']:.4f}  eval loss "
                f"{point.get('eval_loss', float('nan')):.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    lo_end = loopback_bytes()
    record.update(steps=steps, lr=lr, learn_scales=args.learn_scales, distill=teacher is not None,
                  seconds=round(time.perf_counter() - t0, 1), curve=curve, final_eval_loss=curve[-1].get("eval_loss"),
                  final_train_loss=curve[-1].get("full_train_loss"))
    if stats is not None:
        record["payload_bytes_per_step"] = stats.bytes_sent / steps
        if lo_start is not None and lo_end is not None:
            record["loopback_bytes_per_step"] = (lo_end - lo_start) / steps
        say(f"gradient bytes per step per process: {record['payload_bytes_per_step']:.0f} (payload); "
            f"loopback, all processes: {record.get('loopback_bytes_per_step', float('nan')):.0f}", flush=True)
    record["qat_fake_quant"] = vision.evaluate_mnist(model)
    if rank == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = lowbit.qat.convert(model, calibration=calib)
        record["converted"] = vision.evaluate_mnist(q)
        say(f"QAT {args.recipe}: fake-quantized {record['qat_fake_quant']:.2f}%  converted "
            f"{record['converted']:.2f}%", flush=True)
        if args.out is not None:
            lowbit.save(q, args.out)
            record["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(args.out).iterdir())
            say(f"saved {args.out} ({record['checkpoint_bytes']} bytes)")
        if args.record is not None:
            args.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(args.record)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

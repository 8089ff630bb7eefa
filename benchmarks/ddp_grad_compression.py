"""Gradient compression under 2-process DDP on this CPU: bytes per step and the training curve.

    python benchmarks/ddp_grad_compression.py [--steps 375] [--nproc 2] [--seeds 0 1 2]

Runs scripts/qat_mnist.py under torchrun once per scheme and seed (fp32 all-reduce, int8, 1-bit sign with
error feedback); for one seed every scheme starts from the same random init and sees the same batches
(QAT int4-a8, no teacher). Prints bytes sent per step (payload handed to the collectives by each process,
and all bytes that crossed the loopback interface), the final loss on all training images (the objective)
and on the held-out images, as means over the seeds, and the curve of the first seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(scheme: str, steps: int, nproc: int, recipe: str, tmp: Path, seed: int) -> dict:
    record = tmp / f"{scheme}-{seed}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "scripts" / "qat_mnist.py"), "--recipe", recipe, "--from-scratch", "--steps", str(steps),
           "--grad-compression", scheme, "--eval-every", str(max(1, steps // 15)), "--seed", str(seed), "--record", str(record)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(record.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=375)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--recipe", default="int4-a8")
    ap.add_argument("--schemes", nargs="*", default=["fp32", "int8", "sign"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = {s: [run(s, args.steps, args.nproc, args.recipe, Path(d), seed) for seed in args.seeds]
                for s in args.schemes}

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    base = runs.get("fp32")
    print(f"{args.nproc} processes, gloo, {args.steps} steps, QAT {args.recipe} from a seeded random init, "
          f"seeds {args.seeds}\n")
    print("| gradients | payload B/step/process | fewer | loopback B/step | fewer | final train loss | vs fp32 "
          "| final held-out loss | vs fp32 | accuracy % | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, rs in runs.items():
        p, lo = mean(rs, "payload_bytes_per_step"), mean(rs, "loopback_bytes_per_step")
        tr, ev = mean(rs, "final_train_loss"), mean(rs, "final_eval_loss")
        bp, blo = (mean(base, "payload_bytes_per_step"), mean(base, "loopback_bytes_per_step")) if base else (p, lo)
        btr, bev = (mean(base, "final_train_loss"), mean(base, "final_eval_loss")) if base else (tr, ev)
        print(f"| {s} | {p:,.0f} | {bp / p:.1f}x | {lo:,.0f} | {blo / lo:.1f}x | {tr:.4f} | {tr / btr - 1:+.1%} | "
              f"{ev:.4f} | {ev / bev - 1:+.1%} | {mean(rs, 'qat_fake_quant'):.2f} | {mean(rs, 'seconds'):.0f} |")
    print("\nper seed, final train loss: " + "; ".join(
        f"{s} " + ", ".join(f"{r['final_train_loss']:.4f}" for r in rs) for s, rs in runs.items()))
    print(f"\ncurve, seed {args.seeds[0]} (loss on all training images by step):")
    steps = [p["step"] for p in next(iter(runs.values()))[0]["curve"]]
    print("| step | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i, st in enumerate(steps):
        print(f"| {st} | " + " | ".join(f"{rs[0]['curve'][i]['full_train_loss']:.4f}" for rs in runs.values()) + " |")


if __name__ == "__main__":
    main()

"""Gradient compression under 2-process DDP on this CPU: bytes per step and the training curve.

    python benchmarks/ddp_grad_compression.py [--steps 375] [--nproc 2]

Runs scripts/qat_mnist.py under torchrun once per scheme (fp32 all-reduce, int8, 1-bit sign with error
feedback), from the same seeded random init, same data order, same steps (QAT int4-a8, no teacher), and
prints bytes sent per step (payload handed to the collectives by each process, and all bytes that
crossed the loopback interface) and the held-out loss curve of each.
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


def run(scheme: str, steps: int, nproc: int, recipe: str, tmp: Path) -> dict:
    record = tmp / f"{scheme}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "scripts" / "qat_mnist.py"), "--recipe", recipe, "--from-scratch", "--steps", str(steps),
           "--grad-compression", scheme, "--eval-every", str(max(1, steps // 15)), "--record", str(record)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(record.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=375)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--recipe", default="int4-a8")
    ap.add_argument("--schemes", nargs="*", default=["fp32", "int8", "sign"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = {s: run(s, args.steps, args.nproc, args.recipe, Path(d)) for s in args.schemes}
    base = runs.get("fp32")
    print(f"{args.nproc} processes, gloo, {args.steps} steps, QAT {args.recipe} from a seeded random init\n")
    print("| gradients | payload B/step/process | fewer bytes | loopback B/step | fewer bytes | final eval loss "
          "| vs fp32 | QAT acc % | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in runs.items():
        p, lo = r["payload_bytes_per_step"], r.get("loopback_bytes_per_step")
        fp, flo = (base["payload_bytes_per_step"] / p, base.get("loopback_bytes_per_step", 0) / lo) if base else (0, 0)
        rel = r["final_eval_loss"] / base["final_eval_loss"] - 1 if base else 0.0
        print(f"| {s} | {p:,.0f} | {fp:.1f}x | {lo:,.0f} | {flo:.1f}x | {r['final_eval_loss']:.4f} | {rel:+.1%} | "
              f"{r['qat_fake_quant']:.2f} | {r['seconds']:.0f} |")
    print("\ncurve (held-out loss by step):")
    steps = [p["step"] for p in next(iter(runs.values()))["curve"]]
    print("| step | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i, st in enumerate(steps):
        print(f"| {st} | " + " | ".join(f"{r['curve'][i]['eval_loss']:.4f}" for r in runs.values()) + " |")


if __name__ == "__main__":
    main()

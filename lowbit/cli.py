"""The `lowbit` command: a thin layer over the Python API."""

from __future__ import annotations

import os
import sys

import click

from .recipes import RECIPES


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowbit")
def main() -> None:
    """Quantize PyTorch and Hugging Face models, run them on real low-bit kernels, measure the cost."""


@main.command("quantize")
@click.argument("src")
@click.option("--recipe", "-r", required=True, help=f"e.g. {', '.join(RECIPES)}")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="checkpoint directory")
@click.option("--exclude", "-x", multiple=True, help="layer name or glob to keep in float (repeatable)")
@click.option("--kernel", default="auto", show_default=True, help="matmul kernel: auto or a name from `lowbit info`")
def quantize_cmd(src: str, recipe: str, out: str, exclude: tuple[str, ...], kernel: str) -> None:
    """Quantize SRC (a Hugging Face model folder, or `minilm`) and save it to OUT."""
    from . import checkpoint, hf
    from .quantize import quantize

    try:
        path = hf.resolve_model_path(src)
        model, tokenizer = hf.load_hf_model(path)
        quantize(model, recipe, exclude=exclude, kernel=kernel, progress=True)
        checkpoint.save(model, out, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    size = (checkpoint.read_manifest(out)["tensors"]["bytes"]) / 1e6
    click.echo(f"saved {recipe} checkpoint to {out} ({size:.1f} MB)")


@main.command("eval")
@click.argument("model")
@click.option("--task", default="stsb", show_default=True, help="evaluation task")
def eval_cmd(model: str, task: str) -> None:
    """Evaluate MODEL (a lowbit checkpoint, a Hugging Face folder, or `minilm`) on a task."""
    from .bench import load_any
    from .evaluate import TASKS

    if task not in TASKS:
        _fail(ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}"))
    try:
        m, tokenizer, label = load_any(model)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    score = TASKS[task](m, tokenizer, progress=True)
    click.echo(f"{label}: {task} = {score:.2f}")


@main.command("bench")
@click.argument("src")
@click.argument("models", nargs=-1, required=True)
@click.option("--batch", "-b", multiple=True, type=int, default=(1, 32), show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--iters", default=10, show_default=True)
def bench_cmd(src: str, models: tuple[str, ...], batch: tuple[int, ...], seq: int, iters: int) -> None:
    """Size, latency, speed-up and cosine of quantized MODELS against the float SRC, in one run."""
    from . import bench
    from .demo import kernel_note

    try:
        ref, tokenizer, _ = bench.load_any(src)
        loaded = {"float": ref}
        for m in models:
            model, _, label = bench.load_any(m)
            loaded[f"{label} ({m})" if label in loaded else label] = model
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo("| model | batch | seq | MB in memory | latency ms | speed-up | cosine | kernels |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in batch:
        for r in bench.compare(loaded, tokenizer, batch=b, seq=seq, iters=iters):
            click.echo(f"| {r['model']} | {b} | {seq} | {r['state_mb']:.1f} | {r['latency_ms']:.2f} | "
                       f"{r['speedup']:.2f}x | {r['cosine']:.5f} | {kernel_note(loaded[r['model']])} |")


@main.command("info")
def info_cmd() -> None:
    """CPU features, torch version, and which kernels run here (and which formats are simulated)."""
    import torch

    from . import hw
    from .backends import available_kernels

    feats = hw.cpu_features()
    click.echo(f"cpu: {hw.cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
               f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    click.echo("features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    click.echo("kernels:")
    kernels = available_kernels()
    for name, ok in kernels.items():
        click.echo(f"  {name:16s} {'available' if ok else 'not available'}")
    if not (feats.get("avx512_bf16") or feats.get("amx_bf16")):
        click.echo("warning: this CPU has no native bf16 arithmetic: bf16 GEMMs and PyTorch's int8/int4 "
                   "weight-only kernels (which need bf16 activations) run emulated; with many rows a bf16 "
                   "GEMM was ~6x slower than fp32 on such a CPU, so bf16 weights are upcast beyond 16 rows")
    if not kernels["lowbit_cpu"]:
        click.echo("warning: lowbit's own kernel is not built or this CPU lacks AVX2/FMA: int formats fall "
                   "back to PyTorch's kernels (bf16 activations) or the simulated path")
    click.echo("formats:")
    for line in format_kernel_lines():
        click.echo("  " + line)


def format_kernel_lines() -> list[str]:
    """Which kernel each documented recipe gets on a typical layer here, and whether it is simulated."""
    from torch import nn

    from .quantize import quantize, summary

    lines = []
    for recipe in RECIPES:
        row = summary(quantize(nn.Sequential(nn.Linear(2048, 2048)), recipe))[0]
        what = "simulated (dequantize, then float matmul)" if row["simulated"] else f"{row['act_dtype']} activations"
        lines.append(f"{recipe:12s} -> {row['kernel']}: {what}")
    return lines


@main.command("demo")
@click.option("--out", "-o", default="lowbit-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--recipe", "-r", "recipes", multiple=True, help="recipes to run (default: a representative set)")
@click.option("--all", "all_recipes", is_flag=True, help="run every documented recipe")
def demo_cmd(out: str, recipes: tuple[str, ...], all_recipes: bool) -> None:
    """Quantize all-MiniLM-L6-v2 with several recipes; print size, speed and STS-B accuracy; write a report."""
    from .demo import DEFAULT_RECIPES, format_table, run_demo

    chosen = RECIPES if all_recipes else (recipes or DEFAULT_RECIPES)
    try:
        rows = run_demo(out, tuple(chosen))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(format_table(rows, 32, 128))
    click.echo(f"\nreport: {out}/report.md, {out}/report.html (plot: {out}/accuracy_vs_size.png)")


if __name__ == "__main__":
    sys.exit(main())

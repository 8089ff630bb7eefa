"""`lowbit demo`: quantize all-MiniLM-L6-v2 with several recipes and show size, speed and accuracy."""

from __future__ import annotations

import copy
import html
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit import bench, checkpoint, hf
from lowbit.progress import progress_bar
from lowbit.quantize import quantize, summary
from lowbit.report import bits_per_weight

from .calib import default_text_calibration, timing_texts
from .evaluate import eval_stsb

DEFAULT_RECIPES = ("bf16", "int8", "int4-g128", "int4-g32", "int3-g64", "kmeans4", "int2-g32", "w8a8-dynamic",
                   "w8a8-static")


def kernel_note(model: torch.nn.Module) -> str:
    """E.g. 'lowbit_cpu (fp32 act)' or 'dequant (simulated)': how the linears of a model run."""
    kinds = {}
    rows = summary(model)
    for row in rows:
        if row["type"] in ("linear", "kept float"):
            act = "float" if row["type"] == "kept float" else row["act_dtype"] + " act"
            label = f"{row['kernel']} ({'simulated' if row['simulated'] else act})"
            kinds[label] = kinds.get(label, 0) + 1
    note = ", ".join(f"{k} x{v}" for k, v in kinds.items()) or "float"
    return note + (f"; attention: {rows.attention}" if rows.attention else "")


def run_demo(out: str | os.PathLike = "lowbit-demo", recipes: tuple[str, ...] = DEFAULT_RECIPES,
             batch: int = 32, seq: int = 128, iters: int = 5) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = hf.resolve_model_path(hf.MINILM)
    float_model, tokenizer = hf.load_hf_model(src)
    float_bytes = (src / "model.safetensors").stat().st_size
    rows = [{"recipe": "fp32", "size_mb": float_bytes / 1e6, "kernel": "torch F.linear (fp32)"}]
    models = {"fp32": float_model}
    # STS-B train sentences (never dev, which is scored): activation ranges for static recipes, and the
    # input shapes the kernels are timed at for all of them.
    calibration = default_text_calibration(tokenizer, n=64, batch_size=16, max_length=seq)
    for recipe in progress_bar(recipes, desc="quantize + save", unit="recipe"):
        t0 = time.perf_counter()
        qmodel = quantize(copy.deepcopy(float_model), recipe, calibration=calibration)
        path = checkpoint.save(qmodel, out / "models" / recipe, tokenizer=tokenizer)
        size = (path / checkpoint.TENSORS).stat().st_size
        models[recipe] = checkpoint.load(path)
        rows.append({"recipe": recipe, "size_mb": size / 1e6, "kernel": kernel_note(models[recipe]),
                     "quantize_s": time.perf_counter() - t0})
    for row in rows:
        tqdm.write(f"STS-B dev: {row['recipe']}")
        row["spearman"] = eval_stsb(models[row["recipe"]], tokenizer, progress=True)
    timing = {r["model"]: r for r in bench.compare(models, tokenizer, timing_texts(batch), seq=seq,
                                                    iters=iters, progress=True)}
    ref = rows[0]["spearman"]
    for row in rows:
        t = timing[row["recipe"]]
        bits = bits_per_weight(models[row["recipe"]])
        row.update(latency_ms=t["latency_ms"], speedup=t["speedup"], cosine=t["cosine"],
                   drop=ref - row["spearman"], size_ratio=row["size_mb"] / rows[0]["size_mb"],
                   bits_layers=bits["quantized"], bits_model=bits["model"])
    write_report(out, rows, batch, seq)
    return rows


def format_table(rows: list[dict], batch: int, seq: int) -> str:
    head = (f"| recipe | size MB | size vs fp32 | bits/weight (quantized layers) | bits/weight (model) | "
            f"latency ms (b{batch}, s{seq}) | speed-up | cosine | STS-B Spearman | drop | kernel |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        layers = "-" if math.isnan(r["bits_layers"]) else f"{r['bits_layers']:.2f}"
        lines.append(f"| {r['recipe']} | {r['size_mb']:.1f} | {100 * r['size_ratio']:.1f}% | {layers} | "
                     f"{r['bits_model']:.2f} | {r['latency_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['cosine']:.4f} | {r['spearman']:.2f} | {r['drop']:+.2f} | "
                     f"{r['kernel']} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["size_mb"], r["spearman"], s=40)
        ax.annotate(r["recipe"], (r["size_mb"], r["spearman"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel("STS-B dev Spearman x100")
    ax.set_title("all-MiniLM-L6-v2: accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: list[dict], batch: int, seq: int) -> None:
    from lowbit import hw

    _plot(rows, out / "accuracy_vs_size.png")
    feats = ", ".join(k for k, v in hw.cpu_features().items() if v) or "none detected"
    table = format_table(rows, batch, seq)
    md = (f"# lowbit demo: all-MiniLM-L6-v2\n\nMachine: {hw.cpu_name()}, {os.cpu_count()} cores; "
          f"features: {feats}; torch {torch.__version__}.\n\n"
          f"Size is the safetensors file on disk. Latency is the median of calls measured round-robin in one run "
          f"(batch {batch}, sequence {seq}); speed-up is against fp32 in that same run. Cosine compares mean-pooled "
          "embeddings with fp32's. Bits per weight count every stored tensor (codes, scales, zero points, "
          "codebooks): over the weights of the quantized layers, and over all values of the model (float layers, "
          "norms and biases included; fp32 is 32). Spearman is x100 on STS-B dev (1500 pairs), mean pooling, max "
          "length 128. "
          "Kernels marked simulated dequantize weights to float before a float matmul.\n\n"
          f"{table}\n\n![accuracy against size](accuracy_vs_size.png)\n")
    tmp = out / ".report.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "report.md")
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in table.splitlines()[2:])
    header = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table.splitlines()[0].strip("|").split("|"))
    page = (f"<!doctype html><meta charset='utf-8'><title>lowbit demo</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>"
            f"<h1>lowbit demo: all-MiniLM-L6-v2</h1><p>{html.escape(md.split(chr(10))[2])}</p>"
            f"<table><tr>{header}</tr>{cells}</table><p><img src='accuracy_vs_size.png'></p>")
    tmp = out / ".report.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, out / "report.html")

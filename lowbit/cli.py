"""The `lowbit` command: a thin layer over the Python API.

Needs the `cli` extra (click, and transformers for Hugging Face models). `demo`, `bench` and the default data of
`eval` and of calibration come from `lowbit_workbench`, which lives in a clone of the repository.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

try:
    import click
except ModuleNotFoundError as e:  # one clear line instead of a traceback from the console script
    raise ModuleNotFoundError("the `lowbit` command needs click: pip install 'lowbit[cli]'", name=e.name) from e

from .recipes import RECIPES

if TYPE_CHECKING:  # for annotations only; commands import what they use when they run
    from torch import nn


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowbit")
def main() -> None:
    """Quantize PyTorch and Hugging Face models, run them on real low-bit kernels, measure the cost."""


CALIB_HELP = "text file with one calibration text per line"
# Calibration texts by default: GPTQ and AWQ fit the weights to the layers' inputs and want more of them
# (on all-MiniLM-L6-v2, GPTQ at int3-g128 and int2-g32 scored 0.1-0.4 STS-B points higher with 128 sentences than
# with 64).
CALIB_SIZE = 64
FIT_CALIB_SIZE = 128
CALIB_SIZE_HELP = ("number of calibration texts: the first N lines of --calib, or N STS-B train sentences; for a "
                   "causal LM, N windows of 128 tokens of that text")


def _workbench(module: str) -> Any:
    """`lowbit_workbench.<module>`: the demo, STS-B and the LM corpus, found in a clone of the repository."""
    import importlib

    try:
        return importlib.import_module(f"lowbit_workbench.{module}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lowbit_workbench"):
            raise
        raise click.ClickException("this needs lowbit_workbench (the demo and its data), which comes with a clone "
                                   "of the lowbit repository: run it there after `pip install -e .`") from None


def _needs_calibration(recipe: str) -> bool:
    from .recipes import read_recipe

    # Static activation scales, GPTQ/AWQ weights and SmoothQuant's scales are fitted on data; the other
    # recipes (round-to-nearest, HQQ, dynamic activations) quantize from the weights alone.
    return read_recipe(recipe).needs_calibration


def _fits_weights(recipe: str) -> bool:
    from .recipes import LayerRecipe, read_recipe

    r = read_recipe(recipe)
    configs = r.configs if isinstance(r, LayerRecipe) else [r]
    return any(c.method in ("gptq", "awq") for c in configs)


def _calibration(tokenizer: Any, calib: str | None, size: int, causal: bool = False) -> tuple[list[dict], str]:
    """Calibration batches from --calib (or the workbench's STS-B train sentences) and a line saying which.
    For a causal LM the text is one token stream cut into `size` windows of 128 tokens."""
    try:
        return _calibration_batches(tokenizer, calib, size, causal)
    except FileNotFoundError as e:
        if calib is not None:
            raise
        raise ValueError(f"no --calib given, and the default calibration sentences are missing ({e}); "
                         "pass --calib FILE with one text per line") from None


def _calibration_batches(tokenizer: Any, calib: str | None, size: int, causal: bool) -> tuple[list[dict], str]:
    from . import calib as calib_data

    if causal:
        texts = calib_data.read_texts(calib) if calib is not None else _workbench("calib").stsb_train_sentences(
            min(5000, 16 * size))
        batches = calib_data.token_windows(tokenizer, texts, size)
        n = sum(len(b["input_ids"]) for b in batches)
        where = calib if calib is not None else "STS-B train sentences of lowbit_workbench (no --calib given)"
        return batches, f"calibration: {n} windows of 128 tokens from {where}"
    if calib is not None:
        texts = calib_data.read_texts(calib)[:size]
        return calib_data.text_batches(tokenizer, texts), f"calibration: {len(texts)} texts from {calib}"
    batches = _workbench("calib").default_text_calibration(tokenizer, size)
    return batches, f"calibration: no --calib given, using {size} STS-B train sentences of lowbit_workbench"


@main.command("quantize")
@click.argument("src")
@click.option("--recipe", "-r", required=True,
              help=f"e.g. {', '.join(RECIPES)}; or a JSON file of recipes per layer pattern, "
                   '{"lm_head": "int8", "*": "int4-g128"} (first match wins, "float" keeps a layer float)')
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="checkpoint directory")
@click.option("--exclude", "-x", multiple=True, help="layer name or glob to keep in float (repeatable)")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help=CALIB_HELP + " (recipes with static activation scales use STS-B train sentences without it)")
@click.option("--calib-size", type=click.IntRange(min=1), default=None,
              help=CALIB_SIZE_HELP + f" (default: {FIT_CALIB_SIZE} for recipes fitting weights to data, GPTQ and "
                   f"AWQ; {CALIB_SIZE} otherwise)")
@click.option("--backend", default="auto", show_default=True,
              help="matmul backend: auto, a name from `lowbit info`, or a route by rows, "
                   "e.g. lowbit_q8<=16,lowbit_cpu (int8 activations for decode-sized calls)")
@click.option("--kernel", "kernel_alias", default=None, hidden=True)  # the old name of --backend
@click.option("--low-memory/--in-memory", "low_memory", default=None,
              help="read and quantize one block at a time from SRC's safetensors shards (peak memory about one "
                   "block); default: only when the weights are over a quarter of this machine's memory")
def quantize_cmd(src: str, recipe: str, out: str, exclude: tuple[str, ...], calib: str | None, calib_size: int | None,
                 backend: str, kernel_alias: str | None, low_memory: bool | None) -> None:
    """Quantize SRC (a Hugging Face model folder, or `minilm`) and save it to OUT."""
    from . import checkpoint, hf
    from .quantize import quantize

    if kernel_alias is not None:
        if backend not in ("auto", kernel_alias):
            _fail(ValueError("--kernel is the old name of --backend: give only --backend"))
        backend = kernel_alias
    try:
        needs_calib = _needs_calibration(recipe)  # first, so a bad recipe fails before the model loads
        if calib_size is None:
            calib_size = FIT_CALIB_SIZE if _fits_weights(recipe) else CALIB_SIZE
        path = hf.resolve_model_path(src)
        if low_memory is None:
            from .stream import checkpoint_bytes

            low_memory = checkpoint_bytes(path) > _memory_bytes() // 4
            if low_memory:
                click.echo(f"{src}: {checkpoint_bytes(path) / 1e9:.1f} GB of weights; quantizing one block at a "
                           "time (--in-memory to override)", err=True)
        if low_memory:
            _quantize_low_memory(path, recipe, out, exclude, calib, calib_size, needs_calib, backend)
            return
        model, tokenizer = hf.load_hf_model(path)
        calibration = None
        if calib is not None or needs_calib:
            calibration, note = _calibration(tokenizer, calib, calib_size, hf.is_causal_lm(path))
            click.echo(note, err=True)
        quantize(model, recipe, calibration=calibration, exclude=exclude, backend=backend, progress=True)
        checkpoint.save(model, out, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    size = checkpoint.tensor_bytes(checkpoint.read_manifest(out)) / 1e6
    click.echo(f"saved {recipe} checkpoint to {out} ({size:.1f} MB)")


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _quantize_low_memory(path, recipe: str, out: str, exclude: tuple[str, ...], calib: str | None, calib_size: int,
                         needs_calib: bool, backend: str = "auto") -> None:
    from transformers import AutoTokenizer

    from . import checkpoint, hf
    from .stream import quantize_folder

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    calibration = None
    if calib is not None or needs_calib:
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer to turn calibration text into model inputs")
        calibration, note = _calibration(tokenizer, calib, calib_size, hf.is_causal_lm(path))
        click.echo(note, err=True)
    t0 = time.perf_counter()
    quantize_folder(path, out, recipe, calibration=calibration, exclude=exclude, tokenizer=tokenizer,
                    backend=backend)
    size = checkpoint.tensor_bytes(checkpoint.read_manifest(out)) / 1e6
    click.echo(f"saved {recipe} checkpoint to {out} ({size:.1f} MB) in {time.perf_counter() - t0:.0f} s")


@main.command("eval")
@click.argument("model")
@click.option("--task", default="stsb", show_default=True,
              help="stsb (STS-B dev Spearman x100) or ppl (perplexity of a causal LM: on --data, else on held-out "
                   "text of lowbit's corpus)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text file for --task ppl, scored as one token stream in windows of up to 256 tokens")
def eval_cmd(model: str, task: str, data: str | None) -> None:
    """Evaluate MODEL (a lowbit checkpoint, a Hugging Face folder, or `minilm`) on a task."""
    from .bench import load_any
    from .perplexity import eval_text_perplexity

    if task not in ("stsb", "ppl"):
        _fail(ValueError(f"unknown task {task!r}; valid: stsb, ppl"))
    if data is not None and task != "ppl":
        _fail(ValueError(f"--data is for --task ppl; {task} scores its own data set"))
    try:
        m, tokenizer, label = load_any(model)
        if task == "ppl" and not hasattr(m, "generate"):
            raise ValueError(f"{model} is a {type(m).__name__}, not a causal language model: perplexity needs one")
        if data is not None:
            result = eval_text_perplexity(m, tokenizer, data, progress=True)
            click.echo(f"perplexity on {data}: {result['tokens']} tokens, windows of {result['window']} tokens "
                       f"moving by {result['stride']}", err=True)
            score = result["ppl"]
        else:
            score = _workbench("evaluate").TASKS[task](m, tokenizer, progress=True)  # lowbit's own data
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"{label}: {task} = {score:.2f}")


@main.command("generate")
@click.argument("model")
@click.option("--prompt", "-p", default="The", show_default=True)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True)
def generate_cmd(model: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy text generation with MODEL (a lowbit checkpoint or Hugging Face folder of a causal LM)."""
    import torch

    from .bench import load_any

    try:
        m, tokenizer, label = load_any(model)
        if not hasattr(m, "generate"):
            raise ValueError(f"{model} is a {type(m).__name__}, not a causal language model")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        took = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    new = out.shape[1] - ids.shape[1]
    click.echo(tokenizer.decode(out[0], skip_special_tokens=True))
    click.echo(f"[{label}: {new} tokens in {took:.2f} s, {new / took:.1f} tokens/s]", err=True)


@main.command("bench")
@click.argument("src")
@click.argument("models", nargs=-1)
@click.option("--onnx", "onnx_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="an ONNX file of SRC (lowbit export --format onnx) to time in ONNX Runtime beside MODELS; "
                   "repeatable")
@click.option("--batch", "-b", multiple=True, type=int, default=(1, 32), show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--iters", default=10, show_default=True)
@click.option("--layers", is_flag=True,
              help="instead of timing, print each quantized layer's SQNR against SRC's layer, worst first")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help=CALIB_HELP + " for --layers (default: STS-B train sentences)")
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True, help=CALIB_SIZE_HELP)
@click.option("--compile", "compile_", is_flag=True,
              help="also time each model under torch.compile (inductor) beside its eager run; the first call "
                   "per shape (compilation) is timed apart")
@click.option("--freeze", is_flag=True, help="with --compile: inductor's freezing (weights folded in as constants)")
def bench_cmd(src: str, models: tuple[str, ...], onnx_files: tuple[str, ...], batch: tuple[int, ...], seq: int,
              iters: int, layers: bool, calib: str | None, calib_size: int, compile_: bool, freeze: bool) -> None:
    """Size, latency, speed-up and cosine of quantized MODELS against the float SRC, in one run.

    With --compile: each model also compiled, timed in the same rounds (speed-up against the eager float SRC;
    "vs eager" and "cosine vs eager" against the same model run eagerly; compile time apart).
    With --layers: the noise each quantized layer of MODELS adds, against SRC's layer on the same input.
    """
    from . import bench

    if not models and not onnx_files:
        raise click.UsageError("give MODELS to compare with SRC, or --onnx FILE")
    kernel_note = _workbench("demo").kernel_note
    timing_texts = _workbench("calib").timing_texts

    try:
        ref, tokenizer, _ = bench.load_any(src)
        loaded = {"float": ref}
        quantized = []  # (label, source, model) per MODELS argument, repeats included
        for m in models:
            model, _, label = bench.load_any(m)
            loaded[f"{label} ({m})" if label in loaded else label] = model
            quantized.append((label, m, model))
        for f in onnx_files:
            loaded[f"ONNX Runtime: {f}"] = bench.OnnxModel(f)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    if layers:
        _print_layer_reports(ref, quantized, tokenizer, calib, calib_size)
        return
    if freeze and not compile_:
        raise click.UsageError("--freeze applies to --compile")
    compiled = bench.compile_models(loaded, freeze=freeze) if compile_ else None
    extra = " vs eager | cosine vs eager | compile s |" if compile_ else ""
    click.echo("| model | batch | seq | MB in memory | latency ms | speed-up | cosine | kernels |" + extra)
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- | --- | --- |" * bool(extra))
    compile_notes = []
    for b in batch:
        try:
            rows = bench.compare(loaded, tokenizer, timing_texts(b), seq=seq, iters=iters, compiled=compiled)
        except (ValueError, FileNotFoundError) as e:
            _fail(e)
        for r in rows:
            eager = r["model"].removesuffix(bench.COMPILED) if "compile_s" in r else r["model"]
            line = (f"| {r['model']} | {b} | {seq} | {r['state_mb']:.1f} | {r['latency_ms']:.2f} | "
                    f"{r['speedup']:.2f}x | {r['cosine']:.5f} | {_kernels(loaded[eager], kernel_note)} |")
            if "compile_s" in r:
                line += f" {r['speedup_eager']:.2f}x | {r['cosine_eager']:.6f} | {r['compile_s']:.1f} |"
                if r["graphs"] > 1:
                    compile_notes.append(f"{r['model']}: {r['graphs']} graphs at batch {b} (graph breaks)")
            elif extra:
                line += " | | |"
            click.echo(line)
    for note in compile_notes:
        click.echo(note)
    for label, model in loaded.items():
        for note in getattr(model, "lowbit_float_layers", []):
            click.echo(f"{label}: {note['layer']} kept in float: {note['reason']}")


def _kernels(model: nn.Module, kernel_note: Any) -> str:
    from .bench import OnnxModel

    return "ONNX Runtime (CPU; MB: file size)" if isinstance(model, OnnxModel) else kernel_note(model)


def _print_layer_reports(ref: nn.Module, quantized: list[tuple[str, str, nn.Module]], tokenizer: Any,
                         calib: str | None, calib_size: int) -> None:
    from .report import format_layer_report, layer_report

    try:
        calibration, note = _calibration(tokenizer, calib, calib_size)
    except ValueError as e:
        _fail(e)
    click.echo(note, err=True)
    for label, src, model in quantized:
        try:
            rows = layer_report(ref, model, calibration)
        except (ValueError, TypeError) as e:
            _fail(ValueError(f"{src}: {e}"))
        click.echo(f"\n{label} ({src}): {len(rows)} quantized layers, worst first")
        click.echo(format_layer_report(rows))


def _formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if not formats:
        raise ValueError("--formats needs at least one recipe, e.g. int8,int4-g128,int3-g64")
    return formats


@main.command("sensitivity")
@click.argument("src")
@click.option("--formats", default="int8,int4-g128,int3-g64,int2-g32", show_default=True,
              help="comma-separated weight formats to measure each layer in")
@click.option("--calib", type=click.Path(dir_okay=False), default=None, help=CALIB_HELP)
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True, help=CALIB_SIZE_HELP)
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="calibration samples each measurement runs on")
@click.option("--report", "report_dir", default="lowbit-sensitivity", show_default=True,
              type=click.Path(file_okay=False), help="directory for sensitivity.md and sensitivity.png")
def sensitivity_cmd(src: str, formats: str, calib: str | None, calib_size: int, samples: int, report_dir: str) -> None:
    """How much SRC's output changes with each layer (and each block) alone in each format."""
    import os
    from pathlib import Path

    from . import hf
    from .sensitivity import proxy_correlations, sensitivity, sensitivity_plot

    try:
        fmts = _formats(formats)
        path = hf.resolve_model_path(src)
        model, tokenizer = hf.load_hf_model(path)
        calibration, note = _calibration(tokenizer, calib, calib_size, hf.is_causal_lm(path))
        click.echo(note, err=True)
        sens = sensitivity(model, calibration, fmts, samples=samples, progress=True)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    corr = proxy_correlations(sens)
    text = (f"# Sensitivity of {src}\n\nOutput change ({sens.effect_name}) on {sens.samples} calibration samples "
            f"with only that part quantized; {sens.seconds:.0f} s.\n\n## Blocks\n\n{sens.to_markdown('block')}\n\n"
            f"## Layers\n\n{sens.to_markdown()}\n\nRank correlation with the measured change: weight SQNR "
            f"{corr['sqnr_db']:.3f}, input-weighted error {corr['hessian_error']:.3f}.\n")
    plot = ""
    try:
        sensitivity_plot(sens, out / ".sensitivity.png.tmp")
        os.replace(out / ".sensitivity.png.tmp", out / "sensitivity.png")
        plot = f"; plot {out / 'sensitivity.png'}"
    except ImportError:
        plot = "; no plot (matplotlib is not installed)"
    (out / ".sensitivity.md.tmp").write_text(text)
    os.replace(out / ".sensitivity.md.tmp", out / "sensitivity.md")
    click.echo(text)
    click.echo(f"report: {out / 'sensitivity.md'}{plot}")


@main.command("search")
@click.argument("src")
@click.option("--task", default="stsb", show_default=True,
              help="the metric: stsb (STS-B dev Spearman x100) or ppl (held-out perplexity of a causal LM)")
@click.option("--max-drop", type=float, default=None, help="largest drop of the metric allowed")
@click.option("--max-size-mb", type=float, default=None, help="largest stored size allowed (MB)")
@click.option("--max-latency-ms", type=float, default=None,
              help="longest time allowed for one calibration batch (ms; predicted from kernel timings, measured)")
@click.option("--formats", default="int8,int4-g128,int4-g64,int3-g64,int2-g32", show_default=True,
              help="comma-separated weight formats layers may take")
@click.option("--calib", type=click.Path(dir_okay=False), default=None, help=CALIB_HELP)
@click.option("--calib-size", type=click.IntRange(min=1), default=64, show_default=True, help=CALIB_SIZE_HELP)
@click.option("--max-evals", type=click.IntRange(min=1), default=10, show_default=True,
              help="searched configurations to measure (uniform recipes come on top)")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="save the chosen model here")
@click.option("--report", "report_dir", default="lowbit-search", show_default=True, type=click.Path(file_okay=False),
              help="directory for search.md, search.html and pareto.png")
def search_cmd(src: str, task: str, max_drop: float | None, max_size_mb: float | None, max_latency_ms: float | None,
               formats: str,
               calib: str | None, calib_size: int, max_evals: int, out: str | None, report_dir: str) -> None:
    """The smallest per-layer recipe for SRC within --max-drop, or the best within --max-size-mb or
    --max-latency-ms."""
    from . import checkpoint, hf
    from .search import search, write_report

    budgets = {k: v for k, v in (("max_drop", max_drop), ("max_size_mb", max_size_mb),
                                 ("max_latency_ms", max_latency_ms)) if v is not None}
    if len(budgets) != 1:
        _fail(ValueError("give one budget: --max-drop, --max-size-mb or --max-latency-ms"))
    if task not in ("stsb", "ppl"):
        _fail(ValueError(f"unknown task {task!r}; valid: stsb, ppl"))
    try:
        fmts = _formats(formats)
        path = hf.resolve_model_path(src)
        model, tokenizer = hf.load_hf_model(path)
        if task == "ppl" and not hf.is_causal_lm(path):
            raise ValueError(f"{src} is not a causal language model: --task ppl needs one")
        calibration, note = _calibration(tokenizer, calib, calib_size, hf.is_causal_lm(path))
        click.echo(note, err=True)
        metric = _workbench("evaluate").TASKS[task]
        result = search(model, calibration, lambda m: metric(m, tokenizer), budgets, formats=fmts,
                        higher_is_better=task != "ppl", max_evals=max_evals, progress=True)
        where = write_report(result, report_dir, metric_name=task, title=f"lowbit search: {src}")
        if out is not None:
            checkpoint.save(result.model, out, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    click.echo(result.to_markdown())
    c = result.chosen
    click.echo(f"chosen: {c.size_mb:.2f} MB, {task} {c.metric:.3f} (float {result.baseline:.3f}); "
               f"report {where / 'search.html'}" + (f"; saved to {out}" if out else ""))


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "-f", "fmt", required=True,
              type=click.Choice(["onnx", "gguf", "compressed-tensors"]),
              help="onnx: run and checked in ONNX Runtime; gguf: llama.cpp; compressed-tensors: a Hugging Face "
                   "folder that loads without lowbit")
@click.option("--out", "-o", required=True, type=click.Path(), help="file (onnx, gguf) or folder to write")
def export_cmd(checkpoint: str, fmt: str, out: str) -> None:
    """Export CHECKPOINT (a folder written by `lowbit quantize` or lowbit.save) to another runtime."""
    from . import export

    try:
        path = export.from_checkpoint(checkpoint, fmt, out, echo=click.echo)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"wrote {path}")


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
    thp = hw.huge_pages_mode()
    click.echo(f"memory: transparent huge pages {thp or 'unknown (not Linux)'}"
               + (" (packed weights of 2 MB and more get them)" if thp in ("always", "madvise") else ""))
    if thp == "never":
        click.echo("warning: transparent huge pages are off here, so packed weights sit on 4 KB pages and decode "
                   "loses about a tenth of the memory's speed to page walks (madvise mode lets lowbit ask for them)")
    click.echo("kernels:")
    kernels = available_kernels()
    for name, ok in kernels.items():
        click.echo(f"  {name:16s} {'available' if ok else 'not available'}")
    if not (feats.get("avx512_bf16") or feats.get("amx_bf16")):
        click.echo("warning: this CPU has no native bf16 arithmetic: bf16 GEMMs and PyTorch's int8/int4 "
                   "weight-only kernels (which need bf16 activations) run emulated; with many rows a bf16 "
                   "GEMM was ~6x slower than fp32 on such a CPU, so bf16 weights are upcast beyond 16 rows")
    if kernels["lowbit_cpu"]:
        from .backends import lowbit_cpu
        click.echo(f"  lowbit_cpu path: {lowbit_cpu.isa()} (this CPU can run: {', '.join(lowbit_cpu.isas())})")
        q8 = lowbit_cpu.q8_path()
        click.echo(f"  lowbit_q8 (int8 activations, opt-in) dot products: {q8}")
    from . import attention
    click.echo(f"  attention of w8a8 / -bf16attn transformers models: {attention.path()}")
    if not kernels["lowbit_cpu"]:
        click.echo("warning: lowbit's own kernel is not built or this CPU lacks AVX2/FMA: int formats fall "
                   "back to PyTorch's kernels (bf16 activations) or the simulated path")
    click.echo("formats:")
    for line in format_kernel_lines():
        click.echo("  " + line)
    from .autotune import cache_dir, survey

    click.echo(f"measured speed-up over float32 on this machine (cached in {cache_dir()}; delete to re-measure):")
    slow = []
    for r in survey(progress=True):
        click.echo(f"  {r['shape']:30s} {r['recipe']:13s} {r['kernel']:15s} act={r['act']:8s} {r['speedup']:5.2f}x")
        if r["speedup"] < 1.0:
            slow.append(f"{r['recipe']} on {r['shape']}")
    if slow:
        click.echo("warning: slower than float here (backend=auto keeps such W8A8 layers in float): "
                   + "; ".join(slow))


def format_kernel_lines() -> list[str]:
    """Which kernel each documented recipe gets on a typical layer here, and whether it is simulated."""
    import dataclasses
    import warnings

    import torch
    from torch import nn

    from .quantize import quantize, summary
    from .recipes import parse_recipe

    lines = []
    for recipe in RECIPES:
        config = parse_recipe(recipe)
        if config.method != "rtn" or config.smooth is not None:
            base = dataclasses.replace(config, method="rtn", smooth=None).name
            lines.append(f"{recipe:12s} -> the kernels of {base} (the method changes the weights, not the format)")
            continue
        # Static recipes need activation ranges: a random batch of 128 rows stands in for real inputs.
        calibration = [torch.randn(128, 2048)] if parse_recipe(recipe).needs_calibration else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "slower than float" notes: the line below says what ran
            row = summary(quantize(nn.Sequential(nn.Linear(2048, 2048)), recipe, calibration=calibration))[0]
        if row["kernel"] == "float":
            what = f"kept in float ({row.get('reason', 'no kernel beats float here')})"
        elif row["simulated"]:
            what = "simulated (dequantize, then float matmul)"
        else:
            what = f"{row['act_dtype']} activations"
        lines.append(f"{recipe:12s} -> {row['kernel']}: {what}")
    return lines


@main.command("demo")
@click.option("--out", "-o", default="lowbit-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--recipe", "-r", "recipes", multiple=True, help="recipes to run (default: a representative set)")
@click.option("--all", "all_recipes", is_flag=True, help="run every documented recipe")
def demo_cmd(out: str, recipes: tuple[str, ...], all_recipes: bool) -> None:
    """Quantize all-MiniLM-L6-v2 with several recipes; print size, speed and STS-B accuracy; write a report."""
    demo = _workbench("demo")
    DEFAULT_RECIPES, format_table, run_demo = demo.DEFAULT_RECIPES, demo.format_table, demo.run_demo

    chosen = RECIPES if all_recipes else (recipes or DEFAULT_RECIPES)
    try:
        rows = run_demo(out, tuple(chosen))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(format_table(rows, 32, 128))
    click.echo(f"\nreport: {out}/report.md, {out}/report.html (plot: {out}/accuracy_vs_size.png)")


if __name__ == "__main__":
    sys.exit(main())

"""Measure what quantization bought and cost: size, latency against the float model in the same run,
output fidelity as cosine similarity to the float model's outputs, and the speed-up of each kernel on a
few representative shapes (`lowbit info`)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from . import autotune, checkpoint, hf
from .progress import progress_bar
from .quantize import quantize
from .recipes import parse_recipe


def load_any(src: str) -> tuple[nn.Module, object, str]:
    """A lowbit checkpoint directory, a Hugging Face folder or the `minilm` alias -> (model, tokenizer, label)."""
    from transformers import AutoTokenizer

    path = Path(src)
    if (path / checkpoint.MANIFEST).is_file():
        model = checkpoint.load(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return model, tokenizer, checkpoint.read_manifest(path).get("recipe") or path.name
    model, tokenizer = hf.load_hf_model(hf.resolve_model_path(src))
    return model, tokenizer, "fp32"


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model would save (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def sample_batch(tokenizer, texts: Sequence[str], seq: int) -> dict[str, torch.Tensor]:
    """`texts` as one batch, each padded or cut to exactly `seq` tokens (a fixed shape to time)."""
    if not texts:
        raise ValueError("sample_batch needs at least one text")
    return dict(tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq,
                          return_tensors="pt"))


def mean_pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (out * mask).sum(1) / mask.sum(1).clamp(min=1)


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, iters: int = 10,
                     max_seconds: float = 60.0, progress: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        start = time.perf_counter()
        for i in progress_bar(range(iters), desc="timing", unit="round", disable=not progress):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() - start > max_seconds:
                break
    return {name: statistics.median(ts) for name, ts in times.items()}


def cosine_to(reference: torch.Tensor, other: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=-1).mean().item()


def compare(models: dict[str, nn.Module], tokenizer, texts: Sequence[str], *, seq: int = 128, iters: int = 10,
            reference: str | None = None, progress: bool = False) -> list[dict]:
    """Latency, speed-up and cosine of each model against `reference` (the first one by default), on one
    batch of `texts` (one row each) padded or cut to `seq` tokens."""
    reference = reference or next(iter(models))
    inputs = sample_batch(tokenizer, texts, seq)
    batch = len(texts)
    with torch.inference_mode():
        outs = {name: mean_pool(m, inputs) for name, m in models.items()}
    times = time_interleaved({name: (lambda m=m: m(**inputs)) for name, m in models.items()}, iters=iters,
                             progress=progress)
    rows = []
    for name, m in models.items():
        rows.append({"model": name, "batch": batch, "seq": seq, "latency_ms": times[name] * 1e3,
                     "speedup": times[reference] / times[name], "cosine": cosine_to(outs[reference], outs[name]),
                     "state_mb": state_bytes(m) / 1e6})
    return rows


# Shapes `lowbit info` reports on: a decode step of a 1B-class decoder (memory-bound), encoder-sized
# matmuls (compute-bound) and a ResNet-style 3x3 convolution.
SURVEY = (
    ("linear 2048->8192, 1 row", (1, 2048), 8192,
     (("int8", "lowbit_cpu"), ("int4-g128", "lowbit_cpu"), ("int4-g128", "torch_int4pack"), ("int3-g64", "lowbit_cpu"),
      ("int2-g32", "lowbit_cpu"), ("bf16", "auto"), ("w8a8-dynamic", "onednn"))),
    ("linear 384->1536, 128 rows", (128, 384), 1536,
     (("int8", "lowbit_cpu"), ("int4-g128", "lowbit_cpu"), ("w8a8-dynamic", "onednn"), ("w8a8-static", "onednn"))),
    ("linear 384->1536, 4096 rows", (4096, 384), 1536,
     (("int8", "lowbit_cpu"), ("w8a8-dynamic", "onednn"), ("w8a8-static", "onednn"))),
    ("conv 3x3 64->64, 8x56x56", (8, 64, 56, 56), 64, (("w8a8-static", "onednn"),)),
)


def survey(progress: bool = False) -> list[dict]:
    """Measured speed-up over float of each kernel on a few representative shapes (cached like the rest).

    Each row: shape, recipe, kernel, act (activation dtype the kernel computes with), speedup.
    """
    tuner = autotune.Tuner()
    rows = []
    for label, shape, n_out, variants in progress_bar(SURVEY, desc="measure kernels", disable=not progress):
        torch.manual_seed(0)
        conv = len(shape) == 4
        base = (nn.Conv2d(shape[1], n_out, 3, padding=1) if conv else nn.Linear(shape[-1], n_out)).eval()
        x = torch.randn(shape)
        for recipe, kernel in variants:
            cfg = parse_recipe(recipe)
            key = f"survey|{label}|{recipe}|{kernel}"

            def measure(recipe=recipe, kernel=kernel, cfg=cfg, base=base, x=x) -> dict[str, float]:
                try:
                    q = quantize(nn.Sequential(copy.deepcopy(base)), recipe, backend=kernel,
                                 calibration=[x[:1] for _ in range(8)] if cfg.needs_calibration else None)
                except (ValueError, RuntimeError):
                    return {}  # this kernel cannot run the shape here
                layer = q[0]
                return autotune.time_calls({"q": lambda: layer(x), autotune.FLOAT: lambda: base(x)})

            t = tuner.timings(key, measure)
            if not t:
                continue
            act = "bfloat16" if kernel == "torch_int4pack" or recipe == "bf16" else (
                "uint8" if cfg.act else "float32")
            rows.append({"shape": label, "recipe": recipe, "kernel": kernel, "act": act,
                         "speedup": t[autotune.FLOAT] / t["q"]})
    tuner.save()
    return rows

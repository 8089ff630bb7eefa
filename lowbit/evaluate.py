"""Accuracy checks for quantized encoders: STS Benchmark Spearman correlation.

The STS-B files ship inside the package (``lowbit/data``), so evaluation needs no network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .hf import encode

_STSB_FILES = {"dev": "sts-dev.csv", "train": "sts-train.csv"}


def load_stsb(split: str = "dev") -> tuple[list[str], list[str], np.ndarray]:
    """Read an STS-B split from package data: ``(sentences1, sentences2, gold scores in [0, 5])``."""
    if split not in _STSB_FILES:
        raise ValueError(f"unknown STS-B split {split!r}; valid splits: {', '.join(sorted(_STSB_FILES))}")
    text = resources.files("lowbit").joinpath("data", _STSB_FILES[split]).read_text(encoding="utf-8")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        # Split on tabs by hand: sentences hold bare quotes that trip csv readers, and some
        # lines carry two extra license fields after sentence2, so only fields 0-6 count.
        fields = line.split("\t")
        if len(fields) < 7:
            raise ValueError(
                f"{_STSB_FILES[split]}:{lineno}: expected >= 7 tab-separated fields, got {len(fields)}"
            )
        scores.append(float(fields[4]))
        s1.append(fields[5])
        s2.append(fields[6])
    return s1, s2, np.asarray(scores, dtype=np.float64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    # Ranks 1..n, with tied values sharing the mean of the ranks they span.
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values in sorted order.
    new_run = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.concatenate((run_start[1:], [len(x)]))
    # Positions start..end-1 (0-based) average to (start + end - 1) / 2, plus 1 for 1-based ranks.
    run_rank = (run_start + run_end - 1) / 2.0 + 1.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = run_rank[run_id]
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share ranks)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError("spearman needs at least two points")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("spearman got NaN values")
    rx = _average_ranks(x) - (x.size + 1) / 2.0
    ry = _average_ranks(y) - (y.size + 1) / 2.0
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denom == 0.0:
        # A constant input has no ranking to correlate with.
        return float("nan")
    return float((rx * ry).sum() / denom)


def eval_stsb(
    model: nn.Module,
    tokenizer: Any,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> float:
    """Spearman x100 between cosine similarity of mean-pooled embeddings and STS-B dev gold scores."""
    s1, s2, gold = load_stsb("dev")
    # Encode both sides in one pass so length-sorting batches across the whole set.
    emb = encode(model, tokenizer, s1 + s2, batch_size=batch_size, max_length=max_length, progress=progress)
    e1, e2 = emb[: len(s1)], emb[len(s1) :]
    cos = torch.nn.functional.cosine_similarity(e1, e2, dim=1)
    return 100.0 * spearman(cos.numpy(), gold)


def eval_perplexity(model: Any, tokenizer: Any, progress: bool = False) -> float:
    """Strided perplexity (windows of 256 tokens, stride 128) of a causal LM on the held-out part of the
    corpus shipped in lowbit/data/lm (lower is better); meaningful for models trained on that corpus."""
    from .lm import held_out_perplexity

    return held_out_perplexity(model, tokenizer, progress=progress)["all"]



def eval_text_perplexity(model: Any, tokenizer: Any, path: str | os.PathLike, *, max_length: int = 256,
                         stride: int = 128, progress: bool = False) -> dict[str, float]:
    """Strided perplexity of a causal LM on the text of a UTF-8 file, read as one token stream (windows of
    `max_length` tokens, cut to the model's maximum positions, moving by `stride`, at most half a window).

    Returns {"ppl", "tokens", "window", "stride"}. A missing, empty or non-UTF-8 file, or one with fewer tokens
    than one window, raises ValueError naming the file."""
    from .lm import encode, perplexity

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file {str(p)!r} " + ("is not a file" if p.exists() else "does not exist"))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(p)!r} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    window = min(max_length, positions) if isinstance(positions, int) else max_length
    stride = min(stride, window // 2)
    ids = encode(tokenizer, text)
    if ids.numel() < window:
        raise ValueError(f"text file {str(p)!r} holds {ids.numel()} tokens, fewer than one window of {window}: "
                         "give a longer text")
    ppl = perplexity(model, ids, max_length=window, stride=stride, progress=progress)
    return {"ppl": ppl, "tokens": ids.numel(), "window": window, "stride": stride}


TASKS: dict[str, Callable[..., float]] = {"stsb": eval_stsb, "ppl": eval_perplexity}


def get_task(name: str) -> Callable[..., float]:
    """Look up an evaluation task by name, with an error that lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None

"""Calibration data from text: sentences read from a file, tokenized into padded batches (or windows of a
token stream) that `lowbit.quantize(..., calibration=...)` and `lowbit.report` call the model on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor


def read_texts(path: str | os.PathLike) -> list[str]:
    """One calibration text per line of a UTF-8 file; blank lines are skipped."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"calibration file {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"calibration file {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {str(p)!r} is not UTF-8 text: {e}") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {str(p)!r} holds no text (expected one text per line)")
    return texts


def text_batches(tokenizer: Any, texts: list[str], *, batch_size: int = 8,
                 max_length: int = 128) -> list[dict[str, Tensor]]:
    """Tokenize `texts` into batches of `batch_size`, each padded to its own longest text and cut at
    `max_length` tokens; every batch is a dict a Hugging Face model takes as `model(**batch)`. A tokenizer
    without a padding token (most causal LMs) gets one text per batch: nothing to pad."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    texts = list(texts)
    if not texts:
        raise ValueError("no calibration texts to tokenize")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("calibration texts must be strings")
    pad = getattr(tokenizer, "pad_token", None) is not None
    if not pad:
        batch_size = 1
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start: start + batch_size], padding=pad, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def token_windows(tokenizer: Any, texts: list[str], n: int, *, window: int = 128,
                  batch_size: int = 8) -> list[dict[str, Tensor]]:
    """The texts as one token stream (joined by newlines), cut into up to `n` consecutive windows of `window`
    tokens and batched: how causal language models are calibrated (full windows, nothing padded)."""
    if n < 1 or window < 1 or batch_size < 1:
        raise ValueError(f"n, window and batch_size must be >= 1, got {n}, {window}, {batch_size}")
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    count = min(n, ids.numel() // window)
    if count == 0:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {window}")
    windows = ids[: count * window].reshape(count, window)
    return [{"input_ids": windows[i: i + batch_size]} for i in range(0, count, batch_size)]

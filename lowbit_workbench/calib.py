"""STS-B sentences as model inputs: calibration batches from the train split, fixed-shape timing batches
from the dev split."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lowbit.calib import text_batches

from .evaluate import load_stsb


def stsb_train_sentences(n: int) -> list[str]:
    """`n` distinct sentences from the STS-B train split, spread evenly over the file."""
    s1, s2, _ = load_stsb("train")
    # dict.fromkeys: de-duplicate while keeping file order.
    pool = list(dict.fromkeys(s.strip() for pair in zip(s1, s2) for s in pair if s.strip()))
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must be in 1..{len(pool)} (distinct STS-B train sentences), got {n}")
    # The file is grouped by source (captions, news, forums); even spacing samples all of them.
    step = len(pool) / n
    return [pool[int(i * step)] for i in range(n)]


def default_text_calibration(tokenizer: Any, n: int = 64, *, batch_size: int = 8,
                             max_length: int = 128) -> list[dict[str, Tensor]]:
    """Calibration batches of `n` STS-B train sentences (in lowbit_workbench/data, so nothing is downloaded).

    The train split, not dev: dev is what `lowbit eval` scores, and calibrating on it would flatter the
    score.
    """
    return text_batches(tokenizer, stsb_train_sentences(n), batch_size=batch_size, max_length=max_length)


def timing_texts(n: int) -> list[str]:
    """`n` texts of 16 STS-B dev sentences each: long enough to fill 128 tokens, for timing at a fixed shape
    (`lowbit.bench.sample_batch`)."""
    s1, s2, _ = load_stsb("dev")
    if not 1 <= n <= len(s1) // 8:
        raise ValueError(f"n must be in 1..{len(s1) // 8}, got {n}")
    return [" ".join(s1[i: i + 8] + s2[i: i + 8]) for i in range(0, 8 * n, 8)]

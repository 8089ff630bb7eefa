"""The small language model's text corpus, its held-out perplexity and calibration windows.

The corpus is three gzipped texts in ``lowbit_workbench/data/lm`` (WikiText-2 valid, tiny-shakespeare and
Python's pydoc topics; see ``lowbit_workbench/data/lm/README.md``). Each source is cut once, at a line boundary,
into a train part (the first 90%) and a held-out part (the rest). Tokenizers and models are trained on the train
parts; held-out text is only ever scored, never used for training or calibration.

``scripts/train_lm.py`` trains a small Llama-style model on this corpus into ``runs/tiny-llama``. The
strided perplexity itself is the library's (`lowbit.perplexity`).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lowbit.perplexity import flatten_ids, negative_log_likelihood, token_ids

from . import DATA_DIR as _WORKBENCH_DATA

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = _WORKBENCH_DATA / "lm"
TINY_LLAMA_DIR = REPO_ROOT / "runs" / "tiny-llama"

# Source name -> file in DATA_DIR. The order is the order of concatenation everywhere.
SOURCES = {
    "wikitext2": "wikitext2.txt.gz",
    "tinyshakespeare": "tinyshakespeare.txt.gz",
    "pydoc": "pydoc_topics.txt.gz",
}
HELD_OUT_FRACTION = 0.1


class Split(NamedTuple):
    """One source cut in two: ``train + held_out`` is the whole text."""

    train: str
    held_out: str


def split_text(text: str, held_out_fraction: float = HELD_OUT_FRACTION) -> Split:
    """Cut `text` at the line boundary nearest before ``(1 - held_out_fraction) * len(text)``; the part
    after the cut is held out. Without a newline before that point everything is train text."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    point = int(len(text) * (1.0 - held_out_fraction))
    cut = text.rfind("\n", 0, point) + 1  # just after a newline; 0 when there is none
    if cut == 0:
        cut = len(text)
    return Split(text[:cut], text[cut:])


def load_corpus(root: Path | str | None = None,
                held_out_fraction: float = HELD_OUT_FRACTION) -> dict[str, Split]:
    """Read every source in `root` (default: ``lowbit_workbench/data/lm``) and split it.

    Returns ``{source name: Split(train, held_out)}`` in the order of `SOURCES`.
    """
    folder = DATA_DIR if root is None else Path(root)
    missing = [name for name in SOURCES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"language-model corpus not found: {folder} lacks {', '.join(missing)} "
            "(they are in lowbit_workbench/data/lm of a clone of the lowbit repository, not in the wheel; "
            "or pass root= pointing to a copy)"
        )
    corpus = {}
    for source, name in SOURCES.items():
        with gzip.open(folder / name, "rt", encoding="utf-8", newline="") as f:
            corpus[source] = split_text(f.read(), held_out_fraction)
    return corpus


def train_text(corpus: dict[str, Split]) -> str:
    """All train parts, concatenated in source order."""
    return "".join(split.train for split in corpus.values())


def held_out_text(corpus: dict[str, Split]) -> str:
    """All held-out parts, concatenated in source order."""
    return "".join(split.held_out for split in corpus.values())


def encode_sources(tokenizer: Any, corpus: dict[str, Split], part: str = "held_out") -> dict[str, Tensor]:
    """``{source: 1-D ids}`` of one part (``"train"`` or ``"held_out"``) of every source, each encoded on
    its own (so each starts with the tokenizer's BOS, if it adds one)."""
    if part not in Split._fields:
        raise ValueError(f"part must be one of {Split._fields}, got {part!r}")
    return {source: token_ids(tokenizer, getattr(split, part)) for source, split in corpus.items()}


def train_ids(tokenizer: Any, corpus: dict[str, Split] | None = None) -> Tensor:
    """The train parts of all sources encoded one by one and concatenated (1-D LongTensor)."""
    corpus = load_corpus() if corpus is None else corpus
    return torch.cat(list(encode_sources(tokenizer, corpus, "train").values()))


def held_out_perplexity(model: nn.Module, tokenizer: Any, *, max_length: int = 256, stride: int = 128,
                        batch_size: int = 8, corpus: dict[str, Split] | None = None,
                        progress: bool = False) -> dict[str, float]:
    """Strided perplexity on the held-out part of each source, plus ``"all"``: exp of the token-weighted
    mean NLL over all scored tokens of all sources (each source is evaluated on its own)."""
    corpus = load_corpus() if corpus is None else corpus
    result = {}
    total_nll, total_count = 0.0, 0
    for source, ids in encode_sources(tokenizer, corpus, "held_out").items():
        nll, count = negative_log_likelihood(model, ids, max_length=max_length, stride=stride,
                                             batch_size=batch_size, progress=progress)
        result[source] = math.exp(nll / count)
        total_nll += nll
        total_count += count
    result["all"] = math.exp(total_nll / total_count)
    return result


def unigram_perplexity(train: Tensor, held_out: Tensor, vocab_size: int) -> float:
    """Perplexity on `held_out` of the unigram model fitted on `train` (add-one smoothed): the baseline
    a language model must beat to have learned anything beyond token frequencies. Scores the same
    tokens as ``perplexity`` with overlapping windows (all but the first)."""
    counts = torch.bincount(flatten_ids(train), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[flatten_ids(held_out)[1:]].mean()))


def calibration_batches(tokenizer_or_ids: Any, n: int, seq_len: int, seed: int = 0, *,
                        batch_size: int = 1) -> list[dict[str, Tensor]]:
    """`n` random windows of `seq_len` tokens from the train split, as model inputs for
    ``lowbit.quantize(model, recipe, calibration=...)``.

    `tokenizer_or_ids`: a tokenizer (the train parts of the corpus are encoded with it) or a 1-D tensor of
    train-split token ids. Window starts are drawn uniformly with a generator seeded by `seed`. Returns
    ``ceil(n / batch_size)`` dicts ``{"input_ids": LongTensor[batch, seq_len]}``.
    """
    if n < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"n, seq_len and batch_size must be >= 1, got {n}, {seq_len}, {batch_size}")
    if isinstance(tokenizer_or_ids, Tensor):
        ids = flatten_ids(tokenizer_or_ids)
    else:
        ids = train_ids(tokenizer_or_ids)
    if ids.numel() < seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the {ids.numel()} train tokens")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=gen)
    windows = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
    return [{"input_ids": windows[i: i + batch_size]} for i in range(0, n, batch_size)]


def tiny_llama_path() -> Path:
    """The folder ``scripts/train_lm.py`` writes its model to (``runs/tiny-llama`` of this repository)."""
    if not (TINY_LLAMA_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained tiny Llama model in {TINY_LLAMA_DIR}: train it first with "
            "`python scripts/train_lm.py` (about 10 minutes on 2 CPU cores)"
        )
    return TINY_LLAMA_DIR

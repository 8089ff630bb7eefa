"""Text corpus, strided perplexity and calibration windows for causal language models.

The corpus is three gzipped texts in ``lowbit/data/lm`` (WikiText-2 valid, tiny-shakespeare and Python's pydoc
topics; see ``lowbit/data/lm/README.md``). Each source is cut once, at a line boundary, into a train part (the
first 90%) and a held-out part (the rest). Tokenizers and models are trained on the train parts; held-out
text is only ever scored, never used for training or calibration.

``scripts/train_lm.py`` trains a small Llama-style model on this corpus into ``runs/tiny-llama``.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .progress import progress_bar

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data" / "lm"
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
    """Read every source in `root` (default: the copy shipped in ``lowbit/data/lm``) and split it.

    Returns ``{source name: Split(train, held_out)}`` in the order of `SOURCES`.
    """
    folder = DATA_DIR if root is None else Path(root)
    missing = [name for name in SOURCES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"language-model corpus not found: {folder} lacks {', '.join(missing)} "
            "(they ship with lowbit in lowbit/data/lm; reinstall lowbit, or pass root= pointing to a copy)"
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


def encode(tokenizer: Any, text: str) -> Tensor:
    """Token ids of `text` as a 1-D LongTensor, with the tokenizer's special tokens (e.g. a leading BOS)."""
    # Going through the fast backend directly skips the "longer than model_max_length" warning: long
    # texts are expected here, the caller cuts them into windows.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=True).ids
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def encode_sources(tokenizer: Any, corpus: dict[str, Split], part: str = "held_out") -> dict[str, Tensor]:
    """``{source: 1-D ids}`` of one part (``"train"`` or ``"held_out"``) of every source, each encoded on
    its own (so each starts with the tokenizer's BOS, if it adds one)."""
    if part not in Split._fields:
        raise ValueError(f"part must be one of {Split._fields}, got {part!r}")
    return {source: encode(tokenizer, getattr(split, part)) for source, split in corpus.items()}


def train_ids(tokenizer: Any, corpus: dict[str, Split] | None = None) -> Tensor:
    """The train parts of all sources encoded one by one and concatenated (1-D LongTensor)."""
    corpus = load_corpus() if corpus is None else corpus
    return torch.cat(list(encode_sources(tokenizer, corpus, "train").values()))


def _logits(output: Any) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output {type(output).__name__} has no logits")
    return logits


def _as_1d(input_ids: Tensor) -> Tensor:
    if input_ids.dim() == 2 and input_ids.size(0) == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D or of shape [1, T], got {tuple(input_ids.shape)}")
    return input_ids.long()


def perplexity(model: nn.Module, input_ids: Tensor, *, max_length: int, stride: int, batch_size: int = 8,
               progress: bool = False) -> float:
    """Strided (sliding-window) perplexity of `model` on one long token sequence.

    Windows of `max_length` tokens start every `stride` tokens (the last one may be shorter). Each
    window scores only the tokens the previous window did not reach, so with ``stride < max_length``
    every token after the first is scored exactly once, with at least ``max_length - stride`` tokens of
    context (fewer only inside the first window); with ``stride == max_length`` the windows are disjoint and the first token of each is not
    scored. The result is exp of the token-weighted mean negative log-likelihood.

    `model(input_ids=...)` must return logits ``[batch, T, vocab]`` (or an object with ``.logits``); the
    loss is computed here from them, so quantized models work too. Windows of equal length run
    `batch_size` at a time (no padding, so batching changes the result only by float rounding). The model is put in
    eval mode for the call and its previous mode restored afterwards.
    """
    nll, count = _nll_sum(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
                          progress=progress)
    return math.exp(nll / count)


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: the Hugging Face "perplexity of fixed-length
    models" loop."""
    windows = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def _nll_sum(model: nn.Module, input_ids: Tensor, *, max_length: int, stride: int, batch_size: int,
             progress: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of the strided evaluation."""
    ids = _as_1d(input_ids)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    windows = _windows(ids.numel(), max_length, stride)
    # Consecutive windows of equal length form one batch (only the last window can be shorter).
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    count = 0
    bar = progress_bar(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    try:
        with torch.inference_mode():
            for group in groups:
                batch = torch.stack([ids[begin:end] for begin, end, _ in group]).to(device)
                logits = _logits(model(input_ids=batch))[:, :-1].float()
                targets = batch[:, 1:].clone()  # targets[:, j] is the token at position begin + 1 + j
                for row, (begin, _, first) in enumerate(group):
                    targets[row, : first - begin - 1] = -100  # scored by the previous window already
                nll = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
                nll_sum += float(nll)
                count += int((targets != -100).sum())
                bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    return nll_sum, count


def held_out_perplexity(model: nn.Module, tokenizer: Any, *, max_length: int = 256, stride: int = 128,
                        batch_size: int = 8, corpus: dict[str, Split] | None = None,
                        progress: bool = False) -> dict[str, float]:
    """Strided perplexity on the held-out part of each source, plus ``"all"``: exp of the token-weighted
    mean NLL over all scored tokens of all sources (each source is evaluated on its own)."""
    corpus = load_corpus() if corpus is None else corpus
    result = {}
    total_nll, total_count = 0.0, 0
    for source, ids in encode_sources(tokenizer, corpus, "held_out").items():
        nll, count = _nll_sum(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                              progress=progress)
        result[source] = math.exp(nll / count)
        total_nll += nll
        total_count += count
    result["all"] = math.exp(total_nll / total_count)
    return result


def unigram_perplexity(train: Tensor, held_out: Tensor, vocab_size: int) -> float:
    """Perplexity on `held_out` of the unigram model fitted on `train` (add-one smoothed): the baseline
    a language model must beat to have learned anything beyond token frequencies. Scores the same
    tokens as ``perplexity`` with overlapping windows (all but the first)."""
    counts = torch.bincount(_as_1d(train), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[_as_1d(held_out)[1:]].mean()))


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
    ids = _as_1d(tokenizer_or_ids) if isinstance(tokenizer_or_ids, Tensor) else train_ids(tokenizer_or_ids)
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

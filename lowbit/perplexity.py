"""Strided (sliding-window) perplexity of a causal language model on the user's own token ids.

`token_ids(tokenizer, text)` turns a long text into one sequence of ids; `perplexity(model, ids, ...)` scores
it window by window, the way Hugging Face's "perplexity of fixed-length models" guide does, and works on
quantized models too (the loss is computed here from the logits); `eval_text_perplexity` does both for a text
file (`lowbit eval --task ppl --data FILE`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .progress import progress_bar


def token_ids(tokenizer: Any, text: str) -> Tensor:
    """Token ids of `text` as a 1-D LongTensor, with the tokenizer's special tokens (e.g. a leading BOS)."""
    # Going through the fast backend directly skips the "longer than model_max_length" warning: long
    # texts are expected here, the caller cuts them into windows.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=True).ids
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _logits(output: Any) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output {type(output).__name__} has no logits")
    return logits


def flatten_ids(input_ids: Tensor) -> Tensor:
    """Token ids of shape [T] or [1, T] as a 1-D LongTensor."""
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
    nll, count = negative_log_likelihood(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
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


def negative_log_likelihood(model: nn.Module, input_ids: Tensor, *, max_length: int, stride: int, batch_size: int,
             progress: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of the strided evaluation."""
    ids = flatten_ids(input_ids)
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


def eval_text_perplexity(model: Any, tokenizer: Any, path: str | os.PathLike, *, max_length: int = 256,
                         stride: int = 128, progress: bool = False) -> dict[str, float]:
    """Strided perplexity of a causal LM on the text of a UTF-8 file, read as one token stream (windows of
    `max_length` tokens, cut to the model's maximum positions, moving by `stride`, at most half a window).

    Returns {"ppl", "tokens", "window", "stride"}. A missing, empty or non-UTF-8 file, or one with fewer tokens
    than one window, raises ValueError naming the file."""
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
    ids = token_ids(tokenizer, text)
    if ids.numel() < window:
        raise ValueError(f"text file {str(p)!r} holds {ids.numel()} tokens, fewer than one window of {window}: "
                         "give a longer text")
    ppl = perplexity(model, ids, max_length=window, stride=stride, progress=progress)
    return {"ppl": ppl, "tokens": ids.numel(), "window": window, "stride": stride}

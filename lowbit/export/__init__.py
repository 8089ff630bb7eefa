"""Export a lowbit model to other runtimes, each export checked by running it there.

    lowbit.export.onnx(model, example_inputs, path)        ONNX, run in ONNX Runtime (and OpenVINO)
    lowbit.export.gguf(model, path, tokenizer=...)         GGUF for llama.cpp (Llama-family causal LMs)
    lowbit.export.compressed_tensors(model, directory)     a Hugging Face folder transformers loads with
                                                           the compressed-tensors package, no lowbit

Every writer carries lowbit's own codes, scales and zero points (no re-quantization), refuses what its
format cannot represent with one ExportError naming the layer and format, and writes through a temporary
file renamed into place. The runtimes' packages are optional: each is imported only when its export runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .verify import Agreement, ExportError, compare

__all__ = ["FORMATS", "Agreement", "ExportError", "compare", "compressed_tensors", "from_checkpoint", "gguf",
           "onnx"]

# Format name (the CLI's --format) -> the module that writes it. Each module has
# `from_checkpoint(checkpoint: Path, out: Path, **options) -> Path`.
FORMATS = {
    "onnx": "lowbit.export.to_onnx",
    "gguf": "lowbit.export.to_gguf",
    "compressed-tensors": "lowbit.export.to_compressed_tensors",
}


def _writer(fmt: str) -> Any:
    try:
        return importlib.import_module(FORMATS[fmt])
    except KeyError:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}") from None


def onnx(model: Any, example_inputs: Any, path: str | Path, **options: Any) -> Path:
    """Write `model` as ONNX at `path`, run it in ONNX Runtime and compare with the model; see to_onnx."""
    return _writer("onnx").export(model, example_inputs, path, **options)


def gguf(model: Any, path: str | Path, **options: Any) -> Path:
    """Write a Llama-family causal LM as GGUF at `path` and check it reads back; see to_gguf."""
    return _writer("gguf").export(model, path, **options)


def compressed_tensors(model: Any, directory: str | Path, **options: Any) -> Path:
    """Write a transformers model as a compressed-tensors folder; see to_compressed_tensors."""
    return _writer("compressed-tensors").export(model, directory, **options)


def from_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, **options: Any) -> Path:
    """Export the lowbit checkpoint folder `checkpoint` (written by lowbit.save) to `out` in format `fmt`."""
    writer: Callable[..., Path] = _writer(fmt).from_checkpoint
    return writer(Path(checkpoint), Path(out), **options)

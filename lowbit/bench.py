"""Measure what quantization bought and cost: size, latency against the float model in the same run,
and output fidelity as cosine similarity to the float model's outputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import checkpoint, hf
from .progress import progress_bar


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


class OnnxModel(nn.Module):
    """An ONNX file (as lowbit.export.onnx writes a transformers encoder) run in ONNX Runtime on the CPU, called
    like the encoder: model(**batch).last_hidden_state, so that it is timed and compared beside lowbit's."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            from .export.to_onnx import ort_session

            self.session = ort_session(path)  # spinning off: it shares the cores with the other models timed
        except ImportError as e:
            raise ValueError(f"timing {path} needs onnxruntime ({e}): pip install 'lowbit[export]'") from None
        except Exception as e:  # noqa: BLE001  (ORT's own exception types: a file it cannot load)
            raise ValueError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.file_bytes = Path(path).stat().st_size

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"the ONNX file takes inputs {self.input_names}; the tokenizer gives no {missing}")
        out = self.session.run(None, {n: inputs[n].numpy() for n in self.input_names})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(out))


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model would save (parameters and persistent buffers); an ONNX file's size."""
    if isinstance(model, OnnxModel):
        return model.file_bytes
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


COMPILED = " (compiled)"  # suffix of a compiled model's row in compare()


def compile_models(models: dict[str, nn.Module], *, dynamic: bool | None = None,
                   freeze: bool = False) -> dict[str, nn.Module]:
    """`torch.compile` (inductor) of each model that PyTorch can trace (not ONNX Runtime sessions), by name.

    Nothing is compiled yet: that happens at a model's first call for each input shape, which compare() times
    apart. dynamic=None is torch's default: the first shape is compiled for itself, a second shape of the same
    rank once more with the changed sizes symbolic, and that graph then serves every later size (sizes 0 and 1
    are always their own graphs). freeze=True lets inductor fold the weights into the graph as constants
    (its `freezing` option: float linears get oneDNN's prepacked weights); the model must not change after."""
    options = {"freezing": True} if freeze else None
    chosen = {name: m for name, m in models.items() if not isinstance(m, OnnxModel)}
    # Models of one class share their forward's compiled-code cache, one entry per model structure and shape;
    # past dynamo's recompile limit (8) a model would silently run eagerly in the "compiled" row.
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, 8 * len(chosen))
    limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 32 * len(chosen))
    return {name: torch.compile(m, backend="inductor", dynamic=dynamic, options=options) for name, m in chosen.items()}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compare(models: dict[str, nn.Module], tokenizer, texts: Sequence[str], *, seq: int = 128, iters: int = 10,
            reference: str | None = None, progress: bool = False,
            compiled: dict[str, nn.Module] | None = None) -> list[dict]:
    """Latency, speed-up and cosine of each model against `reference` (the first one by default), on one
    batch of `texts` (one row each) padded or cut to `seq` tokens.

    `compiled` (from compile_models, keyed by the names in `models`) adds a row "<name> (compiled)" after
    each such model, timed in the same round-robin: its speed-up is against the eager `reference` too, and it
    also has "cosine_eager" (to the same model run eagerly), "compile_s" (wall time of its first call at this
    shape: tracing and code generation, left out of the latency) and "graphs" (graphs that first call made:
    1 without graph breaks, 0 when an earlier compiled graph already served this shape)."""
    reference = reference or next(iter(models))
    compiled = compiled or {}
    unknown = [name for name in compiled if name not in models]
    if unknown:
        raise ValueError(f"compiled models {unknown} are not among the models compared: {list(models)}")
    inputs = sample_batch(tokenizer, texts, seq)
    batch = len(texts)
    runs: dict[str, nn.Module] = {}
    for name, m in models.items():
        runs[name] = m
        if name in compiled:
            runs[name + COMPILED] = compiled[name]
    first: dict[str, tuple[float, int]] = {}
    with torch.inference_mode():
        outs = {}
        for name, m in runs.items():
            if name.endswith(COMPILED) and name[:-len(COMPILED)] in compiled:
                graphs, t0 = _graphs_compiled(), time.perf_counter()
                try:
                    outs[name] = mean_pool(m, inputs)
                except Exception as e:  # dynamo and inductor raise many types: say which model failed
                    raise ValueError(f"torch.compile of {name[:-len(COMPILED)]} failed: {e}") from e
                first[name] = (time.perf_counter() - t0, _graphs_compiled() - graphs)
            else:
                outs[name] = mean_pool(m, inputs)
    times = time_interleaved({name: (lambda m=m: m(**inputs)) for name, m in runs.items()}, iters=iters,
                             progress=progress)
    rows = []
    for name, m in runs.items():
        row = {"model": name, "batch": batch, "seq": seq, "latency_ms": times[name] * 1e3,
               "speedup": times[reference] / times[name], "cosine": cosine_to(outs[reference], outs[name]),
               "state_mb": state_bytes(m) / 1e6}
        if name in first:
            eager = name[:-len(COMPILED)]
            row.update(cosine_eager=cosine_to(outs[eager], outs[name]), compile_s=first[name][0],
                       graphs=first[name][1], speedup_eager=times[eager] / times[name])
        rows.append(row)
    return rows

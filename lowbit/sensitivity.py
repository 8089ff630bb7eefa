"""How much each layer (and each repeated block) minds being quantized, format by format.

For every candidate layer and weight format: the change of the model's output on calibration data when
only that layer (or block) is quantized, all else float; and two proxies that need no extra model pass:
the weight's SQNR, and its error weighted by the layer's inputs (trace(dW H dW^T) / trace(W H W^T) with
H = X^T X of the calibration inputs; an embedding table's rows weighted by how often they are looked up).
The exact stored bytes of each layer in each format come along: lowbit.search trades them against the
measured effects.

The output change is the KL divergence of the output distributions (from the model's `logits`) for LMs
and classifiers, else the relative error of the main output (hidden states, embeddings), over the
real tokens of the calibration batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import layers as layer_kinds
from .formats import scheme_for
from .progress import progress_bar
from .recipes import QuantConfig, parse_recipe
from .sequential import batch_len, call_model, find_blocks, inference, main_output, masking, token_mask

DEFAULT_FORMATS = ("int8", "int4-g128", "int4-g64", "int3-g64", "int3-g128", "int2-g32")
# The full input Hessian is kept for layers up to this many inputs; wider ones use its diagonal.
FULL_HESSIAN_INPUTS = 4096


@dataclass
class Candidate:
    """A layer lowbit can quantize: its qualified name, the torch-layout module, and its kind."""

    name: str
    module: nn.Module  # nn.Linear or nn.Embedding (a view sharing the model's parameters)
    kind: str  # "linear" or "embedding"

    @property
    def weights(self) -> int:
        return self.module.weight.numel()

    @property
    def float_bytes(self) -> int:
        w = self.module.weight
        return w.numel() * w.element_size()


@dataclass
class Sensitivity:
    """lowbit.sensitivity's result. `rows`: one dict per (part, format) with "part" (a layer's or block's
    qualified name), "kind" ("layer" / "block"), "format", "weights", "bytes" (stored: codes, scales, zero
    points), "effect" (output change, see `effect_name`), "sqnr_db", "hessian_error" (layers only)."""

    formats: list[str]
    rows: list[dict] = field(default_factory=list)
    effect_name: str = "relative error"
    layers: list[str] = field(default_factory=list)  # candidate layers, in module order
    blocks: dict[str, list[str]] = field(default_factory=dict)  # block name -> its candidate layers
    float_bytes: dict[str, int] = field(default_factory=dict)  # each candidate layer's float weight bytes
    other_bytes: int = 0  # the model's stored bytes outside the candidate layers' weights (norms, biases...)
    samples: int = 0
    seconds: float = 0.0

    def get(self, part: str, fmt: str) -> dict:
        for r in self.rows:
            if r["part"] == part and r["format"] == fmt:
                return r
        raise KeyError(f"no sensitivity row for {part!r} in {fmt!r}")

    def layer_rows(self) -> list[dict]:
        return [r for r in self.rows if r["kind"] == "layer"]

    def to_markdown(self, kind: str = "layer", value: str = "effect") -> str:
        """A table: parts (layers or blocks) x formats, of `value` ("effect", "sqnr_db", "hessian_error")."""
        parts = self.layers if kind == "layer" else list(self.blocks)
        head = f"| {kind} | " + " | ".join(self.formats) + " |"
        lines = [head, "|" + " --- |" * (len(self.formats) + 1)]
        for p in parts:
            cells = []
            for f in self.formats:
                v = self.get(p, f).get(value)
                cells.append("-" if v is None else f"{v:.3g}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def candidates(model: nn.Module, patterns: Sequence[str] | None = None) -> list[Candidate]:
    """The linears and embedding tables of `model` that lowbit quantizes (lowbit.layers), optionally only
    those matching `patterns` (globs or names, as per-layer recipes match)."""
    from .quantize import mha_out_projs
    from .recipes import name_matches

    skip = mha_out_projs(model)
    out = []
    for name, mod in model.named_modules():
        kind = layer_kinds.float_kind(mod)
        if kind is None or not name or name in skip or kind.name in ("conv1d", "conv2d"):
            continue
        if patterns and not any(name_matches(name, p) for p in patterns):
            continue
        view = layer_kinds.as_torch(mod)
        out.append(Candidate(name, view, "embedding" if isinstance(view, nn.Embedding) else "linear"))
    return out


def _weight_config(fmt: str) -> QuantConfig:
    config = parse_recipe(fmt)
    if config.act is not None:
        raise ValueError(f"sensitivity compares weight formats; {fmt!r} quantizes activations too")
    if config.method == "awq":
        raise ValueError(f"{fmt!r}: AWQ rescales a group of layers together; measure the format without -awq")
    return config


def encode_layer(c: Candidate, config: QuantConfig, hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The weight `c` computes with in `config` (float, the layer's dtype) and the bytes it is stored in."""
    if c.kind == "embedding":
        import dataclasses

        config = dataclasses.replace(config, method="rtn")
    scheme = scheme_for(config)
    w = c.module.weight.detach()
    h = hessian if (config.method == "gptq" and hessian is not None and hessian.dim() == 2) else None
    state = scheme.encode(w, hessian=h)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return scheme.decode(state, tuple(w.shape)).to(w.dtype), nbytes


@contextlib.contextmanager
def swapped(weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The modules compute with the given weights inside; their own come back after."""
    saved = {m: m.weight.detach().clone() for m in weights}
    try:
        with torch.no_grad():
            for m, w in weights.items():
                m.weight.copy_(w)
        yield
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                m.weight.copy_(w)


def _take(calibration: Iterable, samples: int) -> list:
    batches, seen = [], 0
    for b in calibration:
        batches.append(b)
        seen += batch_len(b)
        if seen >= samples:
            break
    if not batches:
        raise ValueError("calibration data is empty: pass an iterable of model inputs")
    return batches


def _logits(out: Any) -> torch.Tensor | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    return logits if isinstance(logits, torch.Tensor) else None


class _Effect:
    """The output change against the float model's outputs on the same batches: "kl" (mean over real
    tokens of KL(float || quantized) of the softmax of `logits`), "relative_error" (||out - ref|| / ||ref||
    of the main output over real tokens), or a function of (reference, output) main tensors (logits when
    the model returns them), averaged over batches."""

    def __init__(self, refs: list[Any], masks: list[torch.Tensor | None], metric: str | Callable) -> None:
        self.metric, self.masks = metric, masks
        self.name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        if metric == "kl" and _logits(refs[0]) is None:
            raise ValueError("metric 'kl' needs a model output with logits")
        self.refs = [self._main(o) for o in refs]
        if metric == "kl":
            self.refs = [F.log_softmax(self._real(r.float(), m), dim=-1) for r, m in zip(self.refs, masks)]

    def _main(self, out: Any) -> torch.Tensor:
        logits = _logits(out) if self.metric != "relative_error" else None
        return logits if logits is not None else main_output(out)

    @staticmethod
    def _real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            return t[mask]
        return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)

    def __call__(self, outs: list[Any]) -> float:
        num = den = 0.0
        for ref, out, mask in zip(self.refs, outs, self.masks):
            q = self._main(out)
            if callable(self.metric):
                num += float(self.metric(ref, q))
                den += 1
            elif self.metric == "kl":
                lq = F.log_softmax(self._real(q.float(), mask), dim=-1)
                num += float((ref.exp() * (ref - lq)).sum())
                den += ref.shape[0]
            else:
                r, q = self._real(ref.float(), mask), self._real(q.float(), mask)
                num += float((q - r).pow(2).sum())
                den += float(r.pow(2).sum())
        if self.metric == "relative_error":
            return math.sqrt(num / max(den, 1e-30))
        return num / max(den, 1e-30)


class _Replay(nn.Module):
    """Stands in for a block whose inputs do not change: returns its recorded outputs, call after call
    (attributes the model reads off its blocks come from the block itself)."""

    def __init__(self, block: nn.Module, outs: list[Any]) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self._outs, self._i = outs, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._outs[self._i % len(self._outs)]
        self._i += 1
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class _Runner:
    """Runs the model over the calibration batches. A change confined to block i (and what follows) needs
    the blocks before it only as the float model ran them: they are replayed from a recording, which
    halves the cost of a sweep over a 6-block encoder."""

    # Recorded block outputs are kept up to this many bytes; beyond it every run is a full pass.
    MAX_RECORD_BYTES = 1 << 30

    def __init__(self, model: nn.Module, batches: list, masks: list) -> None:
        self.model, self.batches, self.masks = model, batches, masks
        self.blocks = find_blocks(model)
        self.record: list[list[Any]] = []
        if self.blocks is not None:
            _, mods = self.blocks
            rec: list[list[Any]] = [[] for _ in mods]
            handles = [m.register_forward_hook(lambda mod, a, out, i=i: rec[i].append(out)) for i, m in enumerate(mods)]
            try:
                self.outputs()
            finally:
                for h in handles:
                    h.remove()
            size = sum(main_output(o).numel() * main_output(o).element_size() for r in rec for o in r)
            if size <= self.MAX_RECORD_BYTES and all(len(r) == len(batches) for r in rec):
                self.record = rec

    def outputs(self, start: int = 0) -> list[Any]:
        """The model's outputs on every batch, blocks before `start` replayed from the float run."""
        saved = []
        if start and self.record:
            _, mods = self.blocks
            for j in range(start):
                saved.append((j, mods[j]))
                mods[j] = _Replay(mods[j], self.record[j])
        try:
            with inference(self.model):
                outs = []
                for b, m in zip(self.batches, self.masks):
                    with masking(m):
                        outs.append(call_model(self.model, b))
            return outs
        finally:
            for j, mod in saved:
                self.blocks[1][j] = mod

    def block_of(self, name: str) -> int:
        """Index of the block holding layer `name` (0 when it is outside the blocks)."""
        if self.blocks is None or not self.record:
            return 0
        prefix = self.blocks[0]
        for i in range(len(self.blocks[1])):
            if name.startswith(f"{prefix}.{i}." if prefix else f"{i}."):
                return i
        return 0


def _input_stats(model: nn.Module, cands: list[Candidate], batches: list, masks: list) -> dict[str, torch.Tensor]:
    """Per linear: X^T X of its calibration inputs (its diagonal for wide layers); per embedding: how often
    each row is looked up. Padded positions left out."""
    from .sequential import input_rows

    stats: dict[str, torch.Tensor] = {}

    def hook_for(c: Candidate):
        def hook(mod, args):
            x = args[0].detach()
            if c.kind == "embedding":
                ids = input_rows(x.unsqueeze(-1), 1).reshape(-1).long() if x.dim() == 2 else x.reshape(-1).long()
                counts = torch.bincount(ids, minlength=c.module.num_embeddings).float()
                stats[c.name] = stats.get(c.name, 0) + counts
                return
            k = c.module.in_features
            rows = input_rows(x, k).float()
            h = rows.T @ rows if k <= FULL_HESSIAN_INPUTS else rows.pow(2).sum(0)
            stats[c.name] = stats[c.name] + h if c.name in stats else h
        return hook

    # Hooks go on the model's own modules (a transformers Conv1D's torch view is not what the model calls).
    handles = [model.get_submodule(c.name).register_forward_pre_hook(hook_for(c)) for c in cands]
    try:
        with inference(model):
            for b, m in zip(batches, masks):
                with masking(m):
                    call_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return stats


def _proxies(c: Candidate, deq: torch.Tensor, h: torch.Tensor | None) -> tuple[float, float | None]:
    w = c.module.weight.detach().float()
    d = w - deq.float()
    err = float(d.pow(2).sum())
    sqnr = 10 * math.log10(float(w.pow(2).sum()) / err) if err > 0 else math.inf
    if h is None:
        return sqnr, None
    if c.kind == "embedding":  # rows weighted by their lookups
        herr = float((d.pow(2).sum(1) * h).sum()) / max(float((w.pow(2).sum(1) * h).sum()), 1e-30)
    elif h.dim() == 2:
        herr = float(((d @ h) * d).sum()) / max(float(((w @ h) * w).sum()), 1e-30)
    else:
        herr = float((d.pow(2) * h).sum()) / max(float((w.pow(2) * h).sum()), 1e-30)
    return sqnr, herr


def sensitivity(model: nn.Module, calibration: Iterable, formats: Sequence[str] = DEFAULT_FORMATS, *,
                layers: Sequence[str] | None = None, blocks: bool = True, samples: int = 32,
                metric: str | Callable | None = None, progress: bool = False) -> Sensitivity:
    """Measure, for each candidate layer (the linears and embedding tables lowbit quantizes, or those
    matching `layers`) and each weight format in `formats` (recipe strings without activation
    quantization; `-gptq` uses the layer's own float inputs), the model's output change on the first
    `samples` calibration samples when only that layer is quantized; with `blocks`, also each repeated
    block (lowbit.sequential.find_blocks) quantized whole. `metric`: "kl" (default when the model returns
    logits), "relative_error" (default otherwise) or fn(reference_output, output) -> float. The model is
    left as it was."""
    import time

    t0 = time.perf_counter()
    configs = {f: _weight_config(f) for f in formats}
    cands = candidates(model, layers)
    if not cands:
        raise ValueError("found no layer to measure (nn.Linear, nn.Embedding or transformers' Conv1D)")
    batches = _take(calibration, samples)
    masks = [token_mask(b) for b in batches]
    runner = _Runner(model, batches, masks)
    refs = runner.outputs()
    if metric is None:
        metric = "kl" if _logits(refs[0]) is not None else "relative_error"
    if isinstance(metric, str) and metric not in ("kl", "relative_error"):
        raise ValueError(f"unknown metric {metric!r}; use 'kl', 'relative_error' or a function")
    effect = _Effect(refs, masks, metric)
    stats = _input_stats(model, cands, batches, masks)

    def run(start: int = 0) -> float:
        return effect(runner.outputs(start))

    result = Sensitivity(formats=list(formats), effect_name=effect.name,
                         layers=[c.name for c in cands], samples=sum(batch_len(b) for b in batches))
    result.float_bytes = {c.name: c.float_bytes for c in cands}
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result.other_bytes = total - sum(result.float_bytes.values())
    encoded: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    work = [(c, f) for c in cands for f in formats]
    for c, f in progress_bar(work, desc="sensitivity", unit="layer-format", disable=not progress):
        deq, nbytes = encode_layer(c, configs[f], stats.get(c.name))
        encoded[(c.name, f)] = (deq, nbytes)
        sqnr, herr = _proxies(c, deq, stats.get(c.name))
        with swapped({c.module: deq}):
            e = run(runner.block_of(c.name))
        result.rows.append({"part": c.name, "kind": "layer", "format": f, "weights": c.weights, "bytes": nbytes,
                            "effect": e, "sqnr_db": sqnr, "hessian_error": herr})
    found = find_blocks(model) if blocks else None
    if found is not None:
        prefix, mods = found
        by_name = {c.name: c for c in cands}
        for i in range(len(mods)):
            block = f"{prefix}.{i}" if prefix else str(i)
            inside = [n for n in result.layers if n.startswith(block + ".")]
            if not inside:
                continue
            result.blocks[block] = inside
            for f in formats:
                with swapped({by_name[n].module: encoded[(n, f)][0] for n in inside}):
                    e = run(i if runner.record else 0)
                result.rows.append({"part": block, "kind": "block", "format": f,
                                    "weights": sum(by_name[n].weights for n in inside),
                                    "bytes": sum(encoded[(n, f)][1] for n in inside), "effect": e,
                                    "sqnr_db": None, "hessian_error": None})
    result.seconds = time.perf_counter() - t0
    return result


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their average rank)."""
    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor([float(x) for x in v], dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in torch.unique(t):  # average rank over ties
            tie = t == value
            if int(tie.sum()) > 1:
                r[tie] = r[tie].mean()
        return r

    if len(a) != len(b) or len(a) < 3:
        raise ValueError("rank correlation needs two sequences of the same length, at least 3")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else math.nan


def proxy_correlations(sens: Sensitivity) -> dict[str, float]:
    """How well each cheap proxy ranks the layers' measured output change (Spearman over every
    layer-format pair): SQNR is negated (a high SQNR means a small error)."""
    rows = [r for r in sens.layer_rows() if r["hessian_error"] is not None and math.isfinite(r["sqnr_db"])]
    effect = [r["effect"] for r in rows]
    return {"sqnr_db": rank_correlation([-r["sqnr_db"] for r in rows], effect),
            "hessian_error": rank_correlation([r["hessian_error"] for r in rows], effect)}


def sensitivity_plot(sens: Sensitivity, path: Any) -> None:
    """A heat map of the measured output change: layers (and blocks) x formats, log scale (PNG; needs
    matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    parts = sens.layers + list(sens.blocks)
    values = [[max(sens.get(p, f)["effect"], 1e-9) for f in sens.formats] for p in parts]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(sens.formats), 1.5 + 0.22 * len(parts)))
    im = ax.imshow(values, aspect="auto", cmap="magma_r", norm=LogNorm())
    ax.set_xticks(range(len(sens.formats)), sens.formats, rotation=30, ha="right")
    ax.set_yticks(range(len(parts)), parts, fontsize=7)
    ax.set_title(f"output change ({sens.effect_name}) with only that part quantized")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

__all__ = ["DEFAULT_FORMATS", "Candidate", "Sensitivity", "candidates", "encode_layer", "proxy_correlations",
           "rank_correlation", "sensitivity", "sensitivity_plot"]

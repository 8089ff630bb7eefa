"""Per-layer quantization error: how much noise each quantized layer adds to its own output.

Every quantized layer is fed exactly the input its float counterpart receives while the float model runs
over calibration data, so a layer's figure measures that layer alone, not the error piled up by the
layers before it. Only running sums are kept, never activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .modules import QuantModule
from .quantize import feed, summary
from .w8a8 import RowCodes


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _rel_error(signal: float, noise: float) -> float:
    if noise == 0.0:
        return 0.0
    if signal == 0.0:
        return math.inf
    return math.sqrt(noise / signal)


def _sort_key(row: dict) -> tuple[bool, float]:
    # Worst (lowest SQNR) first; layers the calibration never reached (NaN) go last.
    s = row["sqnr_db"]
    return (math.isnan(s), 0.0 if math.isnan(s) else s)


class _Accumulator:
    """Forward hook on a float layer: runs the quantized layer on the same input and sums the powers."""

    def __init__(self, name: str, quantized: nn.Module):
        self.name, self.quantized = name, quantized
        # Activation-quantized layers may absorb the ReLU that followed the float layer.
        self.fused_relu = getattr(quantized, "relu", False) is True
        # ...or the GELU (W8A8Linear.act_out), whose output it may hand on as the next layer's int8 codes.
        self.fused_gelu = getattr(quantized, "act_out", None) == "gelu"
        self.signal = 0.0
        self.noise = 0.0
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.name!r}: expected a tensor output, got {type(output).__name__}")
        try:
            yq = self.quantized(*args, **kwargs)
        except Exception as e:
            raise RuntimeError(f"layer {self.name!r}: the quantized layer failed on the float layer's "
                               f"input: {e}") from e
        if isinstance(yq, RowCodes):
            yq = yq.dequantize()
        if yq.shape != output.shape:
            raise ValueError(f"layer {self.name!r}: quantized output has shape {tuple(yq.shape)}, "
                             f"the float layer's {tuple(output.shape)}")
        # float64 sums: millions of squared terms over many batches would lose digits in float32.
        yf = output.detach().double()
        if self.fused_relu:
            yf = yf.clamp_min(0.0)  # the layer stands in for float layer + ReLU; compare like with like
        if self.fused_gelu:
            yf = torch.nn.functional.gelu(yf)
        self.signal += yf.square().sum().item()
        self.noise += (yq.detach().double() - yf).square().sum().item()
        self.calls += 1


def layer_report(float_model: nn.Module, quantized_model: nn.Module, calibration: Iterable, *,
                 max_batches: int | None = None) -> list[dict]:
    """Signal-to-quantization-noise ratio of every quantized layer of `quantized_model`, worst first.

    `float_model` is the unquantized original (`lowbit.quantize` works in place, so quantize a
    `copy.deepcopy`). It runs over `calibration` (an iterable of model inputs: a tensor is passed as
    `model(t)`, a tuple as `model(*t)`, a dict as `model(**t)`), at most `max_batches` of them; each
    quantized layer runs on the input its float counterpart gets at the same qualified name.

    Per layer: layer, type, recipe, kernel, calls (how often it ran), sqnr_db = 10 log10(sum y^2 /
    sum (y_q - y)^2) over all calls (inf when the outputs are identical), rel_error = sqrt(noise / signal).
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    if isinstance(calibration, (torch.Tensor, dict)):
        # Iterating would silently yield rows or keys instead of batches.
        raise TypeError("calibration must be an iterable of model inputs (e.g. a list of batches), "
                        "not a single tensor or dict")
    if float_model is quantized_model:
        raise ValueError("float_model and quantized_model are the same object; lowbit.quantize works in "
                         "place, so quantize a copy.deepcopy of the float model")
    quantized = [(name, m) for name, m in quantized_model.named_modules() if isinstance(m, QuantModule)]
    if not quantized:
        raise ValueError("quantized_model has no quantized layers (run lowbit.quantize on it first)")
    float_modules = dict(float_model.named_modules())
    hooks = []
    accs: list[tuple[nn.Module, _Accumulator]] = []
    for name, qmod in quantized:
        fmod = float_modules.get(name)
        if fmod is None:
            raise ValueError(f"layer {name!r} of the quantized model is missing from the float model "
                             "(are they the same architecture?)")
        if isinstance(fmod, QuantModule):
            raise TypeError(f"layer {name!r} of the float model is quantized too; pass the unquantized "
                             "original (lowbit.quantize works in place: quantize a copy.deepcopy)")
        accs.append((fmod, _Accumulator(name, qmod)))
    for fmod, acc in accs:
        hooks.append(fmod.register_forward_hook(acc, with_kwargs=True))
    batches, _ = feed(float_model, calibration, hooks, max_batches=max_batches)
    if batches == 0:
        raise ValueError("calibration is empty: layer_report needs at least one batch of model inputs")
    rows = []
    for fmod, acc in accs:
        q = acc.quantized
        reached = acc.calls > 0
        rows.append({
            "layer": acc.name,
            "type": type(fmod).__name__.lower(),
            "recipe": q.config.name,
            "kernel": getattr(q, "kernel_name", "-"),
            "calls": acc.calls,
            "sqnr_db": _sqnr_db(acc.signal, acc.noise) if reached else math.nan,
            "rel_error": _rel_error(acc.signal, acc.noise) if reached else math.nan,
        })
    return sorted(rows, key=_sort_key)


def worst_layers(rows: list[dict], n: int) -> list[str]:
    """Names of the `n` layers with the lowest SQNR in a `layer_report`, ready for `exclude=`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [r["layer"] for r in sorted(rows, key=_sort_key)[:n]]


def bits_per_weight(model: nn.Module) -> dict[str, float]:
    """What a model's weights cost to store, in bits per weight, every stored tensor counted: codes, scales,
    zero points, codebooks (the bytes its checkpoint holds, headers aside).

    quantized: the quantized layers' tensors except biases, over the weights of those layers (NaN when there
    are none); model: every tensor of the model over the values the float model holds (a quantized layer
    counts as its float weight and bias), so an fp32 model is 32. Also: quantized_weights, values (counts).
    """
    state = model.state_dict()
    layers = {row["layer"]: math.prod(row["shape"]) for row in summary(model) if row["kernel"] != "float"}
    quant_bytes = quant_weights = 0
    values = 0
    seen: set[str] = set()
    for name, weights in layers.items():
        prefix = f"{name}." if name else ""
        for key, t in model.get_submodule(name).state_dict(prefix=prefix).items():
            seen.add(key)
            if key == f"{prefix}bias":
                values += t.numel()
            else:
                quant_bytes += t.numel() * t.element_size()
        quant_weights += weights
    values += quant_weights + sum(t.numel() for k, t in state.items() if k not in seen)
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"quantized": 8 * quant_bytes / quant_weights if quant_weights else math.nan,
            "model": 8 * total_bytes / values if values else math.nan,
            "quantized_weights": quant_weights, "values": values}


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"  # the calibration never reached this layer
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(value, spec)
    return str(value)


def format_layer_report(rows: list[dict]) -> str:
    """A plain text table of a `layer_report`, one line per layer, columns aligned."""
    header = ("layer", "type", "recipe", "kernel", "SQNR dB", "rel. error")
    lines = [header]
    for r in rows:
        lines.append((r["layer"], r["type"], r["recipe"], str(r["kernel"]), _fmt(r["sqnr_db"], ".2f"),
                      _fmt(r["rel_error"], "#.3g")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {4, 5}  # right-align numbers so the decimal points line up

    def render(cells: tuple[str, ...]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [render(lines[0]), "  ".join("-" * w for w in widths)]
    out += [render(line) for line in lines[1:]]
    return "\n".join(out)

"""The kinds of layer lowbit quantizes, and the quantized layers it saves: one registry for both.

A float kind says which modules it is (nn.Linear, nn.Embedding, nn.Conv1d/2d, transformers' `Conv1D`),
whether a recipe quantizes it, and how it looks as the torch module the builders take (transformers'
`Conv1D` stores its weight transposed, [in, out]: it is handed over as an nn.Linear sharing that weight).
A saved kind maps a quantized module class to the "type" of its checkpoint entry, the entry itself, how
to rebuild the module from entry and tensors, and its row in lowbit.summary. `lowbit.quantize` (which
layers), `lowbit.checkpoint` (save and load) and `lowbit.summary` all ask this module, so a new kind is
added here and nowhere else.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .modules import QuantEmbedding, QuantLinear, QuantModule
from .recipes import QuantConfig
from .w8a8 import FusedAct, FusedReLU, W8A8Conv, W8A8Linear


def set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at qualified name `name` inside `model` (name "" is the model itself: not settable)."""
    if not name:
        raise ValueError("the model itself cannot be replaced in place; use the returned module")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


# ---------------------------------------------------------------------------------------------------
# Float kinds: what lowbit.quantize replaces


@dataclass(frozen=True)
class FloatKind:
    """One kind of float layer a recipe may quantize."""

    name: str
    matches: Callable[[nn.Module], bool]
    quantized_by: Callable[[QuantConfig], bool]  # whether a recipe quantizes layers of this kind
    why_not: str  # said of a layer of this kind that the recipe leaves in float
    # The layer as the torch module the builders take (nn.Linear, nn.Embedding, nn.Conv1d/2d); the same
    # parameters (a view), so changes made to it (smoothing, scale folding) are changes to the layer.
    as_torch: Callable[[nn.Module], nn.Module] | None = None


def _is_transformers_conv1d(mod: nn.Module) -> bool:
    # Matched by name, not imported: lowbit does not need transformers to quantize a plain nn.Module.
    cls = type(mod)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2)


def _conv1d_as_linear(mod: nn.Module) -> nn.Linear:
    """transformers' Conv1D computes x @ W + b with W [in, out]: an nn.Linear whose weight is W.T (a view)."""
    k, n = mod.weight.shape
    lin = nn.Linear(k, n, bias=False, device="meta")
    lin.weight = nn.Parameter(mod.weight.detach().t(), requires_grad=False)
    lin.bias = mod.bias
    return lin.train(mod.training)


FLOAT_KINDS: list[FloatKind] = [
    FloatKind("linear", lambda m: isinstance(m, nn.Linear), lambda c: True, ""),
    FloatKind("transformers_conv1d", _is_transformers_conv1d, lambda c: True, "", _conv1d_as_linear),
    FloatKind("embedding", lambda m: isinstance(m, nn.Embedding), lambda c: c.embeddings,
              "the recipe leaves embeddings in float (embeddings=False)"),
    FloatKind("conv1d", lambda m: isinstance(m, nn.Conv1d), lambda c: c.act == "static",
              "convolutions are quantized only with static activations (w8a8-static and the -a8 recipes)"),
    FloatKind("conv2d", lambda m: isinstance(m, nn.Conv2d), lambda c: c.act == "static",
              "convolutions are quantized only with static activations (w8a8-static and the -a8 recipes)"),
]


def float_kind(mod: nn.Module) -> FloatKind | None:
    """The kind of a float layer, or None when lowbit does not quantize modules of its type."""
    return next((k for k in FLOAT_KINDS if k.matches(mod)), None)


def as_torch(mod: nn.Module) -> nn.Module:
    """`mod` as the torch module the builders take (itself, unless its kind stores its weight otherwise)."""
    kind = float_kind(mod)
    return kind.as_torch(mod) if kind is not None and kind.as_torch is not None else mod


# ---------------------------------------------------------------------------------------------------
# Saved kinds: quantized modules in checkpoints and summaries


@dataclass(frozen=True)
class SavedKind:
    """A module class lowbit puts into models, and its checkpoint entry ("type" names it)."""

    type: str
    cls: type[nn.Module]
    entry: Callable[[nn.Module], dict]
    # rebuild(name, entry, config, tensors under the layer's name) -> module; the tensors are consumed
    rebuild: Callable[[str, dict, QuantConfig | None, dict[str, torch.Tensor]], nn.Module]
    row: Callable[[nn.Module], dict] | None = None  # summary fields: type, shape, kernel, act_dtype, simulated


def _linear_row(m: nn.Module) -> dict:
    return {"type": "linear", "shape": (m.out_features, m.in_features), "kernel": m.kernel_name,
            "act_dtype": str(m.act_dtype).replace("torch.", ""), "simulated": m.simulated}


def _w8a8(cls: type, name: str, entry: dict, args: tuple) -> nn.Module:
    extra = ({"after_act": bool(entry.get("after_act", False)), "act_out": entry.get("act_out")}
             if cls is W8A8Linear else {})
    try:
        return cls(*args, kernel=entry["kernel"], relu=entry["relu"], **extra)
    except ValueError:
        warnings.warn(f"layer {name!r}: kernel {entry['kernel']!r} cannot run it here; using the float reference "
                      "of the same integer arithmetic (simulated, slower)", stacklevel=5)
        return cls(*args, kernel="reference", relu=entry["relu"], **extra)


def _rebuild_w8a8_linear(name: str, entry: dict, config: QuantConfig, state: dict) -> nn.Module:
    bias = state.pop("bias", None)
    return _w8a8(W8A8Linear, name, entry,
                 (entry["in_features"], entry["out_features"], config, state, bias))


def _rebuild_w8a8_conv(name: str, entry: dict, config: QuantConfig, state: dict) -> nn.Module:
    bias = state.pop("bias", None)
    geo = {k: entry[k] for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                                 "groups")}
    return _w8a8(W8A8Conv, name, entry, (geo, config, state, bias))


def _rebuild_linear(name: str, entry: dict, config: QuantConfig, state: dict) -> nn.Module:
    bias = state.pop("bias", None)
    args = (entry["in_features"], entry["out_features"], config, state, bias)
    try:
        return QuantLinear(*args, kernel=entry["kernel"])
    except ValueError:
        # Saved with a kernel this machine lacks: same weights, another kernel's rounding.
        warnings.warn(f"layer {name!r}: kernel {entry['kernel']!r} is not available here; outputs may differ in "
                      "the last bits from the saved model", stacklevel=4)
        return QuantLinear(*args, kernel="auto")


SAVED_KINDS: list[SavedKind] = [
    SavedKind("w8a8_linear", W8A8Linear,
              lambda m: {"type": "w8a8_linear", "in_features": m.in_features, "out_features": m.out_features,
                         "bias": m.bias is not None, "relu": m.relu, "config": m.config.to_dict(),
                         "kernel": m.kernel_name, "after_act": m.after_act,
                         **({"act_out": m.act_out} if m.act_out else {})},
              _rebuild_w8a8_linear, _linear_row),
    SavedKind("w8a8_conv", W8A8Conv,
              lambda m: {"type": "w8a8_conv", **m.geometry(), "bias": m.bias is not None, "relu": m.relu,
                         "config": m.config.to_dict(), "kernel": m.kernel_name},
              _rebuild_w8a8_conv,
              lambda m: {"type": f"conv{len(m.kernel_size)}d",
                         "shape": (m.out_channels, m.in_channels // m.groups, *m.kernel_size),
                         "kernel": m.kernel_name, "act_dtype": "uint8", "simulated": m.simulated}),
    SavedKind("linear", QuantLinear,
              lambda m: {"type": "linear", "in_features": m.in_features, "out_features": m.out_features,
                         "bias": m.bias is not None, "config": m.config.to_dict(), "kernel": m.kernel_name},
              _rebuild_linear, _linear_row),
    SavedKind("embedding", QuantEmbedding,
              lambda m: {"type": "embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                         "padding_idx": m.padding_idx, "config": m.config.to_dict()},
              lambda name, e, config, state: QuantEmbedding(e["num_embeddings"], e["embedding_dim"], config, state,
                                                            e["padding_idx"]),
              lambda m: {"type": "embedding", "shape": (m.num_embeddings, m.embedding_dim), "kernel": "gather",
                         "act_dtype": "-", "simulated": False}),
    # Where a ReLU stood whose work the layer before now does, and modules folded away (a BatchNorm).
    SavedKind("fused_relu", FusedReLU, lambda m: {"type": "fused_relu"}, lambda name, e, c, s: FusedReLU()),
    SavedKind("fused_act", FusedAct, lambda m: {"type": "fused_act"}, lambda name, e, c, s: FusedAct()),
    SavedKind("identity", nn.Identity, lambda m: {"type": "identity"}, lambda name, e, c, s: nn.Identity()),
]
SAVED_BY_TYPE = {k.type: k for k in SAVED_KINDS}
_SAVED_BY_CLASS = {k.cls: k for k in SAVED_KINDS}


def saved_kind(mod: nn.Module) -> SavedKind | None:
    """The saved kind of a module (its class or the nearest registered base class), or None."""
    for cls in type(mod).__mro__:
        if cls in _SAVED_BY_CLASS:
            return _SAVED_BY_CLASS[cls]
    if isinstance(mod, QuantModule):
        raise TypeError(f"{type(mod).__name__} is a quantized layer with no checkpoint form: register a SavedKind "
                         "in lowbit.layers")
    return None


def layer_entry(mod: nn.Module) -> dict:
    """The checkpoint entry of one module of a saved kind."""
    kind = saved_kind(mod)
    if kind is None:
        raise ValueError(f"{type(mod).__name__} has no checkpoint form")
    entry = kind.entry(mod)
    if isinstance(mod, QuantModule) and mod.float_dtype != torch.float32:
        entry["dtype"] = str(mod.float_dtype).replace("torch.", "")
    if getattr(mod, "lowbit_note", None):  # why the layer's format is not the recipe's (lowbit.summary shows it)
        entry["note"] = mod.lowbit_note
    return entry


def rebuild(name: str, entry: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The module a checkpoint entry describes, from the tensors stored under its name (consumed).
    ValueError for a type this lowbit does not know (a newer checkpoint, or a damaged one)."""
    kind = SAVED_BY_TYPE.get(entry.get("type"))
    if kind is None:
        raise ValueError(f"unknown layer type {entry.get('type')!r}; this lowbit knows "
                         + ", ".join(SAVED_BY_TYPE))
    config = QuantConfig.from_dict(entry["config"]) if "config" in entry else None
    mod = kind.rebuild(name, entry, config, state)
    if isinstance(entry.get("note"), str):
        mod.lowbit_note = entry["note"]
    if "dtype" in entry:
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {entry['dtype']!r}")
        mod.float_dtype = dtype
    return mod


def summary_row(mod: nn.Module) -> dict | None:
    """Summary fields of a quantized layer (type, shape, kernel, act_dtype, simulated), or None."""
    kind = saved_kind(mod)
    return None if kind is None or kind.row is None else kind.row(mod)


def weight_count(mod: QuantModule) -> int:
    """How many weights a quantized layer stands for (its float weight's numel)."""
    return int(torch.Size(mod.float_weight_shape()).numel())

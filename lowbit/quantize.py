"""The one verb: lowbit.quantize(model, recipe)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn
from tqdm.auto import tqdm

from .modules import QuantEmbedding, QuantLinear
from .recipes import QuantConfig, parse_recipe


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    # A pattern is a glob on the qualified name ("*.attention.*"), or a name prefix ("encoder.layer.0").
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def targets(model: nn.Module, config: QuantConfig, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a recipe would replace, in module order."""
    exclude = tuple(exclude)
    found = []
    for name, mod in model.named_modules():
        if not name or _excluded(name, exclude):
            continue
        if isinstance(mod, nn.Linear) or (config.embeddings and isinstance(mod, nn.Embedding)):
            found.append((name, mod))
    return found


def quantize(model: nn.Module, recipe: str | QuantConfig, *, calibration: Iterable | None = None,
             exclude: Iterable[str] = (), kernel: str = "auto", progress: bool = False) -> nn.Module:
    """Quantize `model` in place by `recipe` and return it.

    Every nn.Linear (and nn.Embedding, unless the config says `embeddings=False`) whose qualified name
    matches no pattern in `exclude` is replaced by its quantized counterpart. `kernel` picks the matmul
    kernel ("auto": the fastest that supports the layer on this machine). `calibration` is accepted for
    the data-driven methods; round-to-nearest does not need it.
    """
    config = parse_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    todo = targets(model, config, exclude)
    if not todo:
        raise ValueError("found no nn.Linear or nn.Embedding to quantize (check `exclude`)")
    for name, mod in tqdm(todo, desc=f"quantize {config.name}", disable=not progress, unit="layer"):
        try:
            if isinstance(mod, nn.Linear):
                new = QuantLinear.from_float(mod, config, kernel)
            else:
                new = QuantEmbedding.from_float(mod, config)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        _set_child(model, name, new)
    model.lowbit_recipe = config  # read back by save() and summary()
    return model


def summary(model: nn.Module) -> list[dict]:
    """One row per quantized layer: name, recipe, kernel, activation dtype and whether it is simulated."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            rows.append({"layer": name, "type": "linear", "shape": (mod.out_features, mod.in_features),
                         "recipe": mod.config.name, "kernel": mod.kernel_name,
                         "act_dtype": str(mod.act_dtype).replace("torch.", ""), "simulated": mod.simulated})
        elif isinstance(mod, QuantEmbedding):
            rows.append({"layer": name, "type": "embedding", "shape": (mod.num_embeddings, mod.embedding_dim),
                         "recipe": mod.config.name, "kernel": "gather", "act_dtype": "-",
                         "simulated": False})
    return rows

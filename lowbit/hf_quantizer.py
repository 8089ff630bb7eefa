"""Hugging Face `save_pretrained` / `from_pretrained` of lowbit-quantized transformers models.

`lowbit.quantize` (and `lowbit.load`) record on a transformers model's config a `quantization_config`
with `quant_method: "lowbit"`: the checkpoint format version, the recipe and each quantized layer's
checkpoint entry (lowbit.layers.layer_entry). `model.save_pretrained(dir)` then writes it into
config.json and the layers' packed codes, scales and zero points into model.safetensors, as for any
other model. `AutoModel...from_pretrained(dir)` finds "lowbit" in transformers' quantizer registry:
the quantizer replaces each recorded layer of the freshly built model by the lowbit layer rebuilt from
its entry and its tensors (exactly as lowbit.load does), transformers loads the tensors, and the layers
derive their kernels' forms again from what was loaded.

lowbit does not need transformers: nothing here imports it at module level. The config and quantizer
classes (subclasses of transformers' own) are made and registered the first time they are needed:
when lowbit is imported after transformers' quantizer registry, when that registry is imported after
lowbit (an import hook), or when lowbit.quantize / lowbit.load handle a transformers model.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import attention, layers
from .modules import QuantModule
from .recipes import recipe_fields, recipe_from_fields
from .version import FORMAT_VERSION
from .version import __version__ as LOWBIT_VERSION

QUANT_METHOD = "lowbit"
_REGISTRY = "transformers.quantizers.auto"
_lock = threading.RLock()
_classes: tuple[type, type] | None = None


def is_transformers_model(model: Any) -> bool:
    """Whether `model` is a transformers PreTrainedModel (judged by its classes: transformers is not imported)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def _record(model: nn.Module) -> dict:
    """The quantization_config fields describing `model`'s lowbit layers as they are now."""
    recipe = getattr(model, "lowbit_recipe", None)
    return {
        "format_version": FORMAT_VERSION,
        "lowbit_version": LOWBIT_VERSION,
        **recipe_fields(recipe),
        "layers": {name: layers.layer_entry(m) for name, m in model.named_modules()
                   if layers.saved_kind(m) is not None},
        "float_layers": list(getattr(model, "lowbit_float_layers", [])),
        "slower_layers": list(getattr(model, "lowbit_slower_layers", [])),
        "unquantized_layers": list(getattr(model, "lowbit_unquantized_layers", [])),
    }


@contextlib.contextmanager
def _plain_defaults() -> Iterator[None]:
    """Tensors made while rebuilding layers go to the CPU in float32: from_pretrained builds the model
    under a meta-device and model-dtype default, which the layers' derived kernel forms must not take."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _read_layer_tensors(files: list[str], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: {tensor name: tensor}} for the layers `names`, read from safetensors `files` (only the
    tensors directly under each layer's name)."""
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: lowbit-quantized models are saved as safetensors; cannot read this file")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys()  # a method of safe_open, which is not iterable itself
            for key in names:
                owner, _, leaf = key.rpartition(".")
                if owner in wanted:
                    found[owner][leaf] = f.get_tensor(key)
    return found


def _locate(model: nn.Module, name: str) -> str | None:
    """`name` (as saved) in `model`: itself, or with the base model's prefix added or removed (a base model
    saved on its own and loaded with a head, or the other way round)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for candidate in (name, f"{prefix}.{name}" if prefix else None,
                      name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
        if candidate is None:
            continue
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _rebuild_layers(model: nn.Module, entries: dict[str, dict], files: list[str] | None) -> None:
    if not files:
        raise ValueError("loading a lowbit-quantized model needs its safetensors files (from_pretrained(folder)); "
                         "a state_dict alone does not say how the layers were built")
    state = _read_layer_tensors(list(files), list(entries))
    with _plain_defaults():
        for saved, entry in entries.items():
            name = _locate(model, saved)
            if name is None:
                raise ValueError(f"the lowbit quantization_config names layer {saved!r}, which "
                                 f"{type(model).__name__} does not have")
            if not state[saved] and entry.get("type") not in ("fused_relu", "fused_act", "identity"):
                raise ValueError(f"layer {saved!r}: the checkpoint files hold none of its tensors "
                                 f"({', '.join(str(f) for f in files)})")
            try:
                new = layers.rebuild(saved, entry, dict(state[saved]))
            except (KeyError, RuntimeError, ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"layer {saved!r} cannot be rebuilt from the checkpoint: {e}") from None
            layers.set_child(model, name, new)
    _untie(model)


def _untie(model: nn.Module) -> None:
    """Forget transformers' weight tying where a side is now a lowbit layer (an embedding and an LM head
    quantized each on its own are separate layers): transformers would otherwise look for, and tie, a
    `weight` parameter those layers do not have."""
    quantized = {n for n, m in model.named_modules() if layers.saved_kind(m) is not None}
    for prefix, sub in model.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        at = prefix + "." if prefix else ""
        for target, source in list(tied.items()):
            if any(at + key.rpartition(".")[0] in quantized for key in (target, source)):
                del tied[target]


def _finish(model: nn.Module, record: dict) -> None:
    """After transformers has put the saved tensors into the layers: derive each layer's kernel form from
    them (they may have been assigned, not copied through load_state_dict), and restore what lowbit
    keeps on a quantized model."""
    for m in model.modules():
        if isinstance(m, QuantModule):
            m._derive()
    recipe = recipe_from_fields(record)
    if recipe is not None:
        model.lowbit_recipe = recipe
        attention.apply(model, recipe.attention)
    model.lowbit_float_layers = list(record.get("float_layers") or [])
    model.lowbit_slower_layers = list(record.get("slower_layers") or [])
    model.lowbit_unquantized_layers = list(record.get("unquantized_layers") or [])


def _make_classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitConfig(QuantizationConfigMixin):
        """transformers' view of a lowbit quantization: what lowbit.save's manifest says of the layers."""

        def __init__(self, format_version: int = FORMAT_VERSION, layers: dict | None = None,
                     recipe: str | None = None, config: dict | None = None, float_layers: list | None = None,
                     slower_layers: list | None = None, unquantized_layers: list | None = None,
                     lowbit_version: str | None = None, quant_method: str = QUANT_METHOD,
                     layer_recipe: dict | None = None, **unknown: Any):
            if quant_method != QUANT_METHOD:
                raise ValueError(f"LowbitConfig takes quant_method {QUANT_METHOD!r}, got {quant_method!r}")
            if format_version != FORMAT_VERSION:
                raise ValueError(f"the lowbit quantization_config has format version {format_version} (written by "
                                 f"lowbit {lowbit_version}); this lowbit ({LOWBIT_VERSION}) reads version "
                                 f"{FORMAT_VERSION}")
            if unknown:
                raise ValueError(f"the lowbit quantization_config has fields this lowbit does not know: "
                                 f"{', '.join(sorted(unknown))}")
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.lowbit_version = lowbit_version
            self.recipe = recipe
            self.config = config
            self.layers = dict(layers or {})
            self.float_layers = list(float_layers or [])
            self.slower_layers = list(slower_layers or [])
            self.unquantized_layers = list(unquantized_layers or [])
            self.layer_recipe = layer_recipe  # a per-layer recipe (lowbit.recipes.LayerRecipe), or None

        @classmethod
        def of(cls, model: nn.Module) -> LowbitConfig:
            return cls(**_record(model))

        def refresh(self, model: nn.Module) -> None:
            """Describe `model`'s layers as they are now (a kernel may have been changed since quantize)."""
            self.__dict__.update(_record(model))

    class LowbitHfQuantizer(HfQuantizer):
        """Rebuilds lowbit's layers in a model transformers builds from a lowbit-saved folder."""

        requires_calibration = True  # loads lowbit-quantized folders; quantizing on load is lowbit.quantize's job

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            _rebuild_layers(model, self.quantization_config.layers, checkpoint_files)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _finish(model, self.quantization_config.__dict__)
            return model

        def get_state_dict_and_metadata(self, model):
            # save_pretrained asks this before writing config.json: describe the layers as they are now.
            self.quantization_config.refresh(model)
            model.config.quantization_config = self.quantization_config
            return None, {}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (LowbitConfig, LowbitHfQuantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LowbitConfig, LowbitHfQuantizer


def register() -> tuple[type, type]:
    """Make LowbitConfig and LowbitHfQuantizer (importing transformers) and register them under "lowbit" in
    transformers' quantizer registry, once. Returns (LowbitConfig, LowbitHfQuantizer)."""
    global _classes
    with _lock:
        if _classes is None:
            from transformers.quantizers import auto

            config_cls, quantizer_cls = _make_classes()
            # Another copy of lowbit (a reloaded module) may have registered first: this one takes over.
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
            auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
            auto.register_quantization_config(QUANT_METHOD)(config_cls)
            auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
            globals().update(LowbitConfig=config_cls, LowbitHfQuantizer=quantizer_cls)  # picklable by name
            _classes = (config_cls, quantizer_cls)
        return _classes


def attach(model: nn.Module) -> None:
    """Record the lowbit quantization on a transformers model (its config's quantization_config, and the
    quantizer save_pretrained asks), as from_pretrained leaves a loaded one. Other models: nothing."""
    if not is_transformers_model(model) or getattr(model, "config", None) is None:
        return
    config_cls, quantizer_cls = register()
    _untie(model)
    qconfig = config_cls.of(model)
    model.config.quantization_config = qconfig
    model.hf_quantizer = quantizer_cls(qconfig, pre_quantized=True)


def is_lowbit_config(value: Any) -> bool:
    """Whether a config's quantization_config (object or dict) is lowbit's."""
    if isinstance(value, dict):
        return value.get("quant_method") == QUANT_METHOD
    return getattr(value, "quant_method", None) == QUANT_METHOD


# ---------------------------------------------------------------------------------------------------
# Registration when transformers' quantizer registry is imported after lowbit


class _Loader(importlib.abc.Loader):
    """The registry module's own loader, registering lowbit's classes once the module has run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _Hook(importlib.abc.MetaPathFinder):
    """Watches for the import of transformers' quantizer registry (and nothing else)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once: the finders below find the module itself
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register with transformers now if its quantizer registry is already imported, else when it is."""
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


__all__ = ["QUANT_METHOD", "attach", "install", "is_lowbit_config", "is_transformers_model", "register"]

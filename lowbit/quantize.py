"""The one verb: lowbit.quantize(model, recipe); and the plan and build steps it shares with lowbit.stream.

A quantization is planned first (`plan`: which layers, the config of each, which ReLUs fuse, how kernels
are chosen), before any weight changes; then a `Builder` turns the planned float layers into quantized
ones and chooses each one's kernel, measured on this machine. lowbit.quantize runs the plan on a model in
memory; lowbit.stream runs the same plan and build one block at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import attention, autotune, fit, hf_quantizer, layers
from .backends import KERNELS, format_route
from .core.observers import make_observer
from .layers import set_child
from .modules import QuantEmbedding, QuantLinear, QuantModule
from .progress import progress_bar
from .recipes import LayerRecipe, QuantConfig, Recipe, name_matches, read_recipe
from .sequential import call_model, feed, real_tokens, stages
from .w8a8 import FusedAct, FusedReLU, W8A8Conv, W8A8Linear

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
# Fewer samples than this cannot give ranges worth fixing into a model.
MIN_CALIBRATION_SAMPLES = 8
# Rows a linear layer is timed at when no calibration data shows the real number: weight-only formats
# pay off when decoding (one row); activation quantization on prompts and batches.
DEFAULT_ROWS = {None: 1, "dynamic": 128, "static": 128}


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    # A pattern is a glob on the qualified name ("*.attention.*"), or a name prefix ("encoder.layer.0").
    return any(name_matches(name, p) for p in patterns)


def config_of(recipe: QuantConfig | LayerRecipe, name: str) -> QuantConfig | None:
    """The config `recipe` gives layer `name` (None: the recipe keeps it float)."""
    return recipe.config_for(name) if isinstance(recipe, LayerRecipe) else recipe


def lead_config(recipe: QuantConfig | LayerRecipe) -> QuantConfig:
    """The config that decides for the whole model: activations, attention (LayerRecipe.lead)."""
    return recipe.lead if isinstance(recipe, LayerRecipe) else recipe




def mha_out_projs(model: nn.Module) -> set[str]:
    # nn.MultiheadAttention reads its out_proj weight directly instead of calling it: leave it alone.
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def targets(model: nn.Module, recipe: QuantConfig | LayerRecipe,
            exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a recipe would replace, in module order: the layers of the kinds in
    lowbit.layers that the recipe (for a per-layer recipe, the layer's own) takes. ("", model) when the
    model itself is such a layer."""
    exclude = tuple(exclude)
    skip = mha_out_projs(model)
    found = []
    for name, mod in model.named_modules():
        if name in skip or (name and _excluded(name, exclude)):
            continue
        kind = layers.float_kind(mod)
        config = config_of(recipe, name) if kind is not None else None
        if config is not None and kind.quantized_by(config):
            found.append((name, mod))
    return found


# A causal LM's input embeddings and LM head under a weight-only recipe narrower than this: kept at int8
# instead (see EDGE_NOTE). A per-layer recipe that names them decides for itself.
EDGE_RECIPE = "int8"
EDGE_NOTE = ("a causal LM's input embeddings and LM head stay at int8 under recipes below 8 bits (lowbit's small "
             "LM under int3-g128-gptq: perplexity x1.0050 with them at 3 bits, x1.0003 at int8, x1.0001 in "
             "float); a per-layer recipe ({'lm_head': ..., '*': ...}) sets them")


def lm_edges(model: nn.Module) -> list[str]:
    """Qualified names of a causal LM's input embedding table and LM head (transformers' accessors), or []."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out) and hasattr(model, "generate")):
        return []
    try:
        mods = {id(m) for m in (get_in(), get_out()) if isinstance(m, nn.Module)}
    except (AttributeError, NotImplementedError):
        return []
    return [n for n, m in model.named_modules() if id(m) in mods]


def _narrow(config: QuantConfig) -> bool:
    return config.act is None and config.kind != "float" and config.bits < 8


def _kept_float_by_rule(recipe: LayerRecipe, name: str) -> str:
    rule = recipe.rule_for(name)
    if rule is None:
        return "no pattern of the per-layer recipe matches it"
    return f"the per-layer recipe keeps it float (pattern {rule[0]!r})"


def left_in_float(model: nn.Module, recipe: QuantConfig | LayerRecipe, chosen: Iterable[str],
                  exclude: Iterable[str] = ()) -> list[dict]:
    """The layers holding a weight matrix that the recipe leaves in float, other than those `exclude` names
    (which the caller asked for): each {"layer", "type", "weights", "reason"}."""
    exclude, chosen = tuple(exclude), set(chosen)
    skip = mha_out_projs(model)
    notes = []
    for name, mod in model.named_modules():
        if name in chosen or (name and _excluded(name, exclude)):
            continue
        weights = sum(p.numel() for n, p in mod.named_parameters(recurse=False) if n.endswith("weight") and p.dim() >= 2)
        if not weights:
            continue
        kind = layers.float_kind(mod)
        if name in skip:
            reason = "nn.MultiheadAttention reads this weight directly instead of calling the layer"
        elif kind is not None and isinstance(recipe, LayerRecipe) and recipe.config_for(name) is None:
            reason = _kept_float_by_rule(recipe, name)
            if recipe.rule_for(name) is not None:  # asked for by name, as `exclude` is: listed, not warned of
                notes.append({"layer": name, "type": type(mod).__name__, "weights": weights, "reason": reason,
                              "asked": True})
                continue
        elif kind is not None:
            reason = kind.why_not
        else:
            reason = f"{type(mod).__name__} is not a layer kind lowbit quantizes (lowbit.layers lists them)"
        notes.append({"layer": name, "type": type(mod).__name__, "weights": weights, "reason": reason})
    return notes


class _LayerStats:
    def __init__(self, observer) -> None:
        self.observer = observer
        self.shape: tuple[int, ...] | None = None  # the largest input seen
        self.calls = 0
        self.after_act = 0  # calls whose input was an elementwise activation module's output


# Elementwise activation modules (torch's and transformers'): see LayerSpec.after_act.
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus)


def _is_activation(mod: nn.Module) -> bool:
    return isinstance(mod, _ACTIVATIONS) or type(mod).__module__ == "transformers.activations"


def after_activation(st: _LayerStats | None) -> bool:
    """Whether every calibration call of a layer took an elementwise activation module's output as it is."""
    return st is not None and st.calls > 0 and st.after_act == st.calls


def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], calibration: Iterable,
              observer: str | None, progress: bool = False) -> dict[str, _LayerStats]:
    """Run the calibration data through the float model, recording each layer's input shape and, when
    `observer` names one, the statistics of its input."""
    if isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError("calibration must be an iterable of model inputs (e.g. a list of batches), "
                        "not a single tensor or dict")
    stats = {name: _LayerStats(make_observer(observer) if observer else None) for name, _ in layers}

    # The latest output of each activation module, held weakly: a layer whose input is one of them takes
    # that activation's output directly (only an identity like eval-mode dropout in between).
    latest: dict[int, weakref.ref] = {}

    def act_hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            latest[id(mod)] = weakref.ref(out)

    def hook_for(st: _LayerStats):
        def hook(mod, args):
            x = args[0]
            if st.shape is None or x.numel() > torch.Size(st.shape).numel():
                st.shape = tuple(x.shape)
            st.calls += 1
            st.after_act += any(ref() is x for ref in latest.values())
            if st.observer is not None:
                st.observer.update(real_tokens(x.detach()))  # padded positions left out
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(stats[name])) for name, mod in layers]
    handles += [m.register_forward_hook(act_hook) for m in model.modules() if _is_activation(m)]
    batches, samples = feed(model, calibration, handles, progress=progress)
    if batches == 0:
        raise ValueError("calibration data is empty: pass an iterable of model inputs (tensors, tuples or dicts)")
    if samples < MIN_CALIBRATION_SAMPLES:
        raise ValueError(f"calibration data is too small: {samples} sample(s) in {batches} batch(es); "
                         f"need at least {MIN_CALIBRATION_SAMPLES} (a few hundred is typical)")
    if observer:
        unseen = [name for name, st in stats.items() if st.calls == 0]
        if unseen:
            raise ValueError(f"{len(unseen)} layer(s) received no input during calibration, so their activation "
                             f"ranges are unknown: {', '.join(unseen[:10])}; exclude them or use other data")
    return stats


def gelu_chains(model: nn.Module, batch: Any, names: set[str]) -> list[tuple[str, str, str]]:
    """(up, act, down): linears of `names` with an exact GELU module between them, where nothing but the
    GELU reads the up-projection's output and nothing but the down-projection reads the GELU's, as
    torch.export's graph of `model` on one calibration batch shows. The up-projection can then hand the
    down-projection int8 codes (W8A8Linear.act_out). [] when the model does not export."""
    args, kwargs = ((), dict(batch)) if isinstance(batch, dict) else (
        ((batch,), {}) if isinstance(batch, torch.Tensor) else (tuple(batch), {}))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            graph = torch.export.export(model, args, kwargs, strict=False).graph
    except Exception:  # noqa: BLE001 - a model that does not export keeps its GELUs as they are
        return []

    def owner(node) -> str | None:  # the innermost module a node of the graph was traced in
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    ops_of: dict[str | None, int] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            ops_of[owner(node)] = ops_of.get(owner(node), 0) + 1
    linear, gelu = torch.ops.aten.linear.default, torch.ops.aten.gelu.default
    chains = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not gelu:
            continue
        if node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") != "none":
            continue
        up_node, readers = node.args[0], list(node.users)
        if (getattr(up_node, "target", None) is not linear or len(up_node.users) != 1 or len(readers) != 1
                or readers[0].target is not linear or readers[0].args[0] is not node):
            continue
        up, act, down = owner(up_node), owner(node), owner(readers[0])
        # Each module traced once and doing only this: the act module is the GELU and nothing else.
        if (up in names and down in names and act is not None and act not in (up, down)
                and ops_of.get(act) == 1 and ops_of.get(up) == 1 and ops_of.get(down) == 1):
            chains.append((up, act, down))
    return chains


def _trace(model: nn.Module):
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - a model that does not trace just gets no graph rewrites
        return None


def _skip_identity(node, modules: dict):
    # Folded BatchNorms leave nn.Identity modules between a conv and its ReLU: look through them.
    while (node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity)
           and len(node.users) == 1):
        node = next(iter(node.users))
    return node


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm1d/2d whose input is a Conv1d/2d used only by it; in place.
    Returns how many were folded. Found by FX tracing; a model that does not trace is left as it is."""
    from .surgery import fold_conv_bn

    gm = _trace(model)
    if gm is None or model.training:
        return 0
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, CONV_TYPES) or len(node.users) != 1 or calls[node.target] != 1:
            continue
        user = next(iter(node.users))
        bn = modules.get(user.target) if user.op == "call_module" else None
        if (isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and calls[user.target] == 1
                and bn.track_running_stats and bn.running_mean is not None):
            fold_conv_bn(model.get_submodule(node.target), model.get_submodule(user.target))
            set_child(model, user.target, nn.Identity())
            folded += 1
    return folded


def _relu_fusions(model: nn.Module, names: set[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Layers whose only consumer is a ReLU (to fuse it), and for each ReLU module whose every call
    follows such a layer, the layers feeding it (it can become Identity if they all end up quantized).
    Found by FX-tracing the model; a model that does not trace gets no fusion."""
    gm = _trace(model)
    if gm is None:
        return set(), {}
    modules = dict(gm.named_modules())

    def is_relu(node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), nn.ReLU)
        if node.op == "call_function":
            return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
        return node.op == "call_method" and node.target in ("relu", "relu_")

    fuse = set()
    for node in gm.graph.nodes:
        if (node.op == "call_module" and node.target in names and len(node.users) == 1
                and is_relu(_skip_identity(next(iter(node.users)), modules))):
            fuse.add(node.target)
    sources: dict[str, set[str] | None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU):
            src = node.args[0] if node.args else None
            while (getattr(src, "op", None) == "call_module" and isinstance(modules.get(src.target), nn.Identity)
                   and src.args):
                src = src.args[0]
            ok = getattr(src, "op", None) == "call_module" and src.target in fuse
            prev = sources.get(node.target, set())
            sources[node.target] = (prev | {src.target}) if (ok and prev is not None) else None
    return fuse, {name: src for name, src in sources.items() if src}


def _build(mod: nn.Module, config: QuantConfig, st: _LayerStats | None, relu: bool, kernel: str,
           fixed: dict | None = None, **encode) -> nn.Module:
    # `fixed`: this layer's quantization parameters chosen beforehand (see quantize's `fixed`), used
    # instead of new ones: the weight's scale / zero_point go to its format's encoder.
    fixed = fixed or {}
    weight = {k: fixed[k] for k in ("scale", "zero_point") if k in fixed}
    if isinstance(mod, nn.Embedding):
        return QuantEmbedding.from_float(mod, config, **weight)
    if config.act is None:
        return QuantLinear.from_float(mod, config, kernel, **weight, **encode)
    act = fixed.get("act")
    if config.act == "static" and act is None:
        scale, zero = st.observer.qparams()
        act = (float(scale), int(zero))
    if isinstance(mod, nn.Linear):
        return W8A8Linear.from_float(mod, config, act, kernel, relu, after_act=after_activation(st), **weight)
    return W8A8Conv.from_float(mod, config, act, kernel, relu, **weight)


def _timing_key(mod: nn.Module, new: nn.Module, config: QuantConfig, shape: tuple[int, ...]) -> str:
    if isinstance(mod, nn.Linear):
        geo = f"linear n={mod.out_features} k={mod.in_features} bias={mod.bias is not None}"
    else:
        geo = f"conv {sorted(W8A8Conv.conv_args(mod).items())}"
    dtype = mod.weight.dtype
    at = "" if dtype == torch.float32 else f"|dtype={str(dtype).replace('torch.', '')}"
    return f"{config.name}|{geo}|relu={getattr(new, 'relu', False)}|input={list(shape)}{at}"


def _contenders(new: nn.Module, keep_float: bool) -> list[str]:
    """The kernels worth timing for a layer. A simulated kernel does the float layer's matmul and more, so
    it cannot beat float: when the layer goes back to float unless a kernel beats it, and a real kernel
    exists, timing a simulated one is wasted."""
    names = new.candidate_kernels()
    if keep_float:
        real = [n for n in names if not KERNELS[n].simulated]
        names = real or names
    return names


def _variant(new: nn.Module, name: str) -> nn.Module:
    variant = copy.copy(new)  # shares the canonical buffers; only the packed form differs
    variant._buffers = dict(new._buffers)
    variant.set_kernel(name)
    return variant


def _tune(tuner: autotune.Tuner, mod: nn.Module, new: nn.Module, config: QuantConfig,
          shape: tuple[int, ...], keep_float: bool = False) -> dict[str, float]:
    """Seconds per call of each kernel the quantized layer can use, and of the float layer, at `shape`, on
    inputs of the float layer's dtype (a bf16 model's layers see bf16 inputs)."""

    def measure() -> dict[str, float]:
        x = torch.randn(shape, dtype=mod.weight.dtype)
        if x.dim() == 4:  # the int8 convolutions produce channels_last; later layers see that layout
            x = x.contiguous(memory_format=torch.channels_last)
        fns = {}
        for name in names:
            variant = _variant(new, name)
            fns[name] = lambda v=variant: v(x)
        fns[autotune.FLOAT] = lambda: mod(x)
        return autotune.time_calls(fns)

    names = _contenders(new, keep_float)
    # The kernels timed are part of the key: a cache from before a kernel existed is not reused without it.
    return tuner.timings(_timing_key(mod, new, config, shape) + f"|kernels={','.join(names)}", measure)


def _tune_rows(tuner: autotune.Tuner, mod: nn.Linear, new: QuantLinear, keep_float: bool) -> dict[str, dict[str, float]]:
    """{rows: {kernel or float: seconds per call}} at autotune.tune_rows, for a weight-only linear.
    Keyed by what the kernels see (the weight format's LayerSpec, bias, input scale, input dtype), not by
    the recipe: recipes that differ only in how they choose the weights share one measurement."""
    dtype = mod.weight.dtype
    at = "" if dtype == torch.float32 else f"|dtype={str(dtype).replace('torch.', '')}"
    names = _contenders(new, keep_float)
    rows = autotune.tune_rows(mod.out_features, mod.in_features)
    key = (f"rows={','.join(map(str, rows))}|{new.spec}|bias={mod.bias is not None}"
           f"|input_scale={'input_scale' in new._buffers}{at}|kernels={','.join(names)}")

    def measure() -> dict[str, dict[str, float]]:
        variants = {name: _variant(new, name) for name in names}

        def make_fns(rows: int) -> dict:
            x = torch.randn(rows, mod.in_features, dtype=dtype)
            # Kernels for many rows are not timed where a GEMV must win (Kernel.min_rows).
            fns = {name: (lambda v=v: v(x)) for name, v in variants.items()
                   if rows >= getattr(KERNELS[name], "min_rows", 1)}
            fns[autotune.FLOAT] = lambda: mod(x)
            return fns

        return autotune.time_rows(make_fns, rows)

    return tuner.timings(key, measure)


def route_for(tuner: autotune.Tuner, mod: nn.Linear, new: QuantLinear,
              keep_float: bool = False) -> tuple[dict[str, dict[str, float]], list[tuple[int | None, str]]]:
    """The kernel timings of a weight-only linear at autotune.tune_rows ({rows: {kernel: s}}, `mod` the
    float layer timed beside them) and the route of fastest kernels by row count they give."""
    by_rows = _tune_rows(tuner, mod, new, keep_float)
    forms = {k: getattr(KERNELS[k], "form", k) for t in by_rows.values() for k in t if k in KERNELS}
    return by_rows, autotune.row_route(by_rows, forms, new.candidate_kernels())


# ---------------------------------------------------------------------------------------------------
# The plan and the build step (shared with lowbit.stream)


@dataclass
class Plan:
    """What quantizing a model will do, decided before any weight changes (names only: no modules held)."""

    config: QuantConfig  # the recipe; for a per-layer recipe its lead config (activations, attention)
    layers: list[str]  # qualified names of the layers to quantize, in module order ("" is the model itself)
    configs: dict[str, QuantConfig]  # each layer's config: the recipe's, unless a caller narrows it
    backend: str = "auto"  # "auto": time every kernel that can run a layer; else that kernel
    # with "auto": leave a layer float when no kernel beats float (None: yes for layers quantizing
    # activations, whose point is speed; no for weight-only ones, whose point is size)
    keep_float_if_slower: bool | None = False
    fuse: set[str] = field(default_factory=set)  # layers that compute the ReLU after them
    drop_relus: dict[str, set[str]] = field(default_factory=dict)  # ReLU -> layers that fuse it
    # per layer, quantization parameters chosen beforehand (lowbit.qat's learned ones; see quantize's `fixed`)
    fixed: dict[str, dict] = field(default_factory=dict)
    left_float: list[dict] = field(default_factory=list)  # other layers with weights, left float, and why
    weights: int = 0  # weights in the model's layers, quantized or not (a share of which left_float holds)
    recipe: QuantConfig | LayerRecipe | None = None  # what the user asked for (None: `config`)
    notes: dict[str, str] = field(default_factory=dict)  # layers whose format lowbit chose over the recipe's, why

    def config_for(self, name: str) -> QuantConfig:
        return self.configs.get(name, self.config)

    def keep_float(self, name: str) -> bool:
        if self.keep_float_if_slower is None:
            return self.config_for(name).act is not None
        return self.keep_float_if_slower

    def all_configs(self) -> list[QuantConfig]:
        """The distinct configs of the planned layers (the lead config when there are none)."""
        out: list[QuantConfig] = []
        for c in self.configs.values():
            if c not in out:
                out.append(c)
        return out or [self.config]

    def layers_by(self, pred) -> list[str]:
        return [n for n in self.layers if pred(self.config_for(n))]


def plan(model: nn.Module, recipe: Recipe, exclude: Iterable[str] = (), backend: str = "auto",
         keep_float_if_slower: bool | None = None, fixed: dict[str, dict] | None = None) -> Plan:
    """Which layers of `model` a recipe (one for all layers, or per layer pattern: lowbit.recipes) quantizes,
    with which config, which ReLUs fuse into them, and how their kernels are chosen. Raises ValueError
    when there is nothing to quantize or a layer cannot be."""
    recipe = read_recipe(recipe)
    config = lead_config(recipe)
    todo = targets(model, recipe, exclude)
    if not todo:
        raise ValueError("found no layer to quantize (nn.Linear, nn.Embedding, transformers' Conv1D, or "
                         "convolutions for static recipes); check `exclude`")
    for name, mod in todo:
        if isinstance(mod, CONV_TYPES):
            try:
                W8A8Conv.conv_args(mod)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}; exclude it to keep it in float") from None
    names = [n for n, _ in todo]
    unknown = sorted(set(fixed or {}) - set(names))
    if unknown:
        names_ = ", ".join(unknown[:10])
        raise ValueError(f"fixed parameters for layers the recipe does not quantize: {names_}")
    configs = {n: config_of(recipe, n) for n in names}
    notes = {}
    if isinstance(recipe, QuantConfig) and _narrow(recipe):
        for n in lm_edges(model):
            if n in configs:
                configs[n], notes[n] = read_recipe(EDGE_RECIPE), EDGE_NOTE
    with_act = {n for n in names if configs[n].act is not None}
    fuse, drop_relus = _relu_fusions(model, with_act) if with_act else (set(), {})
    # keep_float_if_slower None: activation quantization is for speed (kept float when slower); weight-only
    # formats are for size, kept even when slower. Decided per layer (Plan.keep_float).
    return Plan(config=config, layers=names, configs=configs, backend=backend,
                keep_float_if_slower=keep_float_if_slower, fuse=fuse, drop_relus=drop_relus,
                fixed={n: f for n, f in (fixed or {}).items() if f},
                left_float=left_in_float(model, recipe, names, exclude),
                weights=sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2),
                recipe=recipe, notes=notes)


def _speedups(notes: list[dict]) -> str:
    lo, hi = (f"{f(n['speedup'] for n in notes):.2f}x" for f in (min, max))
    return lo if lo == hi else f"{lo}-{hi}"


class Builder:
    """Turns a plan's float layers into quantized ones in `model` and chooses each one's kernel.

    `model` is the model being quantized; when the model itself is the planned layer it is replaced, so
    read `builder.model` at the end. Layers are built with `build` (fitting methods pass their encoding
    options) and put in place, timed and kept or given back to float by `install`."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model, self.plan = model, plan
        self.tuner = autotune.Tuner() if plan.backend == "auto" else None
        self.stats: dict[str, _LayerStats] = {}  # from calibration: activation observers and input shapes
        self.shapes: dict[str, tuple[int, ...]] = {}  # the largest input each layer was seen with
        self.originals: dict[str, nn.Module] = {}  # float layers that were put in torch's layout
        self.built: dict[str, nn.Module] = {}  # built and put in place, kernel not chosen yet
        self.kept: list[dict] = []  # kept in float: faster than every kernel
        self.slower: list[dict] = []  # quantized, slower than float
        self.installed: set[str] = set()
        self.relus_done: set[str] = set()
        self.gelu_chains: list[tuple[str, str, str]] = []  # from calibration (gelu_chains)
        self.fit_notes: dict[str, dict] = {}  # per GPTQ layer: tokens, inputs, the shrinkage chosen (fit.gptq_stage)

    def put(self, name: str, mod: nn.Module) -> None:
        if name:
            set_child(self.model, name, mod)
        else:
            self.model = mod

    def to_torch_layout(self, names: Iterable[str]) -> dict[str, nn.Module]:
        """The float layers by name, each as the torch module the builders take: a layer whose kind stores
        its weight otherwise (transformers' Conv1D) is swapped for one sharing its parameters."""
        floats = {}
        for name in names:
            mod = self.model.get_submodule(name)
            view = layers.as_torch(mod)
            if view is not mod:
                self.originals[name] = mod
                self.put(name, view)
            floats[name] = view
        return floats

    def restore(self) -> None:
        """Put the original modules back where their torch-layout stand-ins still are (after a failure)."""
        for name, mod in self.originals.items():
            if name not in self.installed and name not in self.built:
                self.put(name, mod)

    def forget(self, names: Iterable[str]) -> None:
        """Drop what is held of these layers (lowbit.stream: their block is written)."""
        for name in names:
            self.originals.pop(name, None)
            self.stats.pop(name, None)

    def build(self, name: str, mod: nn.Module, method: str | None = None, **encode) -> nn.Module:
        """The quantized layer for float layer `mod` (in torch's layout) by the plan's config for `name`
        (with `method` instead of the config's, when given); `encode` passes a fitting method's options
        (hessian, weight, input_scale) to the encoder."""
        config = self.plan.config_for(name)
        if method is not None and method != config.method:
            config = dataclasses.replace(config, method=method)
        # W8A8 layers are built on the reference kernel and packed for the kernel the timing chooses.
        first = "reference" if (self.tuner and config.act) else self.plan.backend
        try:
            new = _build(mod, config, self.stats.get(name), name in self.plan.fuse, first,
                         self.plan.fixed.get(name), **encode)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        new.float_dtype = mod.weight.dtype  # `weight` reads, and outputs follow, the model's dtype
        if name in self.plan.notes:
            new.lowbit_note = self.plan.notes[name]
        return new

    def replace(self, name: str, new: nn.Module) -> None:
        """Put a built layer in place at once (sequential fitting: later layers see its outputs)."""
        self.built[name] = new
        self.put(name, new)

    def _shape(self, name: str, mod: nn.Module, config: QuantConfig) -> tuple[int, ...] | None:
        if name in self.shapes:
            return self.shapes[name]
        if isinstance(mod, nn.Linear):
            return (DEFAULT_ROWS[config.act], mod.in_features)
        if name in self.plan.fixed:  # no data to time a conv at: its default kernel
            return None
        raise ValueError(f"layer {name!r} was not seen during calibration")

    def install(self, name: str, mod: nn.Module) -> nn.Module:
        """Build float layer `mod` (unless fitting built it already), choose its kernel or keep `mod` in
        float when the plan says so, and put the result in the model. Returns what was put."""
        new = self.built.pop(name, None)
        if new is None:
            new = self.build(name, mod)
        self.installed.add(name)
        config = self.plan.config_for(name)
        keep_float = self.plan.keep_float(name)
        if self.tuner is None or isinstance(new, QuantEmbedding):
            self.put(name, new)
            return new
        shape = self._shape(name, mod, config)
        if shape is None:
            new.set_kernel("auto")
            self.put(name, new)
            return new
        if isinstance(new, QuantLinear):
            return self._install_route(name, mod, new, shape)
        timings = _tune(self.tuner, mod, new, config, shape, keep_float)
        choice, _ = autotune.best(timings, keep_float)
        quant_best = min((k for k in timings if k != autotune.FLOAT), key=timings.get)
        ratio = timings[autotune.FLOAT] / timings[quant_best]
        note = {"layer": name, "kernel": quant_best, "speedup": round(ratio, 3), "input": list(shape),
                "reason": f"fastest kernel {quant_best} runs at {ratio:.2f}x of float for input {list(shape)}"}
        if choice == autotune.FLOAT:
            self.kept.append(note)
            float_layer = self.originals.get(name, mod)
            self.put(name, float_layer)
            return float_layer
        if ratio < 1.0:
            self.slower.append(note)
        if new.kernel_name != choice:
            new.set_kernel(choice)
        self.put(name, new)
        return new

    def _install_route(self, name: str, mod: nn.Module, new: QuantLinear, shape: tuple[int, ...]) -> nn.Module:
        """A weight-only linear: timed at a few row counts, it gets the fastest kernel for each range of rows.
        Kept in float (when the plan says so) by its speed at `shape`, the input it was seen with."""
        keep_float = self.plan.keep_float(name)
        by_rows, route = route_for(self.tuner, mod, new, keep_float)
        speed = autotune.route_speedups(by_rows, route)  # {rows: (kernel, speed-up over float)}
        kernel, ratio = speed[autotune.nearest_rows(math.prod(shape[:-1]), speed)]
        if keep_float and ratio < 1.0:
            self.kept.append({"layer": name, "kernel": kernel, "speedup": round(ratio, 3), "input": list(shape),
                              "reason": f"fastest kernel {kernel} runs at {ratio:.2f}x of float for input "
                                        f"{list(shape)}"})
            float_layer = self.originals.get(name, mod)
            self.put(name, float_layer)
            return float_layer
        slow = {rows: ks for rows, ks in speed.items() if ks[1] < 1.0}
        if slow:
            worst = min(slow, key=lambda r: slow[r][1])
            where = ", ".join(f"{s:.2f}x of float at {r} row{'s' * (r > 1)} ({k})" for r, (k, s) in slow.items())
            self.slower.append({"layer": name, "kernel": slow[worst][0], "speedup": round(slow[worst][1], 3),
                                "input": list(shape), "rows": sorted(slow),
                                "reason": f"fastest kernel runs at {where}"})
        text = format_route(route)
        if new.kernel_name != text:
            new.set_kernel(text)
        self.put(name, new)
        return new

    def fuse_relus(self, under: str = "") -> None:
        """Turn into FusedReLU each planned ReLU (under the qualified prefix `under`) whose layers are all
        quantized now: those layers compute it."""
        kept = {n["layer"] for n in self.kept}
        for relu, sources in self.plan.drop_relus.items():
            if relu in self.relus_done or not relu.startswith(under) or not sources <= self.installed:
                continue
            self.relus_done.add(relu)
            if not sources & kept:
                self.put(relu, FusedReLU())

    def fuse_gelus(self) -> None:
        """Each GELU between two dynamic W8A8 linears on the int8 matmul (gelu_chains) moves into the first,
        which then hands the second its input codes; the GELU module becomes a FusedAct."""
        for up, act, down in self.gelu_chains:
            a, b = self.model.get_submodule(up), self.model.get_submodule(down)
            if (isinstance(a, W8A8Linear) and isinstance(b, W8A8Linear) and a.act_out is None and not a.relu
                    and a.config.act == b.config.act == "dynamic" and a.kernel_name == b.kernel_name == "onednn"):
                a.act_out = "gelu"
                self.put(act, FusedAct())

    def finish(self, stacklevel: int = 3) -> nn.Module:
        """Fuse the remaining ReLUs and the GELUs between W8A8 layers, save the timings, record and report
        what stayed float or runs slower (warnings attributed `stacklevel` frames up: the caller of
        lowbit.quantize). Returns the model."""
        self.fuse_relus()
        self.fuse_gelus()
        if self.tuner is not None:
            self.tuner.save()
        model = self.model
        model.lowbit_recipe = self.plan.recipe or self.plan.config  # read back by save() and summary()
        model.lowbit_float_layers = self.kept
        model.lowbit_slower_layers = self.slower
        model.lowbit_unquantized_layers = self.plan.left_float
        model.lowbit_fit_notes = self.fit_notes
        attention.apply(model, self.plan.config.attention)
        hf_quantizer.attach(model)  # a transformers model: save_pretrained / from_pretrained keep it quantized
        where = "each layer and its reason: lowbit.summary(model) or model.{}"
        if self.kept:
            warnings.warn(f"{len(self.kept)} layer(s) kept in float because no kernel beats float here (the fastest "
                          f"kernel runs at {_speedups(self.kept)} of float); "
                          + where.format("lowbit_float_layers"), stacklevel=stacklevel)
        if self.slower:
            warnings.warn(f"{len(self.slower)} quantized layer(s) run slower than float here ({_speedups(self.slower)} "
                          "of float; kept for size: keep_float_if_slower=True keeps them in float); "
                          + where.format("lowbit_slower_layers"), stacklevel=stacklevel)
        thin = {n: v for n, v in self.fit_notes.items() if v["shrink"] is not None}
        if thin:
            rounded = [n for n, v in thin.items() if v["shrink"] == "rtn"]
            least = min(thin, key=lambda n: thin[n]["tokens"] / thin[n]["inputs"])
            warnings.warn(f"GPTQ: {len(thin)} layer(s) got fewer than {fit.THIN_TOKENS_PER_INPUT} calibration tokens "
                          f"per input (fewest: {thin[least]['tokens']} tokens for {thin[least]['inputs']} inputs at "
                          f"{least}), too few for their Hessian; each was fitted with the Hessian's shrinkage that "
                          f"did best on held-out tokens, and {len(rounded)} of them rounded to nearest (their "
                          "recipe in lowbit.summary says so). More calibration data lets GPTQ gain more; "
                          "per layer: model.lowbit_fit_notes", stacklevel=stacklevel)
        left = [n for n in self.plan.left_float if not n.get("asked")]
        if left:
            weights = sum(n["weights"] for n in left)
            total = self.plan.weights
            names = ", ".join(f"{n['layer'] or '(model)'} ({n['type']})" for n in left[:4])
            more = f" and {len(left) - 4} more" if len(left) > 4 else ""
            warnings.warn(f"{len(left)} layer(s) with {weights / max(total, 1):.0%} of the layers' weights stay in "
                          f"float: {names}{more}; " + where.format("lowbit_unquantized_layers"), stacklevel=stacklevel)
        return model


# ---------------------------------------------------------------------------------------------------
# lowbit.quantize: the stages


def _calibration_data(the_plan: Plan, calibration: Iterable | None) -> Iterable | None:
    needing = [c for c in the_plan.all_configs() if c.needs_calibration]
    config = needing[0] if needing else the_plan.config
    all_fixed = len(the_plan.fixed) == len(the_plan.layers)
    if needing and calibration is None and not (all_fixed and config.method == "rtn"):
        what = ("fits weights to the layers' inputs" if config.method in ("gptq", "awq")
                else "fixes activation ranges from data" if config.act == "static"
                else "measures activation outliers on data")
        raise ValueError(f"recipe {config.name} {what}: pass calibration= (an iterable of model inputs)")
    if calibration is not None and not isinstance(calibration, (list, tuple, torch.Tensor, dict)):
        calibration = list(calibration)  # it is read more than once (calibration, gptq's passes)
    return calibration


def _linears(b: Builder, pred=lambda c: True) -> list[str]:
    return [n for n in b.plan.layers_by(pred) if isinstance(b.model.get_submodule(n), nn.Linear)]


def _calibrate(b: Builder, floats: dict[str, nn.Module], calibration: Iterable, progress: bool) -> None:
    """Record each layer's input shape (and, for static recipes, its activation range); SmoothQuant's
    rewrite comes first when the recipe asks for it: ranges are observed on the smoothed model."""
    config = b.plan.config  # the lead config: activation settings are one per model (LayerRecipe)
    seen = [(n, m) for n, m in floats.items() if not isinstance(m, nn.Embedding)]
    observer = config.observer if config.act == "static" and config.smooth is None else None
    b.stats = calibrate(b.model, seen, calibration, observer, progress)
    if config.smooth is not None:  # an exact float rewrite, before the activation ranges are observed
        smoothed = _linears(b, lambda c: c.smooth is not None)
        for stage, names in stages(b.model, smoothed, calibration, progress=progress, desc="smooth"):
            fit.smooth_stage(stage, {n: b.model.get_submodule(n) for n in names}, config.smooth)
        if config.act == "static":
            b.stats = calibrate(b.model, seen, calibration, config.observer, progress)
    b.shapes = {n: st.shape for n, st in b.stats.items() if st.shape is not None}
    # Dynamic W8A8 layers reading an activation's output: is it a GELU that the layer before could compute
    # and hand over as int8 codes? (torch.export of the float model, about a second for MiniLM.)
    if config.act == "dynamic" and any(after_activation(b.stats.get(n)) for n in b.plan.layers_by(lambda c: c.act)):
        first = calibration[0] if isinstance(calibration, (list, tuple)) else next(iter(calibration))
        linears = {n for n, m in floats.items() if isinstance(m, nn.Linear)}
        b.gelu_chains = gelu_chains(b.model, first, linears)


FITTED = ("gptq", "awq")  # methods that fit weights to calibration data, stage by stage


def fit_stage(b: Builder, stage, names: list[str]) -> None:
    """Fit and build the layers `names` of one stage by each one's method (AWQ first, then GPTQ; others are
    skipped here); each is put in place at once, so the stage's later layers see the quantized ones'
    outputs. AWQ searches a group's shared input scale with the config of the group's first layer."""
    by = {m: [n for n in names if b.plan.config_for(n).method == m] for m in FITTED}
    if by["awq"]:
        mods = {n: b.model.get_submodule(n) for n in by["awq"]}
        fit.awq_stage(stage, mods, b.plan.config_for, b.build, b.replace)
    if by["gptq"]:
        mods = {n: b.model.get_submodule(n) for n in by["gptq"]}
        notes = fit.gptq_stage(stage, mods, b.build, b.replace)
        for name, note in notes.items():
            if note["shrink"] == "rtn":  # rounded: the layer says so (summary, checkpoint)
                b.plan.configs[name] = dataclasses.replace(b.plan.config_for(name), method="rtn")
        b.fit_notes.update(notes)


def _fit(b: Builder, calibration: Iterable, progress: bool) -> None:
    """GPTQ / AWQ, block by block: each layer is fitted to the inputs the quantized layers before give it."""
    names = _linears(b, lambda c: c.method in FITTED)
    desc = "/".join(sorted({b.plan.config_for(n).method for n in names}))
    for stage, in_stage in stages(b.model, names, calibration, progress=progress, desc=desc):
        fit_stage(b, stage, in_stage)


def quantize(model: nn.Module, recipe: Recipe, *, calibration: Iterable | None = None,
             exclude: Iterable[str] = (), backend: str = "auto", keep_float_if_slower: bool | None = None,
             progress: bool = False, fixed: dict[str, dict] | None = None) -> nn.Module:
    """Quantize `model` in place by `recipe` and return it.

    recipe: a recipe string ("int4-g128", lowbit.recipes), a QuantConfig, or recipes per layer pattern:
    a mapping {pattern: recipe} or the path of a JSON file holding one, first match wins, "float" keeps a
    layer float (lowbit.recipes.LayerRecipe). GPTQ/AWQ layers are fitted block by block with their own
    formats.

    Replaced: every layer of a kind in lowbit.layers that the recipe takes and whose qualified name
    matches no pattern in `exclude`: nn.Linear, transformers' Conv1D (GPT-2's), nn.Embedding (unless the
    config says `embeddings=False`) and, for static activation recipes, nn.Conv1d/nn.Conv2d. A ReLU that
    is a layer's only consumer is fused into it (found by FX tracing). When `model` is itself such a
    layer (`quantize(nn.Linear(...), ...)`), the quantized layer is returned in its place: use the
    return value. Other layers holding weights that stay float are listed in a warning and in
    `model.lowbit_unquantized_layers`.

    calibration: an iterable of model inputs (a tensor is called as model(x), a tuple as model(*x), a dict
    as model(**x)); required by static recipes (activation ranges) and used by all to learn the input
    shapes the layers see, which `backend="auto"` times the kernels at.

    backend: "auto" times every kernel that can run each distinct layer shape on this machine, on inputs
    of the model's dtype (cached on disk, see lowbit.autotune) and takes the fastest; a kernel name
    forces that kernel. Quantized layers return outputs of their input's dtype.
    keep_float_if_slower: with "auto", leave a layer in float when no kernel beats the float layer.
    Default: yes for recipes that quantize activations (their point is speed), no for weight-only
    recipes (their point is size); either way one warning says how many layers and how much slower, and
    `lowbit.summary(model)`, `model.lowbit_float_layers` and `model.lowbit_slower_layers` list them.
    fixed: per layer (qualified name), quantization parameters to use instead of choosing them, as
    lowbit.qat.convert hands over what training learned: "scale" (and "zero_point") of the weight, one
    value per block in its format's convention (lowbit.formats, Scheme.encode), and "act", a static
    layer's activation (scale, zero point).
    """
    recipe = read_recipe(recipe)
    config = lead_config(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if config.act == "static":  # fold BatchNorms: an eval-mode BN after a conv is part of its weights and bias
        fold_batchnorm_(model)
    the_plan = plan(model, recipe, exclude, backend, keep_float_if_slower, fixed)  # layers, configs, fusions
    calibration = _calibration_data(the_plan, calibration)  # validate: what the recipe needs
    b = Builder(model, the_plan)
    floats = b.to_torch_layout(the_plan.layers)
    try:
        if calibration is not None:
            _calibrate(b, floats, calibration, progress)  # input shapes, activation ranges; SmoothQuant
        if the_plan.layers_by(lambda c: c.method in FITTED):
            _fit(b, calibration, progress)  # block by block
        label = config.name if isinstance(recipe, QuantConfig) else "per-layer recipe"
        for name in progress_bar(the_plan.layers, desc=f"quantize {label}", disable=not progress,
                                 unit="layer"):
            b.install(name, floats[name])  # build, choose the kernel (or keep float)
    except BaseException:
        b.restore()
        raise
    return b.finish()  # fuse ReLUs, report what stayed float or runs slower


# ---------------------------------------------------------------------------------------------------
# What a quantized model holds


class Summary(list):
    """lowbit.summary's rows (a list of dicts), with the average bits per weight over them."""

    @property
    def weights(self) -> int:
        return sum(r.get("weights", 0) for r in self)

    attention: str | None = None  # what runs a transformers model's attention, when a recipe chose it

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight over every listed layer (quantized or float), weighted by size."""
        total = self.weights
        return sum(r["bits_per_weight"] * r["weights"] for r in self if r.get("weights")) / total if total else math.nan


def _float_row(model: nn.Module, note: dict, type_: str) -> dict:
    try:
        mod = model.get_submodule(note["layer"])
    except AttributeError:
        mod = None
    params = [p for n, p in (mod.named_parameters(recurse=False) if mod is not None else ())
              if n.endswith("weight") and p.dim() >= 2]
    dtype = params[0].dtype if params else torch.float32
    return {"layer": note["layer"], "type": type_, "shape": tuple(params[0].shape) if params else (), "recipe": "-",
            "kernel": "float", "act_dtype": str(dtype).replace("torch.", ""), "simulated": False,
            "bits_per_weight": float(torch.finfo(dtype).bits) if dtype.is_floating_point else 32.0,
            "weights": sum(p.numel() for p in params), "reason": note["reason"]}


def summary(model: nn.Module) -> Summary:
    """One row per quantized layer: name, type, shape, recipe, kernel, activation dtype, whether it is
    simulated, bits per weight (codes with their scales, zero points and codebooks) and weights; a layer
    that runs slower than float says so in "reason". Then the layers `backend="auto"` kept in float
    (kernel "float") and the layers with weights the recipe left float (type "left float"), each with its
    reason. `.bits_per_weight` of the result is the average over all of them; `.attention` says what runs
    the attention of a model whose recipe chose it (lowbit.attention)."""
    slower = {n["layer"]: n for n in getattr(model, "lowbit_slower_layers", [])}
    rows = Summary()
    rows.attention = getattr(model, "lowbit_attention", None)
    for name, mod in model.named_modules():
        fields = layers.summary_row(mod)
        if fields is None or not isinstance(mod, QuantModule):
            continue
        row = {"layer": name, "type": fields["type"], "shape": fields["shape"], "recipe": mod.config.name,
               "kernel": fields["kernel"], "act_dtype": fields["act_dtype"], "simulated": fields["simulated"],
               "bits_per_weight": mod.bits_per_weight, "weights": layers.weight_count(mod)}
        reasons = [getattr(mod, "lowbit_note", None), slower[name]["reason"] if name in slower else None]
        if any(reasons):
            row["reason"] = "; ".join(r for r in reasons if r)
        rows.append(row)
    for note in getattr(model, "lowbit_float_layers", []):
        rows.append(_float_row(model, note, "kept float"))
    for note in getattr(model, "lowbit_unquantized_layers", []):
        rows.append(_float_row(model, note, "left float"))
    return rows


__all__ = ["Builder", "Plan", "QuantModule", "Summary", "calibrate", "call_model", "fit_stage", "plan", "quantize",
           "summary", "targets"]

"""The one verb: lowbit.quantize(model, recipe)."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import autotune, fit
from .core.observers import make_observer
from .modules import QuantEmbedding, QuantLinear, QuantModule
from .progress import progress_bar
from .recipes import QuantConfig, parse_recipe
from .sequential import call_model, feed, stages
from .w8a8 import FusedReLU, W8A8Conv, W8A8Linear

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
# Fewer samples than this cannot give ranges worth fixing into a model.
MIN_CALIBRATION_SAMPLES = 8
# Rows a linear layer is timed at when no calibration data shows the real number: weight-only formats
# pay off when decoding (one row); activation quantization on prompts and batches.
DEFAULT_ROWS = {None: 1, "dynamic": 128, "static": 128}


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
    # nn.MultiheadAttention reads its out_proj weight directly instead of calling it: leave it alone.
    skip = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, mod in model.named_modules():
        if not name or name in skip or _excluded(name, exclude):
            continue
        if (isinstance(mod, nn.Linear) or (config.embeddings and isinstance(mod, nn.Embedding))
                or (config.act == "static" and isinstance(mod, CONV_TYPES))):
            found.append((name, mod))
    return found


class _LayerStats:
    def __init__(self, observer) -> None:
        self.observer = observer
        self.shape: tuple[int, ...] | None = None  # the largest input seen
        self.calls = 0


def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], calibration: Iterable,
              observer: str | None, progress: bool = False) -> dict[str, _LayerStats]:
    """Run the calibration data through the float model, recording each layer's input shape and, when
    `observer` names one, the statistics of its input."""
    if isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError("calibration must be an iterable of model inputs (e.g. a list of batches), "
                        "not a single tensor or dict")
    stats = {name: _LayerStats(make_observer(observer) if observer else None) for name, _ in layers}

    def hook_for(st: _LayerStats):
        def hook(mod, args):
            x = args[0]
            if st.shape is None or x.numel() > torch.Size(st.shape).numel():
                st.shape = tuple(x.shape)
            st.calls += 1
            if st.observer is not None:
                st.observer.update(x.detach())
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(stats[name])) for name, mod in layers]
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
    from .vision import fold_conv_bn

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
            _set_child(model, user.target, nn.Identity())
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
    cls = W8A8Linear if isinstance(mod, nn.Linear) else W8A8Conv
    return cls.from_float(mod, config, act, kernel, relu, **weight)


def _timing_key(mod: nn.Module, new: nn.Module, config: QuantConfig, shape: tuple[int, ...]) -> str:
    if isinstance(mod, nn.Linear):
        geo = f"linear n={mod.out_features} k={mod.in_features} bias={mod.bias is not None}"
    else:
        geo = f"conv {sorted(W8A8Conv.conv_args(mod).items())}"
    return f"{config.name}|{geo}|relu={getattr(new, 'relu', False)}|input={list(shape)}"


def _tune(tuner: autotune.Tuner, mod: nn.Module, new: nn.Module, config: QuantConfig,
          shape: tuple[int, ...]) -> dict[str, float]:
    """Seconds per call of each kernel the quantized layer can use, and of the float layer, at `shape`."""

    def measure() -> dict[str, float]:
        x = torch.randn(shape)
        if x.dim() == 4:  # the int8 convolutions produce channels_last; later layers see that layout
            x = x.contiguous(memory_format=torch.channels_last)
        fns = {}
        for name in new.candidate_kernels():
            variant = copy.copy(new)  # shares the canonical buffers; only the packed form differs
            variant._buffers = dict(new._buffers)
            variant.set_kernel(name)
            fns[name] = lambda v=variant: v(x)
        fns[autotune.FLOAT] = lambda: mod(x)
        return autotune.time_calls(fns)

    return tuner.timings(_timing_key(mod, new, config, shape), measure)


def quantize(model: nn.Module, recipe: str | QuantConfig, *, calibration: Iterable | None = None,
             exclude: Iterable[str] = (), backend: str = "auto", keep_float_if_slower: bool | None = None,
             progress: bool = False, fixed: dict[str, dict] | None = None) -> nn.Module:
    """Quantize `model` in place by `recipe` and return it.

    Replaced: every nn.Linear, every nn.Embedding (unless the config says `embeddings=False`) and, for
    static activation recipes, every nn.Conv1d/nn.Conv2d, whose qualified name matches no pattern in
    `exclude`. A ReLU that is a layer's only consumer is fused into it (found by FX tracing).

    calibration: an iterable of model inputs (a tensor is called as model(x), a tuple as model(*x), a dict
    as model(**x)); required by static recipes (activation ranges) and used by all to learn the input
    shapes the layers see, which `backend="auto"` times the kernels at.

    backend: "auto" times every kernel that can run each distinct layer shape on this machine (cached
    on disk, see lowbit.autotune) and takes the fastest; a kernel name forces that kernel.
    keep_float_if_slower: with "auto", leave a layer in float when no kernel beats the float layer.
    Default: yes for recipes that quantize activations (their point is speed), no for weight-only
    recipes (their point is size); either way the slower layers are listed in a warning and in
    `model.lowbit_float_layers` / `model.lowbit_slower_layers`.
    fixed: per layer (qualified name), quantization parameters to use instead of choosing them, as
    lowbit.qat.convert hands over what training learned: "scale" (and "zero_point") of the weight, one
    value per block in its format's convention (lowbit.formats, Scheme.encode), and "act", a static
    layer's activation (scale, zero point).
    """
    config = parse_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if config.act == "static":
        fold_batchnorm_(model)  # an eval-mode BN after a conv is part of its weights and bias
    todo = targets(model, config, exclude)
    if not todo:
        raise ValueError("found no layer to quantize (nn.Linear, nn.Embedding, or convolutions for static "
                         "recipes); check `exclude`")
    if keep_float_if_slower is None:
        keep_float_if_slower = config.act is not None
    for name, mod in todo:
        if isinstance(mod, CONV_TYPES):
            try:
                W8A8Conv.conv_args(mod)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}; exclude it to keep it in float") from None
    stats: dict[str, _LayerStats] = {}
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - {n for n, _ in todo})
    if unknown:
        names = ", ".join(unknown[:10])
        raise ValueError(f"fixed parameters for layers the recipe does not quantize: {names}")
    fixed_layers = {n for n in fixed if fixed[n]}  # see _build
    all_fixed = len(fixed_layers) == len(todo)
    if config.needs_calibration and calibration is None and not (all_fixed and config.method == "rtn"):
        what = ("fits weights to the layers' inputs" if config.method in ("gptq", "awq")
                else "fixes activation ranges from data" if config.act == "static"
                else "measures activation outliers on data")
        raise ValueError(f"recipe {config.name} {what}: pass calibration= (an iterable of model inputs)")
    if calibration is not None and not isinstance(calibration, (list, tuple, torch.Tensor, dict)):
        calibration = list(calibration)  # it is read more than once (calibration, gptq's passes)
    linears = [n for n, m in todo if isinstance(m, nn.Linear)]
    if calibration is not None:
        layers = [(n, m) for n, m in todo if not isinstance(m, nn.Embedding)]
        observer = config.observer if config.act == "static" and config.smooth is None else None
        stats = calibrate(model, layers, calibration, observer, progress)
        if config.smooth is not None:  # an exact float rewrite, before the activation ranges are observed
            for stage, names in stages(model, linears, calibration, progress=progress, desc="smooth"):
                fit.smooth_stage(stage, {n: model.get_submodule(n) for n in names}, config.smooth)
            if config.act == "static":
                stats = calibrate(model, layers, calibration, config.observer, progress)
    fuse, drop_relus = _relu_fusions(model, {n for n, _ in todo}) if config.act else (set(), {})
    tuner = autotune.Tuner() if backend == "auto" else None
    first = "reference" if (tuner and config.act) else backend
    built: dict[str, nn.Module] = {}
    if config.method in ("gptq", "awq"):
        # Sequential, block by block: each layer is fitted to the inputs the quantized layers before give it.
        def build(name: str, mod: nn.Module, **encode) -> nn.Module:
            try:
                return _build(mod, config, None, False, first, **encode)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from None

        def replace(name: str, new: nn.Module) -> None:
            built[name] = new
            _set_child(model, name, new)

        for stage, names in stages(model, linears, calibration, progress=progress, desc=config.method):
            layers = {n: model.get_submodule(n) for n in names}
            if config.method == "gptq":
                fit.gptq_stage(stage, layers, build, replace)
            else:
                fit.awq_stage(stage, layers, config, build, replace)
    kept, slower = [], []
    for name, mod in progress_bar(todo, desc=f"quantize {config.name}", disable=not progress, unit="layer"):
        try:
            new = built[name] if name in built else _build(mod, config, stats.get(name), name in fuse, first,
                                                           fixed.get(name))
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        if tuner is not None and not isinstance(new, QuantEmbedding):
            st = stats.get(name)
            if st is not None and st.shape is not None:
                shape = st.shape
            elif isinstance(mod, nn.Linear):
                shape = (DEFAULT_ROWS[config.act], mod.in_features)
            elif name in fixed_layers:  # no data to time a conv at: its default kernel
                new.set_kernel("auto")
                _set_child(model, name, new)
                continue
            else:
                raise ValueError(f"layer {name!r} was not seen during calibration")
            timings = _tune(tuner, mod, new, config, shape)
            choice, _ = autotune.best(timings, keep_float_if_slower)
            quant_best = min((k for k in timings if k != autotune.FLOAT), key=timings.get)
            ratio = timings[autotune.FLOAT] / timings[quant_best]
            note = {"layer": name, "kernel": quant_best, "speedup": round(ratio, 3), "input": list(shape),
                    "reason": f"fastest kernel {quant_best} runs at {ratio:.2f}x of float for input {list(shape)}"}
            if choice == autotune.FLOAT:
                kept.append(note)
                if name in built:
                    _set_child(model, name, mod)
                continue
            if ratio < 1.0:
                slower.append(note)
            if new.kernel_name != choice:
                new.set_kernel(choice)
        _set_child(model, name, new)
    kept_names = {n["layer"] for n in kept}
    for relu_name, sources in drop_relus.items():
        if not sources & kept_names:
            _set_child(model, relu_name, FusedReLU())
    if tuner is not None:
        tuner.save()
    model.lowbit_recipe = config  # read back by save() and summary()
    model.lowbit_float_layers = kept
    model.lowbit_slower_layers = slower
    if kept:
        warnings.warn(f"{len(kept)} layer(s) kept in float because quantizing them would make them slower here: "
                      + "; ".join(f"{n['layer']} ({n['reason']})" for n in kept), stacklevel=2)
    if slower:
        warnings.warn(f"{len(slower)} quantized layer(s) run slower than float here (kept for size; pass "
                      "keep_float_if_slower=True to keep them in float): "
                      + "; ".join(f"{n['layer']} ({n['reason']})" for n in slower), stacklevel=2)
    return model


def summary(model: nn.Module) -> list[dict]:
    """One row per quantized layer: name, recipe, kernel, activation dtype and whether it is simulated;
    then the layers `backend="auto"` kept in float, with kernel "float" and the reason."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, W8A8Linear)):
            rows.append({"layer": name, "type": "linear", "shape": (mod.out_features, mod.in_features),
                         "recipe": mod.config.name, "kernel": mod.kernel_name,
                         "act_dtype": str(mod.act_dtype).replace("torch.", ""), "simulated": mod.simulated})
        elif isinstance(mod, W8A8Conv):
            rows.append({"layer": name, "type": f"conv{len(mod.kernel_size)}d",
                         "shape": (mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size),
                         "recipe": mod.config.name, "kernel": mod.kernel_name, "act_dtype": "uint8",
                         "simulated": mod.simulated})
        elif isinstance(mod, QuantEmbedding):
            rows.append({"layer": name, "type": "embedding", "shape": (mod.num_embeddings, mod.embedding_dim),
                         "recipe": mod.config.name, "kernel": "gather", "act_dtype": "-",
                         "simulated": False})
    for note in getattr(model, "lowbit_float_layers", []):
        rows.append({"layer": note["layer"], "type": "kept float", "shape": (), "recipe": "-", "kernel": "float",
                     "act_dtype": "float32", "simulated": False, "reason": note["reason"]})
    return rows


__all__ = ["QuantModule", "calibrate", "call_model", "quantize", "summary", "targets"]

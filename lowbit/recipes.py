"""Recipes: the strings users type (`int4-g128`) and the config objects they stand for.

Grammar: FORMAT[-gGROUP][-METHOD], e.g. `int8`, `int4-g128`, `int3-g64-rtn`, `kmeans4-g64`, `ternary`;
and for activations quantized too: `w8a8-dynamic`, `w8a8-static`, `w8a8-static-OBSERVER` (OBSERVER one
of minmax, ema, percentile, mse, entropy; minmax by default); with SmoothQuant's smoothing first:
`w8a8-smooth` (dynamic), `w8a8-static-smooth`, either with `-ALPHA` (migration strength, default 0.5).
Narrower weights with int8 activations: FORMAT[-gGROUP]-a8[-dynamic|-static][-OBSERVER], e.g. `int4-a8`,
`ternary-a8`, `binary-a8-dynamic`, `int4-g32-a8-dynamic` (static by default; integer weights symmetric).
int8 is symmetric (what the int8 kernels take); `-asym` (`int8-g128-asym`) gives it a zero point per group,
the better base for a nested checkpoint (lowbit.nested).
Weight-only integer recipes store scales and zero points as float16 values; a `-fp32scales` suffix
(`int4-g128-fp32scales`, `int4-g128-gptq-fp32scales`) keeps them float32, the earlier layout.
Attention: recipes that quantize activations also run a transformers model's attention matmuls in bf16
(lowbit.attention: Q, K, V and the softmax's probabilities rounded to bf16); a final `-floatattn`
(`w8a8-dynamic-floatattn`) keeps the model's own attention. Weight-only recipes keep it unless they end in
`-bf16attn` (`int4-g128-bf16attn`).

Per layer: a mapping from layer-name patterns to recipes, `{"*.attention.*": "int8", "lm_head": "bf16",
"*": "int4-g64-gptq"}` (a LayerRecipe; also read from a JSON file holding such an object). The first
pattern that matches a layer's qualified name gives its recipe; `"float"` (or null) keeps the layer float,
and a layer no pattern matches stays float too. A pattern is a glob on the qualified name or a name
(the layer itself and everything inside it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

FLOAT_FORMATS = ("fp16", "bf16", "fp8", "fp8_e5m2")
METHODS = ("rtn", "gptq", "awq", "hqq")
DEFAULT_SMOOTH_ALPHA = 0.5
ACT_MODES = ("dynamic", "static")
OBSERVER_NAMES = ("minmax", "ema", "percentile", "mse", "entropy")  # lowbit.core.observers.OBSERVERS
SCALE_DTYPES = ("float16", "float32")
ATTENTION_KINDS = ("bf16",)  # lowbit.attention.KINDS
DEFAULT_SCALE_DTYPE = "float16"

# The recipes lowbit documents and tests; the grammar accepts more (any int2..int8, any group).
RECIPES = (
    "fp16", "bf16", "fp8", "int8", "int4-g32", "int4-g64", "int4-g128", "int3-g64", "int2-g32",
    "kmeans4", "ternary", "binary", "w8a8-dynamic", "w8a8-static",
    "int4-g128-gptq", "int4-g128-awq", "int4-g128-hqq", "int3-g64-gptq", "w8a8-smooth",
    "int4-a8", "ternary-a8", "binary-a8", "int4-g32-a8-dynamic",
)


@dataclass(frozen=True)
class QuantConfig:
    """What to do to a model's weights.

    kind: "int" (affine integers), "float" (fp16/bf16/fp8 casts), "kmeans" (codebook),
    "ternary" or "binary". group_size None means one scale per output channel (per row).
    act: None (weights only), "dynamic" (activations quantized per row at run time) or "static"
    (per tensor, with ranges from calibration by `observer`). smooth: SmoothQuant's alpha, for w8a8
    recipes that first move activation outliers into the weights; None for no smoothing.
    attention: None (the model's own) or "bf16": a transformers model's attention matmuls in bf16 (the
    recipe strings of activation-quantizing recipes ask for it unless they end in -floatattn).
    """

    kind: str
    bits: int
    group_size: int | None = None
    symmetric: bool = False
    float_format: str | None = None
    method: str = "rtn"
    embeddings: bool = True  # quantize nn.Embedding tables too (row-wise)
    act: str | None = None
    observer: str = "minmax"
    smooth: float | None = None
    scale_dtype: str = DEFAULT_SCALE_DTYPE
    attention: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "kmeans", "ternary", "binary"):
            raise ValueError(f"unknown quantization kind {self.kind!r}")
        if self.kind in ("int", "kmeans") and not 2 <= self.bits <= 8:
            raise ValueError(f"{self.kind} weights take 2..8 bits, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be positive, got {self.group_size}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.act is not None:
            if self.act not in ACT_MODES:
                raise ValueError(f"unknown activation mode {self.act!r}; valid: {', '.join(ACT_MODES)}")
            if self.kind not in ("int", "ternary", "binary") or not self.symmetric:
                raise ValueError("int8 activations take symmetric integer, ternary or binary weights")
        if self.smooth is not None and (self.act is None or not 0.0 <= self.smooth <= 1.0):
            raise ValueError(f"smoothing takes a w8a8 recipe and an alpha in [0, 1], got {self.smooth}")
        if self.method in ("awq", "hqq") and self.kind != "int":
            raise ValueError(f"{self.method} takes integer formats (intB[-gG])")
        if self.method == "gptq" and self.kind not in ("int", "kmeans"):
            raise ValueError("gptq takes integer or codebook formats (intB[-gG], kmeansB[-gG])")
        if self.method == "hqq" and self.symmetric:
            raise ValueError("hqq fits zero points: it takes asymmetric formats (int2..int7)")
        if self.observer not in OBSERVER_NAMES:
            raise ValueError(f"unknown observer {self.observer!r}; valid: {', '.join(OBSERVER_NAMES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        if self.scale_dtype != DEFAULT_SCALE_DTYPE and (self.kind != "int" or self.act is not None):
            raise ValueError(f"scale dtype {self.scale_dtype} applies to weight-only integer recipes (intB[-gG])")
        if self.attention is not None and self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTION_KINDS)}")

    @property
    def needs_calibration(self) -> bool:
        return self.act == "static" or self.method in ("gptq", "awq") or self.smooth is not None

    @property
    def name(self) -> str:
        if self.attention == self.default_attention:
            return self._base_name
        return self._base_name + (f"-{self.attention}attn" if self.attention else "-floatattn")

    @property
    def default_attention(self) -> str | None:
        """What the recipe string without an attention suffix asks for."""
        return "bf16" if self.act is not None else None

    @property
    def _base_name(self) -> str:
        if self.act is not None:
            suffix = f"-{self.observer}" if self.act == "static" and self.observer != "minmax" else ""
            if (self.kind, self.bits, self.group_size) != ("int", 8, None):
                w = self.kind if self.kind != "int" else f"int{self.bits}"
                w += f"-g{self.group_size}" if self.group_size is not None else ""
                return f"{w}-a8" + ("-dynamic" if self.act == "dynamic" else "") + suffix
            if self.smooth is not None:
                alpha = "" if self.smooth == DEFAULT_SMOOTH_ALPHA else f"-{self.smooth:g}"
                return ("w8a8-static-smooth" if self.act == "static" else "w8a8-smooth") + alpha + suffix
            return f"w8a8-{self.act}{suffix}"
        if self.kind == "float":
            return "fp8" if self.float_format == "fp8_e4m3" else str(self.float_format)
        base = {"int": f"int{self.bits}", "kmeans": f"kmeans{self.bits}"}.get(self.kind, self.kind)
        if self.group_size is not None:
            base += f"-g{self.group_size}"
        if self.method != "rtn":
            base += f"-{self.method}"
        if self.kind == "int" and self.bits == 8 and not self.symmetric:
            base += "-asym"
        if self.scale_dtype == "float32":
            base += "-fp32scales"
        return base

    def to_dict(self) -> dict:
        d = asdict(self)
        # The default is left out: manifests of other recipes read as before, and by lowbit versions
        # that predate the option.
        if d["scale_dtype"] == DEFAULT_SCALE_DTYPE:
            del d["scale_dtype"]
        if d["attention"] is None:
            del d["attention"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(**d)


_PATTERN = re.compile(r"^(?P<fmt>[a-z0-9_]+?)(?:-g(?P<group>\d+))?(?:-(?P<method>[a-z]+))?$")


def valid_recipes_message() -> str:
    return (
        "valid recipes: " + ", ".join(RECIPES)
        + " (grammar FORMAT[-gGROUP][-METHOD]: FORMAT is fp16, bf16, fp8, fp8_e5m2, int2..int8, "
        + "kmeans2..kmeans8, ternary or binary; METHOD is " + "/".join(METHODS) + "; "
        + "or w8a8-dynamic, w8a8-static[-OBSERVER] with OBSERVER in " + "/".join(OBSERVER_NAMES)
        + "; or w8a8-smooth[-ALPHA], w8a8-static-smooth[-ALPHA] with ALPHA in [0, 1]"
        + "; or FORMAT[-gGROUP]-a8[-dynamic|-static][-OBSERVER] with FORMAT int2..int8, ternary or binary"
        + "; weight-only intB recipes take a final -fp32scales for float32 scales and zero points"
        + "; int8 recipes take -asym for a zero point per group (the base of nested checkpoints)"
        + "; a final -bf16attn / -floatattn runs a transformers model's attention matmuls in bf16 / keeps them"
        + " (bf16 by default for recipes quantizing activations))"
    )


def parse_recipe(recipe: str | QuantConfig) -> QuantConfig:
    """Turn a recipe string into a QuantConfig; a config passes through unchanged."""
    if isinstance(recipe, QuantConfig):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a string or QuantConfig, got {type(recipe).__name__}")
    text = recipe.strip().lower()
    for kind in (*ATTENTION_KINDS, None):
        suffix = f"-{kind or 'float'}attn"
        if text.endswith(suffix):
            return replace(parse_recipe(text[:-len(suffix)]), attention=kind)
    config = _parse(recipe, text)
    return replace(config, attention=config.default_attention)


def _parse(recipe: str, text: str) -> QuantConfig:
    if text.endswith("-fp32scales"):
        config = parse_recipe(text[:-len("-fp32scales")])
        try:
            return replace(config, scale_dtype="float32")
        except ValueError as e:
            raise ValueError(f"bad recipe {recipe!r}: {e}; {valid_recipes_message()}") from None
    if text.endswith("-asym"):
        config = parse_recipe(text[:-len("-asym")])
        if config.kind != "int" or config.bits != 8 or config.act is not None:
            raise ValueError(f"bad recipe {recipe!r}: -asym takes weight-only int8 recipes (int8[-gG][-METHOD]); "
                             f"narrower integers are asymmetric already; {valid_recipes_message()}")
        return replace(config, symmetric=False)
    smooth = re.fullmatch(r"w8a8-(static-)?smooth(?:-([0-9.]+))?", text)
    if smooth:
        try:
            alpha = float(smooth[2]) if smooth[2] else DEFAULT_SMOOTH_ALPHA
            return QuantConfig("int", 8, None, True, None, "rtn", act="static" if smooth[1] else "dynamic",
                               smooth=alpha)
        except ValueError as e:
            raise ValueError(f"bad recipe {recipe!r}: {e}; {valid_recipes_message()}") from None
    act = re.fullmatch(r"w8a8-(dynamic|static)(?:-([a-z]+))?", text)
    if act:
        if act[2] is not None and (act[1] != "static" or act[2] not in OBSERVER_NAMES):
            raise ValueError(f"unknown recipe {recipe!r}; {valid_recipes_message()}")
        return QuantConfig("int", 8, None, True, None, "rtn", act=act[1], observer=act[2] or "minmax")
    a8 = re.fullmatch(r"(?P<w>[a-z0-9_]+?(?:-g\d+)?)-a8(?:-(?P<mode>dynamic|static))?(?:-(?P<obs>[a-z]+))?", text)
    if a8:
        mode = a8["mode"] or "static"
        if a8["obs"] is not None and (mode != "static" or a8["obs"] not in OBSERVER_NAMES):
            raise ValueError(f"unknown recipe {recipe!r}; {valid_recipes_message()}")
        w = parse_recipe(a8["w"])
        if w.method != "rtn":
            raise ValueError(f"bad recipe {recipe!r}: methods do not combine with -a8; {valid_recipes_message()}")
        try:
            return replace(w, symmetric=True, act=mode, observer=a8["obs"] or "minmax")
        except ValueError as e:
            raise ValueError(f"bad recipe {recipe!r}: {e}; {valid_recipes_message()}") from None
    m = _PATTERN.match(text)
    if not m:
        raise ValueError(f"unknown recipe {recipe!r}; {valid_recipes_message()}")
    fmt, group, method = m["fmt"], m["group"], m["method"] or "rtn"
    group_size = int(group) if group else None
    try:
        if fmt in FLOAT_FORMATS:
            if group_size is not None:
                raise ValueError("float formats take no group size")
            bits = 16 if fmt in ("fp16", "bf16") else 8
            return QuantConfig("float", bits, None, True, "fp8_e4m3" if fmt == "fp8" else fmt, method)
        if fmt in ("ternary", "binary"):
            return QuantConfig(fmt, 2 if fmt == "ternary" else 1, group_size, True, None, method)
        im = re.fullmatch(r"(int|kmeans)([2-8])", fmt)
        if im:
            kind, bits = im[1], int(im[2])
            # int8 is symmetric: that is what the int8 kernels take, and 8 bits leave room to spare.
            symmetric = kind == "int" and bits == 8
            return QuantConfig(kind, bits, group_size, symmetric, None, method)
    except ValueError as e:
        raise ValueError(f"bad recipe {recipe!r}: {e}; {valid_recipes_message()}") from None
    raise ValueError(f"unknown recipe {recipe!r}; {valid_recipes_message()}")


def with_options(config: QuantConfig, **changes) -> QuantConfig:
    return replace(config, **changes)


# ---------------------------------------------------------------------------------------------------
# A recipe per layer pattern

KEEP_FLOAT = ("float", "fp32", "none")  # a rule's value that leaves its layers float (also None)


def name_matches(name: str, pattern: str) -> bool:
    """Whether qualified layer name `name` matches `pattern`: a glob ("*.attention.*"), or a name, which
    also covers everything inside it ("encoder.layer.0" matches "encoder.layer.0.attention.query")."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


@dataclass(frozen=True)
class LayerRecipe:
    """Recipes per layer pattern, in order: rules of (pattern, QuantConfig, or None to keep float); the
    first pattern matching a layer's qualified name gives its recipe.

    Activation settings are the model's, not a layer's: the rules that quantize activations must agree
    on the mode, observer and smoothing, and all rules on the attention kind (lowbit.attention)."""

    rules: tuple[tuple[str, QuantConfig | None], ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a per-layer recipe needs at least one pattern")
        for pattern, config in self.rules:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"per-layer recipe: patterns are non-empty strings, got {pattern!r}")
            if config is not None and not isinstance(config, QuantConfig):
                raise TypeError(f"per-layer recipe: pattern {pattern!r} maps to {type(config).__name__}, "
                                "not a QuantConfig or None")
        acts = {(c.act, c.observer, c.smooth) for c in self.configs if c.act is not None}
        if len(acts) > 1:
            raise ValueError("per-layer recipe: the patterns that quantize activations disagree on how ("
                             + "; ".join(f"{p}: {c.name}" for p, c in self.rules if c is not None and c.act)
                             + "); activations are quantized one way per model")
        kinds = {c.attention for c in self.configs if c.act is not None} or {c.attention for c in self.configs}
        if len(kinds) > 1:
            raise ValueError("per-layer recipe: the patterns ask for different attention ("
                             + ", ".join(sorted(str(k or "float") for k in kinds)) + "); use one of "
                             "-bf16attn / -floatattn on all of them")

    @property
    def configs(self) -> list[QuantConfig]:
        """The distinct configs of the rules, in rule order."""
        out: list[QuantConfig] = []
        for _, c in self.rules:
            if c is not None and c not in out:
                out.append(c)
        return out

    def rule_for(self, name: str) -> tuple[str, QuantConfig | None] | None:
        """The first rule whose pattern matches `name`, or None."""
        return next((r for r in self.rules if name_matches(name, r[0])), None)

    def config_for(self, name: str) -> QuantConfig | None:
        rule = self.rule_for(name)
        return rule[1] if rule else None

    @property
    def lead(self) -> QuantConfig:
        """The config that speaks for the model as a whole (activations, attention): the first that
        quantizes activations, else the first rule's."""
        configs = self.configs
        if not configs:
            raise ValueError("per-layer recipe: every pattern keeps its layers float")
        return next((c for c in configs if c.act is not None), configs[0])

    @property
    def attention(self) -> str | None:
        return self.lead.attention

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self.configs)

    @property
    def name(self) -> str:
        return json.dumps({p: (c.name if c is not None else "float") for p, c in self.rules})

    def to_dict(self) -> dict:
        return {"rules": [[p, c.to_dict() if c is not None else None] for p, c in self.rules]}

    @classmethod
    def from_dict(cls, d: dict) -> LayerRecipe:
        return cls(tuple((p, QuantConfig.from_dict(c) if c is not None else None) for p, c in d["rules"]))


Recipe = str | QuantConfig | LayerRecipe | Mapping


def _rule_config(pattern: str, value) -> QuantConfig | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in KEEP_FLOAT):
        return None
    try:
        return parse_recipe(value)
    except (ValueError, TypeError) as e:
        raise type(e)(f"per-layer recipe, pattern {pattern!r}: {e}") from None


def read_recipe(recipe: Recipe | os.PathLike) -> QuantConfig | LayerRecipe:
    """Any recipe users write, as a QuantConfig (one recipe for every layer) or a LayerRecipe: a recipe
    string, a config, a mapping {pattern: recipe} or the path of a JSON file holding one."""
    if isinstance(recipe, (QuantConfig, LayerRecipe)):
        return recipe
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and recipe.strip().lower().endswith(".json")):
        path = Path(recipe)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"recipe file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f"recipe file {path} must hold a JSON object mapping layer patterns to recipes, "
                             'e.g. {"lm_head": "int8", "*": "int4-g128"}')
        try:
            return read_recipe(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"recipe file {path}: {e}") from None
    if isinstance(recipe, Mapping):
        if "rules" in recipe and isinstance(recipe["rules"], list):  # LayerRecipe.to_dict's form
            return LayerRecipe.from_dict(dict(recipe))
        return LayerRecipe(tuple((p, _rule_config(p, v)) for p, v in recipe.items()))
    return parse_recipe(recipe)


def recipe_fields(recipe: QuantConfig | LayerRecipe | None) -> dict:
    """A model's recipe as checkpoint manifests and transformers' quantization_config record it."""
    if isinstance(recipe, QuantConfig):
        return {"recipe": recipe.name, "config": recipe.to_dict(), "layer_recipe": None}
    if isinstance(recipe, LayerRecipe):
        return {"recipe": recipe.name, "config": None, "layer_recipe": recipe.to_dict()}
    return {"recipe": None, "config": None, "layer_recipe": None}


def recipe_from_fields(fields: dict) -> QuantConfig | LayerRecipe | None:
    """The recipe recipe_fields wrote (None when none was); ValueError when the record is malformed."""
    try:
        if fields.get("layer_recipe"):
            return LayerRecipe.from_dict(fields["layer_recipe"])
        if fields.get("config"):
            return QuantConfig.from_dict(fields["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed recipe record: {e}") from None
    return None

"""ONNX export of lowbit models, run and checked in ONNX Runtime (and OpenVINO when it imports).

How a model is written: on a copy of the model, every lowbit layer is replaced by a stand-in module that
holds the layer's own codes, scales and zero points in the target op's layout and calls a small custom op
(`torch.ops.lowbit_onnx.*`); `torch.onnx.export(dynamo=True)` traces the copy, and a translation table maps
each custom op to ONNX nodes. Everything else is the float model's own export.

    QuantLinear, integer codes (int8 .. int2, any method;  com.microsoft MatMulNBits: codes packed at 2, 4 or 8 bits
        ternary and binary as 2-bit codes)               per block of K, scales, zero points (packed uint8, or
                                                          float for HQQ's fractional ones), bias
    QuantEmbedding, integer codes                         Gather of uint8 code rows and of their scales and zero
                                                          points, dequantized in the graph

3-bit codes are written as 4-bit codes and 5..7-bit ones as 8-bit (the op takes 2, 4 and 8 bits): the same
values, more bytes; the export says which layers. Other formats (k-means codebooks, fp8, fp16, bf16) and any
layer type without a registered stand-in are refused with ExportError naming the layer and its recipe, unless
`dequantize_unsupported=True` writes them as float weights (listed in the output).

More layer types plug in with `register(layer_type, standin_factory, translations)` (see STANDINS and
TRANSLATIONS); `lowbit.export.onnx_w8a8`, when present, registers the W8A8 layers that way.

Verification (on by default): the written file is run in ONNX Runtime with graph optimizations off and fully
on (fusions have miscomputed before), and in OpenVINO on CPU with float32 precision when `openvino` imports;
each output is compared with lowbit's own model on the example inputs. Bounds: cosine >= MIN_COSINE and max
|diff| <= MAX_ABS_REL * max |lowbit's output| (the numbers are the same quantized ones: only the order of float
sums differs, which moves outputs by ~1e-6 relative per layer). Where lowbit itself runs layers with bf16 /
fp16 activations (PyTorch's int4 / int8 kernels, which round to 8 / 11 bits), the reference is a copy with those
layers computed in float32 from the same codes, and the agreement with the model as it runs is reported. Layers that
quantize activations (W8A8) loosen them (verify_bounds): there a float difference in the last place can flip
an activation code.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import inspect
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention, core
from ..files import set_usual_mode
from ..formats import Scheme
from ..layers import set_child
from ..modules import QuantEmbedding, QuantLinear, QuantModule
from .verify import Agreement, ExportError, compare

__all__ = ["MAX_ABS_REL", "MIN_COSINE", "OPTIONS", "STANDINS", "TRANSLATIONS", "contrib_op",
           "export", "from_checkpoint", "ort_session", "prepare", "register", "run_onnxruntime", "verify_bounds",
           "verify_file"]

MIN_COSINE = 0.9999
MAX_ABS_REL = 1e-3

# lowbit layer class -> factory(layer, qualified name) -> the stand-in module written in its place. Looked up
# along the layer class's MRO (the nearest registered base wins).
STANDINS: dict[type[nn.Module], Callable[[nn.Module, str], nn.Module]] = {}
# custom op overload (e.g. torch.ops.lowbit_onnx.matmul_nbits.default) -> its onnxscript translation
TRANSLATIONS: dict[Any, Callable] = {}


# Options of the export under way that stand-in factories read (accuracy_level: MatMulNBits' attribute).
OPTIONS: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("lowbit_onnx_options",
                                                                            default=MappingProxyType({}))


def register(layer_type: type[nn.Module], standin_factory: Callable[[nn.Module, str], nn.Module],
             translations: Mapping[Any, Callable]) -> None:
    """Export layers of `layer_type` (and its subclasses) as `standin_factory(layer, name)`, whose custom ops
    `translations` maps to onnxscript functions. A factory raises ExportError for a layer it cannot write."""
    STANDINS[layer_type] = standin_factory
    TRANSLATIONS.update(translations)


# ---------------------------------------------------------------------------------------------------
# Weight-only linears: com.microsoft MatMulNBits

MATMUL_NBITS_BITS = (2, 4, 8)  # what ONNX Runtime's MatMulNBits takes (its schema, and its CPU kernel)
PER_CHANNEL_BLOCK = 128  # block size for per-output-channel scales (the op needs blocks along K)


@torch.library.custom_op("lowbit_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 bias: torch.Tensor | None, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int = 0) -> torch.Tensor:
    """What MatMulNBits computes, from the very tensors written to the file (so that running a stand-in in
    PyTorch checks the packing): x @ ((codes - zero_points) * scales).T + bias, codes unpacked along K."""
    blocks = packed.shape[1]
    codes = core.unpack_bits(packed.reshape(-1), bits, n * blocks * block_size).reshape(n, blocks, block_size)
    if zero_points.dtype == torch.uint8:
        per_row = zero_points.shape[1] * 8 // bits
        zero = core.unpack_bits(zero_points.reshape(-1), bits, n * per_row).reshape(n, per_row)[:, :blocks]
    else:
        zero = zero_points.reshape(n, blocks)
    w = (codes.float() - zero.float().unsqueeze(-1)) * scales.reshape(n, blocks, 1)
    y = x @ w.reshape(n, blocks * block_size)[:, :k].to(x.dtype).t()
    return y if bias is None else y + bias


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, bias, k, n, bits, block_size, accuracy_level=0):
    return x.new_empty((*x.shape[:-1], n))


def contrib_op(name: str, inputs: Sequence[str], outputs: Sequence[str],
               type_constraints: Mapping[str, Sequence[str]], attributes: Mapping[str, str] = {}) -> Any:
    """An onnxscript op of ONNX Runtime's `com.microsoft` domain, for translations to call. The onnx package has
    no schemas for that domain, and the exporter needs one to build the node, so it is described here:
    inputs / outputs as "name:T" ("name:T?" optional), type constraints T -> ["tensor(float)", ...],
    attributes name -> "int" / "float" / "string" / "ints" (all required)."""
    from onnx.defs import OpSchema
    from onnxscript import values

    def param(spec: str) -> OpSchema.FormalParameter:
        pname, t = spec.split(":")
        option = OpSchema.FormalParameterOption.Optional if t.endswith("?") else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(pname, t.rstrip("?"), param_option=option)

    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "string": OpSchema.AttrType.STRING,
             "ints": OpSchema.AttrType.INTS}
    schema = OpSchema(name, "com.microsoft", 1, inputs=[param(i) for i in inputs],
                      outputs=[param(o) for o in outputs],
                      type_constraints=[(t, list(allowed), "") for t, allowed in type_constraints.items()],
                      attributes=[OpSchema.Attribute(a, kinds[k], required=True) for a, k in attributes.items()])
    return values.Op(values.Opset("com.microsoft", 1), name, schema)


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_MATMUL_NBITS = None


def _onnx_matmul_nbits(x, packed, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int,
                       accuracy_level: int = 0):
    global _MATMUL_NBITS
    if _MATMUL_NBITS is None:
        _MATMUL_NBITS = contrib_op(
            "MatMulNBits", ["A:T1", "B:T2", "scales:T1", "zero_points:T3?", "g_idx:T4?", "bias:T1?"], ["Y:T1"],
            {"T1": _FLOATS, "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)", *_FLOATS], "T4": ["tensor(int32)"]},
            {"K": "int", "N": "int", "bits": "int", "block_size": "int", "accuracy_level": "int"})
    # g_idx (input 4) is deprecated: left empty
    return _MATMUL_NBITS(x, packed, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size,
                         accuracy_level=accuracy_level)


def _nbits_layout(scheme: Scheme, shape: tuple[int, int], name: str, recipe: str) -> tuple[int, int]:
    """(bits, block size) of MatMulNBits for a layer's codes, or ExportError."""
    lay = scheme.layout(shape)
    bits = next(b for b in MATMUL_NBITS_BITS if b >= scheme.bits)
    if lay.grid[1] == 1:  # one scale per row: any block size, the scale repeated per block
        return bits, PER_CHANNEL_BLOCK
    group = lay.block[1]
    block = group & -group  # the largest power of two dividing the group: scales repeat per block
    if block < 16:
        raise ExportError(f"layer {name!r} ({recipe}): group size {group} has no power-of-two divisor >= 16, "
                          "which ONNX Runtime's MatMulNBits needs as its block size")
    return bits, block


class NBitsLinear(nn.Module):
    """Export stand-in of a weight-only QuantLinear: one MatMulNBits over the layer's own codes."""

    def __init__(self, layer: QuantLinear, name: str) -> None:
        super().__init__()
        recipe = layer.config.name
        scheme = layer.scheme
        if scheme.runs_on != "affine":
            raise ExportError(f"layer {name!r} ({recipe}): {scheme.name} weights have no MatMulNBits form")
        k, n = layer.in_features, layer.out_features
        bits, block = _nbits_layout(scheme, (n, k), name, recipe)
        codes, scale, zero = scheme.affine_codes(layer.canonical_state(), (n, k))  # [N, Kp], [N, Kp / G]
        kp = codes.shape[1]
        blocks = -(-k // block)
        group = kp // scale.shape[1]
        if blocks * block > kp:  # per channel, K not a multiple of the block: pad the codes (never read)
            codes = F.pad(codes, (0, blocks * block - kp))
        codes = codes[:, :blocks * block]
        # Scales and zero points of each block: the group's, repeated (a per-channel scale to every block).
        at = torch.arange(blocks) * block // group if scale.shape[1] > 1 else torch.zeros(blocks, dtype=torch.long)
        scale, zero = scale.float()[:, at].contiguous(), zero.float()[:, at].contiguous()
        integral = bool((zero == zero.round()).all() and zero.min() >= 0 and zero.max() <= 2 ** bits - 1)
        if integral:  # packed like the codes, each row padded to whole bytes
            per = 8 // bits
            z = F.pad(zero.to(torch.uint8), (0, -blocks % per))
            zero_points = core.pack_bits(z, bits).reshape(n, -1)
        elif bits == 8:
            raise ExportError(f"layer {name!r} ({recipe}): fractional zero points with {scheme.bits}-bit codes; "
                              "ONNX Runtime's MatMulNBits takes float zero points with 2- and 4-bit codes only")
        else:
            zero_points = zero
        self.k, self.n, self.bits, self.block = k, n, bits, block
        self.accuracy_level = int(OPTIONS.get().get("accuracy_level", 0))
        self.register_buffer("packed", core.pack_bits(codes, bits).reshape(n, blocks, block * bits // 8))
        self.register_buffer("scales", scale)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.register_buffer("input_scale", layer._buffers.get("input_scale"))
        self.note = (f"MatMulNBits {bits}-bit block {block}"
                     + (f" ({scheme.bits}-bit codes stored as {bits}-bit)" if bits != scheme.bits else "")
                     + ("" if integral else ", float zero points")
                     + (f", accuracy_level {self.accuracy_level}" if self.accuracy_level else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # AWQ's per-channel scale that no op before could take
            x = x * self.input_scale
        return torch.ops.lowbit_onnx.matmul_nbits(x, self.packed, self.scales, self.zero_points, self.bias,
                                                  self.k, self.n, self.bits, self.block, self.accuracy_level)


# ---------------------------------------------------------------------------------------------------
# Embeddings: a gather over the codes, dequantized in the graph


class CodesEmbedding(nn.Module):
    """Export stand-in of a QuantEmbedding: gathers rows of packed codes and of their scales and zero points,
    unpacks and dequantizes them: (codes - zero) * scale. Codes of up to 2 / 4 bits are packed 4 / 2 to a
    byte (3-bit ones as 4-bit), wider ones are one byte each. Only plain ops (Gather, Cast, Div, Floor, Mul,
    Sub), unpacked in float (exact for integers below 256), so that every runtime reads it; no float table."""

    def __init__(self, layer: QuantEmbedding, name: str) -> None:
        super().__init__()
        scheme = layer.scheme
        if scheme.runs_on != "affine":
            raise ExportError(f"layer {name!r} ({layer.config.name}): {scheme.name} embeddings have no integer "
                              "codes to gather")
        shape = (layer.num_embeddings, layer.embedding_dim)
        codes, scale, zero = scheme.affine_codes(layer.canonical_state(), shape)  # [V, Kp], [V, Kp / G]
        self.dim, self.groups, self.kp = layer.embedding_dim, scale.shape[1], codes.shape[1]
        self.width = next(b for b in (2, 4, 8) if b >= scheme.bits)
        per = 8 // self.width
        if per > 1:  # rows padded to whole bytes, so that a row's codes never share a byte with the next row's
            codes = F.pad(codes, (0, -self.kp % per))
            codes = core.pack_bits(codes, self.width).reshape(codes.shape[0], -1)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        self.register_buffer("shifts", torch.tensor([2.0 ** (self.width * j) for j in range(per)]))
        self.note = f"Gather of {scheme.bits}-bit codes" + (
            f" (packed at {self.width} bits)" if per > 1 and self.width != scheme.bits else
            " (packed)" if per > 1 else " (one byte each)")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        c = self.codes[idx].float()
        if self.width < 8:  # byte b holds codes floor(b / 2**(w*j)) mod 2**w, lowest bits first
            v = torch.floor(c.unsqueeze(-1) / self.shifts)
            c = (v - torch.floor(v / 2.0 ** self.width) * 2.0 ** self.width).flatten(-2)[..., :self.kp]
        c = c.reshape(*c.shape[:-1], self.groups, -1)
        w = (c - self.zero[idx].unsqueeze(-1)) * self.scale[idx].unsqueeze(-1)
        return w.reshape(*w.shape[:-2], -1)[..., :self.dim]


register(QuantLinear, NBitsLinear, {torch.ops.lowbit_onnx.matmul_nbits.default: _onnx_matmul_nbits})
register(QuantEmbedding, CodesEmbedding, {})


# ---------------------------------------------------------------------------------------------------
# Float stand-ins for layers written dequantized (dequantize_unsupported=True)


def _as_float(layer: nn.Module, name: str) -> nn.Module:
    """The layer as a float torch module over its dequantized weight (activation quantization dropped)."""
    w = layer.dequantized_weight().float()
    bias = getattr(layer, "bias", None)
    if isinstance(layer, QuantEmbedding):
        return nn.Embedding.from_pretrained(w.reshape(layer.num_embeddings, layer.embedding_dim), freeze=True)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    elif hasattr(layer, "geometry"):  # a W8A8 convolution
        geo = layer.geometry()
        conv = nn.Conv1d if len(geo["kernel_size"]) == 1 else nn.Conv2d
        out = conv(geo["in_channels"], geo["out_channels"], geo["kernel_size"], stride=geo["stride"],
                   padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"], bias=bias is not None)
    else:
        raise ExportError(f"layer {name!r}: {type(layer).__name__} has no float form to write")
    with torch.no_grad():
        out.weight.copy_(w.reshape(out.weight.shape))
        if bias is not None:
            out.bias.copy_(bias.float())
    if getattr(layer, "relu", False):  # a ReLU fused into the layer
        out = nn.Sequential(out, nn.ReLU())
    return out


def _standin_factory(layer: nn.Module) -> Callable[[nn.Module, str], nn.Module] | None:
    return next((STANDINS[cls] for cls in type(layer).__mro__ if cls in STANDINS), None)


def _recipe(layer: nn.Module) -> str:
    config = getattr(layer, "config", None)
    return getattr(config, "name", None) or type(layer).__name__


def _load_plugins() -> None:
    """Import the W8A8 writer, which registers its layers here; absent, W8A8 layers are refused."""
    name = "lowbit.export.onnx_w8a8"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise


def prepare(model: nn.Module, *, dequantize_unsupported: bool = False) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with every lowbit layer replaced by its export stand-in, and notes saying what became
    what. The model itself is not changed."""
    _load_plugins()
    out = copy.deepcopy(model)
    notes: list[str] = []
    floats: list[str] = []
    replaced: dict[str, nn.Module] = {}
    for name, mod in out.named_modules():
        if any(name.startswith(p + ".") for p in replaced) or name in replaced:
            continue
        factory = _standin_factory(mod)
        if factory is None and not isinstance(mod, QuantModule):
            continue
        if isinstance(mod, QuantModule) and mod.float_dtype != torch.float32:
            raise ExportError(f"layer {name or '(the model)'!r} computes in {mod.float_dtype}; ONNX export "
                              "writes float32 models")
        try:
            if factory is None:
                raise ExportError(f"layer {name or '(the model)'!r} ({_recipe(mod)}): no ONNX form for "
                                  f"{type(mod).__name__}")
            new = factory(mod, name)
            notes.append(f"{name or '(the model)'}: {getattr(new, 'note', type(new).__name__)}")
        except ExportError as e:
            if not dequantize_unsupported:
                raise ExportError(f"{e} (dequantize_unsupported=True writes such layers as float weights)") from None
            new = _as_float(mod, name)
            floats.append(f"{name or '(the model)'} ({_recipe(mod)})")
        replaced[name] = new
    for name, new in replaced.items():
        if name:
            set_child(out, name, new)
        else:
            out = new
    if floats:
        notes.append("written as float weights (dequantized; activation quantization dropped): "
                     + ", ".join(floats))
    return out, notes


# ---------------------------------------------------------------------------------------------------
# Export


class _Traced(nn.Module):
    """model(*args), or model(**dict(zip(names, args))) for a dict input (traced as positional inputs of those
    names), returning plain tensors (see plain_outputs)."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.names is None:
            return plain_outputs(self.model(*args))
        return plain_outputs(self.model(**dict(zip(self.names, args, strict=True))))


HF_OUTPUTS = ("last_hidden_state", "logits")  # what a transformers model's export returns, the first found


def _output_key(out: Any) -> str | None:
    if isinstance(out, Mapping):
        return next((k for k in HF_OUTPUTS if isinstance(out.get(k), torch.Tensor)), None)
    return None


def plain_outputs(out: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A model's output as a tensor or a tuple of tensors (what an ONNX graph returns): a transformers
    ModelOutput gives its last_hidden_state, else its logits."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict
        key = _output_key(out)
        if key is not None:
            return out[key]
        tensors = tuple(v for v in out.values() if isinstance(v, torch.Tensor))
    elif isinstance(out, (tuple, list)):
        tensors = tuple(v for v in out if isinstance(v, torch.Tensor))
    else:
        raise ExportError(f"the model returns a {type(out).__name__}; ONNX export needs tensors")
    if not tensors:
        raise ExportError("the model's output holds no tensors")
    return tensors[0] if len(tensors) == 1 else tensors


def _as_list(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], dynamic: bool) -> Any:
    """Batch (dim 0) and sequence (dim 1 of token ids [B, S] and of activations [B, S, D]) left free, one Dim
    each shared by all inputs, so that one file serves any batch and length. For _Traced's *args."""
    if not dynamic:
        return None
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")

    def dims(t: torch.Tensor) -> dict[int, Any] | None:
        # token ids [B, S]; float activations [B, S, D] or [B, D]; images [B, C, H, W] free in B only
        free = t.dim() if not t.is_floating_point() else 2 if t.dim() == 3 else 1
        return {i: d for i, d in zip(range(min(free, t.dim())), (batch, seq), strict=False)} or None

    return (tuple(dims(t) for t in inputs),)


def _strip_trace_metadata(model: Any) -> None:
    """Drop what the exporter notes per node and value for debugging (Python stack traces with this machine's
    paths, FX node text): a third of a small model's file, and no business of whoever runs it."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's exporter logs and warns about things that do not concern the user (torchvision's ops
    missing, deprecations inside torch.export); lowbit reports what it did itself."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            yield
    finally:
        log.setLevel(level)


def _inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], list[str] | None]:
    """(the input tensors in order, their keyword names when the model takes a dict)."""
    if isinstance(example_inputs, Mapping):
        names, inputs = list(example_inputs), tuple(example_inputs.values())
    elif isinstance(example_inputs, torch.Tensor):
        names, inputs = None, (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        names, inputs = None, tuple(example_inputs)
    else:
        inputs = ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError(f"example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, got "
                          f"{type(example_inputs).__name__}")
    return inputs, names


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
           input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
           dynamic: bool = True, verify: bool = True, echo: Callable[[str], Any] = print,
           dequantize_unsupported: bool = False, openvino: bool | None = None, accuracy_level: int = 0) -> Path:
    """Write `model` (lowbit-quantized, float32) as ONNX at `path` and check it in ONNX Runtime.

    example_inputs: a tuple of tensors (model(*inputs)) or a dict (model(**inputs), as transformers models
    take), used to trace and to verify. dynamic: batch and sequence dims stay free. verify: run the file in
    ONNX Runtime (optimizations off, then all on) and OpenVINO (when it imports and `openvino` is not False)
    and raise ExportError when an output strays past the bounds (see the module's docstring); nothing is left
    at `path` then. dequantize_unsupported: write layers that have no ONNX form as float weights (listed)
    instead of refusing. accuracy_level: MatMulNBits' attribute; 0 (the default) computes in float32 from the
    exact weights; 4 lets ONNX Runtime quantize the activations to int8 per block (faster, especially for 8-
    and 2-bit codes, which its float kernel dequantizes on every call; no longer lowbit's numbers: the
    verification bounds still apply). A transformers model's output is its last_hidden_state (or logits).
    Weights are kept inside the file (no external data), which ONNX limits to 2 GB."""
    import onnx  # noqa: F401  (a clear ImportError up front when the export extra is missing)

    path = Path(path)
    inputs, keywords = _inputs(example_inputs)
    names = list(input_names) if input_names is not None else (
        keywords or ([f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]))
    if len(names) != len(inputs):
        raise ExportError(f"{len(names)} input names for {len(inputs)} inputs")
    was_training = model.training
    model.eval()
    token = OPTIONS.set({"accuracy_level": accuracy_level})
    half = _half_activation_layers(model)
    rounded = bool(half) or attention.uses(model)
    try:
        standin, notes = prepare(model, dequantize_unsupported=dequantize_unsupported)
        if attention.uses(standin):  # the file's attention: ONNX's float32 ops
            standin.set_attn_implementation("sdpa")
            notes.append("attention: float32 in the file (lowbit runs it with bf16 matmuls)")
        with torch.no_grad():
            raw = _run(model, inputs, keywords)
            as_run, key = _as_list(plain_outputs(raw)), _output_key(raw)
            # The file computes in float32 from the exact weights. Where lowbit runs layers on bf16 / fp16
            # activations (PyTorch's int4 / int8 kernels) or int8 ones (lowbit_q8), or attention with bf16
            # matmuls, the file is checked against the same layers run in float32 from the same codes
            # ("dequant") and float32 attention, so that the bounds stay tight; the model as it runs is
            # compared too, and reported.
            reference = as_run if not rounded else _as_list(plain_outputs(_run(_exact_copy(model, half), inputs,
                                                                                 keywords)))
    finally:
        OPTIONS.reset(token)
        model.train(was_training)
    for note in notes:
        echo(note)
    if output_names is None:  # not the name of a value inside the graph (such a model does not load)
        output_names = [key or "output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(_Traced(standin, keywords).eval(), inputs, dynamo=True,
                                        custom_translation_table=dict(TRANSLATIONS),
                                        dynamic_shapes=_dynamic_shapes(inputs, dynamic), input_names=names,
                                        output_names=list(output_names), external_data=False, optimize=True,
                                        verbose=False, report=False)
    except Exception as e:  # torch.export / torch.onnx raise many types; the full error stays chained
        lines = [line for line in str(e).splitlines() if line.strip()]
        # torch.onnx's message opens with generic advice; its "Exception summary" says what went wrong
        at = next((i + 1 for i, line in enumerate(lines) if "Exception summary" in line), 0)
        first = lines[at] if at < len(lines) else type(e).__name__
        shapes = dynamic and any(w in first.lower() for w in ("constraint", "dynamic", "specializ"))
        hint = " (dynamic=False traces fixed shapes)" if shapes else ""
        raise ExportError(f"torch.onnx.export could not trace the model: {first}{hint}") from e
    echo(f"inputs: {', '.join(names)}; outputs: {', '.join(output_names)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _strip_trace_metadata(program.model)
        program.save(str(tmp), external_data=False)
        set_usual_mode(tmp)  # mkstemp made it owner-only
        if verify:
            feeds = dict(zip(names, inputs, strict=True))
            if rounded:
                what = [f"{len(half)} layer(s) with bf16/fp16 or int8 activations (e.g. {half[0]})"] if half else []
                what += ["attention with bf16 matmuls"] if attention.uses(model) else []
                echo(f"lowbit runs {' and '.join(what)}; the file computes in float32, so it is checked against "
                     "the same codes run in float32; its agreement with the model as it runs is reported")
            min_cosine, max_abs_rel = verify_bounds(standin)
            verify_file(tmp, feeds, reference, echo=echo, openvino=openvino, max_abs_rel=max_abs_rel,
                        min_cosine=min_cosine)
            if rounded:  # reported, not bounded: the difference is lowbit's own activation rounding, not the file's
                got = run_onnxruntime(tmp, feeds)
                for i, (r, g) in enumerate(zip(as_run, got, strict=True)):
                    label = "ONNX Runtime vs lowbit's kernels on rounded activations"
                    echo(str(compare(r, g, label + (f" output {i}" if i else ""))))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Running the file


def _numpy(t: torch.Tensor) -> Any:
    return t.detach().cpu().contiguous().numpy()


def ort_session(path: str | os.PathLike, *, optimize: bool = True, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; spinning off so that several sessions in one process do not fight."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str | os.PathLike, feeds: Mapping[str, torch.Tensor], *, optimize: bool = True,
                    session: Any = None) -> list[torch.Tensor]:
    """Outputs of the ONNX file at `path` in ONNX Runtime on `feeds` (input name -> tensor)."""
    sess = session or ort_session(path, optimize=optimize)
    wanted = {i.name for i in sess.get_inputs()}
    return [torch.from_numpy(o) for o in sess.run(None, {k: _numpy(v) for k, v in feeds.items() if k in wanted})]


def _run_openvino(path: Path, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    import openvino as ov

    core_ = ov.Core()
    # float32 throughout: by default the CPU plugin computes in bf16 where the CPU has it and quantizes the
    # activations of compressed-weight matmuls to int8, which would measure OpenVINO's choices, not the file.
    compiled = core_.compile_model(core_.read_model(str(path)), "CPU",
                                   {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})
    names = [i.get_any_name() for i in compiled.inputs]
    result = compiled({n: _numpy(feeds[n]) for n in names if n in feeds})
    return [torch.from_numpy(result[o].copy()) for o in compiled.outputs]


def verify_bounds(standin: nn.Module) -> tuple[float, float]:
    """(min cosine, max |diff| relative to max |output|) for a model prepared for export: MIN_COSINE and
    MAX_ABS_REL, or the looser bounds a stand-in in it asks for with a `verify_bounds` attribute (layers that
    quantize activations, whose codes flip on float rounding: see onnx_w8a8)."""
    cos, rel = MIN_COSINE, MAX_ABS_REL
    for mod in standin.modules():
        asked = getattr(mod, "verify_bounds", None)
        if asked is not None:
            cos, rel = min(cos, asked[0]), max(rel, asked[1])
    return cos, rel


def _check(reference: list[torch.Tensor], got: list[torch.Tensor], runtime: str,
           max_abs_rel: float, min_cosine: float = MIN_COSINE) -> list[Agreement]:
    if len(got) != len(reference):
        raise ExportError(f"{runtime} returned {len(got)} outputs where lowbit's model gives {len(reference)}")
    many = len(reference) > 1
    return [compare(r, g, f"{runtime} output {i}" if many else runtime, min_cosine=min_cosine,
                    max_abs=max_abs_rel * max(r.detach().abs().max().item() if r.numel() else 0.0, 1e-6))
            for i, (r, g) in enumerate(zip(reference, got, strict=True))]


def _run(model: nn.Module, inputs: Sequence[torch.Tensor], keywords: Sequence[str]) -> Any:
    return model(**dict(zip(keywords, inputs, strict=True))) if keywords else model(*inputs)


def _exact_copy(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """A copy of `model` whose `layers` run in float32 from their own codes (the "dequant" kernel), and
    whose attention is torch's float32 SDPA."""
    exact = copy.deepcopy(model)
    for name in layers:
        exact.get_submodule(name).set_kernel("dequant")
    if attention.uses(exact):
        exact.set_attn_implementation("sdpa")
    return exact


def _half_activation_layers(model: nn.Module) -> list[str]:
    """Weight-only layers lowbit runs with rounded activations (bf16 / fp16, or int8 in lowbit_q8's decode
    GEMV): its outputs carry that rounding, the file's do not."""
    return [name for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act_dtype in (torch.bfloat16, torch.float16, torch.int8)
            or isinstance(m, QuantModule) and getattr(m, "act_dtype", None) in (torch.bfloat16, torch.float16)]


def verify_file(path: Path, feeds: Mapping[str, torch.Tensor], reference: list[torch.Tensor], *,
                echo: Callable[[str], Any] = print, openvino: bool | None = None,
                max_abs_rel: float | None = None, min_cosine: float = MIN_COSINE) -> list[Agreement]:
    """Run the ONNX file in ONNX Runtime (optimizations off and all on) and OpenVINO; compare with
    `reference` (lowbit's outputs); ExportError past the bounds (cosine >= min_cosine; max |diff| <=
    max_abs_rel, MAX_ABS_REL by default, times the output's largest magnitude). OpenVINO failing to read or compile the file is reported,
    not raised (its ONNX reader lacks some contrib ops), and so is an OpenVINO result past the bounds, unless
    openvino=True asks for it."""
    max_abs_rel = MAX_ABS_REL if max_abs_rel is None else max_abs_rel
    agreements = []
    for optimize in (False, True):
        label = f"ONNX Runtime (optimizations {'all' if optimize else 'off'})"
        try:
            got = run_onnxruntime(path, feeds, optimize=optimize)  # one session at a time, dropped after
        except Exception as e:  # noqa: BLE001  (ORT raises its own types; the message carries the reason)
            raise ExportError(f"{label} cannot run the exported file: {e}") from None
        found = _check(reference, got, label, max_abs_rel, min_cosine)
        agreements += found
        for a in found:
            echo(str(a))
    if openvino is False:
        return agreements
    try:
        import openvino as _  # noqa: F401
    except ImportError:
        if openvino:
            raise
        return agreements
    try:
        got = _run_openvino(path, feeds)
    except Exception as e:  # noqa: BLE001  (any reader or compiler failure means: not supported)
        echo(f"OpenVINO: not supported ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        return agreements
    try:
        found = _check(reference, got, "OpenVINO (CPU, f32)", max_abs_rel, min_cosine)
    except ExportError as e:
        if openvino:  # asked for explicitly: its result is part of the bar
            raise
        # The file is ONNX Runtime's to run (checked above); OpenVINO reading it otherwise is reported loudly.
        message = f"OpenVINO computes this file differently: {e}"
        warnings.warn(message, stacklevel=3)
        echo(message)
        return agreements
    agreements += found
    for a in found:
        echo(str(a))
    return agreements


# ---------------------------------------------------------------------------------------------------
# From a checkpoint folder

SAMPLE_TEXTS = ("A quantized model runs in ONNX Runtime.", "Short text.",
                "The quick brown fox jumps over the lazy dog near the river bank.")


def from_checkpoint(checkpoint: Path, out: Path, *, echo: Callable[[str], Any] = print, **options: Any) -> Path:
    """Load a lowbit checkpoint folder of a transformers model (lowbit.load), build example inputs with its
    saved tokenizer, export to `out` and verify; `options` go to export()."""
    from .. import checkpoint as ckpt

    checkpoint = Path(checkpoint)
    manifest = ckpt.read_manifest(checkpoint)
    if "hf_config" not in manifest.get("model", {}):
        raise ExportError(f"{checkpoint} holds a {manifest.get('model', {}).get('class', 'model')}, not a "
                          "transformers model: export it from Python with lowbit.export.onnx(model, "
                          "example_inputs, path) after lowbit.load(directory, model=...)")
    if not any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ExportError(f"{checkpoint} has no tokenizer to build example inputs from: save the model with "
                          "lowbit.save(model, directory, tokenizer=tokenizer), or export from Python with "
                          "lowbit.export.onnx(model, example_inputs, path)")
    from transformers import AutoTokenizer

    model = ckpt.load(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    accepted = set(inspect.signature(model.forward).parameters)
    inputs = {k: v for k, v in batch.items() if k in accepted}
    started = time.perf_counter()
    path = export(model, inputs, out, echo=echo, **options)
    echo(f"exported {checkpoint} in {time.perf_counter() - started:.1f} s: inputs {', '.join(inputs)}")
    return path

"""GGUF for llama.cpp: Llama-family causal LMs (Llama, Mistral, Qwen2) with lowbit's own codes.

    lowbit.export.gguf(model, "model.gguf", tokenizer=tokenizer)
    lowbit export CHECKPOINT --format gguf -o model.gguf

Weights go to the GGUF block type that holds lowbit's numbers exactly, packed here (nothing is
re-quantized): int8 symmetric -> Q8_0 (fp16 d, 32 int8 per block: w = d * q), int4 symmetric -> Q4_0
(fp16 d, 32 nibbles: w = d * (u - 8)), int4 asymmetric (HQQ's fractional zero points included) -> Q4_1
(fp16 d and m: w = d * u + m, d = scale, m = -zero_point * scale); 2- and 3-bit codes go into the same
4-bit blocks and symmetric 5..7-bit ones into Q8_0 (the same values in more bytes). A GGUF block is 32 inputs; a lowbit
group of 64 or 128 (or one scale per row) becomes several blocks repeating the group's scale. Only the
scales are rounded, to fp16: each weight moves by at most |u - zero| * |scale - fp16(scale)| (plus
|zero * scale - fp16(zero * scale)| in Q4_1), about 2**-11 of (|u| + |zero|) * scale. Float layers
(norms, embeddings and heads left in float) are written F32 (F16 when they are fp16). Anything else -
asymmetric 5..8-bit codes, codebooks, ternary, groups that are not a multiple of 32, int8-activation layers - is
refused with one ExportError naming the layer and its format.

llama.cpp computes rotary embeddings on interleaved pairs, Hugging Face's Llama on the two halves of
each head: as llama.cpp's own converter does, the rows of q_proj and k_proj are permuted per head (a
quantized row moves with its scales and zero points, so this is exact). Qwen2 uses the halves in both.

The tokenizer must be a fast byte-level BPE (GPT-2, Llama 3 and Qwen2 style pre-tokenizers); it is
written as llama.cpp's "gpt2" model with the pre-tokenizer name llama.cpp knows it by.

Every export is read back with the gguf package's reader, each tensor dequantized by the package's own
dequantize and compared with lowbit's dequantized weights against the bound above; the file is written
to a temporary name and renamed into place only when it agrees.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..formats import AffineScheme, FloatScheme
from ..modules import QuantEmbedding, QuantLinear, QuantModule
from .verify import Agreement, ExportError

__all__ = ["export", "from_checkpoint"]

BLOCK = 32  # inputs per GGUF block (Q8_0, Q4_0, Q4_1)

# Hugging Face model_type -> (llama.cpp architecture, whether q/k rows are permuted for its rope).
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}

# Split regexes of byte-level BPE tokenizers -> the pre-tokenizer name llama.cpp selects them by
# (llama.cpp's llama-vocab.cpp; GPT-2's regex is the one tokenizers' ByteLevel applies itself).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# gguf's TokenType values (written as plain ints: gguf is imported only when an export runs).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass
class _Tensor:
    """One tensor as written: GGUF name, type name, payload (raw blocks uint8 [N, bytes] or float array,
    rows in the file's order), and what it must read back as, in the model's row order: expect() gives
    lowbit's weight and the allowed error (computed when checked, so that a large model's float weights
    are not all held at once)."""

    name: str
    source: str  # the model's layer or parameter name, for messages
    qtype: str  # "Q8_0", "Q4_0", "Q4_1", "F32", "F16"
    data: np.ndarray
    expect: Callable[[], tuple[torch.Tensor, torch.Tensor | float]]
    perm: torch.Tensor | None = None  # row r of the file is row perm[r] of the model's weight
    recipe: str = "float"


# ---------------------------------------------------------------------------------------------------
# Block packing (llama.cpp's ggml-common.h layouts, little-endian)


def _fp16(t: torch.Tensor, layer: str, what: str) -> torch.Tensor:
    """float32 -> float16, refusing values fp16 cannot hold (they would read back as inf)."""
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ExportError(f"layer {layer!r}: a {what} of {t.abs().max().item():.4g} does not fit GGUF's fp16 "
                          "block scales (at most 65504)")
    return h


def _with_d(parts: list[torch.Tensor], n: int, nb: int) -> np.ndarray:
    """Concatenate per-block byte fields ([n, nb, bytes] uint8 each) into rows of blocks, [n, nb * size]."""
    return torch.cat(parts, dim=-1).reshape(n, -1).numpy()


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    """[n, nb] float16 -> [n, nb, 2] uint8, little-endian as the file stores it."""
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)  # x86 and ARM hosts are little-endian


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """q int codes [N, K] in [-128, 127], d float16 [N, K / 32] -> Q8_0 rows (34 bytes per block)."""
    n, k = q.shape
    qs = q.to(torch.int8).reshape(n, k // BLOCK, BLOCK).view(torch.uint8)
    return _with_d([_half_bytes(d), qs], n, k // BLOCK)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """u [N, K] in [0, 15] -> [N, K / 32, 16] bytes: element j of a block in the low nibble of byte j,
    element j + 16 in its high nibble (ggml's block_q4_0 / block_q4_1)."""
    n, k = u.shape
    b = u.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    return b[..., :BLOCK // 2] | (b[..., BLOCK // 2:] << 4)


def pack_q4_0(u: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """u codes [N, K] in [0, 15] (w = d * (u - 8)), d float16 [N, K / 32] -> Q4_0 rows (18 bytes a block)."""
    n, k = u.shape
    return _with_d([_half_bytes(d), _nibbles(u)], n, k // BLOCK)


def pack_q4_1(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """u codes [N, K] in [0, 15] (w = d * u + m), d and m float16 [N, K / 32] -> Q4_1 rows (20 bytes)."""
    n, k = u.shape
    return _with_d([_half_bytes(d), _half_bytes(m), _nibbles(u)], n, k // BLOCK)


# ---------------------------------------------------------------------------------------------------
# One layer -> one tensor


def _permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp wants for a q/k projection of `heads` heads: per head, HF's halves
    [x0..x(h/2-1), y0..] become interleaved pairs [x0, y0, x1, y1, ...]. Row r of the file is row perm[r]."""
    if rows % (2 * heads):
        raise ExportError(f"a projection of {rows} rows cannot be split into {heads} heads of even size")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _refuse(name: str, what: str, why: str) -> ExportError:
    return ExportError(f"layer {name!r} ({what}) cannot be written to GGUF: {why}. GGUF takes int8 "
                       "symmetric (Q8_0) and int4 (Q4_0 symmetric, Q4_1 asymmetric) with one scale per row "
                       "or per group of a multiple of 32, and float layers; exclude the layer from "
                       "quantization or re-quantize it")


def _quantized(gguf_name: str, name: str, mod: QuantModule, perm: torch.Tensor | None) -> _Tensor:
    recipe = mod.config.name
    if not isinstance(mod, (QuantLinear, QuantEmbedding)):
        raise _refuse(name, recipe, f"{type(mod).__name__} layers quantize their activations too, and GGUF "
                                    "stores weights only")
    shape = mod.float_weight_shape()
    if len(shape) != 2:
        raise _refuse(name, recipe, f"its weight has shape {tuple(shape)}, not a matrix")
    if "input_scale" in mod.canonical_state():
        raise _refuse(name, recipe, "it multiplies its inputs by a per-channel scale that GGUF has no "
                                    "place for")
    scheme, state = mod.scheme, mod.canonical_state()
    n, k = shape
    if isinstance(scheme, FloatScheme):
        w = scheme.decode(state, shape)
        data = w if perm is None else w[perm]
        # fp16 values are exact in F16; bf16 and fp8 values in F32.
        data, qtype = (data.to(torch.float16), "F16") if scheme.fmt == "fp16" else (data, "F32")
        return _Tensor(gguf_name, name, qtype, data.numpy(), lambda: (scheme.decode(state, shape), 0.0), perm,
                       recipe)
    if not isinstance(scheme, AffineScheme) or scheme.signed:
        raise _refuse(name, recipe, f"{scheme.name} weights have no GGUF block type that holds them exactly")
    # 2- and 3-bit codes fit 4-bit blocks and symmetric 5..7-bit ones Q8_0 exactly (same values, more bytes).
    if scheme.bits > 4 and not scheme.symmetric:
        raise _refuse(name, recipe, f"{scheme.bits}-bit codes with zero points have no GGUF block type (Q8_0 is "
                                    "symmetric; Q4_1 holds 4 bits)")
    lay = scheme.layout(shape)
    group = lay.block[1]
    if lay.block[0] != 1 or group % BLOCK:
        raise _refuse(name, recipe, f"its groups of {group} inputs are not a multiple of GGUF's 32-input "
                                    "blocks")
    if k % BLOCK:
        raise _refuse(name, recipe, f"its {k} inputs per row are not a multiple of GGUF's 32-input blocks")
    u, s, z = scheme.affine_codes(state, shape)  # u [N, Kp], s / z [N, Kp / G]: W = (u - z) * s
    u = u[:, :k]
    # One scale (and zero point) per 32-input block: the group's, repeated over its blocks.
    s = s.float().repeat_interleave(group // BLOCK, dim=1)[:, :k // BLOCK]
    z = z.float().repeat_interleave(group // BLOCK, dim=1)[:, :k // BLOCK]
    d = _fp16(s, name, "scale")
    mz = -z * s
    m = _fp16(mz, name, "zero point times scale")  # Q4_1's offset
    if perm is None:
        pu, pd, pm = u, d, m
    else:
        pu, pd, pm = u[perm], d[perm], m[perm]
    if not scheme.symmetric:
        data, qtype = pack_q4_1(pu, pd, pm), "Q4_1"
    elif scheme.bits > 4:
        data, qtype = pack_q8_0(pu.to(torch.int16) - int(scheme.zero), pd), "Q8_0"
    else:  # Q4_0's zero is 8, as lowbit's symmetric 4-bit zero: 4-bit codes go in as they are
        data, qtype = pack_q4_0(pu.to(torch.int16) - int(scheme.zero) + 8, pd), "Q4_0"

    def expect() -> tuple[torch.Tensor, torch.Tensor]:
        # The weight moves by the fp16 rounding of its block's scale times |u - zero| (Q8_0, Q4_0), or of
        # scale times |u| plus that of m (Q4_1); float32 arithmetic on both sides adds a few ulps.
        uf = u.float().reshape(n, k // BLOCK, BLOCK)
        ds = (s - d.float()).abs().unsqueeze(-1)
        if scheme.symmetric:
            bound = (uf - scheme.zero).abs() * ds
        else:
            bound = uf * ds + (mz - m.float()).abs().unsqueeze(-1)
        bound = bound + 2.0 ** -20 * (uf + z.abs().unsqueeze(-1)) * s.abs().unsqueeze(-1)
        return mod.dequantized_weight().reshape(n, k).float(), bound.reshape(n, k)

    return _Tensor(gguf_name, name, qtype, data, expect, perm, recipe)


def _float(gguf_name: str, name: str, t: torch.Tensor, perm: torch.Tensor | None = None,
           force_f32: bool = False) -> _Tensor:
    """A float parameter as F32 (norms always: llama.cpp computes them in F32), or F16 when it is fp16."""
    w = t.detach()
    qtype = "F16" if t.dtype == torch.float16 and not force_f32 else "F32"
    data = (w if perm is None else w[perm]).to(torch.float16 if qtype == "F16" else torch.float32)
    return _Tensor(gguf_name, name, qtype, data.contiguous().numpy(), lambda: (w.float(), 0.0), perm)


def _weight(gguf_name: str, name: str, mod: nn.Module, perm: torch.Tensor | None = None) -> _Tensor:
    if isinstance(mod, QuantModule):
        return _quantized(gguf_name, name, mod, perm)
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        return _float(gguf_name, name, mod.weight, perm)
    raise ExportError(f"layer {name!r} is a {type(mod).__name__}; a Llama-family model has a linear or an "
                      "embedding there")


def _bias(gguf_name: str, name: str, mod: nn.Module, perm: torch.Tensor | None = None) -> list[_Tensor]:
    b = getattr(mod, "bias", None)
    return [] if b is None else [_float(gguf_name, name + ".bias", b, perm, force_f32=True)]


# ---------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class _Shape:
    arch: str
    permute: bool
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    eps: float
    rope_theta: float
    vocab: int


def _config_shape(model: nn.Module) -> _Shape:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export takes Llama-family causal LMs ({', '.join(ARCHITECTURES)}); this "
                          f"model is {type(model).__name__} (model_type {model_type!r})")
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise ExportError(f"GGUF export takes a causal LM with its head "
                          f"({model_type.capitalize()}ForCausalLM); got {type(model).__name__}")
    arch, permute = ARCHITECTURES[model_type]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"rope scaling {rope_type!r} is not written to GGUF by lowbit (only the default "
                          "rope)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if getattr(config, "mlp_bias", False):
        raise ExportError("MLP biases have no place in llama.cpp's Llama graph")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return _Shape(arch, permute, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                  heads,
                  getattr(config, "num_key_value_heads", None) or heads, head_dim,
                  config.max_position_embeddings, float(config.rms_norm_eps), float(theta),
                  int(model.model.embed_tokens.num_embeddings))


def _tensors(model: nn.Module, shape: _Shape) -> list[_Tensor]:
    body = model.model
    out = [_weight("token_embd.weight", "model.embed_tokens", body.embed_tokens)]
    q_perm = _permutation(shape.heads * shape.head_dim, shape.heads) if shape.permute else None
    k_perm = _permutation(shape.kv_heads * shape.head_dim, shape.kv_heads) if shape.permute else None
    for i, block in enumerate(body.layers):
        pre, at = f"model.layers.{i}", f"blk.{i}"
        attn, mlp = block.self_attn, block.mlp
        out.append(_float(f"{at}.attn_norm.weight", f"{pre}.input_layernorm", block.input_layernorm.weight,
                          force_f32=True))
        for proj, gname, perm in (("q_proj", "attn_q", q_perm), ("k_proj", "attn_k", k_perm),
                                  ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
            mod = getattr(attn, proj)
            out.append(_weight(f"{at}.{gname}.weight", f"{pre}.self_attn.{proj}", mod, perm))
            out += _bias(f"{at}.{gname}.bias", f"{pre}.self_attn.{proj}", mod, perm)
        out.append(_float(f"{at}.ffn_norm.weight", f"{pre}.post_attention_layernorm",
                          block.post_attention_layernorm.weight, force_f32=True))
        for proj, gname in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out.append(_weight(f"{at}.{gname}.weight", f"{pre}.mlp.{proj}", getattr(mlp, proj)))
    out.append(_float("output_norm.weight", "model.norm", body.norm.weight, force_f32=True))
    head, embed = model.lm_head, body.embed_tokens
    tied = not isinstance(head, QuantModule) and not isinstance(embed, QuantModule) and (
        head.weight.data_ptr() == embed.weight.data_ptr())
    if not tied:  # a tied head is llama.cpp's default: it reads token_embd when `output` is absent
        out.append(_weight("output.weight", "lm_head", head))
    return out


# ---------------------------------------------------------------------------------------------------
# The tokenizer


def _tokenizer_fields(tokenizer: Any, vocab_rows: int) -> dict[str, Any]:
    """What llama.cpp's "gpt2" tokenizer reads: tokens by id, their types, merges, special ids and the
    pre-tokenizer's name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"the tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                          "GGUF export writes byte-level BPE tokenizers only")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"the tokenizer is a {model.get('type')} model; GGUF export writes byte-level BPE "
                          "tokenizers only (sentencepiece and WordPiece vocabularies are not converted)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), spec.get("normalizer"))
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    if max(vocab.values(), default=-1) >= vocab_rows:
        raise ExportError(f"the tokenizer has token id {max(vocab.values())} but the model's embedding has "
                          f"only {vocab_rows} rows")
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            kind = _NORMAL if i not in added else _CONTROL if added[i].get("special") else _USER_DEFINED
            types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # add_bos / add_eos: what the tokenizer itself adds around a text.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    fields: dict[str, Any] = {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
                              "add_bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
                              "add_eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id}
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            fields[key] = int(tid)
    return fields


def _pre_tokenizer_name(pre: dict | None, normalizer: dict | None) -> str:
    def bytelevel(p: dict | None, regex: bool) -> bool:
        return (p is not None and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex
                and not p.get("add_prefix_space", False))

    name = None
    if bytelevel(pre, True):
        name = "gpt-2"
    elif pre is not None and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and bytelevel(steps[1], False)
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
            name = PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is none llama.cpp knows "
                          "by name (GGUF export takes GPT-2's byte-level regex, Llama 3's or Qwen2's)")
    if normalizer is not None and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        raise ExportError(f"the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp's "
                          f"{name!r} tokenizer does not")
    return name


# ---------------------------------------------------------------------------------------------------
# Writing and reading back


def _write(path: Path, shape: _Shape, tensors: list[_Tensor], tok: dict[str, Any] | None, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), shape.arch)
    writer.add_name(name)
    counts: dict[str, int] = {}
    for t in tensors:
        if t.data.ndim == 2:
            counts[t.qtype] = counts.get(t.qtype, 0) + t.data.shape[0]
    main = max(counts, key=counts.get) if counts else "F32"
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                  "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    writer.add_file_type(file_types[main])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_vocab_size(shape.vocab)
    if tok is None:
        writer.add_tokenizer_model("none")
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
            if key in tok:
                add(tok[key])
        writer.add_add_bos_token(bool(tok["add_bos"]))
        writer.add_add_eos_token(bool(tok["add_eos"]))
    for t in tensors:
        raw = None if t.qtype in ("F32", "F16") else gguf.GGMLQuantizationType[t.qtype]
        writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _verify(path: Path, tensors: list[_Tensor]) -> str:
    """Read `path` back with gguf's reader, dequantize each tensor with gguf's own code, and check it against
    lowbit's weights within the stated bound. Returns the line to print."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    expected = {t.name: t for t in tensors}
    if set(got) != set(expected):
        raise ExportError(f"{path} holds tensors {sorted(set(got) ^ set(expected))} it should not, or lacks "
                          "them")
    # Over all weights: max and sum of |diff|, and the sums cosine similarity needs (float64).
    max_abs, sum_abs, count, dot, ref_sq, out_sq = 0.0, 0.0, 0, 0.0, 0.0, 0.0
    worst, worst_name = 0.0, ""
    types: dict[str, int] = {}
    for name, t in expected.items():
        r = got[name]
        if r.tensor_type.name != t.qtype:
            raise ExportError(f"{name} ({t.source}) reads back as {r.tensor_type.name}, written as {t.qtype}")
        ref, bound = t.expect()
        values = torch.from_numpy(np.array(dequantize(r.data, r.tensor_type), dtype=np.float32))
        values = values.reshape(ref.shape)
        if t.perm is not None:  # undo the rope permutation: compare in the model's own row order
            values = values[torch.argsort(t.perm)]
        diff = (values - ref).abs()
        excess = diff - bound
        if not torch.isfinite(values).all() or (excess > 0).any():
            at = int(torch.argmax(torch.nan_to_num(excess, nan=math.inf).flatten()))
            idx = tuple(int(i) for i in np.unravel_index(at, tuple(diff.shape)))
            allowed = bound[idx].item() if isinstance(bound, torch.Tensor) else bound
            raise ExportError(f"{name} ({t.source}, {t.recipe}) read back from {path} differs from lowbit's "
                              f"weight at {idx}: {values[idx].item():.6g} vs {ref[idx].item():.6g}, beyond "
                              f"fp16 rounding of its scales ({allowed:.3g})")
        if ref.dim() == 2:
            rel = diff.max().item() / (ref.abs().max().item() or 1.0)
            if rel >= worst:
                worst, worst_name = rel, name
        types[t.qtype] = types.get(t.qtype, 0) + 1
        r64, v64 = ref.double(), values.double()
        max_abs = max(max_abs, diff.max().item())
        sum_abs += diff.double().sum().item()
        count += diff.numel()
        dot += (r64 * v64).sum().item()
        ref_sq += (r64 * r64).sum().item()
        out_sq += (v64 * v64).sum().item()
    cosine = dot / math.sqrt(ref_sq * out_sq) if ref_sq and out_sq else 1.0
    agreement = Agreement("gguf reader + dequantize", max_abs, sum_abs / max(count, 1), cosine)
    kinds = ", ".join(f"{n} {q}" for q, n in sorted(types.items()))
    head = f"GGUF read back ({len(expected)} tensors: {kinds}): every weight equals lowbit's"
    if not any(t.qtype.startswith("Q") for t in tensors):
        return f"{head} exactly; {agreement}"
    return (f"{head} up to fp16 rounding of the block scales (|diff| <= |u - zero| * |scale - fp16(scale)| "
            f"[+ |m - fp16(m)|]); {agreement}; largest difference {worst:.2g} of its tensor's max |w| "
            f"({worst_name})")


def export(model: nn.Module, path: str | Path, *, tokenizer: Any = None,
           echo: Callable[[str], Any] = print) -> Path:
    """Write the Llama-family causal LM `model` (lowbit-quantized or float) as GGUF at `path`, with
    `tokenizer` (a transformers fast tokenizer; without it the file has no vocabulary), read it back and
    check every weight against lowbit's. Returns the path. ExportError for what GGUF cannot hold."""
    path = Path(path)
    shape = _config_shape(model)
    with torch.no_grad():
        tensors = _tensors(model, shape)
    tok = None if tokenizer is None else _tokenizer_fields(tokenizer, shape.vocab)
    if tok is None:
        echo("no tokenizer given: the GGUF file has no vocabulary (llama.cpp can then take token ids only)")
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(tmp, shape, tensors, tok, Path(str(name)).name or "model")
        echo(_verify(tmp, tensors))
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; an exported model is read like any other
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = path.stat().st_size
    echo(f"GGUF ({shape.arch}, {shape.layers} blocks, vocabulary {shape.vocab}"
         f"{', tokenizer ' + tok['pre'] if tok else ''}): {size / 2**20:.2f} MiB")
    return path


def from_checkpoint(checkpoint: Path, out: Path, *, echo: Callable[[str], Any] = print,
                    **options: Any) -> Path:
    """Export the lowbit checkpoint folder `checkpoint` (a Llama-family causal LM, with the tokenizer saved
    beside it when it has one) to the GGUF file `out`."""
    from ..checkpoint import load

    model = load(checkpoint)
    tokenizer = options.pop("tokenizer", None)
    saved = ("tokenizer.json", "tokenizer_config.json")
    if tokenizer is None and any((Path(checkpoint) / f).is_file() for f in saved):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return export(model, out, tokenizer=tokenizer, echo=echo, **options)

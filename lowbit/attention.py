"""Attention with bf16 matmuls for Hugging Face models: the `-bf16attn` recipe option.

Quantizing the linears leaves attention's two matmuls (Q K^T and P V) in float32: in MiniLM at batch 32 x 128
they are a quarter of a W8A8 model's time. With `-bf16attn` (`w8a8-dynamic-bf16attn`) lowbit registers its
own attention function with transformers' attention interface and switches the model to it: Q, K, V and the
softmax's probabilities are rounded to bf16 and multiplied with AVX-512 BF16 dot products, the softmax in
float32 (lowbit._C.attention_bf16; lowbit::attention_bf16 under torch.compile).

Where the kernel cannot run the call, torch's scaled_dot_product_attention runs it instead, in float32, the
model's own numbers: on CPUs without AVX-512 BF16 (said once in a warning and in `lowbit.summary`), and
per call for what the kernel does not take (gradients, dropout, other dtypes or devices, head sizes not a
multiple of 16, position biases, soft-capping, attention weights asked for).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .backends import lowbit_cpu, ops

KINDS = ("bf16",)
IMPLEMENTATION = "lowbit_bf16"  # the name registered with transformers' attention interface

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


# Read once: a call into lowbit._C inside attention_forward would break torch.compile's graph there.
_AVAILABLE = lowbit_cpu.has_attention_bf16()


def available() -> bool:
    """Whether this CPU runs lowbit's bf16 attention kernel (AVX-512 BF16)."""
    return _AVAILABLE


def path() -> str:
    """What runs attention for a `-bf16attn` model on this machine."""
    return ("lowbit bf16 attention (AVX-512 BF16 vdpbf16ps)" if available()
            else "torch SDPA in float32 (this CPU lacks AVX-512 BF16)")


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-interface function: (attn_output [B, S, H, D], None), as its sdpa one."""
    d = query.shape[-1]
    if (not available() or dropout > 0.0 or query.device.type != "cpu"
            or any(t.dtype != torch.float32 for t in (query, key, value))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            or d % 16 or d > 512 or key.shape[-1] != d or value.shape[-1] != d
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS) or kwargs.get("output_attentions")):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len != q_len:  # torch's is_causal aligns top-left; transformers crops keys first
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    mask = attention_mask
    if mask is not None:
        if mask.dtype == torch.bool:  # True: attend
            mask = torch.where(mask, 0.0, float("-inf"))
        mask = mask.to(torch.float32)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    scale = float(scaling) if scaling is not None else d ** -0.5
    return ops.attention_bf16(query, key, value, mask, scale, is_causal), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # masks as sdpa takes them (None when all attend)


def check(model: nn.Module, kind: str) -> None:
    """Raise unless `model` can take `kind` attention (before any layer is quantized)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; valid: {', '.join(KINDS)}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise ValueError(f"-{kind}attn replaces a Hugging Face model's attention function; "
                         f"{type(model).__name__} is not a transformers model")


def apply(model: nn.Module, kind: str | None) -> None:
    """Switch `model` (a transformers model) to lowbit's `kind` attention; None leaves it as it is."""
    if kind is None:
        return
    check(model, kind)
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    model.lowbit_attention = path()
    if not available():
        warnings.warn(f"-{kind}attn: {path()}; the model's attention keeps float32 numbers", stacklevel=3)

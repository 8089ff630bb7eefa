"""Attention with bf16 matmuls for Hugging Face models.

Quantizing the linears leaves attention's two matmuls (Q K^T and P V) in float32: in MiniLM at batch 32 x 128
they are a quarter of a W8A8 model's time. Recipes that quantize activations (w8a8-*, *-a8) therefore also
round attention's operands: lowbit registers its own attention function with transformers' attention
interface and switches the model to it. Q, K, V and the softmax's probabilities are rounded to bf16 and
multiplied with AVX-512 BF16 dot products, the softmax in float32 (lowbit._C.attention_bf16;
lowbit::attention_bf16 under torch.compile). `-floatattn` keeps the model's own attention; weight-only recipes
ask for this one with `-bf16attn`. Models that are not transformers models keep their attention.

torch's scaled_dot_product_attention (float32, the model's own numbers) runs instead on CPUs without AVX-512
BF16 (said in `lowbit.summary` and model.lowbit_attention), and per call for what the kernel does not take
or does not speed up: fewer than MIN_ROWS queries (decode: packing the cached keys every step costs more
than it saves), gradients, dropout, other dtypes or devices, head sizes not a multiple of 16, position
biases, soft-capping, attention weights asked for.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .backends import lowbit_cpu, ops

KINDS = ("bf16",)
IMPLEMENTATION = "lowbit_bf16"  # the name registered with transformers' attention interface

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")
MIN_ROWS = 16  # fewer query rows per call take torch's SDPA


# Read once: a call into lowbit._C inside attention_forward would break torch.compile's graph there.
_AVAILABLE = lowbit_cpu.has_attention_bf16()


def available() -> bool:
    """Whether this CPU runs lowbit's bf16 attention kernel (AVX-512 BF16)."""
    return _AVAILABLE


def path() -> str:
    """What runs the attention of a model whose recipe asks for bf16 attention, on this machine."""
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
    if (not available() or query.shape[2] < MIN_ROWS or dropout > 0.0 or query.device.type != "cpu"
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


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Tensor | None = None, local_size: int | None = None,
                 allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                 use_vmap: bool = False, device: torch.device | str = "cpu", **kwargs) -> Tensor | None:
    """transformers' mask-interface function for lowbit's attention: its sdpa masks, except that a plain
    bidirectional mask (an encoder's padding) stays [batch, 1, 1, keys]: the kernel broadcasts it over heads
    and queries instead of reading a [batch, 1, queries, keys] mask built on every call."""
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = causal_mask_function if mask_function is None else mask_function  # sdpa_mask's default
    if mask_function is bidirectional_mask_function and not use_vmap and local_size is None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None if allow_is_bidirectional_skip else torch.ones(
                batch_size, 1, 1, kv_length, dtype=torch.bool, device=device)
        padding = padding[:, kv_offset: kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if allow_is_bidirectional_skip and not torch.compiler.is_compiling() and bool(padding.all()):
            return None
        return padding[:, None, None, :].expand(batch_size, 1, 1, kv_length)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, device=device,
                     **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)


def uses(model: nn.Module) -> bool:
    """Whether `model` runs lowbit's attention function."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == IMPLEMENTATION


def apply(model: nn.Module, kind: str | None) -> None:
    """Switch `model` to lowbit's `kind` attention where it is a transformers model that takes attention
    functions; record what runs its attention in model.lowbit_attention. None leaves the model as it is."""
    if kind is None:
        return
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; valid: {', '.join(KINDS)}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        model.lowbit_attention = "the model's own (not a transformers model)"
        return
    _register()
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except (ValueError, ImportError, NotImplementedError) as e:  # a model class that takes no custom attention
        model.lowbit_attention = f"the model's own ({type(model).__name__} takes no attention function: {e})"
        warnings.warn(f"{kind} attention not applied: {model.lowbit_attention}", stacklevel=3)
        return
    model.lowbit_attention = path()
    if not available():
        warnings.warn(f"{kind} attention: {path()}; the model's attention keeps float32 numbers", stacklevel=3)


@contextlib.contextmanager
def own_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` runs torch's SDPA instead of lowbit's attention (export, checks against
    float runtimes); restored after."""
    if not uses(model):
        yield model
        return
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(IMPLEMENTATION)

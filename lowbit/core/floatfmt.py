"""Low-precision float formats: fp16/bf16 casts and scaled fp8 (e4m3 / e5m2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .affine import SCALE_EPS, blocked_shape, blocks_shape, check_input, param_view

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def _dtype_of(fmt: str) -> torch.dtype:
    try:
        return FLOAT_DTYPES[fmt]
    except KeyError:
        raise ValueError(f"unknown float format {fmt!r}; valid: {', '.join(FLOAT_DTYPES)}") from None


def quantize_float(x: torch.Tensor, fmt: str,
                   block_size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert x to `fmt`; returns (values, scale).

    fp16/bf16: a plain cast, scale is None (block_size is only validated). Values that overflow the
    format raise ValueError instead of silently turning into inf.
    fp8: one float32 scale per block (block_size None = per-tensor, scale shape all ones) equal to
    amax / finfo(fp8).max, so each block's largest magnitude lands on the format's largest value.
    """
    dtype = _dtype_of(fmt)
    x = check_input(x)
    if block_size is None:
        block_size = tuple(x.shape)
    blocks_shape(x.shape, block_size)
    if dtype in (torch.float16, torch.bfloat16):
        values = x.to(dtype)
        if torch.isinf(values).any():
            raise ValueError(f"tensor has values beyond the {fmt} range (max {torch.finfo(dtype).max}); "
                             "they would become inf")
        return values, None
    fmax = torch.finfo(dtype).max
    xb = x.reshape(blocked_shape(x.shape, block_size))
    dims = tuple(range(1, 2 * x.dim(), 2))
    amax = xb.abs().amax(dim=dims, keepdim=True)
    scale = (amax / fmax).clamp_min(SCALE_EPS)
    # Clamp before the cast: rounding x/scale can land a hair above fmax, and e4m3fn has no inf.
    values = (xb / scale).clamp_(-fmax, fmax).to(dtype).reshape(x.shape)
    return values, scale.reshape(blocks_shape(x.shape, block_size))


def dequantize_float(values: torch.Tensor, scale: torch.Tensor | None,
                     block_size: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values * scale (per block) as `dtype`; scale None means a plain cast."""
    if scale is None:
        return values.to(dtype)
    if block_size is None:
        block_size = tuple(values.shape)
    s = param_view(scale.float(), values.shape, block_size)
    vb = values.float().reshape(blocked_shape(values.shape, block_size))
    return (vb * s).reshape(values.shape).to(dtype)

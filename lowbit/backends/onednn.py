"""Integer matmul and convolution through oneDNN, as PyTorch exposes it (`torch.ops.onednn`).

uint8 activations (with a zero point) times int8 weights (symmetric, one scale per output channel),
int32 accumulation, float32 output. These ops take plain uint8/int8 tensors, not PyTorch's deprecated
quantized dtypes.

Saturation: on x86 CPUs without VNNI, oneDNN multiplies with vpmaddubsw, which adds two u8*s8 products
into a saturating int16. With full-range int8 weights that overflows (seen here: errors of 30% of the
output range); with weights in [-64, 63] the pair sum stays within int16 (2 * 255 * 64 = 32640), and
results are exact. So on such CPUs lowbit quantizes W8A8 weights to 7 bits (symmetric, [-63, 63]) and
keeps the activations at a full 8 bits: measured on all-MiniLM-L6-v2, that loses less than the other
choice (8-bit weights, 7-bit activations, which is what fbgemm's reduce_range does). CPUs with VNNI
(vpdpbusd accumulates in int32) get full 8-bit weights.
"""

from __future__ import annotations

import functools
import platform
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..hw import cpu_features
from . import lowbit_cpu


@functools.cache
def available() -> bool:
    """oneDNN int8 ops present (x86 build of torch with mkldnn) and lowbit's activation ops built."""
    ops = getattr(torch.ops, "onednn", None)
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and ops is not None and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qconv_pointwise")
            and lowbit_cpu.available())


@functools.cache
def weight_qmax() -> int:
    """Largest int8 weight magnitude the int8 kernels multiply exactly on this CPU (see module doc)."""
    f = cpu_features()
    return 127 if (f.get("avx512_vnni") or f.get("avx_vnni") or f.get("amx_int8")) else 63


# oneDNN's packed weights, by the int8 weight they were packed from: id(weight) -> (weak reference to it,
# what the packing depended on, (packed, weight zero points)). An entry goes when its weight is freed.
_PACKED: dict[int, tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter; it cannot be changed either
        return -1


def _cached(w: torch.Tensor, params: tuple[Any, ...], build) -> tuple[torch.Tensor, torch.Tensor]:
    # The packed form is an opaque tensor that a traced graph cannot hold, so the ops take the plain
    # weight and find its packed form here; the version counter catches a weight changed in place.
    key = id(w)
    stamp = (_version(w), w.data_ptr(), params)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is w and hit[1] == stamp:
        return hit[2]
    value = build()
    _PACKED[key] = (weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)), stamp, value)
    return value


def packed_linear(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] -> (oneDNN's packed weight, weight zero points), packed once per weight."""
    return _cached(w, (), lambda: (prepack_linear(w), weight_zeros(w.shape[0])))


def packed_conv(w: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero: int, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 conv weight -> (oneDNN's packed weight for this geometry and input quantization, zero points)."""
    # tuples: a traced graph passes the geometry as lists, eager calls as tuples
    params = (w_scale.data_ptr(), _version(w_scale), x_scale, x_zero, tuple(stride), tuple(padding),
              tuple(dilation), groups)
    return _cached(w, params, lambda: (prepack_conv(w, w_scale, x_scale, x_zero, stride, padding, dilation, groups),
                                       weight_zeros(w.shape[0], conv=True)))


def prepack_linear(w: torch.Tensor) -> torch.Tensor:
    """int8 weight [N, K] -> oneDNN's packed weight."""
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


def weight_zeros(n: int, conv: bool = False) -> torch.Tensor:
    """The (all-zero) weight zero points the ops take; made once per layer, not per call."""
    return torch.zeros(n, dtype=torch.int64 if conv else torch.int32)


def linear_static(x: torch.Tensor, packed: torch.Tensor, x_scale: float, x_zero: int, w_scale: torch.Tensor,
                  w_zero: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """x [M, K] float32 quantized with fixed (x_scale, x_zero) -> float32 [M, N]."""
    q = lowbit_cpu.ops().quantize_u8(x, 1.0 / x_scale, x_zero)
    return torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zero, packed, w_scale, w_zero,
                                              bias, 1.0, 0, torch.float32, "relu" if relu else "none", [], "")


def linear_dynamic(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                   w_colsum_scaled: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """x [M, K] float32, quantized per row at run time (asymmetric uint8) -> float32 [M, N].

    oneDNN takes one activation scale per tensor, so it runs with scale 1 and zero point 0 and our
    epilogue applies each row's scale and zero-point correction:
        y[m, n] = sx[m] * (acc[m, n] * sw[n]) - sx[m] * zx[m] * (sw[n] * sum_k w[n, k]) + b[n]
    """
    C = lowbit_cpu.ops()
    q, sx, zx = C.quantize_rows_u8(x)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, w_scale, w_zero, None,
                                           1.0, 0, torch.float32, "none", [], "")
    C.row_epilogue_(y, sx, sx * zx.float(), w_colsum_scaled, bias)
    return y.relu_() if relu else y


@functools.cache
def int_mm_dynamic() -> bool:
    """Whether dynamic W8A8 runs on int8 x int8 products (torch._int_mm, oneDNN's s8 x s8 -> s32 matmul).

    Only on CPUs with VNNI, where it was measured faster than qlinear_pointwise's u8 x s8 -> f32 (Zen 4,
    MiniLM shapes: 20-30% at 128 rows, about even at 4096); elsewhere the u8 path stays, whose exactness
    on CPUs without VNNI is what weight_qmax guards."""
    f = cpu_features()
    vnni = bool(f.get("avx512_vnni") or f.get("avx_vnni") or f.get("amx_int8"))
    return vnni and lowbit_cpu.available() and hasattr(lowbit_cpu.ops(), "quantize_rows_s8") and hasattr(torch, "_int_mm")


def linear_dynamic_int(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, w_colsum_scaled: torch.Tensor,
                       bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """The same layer as linear_dynamic on int8 x int8 products: per-row codes shifted to int8 (q - 128),
    torch._int_mm against the int8 weight, and an epilogue that adds the shift back:
        y[m, n] = sx[m] * sw[n] * acc[m, n] + sx[m] * (128 - zx[m]) * (sw[n] * sum_k w[n, k]) + b[n]
    The integer products equal the u8 path's exactly; the float epilogue rounds in another order."""
    C = lowbit_cpu.ops()
    q, sx, zx = C.quantize_rows_s8(x)
    acc = torch._int_mm(q, codes.t())
    return C.int_row_epilogue(acc, sx, zx, w_scale, w_colsum_scaled, bias, relu)


def prepack_conv(w: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero: int, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return torch.ops.onednn.qconv_prepack(w.contiguous(), w_scale, x_scale, x_zero, stride, padding, dilation,
                                          groups, None)


def conv_static(x: torch.Tensor, packed: torch.Tensor, x_scale: float, x_zero: int, w_scale: torch.Tensor,
                w_zero: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                groups: int, relu: bool = False) -> torch.Tensor:
    """Conv1d/2d on float32 x quantized with fixed (x_scale, x_zero); float32 output (channels_last
    for 2-d, which the float ops after it accept as is)."""
    q = lowbit_cpu.ops().quantize_u8(x, 1.0 / x_scale, x_zero)
    return torch.ops.onednn.qconv_pointwise(q, x_scale, x_zero, packed, w_scale, w_zero, bias, stride,
                                            padding, dilation, groups, 1.0, 0, torch.float32,
                                            "relu" if relu else "none", [], "")

"""lowbit's kernels as PyTorch operators (`torch.ops.lowbit.*`), so that graphs can hold them.

`torch.compile` and `torch.export` cannot look inside lowbit._C or oneDNN's packed weights: each kernel
below is a custom op with a fake implementation (output shape, dtype and strides from the inputs
alone), which both trace as one opaque node.

    lowbit::linear(x, qweight, bits, group_size, n, k, bias)              lowbit's packed low-bit matmul
    lowbit::linear_q8(x, qweight, bits, group_size, n, k, bias)           the same with int8 activations
    lowbit::dequant(qweight, bits, group_size, n, k)                       that packed weight in float32
    lowbit::cb_linear(x, codes, book, bits, group_size, n, k, bias)        codebook weights, GEMV
    lowbit::cb_gemm(x, codes, book, bits, group_size, n, k, bias, bf16)    codebook weights, decode + GEMM
    lowbit::half_linear(x, w, bias)                                        float16 / bf16 weights, GEMV
    lowbit::fp8_linear(x, w, scale, group_size, e5m2, bias)                fp8 weights (uint8 bits), GEMV
    lowbit::fp8_gemm(x, w, scale, group_size, e5m2, bias, bf16)            fp8 weights, decode + GEMM
    lowbit::w8a8_linear_dynamic(x, codes, w_scale, csw, gemv, bias, relu)  uint8 per row x int8
    lowbit::w8a8_linear_static(x, codes, w_scale, bias, act_scale, act_zero, relu)
    lowbit::w8a8_conv(x, codes, w_scale, bias, act_scale, act_zero, stride, padding, dilation, groups, relu)
    lowbit::attention_bf16(q, k, v, mask, scale, causal)                   attention, bf16 matmuls
    lowbit::int_epilogue_gelu_rows_s8(acc, sx, zx, w_scale, csw, bias)     W8A8 -> GELU -> next layer's codes

The W8A8 ops take the plain int8 weight and find oneDNN's packed form of it in a cache (see
onednn.packed_linear): the packed form is an opaque tensor that graphs cannot carry as a constant.

Eager calls skip the dispatcher: going through `torch.ops` costs about 10 us per call from Python
(measured with torch 2.13), a tenth of a batch-1 decode GEMV, so the wrappers (`linear`, ...) call the
implementation directly unless a graph is being traced or a tensor subclass or mode is involved.
Both routes run the same function, so they give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import lowbit_cpu, onednn

# Dynamic W8A8 with this many rows or fewer (decode, tiny batches) is memory-bound: lowbit's int8 GEMV
# reads the same int8 weights once and skips quantizing the activations, which here beat the int8 GEMM
# at 1 row by 4-8x (Llama-3.2-1B-shaped layers, benchmarks/llama_layer.py --per-layer).
GEMV_MAX_ROWS = 4

_MIN_STEP = 1e-12  # the C++ ops' smallest activation step (act_quant.h kMinStep)


def _eager(x: Tensor) -> bool:
    """True when a call can bypass the dispatcher: not tracing, a plain tensor, no mode active."""
    return not (torch.compiler.is_compiling() or type(x) is not Tensor
                or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0)


is_eager = _eager  # for layers that call a kernel's direct eager form (Kernel.eager)


# ---------------------------------------------------------------- lowbit's packed low-bit matmul


def _linear(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
            bias: Tensor | None) -> Tensor:
    return lowbit_cpu.linear(x, {"qweight": qweight}, bits, group_size, n, k, bias)


@torch.library.custom_op("lowbit::linear", mutates_args=())
def _linear_op(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
               bias: Tensor | None) -> Tensor:
    return _linear(x, qweight, bits, group_size, n, k, bias)


@_linear_op.register_fake
def _(x, qweight, bits, group_size, n, k, bias):
    return x.new_empty((*x.shape[:-1], n))


def linear(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
           bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, W packed by lowbit_cpu.prepack."""
    if _eager(x):
        return _linear(x, qweight, bits, group_size, n, k, bias)
    return _linear_op(x, qweight, bits, group_size, n, k, bias)


def _linear_q8(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
               bias: Tensor | None) -> Tensor:
    return lowbit_cpu.linear_q8(x, {"qweight": qweight}, bits, group_size, n, k, bias)


@torch.library.custom_op("lowbit::linear_q8", mutates_args=())
def _linear_q8_op(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
                  bias: Tensor | None) -> Tensor:
    return _linear_q8(x, qweight, bits, group_size, n, k, bias)


@_linear_q8_op.register_fake
def _(x, qweight, bits, group_size, n, k, bias):
    return x.new_empty((*x.shape[:-1], n))


def linear_q8(x: Tensor, qweight: Tensor, bits: int, group_size: int, n: int, k: int,
              bias: Tensor | None = None) -> Tensor:
    """`linear` with the activations rounded to int8 per 32 columns and integer dot products."""
    if _eager(x):
        return _linear_q8(x, qweight, bits, group_size, n, k, bias)
    return _linear_q8_op(x, qweight, bits, group_size, n, k, bias)


def _dequant(qweight: Tensor, bits: int, group_size: int, n: int, k: int) -> Tensor:
    return lowbit_cpu.dequant({"qweight": qweight}, bits, group_size, n, k)


@torch.library.custom_op("lowbit::dequant", mutates_args=())
def _dequant_op(qweight: Tensor, bits: int, group_size: int, n: int, k: int) -> Tensor:
    return _dequant(qweight, bits, group_size, n, k)


@_dequant_op.register_fake
def _(qweight, bits, group_size, n, k):
    return qweight.new_empty((n, k), dtype=torch.float32)


# ---------------------------------------------------------------- codebook (k-means) weights


def _cb_linear(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
               bias: Tensor | None) -> Tensor:
    return lowbit_cpu.cb_linear(x, {"codes": codes, "book": book}, bits, group_size, n, k, bias)


@torch.library.custom_op("lowbit::cb_linear", mutates_args=())
def _cb_linear_op(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
                  bias: Tensor | None) -> Tensor:
    return _cb_linear(x, codes, book, bits, group_size, n, k, bias)


@_cb_linear_op.register_fake
def _(x, codes, book, bits, group_size, n, k, bias):
    return x.new_empty((*x.shape[:-1], n))


def cb_linear(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
              bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W.T (+ bias), W looked up in per-row (and group) tables; a GEMV for few rows."""
    if _eager(x):
        return _cb_linear(x, codes, book, bits, group_size, n, k, bias)
    return _cb_linear_op(x, codes, book, bits, group_size, n, k, bias)


def _cb_gemm(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
             bias: Tensor | None, bf16: bool) -> Tensor:
    return lowbit_cpu.cb_gemm(x, {"codes": codes, "book": book}, bits, group_size, n, k, bias, bf16)


@torch.library.custom_op("lowbit::cb_gemm", mutates_args=())
def _cb_gemm_op(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
                bias: Tensor | None, bf16: bool) -> Tensor:
    return _cb_gemm(x, codes, book, bits, group_size, n, k, bias, bf16)


@_cb_gemm_op.register_fake
def _(x, codes, book, bits, group_size, n, k, bias, bf16):
    return x.new_empty((*x.shape[:-1], n))


def cb_gemm(x: Tensor, codes: Tensor, book: Tensor, bits: int, group_size: int, n: int, k: int,
            bias: Tensor | None = None, bf16: bool = False) -> Tensor:
    """The same product for many rows: the weight decoded in slabs (bf16 or float32), then a GEMM."""
    if _eager(x):
        return _cb_gemm(x, codes, book, bits, group_size, n, k, bias, bf16)
    return _cb_gemm_op(x, codes, book, bits, group_size, n, k, bias, bf16)


@torch.library.custom_op("lowbit::half_linear", mutates_args=())
def _half_linear_op(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return lowbit_cpu.half_linear(x, w, bias)


@_half_linear_op.register_fake
def _(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def half_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) for float16 / bf16 W [N, K], in float32 arithmetic; a GEMV for few rows."""
    if _eager(x):
        return lowbit_cpu.half_linear(x, w, bias)
    return _half_linear_op(x, w, bias)


@torch.library.custom_op("lowbit::fp8_linear", mutates_args=())
def _fp8_linear_op(x: Tensor, w: Tensor, scale: Tensor, group_size: int, e5m2: bool, bias: Tensor | None) -> Tensor:
    return lowbit_cpu.fp8_linear(x, w, scale, group_size, e5m2, bias)


@_fp8_linear_op.register_fake
def _(x, w, scale, group_size, e5m2, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def fp8_linear(x: Tensor, w: Tensor, scale: Tensor, group_size: int, e5m2: bool, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) for fp8 W [N, K] (uint8 bit patterns) with a float32 scale per row and group."""
    if _eager(x):
        return lowbit_cpu.fp8_linear(x, w, scale, group_size, e5m2, bias)
    return _fp8_linear_op(x, w, scale, group_size, e5m2, bias)


@torch.library.custom_op("lowbit::fp8_gemm", mutates_args=())
def _fp8_gemm_op(x: Tensor, w: Tensor, scale: Tensor, group_size: int, e5m2: bool, bias: Tensor | None,
                 bf16: bool) -> Tensor:
    return lowbit_cpu.fp8_gemm(x, w, scale, group_size, e5m2, bias, bf16)


@_fp8_gemm_op.register_fake
def _(x, w, scale, group_size, e5m2, bias, bf16):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def fp8_gemm(x: Tensor, w: Tensor, scale: Tensor, group_size: int, e5m2: bool, bias: Tensor | None,
             bf16: bool) -> Tensor:
    """fp8_linear for many rows: W decoded a slab at a time (float32, or bf16 when `bf16`), then a GEMM."""
    if _eager(x):
        return lowbit_cpu.fp8_gemm(x, w, scale, group_size, e5m2, bias, bf16)
    return _fp8_gemm_op(x, w, scale, group_size, e5m2, bias, bf16)


def dequant(qweight: Tensor, bits: int, group_size: int, n: int, k: int) -> Tensor:
    """The float32 W [N, K] a weight packed by lowbit_cpu.prepack stands for (a new tensor each call)."""
    if _eager(qweight):
        return _dequant(qweight, bits, group_size, n, k)
    return _dequant_op(qweight, bits, group_size, n, k)


# ---------------------------------------------------------------- attention with bf16 matmuls


@torch.library.custom_op("lowbit::attention_bf16", mutates_args=())
def _attention_bf16_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    return lowbit_cpu.attention_bf16(q, k, v, mask, scale, causal)


@_attention_bf16_op.register_fake
def _(q, k, v, mask, scale, causal):
    b, h, sq, d = q.shape
    return q.new_empty((b, sq, h, d))


def attention_bf16(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    """lowbit_cpu.attention_bf16: [B, H, Sq, D] queries -> [B, Sq, H, D]."""
    if _eager(q):
        return lowbit_cpu.attention_bf16(q, k, v, mask, scale, causal)
    return _attention_bf16_op(q, k, v, mask, scale, causal)


# ---------------------------------------------------------------- W8A8 linear, dynamic activations


def _w8a8_dynamic(x: Tensor, codes: Tensor, w_scale: Tensor, csw: Tensor, gemv: Tensor | None,
                  bias: Tensor | None, relu: bool) -> Tensor:
    n, k = codes.shape
    if gemv is not None and x.shape[0] <= GEMV_MAX_ROWS:
        # Few rows: float32 activations on lowbit's int8 GEMV over the same codes (see GEMV_MAX_ROWS).
        y = lowbit_cpu.linear(x, {"qweight": gemv}, 8, k, n, k, bias)
        return y.relu_() if relu else y
    if onednn.int_mm_dynamic():
        return onednn.linear_dynamic_int(x, codes, w_scale, csw, bias, relu)
    packed, wz = onednn.packed_linear(codes)
    return onednn.linear_dynamic(x, packed, w_scale, wz, csw, bias, relu)


@torch.library.custom_op("lowbit::w8a8_linear_dynamic", mutates_args=())
def _w8a8_dynamic_op(x: Tensor, codes: Tensor, w_scale: Tensor, csw: Tensor, gemv: Tensor | None,
                     bias: Tensor | None, relu: bool) -> Tensor:
    return _w8a8_dynamic(x, codes, w_scale, csw, gemv, bias, relu)


@_w8a8_dynamic_op.register_fake
def _(x, codes, w_scale, csw, gemv, bias, relu):
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=torch.float32)


def w8a8_linear_dynamic(x: Tensor, codes: Tensor, w_scale: Tensor, csw: Tensor, gemv: Tensor | None,
                        bias: Tensor | None, relu: bool, quantize_op: bool = False) -> Tensor:
    """float32 x [M, K], quantized per row to uint8 at run time, times int8 codes [N, K] -> float32 [M, N].

    csw = sum_k codes[n, k] * w_scale[n] (the zero-point correction); gemv, when given, is the same
    codes packed for lowbit's int8 GEMV, which runs calls of at most GEMV_MAX_ROWS rows instead.
    quantize_op: when traced, quantize x with the opaque op `lowbit::quantize_rows_s8` (same codes) rather
    than in torch ops the compiler fuses with the op before (for x from an elementwise activation)."""
    if _eager(x):
        return _w8a8_dynamic(x, codes, w_scale, csw, gemv, bias, relu)
    if _int_mm_dynamic() and not (gemv is not None and x.shape[0] <= GEMV_MAX_ROWS):
        # Traced: the same layer in torch ops, so that the compiler fuses the quantization into the op
        # before it and the epilogue into the ops after it; only the int8 matmul stays opaque.
        q, sx, zx = quantize_rows_s8(x) if quantize_op else quantize_rows_s8_traceable(x)
        return int_row_epilogue_traceable(torch._int_mm(q, codes.t()), sx, zx, w_scale, csw, bias, relu)
    return _w8a8_dynamic_op(x, codes, w_scale, csw, gemv, bias, relu)


def _int_epilogue_gelu_rows_s8(acc: Tensor, sx: Tensor, zx: Tensor, w_scale: Tensor, csw: Tensor,
                               bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(lowbit_cpu.ops().int_epilogue_gelu_rows_s8(acc, sx, zx, w_scale, csw, bias))


@torch.library.custom_op("lowbit::int_epilogue_gelu_rows_s8", mutates_args=())
def _int_epilogue_gelu_rows_s8_op(acc: Tensor, sx: Tensor, zx: Tensor, w_scale: Tensor, csw: Tensor,
                                  bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _int_epilogue_gelu_rows_s8(acc, sx, zx, w_scale, csw, bias)


@_int_epilogue_gelu_rows_s8_op.register_fake
def _(acc, sx, zx, w_scale, csw, bias):
    m = acc.shape[0]
    return acc.new_empty(acc.shape, dtype=torch.int8), sx.new_empty((m,)), zx.new_empty((m,))


def w8a8_dynamic_gelu_codes(x: Tensor, codes: Tensor, w_scale: Tensor, csw: Tensor,
                            bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """A dynamic W8A8 layer with GELU after it whose output only the next dynamic W8A8 layer reads: float32
    x [M, K] -> that next layer's input codes (int8 q - 128 [M, N], scale [M], zero [M]), as
    quantize_rows_s8(gelu(w8a8_linear_dynamic(x, ...))) would give them, without the float32 [M, N] between
    (torch._int_mm, then lowbit's epilogue, GELU and row quantization in one pass over the int32 sums)."""
    if _eager(x):
        q, sx, zx = _quantize_rows_s8(x)
        return _int_epilogue_gelu_rows_s8(torch._int_mm(q, codes.t()), sx, zx, w_scale, csw, bias)
    q, sx, zx = quantize_rows_s8_traceable(x)
    return _int_epilogue_gelu_rows_s8_op(torch._int_mm(q, codes.t()), sx, zx, w_scale, csw, bias)


def w8a8_dynamic_from_codes(q: Tensor, sx: Tensor, zx: Tensor, codes: Tensor, w_scale: Tensor, csw: Tensor,
                            bias: Tensor | None, relu: bool) -> Tensor:
    """A dynamic W8A8 layer on input codes made by the layer before (w8a8_dynamic_gelu_codes): torch._int_mm
    and the epilogue."""
    acc = torch._int_mm(q, codes.t())
    if _eager(q):
        return lowbit_cpu.ops().int_row_epilogue(acc, sx, zx, w_scale, csw, bias, relu)
    return int_row_epilogue_traceable(acc, sx, zx, w_scale, csw, bias, relu)


def _int_mm_dynamic() -> bool:
    # A fact about the machine, probed once at import: a plain bool the tracer reads as a constant (it
    # cannot look into the cached CPU probe). Not torch.compiler.assume_constant_result: that decorator
    # imports torch._dynamo, which would make `import lowbit` slow.
    return _INT_MM_DYNAMIC


_INT_MM_DYNAMIC = onednn.int_mm_dynamic()
int_mm_dynamic = _int_mm_dynamic  # whether dynamic W8A8 layers run torch._int_mm here (int8 x int8, VNNI)


def _quantize_rows_s8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, scale, zero = lowbit_cpu.ops().quantize_rows_s8(x.float().contiguous())
    return q, scale, zero


@torch.library.custom_op("lowbit::quantize_rows_s8", mutates_args=())
def _quantize_rows_s8_op(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_rows_s8(x)


@_quantize_rows_s8_op.register_fake
def _(x):
    m = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m,), dtype=torch.float32), x.new_empty(
        (m,), dtype=torch.int32)


def quantize_rows_s8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """lowbit_cpu's quantize_rows_s8 as one opaque op (float32 x [M, K] -> int8 codes - 128, scale [M],
    zero [M]): each row is read from memory once and its two passes run in cache. Where x is an elementwise
    activation's output, the compiler then computes the activation once, into x, instead of once per pass
    of a quantization fused into it (measured on MiniLM's GELU: 7% of the whole model at batch 32)."""
    if _eager(x):
        return _quantize_rows_s8(x)
    return _quantize_rows_s8_op(x)


def quantize_rows_s8_traceable(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """lowbit_cpu's quantize_rows_s8 in torch ops (same rounding, same codes): per-row asymmetric codes
    q = clamp(round(x / s) + z, 0, 255) with [min(row, 0), max(row, 0)] on 256 levels, returned as
    (q - 128 as int8, s float32 [M], z int32 [M]). Unlike the C++ op it does not refuse NaN or inf."""
    lo = x.amin(1).clamp_max(0.0)
    hi = x.amax(1).clamp_min(0.0)
    scale = ((hi - lo) / 255.0).clamp_min(_MIN_STEP)
    inv = 1.0 / scale
    zero = torch.round(-lo * inv).clamp(0.0, 255.0)
    q = (torch.round(x * inv[:, None]) + zero[:, None]).clamp(0.0, 255.0) - 128.0
    return q.to(torch.int8), scale, zero.to(torch.int32)


def int_row_epilogue_traceable(acc: Tensor, sx: Tensor, zx: Tensor, w_scale: Tensor, csw: Tensor,
                               bias: Tensor | None, relu: bool) -> Tensor:
    """lowbit_cpu's int_row_epilogue in torch ops: int32 products of quantize_rows_s8's codes -> float32."""
    sxc = sx * (128 - zx).to(torch.float32)
    y = acc.to(torch.float32) * (sx[:, None] * w_scale) + sxc[:, None] * csw
    if bias is not None:
        y = y + bias
    return y.relu() if relu else y


# ---------------------------------------------------------------- W8A8 linear, static activations


def _w8a8_static(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float,
                 act_zero: int, relu: bool) -> Tensor:
    packed, wz = onednn.packed_linear(codes)
    return onednn.linear_static(x, packed, act_scale, act_zero, w_scale, wz, bias, relu)


@torch.library.custom_op("lowbit::w8a8_linear_static", mutates_args=())
def _w8a8_static_op(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float,
                    act_zero: int, relu: bool) -> Tensor:
    return _w8a8_static(x, codes, w_scale, bias, act_scale, act_zero, relu)


@_w8a8_static_op.register_fake
def _(x, codes, w_scale, bias, act_scale, act_zero, relu):
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=torch.float32)


def w8a8_linear_static(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float,
                       act_zero: int, relu: bool) -> Tensor:
    """float32 x [M, K] quantized with the fixed (act_scale, act_zero), times int8 codes [N, K] -> [M, N]."""
    if _eager(x):
        return _w8a8_static(x, codes, w_scale, bias, act_scale, act_zero, relu)
    return _w8a8_static_op(x, codes, w_scale, bias, act_scale, act_zero, relu)


# ---------------------------------------------------------------- W8A8 convolution, static activations


def _conv_shape(x: Tensor, codes: Tensor, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> list[int]:
    spatial = [(size + 2 * p - d * (kk - 1) - 1) // s + 1
               for size, kk, s, p, d in zip(x.shape[2:], codes.shape[2:], stride, padding, dilation)]
    return [x.shape[0], codes.shape[0], *spatial]


def _channels_last(shape: Sequence[int]) -> list[int]:
    """Strides of a [N, C, *spatial] tensor stored channels last, the layout oneDNN's conv returns."""
    strides, step = [0] * len(shape), 1
    for d in [1, *range(len(shape) - 1, 1, -1), 0]:
        strides[d] = step
        step *= shape[d]
    return strides


def _w8a8_conv(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float, act_zero: int,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               relu: bool) -> Tensor:
    packed, wz = onednn.packed_conv(codes, w_scale, act_scale, act_zero, stride, padding, dilation, groups)
    y = onednn.conv_static(x, packed, act_scale, act_zero, w_scale, wz, bias, stride, padding, dilation,
                           groups, relu)
    # A traced graph relies on the strides the fake implementation promised (channels last; strides of
    # size-1 dims do not count): hold to them.
    if y.dim() == 4:
        if not y.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
    elif not y.transpose(1, 2).is_contiguous():
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    return y


@torch.library.custom_op("lowbit::w8a8_conv", mutates_args=())
def _w8a8_conv_op(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float,
                  act_zero: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int, relu: bool) -> Tensor:
    return _w8a8_conv(x, codes, w_scale, bias, act_scale, act_zero, stride, padding, dilation, groups, relu)


@_w8a8_conv_op.register_fake
def _(x, codes, w_scale, bias, act_scale, act_zero, stride, padding, dilation, groups, relu):
    shape = _conv_shape(x, codes, stride, padding, dilation)
    return x.new_empty_strided(shape, _channels_last(shape), dtype=torch.float32)


def w8a8_conv(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Tensor | None, act_scale: float, act_zero: int,
              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
              relu: bool) -> Tensor:
    """Conv1d/2d of float32 x quantized with (act_scale, act_zero) by int8 codes [C_out, C_in/groups, *k];
    float32 output stored channels last (which the float ops after it take as it is)."""
    if _eager(x):
        return _w8a8_conv(x, codes, w_scale, bias, act_scale, act_zero, stride, padding, dilation, groups, relu)
    return _w8a8_conv_op(x, codes, w_scale, bias, act_scale, act_zero, stride, padding, dilation, groups, relu)

"""ONNX forms of lowbit's W8A8 layers (lowbit.w8a8), registered with the ONNX writer (to_onnx).

Each W8A8Linear / W8A8Conv is replaced, for the export only, by a stand-in module whose forward calls one
of the custom ops below; each op becomes ONNX nodes that compute lowbit's own numbers (the same int8
weight codes and scales, the same activation codes), so that the file and lowbit's model differ by float
rounding (and what it does to activation codes downstream: see _Standin):

- static activations (one calibrated scale and zero point): QDQ. The activation is
  QuantizeLinear(x * (1 / scale), 1, zero) then DequantizeLinear(scale, zero) (lowbit multiplies by the
  float32 reciprocal of the scale where QuantizeLinear would divide, which rounds differently at a few
  ties), the weight DequantizeLinear(int8 codes, per-channel scale); then MatMul (or Conv), bias, ReLU.
  ONNX Runtime runs the linears as MatMulIntegerToFloat (given a 3-D input: see W8A8LinearStandin), the
  convolutions in float (a QDQ Conv without an output QuantizeLinear is not fused; same numbers).
- dynamic activations (per row at run time): ONNX's DynamicQuantizeLinear and ONNX Runtime's
  DynamicQuantizeMatMul take one scale for the whole tensor (on a MiniLM-sized layer with an outlier
  column, cosine 0.994 against lowbit), and MatMulInteger / MatMulIntegerToFloat one activation zero point,
  so the per-row quantization is written out in ops (ReduceMin/ReduceMax, step, zero point, Round half to
  even as lowbit's kernels, Clip, Cast to uint8), then com.microsoft MatMulIntegerToFloat with scale 1 and
  no zero point (exact int32 sums times the weight scales) and lowbit's row epilogue:
      y[m, n] = sx[m] * (acc[m, n] * sw[n]) - sx[m] * zx[m] * (sw[n] * sum_k w[n, k]) + b[n]
  with the last two terms as one rank-2 Gemm accumulated onto the first (one pass over the output).
  Layers that lowbit runs on its int8 GEMV for calls of at most GEMV_MAX_ROWS rows (unquantized float32
  activations there) do the same in the graph: such rows go to a float MatMul over the dequantized codes,
  other calls to the integer route (slices of the input, one of them empty, so no branch is needed).
- weights with scales per group of inputs (`int4-g32-a8-dynamic`), which lowbit runs on its reference
  kernel: the activation is quantized and dequantized in float ops and multiplied with the weight
  dequantized from its int8 codes by a float MatMul, as that kernel does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..backends.int8 import fake_quant_rows, fake_quant_tensor
from ..backends.ops import GEMV_MAX_ROWS
from ..w8a8 import W8A8Conv, W8A8Linear
from . import to_onnx
from .verify import ExportError

__all__ = ["DYNAMIC_BOUNDS", "STATIC_BOUNDS", "TRANSLATIONS", "W8A8ConvStandin", "W8A8LinearStandin", "standin"]

# (min cosine, max |diff| / max |output|) the export of a model with W8A8 layers is checked against (see _Standin)
# Static layers flip codes less often than dynamic ones, but through a whole model the flips still add up:
# all-MiniLM-L6-v2 at w8a8-static on oneDNN moves by max |diff| 1.3% of its largest output (cosine 0.999995)
# against its ONNX file, and lowbit's own oneDNN and reference kernels differ by 5% there (cosine 0.99945).
STATIC_BOUNDS = (0.999, 0.05)
DYNAMIC_BOUNDS = (0.999, 0.05)
_MIN_STEP = 1e-12  # lowbit's smallest per-row activation step (backends/int8.py, act_quant.h)
_UINT8, _FLOAT = 2, 1  # ONNX's TensorProto.DataType numbers


class _Opset:
    """onnxscript's ONNX opset 18, imported when a translation first runs (onnxscript is an optional extra:
    importing this module must not need it)."""

    def __getattr__(self, name: str) -> Any:
        from onnxscript import opset18

        return getattr(opset18, name)


op = _Opset()


# ---------------------------------------------------------------- the custom ops (eager: lowbit's numbers)


def _dequantized(weight_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [K, N] and per-channel scale [N] -> float32 W [N, K]."""
    return (weight_t.float() * w_scale).t()


@torch.library.custom_op("lowbit_onnx::w8a8_linear_dynamic", mutates_args=())
def _linear_dynamic(x: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor, corr: torch.Tensor,
                    bias: torch.Tensor | None, gemv_rows: int, relu: bool) -> torch.Tensor:
    w = _dequantized(weight_t, w_scale)
    xq = x if x.shape[0] <= gemv_rows else fake_quant_rows(x)
    y = torch.nn.functional.linear(xq, w, bias)
    return y.relu() if relu else y


@_linear_dynamic.register_fake
def _(x, weight_t, w_scale, corr, bias, gemv_rows, relu):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


@torch.library.custom_op("lowbit_onnx::w8a8_linear_static", mutates_args=())
def _linear_static(x: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   inv_scale: torch.Tensor, act_scale: torch.Tensor, act_zero: torch.Tensor,
                   relu: bool) -> torch.Tensor:
    xq = fake_quant_tensor(x, float(act_scale.item()), int(act_zero.item()))
    y = torch.nn.functional.linear(xq, _dequantized(weight_t, w_scale), bias)
    return y.relu() if relu else y


@_linear_static.register_fake
def _(x, weight_t, w_scale, bias, inv_scale, act_scale, act_zero, relu):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("lowbit_onnx::w8a8_conv_static", mutates_args=())
def _conv_static(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 inv_scale: torch.Tensor, act_scale: torch.Tensor, act_zero: torch.Tensor, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, relu: bool) -> torch.Tensor:
    xq = fake_quant_tensor(x, float(act_scale.item()), int(act_zero.item()))
    w = weight.float() * w_scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    conv = torch.nn.functional.conv1d if weight.dim() == 3 else torch.nn.functional.conv2d
    y = conv(xq, w, bias, stride, padding, dilation, groups)
    return y.relu() if relu else y


@_conv_static.register_fake
def _(x, weight, w_scale, bias, inv_scale, act_scale, act_zero, stride, padding, dilation, groups, relu):
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return x.new_empty((x.shape[0], weight.shape[0], *spatial))


@torch.library.custom_op("lowbit_onnx::w8a8_linear_grouped", mutates_args=())
def _linear_grouped(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor, act_zero: torch.Tensor, static: bool, relu: bool) -> torch.Tensor:
    n, groups = scale.shape
    w = (codes.float().reshape(n, groups, -1) * scale[:, :, None]).reshape(codes.shape)
    if static:
        xq = fake_quant_tensor(x, float(act_scale.item()), int(act_zero.item()))
    else:
        xq = fake_quant_rows(x)
    y = torch.nn.functional.linear(xq, w, bias)
    return y.relu() if relu else y


@_linear_grouped.register_fake
def _(x, codes, scale, bias, act_scale, act_zero, static, relu):
    return x.new_empty((x.shape[0], codes.shape[0]))


# ---------------------------------------------------------------- the ONNX nodes of each op


def _const(value: float) -> Any:
    return op.Constant(value_float=value)


def _ints(values: list[int]) -> Any:
    return op.Constant(value_ints=list(values))


def _quantize_rows(x):
    """Per-row asymmetric uint8 codes of x [M, K] as lowbit's kernels compute them (act_quant.h):
    range [min(row, 0), max(row, 0)], step max(range / 255, 1e-12), zero point round(-min / step),
    codes clamp(round(x * (1 / step)) + zero, 0, 255); Round is half to even, as lowbit's rounding.
    Returns (codes uint8 [M, K], step [M, 1], zero point as float [M, 1])."""
    axes, zero, top = _ints([-1]), _const(0.0), _const(255.0)
    lo = op.Min(op.ReduceMin(x, axes, keepdims=1), zero)
    hi = op.Max(op.ReduceMax(x, axes, keepdims=1), zero)
    step = op.Max(op.Div(op.Sub(hi, lo), top), _const(_MIN_STEP))
    inv = op.Div(_const(1.0), step)
    zp = op.Clip(op.Round(op.Mul(op.Neg(lo), inv)), zero, top)
    # QuantizeLinear per row (axis 0) with step 1 and the row's zero point: saturate(round(x * inv) + zero),
    # one pass (x * inv / 1 is x * inv exactly)
    rows = op.Shape(x, start=0, end=1)
    q = op.QuantizeLinear(op.Mul(x, inv), op.Expand(_const(1.0), rows), op.Cast(op.Squeeze(zp, axes), to=_UINT8),
                          axis=0)
    return q, step, zp


def _fake_quant_rows(x):
    """What lowbit's reference kernel feeds its float matmul: the per-row codes, dequantized."""
    q, step, zp = _quantize_rows(x)
    return op.Mul(op.Sub(op.Cast(q, to=_FLOAT), zp), step)


def _quantize_tensor(x, inv_scale, act_zero):
    """uint8 codes clamp(round(x * inv_scale) + zero, 0, 255), as lowbit's static kernels (they multiply
    by the float32 reciprocal of the scale; QuantizeLinear alone would divide by the scale)."""
    return op.QuantizeLinear(op.Mul(x, inv_scale), _const(1.0), act_zero)


def _epilogue(y, bias, relu: bool):
    if bias is not None:
        y = op.Add(y, bias)
    return op.Relu(y) if relu else y


_MATMUL_INTEGER_TO_FLOAT = None


def _matmul_integer_to_float():
    """ONNX Runtime's com.microsoft MatMulIntegerToFloat: uint8 A times int8 B, exact int32 sums, scaled to
    float by a_scale * b_scale (b_scale one per column)."""
    global _MATMUL_INTEGER_TO_FLOAT
    if _MATMUL_INTEGER_TO_FLOAT is None:
        ints = ["tensor(uint8)", "tensor(int8)"]
        _MATMUL_INTEGER_TO_FLOAT = to_onnx.contrib_op(
            "MatMulIntegerToFloat",
            ["A:T1", "B:T2", "a_scale:T3", "b_scale:T3", "a_zero_point:T1?", "b_zero_point:T2?", "bias:T3?"], ["Y:T3"],
            {"T1": ints, "T2": ints, "T3": ["tensor(float)"]})
    return _MATMUL_INTEGER_TO_FLOAT


def _linear_dynamic_onnx(x, weight_t, w_scale, corr, bias, gemv_rows: int, relu: bool):
    def integer(xs):
        q, step, zp = _quantize_rows(xs)
        # acc[m, n] * sw[n] from the exact int32 sums of uint8 codes times int8 codes, as oneDNN returns it
        y = op.Mul(_matmul_integer_to_float()(q, weight_t, _const(1.0), w_scale), step)
        # lowbit's row epilogue (linear_dynamic in backends/onednn.py): y * sx[m] - sx[m] * zx[m] * csw[n] + b[n],
        # the last two terms as one rank-2 product [-sx * zx, 1] @ [csw; b] added by Gemm in the same pass
        rows = [op.Neg(op.Mul(step, zp))]
        if bias is not None:
            rows.append(op.Expand(_const(1.0), op.Shape(step)))
        return op.Gemm(op.Concat(*rows, axis=1), corr, y)

    if not gemv_rows:
        y = integer(x)
    else:
        # Few rows: lowbit's GEMV multiplies the float32 rows by the dequantized codes. The first `few` rows
        # (all of them when there are at most gemv_rows, else none) go that way, the others the integer way.
        # The weight is dequantized only when there are such rows: with none, x_few is [0, 0] and the
        # weight's slice [0, N], so that no node touches the whole weight on the integer route.
        rows = op.Shape(x, start=0, end=1)
        none = _ints([0])
        use = op.LessOrEqual(rows, _ints([gemv_rows]))
        few = op.Where(use, rows, none)
        k = op.Where(use, op.Shape(weight_t, start=0, end=1), none)
        axis0 = _ints([0])
        x_few = op.Slice(x, op.Concat(none, none, axis=0), op.Concat(few, k, axis=0), _ints([0, 1]))
        y_few = op.MatMul(x_few, op.DequantizeLinear(op.Slice(weight_t, none, k, axis0), w_scale, axis=1))
        if bias is not None:
            y_few = op.Add(y_few, bias)
        y = op.Concat(y_few, integer(op.Slice(x, few, rows, axis0)), axis=0)
    return op.Relu(y) if relu else y


def _linear_static_onnx(x, weight_t, w_scale, bias, inv_scale, act_scale, act_zero, relu: bool):
    xd = op.DequantizeLinear(_quantize_tensor(x, inv_scale, act_zero), act_scale, act_zero)
    w = op.DequantizeLinear(weight_t, w_scale, axis=1)
    return _epilogue(op.MatMul(xd, w), bias, relu)


def _conv_static_onnx(x, weight, w_scale, bias, inv_scale, act_scale, act_zero, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, relu: bool):
    xd = op.DequantizeLinear(_quantize_tensor(x, inv_scale, act_zero), act_scale, act_zero)
    w = op.DequantizeLinear(weight, w_scale, axis=0)
    pads = list(padding) * 2  # ONNX: all begins, then all ends
    if bias is not None:
        y = op.Conv(xd, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)
    else:
        y = op.Conv(xd, w, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)
    return op.Relu(y) if relu else y


def _linear_grouped_onnx(x, codes, scale, bias, act_scale, act_zero, static: bool, relu: bool):
    if static:
        xq = _quantize_tensor(x, op.Div(_const(1.0), act_scale), act_zero)
        xd = op.DequantizeLinear(xq, act_scale, act_zero)
    else:
        xd = _fake_quant_rows(x)
    # W [N, K] = codes * scale per group of inputs; constant, so ONNX Runtime folds it once
    n_groups = op.Shape(scale)
    grouped = op.Reshape(op.Cast(codes, to=_FLOAT), op.Concat(n_groups, _ints([-1]), axis=0))
    w = op.Reshape(op.Mul(grouped, op.Unsqueeze(scale, _ints([2]))), op.Shape(codes))
    return _epilogue(op.MatMul(xd, op.Transpose(w, perm=[1, 0])), bias, relu)


TRANSLATIONS = {
    torch.ops.lowbit_onnx.w8a8_linear_dynamic.default: _linear_dynamic_onnx,
    torch.ops.lowbit_onnx.w8a8_linear_static.default: _linear_static_onnx,
    torch.ops.lowbit_onnx.w8a8_conv_static.default: _conv_static_onnx,
    torch.ops.lowbit_onnx.w8a8_linear_grouped.default: _linear_grouped_onnx,
}


# ---------------------------------------------------------------- stand-ins


class _Standin(nn.Module):
    """Holds a W8A8 layer's export tensors as buffers (they become the ONNX file's initializers)."""

    def __init__(self, layer: W8A8Linear | W8A8Conv):
        super().__init__()
        self.relu = bool(layer.relu)
        # Activation codes round: a difference in the last place of a value (another order of float sums,
        # anywhere upstream) can move it across a rounding step, and later layers carry that on. Per-row
        # steps follow each row's extremes, so dynamic layers flip codes far more often; lowbit's own model
        # moves as much when its activations are nudged by one unit in the last place (all-MiniLM-L6-v2 at
        # w8a8-dynamic: embeddings' cosine 0.9996, max |diff| 1.2% of the largest output). The export is
        # checked against bounds of that size (to_onnx.verify_bounds reads them).
        self.verify_bounds = STATIC_BOUNDS if layer.static else DYNAMIC_BOUNDS
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        if layer.static:
            s, z = layer.act_qparams
            if not 0 <= z <= 255:
                raise ValueError(f"activation zero point {z} is outside uint8")
            # lowbit's static kernels quantize with the float32 reciprocal of the (float32) scale
            self.register_buffer("inv_scale", torch.tensor(np.float32(1.0 / s)))
            self.register_buffer("act_scale", torch.tensor(s, dtype=torch.float32))
            self.register_buffer("act_zero", torch.tensor(z, dtype=torch.uint8))
        else:
            self.register_buffer("inv_scale", None)
            self.register_buffer("act_scale", torch.tensor(1.0))
            self.register_buffer("act_zero", torch.tensor(0, dtype=torch.uint8))


class W8A8LinearStandin(_Standin):
    """A W8A8Linear as ONNX nodes: int8 codes [K, N] (MatMul's layout), per-channel scales, bias."""

    def __init__(self, layer: W8A8Linear):
        super().__init__(layer)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # The GELU the layer computes (act_out), written as ONNX's float GELU after it: the file's next layer
        # quantizes that float output itself (lowbit hands it the same codes).
        self.gelu = layer.act_out == "gelu"
        self.static = layer.static
        codes, scale = layer._stored.int8_codes()
        codes, scale = codes.to(torch.int8), scale.float()
        self.grouped = scale.dim() == 2 and scale.shape[1] > 1
        if self.grouped:
            self.register_buffer("codes", codes.contiguous())
            self.register_buffer("w_scale", scale.contiguous())
            self.note = (f"W8A8 ({layer.config.name}): weight scales per group of {codes.shape[1] // scale.shape[1]} "
                         "inputs; activation codes dequantized, float MatMul over the int8 codes dequantized "
                         "(as lowbit's reference kernel)")
            return
        scale = scale.reshape(-1)
        self.register_buffer("weight_t", codes.t().contiguous())
        self.register_buffer("w_scale", scale.contiguous())
        if self.static:
            self.note = f"W8A8 static ({layer.config.name}): QDQ MatMul, {layer._act_repr()}"
            return
        # sum_k w[n, k] * sw[n], the dynamic epilogue's zero-point term, as lowbit computes it; with the bias
        # under it, for the graph's rank-2 Gemm
        csw = codes.sum(1, dtype=torch.int64).float() * scale
        self.register_buffer("corr", torch.stack([csw] if self.bias is None else [csw, self.bias]).contiguous())
        # lowbit runs calls of at most GEMV_MAX_ROWS rows on its int8 GEMV (float activations) when the
        # layer's kernel has one (ops.w8a8_linear_dynamic)
        prep = getattr(layer, "_prep", None) or {}
        self.gemv_rows = GEMV_MAX_ROWS if prep.get("gemv") is not None else 0
        few = f"; calls of at most {self.gemv_rows} rows in float, as lowbit's GEMV" if self.gemv_rows else ""
        self.note = (f"W8A8 dynamic ({layer.config.name}): uint8 codes per row, MatMulIntegerToFloat over int8 "
                     f"codes{few}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.grouped:
            y = torch.ops.lowbit_onnx.w8a8_linear_grouped(x2, self.codes, self.w_scale, self.bias, self.act_scale,
                                                          self.act_zero, self.static, self.relu)
        elif self.static:
            # [1, M, K]: ONNX Runtime fuses MatMul + Add of 2-D inputs into a float Gemm before it looks
            # for QDQ groups, which then runs the layer in float; a 3-D MatMul becomes MatMulIntegerToFloat
            y = torch.ops.lowbit_onnx.w8a8_linear_static(x2[None], self.weight_t, self.w_scale, self.bias, self.inv_scale,
                                                         self.act_scale, self.act_zero, self.relu)
        else:
            y = torch.ops.lowbit_onnx.w8a8_linear_dynamic(x2, self.weight_t, self.w_scale, self.corr, self.bias,
                                                          self.gemv_rows, self.relu)
        if self.gelu:
            y = torch.nn.functional.gelu(y)
        return y.reshape(*lead, self.out_features).to(x.dtype)


class W8A8ConvStandin(_Standin):
    """A W8A8Conv as QDQ Conv: int8 codes [C_out, C_in / groups, *k], per-channel scales, bias."""

    def __init__(self, layer: W8A8Conv):
        super().__init__(layer)
        codes, scale = layer._stored.int8_codes()
        if scale.dim() == 2 and scale.shape[1] > 1:
            raise ValueError("convolution weights with scales per group of inputs have no QDQ form")
        self.register_buffer("weight", codes.to(torch.int8).contiguous())
        self.register_buffer("w_scale", scale.float().reshape(-1).contiguous())
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation, self.groups = list(layer.dilation), int(layer.groups)
        self.note = f"W8A8 static conv ({layer.config.name}): QDQ Conv, {layer._act_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.lowbit_onnx.w8a8_conv_static(x.float(), self.weight, self.w_scale, self.bias, self.inv_scale,
                                                   self.act_scale, self.act_zero, self.stride, self.padding,
                                                   self.dilation, self.groups, self.relu)
        return y.to(x.dtype)


def standin(layer: nn.Module, name: str) -> nn.Module:
    """The export stand-in of the W8A8 layer `layer` (qualified name `name`), or ExportError saying why not."""
    if not isinstance(layer, (W8A8Linear, W8A8Conv)):
        raise ExportError(f"layer {name!r}: {type(layer).__name__} is not a W8A8 layer")
    if isinstance(layer, W8A8Conv) and not layer.static:
        raise ExportError(f"layer {name!r}: W8A8 convolutions with dynamic activations have no ONNX form")
    if layer.config.act not in ("static", "dynamic"):
        raise ExportError(f"layer {name!r}: activation quantization {layer.config.act!r} has no ONNX form")
    try:
        return W8A8ConvStandin(layer) if isinstance(layer, W8A8Conv) else W8A8LinearStandin(layer)
    except ValueError as e:
        raise ExportError(f"layer {name!r} ({layer.config.name}) cannot be written as ONNX: {e}") from None


for _layer_type in (W8A8Linear, W8A8Conv):
    to_onnx.register(_layer_type, standin, TRANSLATIONS)

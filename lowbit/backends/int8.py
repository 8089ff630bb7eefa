"""Kernels for int8 weights times uint8 activations (W8A8 linear and convolution layers).

The canonical weight: signed int8 codes of the layer's weight shape and float32 scales, one per output
channel ([N]) or per group of inputs ([N, K / G]), W = codes * scale. Activations are quantized to
asymmetric uint8 per row at run time (LayerSpec.act "dynamic", linear only) or per tensor with the
fixed spec.act_scale / spec.act_zero ("static").

"onednn": oneDNN's int8 matmul and convolution (see onednn.py) through lowbit's custom ops.
"reference": the same arithmetic in float32 PyTorch ops (quantize and dequantize the activations,
dequantize the weight, float matmul): simulated and slower, but it runs any such layer anywhere. Both
quantize activations identically, so they agree to float rounding of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lowbit_cpu, onednn, ops
from .base import Kernel, LayerSpec

_MIN_STEP = 1e-12  # the C++ ops' smallest activation step (act_quant.h kMinStep)


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """What the dynamic kernel does to activations [M, K], in float ops: per-row asymmetric uint8."""
    lo = x.amin(1).clamp_max(0.0)
    hi = x.amax(1).clamp_min(0.0)
    scale = ((hi - lo) / 255.0).clamp_min(_MIN_STEP)
    inv = 1.0 / scale
    zero = torch.round(-lo * inv).clamp_(0, 255)
    q = (torch.round(x * inv[:, None]) + zero[:, None]).clamp_(0, 255)
    return (q - zero[:, None]) * scale[:, None]


def fake_quant_tensor(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """What the static kernels do to activations: one (scale, zero point) for the whole tensor."""
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    q = (torch.round(x * inv) + zero).clamp_(0, 255)
    return (q - zero) * scale


class OneDNNInt8(Kernel):
    """oneDNN's u8 x s8 -> s32 matmul and convolution, per-channel weight scales."""

    name = "onednn"
    act_dtype = torch.uint8

    def supports(self, spec: LayerSpec) -> bool:
        return self.refusal(spec) == ""

    def refusal(self, spec: LayerSpec) -> str:
        if (spec.act not in ("dynamic", "static") or spec.family != "int"
                or (spec.conv is not None and spec.act != "static")):
            return "it runs int8 layers with uint8 activations (dynamic linear, static linear or conv)"
        if not onednn.available():
            return "oneDNN int8 ops missing on this machine or build"
        if spec.group_size != spec.k:
            return "it takes one weight scale per output channel, not per group"
        if spec.weight_qmax > onednn.weight_qmax():
            return (f"oneDNN int8 ops would saturate weights of this range (|code| up to {spec.weight_qmax}; "
                    f"exact here up to {onednn.weight_qmax()})")
        return ""

    def prepare(self, weight, spec):
        codes, scale = weight.int8_codes()
        codes, scale = codes.contiguous(), scale.float().contiguous()
        prep = {"codes": codes, "scale": scale}
        if spec.conv is not None:
            c = spec.conv
            onednn.packed_conv(codes, scale, spec.act_scale, spec.act_zero, list(c.stride), list(c.padding),
                               list(c.dilation), c.groups)  # pack now, not in the first call
            return prep
        onednn.packed_linear(codes)
        if spec.act == "dynamic":
            # sum_k w[n, k] * sw[n]: the dynamic kernel's zero-point correction term.
            prep["csw"] = (codes.sum(1, dtype=torch.int64).float() * scale).contiguous()
            prep["scale_csw"] = torch.stack([scale, prep["csw"]])
            prep["gemv"] = None
            if lowbit_cpu.available():
                # The same int8 codes for the few-row GEMV (unsigned codes with zero point 128).
                u = (codes.to(torch.int16) + 128).to(torch.uint8)
                prep["gemv"] = lowbit_cpu.prepack(u, scale[:, None], torch.full((spec.n, 1), 128.0), 8,
                                                  spec.k)["qweight"]
        return prep

    def run(self, x, prep, spec, bias):
        if spec.conv is not None:
            c = spec.conv
            return ops.w8a8_conv(x, prep["codes"], prep["scale"], bias, spec.act_scale, spec.act_zero,
                                 c.stride, c.padding, c.dilation, c.groups, spec.relu)
        if spec.act == "static":
            return ops.w8a8_linear_static(x, prep["codes"], prep["scale"], bias, spec.act_scale, spec.act_zero,
                                          spec.relu)
        if ops.is_eager(x):
            return ops.w8a8_linear_dynamic(x, prep["codes"], prep["scale"], prep["csw"], prep["gemv"], bias,
                                           spec.relu, spec.after_act)
        # Traced: a compiled model checks every tensor its graph reads on every call, so read one tensor for
        # both per-column vectors, and leave the GEMV's form out where this many rows never take it.
        gemv = prep["gemv"] if x.shape[0] <= ops.GEMV_MAX_ROWS else None
        sc = prep["scale_csw"]
        return ops.w8a8_linear_dynamic(x, prep["codes"], sc[0], sc[1], gemv, bias, spec.relu, spec.after_act)


class ReferenceInt8(Kernel):
    """The W8A8 arithmetic in float32 PyTorch ops: any group size, any weight range, any machine."""

    name = "reference"
    act_dtype = torch.uint8
    simulated = True

    def supports(self, spec: LayerSpec) -> bool:
        return (spec.act in ("dynamic", "static") and spec.family == "int"
                and (spec.conv is None or spec.act == "static"))

    def refusal(self, spec: LayerSpec) -> str:
        return "it runs int8 layers with uint8 activations (dynamic linear, static linear or conv)"

    def prepare(self, weight, spec):
        codes, scale = weight.int8_codes()
        return {"codes": codes, "scale": scale}

    def run(self, x, prep, spec, bias):
        codes, scale = prep["codes"], prep["scale"]
        if scale.dim() == 2:  # per group along the input
            n, groups = scale.shape
            w = (codes.float().reshape(n, groups, -1) * scale[:, :, None]).reshape(codes.shape)
        else:
            w = codes.float() * scale.reshape((-1,) + (1,) * (codes.dim() - 1))
        if spec.conv is not None:
            c = spec.conv
            conv = F.conv1d if codes.dim() == 3 else F.conv2d
            y = conv(fake_quant_tensor(x, spec.act_scale, spec.act_zero), w, bias, list(c.stride),
                     list(c.padding), list(c.dilation), c.groups)
        else:
            xq = fake_quant_tensor(x, spec.act_scale, spec.act_zero) if spec.act == "static" else fake_quant_rows(x)
            y = F.linear(xq, w, bias)
        return y.relu_() if spec.relu else y

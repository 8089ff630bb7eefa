"""W8A8: int8 weights and uint8 activations on a real integer matmul / convolution.

Weights: symmetric, one scale per output channel, stored as int8 in [-qmax, qmax], where qmax is 127,
or 63 on CPUs whose int8 instructions would saturate at full range (see backends/onednn.py). Narrower
weights (`int4-a8`, `ternary-a8`, `binary-a8`: codes in [-7, 7], {-1, 0, 1}, {-1, 1}) run on the same
int8 kernels and are stored packed at their own width. With a group size (`int4-g32-a8-dynamic`) the
scales vary along the input, which the int8 kernels cannot apply: such layers run the reference path.
Activations: asymmetric uint8, either per row at run time ("dynamic", Linear only) or per tensor with
a scale and zero point fixed by calibration ("static", Linear and Conv1d/2d, depthwise and grouped).
Dynamic layers called with at most GEMV_MAX_ROWS rows run lowbit's int8 weight-only GEMV on the same
codes instead (float32 activations, not quantized: faster there, and more accurate).

Kernels (backends/int8.py, in the same registry as the weight-only ones): "onednn" (torch.ops.onednn
int8 ops + lowbit's fused quantize/epilogue ops), or "reference", the same arithmetic in float32 PyTorch
ops (dequantize, then a float matmul: simulated, slower). Both compute the same quantized activations,
so they agree to float rounding of the sums.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import ConvSpec, LayerSpec, StoredWeight, candidates, onednn, ops, select_kernel
from .backends.int8 import fake_quant_rows, fake_quant_tensor
from .backends.ops import GEMV_MAX_ROWS
from .formats import Scheme, scheme_for
from .modules import QuantModule
from .recipes import QuantConfig

__all__ = ["GEMV_MAX_ROWS", "FusedAct", "FusedReLU", "RowCodes", "W8A8Conv", "W8A8Linear", "fake_quant_rows", "fake_quant_tensor",
           "weight_scheme"]


def weight_scheme(config: QuantConfig) -> Scheme:
    """The weight format of W8A8 layers: symmetric codes in int8 for the int8 kernels; 8-bit codes stay
    within the machine's safe range (onednn.weight_qmax), narrower ones use their full symmetric range."""
    int8 = config.kind == "int" and config.bits == 8
    return scheme_for(config, signed=True, qmax=onednn.weight_qmax() if int8 else None)


class FusedReLU(nn.Identity):
    """Where a ReLU stood whose work the layer before it now does (relu fused into the int8 kernel)."""


class FusedAct(nn.Identity):
    """Where an activation stood (GELU) that the W8A8 layer before it now computes (W8A8Linear.act_out)."""


class RowCodes:
    """What a W8A8 layer with a fused GELU hands the next W8A8 layer, its only reader: that layer's input
    already quantized per row (int8 codes - 128 [M, N], scale [M], zero point [M]), in place of the float32
    [M, N] it would quantize. Carries the shape and dtype the float tensor would have had."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.q, self.scale, self.zero = q, scale, zero
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, q.device

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        """The float values the codes stand for (what the next layer would have quantized, rounded)."""
        x = (self.q.float() + 128.0 - self.zero.float()[:, None]) * self.scale[:, None]
        return x.reshape(self.shape).to(self.dtype)


class _W8A8(QuantModule):
    """State and kernel choice shared by W8A8Linear and W8A8Conv."""

    @classmethod
    def scheme_for(cls, config: QuantConfig) -> Scheme:
        return weight_scheme(config)

    def _setup(self, config: QuantConfig, state: dict[str, torch.Tensor], bias: torch.Tensor | None,
               relu: bool, shape: tuple[int, ...]) -> None:
        self.weight_shape = tuple(shape)
        self._init_state(shape[0], int(torch.Size(shape[1:]).numel()), config, state)
        # The canonical weight as the kernels read it; its int8 codes (derived once: for narrower formats an
        # unpacked copy) are also what the layer's range and dequantized weight are computed from.
        self._derive_codes()
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self.relu = relu
        self.kernel_name = "reference"

    def _derive_codes(self) -> None:
        self._stored = StoredWeight(self.scheme, self._buffers, self.weight_shape)
        self.codes = self._stored.int8_codes()[0]

    def _derive(self) -> None:
        self._derive_codes()
        self.set_kernel(self.kernel_name)

    @property
    def static(self) -> bool:
        return self.config.act == "static"

    @property
    def act_qparams(self) -> tuple[float, int]:
        return float(self.act_scale.item()), int(self.act_zero_point.item())

    @property
    def weight_qmax(self) -> int:
        return int(self.codes.abs().max().item())

    def _conv_spec(self) -> ConvSpec | None:
        return None

    def _spec(self) -> LayerSpec:
        """The layer as the kernel registry sees it; read afresh, as the codes may have been changed."""
        s, z = self.act_qparams if self.static else (1.0, 0)
        groups = self.scale.shape[1] if self.scale.dim() == 2 else 1
        return LayerSpec(n=self._n, k=self._k, bits=self.scheme.bits, group_size=self._k // groups,
                         symmetric=True, act=self.config.act, weight_qmax=self.weight_qmax, conv=self._conv_spec(),
                         relu=self.relu, after_act=getattr(self, "after_act", False), act_scale=s, act_zero=z)

    def candidate_kernels(self) -> list[str]:
        """Kernels that compute this layer exactly on this machine (the reference always does)."""
        return [kernel.name for kernel in candidates(self._spec())]

    def set_kernel(self, name: str) -> None:
        spec = self._spec()
        kernel = select_kernel(spec, name)
        self._prep = kernel.prepare(self._stored, spec)
        self.spec, self._kernel, self.kernel_name = spec, kernel, kernel.name

    def __getstate__(self) -> dict:
        # The kernel's form of the weight is derived (for oneDNN, its packed weight is cached by the int8
        # codes and cannot be copied or pickled): drop it and derive it again on the other side
        # (copy.deepcopy goes through here too).
        state = self.__dict__.copy()
        state["_prep"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.set_kernel(self.kernel_name)

    @property
    def kernel(self) -> str:
        return self.kernel_name

    @property
    def act_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def simulated(self) -> bool:
        return self.kernel_name == "reference"

    def _act_repr(self) -> str:
        if not self.static:
            return "act=uint8 per row (dynamic)"
        s, z = self.act_qparams
        return f"act=uint8 static (scale={s:.3g}, zero={z})"


class W8A8Linear(_W8A8):
    """nn.Linear with int8 weights and uint8 activations (dynamic per row, or static per tensor)."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, state: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, kernel: str = "auto", relu: bool = False,
                 after_act: bool = False, act_out: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The input comes from an elementwise activation (found in calibration): see LayerSpec.after_act.
        self.after_act = bool(after_act)
        if act_out not in (None, "gelu"):
            raise ValueError(f"a W8A8 layer fuses GELU only, not {act_out!r}")
        # "gelu": this layer computes the GELU that followed it, and its output goes to one W8A8 layer only
        # (proven on the traced graph when it was quantized): on the int8 matmul path it hands that layer
        # its input codes (RowCodes) instead of float32.
        self.act_out = act_out
        self._setup(config, state, bias, relu, (out_features, in_features))
        self.set_kernel(kernel)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, act: tuple[float, int] | None = None,
                   kernel: str = "auto", relu: bool = False, scale: torch.Tensor | None = None,
                   after_act: bool = False) -> W8A8Linear:
        """`scale`, when given, is used instead of the weight scale computed from the weight (QAT's)."""
        state = cls.scheme_for(config).encode(linear.weight, scale=scale)
        if config.act == "static":
            if act is None:
                raise ValueError("static activation quantization needs calibrated (scale, zero point)")
            state["act_scale"] = torch.tensor([act[0]], dtype=torch.float32)
            state["act_zero_point"] = torch.tensor([act[1]], dtype=torch.int32)
        return cls(linear.in_features, linear.out_features, config, state, linear.bias, kernel, relu, after_act)

    def _int_path(self, rows: int) -> bool:
        """Whether a call of `rows` rows runs on torch._int_mm (the path that makes and takes RowCodes)."""
        return (self.kernel_name == "onednn" and not self.static and ops.int_mm_dynamic()
                and not (self._prep.get("gemv") is not None and rows <= GEMV_MAX_ROWS))

    def forward(self, x: torch.Tensor | RowCodes) -> torch.Tensor | RowCodes:
        if isinstance(x, RowCodes):
            if not self._int_path(x.q.shape[0]) or self.scale.dim() != 1:
                x = x.dequantize()
            else:
                sc = self._prep["scale_csw"]
                y = ops.w8a8_dynamic_from_codes(x.q, x.scale, x.zero, self._prep["codes"], sc[0], sc[1], self.bias,
                                                self.relu)
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.act_out == "gelu" and self._int_path(x2.shape[0]):
            sc = self._prep["scale_csw"]
            q, s, z = ops.w8a8_dynamic_gelu_codes(x2, self._prep["codes"], sc[0], sc[1], self.bias)
            return RowCodes(q, s, z, (*lead, self.out_features), x.dtype)
        y = self._kernel.run(x2, self._prep, self.spec, self.bias)
        if self.act_out == "gelu":
            y = torch.nn.functional.gelu(y)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        sim = ", simulated" if self.simulated else ""
        relu = ", relu fused" if self.relu else ""
        relu += ", input from an activation" if self.after_act else ""
        relu += ", gelu fused (its reader takes int8 codes)" if self.act_out else ""
        return (f"in={self.in_features}, out={self.out_features}, recipe={self.config.name}, "
                f"kernel={self.kernel_name}, {self._act_repr()}{relu}{sim}")


class W8A8Conv(_W8A8):
    """nn.Conv1d / nn.Conv2d (any groups) with int8 weights and static uint8 activations."""

    def __init__(self, conv_args: dict, config: QuantConfig, state: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, kernel: str = "auto", relu: bool = False):
        super().__init__()
        if config.act != "static":
            raise ValueError("convolutions are quantized with static activations only (w8a8-static)")
        self.in_channels, self.out_channels = conv_args["in_channels"], conv_args["out_channels"]
        self.kernel_size, self.stride = list(conv_args["kernel_size"]), list(conv_args["stride"])
        self.padding, self.dilation = list(conv_args["padding"]), list(conv_args["dilation"])
        self.groups = int(conv_args["groups"])
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._setup(config, state, bias, relu, shape)
        self.set_kernel(kernel)

    @staticmethod
    def conv_args(conv: nn.Module) -> dict:
        """The geometry of a float conv, or ValueError when it is a kind this module does not take."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
            raise TypeError(f"{type(conv).__name__} is not a Conv1d or Conv2d")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} is not supported "
                             "(numeric zero padding only)")
        return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
                "padding": list(conv.padding), "dilation": list(conv.dilation), "groups": conv.groups}

    @classmethod
    def from_float(cls, conv: nn.Module, config: QuantConfig, act: tuple[float, int] | None = None,
                   kernel: str = "auto", relu: bool = False, scale: torch.Tensor | None = None
                   ) -> W8A8Conv:
        args = cls.conv_args(conv)
        if act is None:
            raise ValueError("static activation quantization needs calibrated (scale, zero point)")
        if config.group_size is not None:
            raise ValueError("convolutions take one weight scale per output channel (no group size)")
        state = cls.scheme_for(config).encode(conv.weight, scale=scale)
        state |= {"act_scale": torch.tensor([act[0]], dtype=torch.float32),
                 "act_zero_point": torch.tensor([act[1]], dtype=torch.int32)}
        return cls(args, config, state, conv.bias, kernel, relu)

    def geometry(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups}

    def _conv_spec(self) -> ConvSpec:
        return ConvSpec(kernel_size=tuple(self.kernel_size), stride=tuple(self.stride),
                        padding=tuple(self.padding), dilation=tuple(self.dilation), groups=self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel.run(x.float(), self._prep, self.spec, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        sim = ", simulated" if self.simulated else ""
        relu = ", relu fused" if self.relu else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, recipe={self.config.name}, "
                f"kernel={self.kernel_name}, {self._act_repr()}{relu}{sim}")

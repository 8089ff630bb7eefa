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

Kernels: "onednn" (torch.ops.onednn int8 ops + lowbit's fused quantize/epilogue ops), or "reference",
the same arithmetic in float32 PyTorch ops (dequantize, then a float matmul: simulated, slower). Both
compute the same quantized activations, so they agree to float rounding of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import lowbit_cpu, onednn
from .formats import Scheme, scheme_for
from .modules import QuantModule
from .recipes import QuantConfig

KERNELS = ("onednn", "reference")
# Dynamic W8A8 with this many rows or fewer (decode, tiny batches) is memory-bound: lowbit's int8 GEMV
# reads the same int8 weights once and skips quantizing the activations, which here beat the int8 GEMM
# at 1 row by 4-8x (Llama-3.2-1B-shaped layers, benchmarks/llama_layer.py --per-layer).
GEMV_MAX_ROWS = 4
_MIN_STEP = 1e-12  # the C++ ops' smallest activation step (act_quant.h kMinStep)


def weight_scheme(config: QuantConfig) -> Scheme:
    """The weight format of W8A8 layers: symmetric codes in int8 for the int8 kernels; 8-bit codes stay
    within the machine's safe range (onednn.weight_qmax), narrower ones use their full symmetric range."""
    int8 = config.kind == "int" and config.bits == 8
    return scheme_for(config, signed=True, qmax=onednn.weight_qmax() if int8 else None)


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


class FusedReLU(nn.Identity):
    """Where a ReLU stood whose work the layer before it now does (relu fused into the int8 kernel)."""


class _W8A8(QuantModule):
    """State and kernel choice shared by W8A8Linear and W8A8Conv."""

    @classmethod
    def scheme_for(cls, config: QuantConfig) -> Scheme:
        return weight_scheme(config)

    def _setup(self, config: QuantConfig, state: dict[str, torch.Tensor], bias: torch.Tensor | None,
               relu: bool, shape: tuple[int, ...]) -> None:
        self.weight_shape = tuple(shape)
        self._init_state(shape[0], int(torch.Size(shape[1:]).numel()), config, state)
        self.codes = self.scheme.int8_codes(state, self.weight_shape)[0]
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self.relu = relu
        self.kernel_name = "reference"

    @property
    def static(self) -> bool:
        return self.config.act == "static"

    @property
    def act_qparams(self) -> tuple[float, int]:
        return float(self.act_scale.item()), int(self.act_zero_point.item())

    @property
    def weight_qmax(self) -> int:
        return int(self.codes.abs().max().item())

    def candidate_kernels(self) -> list[str]:
        """Kernels that compute this layer exactly on this machine (the reference always does)."""
        ok = onednn.available() and self.weight_qmax <= onednn.weight_qmax() and self.scale.dim() == 1
        return ["onednn", "reference"] if ok else ["reference"]

    def set_kernel(self, name: str) -> None:
        if name == "auto":
            name = self.candidate_kernels()[0]
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r} for {self.config.name}; valid: auto, {', '.join(KERNELS)}")
        if name not in self.candidate_kernels():
            raise ValueError(f"kernel {name!r} cannot run this layer here (oneDNN int8 ops "
                             f"{'missing' if not onednn.available() else 'would saturate weights of this range'})")
        self._packed = self._pack() if name == "onednn" else None
        self.kernel_name = name

    def __getstate__(self) -> dict:
        # oneDNN's packed weight is an opaque tensor that cannot be copied or pickled: drop it, and
        # rebuild it from the canonical int8 weight on the other side (copy.deepcopy goes through here).
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.kernel_name == "onednn":
            self._packed = self._pack()

    @property
    def kernel(self) -> str:
        return self.kernel_name

    @property
    def act_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def simulated(self) -> bool:
        return self.kernel_name == "reference"

    def dequantized_weight(self) -> torch.Tensor:
        if self.scale.dim() == 2:  # per group along the input
            n, groups = self.scale.shape
            return (self.codes.float().reshape(n, groups, -1) * self.scale[:, :, None]).reshape(self.weight_shape)
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.float() * self.scale.reshape(shape)

    def _act_repr(self) -> str:
        if not self.static:
            return "act=uint8 per row (dynamic)"
        s, z = self.act_qparams
        return f"act=uint8 static (scale={s:.3g}, zero={z})"


class W8A8Linear(_W8A8):
    """nn.Linear with int8 weights and uint8 activations (dynamic per row, or static per tensor)."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, state: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, kernel: str = "auto", relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup(config, state, bias, relu, (out_features, in_features))
        self.set_kernel(kernel)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, act: tuple[float, int] | None = None,
                   kernel: str = "auto", relu: bool = False, scale: torch.Tensor | None = None
                   ) -> W8A8Linear:
        """`scale`, when given, is used instead of the weight scale computed from the weight (QAT's)."""
        state = cls.scheme_for(config).encode(linear.weight, scale=scale)
        if config.act == "static":
            if act is None:
                raise ValueError("static activation quantization needs calibrated (scale, zero point)")
            state["act_scale"] = torch.tensor([act[0]], dtype=torch.float32)
            state["act_zero_point"] = torch.tensor([act[1]], dtype=torch.int32)
        return cls(linear.in_features, linear.out_features, config, state, linear.bias, kernel, relu)

    def _pack(self) -> dict[str, torch.Tensor]:
        prep = {"w": onednn.prepack_linear(self.codes), "wz": onednn.weight_zeros(self.out_features)}
        if self.static:
            prep["act"] = self.act_qparams  # Python numbers: no tensor-to-scalar sync per call
        # sum_k w[n, k] * sw[n]: the dynamic kernel's zero-point correction term.
        prep["csw"] = (self.codes.sum(1, dtype=torch.int64).float() * self.scale).contiguous()
        if not self.static and lowbit_cpu.available():
            # The same int8 codes for the few-row GEMV (unsigned codes with zero point 128).
            k = self.in_features
            codes = (self.codes.to(torch.int16) + 128).to(torch.uint8)
            prep["gemv"] = lowbit_cpu.prepack(codes, self.scale[:, None], torch.full((self.out_features, 1), 128.0),
                                              8, k)["qweight"]
        return prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.kernel_name == "onednn":
            if "gemv" in self._packed and x2.shape[0] <= GEMV_MAX_ROWS:
                y = lowbit_cpu.linear(x2, {"qweight": self._packed["gemv"]}, 8, self.in_features, self.out_features,
                                      self.in_features, self.bias)
                if self.relu:
                    y = y.relu_()
            elif self.static:
                s, z = self._packed["act"]
                y = onednn.linear_static(x2, self._packed["w"], s, z, self.scale, self._packed["wz"], self.bias,
                                         self.relu)
            else:
                y = onednn.linear_dynamic(x2, self._packed["w"], self.scale, self._packed["wz"], self._packed["csw"],
                                          self.bias, self.relu)
        else:
            xq = fake_quant_tensor(x2, *self.act_qparams) if self.static else fake_quant_rows(x2)
            y = F.linear(xq, self.dequantized_weight(), self.bias)
            if self.relu:
                y = y.relu_()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        sim = ", simulated" if self.simulated else ""
        relu = ", relu fused" if self.relu else ""
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

    def _pack(self) -> dict[str, torch.Tensor]:
        s, z = self.act_qparams
        return {"w": onednn.prepack_conv(self.codes, self.scale, s, z, self.stride, self.padding,
                                         self.dilation, self.groups),
                "wz": onednn.weight_zeros(self.out_channels, conv=True), "act": (s, z)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.kernel_name == "onednn":
            s, z = self._packed["act"]
            y = onednn.conv_static(xf, self._packed["w"], s, z, self.scale, self._packed["wz"], self.bias,
                                   self.stride, self.padding, self.dilation, self.groups, self.relu)
        else:
            s, z = self.act_qparams
            conv = F.conv1d if self.codes.dim() == 3 else F.conv2d
            y = conv(fake_quant_tensor(xf, s, z), self.dequantized_weight(), self.bias, self.stride, self.padding,
                     self.dilation, self.groups)
            if self.relu:
                y = y.relu_()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        sim = ", simulated" if self.simulated else ""
        relu = ", relu fused" if self.relu else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, recipe={self.config.name}, "
                f"kernel={self.kernel_name}, {self._act_repr()}{relu}{sim}")

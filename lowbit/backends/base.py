"""What a kernel is: the layer description it is chosen by, and the three things it does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a convolution (Conv1d when kernel_size has one entry, Conv2d with two)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class LayerSpec:
    """Everything a kernel needs to know to say whether it can run a layer, and to run it.

    `family` is the weight format's family: "int" (integer codes), "float" (a float cast, `fmt` naming
    it: "bf16", "fp16", "fp8_e4m3", ...) or "codebook" (indices into a table per block). Integer
    weight-only layers (act None): unsigned codes [N, K], W = (codes - zero) * scale per group of
    `group_size` inputs. Layers with uint8 activations (act "dynamic": per row at run time, "static":
    one fixed act_scale / act_zero): signed int8 codes, W = codes * scale, `weight_qmax` the largest
    |code| the layer holds, `conv` its geometry when it is a convolution, `relu` a ReLU fused after it,
    `after_act` whether its input is the output of an elementwise activation (GELU, SiLU, ...): traced,
    such a layer quantizes its input with lowbit's own op, since a compiler fusing the activation into
    the quantization's two passes over each row (range, then codes) computes the activation twice.
    """

    n: int  # output features (channels)
    k: int  # inputs per output, already padded to a multiple of group_size
    bits: int
    group_size: int  # == k for per-channel
    symmetric: bool
    act: str | None = None
    weight_qmax: int = 0
    conv: ConvSpec | None = None
    relu: bool = False
    after_act: bool = False
    act_scale: float = 1.0
    act_zero: int = 0
    family: str = "int"
    fmt: str = ""


@dataclass
class StoredWeight:
    """A layer's canonical weight, as a kernel's `prepare` reads it: the format's scheme (a
    lowbit.formats.Scheme; not imported here, formats sit above the kernels), the tensors the checkpoint
    stores, and the float weight's shape. Each form is derived once per StoredWeight and shared."""

    scheme: Any
    state: Mapping[str, torch.Tensor]
    shape: tuple[int, ...]
    _forms: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def _form(self, name: str) -> Any:
        if name not in self._forms:
            self._forms[name] = getattr(self.scheme, name)(self.state, self.shape)
        return self._forms[name]

    def affine_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unsigned codes uint8 [N, Kp], scale and zero point float32 [N, Kp / G]:
        W = (codes - zero) * scale."""
        return self._form("affine_codes")

    def int8_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed int8 codes and scale ([N] per channel, else [N, K / G]): W = codes * scale."""
        return self._form("int8_codes")

    def codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook indices uint8 [N, Kp] and tables [N, Kp / G, 2**bits] (float16 or float32):
        W[n, j] = table[n, j // G, index[n, j]]."""
        return self._form("codebook_form")

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight of `shape`, computed now (not cached: the per-call path of simulated kernels)."""
        return self.scheme.decode(self.state, self.shape, dtype)


class Kernel:
    """One way to compute a quantized layer.

    `prepare` turns the canonical weight (a StoredWeight: it asks the format's scheme for the form it
    takes) into the kernel's own form once (at quantize or load time); `run` computes the layer from it.
    Kernels that share a name (the one `backend=` and checkpoints use) take disjoint kinds of layer.
    """

    name = "?"
    act_dtype = torch.float32  # activations are cast to this before the kernel runs
    simulated = False  # True: weights are dequantized to float and a float matmul runs

    def supports(self, spec: LayerSpec) -> bool:
        raise NotImplementedError

    def refusal(self, spec: LayerSpec) -> str:
        """Why `supports(spec)` is False, for the error a user sees when forcing this kernel."""
        return f"it does not take {spec}"

    def prepare(self, weight: StoredWeight, spec: LayerSpec) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, prep: dict[str, Any], spec: LayerSpec,
            bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # Optional: `run` for eager calls on inputs of any leading shape and float dtype, result in x's dtype,
    # with no Python-side reshapes or casts. A decode call of a small layer takes ~20-50 us, and each torch
    # call made from Python ~1 us; layers call this when it exists and nothing is being traced.
    eager: Any = None

    def bind(self, prep: dict[str, Any], spec: LayerSpec) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """`eager` for one layer, every argument but x and the bias fixed: f(x, bias). In decode each Python
        object a call touches is likely a cache miss, since the layer before streamed its weights through the
        caches; kernels whose eager call is a C++ function return a closure straight to it."""
        eager = self.eager
        return lambda x, bias: eager(x, prep, spec, bias)

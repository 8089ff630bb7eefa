"""What a kernel is: the layer description it is chosen by, and the three things it does."""

from __future__ import annotations

from dataclasses import dataclass
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

    Weight-only layers (act None): unsigned codes [N, K], W = (codes - zero) * scale per group of
    `group_size` inputs. Layers with uint8 activations (act "dynamic": per row at run time, "static":
    one fixed act_scale / act_zero): signed int8 codes, W = codes * scale, `weight_qmax` the largest
    |code| the layer holds, `conv` its geometry when it is a convolution, `relu` a ReLU fused after it.
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
    act_scale: float = 1.0
    act_zero: int = 0


class Kernel:
    """One way to compute a quantized layer.

    `prepare` turns the canonical weight into the kernel's own form once (at quantize or load time);
    `run` computes the layer from it. Kernels that share a name (the one `backend=` and checkpoints
    use) take disjoint kinds of layer.
    """

    name = "?"
    act_dtype = torch.float32  # activations are cast to this before the kernel runs
    simulated = False  # True: weights are dequantized to float and a float matmul runs

    def supports(self, spec: LayerSpec) -> bool:
        raise NotImplementedError

    def refusal(self, spec: LayerSpec) -> str:
        """Why `supports(spec)` is False, for the error a user sees when forcing this kernel."""
        return f"it does not take {spec}"

    def prepare(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                spec: LayerSpec) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, prep: dict[str, Any], spec: LayerSpec,
            bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

"""Edits of a model's weights in place: fold an eval-mode BatchNorm into the convolution before it (used by
quantize's BatchNorm folding and by the workbench's models)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it, in place (float64 arithmetic)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm2d({bn.num_features}) after a conv with {conv.out_channels} channels")
    # Fold in float64 so the folded model stays within float32 rounding of the original.
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    shape = (-1,) + (1,) * (w.dim() - 1)
    conv.weight.copy_((w * scale.reshape(shape)).to(conv.weight.dtype))
    new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)

"""How an exported model's outputs are compared with lowbit's own."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ExportError(ValueError):
    """A model (or one of its layers) that a format cannot represent, or an export that did not verify."""


@dataclass(frozen=True)
class Agreement:
    """Outputs of an exported model against lowbit's, on the same inputs."""

    runtime: str
    max_abs: float
    mean_abs: float
    cosine: float  # of the flattened outputs

    def __str__(self) -> str:
        return (f"{self.runtime}: max |diff| {self.max_abs:.3g}, mean |diff| {self.mean_abs:.3g}, "
                f"cosine {self.cosine:.6f}")


def compare(reference: torch.Tensor, got: torch.Tensor, runtime: str, *, min_cosine: float | None = None,
            max_abs: float | None = None) -> Agreement:
    """Compare `got` (the runtime's output) with `reference` (lowbit's); raise ExportError past a bound."""
    ref = torch.as_tensor(reference).detach().double().flatten()
    out = torch.as_tensor(got).detach().double().flatten()
    if ref.shape != out.shape:
        raise ExportError(f"{runtime} returned {out.numel()} values where lowbit's model gives {ref.numel()}")
    diff = (ref - out).abs()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=0).item() if ref.numel() else 1.0
    if not torch.isfinite(out).all():
        cos = float("nan")
    agreement = Agreement(runtime, diff.max().item() if diff.numel() else 0.0,
                          diff.mean().item() if diff.numel() else 0.0, cos)
    bad = math.isnan(cos)
    if min_cosine is not None and not bad:
        bad = cos < min_cosine
    if max_abs is not None and not bad:
        bad = agreement.max_abs > max_abs
    if bad:
        raise ExportError(f"the exported model does not match lowbit's: {agreement} (bounds: cosine >= "
                          f"{min_cosine}, max |diff| <= {max_abs})")
    return agreement

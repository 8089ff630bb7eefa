"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest, and the weights they multiply matter
most. Scaling those weight columns up by s (and the activations down by s, so the product is unchanged)
gives them a finer share of the quantization grid. The scale is s = mean|x|^alpha per input channel,
normalized, with alpha chosen by grid search to minimize the layers' output error on calibration data
(alpha = 0 is plain round-to-nearest, so the search never does worse than RTN on that data). Then each
group's range is shrunk, where that lowers the output error ("clipping"), searched per group.

At 2 bits (BLOCK_LOSS_BITS) three things change, measured on the project's small LM (decoder linears,
held-out perplexity ratio to float; llm-compressor's AWQ on the same calibration: x1.0133) and on MiniLM
(STS-B dev): the scale is judged by the error of the whole block's output (attention or MLP nonlinearities
and all, as llm-compressor and AutoAWQ judge it) instead of the layers' own outputs; the clip search judges
each group on 4096 rows instead of 512 (on 512 it overfits at 2 bits); and layers whose 1/s cannot be folded
into the op before them keep s = 1 rather than multiplying their input at run time. Small LM W2-g64: x1.0132
(the layer-output search: x1.0176); MiniLM int2-g32: 84.49 (the layer-output search 84.75, rounding 81.64).
Without any clip search the small LM gave x1.0126 but MiniLM fell below rounding (81.34), so it stays. At 3
and 4 bits the layer-output search stays: it measured better there (W3-g128 x1.0020 against the block
loss's x1.0022; W4-g128 x1.0006 against x1.0007).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core import choose_qparams_affine, dequantize_affine, quantize_affine

GRID = 20  # alphas 0, 0.05, ..., 0.95; shrink ratios 1.0 down to 0.525
SCALE_ROWS = 4096  # calibration rows the scale search evaluates the output error on
CLIP_ROWS = 512  # and the clipping search
MAX_SHRINK = 0.5
BLOCK_LOSS_BITS = 2  # at this width and below: block-output loss, clipping on SCALE_ROWS, unfoldable s = 1


def fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantize and dequantize w [N, K] by groups along K (zero-padded to whole groups)."""
    k = w.shape[1]
    kp = -(-k // group_size) * group_size
    wp = F.pad(w, (0, kp - k)) if kp != k else w
    block = (1, group_size)
    scale, zero = choose_qparams_affine(wp, bits, block, symmetric)
    codes = quantize_affine(wp, scale, zero, bits, block, symmetric=symmetric)
    return dequantize_affine(codes, scale, zero, block)[:, :k]


@torch.no_grad()
def search_scale(loss: Callable[[torch.Tensor], float], x_mean: torch.Tensor, grid: int = GRID
                 ) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s = mean|x|^alpha (normalized so max * min = 1) whose quantized layers
    give the lowest `loss(s)`, over alpha = 0, 1/grid, ..., (grid-1)/grid. Returns (s, alpha)."""
    base = x_mean.float().clamp_min(1e-8)
    best = (float("inf"), torch.ones_like(base), 0.0)
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = loss(s)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def output_loss(weights: list[torch.Tensor], x: torch.Tensor, bits: int, group_size: int,
                symmetric: bool) -> Callable[[torch.Tensor], float]:
    """loss(s): the summed mean squared error of the linears' outputs on inputs x [T, K] when each weight
    is quantized as W * s (and its input divided by s)."""
    x = x.float()
    ys = [x @ w.float().T for w in weights]

    def loss(s: torch.Tensor) -> float:
        return sum(float((x @ (fake_quant(w.float() * s, bits, group_size, symmetric) / s).T - y).pow(2).mean())
                   for w, y in zip(weights, ys))

    return loss


def block_loss(run: Callable[[], list[torch.Tensor]], layers: list, bits: int, group_size: int,
               symmetric: bool) -> Callable[[torch.Tensor], float]:
    """loss(s): the summed mean squared error of a block's outputs (`run()` runs it on calibration inputs and
    returns its outputs) when `layers`' weights are quantized as W * s (and their inputs divided by s). The
    layers' weights are swapped for the duration of each call."""
    ref = [y.detach().clone() for y in run()]
    originals = [m.weight.data for m in layers]

    def loss(s: torch.Tensor) -> float:
        try:
            for m, w in zip(layers, originals):
                m.weight.data = (fake_quant(w.float() * s, bits, group_size, symmetric) / s).to(w.dtype)
            return sum(float((y - r).pow(2).mean()) for y, r in zip(run(), ref))
        finally:
            for m, w in zip(layers, originals):
                m.weight.data = w

    return loss


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                grid: int = GRID, max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """w [N, K] with each group's values clamped to the shrunk range (ratio searched per output row and
    group) that minimizes that group's share of the output error on inputs x [T, K]."""
    w = w.float()
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    wg = F.pad(w, (0, kp - k)).reshape(n, kp // group_size, group_size)
    xg = F.pad(x.float(), (0, kp - k)).reshape(x.shape[0], kp // group_size, group_size)
    best_w = wg.clone()
    best_err = torch.full(wg.shape[:2], float("inf"))
    chunk = max(1, (1 << 24) // max(1, x.shape[0] * wg.shape[1]))  # bound the [T, rows, groups] temporary
    for i in range(grid):
        r = 1.0 - max_shrink * i / grid
        if symmetric:
            m = wg.abs().amax(-1, keepdim=True) * r
            wc = torch.maximum(torch.minimum(wg, m), -m)
        else:
            wc = torch.maximum(torch.minimum(wg, wg.amax(-1, keepdim=True) * r), wg.amin(-1, keepdim=True) * r)
        d = wg - fake_quant(wc.reshape(n, kp), bits, group_size, symmetric).reshape(wg.shape)
        err = torch.cat([torch.einsum("tgj,ngj->tng", xg, d[a:a + chunk]).pow(2).mean(0)
                         for a in range(0, n, chunk)])
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w[better] = wc[better]
    return best_w.reshape(n, kp)[:, :k]

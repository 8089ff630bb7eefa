"""HQQ (Badri and Shaji, 2023): half-quadratic quantization, data-free.

Round-to-nearest with min-max parameters spends its error evenly; HQQ instead fits each group's zero
point to minimize an l_p norm (p < 1) of the weight error, which tolerates a few large errors (outliers)
in exchange for a closer fit everywhere else. Half-quadratic splitting alternates two easy steps:
    E <- shrink_p(W - dequant(quant(W)))        (a generalized soft threshold, the l_p proximal step)
    z <- mean over the group of (Q - (W - E) / s)   (closed-form least squares for the zero point)
with the penalty weight beta growing by kappa each step. Scales stay those of min-max; zero points
become fractional, which lowbit's format and kernels take as they are. With 16-bit parameters the scales
are rounded to float16 first and every zero point the iteration proposes is rounded to float16 too, so
the error it keeps the best of is the error of what is stored.
"""

from __future__ import annotations

import torch

from ..core import choose_qparams_affine


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(w: torch.Tensor, bits: int, group_size: int, *, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iters: int = 20,
                 half: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8 [N, K]), scale and fractional zero point ([N, K // group_size]) for weight w [N, K].
    half: scales and zero points are float16 values (returned as float32)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    W = w.detach().float().reshape(n, k // group_size, group_size)
    scale, zero = choose_qparams_affine(w.detach().float(), bits, (1, group_size), False, half=half)
    s, z = scale[..., None], zero[..., None].clone()
    qmax = 2 ** bits - 1
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    for _ in range(iters):
        q = torch.round(W / s + z).clamp_(0, qmax)
        err = W - (q - z) * s
        # keep, per group, the zero point with the least l_p error seen so far
        cost = err.abs().pow(p).sum(-1, keepdim=True)
        better = cost < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, cost, best_err)
        e = _shrink(err, beta, p)
        z = (q - (W - e) / s).mean(-1, keepdim=True)
        if half:
            # Zero points lie within [-2**bits, 2**(bits+1)] or so: float16 holds them to 2**-3 or finer.
            z = z.to(torch.float16).float()
        beta *= kappa
    z = best_z
    codes = torch.round(W / s + z).clamp_(0, qmax).to(torch.uint8).reshape(n, k)
    return codes, scale, z[..., 0]

"""HQQ (Badri and Shaji, 2023): half-quadratic quantization, data-free.

Round-to-nearest with min-max parameters spends its error evenly; HQQ instead fits each group's zero
point to minimize an l_p norm (p < 1) of the weight error, which tolerates a few large errors (outliers)
in exchange for a closer fit everywhere else. Half-quadratic splitting alternates two easy steps:
    E <- shrink_p(W - dequant(quant(W)))        (a generalized soft threshold, the l_p proximal step)
    z <- mean over the group of (Q - (W - E) / s)   (closed-form least squares for the zero point)
Scales stay those of min-max; zero points become fractional, which lowbit's format and kernels take as
they are. With 16-bit parameters the scales are rounded to float16 first and every zero point the
iteration proposes is rounded to float16 too, so the error it judges is the error of what is stored.

The iteration is not convex, and where it ends depends on where it starts and when it stops. Three fits
are made and each group keeps the one whose stored weights have the least squared error:
  * from lowbit's round-to-nearest parameters (range widened to hold 0.0, integer zero point), keeping each
    group's best zero point by the l_p error over `iters` steps, the penalty beta growing by kappa;
  * the same from the plain min-max range with its fractional zero point (the hqq package's start);
  * the hqq package's own loop from that start: stop at the first step where the mean |error| over the
    whole weight does not fall, keep the zero point of that last update.
On the project's small LM (decoder linears, held-out perplexity ratio to float) no single one of the three
is best at every width: W2-g64 x1.0181 / x1.0131 / x1.0128, W3-g128 x1.0027 / x1.0040 / x1.0043; the
per-group choice gives x1.0126 and x1.0031 (the hqq package itself: x1.0128 and x1.0043).
"""

from __future__ import annotations

import torch

from ..core import HALF_TINY, choose_qparams_affine, half_scale


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def _fit_zero(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, *, p: float, beta: float,
              kappa: float, iters: int, half: bool, first_rise: bool) -> torch.Tensor:
    """Zero points [..., 1] fitted by the half-quadratic iteration for groups W [..., G] with scales s."""
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    mean_err = float("inf")
    for _ in range(iters):
        q = torch.round(W / s + z).clamp_(0, qmax)
        err = W - (q - z) * s
        if first_rise:
            now = float(err.abs().mean())
            if now >= mean_err:
                break
            mean_err = now
        else:
            # keep, per group, the zero point with the least l_p error seen so far
            cost = err.abs().pow(p).sum(-1, keepdim=True)
            better = cost < best_err
            best_z, best_err = torch.where(better, z, best_z), torch.where(better, cost, best_err)
        z = (q - (W - _shrink(err, beta, p)) / s).mean(-1, keepdim=True)
        if half:
            # Zero points lie within [-2**bits, 2**(bits+1)] or so: float16 holds them to 2**-3 or finer.
            z = z.to(torch.float16).float()
        if not first_rise:
            beta *= kappa
    return z if first_rise else best_z


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
    qmax = 2 ** bits - 1
    fit = {"p": p, "beta": beta, "kappa": kappa, "iters": iters, "half": half}

    scale, zero = choose_qparams_affine(w.detach().float(), bits, (1, group_size), False, half=half)
    s_int, z_int = scale[..., None], zero[..., None]
    # The plain min-max start: a fractional zero point. Groups it cannot describe (a range too narrow for a
    # scale, or a zero point float16 cannot hold) take the first start's parameters instead.
    lo, hi = W.amin(-1, keepdim=True), W.amax(-1, keepdim=True)
    s_mm = (hi - lo) / qmax
    ok = (hi - lo > 1e-6 * torch.maximum(hi.abs(), lo.abs())) & (s_mm > 0)
    if half:  # a scale with no normal float16 near it would turn the whole tensor's scales float32
        ok &= (s_mm >= HALF_TINY) & (s_mm <= torch.finfo(torch.float16).max)
    s_mm = torch.where(ok, s_mm, s_int)
    if half:
        s_mm = half_scale(s_mm)
    z_mm = torch.where(ok, -lo / s_mm, z_int)
    if half:
        z_mm = z_mm.to(torch.float16).float()
    ok &= torch.isfinite(z_mm) & (z_mm.abs() < 2**14)
    s_mm, z_mm = torch.where(ok, s_mm, s_int), torch.where(ok, z_mm, z_int)

    fits = [(s_int, _fit_zero(W, s_int, z_int.clone(), qmax, first_rise=False, **fit)),
            (s_mm, _fit_zero(W, s_mm, z_mm.clone(), qmax, first_rise=False, **fit)),
            (s_mm, _fit_zero(W, s_mm, z_mm.clone(), qmax, first_rise=True, **fit))]
    best = None
    for s, z in fits:
        err = ((torch.round(W / s + z).clamp_(0, qmax) - z) * s - W).pow(2).sum(-1, keepdim=True)
        if best is None:
            best = (err, s, z)
        else:
            pick = err < best[0]
            best = (torch.where(pick, err, best[0]), torch.where(pick, s, best[1]), torch.where(pick, z, best[2]))
    _, s, z = best
    codes = torch.round(W / s + z).clamp_(0, qmax).to(torch.uint8).reshape(n, k)
    return codes, s[..., 0], z[..., 0]

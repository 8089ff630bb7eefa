"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time, and after each column push
its rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = X^T X over the calibration inputs X.

Options: activation order (columns with the largest H diagonal go first), damping (a fraction of the mean
H diagonal added to it, so the Cholesky factorization exists), and group-wise scales. Scales and zero
points are chosen per group from the original weight before any column moves ("static groups"), which
keeps groups in the input order the kernels expect whatever order the columns are processed in. Each
group's range may be shrunk first (a grid of fractions of min-max), to the one that rounds the group with
the least error weighted by the Hessian's diagonal: at 2-3 bits the extremes waste levels. Whether a row
keeps its shrunk ranges is decided after the error propagation, by the row's output error. Last, with every
code chosen, each row's scales are solved again for the least output error (zero points kept).
"""

from __future__ import annotations

import torch

from ..core import CLIP_GRID, HALF_TINY, choose_qparams_clipped, dequantize_affine


def _inverse_cholesky(h: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular U with U^T U = (H' + damp * mean(diag H') * I)^-1, where H' is H with its rows and
    columns in `order` and a unit diagonal at `dead` inputs; more damping if H' is too ill-conditioned.
    With J the order reversal and J H' J = L L^T (Cholesky), H'^-1 = V^T V for the upper triangular
    V = J L^-1 J: one factorization and one triangular solve, instead of inverting H' and factoring the
    inverse (torch.cholesky_inverse was 13x slower than the solve here, at K = 4096). J H' J is H indexed
    by the reversed order: no [K, K] copy more than needed (memory matters when quantizing block by block)."""
    rev = order.flip(0)
    mean_diag = None
    for attempt in range(6):
        damped = h[rev][:, rev]
        damped.diagonal()[dead[rev]] = 1.0
        if mean_diag is None:
            mean_diag = float(damped.diagonal().mean())
        damped.diagonal().add_(damp * 10 ** attempt * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(chol, torch.eye(h.shape[0], dtype=h.dtype), upper=False)
            del chol
            return torch.flip(inverse, (0, 1))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with heavy damping; "
                     "use more (or more varied) calibration data")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                  damp: float = 0.01, act_order: bool = True, block: int = 128,
                  codebook: torch.Tensor | None = None, clip=CLIP_GRID,
                  half: bool = False, refit: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8 [N, K]), scale and zero point ([N, K // group_size]) for weight w [N, K] given H [K, K].

    The codes follow lowbit.core's affine convention: W ~ (codes - zero) * scale. With `codebook`
    ([N, K // group_size, 2**bits], fixed up front like the scales), each weight is rounded to the nearest
    entry of its group's codebook instead, and the codes index it (scale and zero are then unused).
    half: the scales are float16 values (lowbit.core.half_scale), rounded before the first column, so the
    error each column passes on is the error of the scales that are stored.
    clip: fractions of each group's range tried for its scale (core.choose_qparams_clipped, weighted by
    H's diagonal); (1.0,) keeps min-max. With more than one fraction GPTQ runs twice, on the clipped
    ranges and on min-max, and each output row keeps the run with the smaller error on the calibration
    inputs, dW H dW^T.
    refit: once the codes are chosen, each row's scales are solved again for the least output error with
    the codes and zero points fixed (see _refit_scales).
    """
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    # float32, as the paper's implementation does.
    h = h.float()
    diag = torch.diag(h).clone()
    dead = diag == 0  # inputs that were always zero: their weights cannot matter
    order = torch.argsort(torch.where(dead, 1.0, diag), descending=True) if act_order else torch.arange(k)
    U = _inverse_cholesky(h, order, dead, damp)
    grid = tuple(clip)
    if codebook is not None or len(grid) <= 1:
        if codebook is None:
            scale, zero = choose_qparams_clipped(w, bits, group_size, symmetric, diag, half=half, grid=grid)
        else:
            scale = zero = torch.zeros(n, k // group_size)
        codes = _propagate(w, U, order, dead, group_size, bits, symmetric, scale, zero, codebook, block)
        if codebook is None and refit:
            scale = _refit_scales(w, _damped(h, dead, damp), codes, scale, zero, group_size, half)
        return codes, scale, zero
    # The clip search judges each group's range by its own rounding error, before any error moves between
    # columns; GPTQ's propagation can undo much of the error of a wide range, and a clipped outlier's error
    # then spreads. So both run, clipped ranges and min-max, and each output row keeps the one with the
    # smaller output error on the calibration inputs, tr(dW H dW^T) per row: rows are independent in GPTQ.
    # Measured: on the small LM (held-out perplexity) clipping every row cost 0.08% at W3-g128 and 0.45% at
    # W2-g64 against min-max; on MiniLM min-max alone cost int2-g32 0.8 STS-B points against clipping.
    s0, z0 = choose_qparams_clipped(w, bits, group_size, symmetric, diag, half=half, grid=grid)
    s1, z1 = choose_qparams_clipped(w, bits, group_size, symmetric, diag, half=half, grid=(1.0,))
    # Both runs in one pass, as 2N rows: the column loop's cost is mostly per column, not per row.
    scale, zero = torch.cat([s0, s1]), torch.cat([z0, z1])
    codes = _propagate(torch.cat([w, w]), U, order, dead, group_size, bits, symmetric, scale, zero, None, block)
    dw = torch.cat([w, w]) - dequantize_affine(codes, scale, zero, (1, group_size))
    dw[:, dead] = 0.0
    err = ((dw @ h) * dw).sum(1)
    wider = (err[n:] < err[:n])[:, None]  # ties keep the clip search's choice
    codes, scale, zero = torch.where(wider, codes[n:], codes[:n]), torch.where(wider, s1, s0), torch.where(wider, z1, z0)
    if refit:
        # After the choice: refitting both runs first measured no better on the small LM (seed 0 KL, W3
        # 0.571e-3 against 0.557e-3, W2 2.599e-3 against 2.540e-3) at twice the cost.
        scale = _refit_scales(w, _damped(h, dead, damp), codes, scale, zero, group_size, half)
    return codes, scale, zero


def _damped(h: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """H with GPTQ's damping on its diagonal (dead inputs' rows and columns stay zero)."""
    out = h.clone()
    live = ~dead
    if bool(live.any()):
        out.diagonal()[live] += damp * float(h.diagonal()[live].mean())
    return out


def _refit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int, half: bool) -> torch.Tensor:
    """The scales that minimise each row's output error (w - q) H (w - q)^T with the codes and zero points
    fixed, q = (codes - zero) * scale: GPTQ fixed the scales before it rounded the first column, and once
    every code is chosen they are no longer the best for them. q is linear in the row's G scales, so the
    optimum is one G x G solve per row. A row keeps its old scales unless the new ones, as stored (float16
    when half), are positive and lower its error. Zero points stay as they are (integers for min-max and
    clipped ranges), so checkpoints and exports see the same kind of parameters."""
    n, k = w.shape
    g = k // group_size
    d = (codes.float().reshape(n, g, group_size) - zero[..., None]).reshape(n, k)  # q = d * scale per group
    # A[r, a, b] = d_ra^T H_ab d_rb over groups a, b; built one group b at a time against the groups a >= b
    # (A is symmetric: half the products), for a slab of rows at a time, so the temporaries stay near 16 MB
    # whatever the layer's size.
    A = torch.empty(n, g, g)
    slab = max(1, (1 << 22) // k)
    for r0 in range(0, n, slab):
        ds = d[r0:r0 + slab]
        for b in range(g):
            lo = b * group_size
            part = (ds[:, lo:] * (ds[:, lo:lo + group_size] @ h[lo:lo + group_size, lo:]))
            A[r0:r0 + slab, b:, b] = part.reshape(-1, g - b, group_size).sum(-1)
            A[r0:r0 + slab, b, b + 1:] = A[r0:r0 + slab, b + 1:, b]
    hw = w @ h
    rhs = (d * hw).reshape(n, g, group_size).sum(-1) - (A @ scale[..., None])[..., 0]
    # Solve for the change of scale; a tiny ridge on the diagonal keeps a group whose codes all sit at its
    # zero point (a zero row and column of A) where it was.
    diag = A.diagonal(dim1=1, dim2=2)
    ridge = torch.diag_embed(1e-6 * diag + 1e-12 * diag.amax(1, keepdim=True).clamp_min(1e-30))
    step, info = torch.linalg.solve_ex(A + ridge, rhs[..., None])
    new = scale + step[..., 0]
    if half:
        new = new.to(torch.float16).float()
    ok = (info == 0) & torch.isfinite(new).all(1) & (new >= (HALF_TINY if half else 1e-30)).all(1)
    new = torch.where(ok[:, None], new, scale)
    # The change of each row's error, from A and the right-hand side alone (no [N, K] x [K, K] product):
    # err(s) = w'Hw - 2 s'r + s'As with r = rhs + A s_old, so err(s_old + e) - err(s_old) = e'(Ae - 2 rhs).
    e = new - scale
    change = (e * ((A @ e[..., None])[..., 0] - 2 * rhs)).sum(1)
    return torch.where((change < 0)[:, None], new, scale)


def _propagate(w: torch.Tensor, U: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, group_size: int,
               bits: int, symmetric: bool, scale: torch.Tensor, zero: torch.Tensor,
               codebook: torch.Tensor | None, block: int) -> torch.Tensor:
    """GPTQ's column loop: codes (uint8 [N, K]) of w under fixed per-group scale/zero (or codebook), each
    column's rounding error pushed onto the later columns (in `order`) through U, the upper Cholesky factor
    of the inverse damped Hessian."""
    n, k = w.shape
    qmin, qmax = (1 if symmetric else 0), 2 ** bits - 1
    # Row i of these is input column order[i]: the loop below reads and updates contiguous rows.
    Wt = w[:, order].T.contiguous()
    Wt[dead[order]] = 0.0
    cols = (order // group_size).tolist()
    St, Zt = scale.T.contiguous(), zero.T.contiguous()  # [groups, N]
    Qt = torch.empty(k, n)
    diag = U.diagonal().tolist()
    threads = torch.get_num_threads()
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        Wb = Wt[b0:b1]  # a view: updated in place
        Eb = torch.empty(b1 - b0, n)
        # Hundreds of small vector ops per block: one thread does them faster than a team that must sync
        # on each (by 10x on a loaded 2-core machine); the matrix update after the block uses them all.
        torch.set_num_threads(1)
        try:
            for j in range(b1 - b0):
                i = b0 + j
                w_i, c = Wb[j], cols[i]
                if codebook is None:
                    q = torch.round(w_i / St[c] + Zt[c]).clamp_(qmin, qmax)
                    value = (q - Zt[c]) * St[c]
                else:
                    book = codebook[:, c]  # [N, 2**bits]
                    q = (w_i[:, None] - book).abs().argmin(1)
                    value = book.gather(1, q[:, None])[:, 0]
                Qt[i] = q
                err = (w_i - value) / diag[i]
                Wb[j + 1:].addr_(U[i, i + 1:b1], err, alpha=-1.0)
                Eb[j] = err
        finally:
            torch.set_num_threads(threads)
        Wt[b1:].addmm_(U[b0:b1, b1:].T, Eb, alpha=-1.0)
    return Qt.T[:, torch.argsort(order)].to(torch.uint8)

"""Non-uniform (codebook) quantization: an independent 1-D k-means per block.

All blocks are solved at once. Each block's values are sorted, so with sorted centroids a cluster is
a contiguous run of the sorted values bounded by the midpoints between neighbouring centroids; the
Lloyd update then needs only searchsorted and prefix sums, O(K log B) per block instead of O(K * B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .affine import affine_qparams_from_range, blocked_shape, blocks_shape, check_input


def _to_rows(x: torch.Tensor, block_size: Sequence[int]) -> torch.Tensor:
    """[num_blocks, block_numel] matrix, one row per block in block-grid (row-major) order."""
    nd = x.dim()
    xb = x.reshape(blocked_shape(x.shape, block_size))
    order = tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2))
    n_blocks = 1
    for g in blocks_shape(x.shape, block_size):
        n_blocks *= g
    return xb.permute(order).reshape(n_blocks, -1)


def _from_rows(rows: torch.Tensor, shape: Sequence[int], block_size: Sequence[int]) -> torch.Tensor:
    """Inverse of _to_rows."""
    nd = len(shape)
    grid = blocks_shape(shape, block_size)
    r = rows.reshape(tuple(grid) + tuple(int(b) for b in block_size))
    # r has dims [n0, n1, ..., b0, b1, ...]; interleave them back to [n0, b0, n1, b1, ...].
    order = tuple(d for i in range(nd) for d in (i, nd + i))
    return r.permute(order).reshape(tuple(shape))


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid per value (rows of sorted centroids); ties go to the lower one."""
    # Halve before adding so centroids near the float32 limit cannot overflow.
    mids = 0.5 * centroids[:, :-1] + 0.5 * centroids[:, 1:]
    return torch.searchsorted(mids.contiguous(), values.contiguous(), side="left")


def _lloyd(xs: torch.Tensor, prefix: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations on sorted rows `xs` (float64) from sorted initial centroids `cent`."""
    bsz = xs.shape[1]
    for _ in range(iters):
        mids = (cent[:, :-1] + cent[:, 1:]) / 2
        # ends[:, j] = number of sorted values <= mid j, i.e. where cluster j stops.
        ends = torch.searchsorted(xs, mids.contiguous(), side="right")
        starts = F.pad(ends, (1, 0), value=0)
        stops = F.pad(ends, (0, 1), value=bsz)
        count = stops - starts
        total = prefix.gather(1, stops) - prefix.gather(1, starts)
        new = torch.where(count > 0, total / count.clamp_min(1), cent)
        # Rounding can nudge a mean a few ulps past a neighbour; keep the rows sorted.
        new = torch.sort(new, dim=1).values
        if torch.equal(new, cent):
            break
        cent = new
    return cent


def _fit(rows: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-centroid codes for float32 centroids and each block's squared error (float64)."""
    codes = _assign(rows, centroids)
    err = (rows.double() - centroids.gather(1, codes).double()).pow(2).sum(dim=1)
    return codes, err


def kmeans_quantize(x: torch.Tensor, bits: int, block_size: Sequence[int],
                    iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block Lloyd k-means with 2**bits centroids (bits in 1..8).

    Returns (codes uint8 shaped like x, centroids float32 of shape blocks_shape + (2**bits,)), the
    centroids of each block sorted ascending. Two deterministic starts are run for every block, evenly
    spaced quantiles and the uniform asymmetric grid of choose_qparams_affine, and the one with the
    lower squared error is kept; Lloyd never increases the error, so the result is never worse than
    round-to-nearest on that grid (up to float rounding). A value equidistant from two centroids goes
    to the lower one and an empty cluster keeps its previous centroid, so blocks with fewer distinct
    values than centroids just get duplicate centroids.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = check_input(x)
    k = 2 ** bits
    rows = _to_rows(x, block_size)
    bsz = rows.shape[1]
    sorted_rows = torch.sort(rows, dim=1).values
    if k >= bsz:
        # A centroid per value is exact; the spare centroids repeat the block maximum.
        centroids = F.pad(sorted_rows, (0, k - bsz), mode="replicate")
        codes = _from_rows(_assign(rows, centroids).to(torch.uint8), x.shape, block_size)
        return codes, centroids.reshape(blocks_shape(x.shape, block_size) + (k,))
    # float64 for the iteration: prefix sums over a block must not lose the small values.
    xs = sorted_rows.double().contiguous()  # searchsorted copies non-contiguous boundaries
    prefix = F.pad(torch.cumsum(xs, dim=1), (1, 0))

    # Quantile start: centroid j at the (j + 0.5) / k quantile, linearly interpolated.
    pos = ((torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) * bsz / k - 0.5).clamp(0, bsz - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(bsz - 1)
    frac = pos - lo
    quantile = xs[:, lo] * (1 - frac) + xs[:, hi] * frac

    # Uniform start: exactly the grid (q - zero_point) * scale that affine round-to-nearest uses.
    scale, zero_point = affine_qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), bits)
    levels = torch.arange(k, dtype=torch.float32, device=x.device)
    uniform = ((levels - zero_point[:, None]) * scale[:, None]).double()

    cent_q = _lloyd(xs, prefix, quantile, iters).float()
    cent_u = _lloyd(xs, prefix, uniform, iters).float()
    codes_q, err_q = _fit(rows, cent_q)
    codes_u, err_u = _fit(rows, cent_u)
    use_u = (err_u < err_q)[:, None]  # ties keep the quantile start
    centroids = torch.where(use_u, cent_u, cent_q)
    codes = torch.where(use_u, codes_u, codes_q).to(torch.uint8)
    codes = _from_rows(codes, x.shape, block_size)
    return codes, centroids.reshape(blocks_shape(x.shape, block_size) + (k,))


def kmeans_dequantize(codes: torch.Tensor, centroids: torch.Tensor, block_size: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Look each code up in its block's codebook; centroids has shape blocks_shape + (K,)."""
    k = centroids.shape[-1]
    grid = blocks_shape(codes.shape, block_size)
    n_blocks = 1
    for g in grid:
        n_blocks *= g
    if centroids.numel() != n_blocks * k:
        raise ValueError(f"centroids of shape {tuple(centroids.shape)} do not match the block grid {grid} "
                         f"with {k} entries per block")
    bshape = blocked_shape(codes.shape, block_size)
    # [n0, 1, n1, 1, ..., k]: expanded (not copied) over each block for the gather below.
    table = centroids.float().reshape(tuple(d for g in grid for d in (g, 1)) + (k,))
    idx = codes.reshape(bshape).long().unsqueeze(-1)
    # (not while tracing: a graph cannot branch on data; the gather itself still checks its indices)
    if idx.numel() and not torch.compiler.is_compiling() and int(idx.max()) >= k:
        raise ValueError(f"code {int(idx.max())} out of range for a codebook of {k} entries")
    out = table.expand(bshape + (k,)).gather(-1, idx)
    return out.reshape(codes.shape).to(dtype)

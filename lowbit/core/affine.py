"""Affine (scale + zero point) integer quantization, including the ternary and binary special cases.

Granularity is one `block_size` tuple with the tensor's ndim: for a weight [out, in], per-tensor is
(out, in), per-channel (1, in), per-group of G along the input dim (1, G). Parameter tensors keep
every dim and have shape `blocks_shape(x.shape, block_size)`.

Codes are always unsigned, uint8, in [0, 2**bits - 1]; dequantization is (codes - zero_point) * scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pack import packed_nbytes

# Smallest scale ever produced. A block of zeros would otherwise get scale 0 and x/scale would be
# 0/0; the smallest normal float32 keeps the division defined, and (zp - zp) * eps is still exactly 0.
# Being normal (not subnormal) it also keeps x/scale accurate for blocks of tiny nonzero values.
SCALE_EPS = torch.finfo(torch.float32).tiny
# Scales stored in 16 bits are normal float16 values: subnormals would lose relative precision, so a block
# whose scale is below HALF_TINY (but not all zero) keeps its tensor's scales in float32.
HALF_TINY = torch.finfo(torch.float16).tiny


def blocks_shape(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """Shape of the parameter grid: shape[i] // block_size[i], after checking the blocks tile `shape`."""
    shape = tuple(int(s) for s in shape)
    block_size = tuple(int(b) for b in block_size)
    if len(block_size) != len(shape):
        raise ValueError(f"block_size {block_size} has {len(block_size)} dims but the tensor has shape "
                         f"{shape} ({len(shape)} dims)")
    for i, (s, b) in enumerate(zip(shape, block_size)):
        if b < 1:
            raise ValueError(f"block_size {block_size}: every block dim must be >= 1")
        if s % b:
            raise ValueError(f"dim {i} of shape {shape} (size {s}) is not divisible by block size {b}; "
                             "pad the tensor to a multiple of the block first")
    return tuple(s // b for s, b in zip(shape, block_size))


def blocked_shape(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """Interleaved shape [n0, b0, n1, b1, ...]: a free view of x in which each block is addressable."""
    grid = blocks_shape(shape, block_size)
    return tuple(d for n, b in zip(grid, block_size) for d in (n, int(b)))


def param_view(param: torch.Tensor, shape: Sequence[int], block_size: Sequence[int]) -> torch.Tensor:
    """`param` reshaped to [n0, 1, n1, 1, ...] so it broadcasts against the blocked view of x."""
    grid = blocks_shape(shape, block_size)
    n = 1
    for g in grid:
        n *= g
    if param.numel() != n:
        raise ValueError(f"parameter of shape {tuple(param.shape)} does not match the block grid {grid} "
                         f"of a tensor of shape {tuple(shape)} with block_size {tuple(block_size)}")
    return param.reshape(tuple(d for g in grid for d in (g, 1)))


def broadcast_param(param: torch.Tensor, shape: Sequence[int], block_size: Sequence[int]) -> torch.Tensor:
    """Materialize a per-block parameter at full size `shape` (each value repeated over its block)."""
    view = param_view(param, shape, block_size)
    return view.expand(blocked_shape(shape, block_size)).reshape(tuple(shape))


def _check_bits(bits: int, lo: int, hi: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"bits must be an integer in [{lo}, {hi}], got {bits!r}")


def check_input(x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Reject empty and non-finite inputs; return x detached, as float32, for the arithmetic.

    Detached because choosing parameters and rounding are not differentiable; nothing here tracks grads.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty; nothing to quantize")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                  torch.uint8)):
        raise ValueError(f"{what} has unsupported dtype {x.dtype}")
    x = x.detach().float()
    # NaN propagates into both and an inf is the min or the max: one pass without a boolean copy, ~20x
    # faster than isfinite(x).all() on a large embedding table.
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{what} contains NaN/inf; refusing to quantize")
    return x


def _block_dims(ndim: int) -> tuple[int, ...]:
    # In the [n0, b0, n1, b1, ...] view the within-block dims are the odd ones.
    return tuple(range(1, 2 * ndim, 2))


def block_reduce(x: torch.Tensor, block_size: Sequence[int], op: str) -> torch.Tensor:
    """Per-block amin/amax/mean/sum of x, shaped like the parameter grid (no input check: callers check)."""
    xb = x.reshape(blocked_shape(x.shape, block_size))
    return getattr(xb, op)(dim=_block_dims(x.dim()))


def half_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (float32, positive) rounded to the nearest float16 values, returned as float32; unchanged
    when some value has no normal float16 near it (beyond 65504, or a block of tiny nonzero values).

    Scales at SCALE_EPS (blocks of zeros: their codes sit at the zero point whatever the scale) become
    HALF_TINY, the smallest normal float16. Rounding the scale by at most 2**-11 of itself moves the grid
    by far less than its step, so round-to-nearest with the rounded scale loses nothing measurable."""
    s = torch.where(scale <= SCALE_EPS, torch.full_like(scale, HALF_TINY), scale.float())
    h = s.to(torch.float16).float()
    if not (torch.isfinite(h).all() and (h >= HALF_TINY).all()):
        return scale
    return h


def half_exact(t: torch.Tensor) -> bool:
    """Whether every value of `t` is a float16 value (so storing it as float16 loses nothing)."""
    h = t.to(torch.float16)
    return bool(torch.isfinite(h).all() and torch.equal(h.to(t.dtype), t))


def choose_qparams_affine(x: torch.Tensor, bits: int, block_size: Sequence[int],
                          symmetric: bool, half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, shape blocks_shape) for round-to-nearest with `bits` in 2..8.

    symmetric: zero_point = 2**(bits-1), scale = amax / (2**(bits-1) - 1), codes restricted to
    [1, 2**bits - 1] so the grid is symmetric around zero (int8: code - 128 in [-127, 127]).
    asymmetric: range [min(xmin, 0), max(xmax, 0)] over 2**bits - 1 steps, integer zero point so 0.0
    is exactly representable.
    All-zero blocks get scale SCALE_EPS (never 0), so they quantize to the zero point and back to 0.
    half: scales are float16 values (see half_scale), and zero points follow from the rounded scales.
    """
    _check_bits(bits, 2, 8)
    x = check_input(x)
    if symmetric:
        return symmetric_qparams(block_reduce(x.abs(), block_size, "amax"), bits, half=half)
    return affine_qparams_from_range(block_reduce(x, block_size, "amin"),
                                     block_reduce(x, block_size, "amax"), bits, half=half)


# Fractions of each group's min-max range tried for its scale: at 2-3 bits the range that rounds best is
# often narrower than the extremes (the clip search of GPTQ's reference `mse` option and of AWQ).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def choose_qparams_clipped(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                           importance: torch.Tensor | None = None, half: bool = False,
                           grid: Sequence[float] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `group_size` columns of w [N, K], the scale and zero point (as choose_qparams_affine's)
    of the range shrunk by the fraction in `grid` whose rounding error, weighted per column by `importance`
    [K] (e.g. a Hessian's diagonal; None: all equal), is least. grid (1.0,) is plain min-max."""
    w = check_input(w).float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    groups = k // group_size
    wg = w.reshape(n, groups, group_size)
    cw = torch.ones(1, groups, group_size) if importance is None else importance.float().reshape(1, groups, group_size)
    qmin, qmax = (1 if symmetric else 0), 2 ** bits - 1
    best = None
    for frac in grid:
        scale, zero = choose_qparams_affine(w * frac, bits, (1, group_size), symmetric, half=half)
        s, z = scale[..., None], zero[..., None]
        q = torch.round(wg / s + z).clamp_(qmin, qmax)
        err = (((q - z) * s - wg) ** 2 * cw).sum(-1)
        if best is None:
            best = (scale, zero, err)
            continue
        better = err < best[2]
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]),
                torch.where(better, err, best[2]))
    return best[0], best[1]


def symmetric_qparams(amax: torch.Tensor, bits: int, qmax: int | None = None,
                      half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (scale, zero_point) for per-block max|x|: scale = amax / qmax, zero_point = 2**(bits-1).

    qmax, the largest code magnitude, defaults to 2**(bits-1) - 1 (the full symmetric range); a smaller
    one restricts the grid (int8 kernels that would saturate at 127 take 63). half: see half_scale.
    """
    _check_bits(bits, 2, 8)
    full = 2 ** (bits - 1) - 1
    qmax = full if qmax is None else qmax
    if not isinstance(qmax, int) or isinstance(qmax, bool) or not 1 <= qmax <= full:
        raise ValueError(f"qmax must be an integer in [1, {full}] for {bits} bits, got {qmax!r}")
    scale = (amax.float() / qmax).clamp_min(SCALE_EPS)
    if half:
        scale = half_scale(scale)
    return scale, torch.full_like(scale, float(2 ** (bits - 1)))


def affine_qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                              half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero_point) for observed per-block minima and maxima, bits in 1..8.

    The range is widened to include 0 and the zero point rounded to an integer, so 0.0 is exact.
    half: the scale is rounded to float16 (see half_scale) before the zero point is chosen from it.
    """
    _check_bits(bits, 1, 8)
    qmax = 2 ** bits - 1
    lo = xmin.float().clamp_max(0.0)
    hi = xmax.float().clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(SCALE_EPS)
    if half:
        scale = half_scale(scale)
    zero_point = torch.round(-lo / scale).clamp_(0, qmax).abs_()  # abs_ turns -0.0 into 0.0
    return scale, zero_point


def _check_scale(scale: torch.Tensor) -> None:
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and strictly positive")


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    block_size: Sequence[int], qmin: int | None = None, qmax: int | None = None,
                    symmetric: bool = False) -> torch.Tensor:
    """uint8 codes = clamp(round(x / scale + zero_point), qmin, qmax), bits in 1..8 (symmetric:
    clamp(round(x / scale) + zero_point, ...)).

    Defaults: qmin = 0, qmax = 2**bits - 1. With symmetric=True (bits >= 2) qmin defaults to 1, the
    restricted range that matches choose_qparams_affine(..., symmetric=True). Explicit qmin/qmax win.
    """
    _check_bits(bits, 1, 8)
    x = check_input(x)
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs bits >= 2")
        default_qmin = 1  # zero_point - qmax_sym = 2**(bits-1) - (2**(bits-1) - 1): code 0 stays unused
    else:
        default_qmin = 0
    qmin = default_qmin if qmin is None else int(qmin)
    qmax = 2 ** bits - 1 if qmax is None else int(qmax)
    if not 0 <= qmin <= qmax <= 2 ** bits - 1:
        raise ValueError(f"need 0 <= qmin <= qmax <= {2 ** bits - 1}, got qmin={qmin}, qmax={qmax}")
    scale = scale.float()
    _check_scale(scale)
    s = param_view(scale, x.shape, block_size)
    z = param_view(zero_point.float(), x.shape, block_size)
    xb = x.reshape(blocked_shape(x.shape, block_size))
    # Symmetric: round x / scale before adding the zero point. Adding it first drops low bits of the
    # fraction, so x and -x could round to codes that are not mirror images.
    q = (torch.round(xb / s) + z if symmetric else torch.round(xb / s + z)).clamp_(qmin, qmax)
    return q.to(torch.uint8).reshape(x.shape)


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      block_size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero_point) * scale, computed in float32 and returned as `dtype`."""
    s = param_view(scale.float(), codes.shape, block_size)
    z = param_view(zero_point.float(), codes.shape, block_size)
    cb = codes.reshape(blocked_shape(codes.shape, block_size)).float()
    return ((cb - z) * s).reshape(codes.shape).to(dtype)


def fake_quantize_affine(x: torch.Tensor, bits: int, block_size: Sequence[int],
                         symmetric: bool) -> torch.Tensor:
    """dequantize(quantize(x)) with parameters chosen from x itself; float32, same shape as x."""
    scale, zero_point = choose_qparams_affine(x, bits, block_size, symmetric)
    codes = quantize_affine(x, scale, zero_point, bits, block_size, symmetric=symmetric)
    return dequantize_affine(codes, scale, zero_point, block_size)


def ternary_stats(x: torch.Tensor, block_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN per-block threshold delta = 0.7 * mean|x| and magnitude a = mean of |x| above delta.

    No input check (callers check): training steps use it on weights that must not raise mid-step."""
    ax = x.abs().reshape(blocked_shape(x.shape, block_size))
    dims = _block_dims(x.dim())
    delta = 0.7 * ax.mean(dim=dims, keepdim=True)
    big = ax > delta
    total = (ax * big).sum(dim=dims, keepdim=True)
    count = big.sum(dim=dims, keepdim=True)
    # Only an all-zero block has nothing above delta (max|x| >= mean|x| > 0.7 mean|x| otherwise).
    a = torch.where(count > 0, total / count.clamp_min(1), 0.0).clamp_min(SCALE_EPS)
    grid = blocks_shape(x.shape, block_size)
    return delta.reshape(grid), a.reshape(grid)


def choose_qparams_ternary(x: torch.Tensor, block_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary as affine: codes {0, 1, 2} mean {-a, 0, +a}, so scale = a and zero_point = 1.

    Use quantize_ternary to get the codes: rounding x / a + 1 would threshold at a/2, not TWN's delta.
    """
    x = check_input(x)
    _, a = ternary_stats(x, block_size)
    return a, torch.ones_like(a)


def quantize_ternary(x: torch.Tensor,
                     block_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point): |x| <= delta -> code 1 (zero), otherwise 1 + sign(x)."""
    x = check_input(x)
    delta, a = ternary_stats(x, block_size)
    xb = x.reshape(blocked_shape(x.shape, block_size))
    keep = xb.abs() > param_view(delta, x.shape, block_size)
    codes = (1 + torch.sign(xb) * keep).to(torch.uint8).reshape(x.shape)
    return codes, a, torch.ones_like(a)


def quantize_binary(x: torch.Tensor,
                    block_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XNOR-Net binarization as affine: codes {0, 1} mean {-a, +a}, a = mean|x| per block.

    scale = 2a and zero_point = 0.5, so dequantize_affine gives (q - 0.5) * 2a. x == 0 maps to +a.
    An all-zero block gets a = SCALE_EPS / 2, i.e. dequantizes to +-SCALE_EPS / 2 rather than 0.
    """
    x = check_input(x)
    a = block_reduce(x.abs(), block_size, "mean")
    scale = (2 * a).clamp_min(SCALE_EPS)
    codes = (x >= 0).to(torch.uint8)
    return codes, scale, torch.full_like(scale, 0.5)


def storage_nbytes(numel: int, bits: int, n_params: int, param_nbytes: int = 4) -> int:
    """Bytes to store `numel` packed codes plus `n_params` parameters of `param_nbytes` bytes each."""
    return packed_nbytes(numel, bits) + n_params * param_nbytes

"""Calibration observers for static activation quantization.

An observer sees many batches of activations through `update(x)` and then turns what it saw into the
affine parameters of lowbit.core.affine: float32 `scale` and `zero_point`, unsigned codes in
[0, 2**bits - 1], dequantization (codes - zero_point) * scale. Symmetric observers use
zero_point = 2**(bits-1), scale = amax / (2**(bits-1) - 1) and codes in [1, 2**bits - 1], exactly as
choose_qparams_affine does; asymmetric ones go through affine_qparams_from_range.

Granularity: axis=None gives one (scale, zero_point) pair as 0-dim tensors; axis=k gives one pair per
index of dim k, shape [C] (the channel dim of conv activations, the last dim of linear inputs).
`Observer.block_size(shape)` is the matching block_size for quantize_affine / dequantize_affine.

    minmax      running min and max: the parameters choose_qparams_affine picks on all batches at once
    ema         exponential moving average of each batch's min and max
    percentile  clip at a percentile of x (of |x| when symmetric)
    mse         the clipping range, out of a grid, with the least expected squared quantization error
    entropy     TensorRT-style KL-divergence calibration, per tensor only

percentile, mse and entropy keep a histogram of a fixed number of bins per channel (int64 counts,
bins * channels of them), so memory stays bounded however many batches they see; see _Histogram for
how it grows when a batch exceeds its range.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .affine import SCALE_EPS, affine_qparams_from_range, dequantize_affine, quantize_affine

# Bin widths are powers of two no smaller than the smallest normal float32, so x * 2**-e stays exact.
_MIN_EXP = -126
# Shifting an int64 bin index right by 62 already sends every index the histogram can hold to 0 or -1.
_MAX_SHIFT = 62
# Elements per intermediate tensor in the vectorized searches; keeps their memory near 32 MB.
_CHUNK_ELEMS = 1 << 22
# Integer activations (e.g. token ids fed through by mistake are still finite numbers) are accepted.
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_int(value: object, what: str, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")
    return value


class _Histogram:
    """Per-channel histograms with `bins` bins each; bin widths are powers of two.

    Channel c holds global bins j0[c] .. j0[c] + bins - 1 of width w = 2**e[c]; global bin j covers
    [j * w, (j + 1) * w). Width and position depend only on the running range [min(x, 0), max(x, 0)]:
    e is the smallest exponent with range <= (bins - 1) * w and j0 = floor(min(x, 0) / w).

    When a batch widens the range, the width doubles as often as needed, so each new bin is exactly
    the sum of 2**k old ones, and the window moves by whole bins: re-binning merges counts and never
    splits them. Since x * 2**-e is exact and floor(floor(x / w) / 2**k) == floor(x / (w * 2**k)), the
    counts after any sequence of batches are those of binning all the data at once at the final width:
    the order of batches cannot change them. The price is resolution: the data spans between half and
    all of the bins. The range always contains 0, as every quantization grid here does.
    """

    def __init__(self, bins: int, channels: int) -> None:
        self.bins = bins
        self.channels = channels
        self.counts = torch.zeros(channels, bins, dtype=torch.int64)
        self.exp = torch.full((channels,), _MIN_EXP, dtype=torch.int64)
        self.j0 = torch.zeros(channels, dtype=torch.int64)
        self.min = torch.full((channels,), float("inf"))
        self.max = torch.full((channels,), float("-inf"))

    @property
    def lo(self) -> torch.Tensor:
        return self.min.clamp_max(0.0)

    @property
    def hi(self) -> torch.Tensor:
        return self.max.clamp_min(0.0)

    def width(self) -> torch.Tensor:
        """Bin width per channel, float64 (exact: a power of two)."""
        return torch.pow(2.0, self.exp.double())

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.lo.double(), self.hi.double()
        span = hi - lo
        mant, ex = torch.frexp(span / (self.bins - 1))
        exp = ex.long() - (mant == 0.5).long()  # ceil(log2(.)): an exact power of two keeps its exponent
        exp = torch.where(span > 0, exp, _MIN_EXP).clamp_min(_MIN_EXP)
        # The division above may round down onto a power of two; one more doubling then restores the fit.
        w = torch.pow(2.0, exp.double())
        j0 = torch.floor(lo / w)
        exp = exp + (torch.floor(hi / w) - j0 > self.bins - 1).long()
        w = torch.pow(2.0, exp.double())
        return exp, torch.floor(lo / w).long()

    def _rebin(self, exp: torch.Tensor, j0: torch.Tensor) -> None:
        shift = (exp - self.exp).clamp_max(_MAX_SHIFT)
        old = self.j0[:, None] + torch.arange(self.bins)
        new = torch.div(old, torch.pow(2, shift)[:, None], rounding_mode="floor") - j0[:, None]
        # Only empty bins can land outside the new window (the data they would hold lies inside it).
        new.clamp_(0, self.bins - 1)
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, new, self.counts)
        self.exp, self.j0 = exp, j0

    def add(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        """Count the rows of x, shape [n, channels], float32 and finite, with per-channel min and max."""
        self.min = torch.minimum(self.min, bmin)
        self.max = torch.maximum(self.max, bmax)
        exp, j0 = self._layout()
        if not (torch.equal(exp, self.exp) and torch.equal(j0, self.j0)):
            self._rebin(exp, j0)
        inv = torch.pow(2.0, -self.exp.double()).float()  # 2**-e is a normal float32 for e in [-126, 119]
        # floor(x / w) is an integer in [j0, j0 + bins), below 2**24 in magnitude, so float32 holds it and
        # the sums below exactly; the int64 path takes over when the flat index could pass 2**24.
        flat = torch.mul(x, inv).floor_()
        offset = torch.arange(self.channels) * self.bins - self.j0
        if self.channels * self.bins <= 1 << 24:
            local = flat.add_(offset.float()).long()
        else:
            local = flat.long().add_(offset)
        self.counts += torch.bincount(local.view(-1), minlength=self.channels * self.bins).view(
            self.channels, self.bins)

    def quantile(self, q: float) -> torch.Tensor:
        """Per-channel q-quantile, 0 <= q <= 1, counts spread uniformly inside each bin; float32 [C]."""
        counts = self.counts.double()
        cum = counts.cumsum(1)
        target = q * cum[:, -1:]
        k = torch.searchsorted(cum, target).clamp_max(self.bins - 1)
        inside = counts.gather(1, k)
        frac = ((target - (cum.gather(1, k) - inside)) / inside.clamp_min(1)).clamp(0, 1)
        value = ((self.j0[:, None] + k).double() + frac).squeeze(1) * self.width()
        return torch.clamp(value.float(), self.min, self.max)


def _expected_sq_error(hist: _Histogram, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                       qmax: int) -> torch.Tensor:
    """Sum over the histogram of the squared error of quantizing with (scale, zero_point), clipping
    included; scale and zero_point have shape [K, C] (K candidates). Returns float64 [K, C].

    Each bin's count is taken as spread uniformly over the bin, so the estimate stays exact for that
    density even when a bin is as wide as a quantization step. Code k, of value c_k, takes the x between
    its rounding boundaries b_{k-1} and b_k (the end codes also take everything beyond). Summing
    (x - c_k)**2 over codes by parts, with c_{k+1} - c_k = s and b_k = (c_k + c_{k+1}) / 2, gives
        sum over all x of (x - c_top)**2  -  2 s * sum over boundaries b of G(b),
    where G(b) = sum over x < b of (b - x). So the cost is one G per code, not one term per bin.
    """
    counts = hist.counts.double()
    bins, channels = hist.bins, hist.channels
    w = hist.width()[:, None]
    e = (hist.j0[:, None] + torch.arange(bins)).double() * w
    zero = torch.zeros(channels, 1, dtype=torch.float64)
    # Count, first and second moment below each bin edge, [C, bins + 1].
    m0, m1 = (torch.cat([zero, m.cumsum(1)], 1) for m in (counts, counts * (e + w / 2)))
    n, s1 = m0[:, -1], m1[:, -1]
    s2 = (counts * (e * e + e * w + w * w / 3)).sum(1)
    w3, j0 = w[None], hist.j0[None, :, None]
    row_m, row_c = (torch.arange(channels)[None, :, None] * k for k in (bins + 1, bins))
    bounds = torch.arange(qmin, qmax, dtype=torch.float64) + 0.5  # between code k and k + 1
    out = torch.empty(scale.shape, dtype=torch.float64)
    step = max(1, (_CHUNK_ELEMS // 4) // (channels * max(1, qmax - qmin)))
    for k0 in range(0, scale.shape[0], step):
        s = scale[k0:k0 + step].double()
        z = zero_point[k0:k0 + step].double()
        top = (qmax - z) * s
        total = s2 - 2 * top * s1 + top * top * n
        b = (bounds - z[..., None]) * s[..., None]  # [k, C, Q] boundaries in x
        j = (torch.floor(b / w3) - j0).clamp_(0, bins - 1).long()
        lo = (j0 + j).double() * w3
        t = (b - lo).clamp_(min=0).minimum(w3)  # the part of bin j below b
        within = counts.view(-1).take(row_c + j) / w3 * t * (b - lo - t / 2)
        g = b * m0.view(-1).take(row_m + j) - m1.view(-1).take(row_m + j) + within
        out[k0:k0 + step] = total - 2 * s * g.sum(-1)
    return out


class Observer:
    """Base class: accumulate activation statistics with update(), then read qparams().

    Subclasses implement _observe(x, bmin, bmax), given the validated float32 batch and its per-channel
    min and max ([C], C = 1 per tensor; _rows(x) views x as [n, C]), and _range(), the chosen (lo, hi)
    per channel, [C]; symmetric observers return (-amax, amax).
    """

    name: ClassVar[str] = ""

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None) -> None:
        # Symmetric needs a positive qmax = 2**(bits-1) - 1.
        self.bits = _check_int(bits, "bits", 2 if symmetric else 1, 8)
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise TypeError(f"axis must be None (per tensor) or an int (per channel), got {axis!r}")
        self.symmetric = bool(symmetric)
        self.axis = axis
        self.channels: int | None = None
        # (lo, hi, scale, zero_point) until the next update; the histogram searches are not free.
        self._cache: tuple[torch.Tensor, ...] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, symmetric={self.symmetric}, axis={self.axis})"

    @property
    def calibrated(self) -> bool:
        """True once update() has accepted at least one batch."""
        return self.channels is not None

    def update(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one batch; any shape. Empty or non-finite input raises ValueError."""
        what = f"{type(self).__name__} input"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(f"{what} is empty; there is nothing to observe")
        if not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise ValueError(f"{what} has unsupported dtype {x.dtype}")
        x = x.detach().float()
        if self.axis is None:
            c = 1
            bmin, bmax = x.amin().reshape(1), x.amax().reshape(1)
        else:
            if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                raise ValueError(f"axis {self.axis} is out of range for an input of shape {tuple(x.shape)}")
            ax = self.axis % x.dim()
            c = x.shape[ax]
            dims = tuple(d for d in range(x.dim()) if d != ax)
            # A 1-D input along its only dim has one value per channel: nothing to reduce.
            bmin, bmax = (x.amin(dim=dims), x.amax(dim=dims)) if dims else (x, x)
        # amin/amax propagate NaN and an inf is a min or a max, so checking them covers every element
        # without another pass over x.
        if not bool(torch.isfinite(bmin).all() and torch.isfinite(bmax).all()):
            raise ValueError(f"{what} contains NaN/inf; refusing to calibrate on it")
        if self.channels is not None and c != self.channels:
            raise ValueError(f"{type(self).__name__} was calibrated with {self.channels} channels along "
                             f"axis {self.axis}, got a batch of shape {tuple(x.shape)} with {c}")
        self._observe(x, bmin, bmax)
        self.channels = c
        self._cache = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [n, C]: a free view when the channels are the last dim (or per tensor)."""
        if self.axis is None:
            return x.reshape(-1, 1)
        ax = self.axis % x.dim()
        return x.movedim(ax, -1).reshape(-1, x.shape[ax])

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        """Accumulate a validated float32 batch x with its per-channel min and max, shape [C]."""
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _require_data(self) -> None:
        if not self.calibrated:
            raise ValueError(f"{type(self).__name__} has seen no data; calibration data is empty")

    def _computed(self) -> tuple[torch.Tensor, ...]:
        self._require_data()
        if self._cache is None:
            lo, hi = self._range()
            if self.symmetric:
                amax = torch.maximum(-lo, hi).clamp_min(0.0)
                scale = (amax / (2 ** (self.bits - 1) - 1)).clamp_min(SCALE_EPS)
                zero_point = torch.full_like(scale, float(2 ** (self.bits - 1)))
            else:
                scale, zero_point = affine_qparams_from_range(lo, hi, self.bits)
            shape = () if self.axis is None else (self.channels,)
            self._cache = tuple(t.float().reshape(shape) for t in (lo, hi, scale, zero_point))
        return tuple(t.clone() for t in self._cache)  # callers may modify what they get

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) range the parameters cover, before widening to include 0; float32, shaped
        like the parameters. Symmetric observers give (-amax, amax)."""
        lo, hi, _, _ = self._computed()
        return lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point), float32, shape () per tensor or [C] per channel."""
        _, _, scale, zero_point = self._computed()
        return scale, zero_point

    def block_size(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """block_size for quantize_affine on a tensor of `shape` with these parameters."""
        shape = tuple(int(s) for s in shape)
        if self.axis is None:
            return shape
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"axis {self.axis} is out of range for shape {shape}")
        ax = self.axis % len(shape)
        return tuple(1 if i == ax else s for i, s in enumerate(shape))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of x with the calibrated parameters (values outside the range clamp)."""
        scale, zero_point = self.qparams()
        return quantize_affine(x, scale, zero_point, self.bits, self.block_size(x.shape),
                               symmetric=self.symmetric)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(x)) with the calibrated parameters; float32."""
        scale, zero_point = self.qparams()
        block = self.block_size(x.shape)
        codes = quantize_affine(x, scale, zero_point, self.bits, block, symmetric=self.symmetric)
        return dequantize_affine(codes, scale, zero_point, block)


class MinMaxObserver(Observer):
    """Running minimum and maximum over every batch: nothing is clipped."""

    name = "minmax"

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None) -> None:
        super().__init__(bits, symmetric, axis)
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        if self._min is None or self._max is None:
            self._min, self._max = bmin.clone(), bmax.clone()
        else:
            self._min = torch.minimum(self._min, bmin)
            self._max = torch.maximum(self._max, bmax)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._min is not None and self._max is not None
        return self._min, self._max


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max.

    The first batch sets the range; each later one moves it by `momentum` of the way to the batch's own
    range: r <- r + momentum * (r_batch - r). A rare wide batch thus widens the range only partly.
    """

    name = "ema"

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 momentum: float = 0.1) -> None:
        super().__init__(bits, symmetric, axis)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        if self._min is None or self._max is None:
            self._min, self._max = bmin.clone(), bmax.clone()
        else:
            self._min = self._min + self.momentum * (bmin - self._min)
            self._max = self._max + self.momentum * (bmax - self._max)


class _HistogramObserver(Observer):
    """Keeps a _Histogram of x, or of |x| when symmetric (the symmetric grid treats x and -x alike)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 bins: int = 2048) -> None:
        super().__init__(bits, symmetric, axis)
        self.bins = _check_int(bins, "bins", 2)
        self._hist: _Histogram | None = None

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        rows = self._rows(x)
        if self.symmetric:
            # min |x| is 0 unless a channel keeps one sign; max |x| comes from either end.
            amin = torch.where(bmin > 0, bmin, torch.where(bmax < 0, -bmax, 0.0))
            rows, bmin, bmax = rows.abs(), amin, torch.maximum(-bmin, bmax)
        if self._hist is None:
            self._hist = _Histogram(self.bins, rows.shape[1])
        self._hist.add(rows, bmin, bmax)

    @property
    def histogram(self) -> _Histogram:
        self._require_data()
        assert self._hist is not None
        return self._hist


class PercentileObserver(_HistogramObserver):
    """Clip at the `percentile`-th percentile: of x for the top and 100 - percentile for the bottom,
    or of |x| when symmetric.

    Percentiles are read off the bounded histogram, interpolating linearly inside a bin, and never
    fall outside the observed [min, max]; percentile=100 gives exactly the min-max range.
    """

    name = "percentile"

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bits, symmetric, axis, bins)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        q = self.percentile / 100.0
        if self.symmetric:
            amax = hist.quantile(q)
            return -amax, amax
        return hist.quantile(1.0 - q), hist.quantile(q)


class MSEObserver(_HistogramObserver):
    """Clipping range with the least expected squared quantization error over the histogram.

    Candidates shrink the observed range linearly: [lo * t, hi * t] (or amax * t when symmetric) for
    t = 1, 1 - 1/grid, ..., 1/grid, each turned into (scale, zero_point) by the same rule qparams()
    uses. Each candidate's error is integrated exactly over the bins, clipping error included, and
    ties go to the wider range.
    """

    name = "mse"

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 grid: int = 100, bins: int = 2048) -> None:
        super().__init__(bits, symmetric, axis, bins)
        self.grid = _check_int(grid, "grid", 1)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        t = 1.0 - torch.arange(self.grid, dtype=torch.float32)[:, None] / self.grid  # [K, 1]
        if self.symmetric:
            # |x| only ever meets the codes from the zero point up.
            qmin, qmax = 2 ** (self.bits - 1), 2 ** self.bits - 1
            amax = hist.hi * t
            scale = (amax / (2 ** (self.bits - 1) - 1)).clamp_min(SCALE_EPS)
            zero_point = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            qmin, qmax = 0, 2 ** self.bits - 1
            lo, hi = hist.lo * t, hist.hi * t
            scale, zero_point = affine_qparams_from_range(lo, hi, self.bits)
        best = _expected_sq_error(hist, scale, zero_point, qmin, qmax).argmin(0)  # first = widest on ties
        tb = t[best, 0]
        if self.symmetric:
            return -hist.hi * tb, hist.hi * tb
        return hist.lo * tb, hist.hi * tb


class EntropyObserver(_HistogramObserver):
    """TensorRT-style calibration: the clipping threshold minimizing KL(P || Q), per tensor only.

    Symmetric: the 2048-bin histogram is of |x|. For each threshold i (in bins, from the number of
    levels up to the last occupied bin), P is the histogram up to i with everything beyond folded into
    its last bin, and Q is the same bins merged into 2**(bits-1) equal chunks (128 at 8 bits, as in
    TensorRT), each chunk's count spread evenly over its nonempty bins. The threshold with the least
    KL divergence wins; ties go to the larger one.

    Asymmetric: the histogram is of x itself and candidates are windows around 0 that keep the
    negative and positive extents in their observed proportion; P folds both tails into the end bins
    and Q merges the window into 2**bits chunks, one per code.

    The shortest window has one bin per level: 128 bins at 8 bits symmetric, where TensorRT starts too,
    and only 8 at 4 bits, so low bit widths can clip as far as they need to. The histogram's range is a
    power-of-two multiple of the bin count (see _Histogram), so the data fills 1024 to 2048 of the bins.
    A window that folds a tail onto an empty bin has infinite divergence, so thresholds inside a gap in
    the data (say between the bulk and a few far outliers) are never chosen.
    """

    name = "entropy"

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 bins: int = 2048) -> None:
        if axis is not None:
            raise ValueError("EntropyObserver calibrates per tensor only; use axis=None "
                             "(per-channel observers: minmax, ema, percentile, mse)")
        super().__init__(bits, symmetric, axis, bins)
        self._zeros = 0

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        # Exact zeros (every ReLU output below 0) are exact on any grid, whatever the range: counted in
        # the histogram they form a spike that makes every window wider than one bin per level look
        # costly, and the search then clips far too much (seen: MNIST CNN 99.25% -> 29%).
        self._zeros += int((x == 0).sum())
        super()._observe(x, bmin, bmax)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        w = float(hist.width()[0])
        j0 = int(hist.j0[0])
        lo_v, hi_v = float(hist.lo[0]), float(hist.hi[0])
        zero = -j0  # local index of the bin [0, w)
        end = min(int(hi_v // w) - j0 + 1, self.bins)  # bins [0, end) hold all data
        levels = 2 ** (self.bits - 1) if self.symmetric else 2 ** self.bits
        lengths = torch.arange(min(levels, end), end + 1)
        left = (2 * lengths * zero + end) // (2 * end)  # round(length * zero / end): keep the proportion
        starts = zero - left
        if len(lengths) > 1:
            counts = hist.counts[0, :end].double()
            counts[zero] -= self._zeros  # bin [0, w) holds the exact zeros (see _observe)
            kl = _window_kl(counts, starts, lengths, levels)
            best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))
        else:
            best = 0
        s, n = int(starts[best]), int(lengths[best])
        lo = max((j0 + s) * w, lo_v)
        hi = min((j0 + s + n) * w, hi_v)
        if self.symmetric:
            return torch.tensor([-hi]), torch.tensor([hi])
        return torch.tensor([lo]), torch.tensor([hi])


def _window_kl(h: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of each window [start, start + length) of histogram h (float64), length >= levels >= 2.

    P: h with the mass below the window added to its first bin and the mass above to its last.
    Q: the window's bins split into `levels` chunks, bin j to chunk floor((j - start) * levels / length),
    each chunk's sum shared evenly by its nonempty bins (empty bins get 0).
    With prefix sums this costs O(levels) per window rather than O(bins): sum p log p is the prefix sum of
    h log h corrected at the two end bins, and sum p log q is sum over chunks of
    chunk_sum * log(chunk_sum / nonempty) plus the folded tails times log q of their end bins.
    """
    zero = torch.zeros(1, dtype=torch.float64)
    cum_h = torch.cat([zero, h.cumsum(0)])
    cum_nz = torch.cat([zero, (h > 0).double().cumsum(0)])
    cum_hlogh = torch.cat([zero, torch.xlogy(h, h).cumsum(0)])
    total = cum_h[-1]
    chunk = torch.arange(levels + 1)
    out = torch.empty(len(starts), dtype=torch.float64)
    step = max(1, _CHUNK_ELEMS // (8 * (levels + 1)))
    for c0 in range(0, len(starts), step):
        s, n = starts[c0:c0 + step], lengths[c0:c0 + step]
        last = s + n - 1
        # Chunk c holds bins s + ceil(c * n / levels) .. s + ceil((c + 1) * n / levels) - 1.
        edges = s[:, None] + (chunk * n[:, None] + levels - 1) // levels
        sums = cum_h[edges].diff(dim=1)
        nonempty = cum_nz[edges].diff(dim=1).clamp_min(1)
        q_bin = sums / nonempty  # the unnormalized Q of every nonempty bin in the chunk
        below, above = cum_h[s], total - cum_h[s + n]
        h_first, h_last = h[s], h[last]
        q_first = torch.where(h_first > 0, q_bin[:, 0], 0.0)
        q_last = torch.where(h_last > 0, q_bin[:, -1], 0.0)
        p_first, p_last = h_first + below, h_last + above
        plogp = (cum_hlogh[s + n] - cum_hlogh[s] - torch.xlogy(h_first, h_first) - torch.xlogy(h_last, h_last)
                 + torch.xlogy(p_first, p_first) + torch.xlogy(p_last, p_last))
        plogq = torch.xlogy(sums, q_bin).sum(1) + torch.xlogy(below, q_first) + torch.xlogy(above, q_last)
        kl = (plogp - plogq) / total + torch.log((cum_h[s + n] - cum_h[s]) / total)
        # A folded tail on an empty end bin is mass Q cannot represent: infinite divergence (inf or, when
        # the whole window is empty, inf - inf).
        out[c0:c0 + step] = torch.where(kl.isnan(), float("inf"), kl)
    return out


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **kwargs: object) -> Observer:
    """An observer by its OBSERVERS name, e.g. make_observer("percentile", bits=8, percentile=99.9)."""
    try:
        cls = OBSERVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown observer {name!r}; valid names: {', '.join(OBSERVERS)}") from None
    return cls(**kwargs)  # type: ignore[arg-type]

"""Weight formats: one scheme per family, asked the same questions by every layer, kernel and QAT path.

A scheme turns a float weight [N, ...] (N outputs; the other dims flattened into K inputs per output)
into the canonical tensors a checkpoint stores, and back; gives the codes, scales and zero points the
kernels take; fake-quantizes for training; and counts its storage. Families, registered by recipe kind
in SCHEMES (a new format is one class and one entry there):

    int      AffineScheme     B = 2..8 bits, symmetric or not, round to nearest (or GPTQ / HQQ)
    ternary  TernaryScheme    {-a, 0, +a} per block (TWN threshold)
    binary   BinaryScheme     {-a, +a} per block (XNOR-Net)
    kmeans   CodebookScheme   2**B-entry k-means codebook per block
    float    FloatScheme      fp16 / bf16 casts, fp8 with a float32 scale per block

Granularity is one block size over the 2-D view [N, K], as in lowbit.core: (1, G) is per group of G
inputs, (1, None) per output channel, (None, None) per tensor, None meaning the whole dim.

Integer formats have two storage layouts, each exactly as checkpoints have always held it:
  weight-only (signed=False): qweight = the unsigned codes of [N, Kp] packed at B bits, K zero-padded
      to a multiple of the group; scale and zero_point on the block grid [N / rows, Kp / G];
      W = (codes - zero_point) * scale. Integer formats choose float16 values for them and store them
      as float16 (a tensor with a value float16 cannot hold, and the float32 option, stays float32);
      ternary and binary store float32. Either dtype loads: decoding computes in float32.
  int8 kernels (signed=True, the W8A8 layers): codes c in [-qmax, qmax], W = c * scale; qweight = c as
      int8 in the weight's shape for 8 bits, else the unsigned codes packed at their width; scale
      float32 [N] per channel or [N, K / G] per group; no zero point, and no padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import core
from .algorithms.gptq import gptq_quantize
from .algorithms.hqq import hqq_quantize
from .backends import LayerSpec
from .core import SCALE_EPS
from .recipes import QuantConfig

Block = tuple[int | None, int | None]
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """A weight of `shape` in its 2-D view: n outputs of k inputs, padded to kp; the block (rows, cols)."""

    shape: tuple[int, ...]
    n: int
    k: int
    kp: int
    block: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        """Shape of the per-block parameters."""
        return self.n // self.block[0], self.kp // self.block[1]

    @property
    def blocks(self) -> int:
        g = self.grid
        return g[0] * g[1]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # round(x) - x is exact in float (|round(x) - x| <= 0.5 and both within a factor 2, or x near 0), so
    # the forward value is exactly round(x): fake quantization equals the encoder's rounding bit for bit.
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass (exactly); its gradient multiplied by g in the backward pass."""
    y = x * g
    return x.detach() + (y - y.detach())


def _straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass (exactly: x - x is 0), gradient 1 to x and value's own to the rest."""
    return (x - x.detach()) + value


def _tensor(state: State, name: str, what: str) -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        have = ", ".join(state) or "none"
        raise ValueError(f"the {what} weight has no {name!r} tensor (have: {have})") from None


class Scheme:
    """One weight format. Subclasses are frozen dataclasses; instances are compared and hashed by value.

    shape arguments are always the float weight's shape ([N, K] for a linear, [N, C, kh, kw] for a conv).
    """

    kind: ClassVar[str] = ""
    # The kernels that can run it: "affine" (weight-only integer kernels, through kernel_spec and
    # affine_codes), "int8" (int8 x uint8 kernels, through int8_codes), "float" (a float matmul on the
    # cast weight), "codebook" (table-lookup kernels, through codebook_form) or "dequant" (decode, then a
    # float matmul).
    runs_on: ClassVar[str] = "dequant"
    learns_scale: ClassVar[bool] = False  # fake_quantize / encode take a (learned) scale
    block: Block = (1, None)
    bits: int

    # ---- geometry

    @property
    def pads(self) -> bool:
        """Whether K is zero-padded to a multiple of the group (else a group must divide K)."""
        return False

    @property
    def name(self) -> str:
        return self.kind

    def layout(self, shape: Sequence[int]) -> Layout:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"expected a weight of 2 or more dims [outputs, inputs, ...], got shape {shape}")
        n, k = shape[0], math.prod(shape[1:])
        if n == 0 or k == 0:
            raise ValueError(f"weight of shape {shape} is empty; nothing to quantize")
        rows = n if self.block[0] is None else int(self.block[0])
        cols = k if self.block[1] is None else int(self.block[1])
        if rows < 1 or cols < 1:
            raise ValueError(f"block {self.block}: every block dim must be >= 1")
        if n % rows:
            raise ValueError(f"blocks of {rows} rows do not divide the layer's {n} outputs")
        if k % cols and not self.pads:
            raise ValueError(f"group size {cols} does not divide the layer's {k} inputs per output")
        return Layout(shape, n, k, -(-k // cols) * cols, (rows, cols))

    @staticmethod
    def _view(w: torch.Tensor, lay: Layout) -> torch.Tensor:
        """[n, kp]: the weight flattened per output, zero columns appended (the activations are zero-padded
        too, so they add nothing)."""
        x = w.reshape(lay.n, lay.k)
        return F.pad(x, (0, lay.kp - lay.k)) if lay.kp != lay.k else x

    @staticmethod
    def _unview(x: torch.Tensor, lay: Layout) -> torch.Tensor:
        return (x[:, :lay.k] if lay.kp != lay.k else x).reshape(lay.shape)

    # ---- what every format answers

    def encode(self, w: torch.Tensor, *, scale: torch.Tensor | None = None,
               zero_point: torch.Tensor | None = None,
               hessian: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Float weight -> the canonical tensors the checkpoint stores.

        scale / zero_point (one value per block, any shape with that many values) replace the ones the
        format would choose, in the convention of init_scale (QAT's learned scales). hessian (X^T X of the
        layer's inputs, [K, K]) is what error-correcting methods (gptq) work from."""
        raise NotImplementedError

    def decode(self, state: State, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Canonical tensors -> the float weight of `shape` (the reference, not a kernel)."""
        raise NotImplementedError

    def row_codes(self, state: State, shape: Sequence[int]) -> torch.Tensor | None:
        """What a caller may keep to make decode_rows cheap: the unpacked codes, None for formats without."""
        return None

    def decode_rows(self, state: State, shape: Sequence[int], rows: torch.Tensor,
                    codes: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `rows` (indices of any shape) of the weight's [N, K] view, decoded: [*rows.shape, K], the same
        values as decode's without decoding the other rows (an embedding lookup). codes: row_codes(state,
        shape), when the caller keeps it."""
        lay = self.layout(shape)
        return self.decode(state, shape, dtype).reshape(lay.n, lay.k)[rows]

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """decode(encode(w)) in the forward pass (round to nearest; bit-identical), with straight-through
        gradients to w: rounding passes the gradient unchanged, clamping stops it outside the range.
        `scale` is a learned scale parameter (LSQ: its gradient is scaled by 1/sqrt(values per scale * qmax),
        Esser et al. 2019); its magnitude is used. Integer formats make no finiteness check here (a diverging
        training step shows in the loss, and encode checks); float and codebook formats encode, which does."""
        return _straight_through(w, self.decode(self.encode(w.detach()), w.shape, torch.float32).to(w.dtype))

    def init_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The scale round-to-nearest picks for w (block grid): a learned scale's initial value."""
        raise ValueError(f"{self.name} weights have no scale to learn")

    @staticmethod
    def learned_scale(param: torch.Tensor) -> torch.Tensor:
        """The scale a learned parameter stands for: its magnitude, at least SCALE_EPS (training may push it
        through zero). What fake_quantize computes with, and what encode(scale=) takes."""
        return param.detach().float().abs().clamp_min(SCALE_EPS)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the canonical tensors (what storage counts)."""
        raise NotImplementedError

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes encode() stores for a weight of `shape`: codes, scales, zero points, codebooks."""
        raise NotImplementedError

    def bits_per_weight(self, shape: Sequence[int], state: State | None = None) -> float:
        """Storage per weight in bits, everything counted: from `state` when given, else from nbytes."""
        lay = self.layout(shape)
        if state is None:
            total = self.nbytes(shape)
        else:
            total = sum(state[n].numel() * state[n].element_size() for n in self.state_names if n in state)
        return 8.0 * total / (lay.n * lay.k)

    def kernel_spec(self, shape: Sequence[int]) -> LayerSpec | None:
        """The weight-only kernels' description of this weight (what select_kernel chooses by); None for the
        int8 layout, whose layers describe themselves with their activations."""
        raise NotImplementedError

    def codes(self, state: State, shape: Sequence[int]) -> torch.Tensor:
        """The unpacked codes, uint8 [N, Kp]."""
        raise ValueError(f"{self.name} weights have no integer codes")

    def affine_codes(self, state: State,
                     shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the weight-only kernels take: unsigned codes uint8 [N, Kp], scale and zero point float32
        [N, Kp / G] with W = (codes - zero) * scale (float16 values when stored as float16)."""
        raise ValueError(f"{self.name} weights have no affine integer form")

    def int8_codes(self, state: State, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the int8 kernels take: codes int8 (the weight's shape in the int8 layout, [N, Kp] in the
        weight-only one) and scale float32 ([N] per channel, else [N, K / G]), W = codes * scale."""
        raise ValueError(f"{self.name} weights have no symmetric int8 form")

    @classmethod
    def from_config(cls, config: QuantConfig, *, signed: bool = False, qmax: int | None = None) -> Scheme:
        raise NotImplementedError


class _Coded(Scheme):
    """Integer codes with a scale (and zero point) per block: the affine, ternary and binary families.

    Internally every one is affine, (u - zero) * scale with unsigned codes u; in the int8 layout the
    codes are c = (u - zero) * mult and the scale scale / mult (mult 2 for binary, whose zero is 1/2)."""

    learns_scale: ClassVar[bool] = True
    mult: ClassVar[int] = 1
    signed: bool
    symmetric: bool

    @property
    def pads(self) -> bool:
        return not self.signed

    @property
    def zero(self) -> float | None:
        """The zero point of a symmetric format (a constant); None when it is chosen per block."""
        raise NotImplementedError

    @property
    def int8_qmax(self) -> int:
        """Largest |code| in the int8 form."""
        raise NotImplementedError

    @property
    def half(self) -> bool:
        """Whether scales and zero points are chosen as float16 values and stored as float16."""
        return False

    def _round_scale(self, s: torch.Tensor) -> torch.Tensor:
        """A scale (own or given) as this format stores it: float16 values when `half` (see core.half_scale)."""
        return core.half_scale(s) if self.half else s

    def _check_signed(self) -> None:
        if self.signed and self.zero is None:
            raise ValueError("the int8 layout takes symmetric formats (its codes have no zero point)")

    # Subclasses: choose codes from x [n, kp] float32, finite (encode) and give its scale in init_scale's
    # convention (fake_quantize computes the same values with straight-through gradients).
    def _own_scale(self, x: torch.Tensor, lay: Layout) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, x: torch.Tensor, lay: Layout, scale: torch.Tensor | None, zero: torch.Tensor | None,
                hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unsigned codes uint8 [n, kp], scale, zero point on the grid), W = (u - zero) * scale."""
        raise NotImplementedError

    def _fake(self, x: torch.Tensor, lay: Layout, scale: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _lsq_factor(self, lay: Layout) -> float:
        return 1.0 / math.sqrt(lay.block[0] * lay.block[1])

    def _step(self, x: torch.Tensor, lay: Layout, scale: torch.Tensor | None) -> torch.Tensor:
        """The scale fake_quantize computes with, on the grid: own (no gradient) or learned (LSQ)."""
        if scale is None:
            return self._own_scale(x.detach().float(), lay)
        if scale.numel() != lay.blocks:
            raise ValueError(f"learned scale has {scale.numel()} values; the block grid {lay.grid} needs "
                             f"{lay.blocks}")
        s = _grad_scale(scale.reshape(lay.grid), self._lsq_factor(lay)).abs().clamp_min(SCALE_EPS)
        # The value encode stores (rounded to float16 when `half`), the gradient straight through.
        return _straight_through(s, self._round_scale(s.detach())) if self.half else s

    @staticmethod
    def _given(t: torch.Tensor, lay: Layout, what: str, positive: bool) -> torch.Tensor:
        t = t.detach().float()
        if t.numel() != lay.blocks:
            raise ValueError(f"given {what} has {t.numel()} values; the block grid {lay.grid} needs "
                             f"{lay.blocks}")
        if not torch.isfinite(t).all() or (positive and not (t > 0).all()):
            raise ValueError(f"given {what} must be finite{' and positive' if positive else ''}")
        return t.reshape(lay.grid)

    def encode(self, w, *, scale=None, zero_point=None, hessian=None):
        lay = self.layout(w.shape)
        x = self._view(core.check_input(w, "weight"), lay)
        if hessian is not None and lay.kp != lay.k:
            hessian = F.pad(hessian, (0, lay.kp - lay.k, 0, lay.kp - lay.k))
        if scale is not None:
            scale = self._given(scale, lay, "scale", True)
        if zero_point is not None:
            if self.zero is not None:
                raise ValueError(f"{self.name} is symmetric: its zero point is fixed, not given")
            zero_point = self._given(zero_point, lay, "zero point", False)
        u, s, z = self._encode(x, lay, scale, zero_point, hessian)
        if not self.signed:
            s, z = s.float(), z.float()
            if self.half:  # each as float16 when it loses nothing (it nearly always does not)
                s, z = (t.to(torch.float16) if core.half_exact(t) else t for t in (s, z))
            return {"qweight": core.pack_bits(u, self.bits), "scale": s, "zero_point": z}
        s = s.float() / self.mult
        if self.block == (1, None):  # per channel: one scale per output, [N], as the int8 kernels take it
            s = s[:, 0]
        q = self._signed_codes(u).reshape(lay.shape) if self.bits == 8 else core.pack_bits(u, self.bits)
        return {"qweight": q, "scale": s.contiguous()}

    def _signed_codes(self, u: torch.Tensor) -> torch.Tensor:
        c = u.to(torch.int16) * self.mult - int(self.zero * self.mult)
        return c.to(torch.int8)

    def _unpacked(self, state: State, lay: Layout) -> torch.Tensor:
        q = _tensor(state, "qweight", self.name)
        if self.signed and self.bits == 8:
            if q.dtype != torch.int8:
                raise ValueError(f"8-bit codes of the int8 layout are int8, got {q.dtype}")
            return (q.reshape(lay.n, lay.kp).to(torch.int16) + int(self.zero)).to(torch.uint8)
        return core.unpack_bits(q, self.bits, lay.n * lay.kp).reshape(lay.n, lay.kp)

    def _params(self, state: State, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        s = _tensor(state, "scale", self.name)
        if not self.signed:
            return s.float(), _tensor(state, "zero_point", self.name).float()
        s = s.float().reshape(lay.grid) * self.mult
        return s, torch.full_like(s, float(self.zero))

    def codes(self, state, shape):
        return self._unpacked(state, self.layout(shape))

    def affine_codes(self, state, shape):
        lay = self.layout(shape)
        s, z = self._params(state, lay)
        if lay.block[0] > 1:  # the kernels take one scale per row and group
            s, z = (t.reshape(lay.grid).repeat_interleave(lay.block[0], 0) for t in (s, z))
        return self._unpacked(state, lay), s, z

    def int8_codes(self, state, shape):
        lay = self.layout(shape)
        if self.zero is None:
            raise ValueError(f"{self.name} has zero points per block: no symmetric int8 form")
        if self.signed:
            q = _tensor(state, "qweight", self.name)
            codes = q if self.bits == 8 else self._signed_codes(self._unpacked(state, lay)).reshape(lay.shape)
            return codes, _tensor(state, "scale", self.name)
        s = _tensor(state, "scale", self.name).float().reshape(lay.grid) / self.mult
        return self._signed_codes(self._unpacked(state, lay)), (s[:, 0] if self.block == (1, None) else s)

    def decode(self, state, shape, dtype=torch.float32):
        lay = self.layout(shape)
        s, z = self._params(state, lay)
        w = core.dequantize_affine(self._unpacked(state, lay), s, z, lay.block)
        return self._unview(w, lay).to(dtype)

    def row_codes(self, state, shape):
        return self.codes(state, shape)

    def decode_rows(self, state, shape, rows, codes=None, dtype=torch.float32):
        lay = self.layout(shape)
        s, z = self._params(state, lay)
        c = (self.codes(state, shape) if codes is None else codes)[rows].float()  # [..., Kp]
        at = rows if lay.block[0] == 1 else rows // lay.block[0]
        g = lay.block[1]
        cb = c.reshape(*c.shape[:-1], lay.kp // g, g)
        out = ((cb - z[at].unsqueeze(-1)) * s[at].unsqueeze(-1)).reshape(c.shape)
        return out[..., :lay.k].to(dtype)

    def fake_quantize(self, w, scale=None):
        lay = self.layout(w.shape)
        out = self._fake(self._view(w.float(), lay), lay, scale)
        return self._unview(out, lay).to(w.dtype)

    def init_scale(self, w):
        lay = self.layout(w.shape)
        return self._own_scale(self._view(core.check_input(w, "weight"), lay), lay)

    @property
    def state_names(self):
        return ("qweight", "scale") if self.signed else ("qweight", "scale", "zero_point")

    def nbytes(self, shape):
        lay = self.layout(shape)
        if self.signed:
            codes = lay.n * lay.k if self.bits == 8 else core.packed_nbytes(lay.n * lay.k, self.bits)
            return codes + 4 * lay.blocks
        # A scale and a zero point per block, 2 bytes each when `half` (a tensor whose values float16
        # cannot hold stays float32: bits_per_weight(state=) counts what is stored).
        return core.packed_nbytes(lay.n * lay.kp, self.bits) + (4 if self.half else 8) * lay.blocks

    def kernel_spec(self, shape):
        if self.signed:
            return None
        lay = self.layout(shape)
        return LayerSpec(n=lay.n, k=lay.kp, bits=self.bits, group_size=lay.block[1], symmetric=self.symmetric)

    @property
    def runs_on(self) -> str:  # type: ignore[override]
        return "int8" if self.signed else "affine"


@dataclass(frozen=True)
class AffineScheme(_Coded):
    """B-bit integers. Symmetric: zero point 2**(B-1), scale max|w| / qmax, codes within +-qmax of it
    (qmax = 2**(B-1) - 1 unless restricted). Asymmetric: the block's [min, max] (widened to 0) over
    2**B - 1 steps, an integer zero point. Methods: rtn / awq round to nearest, gptq and hqq fit.
    half_params: weight-only scales are rounded to float16 before the codes are chosen from them (zero
    points are integers, or HQQ's fractions rounded to float16), stored as float16; the int8 layout
    (signed) keeps float32 scales whatever it says."""

    kind: ClassVar[str] = "int"
    bits: int
    symmetric: bool = False
    block: Block = (1, None)
    method: str = "rtn"
    signed: bool = False
    qmax: int | None = None
    half_params: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"integer weights take 2..8 bits, got {self.bits!r}")
        if self.method not in ("rtn", "awq", "gptq", "hqq"):
            raise ValueError(f"unknown method {self.method!r} for integer weights")
        if self.qmax is not None and not self.symmetric:
            raise ValueError("qmax restricts symmetric formats only")
        if self.method == "hqq" and self.symmetric:
            raise ValueError("hqq fits zero points: it takes asymmetric formats")
        if self.signed and self.method in ("gptq", "hqq"):
            raise ValueError(f"{self.method} does not produce the int8 layout's codes")
        if self.qmax is not None and not 1 <= self.qmax <= 2 ** (self.bits - 1) - 1:
            full = 2 ** (self.bits - 1) - 1
            raise ValueError(f"qmax must be in [1, {full}] for {self.bits} bits, got {self.qmax}")
        self._check_signed()

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("" if self.symmetric else " asymmetric")

    @property
    def learns_scale(self) -> bool:  # type: ignore[override]
        return self.symmetric

    @property
    def zero(self):
        return float(2 ** (self.bits - 1)) if self.symmetric else None

    @property
    def int8_qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.qmax is None else self.qmax

    def _lsq_factor(self, lay):
        return 1.0 / math.sqrt(lay.block[0] * lay.block[1] * self.int8_qmax)

    @property
    def half(self) -> bool:
        return self.half_params and not self.signed

    def _own_params(self, x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            amax = core.block_reduce(x.abs(), lay.block, "amax")
            return core.symmetric_qparams(amax, self.bits, self.int8_qmax, half=self.half)
        return core.affine_qparams_from_range(core.block_reduce(x, lay.block, "amin"),
                                              core.block_reduce(x, lay.block, "amax"), self.bits, half=self.half)

    def _own_scale(self, x, lay):
        if not self.symmetric:
            raise ValueError(f"{self.name} has zero points: learned scales take symmetric formats")
        return self._own_params(x, lay)[0]

    def _encode(self, x, lay, scale, zero, hessian):
        fitted = self.method in ("gptq", "hqq")
        if fitted and (scale is not None or zero is not None):
            raise ValueError(f"{self.method} fits its own scales; fixed ones take round-to-nearest")
        if fitted and lay.block[0] != 1:
            raise ValueError(f"{self.method} takes scales per output row (block rows 1)")
        if self.method == "gptq":
            if hessian is None:
                raise ValueError("gptq needs the layer's calibration Hessian (pass calibration= to quantize)")
            return gptq_quantize(x, hessian, self.bits, lay.block[1], self.symmetric, half=self.half)
        if self.method == "hqq":
            return hqq_quantize(x, self.bits, lay.block[1], half=self.half)
        if self.symmetric:
            s = self._own_params(x, lay)[0] if scale is None else self._round_scale(scale)
            z, q = torch.full_like(s, self.zero), self.int8_qmax
            u = core.quantize_affine(x, s, z, self.bits, lay.block, self.zero - q, self.zero + q, symmetric=True)
            return u, s, z
        if (scale is None) != (zero is None):
            raise ValueError(f"{self.name} takes a fixed scale and zero point together")
        if scale is None:
            s, z = self._own_params(x, lay)
        else:
            s, z = self._round_scale(scale), zero
            if self.half and torch.isfinite(zero.to(torch.float16)).all():
                z = zero.to(torch.float16).float()
        return core.quantize_affine(x, s, z, self.bits, lay.block), s, z

    def _fake(self, x, lay, scale):
        xb = x.reshape(core.blocked_shape(x.shape, lay.block))
        if not self.symmetric:
            if scale is not None:
                raise ValueError(f"{self.name} has zero points: learned scales take symmetric formats")
            s, z = (core.param_view(t, x.shape, lay.block) for t in self._own_params(x.detach(), lay))
            q = torch.clamp(_round_ste(xb / s + z), 0, 2 ** self.bits - 1)
            return ((q - z) * s).reshape(x.shape)
        s = core.param_view(self._step(x, lay, scale), x.shape, lay.block)
        q = torch.clamp(_round_ste(xb / s), -self.int8_qmax, self.int8_qmax)
        return (q * s).reshape(x.shape)

    @classmethod
    def from_config(cls, config, *, signed=False, qmax=None):
        # The int8 layout is always rounded to nearest (its layers take no fitting method).
        method = "rtn" if signed else config.method
        half = config.scale_dtype == "float16" and not signed
        return cls(config.bits, config.symmetric, (1, config.group_size), method, signed, qmax, half)


@dataclass(frozen=True)
class TernaryScheme(_Coded):
    """{-a, 0, +a} (TWN, Li et al. 2016): |w| <= 0.7 mean|w| -> 0, else sign(w); a the mean |w| above that
    threshold. Codes {0, 1, 2} with zero point 1 and scale a; 2 bits stored."""

    kind: ClassVar[str] = "ternary"
    bits: ClassVar[int] = 2
    symmetric: ClassVar[bool] = True
    block: Block = (1, None)
    signed: bool = False

    @property
    def zero(self):
        return 1.0

    @property
    def int8_qmax(self):
        return 1

    def _own_scale(self, x, lay):
        return core.ternary_stats(x, lay.block)[1]

    def _signs(self, x: torch.Tensor, lay: Layout) -> torch.Tensor:
        delta = core.param_view(core.ternary_stats(x, lay.block)[0], x.shape, lay.block)
        xb = x.reshape(core.blocked_shape(x.shape, lay.block))
        return torch.sign(xb) * (xb.abs() > delta)

    def _encode(self, x, lay, scale, zero, hessian):
        s = self._own_scale(x, lay) if scale is None else scale
        u = (1 + self._signs(x, lay)).to(torch.uint8).reshape(x.shape)
        return u, s, torch.ones_like(s)

    def _fake(self, x, lay, scale):
        # The codes follow from w alone; the gradient goes straight through to w, and to a learned scale.
        value = self._signs(x.detach(), lay) * core.param_view(self._step(x, lay, scale), x.shape, lay.block)
        return _straight_through(x, value.reshape(x.shape))

    @classmethod
    def from_config(cls, config, *, signed=False, qmax=None):
        return cls((1, config.group_size), signed)


@dataclass(frozen=True)
class BinaryScheme(_Coded):
    """{-a, +a} (XNOR-Net, Rastegari et al. 2016): sign(w), 0 counting as +; a = mean |w| per block.
    Weight-only layout: codes {0, 1}, zero point 1/2, scale 2a; 1 bit stored."""

    kind: ClassVar[str] = "binary"
    bits: ClassVar[int] = 1
    symmetric: ClassVar[bool] = True
    mult: ClassVar[int] = 2
    block: Block = (1, None)
    signed: bool = False

    @property
    def zero(self):
        return 0.5

    @property
    def int8_qmax(self):
        return 1

    def _own_scale(self, x, lay):
        return core.block_reduce(x.abs(), lay.block, "mean").clamp_min(SCALE_EPS)

    def _encode(self, x, lay, scale, zero, hessian):
        a = self._own_scale(x, lay) if scale is None else scale
        return (x >= 0).to(torch.uint8), 2 * a, torch.full_like(a, 0.5)

    def _fake(self, x, lay, scale):
        xd = x.detach()
        signs = torch.where(xd >= 0, 1.0, -1.0).reshape(core.blocked_shape(x.shape, lay.block))
        value = signs * core.param_view(self._step(x, lay, scale), x.shape, lay.block)
        return _straight_through(x, value.reshape(x.shape))

    @classmethod
    def from_config(cls, config, *, signed=False, qmax=None):
        return cls((1, config.group_size), signed)


@dataclass(frozen=True)
class CodebookScheme(Scheme):
    """Non-uniform: per block, a 2**B-entry codebook (1-D k-means) and B-bit indices into it. Codebooks
    are stored fp16 (fp32 when a value does not fit fp16); with gptq the codebooks stay and GPTQ chooses
    each weight's entry. Weight-only layout: qweight packed [N, Kp], codebook [N, Kp / G, 2**B]."""

    kind: ClassVar[str] = "kmeans"
    runs_on: ClassVar[str] = "codebook"
    state_names: ClassVar[tuple[str, ...]] = ("qweight", "codebook")  # type: ignore[assignment]
    bits: int
    block: Block = (1, None)
    method: str = "rtn"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"codebook weights take 1..8 bits, got {self.bits!r}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"codebook weights take rtn or gptq, got {self.method!r}")

    @property
    def pads(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"kmeans{self.bits}"

    def encode(self, w, *, scale=None, zero_point=None, hessian=None):
        if scale is not None or zero_point is not None:
            raise ValueError("codebook weights have no scale or zero point to fix")
        lay = self.layout(w.shape)
        x = self._view(core.check_input(w, "weight"), lay)
        codes, centroids = core.kmeans_quantize(x, self.bits, lay.block)
        # fp16 centroids halve the codebook (16 per group of 64 would cost 1 byte per weight in fp32);
        # a table that does not fit fp16 stays fp32.
        book = centroids.to(torch.float16)
        if not torch.isfinite(book).all():
            book = centroids
        if self.method == "gptq":
            if hessian is None:
                raise ValueError("gptq needs the layer's calibration Hessian (pass calibration= to quantize)")
            if lay.block[0] != 1:
                raise ValueError("gptq takes codebooks per output row (block rows 1)")
            if lay.kp != lay.k:
                hessian = F.pad(hessian, (0, lay.kp - lay.k, 0, lay.kp - lay.k))
            codes, _, _ = gptq_quantize(x, hessian, self.bits, lay.block[1], False, codebook=book.float())
        return {"qweight": core.pack_bits(codes, self.bits), "codebook": book}

    def codes(self, state, shape):
        lay = self.layout(shape)
        packed = _tensor(state, "qweight", self.name)
        return core.unpack_bits(packed, self.bits, lay.n * lay.kp).reshape(lay.n, lay.kp)

    def decode(self, state, shape, dtype=torch.float32):
        lay = self.layout(shape)
        w = core.kmeans_dequantize(self.codes(state, shape), _tensor(state, "codebook", self.name), lay.block)
        return self._unview(w, lay).to(dtype)

    def codebook_form(self, state: State, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the codebook kernels take: indices uint8 [N, Kp] and one table per row and group of columns,
        [N, Kp / G, 2**B] in the stored dtype (a table shared by several rows is repeated for each)."""
        lay = self.layout(shape)
        book = _tensor(state, "codebook", self.name).reshape(*lay.grid, 2 ** self.bits)
        if lay.block[0] != 1:
            book = book.repeat_interleave(lay.block[0], dim=0)
        return self.codes(state, shape), book.contiguous()

    def row_codes(self, state, shape):
        return self.codes(state, shape)

    def decode_rows(self, state, shape, rows, codes=None, dtype=torch.float32):
        lay = self.layout(shape)
        c = (self.codes(state, shape) if codes is None else codes)[rows]  # [..., Kp]
        at = rows if lay.block[0] == 1 else rows // lay.block[0]
        book = _tensor(state, "codebook", self.name).reshape(*lay.grid, -1)[at].float()  # [..., Kp / G, 2**B]
        g = lay.block[1]
        out = torch.gather(book, -1, c.reshape(*c.shape[:-1], lay.kp // g, g).long()).reshape(c.shape)
        return out[..., :lay.k].to(dtype)

    def nbytes(self, shape):
        lay = self.layout(shape)
        return core.packed_nbytes(lay.n * lay.kp, self.bits) + 2 * lay.blocks * 2 ** self.bits

    def kernel_spec(self, shape):
        # k unpadded: the kernels that run it take the decoded weight [N, K], not the padded indices.
        lay = self.layout(shape)
        return LayerSpec(n=lay.n, k=lay.k, bits=self.bits, group_size=lay.block[1], symmetric=False,
                         family="codebook")

    @classmethod
    def from_config(cls, config, *, signed=False, qmax=None):
        if signed:
            raise ValueError("codebook weights have no int8 form")
        return cls(config.bits, (1, config.group_size), config.method)


@dataclass(frozen=True)
class FloatScheme(Scheme):
    """fp16 / bf16: a plain cast (values beyond the format's range are an error, not inf). fp8 (e4m3,
    e5m2): the values divided by a float32 scale per block (amax / the format's max), per row by default.
    Stored as `weight` in the weight's shape, and fp8's `scale` [N / rows, K / G]."""

    kind: ClassVar[str] = "float"
    runs_on: ClassVar[str] = "float"
    fmt: str
    block: Block = (1, None)

    def __post_init__(self) -> None:
        if self.fmt not in core.FLOAT_DTYPES:
            raise ValueError(f"unknown float format {self.fmt!r}; valid: {', '.join(core.FLOAT_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return core.FLOAT_DTYPES[self.fmt]

    @property
    def scaled(self) -> bool:
        return self.fmt.startswith("fp8")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return torch.finfo(self.dtype).bits

    @property
    def name(self) -> str:
        return self.fmt

    @property
    def state_names(self):
        return ("weight", "scale") if self.scaled else ("weight",)

    def encode(self, w, *, scale=None, zero_point=None, hessian=None):
        if scale is not None or zero_point is not None:
            raise ValueError("float formats take no fixed scale or zero point")
        lay = self.layout(w.shape)
        x = core.check_input(w, "weight").reshape(lay.n, lay.k)
        values, s = core.quantize_float(x, self.fmt, lay.block if self.scaled else None)
        out = {"weight": values.reshape(lay.shape)}
        if s is not None:
            out["scale"] = s
        return out

    def decode(self, state, shape, dtype=torch.float32):
        lay = self.layout(shape)
        values = _tensor(state, "weight", self.name).reshape(lay.n, lay.k)
        s = state.get("scale")
        w = core.dequantize_float(values, s, lay.block if s is not None else None)
        return w.reshape(lay.shape).to(dtype)

    def decode_rows(self, state, shape, rows, codes=None, dtype=torch.float32):
        lay = self.layout(shape)
        out = _tensor(state, "weight", self.name).reshape(lay.n, lay.k)[rows].float()
        s = state.get("scale")
        if s is not None:
            s = s.reshape(lay.grid)[rows if lay.block[0] == 1 else rows // lay.block[0]].float()
            g = lay.block[1]
            out = (out.reshape(*out.shape[:-1], lay.k // g, g) * s.unsqueeze(-1)).reshape(out.shape)
        return out.to(dtype)

    def nbytes(self, shape):
        lay = self.layout(shape)
        return lay.n * lay.k * (self.bits // 8) + (4 * lay.blocks if self.scaled else 0)

    def kernel_spec(self, shape):
        lay = self.layout(shape)
        return LayerSpec(n=lay.n, k=lay.k, bits=self.bits, group_size=lay.block[1], symmetric=True,
                         family="float", fmt=self.fmt)

    @classmethod
    def from_config(cls, config, *, signed=False, qmax=None):
        if signed:
            raise ValueError("float formats have no int8 form")
        return cls(config.float_format)


# Recipe kind (QuantConfig.kind) -> its scheme: a new format is a class above and an entry here.
SCHEMES: dict[str, type[Scheme]] = {
    "int": AffineScheme,
    "ternary": TernaryScheme,
    "binary": BinaryScheme,
    "kmeans": CodebookScheme,
    "float": FloatScheme,
}


def scheme_for(config: QuantConfig, *, signed: bool = False, qmax: int | None = None) -> Scheme:
    """The scheme of a recipe's weights. signed: the int8 kernels' layout (W8A8 layers); qmax: for
    symmetric integers, the largest code magnitude (default the full 2**(B-1) - 1)."""
    try:
        cls = SCHEMES[config.kind]
    except KeyError:
        raise ValueError(f"no weight format for kind {config.kind!r}; known: {', '.join(SCHEMES)}") from None
    return cls.from_config(config, signed=signed, qmax=qmax)


__all__ = ["SCHEMES", "AffineScheme", "BinaryScheme", "CodebookScheme", "FloatScheme", "Layout", "Scheme",
           "TernaryScheme", "scheme_for"]

"""lowbit's own CPU kernel: packed 1/2/3/4/8-bit weights times float32 activations (AVX2 + FMA).

Canonical weight (what the rest of lowbit stores): codes uint8 [N, K] in [0, 2**bits), scale and zero
float32 [N, K // G], W = (codes - zero) * scale, G == K meaning one group per row (per-channel).

`prepack` turns that into the kernel's layout (rows in tiles of 4, codes kept in 32-bit lanes, scale and
-scale*zero per group); `linear` computes x @ W.T (+ bias):

* M <= gemv_max_m() rows (decode): a streaming GEMV that reads the packed weights once per call, on all
  of torch's threads (at::parallel_for over tiles of output rows);
* more rows: W is dequantized to float32 in slabs of a few MB and multiplied with torch's GEMM (MKL).

Numerics: float32 throughout; the GEMV sums per group (s * sum(code * x) + b * sum(x)), so it differs from
`x @ dequant(W).T` only by summation order: relative error ||y - y_ref|| / ||y_ref|| stays below 1e-5 for
ordinary data (tests use that bound). Results are deterministic: every output of the GEMV comes from
one thread in a fixed order, whatever the thread count; the large-M path is deterministic for a given
thread count.
"""

from __future__ import annotations

import os

import torch

try:
    from .. import _C  # built by setup.py
except ImportError:  # not built, or built for another torch: callers fall back to other kernels
    _C = None

_CPU_OK: bool | None = None


def _cpu_has_avx2_fma() -> bool:
    global _CPU_OK
    if _CPU_OK is None:
        ok = False
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        ok = {"avx2", "fma"} <= flags
                        break
        except OSError:
            # No /proc (not Linux): torch only reports AVX2 when AVX2 and FMA are both usable.
            ok = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        _CPU_OK = ok
    return _CPU_OK


def available() -> bool:
    """True when lowbit._C is importable and this CPU has AVX2 and FMA.

    Setting LOWBIT_DISABLE_CPU_KERNEL=1 turns the kernel off (to compare against the fallbacks).
    """
    if _C is None or os.environ.get("LOWBIT_DISABLE_CPU_KERNEL", "") not in ("", "0"):
        return False
    return _cpu_has_avx2_fma()


def block_size(bits: int) -> int:
    """Weights per packed block along K: 64 for 8/4/3 bits, 128 for 2 bits, 256 for 1 bit."""
    return {8: 64, 4: 64, 3: 64, 2: 128, 1: 256}[bits]


def supports(n: int, k: int, bits: int, group_size: int) -> bool:
    """Whether the kernel takes this layer.

    bits in {1, 2, 3, 4, 8}; n >= 1; k % group_size == 0; and either group_size == k (per-channel, any k)
    or group_size a multiple of 32 that divides or is divided by the block size (64 for 8/4/3 bits,
    128 for 2, 256 for 1): 32, 64, 128, 256, 512, ... all qualify, 96 or 160 do not.
    N needs no alignment (padded to 4 rows), K is padded to the block size with zero codes.
    """
    if bits not in (1, 2, 3, 4, 8) or n < 1 or k < 1 or group_size < 1 or k % group_size:
        return False
    if group_size == k:
        return True
    b = block_size(bits)
    return group_size % 32 == 0 and (group_size % b == 0 or b % group_size == 0)


def _check(n: int, k: int, bits: int, group_size: int) -> None:
    if _C is None:
        raise RuntimeError("lowbit._C is not built; run `pip install --no-build-isolation -e .`")
    if not supports(n, k, bits, group_size):
        raise ValueError(f"lowbit_cpu cannot take n={n} k={k} bits={bits} group_size={group_size}")


def prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
            group_size: int) -> dict[str, torch.Tensor]:
    """Canonical codes [N, K] uint8, scale and zero [N, K // G] -> the kernel's buffers.

    Returns {"qweight": uint8 [bytes], "sb": float32 [ceil(N/4), groups, 8]} (scale and -scale*zero per
    group, four rows interleaved). Deterministic: the same canonical data always gives the same bytes.
    Codes must be < 2**bits (raises otherwise).
    """
    n, k = codes.shape
    _check(n, k, bits, group_size)
    qweight, sb = _C.prepack(codes.to(torch.uint8).contiguous(), scale.float().contiguous(),
                             zero.float().contiguous(), bits, group_size)
    return {"qweight": qweight, "sb": sb}


def linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype (computed in float32)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    y = _C.linear(x2, packed["qweight"], packed["sb"], bits, group_size, n, k,
                  None if bias is None else bias.float())
    y = y.reshape(*lead, n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def dequant(packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """The float32 W [N, K] the packed buffers stand for (scale * code - scale * zero, one rounding)."""
    return _C.dequant(packed["qweight"], packed["sb"], bits, group_size, n, k)


def gemv_max_m() -> int:
    """Largest number of activation rows that takes the streaming GEMV path; more use dequant + GEMM."""
    return _C.get_gemv_max_m()


def set_gemv_max_m(m: int) -> None:
    """Move the GEMV / dequant+GEMM crossover (process-wide; for benchmarking)."""
    _C.set_gemv_max_m(int(m))

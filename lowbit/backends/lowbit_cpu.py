"""lowbit's own CPU kernel: packed 1/2/3/4/8-bit weights times float32 activations (AVX2 + FMA, AVX-512),
2/4-bit codebook (k-means) weights (`cb_*`, below) and a GEMV for float16 / bf16 weights (`half_linear`).

Canonical weight (what the rest of lowbit stores): codes uint8 [N, K] in [0, 2**bits), scale and zero
float32 [N, K // G], W = (codes - zero) * scale, G == K meaning one group per row (per-channel).

`prepack` turns that into the kernel's layout: one uint8 buffer, rows in tiles of 32, each 32-bit lane
holding one row's next codes (4 int8, 8 int4, 8 int3 in 24 bits, 16 int2, 32 int1), every group of
codes followed by that group's scale and -scale*zero (float32), or, when scale and zero are given as
float16, by the scale and zero as float16 (half the bytes; the kernel forms -scale*zero in float32,
exactly, so the results equal the float32 form's for the same values). `linear` computes x @ W.T (+ bias):

* M <= gemv_max_m() rows (256 by default; decode, small batches): a GEMV that streams the packed
  weights once per call (per 128 rows of x), on all of torch's threads (at::parallel_for over tiles of
  32 output rows). Measured on 2 Zen 3 cores, one Llama-3.2-1B layer at batch 1: int4-g128 about 8x
  faster than float32 F.linear, int8 per-channel about 5x (at the machine's read bandwidth).
* more rows: W is dequantized to float32 a slab of columns at a time (~4 MB, stays in cache) and
  multiplied with torch's GEMM. Both paths are compute-bound there and cost about the same around
  M = 256..512 (benchmarks/kernel_gemv.py prints the crossover).

Numerics: float32 throughout. The GEMV sums per group, y = sum_g s_g * sum(code * x) - s_g * z_g *
sum(x) (every code * x product exact for |x| > 1e-29, sum(x) in double), so it differs from
x @ dequant(W).T by summation order only: ||y - y_ref|| / ||y_ref|| < 1e-5 (the tests' bound;
typically 1e-7..1e-6).

Kernel paths: the same packed layout runs on an AVX2/FMA path and, where the CPU has AVX-512
F/BW/VL/VBMI, an AVX-512 path (16 rows per instruction), chosen at run time: `isa()` names the path that runs, `isas()` the
paths this CPU can run, `set_isa(name)` or the environment variable LOWBIT_ISA picks one. The two paths
differ by float summation order only. On AVX-512, 1- and 2-bit weights for up to 4 rows of x go
through per-call tables of partial sums (for each 4-bit window of the packed codes and all its 16 values:
the sum of code * x over the 2 or 4 columns the window holds): one permute and one add per window
instead of a multiply-add per code.

Determinism: the GEMV gives the same bits on every call and for any thread count (each output is
summed by one thread in a fixed order). The large-M path uses torch's GEMM: same bits for the same
inputs and thread count (an input off 64-byte alignment is copied first, so alignment cannot matter).
"""

from __future__ import annotations

import os

import torch


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {"avx2", "fma"} <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # No /proc (not Linux): torch reports AVX2 only when AVX2 and FMA are both usable.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _import_kernel():
    # The whole module is compiled for AVX2/FMA, its import code included: check the CPU first.
    if not _cpu_has_avx2_fma():
        return None
    try:
        from .. import _C  # built by setup.py
    except (ImportError, OSError):  # not built, or built against another torch: callers fall back
        return None
    return _C


_C = _import_kernel()

ISAS = ("avx512", "avx2")  # every path the kernel has, best first


def _apply_env_isa() -> None:
    # LOWBIT_ISA picks the path for the whole process (tests and benchmarks compare them this way).
    name = os.environ.get("LOWBIT_ISA", "")
    if _C is not None and name:
        set_isa(name)


def available() -> bool:
    """True when lowbit._C is importable and this CPU has AVX2 and FMA.

    Setting LOWBIT_DISABLE_CPU_KERNEL=1 turns the kernel off (to compare against the fallbacks).
    """
    return _C is not None and os.environ.get("LOWBIT_DISABLE_CPU_KERNEL", "") in ("", "0")


def supports(n: int, k: int, bits: int, group_size: int) -> bool:
    """Whether the kernel takes this layer.

    bits in {1, 2, 3, 4, 8}; n, k >= 1; k % group_size == 0; and group_size == k (per-channel, any k)
    or group_size % 32 == 0. N needs no alignment (padded to 32 rows inside the packed buffer); K is
    padded to the codes per 32-bit lane (4 for int8, 8 for int4/int3, 16 for int2, 32 for int1).
    """
    if bits not in (1, 2, 3, 4, 8) or n < 1 or k < 1 or group_size < 1 or k % group_size:
        return False
    return group_size == k or group_size % 32 == 0


def _check(n: int, k: int, bits: int, group_size: int) -> None:
    if _C is None:
        raise RuntimeError("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA); "
                           "build it with `pip install --no-build-isolation -e .`")
    if not supports(n, k, bits, group_size):
        raise ValueError(f"lowbit_cpu cannot take n={n} k={k} bits={bits} group_size={group_size}")


def prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
            group_size: int) -> dict[str, torch.Tensor]:
    """Canonical codes [N, K] uint8, scale and zero [N, K // G] -> the kernel's buffers.

    Returns {"qweight": uint8 [bytes]}: one buffer holding, per tile of 32 rows, each group's codes
    followed by the group's scale and -scale*zero for those rows (see csrc/kernels.h). Deterministic:
    the same canonical data always gives the same bytes. Codes must be < 2**bits (raises otherwise).
    scale and zero both float16: the 16-bit form (scale and zero stored as float16, 4 bytes per row and
    group instead of 8); otherwise both are taken as float32.
    """
    n, k = codes.shape
    _check(n, k, bits, group_size)
    dt = torch.float16 if scale.dtype == zero.dtype == torch.float16 else torch.float32
    qweight = _C.prepack(codes.to(torch.uint8).contiguous(), scale.to(dt).contiguous(),
                         zero.to(dt).contiguous(), bits, group_size)
    return {"qweight": qweight}


def linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype (computed in float32; bf16/fp16 x upcast)."""
    # Reshapes and casts happen in C++: each torch call from Python costs a few microseconds, which
    # matters next to a ~100 us decode GEMV.
    return _C.linear(x, packed["qweight"], bits, group_size, n, k, bias)


def linear_q8(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) with x rounded to int8 first, per block of 32 columns (symmetric, step
    max|x| / 127), and integer dot products (AVX-512 VNNI, or AVX2's vpmaddubsw): the product of the
    dequantized weights with the dequantized activations, for decode where the float GEMV runs out of
    instructions before the memory runs out of bytes. Bits 8, 4, 3, 2 (int3 on AVX2: 16-bit products,
    vpmaddwd, on codes moved into 16-bit words by a multiply). Rows go one at a time."""
    if bits not in Q8_BITS:
        raise ValueError(f"the int8-activation GEMV takes {Q8_BITS}-bit weights, not {bits}")
    return _C.linear_q8(x, packed["qweight"], bits, group_size, n, k, bias)


Q8_BITS = (8, 4, 3, 2)


def q8_path() -> str:
    """The int8-activation GEMV's instructions on the kernel path that runs: "vnni" or "avx2"."""
    if _C is None:
        return "none"
    return _C.q8_path() if hasattr(_C, "q8_path") else "none"


def has_attention_bf16() -> bool:
    """Whether this CPU runs attention_bf16 (AVX-512 BF16)."""
    return available() and hasattr(_C, "has_attention_bf16") and _C.has_attention_bf16()


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   causal: bool) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with bf16 matmuls, float32 softmax: q [B, H, Sq, D], k and v
    [B, Hkv, Sk, D] (H a multiple of Hkv), mask additive [B|1, H|1, Sq|1, Sk]; causal: row i sees keys
    0..i. Returns [B, Sq, H, D] float32. See csrc/attention.h."""
    return _C.attention_bf16(q, k, v, mask, float(scale), bool(causal))


def dequant(packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """The float32 W [N, K] the packed buffers stand for (scale * code - scale * zero, one rounding)."""
    return _C.dequant(packed["qweight"], bits, group_size, n, k)


# ---- codebook (k-means) weights: csrc/kernels_codebook.h

CB_BITS = (2, 4)
CB_CHUNK = 64  # K and the group size are multiples of this


def cb_supports(n: int, k: int, bits: int, group_size: int) -> bool:
    """Whether the codebook kernels take this layer: 2- or 4-bit indices, K and the group a multiple of 64."""
    return (bits in CB_BITS and n >= 1 and k >= CB_CHUNK and k % CB_CHUNK == 0 and group_size >= CB_CHUNK
            and group_size % CB_CHUNK == 0 and k % group_size == 0)


def cb_prepack(codes: torch.Tensor, book: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Indices uint8 [N, K] and tables [N, K / G, 2**bits] (float16 or float32) -> the kernels' form:
    {"codes": packed uint8, "book": the tables, contiguous, dtype kept}."""
    if _C is None:
        raise RuntimeError("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)")
    if book.dtype not in (torch.float16, torch.float32):
        book = book.float()
    return {"codes": _C.cb_pack(codes.to(torch.uint8).contiguous(), bits), "book": book.contiguous()}


def cb_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias), W looked up in the tables: a GEMV (float32), for few rows."""
    return _C.cb_linear(x, packed["codes"], packed["book"], bits, group_size, n, k, bias)


def cb_gemm(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
            bias: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """The same product for many rows: W decoded a slab of rows at a time (float32, or bf16 with the
    activations rounded to bf16), then torch's GEMM. Result in x's dtype."""
    return _C.cb_gemm(x, packed["codes"], packed["book"], bits, group_size, n, k, bias, bf16)


def cb_decode(packed: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
              bf16: bool = False) -> torch.Tensor:
    """W [N, K] from the packed form: float32, or bf16 (each table entry rounded to nearest even)."""
    return _C.cb_decode(packed["codes"], packed["book"], bits, group_size, n, k, bf16)


def half_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for float16 or bf16 W [N, K] (K a multiple of 64), widened to float32 in
    registers: a GEMV (float32 arithmetic), for few rows. Result in x's dtype."""
    return _C.half_linear(x, w, bias)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group_size: int, e5m2: bool,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for fp8 W [N, K] given as its uint8 bit patterns (e4m3, or e5m2 when `e5m2`)
    with a float32 scale [N, K / group_size] (K and the group multiples of 64): each weight decoded exactly
    and scaled in registers, a GEMV in float32 arithmetic for few rows. Result in x's dtype. e4m3's NaN byte
    (0x7F, 0xFF) is not checked here (it would read as 480): the lowbit_fp8 kernel refuses such weights once,
    when it prepares them."""
    return _C.fp8_linear(x, w, scale, group_size, e5m2, bias)


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group_size: int, e5m2: bool,
             bias: torch.Tensor | None, bf16: bool) -> torch.Tensor:
    """fp8_linear for many rows: W decoded a slab of rows at a time (float32, or bf16 with the activations
    rounded to bf16 when `bf16`), then torch's GEMM. Result in x's dtype. NaN bytes: as fp8_linear."""
    return _C.fp8_gemm(x, w, scale, group_size, e5m2, bias, bf16)


def weight_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 buffer as packed weights get theirs: from 2 MB up on a 2 MB boundary with Linux's
    transparent huge pages asked for (a streaming GEMV loses about a tenth of the memory's speed to 4 KB
    page walks), plain memory otherwise."""
    return _C.weight_bytes(int(nbytes))


def gemv_max_m() -> int:
    """Largest number of activation rows that takes the streaming GEMV path; more use dequant + GEMM."""
    return _C.get_gemv_max_m()


def set_gemv_max_m(m: int) -> None:
    """Move the GEMV / dequant+GEMM crossover (process-wide; for benchmarking)."""
    _C.set_gemv_max_m(int(m))


def isa() -> str:
    """The kernel path that runs: "avx512" or "avx2" (or "none" when the kernel is not available)."""
    if _C is None:
        return "none"
    # A module built before the AVX-512 path existed (not rebuilt yet) runs AVX2 only.
    return _C.isa() if hasattr(_C, "isa") else "avx2"


def isas() -> list[str]:
    """The kernel paths this CPU can run, best first (empty when the kernel is not available)."""
    if _C is None:
        return []
    return list(_C.isas()) if hasattr(_C, "isas") else ["avx2"]


def set_isa(name: str) -> None:
    """Run the given kernel path from now on (process-wide). Raises ValueError for an unknown name and
    RuntimeError for a path this CPU cannot run (AVX-512 needs AVX-512 F, BW, VL and VBMI)."""
    if name not in ISAS:
        raise ValueError(f"unknown lowbit kernel path {name!r}; the paths are {', '.join(ISAS)}")
    if _C is None:
        raise RuntimeError("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)")
    if name not in isas():
        raise RuntimeError(f"lowbit kernel path {name!r} cannot run on this CPU (it lacks avx512f/bw/vl/vbmi); "
                           f"paths it can run: {', '.join(isas())}")
    if hasattr(_C, "set_isa"):
        _C.set_isa(name)


def ops():
    """The compiled module itself, for the activation-quantization ops the int8 backends call."""
    if _C is None:
        raise RuntimeError("lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)")
    return _C


_apply_env_isa()

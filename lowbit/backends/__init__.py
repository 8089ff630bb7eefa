"""Kernels for quantized layers, one registry of them, and the choice between them.

Weight-only kernels (this file) take integer weights in the canonical affine form: unsigned codes
[N, K] (uint8), and float32 scale and zero point [N, K // G], meaning W = (codes - zero) * scale; "bf16_mm"
takes bf16 weights, "lowbit_half" fp16 and bf16 weights (a GEMV), "lowbit_fp8" fp8 weights (a GEMV),
"lowbit_codebook" 2/4-bit codebook
(k-means) weights, and "dequant" any format (it decodes through the format's scheme). Kernels for int8
weights with uint8 activations (W8A8 linear and conv layers) are in int8.py. Each kernel is a class:
whether it can run a layer (`supports`, from a LayerSpec), the kernel's own layout of the weight made once
at quantize or load time from the canonical weight (`prepare`, from a StoredWeight), and the computation
(`run`). Kernels built on lowbit's C++ code or oneDNN call them through custom ops (ops.py), so
torch.compile and torch.export can trace them.

A layer may run different kernels by the number of rows of its input (a GEMV for few rows, a GEMM for
many): its choice is written as a route, "lowbit_cpu<=256,lowbit_gemm_bf16" (each kernel up to that many
rows, the last for the rest); a single kernel name is a route of one. Kernels that read the same prepared
form of the weight (`form`) share it, so such a route keeps one packed copy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..hw import cpu_features
from . import lowbit_cpu, onednn, ops
from .base import ConvSpec, Kernel, LayerSpec, StoredWeight
from .int8 import OneDNNInt8, ReferenceInt8

__all__ = ["AUTO_ORDER", "BF16_MM_MAX_ROWS", "KERNELS", "ConvSpec", "Kernel", "LayerSpec", "StoredWeight",
           "available_kernels", "candidates", "format_route", "native_bf16", "parse_route", "select_kernel"]

# bf16 weights: a bf16 GEMM wins while the matmul is memory-bound (few rows); beyond that, on CPUs
# without native bf16 arithmetic (AVX2), upcasting the weight and running fp32 GEMM was ~6x faster at
# 4096 rows. Measured on a Zen 3 with torch 2.13.
BF16_MM_MAX_ROWS = 16


@functools.cache
def native_bf16() -> bool:
    """bf16 GEMMs run on bf16 instructions here (AVX512-BF16 or AMX), about twice float32's speed; elsewhere
    oneDNN emulates them and they lose to float32 beyond a few rows."""
    f = cpu_features()
    return bool(f.get("avx512_bf16") or f.get("amx_bf16"))


def _expand(p: torch.Tensor, group_size: int) -> torch.Tensor:
    # [N, K/G] -> [N, K] without a Python loop; small next to the codes themselves.
    return p.repeat_interleave(group_size, dim=1)


class WeightOnlyKernel(Kernel):
    """A kernel for weights of one format family times float activations (integer codes unless said)."""

    family = "int"

    def refusal(self, spec: LayerSpec) -> str:
        if spec.act is not None:
            return "it runs weight-only layers (float activations), not uint8 activations"
        if spec.family != self.family:
            return f"it runs {self.family} weights, not {spec.fmt or spec.family} ones"
        return super().refusal(spec)

    def _takes(self, spec: LayerSpec) -> bool:
        return spec.act is None and spec.family == self.family


class Dequant(WeightOnlyKernel):
    """No low-bit kernel: decode the weight to float on every call, then a float matmul. Integer codes are
    dequantized in float32 from their unpacked affine form; other formats decode through their scheme into
    the activations' dtype."""

    name = "dequant"
    simulated = True

    def supports(self, spec: LayerSpec) -> bool:
        return spec.act is None

    def prepare(self, weight, spec):
        if spec.family != "int":
            return {"weight": weight}
        codes, scale, zero = weight.affine_codes()
        return {"codes": codes.contiguous(), "scale": scale.float(), "zero": zero.float()}

    def run(self, x, prep, spec, bias):
        if spec.family != "int":
            b = None if bias is None else bias.to(x.dtype)
            return F.linear(x, prep["weight"].decode().to(x.dtype), b)
        w = (prep["codes"].float() - _expand(prep["zero"], spec.group_size)) * _expand(prep["scale"], spec.group_size)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


class BF16MM(WeightOnlyKernel):
    """bf16 weights: PyTorch's bf16 GEMM for up to BF16_MM_MAX_ROWS rows, else the weight upcast to the
    activations' dtype and a GEMM in that (faster where bf16 has no native arithmetic)."""

    name = "bf16_mm"
    family = "float"
    act_dtype = torch.bfloat16

    def supports(self, spec: LayerSpec) -> bool:
        return self._takes(spec) and spec.fmt == "bf16"

    def refusal(self, spec: LayerSpec) -> str:
        return f"it runs bf16 weights, not {spec.fmt}" if self._takes(spec) else super().refusal(spec)

    def prepare(self, weight, spec):
        return {"weight": weight}

    def run(self, x, prep, spec, bias):
        weight = prep["weight"]
        if x.numel() <= BF16_MM_MAX_ROWS * spec.k:
            b = None if bias is None else bias.to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), weight.state["weight"], b).to(x.dtype)
        return F.linear(x, weight.decode().to(x.dtype), None if bias is None else bias.to(x.dtype))


class TorchInt8(WeightOnlyKernel):
    """PyTorch's int8 weight-only matmul (per-channel symmetric); fast only with bf16 activations."""

    name = "torch_int8pack"
    act_dtype = torch.bfloat16

    def supports(self, spec):
        # With torch 2.13 the op needs K % 16 == 0: K % 16 == 8 (40, 72, 200) returns inf/NaN for one row
        # and crashes the process for four or more; K % 8 != 0 crashes too. Refuse such layers here.
        return (self._takes(spec) and spec.bits == 8 and spec.symmetric and spec.group_size == spec.k
                and spec.k % 16 == 0)

    def prepare(self, weight, spec):
        codes, scale, zero = weight.affine_codes()
        w = (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8)
        return {"w": w.contiguous(), "scale": scale.reshape(-1).to(torch.bfloat16)}

    def run(self, x, prep, spec, bias):
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), prep["w"], prep["scale"])
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)


class TorchInt4(WeightOnlyKernel):
    """PyTorch's grouped int4 matmul; takes any codes < 16, so int2/int3 can run on it at 4-bit cost."""

    name = "torch_int4pack"
    act_dtype = torch.bfloat16

    def supports(self, spec):
        return (self._takes(spec) and spec.bits <= 4 and spec.group_size in (32, 64, 128, 256) and spec.k % spec.group_size == 0
                and spec.n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    def prepare(self, weight, spec):
        codes, scale, zero = weight.affine_codes()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # The op computes (q - 8) * s + z; ours is (q - zero) * s, so z = (8 - zero) * s.
        sz = torch.stack([scale.float(), (8.0 - zero.float()) * scale.float()], dim=-1)
        return {"w": packed, "scales_zeros": sz.transpose(0, 1).contiguous().to(torch.bfloat16)}

    def run(self, x, prep, spec, bias):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), prep["w"], spec.group_size, prep["scales_zeros"])
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)


class LowbitCPU(WeightOnlyKernel):
    """lowbit's own CPU kernel (lowbit._C; AVX2, or AVX-512 where the CPU has it): packed 2/3/4/8-bit weights, float32 activations."""

    name = "lowbit_cpu"

    def supports(self, spec):
        return (self._takes(spec) and lowbit_cpu.available()
                and lowbit_cpu.supports(spec.n, spec.k, spec.bits, spec.group_size))

    def prepare(self, weight, spec):
        codes, scale, zero = weight.affine_codes()
        scale, zero = scale.float(), zero.float()
        # Scales and zero points that float16 holds exactly take the packed form with 16-bit scales
        # (fewer bytes per token, the same results); any other value keeps them in float32.
        sh, zh = scale.half(), zero.half()
        if torch.equal(sh.float(), scale) and torch.equal(zh.float(), zero):
            scale, zero = sh, zh
        return lowbit_cpu.prepack(codes.contiguous(), scale.contiguous(), zero.contiguous(),
                                  spec.bits, spec.group_size)

    def run(self, x, prep, spec, bias):
        y = ops.linear(x.float().contiguous(), prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k,
                       None if bias is None else bias.float())
        return y.to(x.dtype)

    def eager(self, x, prep, spec, bias):
        return lowbit_cpu.linear(x, prep, spec.bits, spec.group_size, spec.n, spec.k, bias)

    def bind(self, prep, spec):
        call, qweight, bits, group, n, k = lowbit_cpu._C.linear, prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k
        return lambda x, bias: call(x, qweight, bits, group, n, k, bias)


class LowbitQ8(LowbitCPU):
    """lowbit_cpu's packed weight with the activations rounded to int8 per call, per block of 32 columns
    (symmetric, as llama.cpp's Q8_0), and integer dot products (AVX-512 VNNI or AVX2): the float GEMV
    spends more instructions per weight byte than decode leaves it, integer dot products fewer. The
    activations' rounding changes the results (typically ~0.5% relative per layer), so backend="auto"
    never picks it: ask for it by name, e.g. backend="lowbit_q8<=16,lowbit_cpu<=256,lowbit_gemm". One row
    at a time: meant for decode and small batches. int3 on CPUs without AVX-512 VBMI/VNNI keeps float
    activations."""

    name = "lowbit_q8"
    form = "lowbit_cpu"
    act_dtype = torch.int8

    def supports(self, spec):
        return super().supports(spec) and spec.bits in lowbit_cpu.Q8_BITS

    def refusal(self, spec):
        if self._takes(spec) and spec.bits not in lowbit_cpu.Q8_BITS:
            return f"it takes {'/'.join(map(str, lowbit_cpu.Q8_BITS))}-bit weights, not {spec.bits}-bit"
        return super().refusal(spec)

    def run(self, x, prep, spec, bias):
        y = ops.linear_q8(x.float().contiguous(), prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k,
                          None if bias is None else bias.float())
        return y.to(x.dtype)

    def eager(self, x, prep, spec, bias):
        return lowbit_cpu.linear_q8(x, prep, spec.bits, spec.group_size, spec.n, spec.k, bias)

    def bind(self, prep, spec):
        if spec.bits not in lowbit_cpu.Q8_BITS:  # what lowbit_cpu.linear_q8 checks on every call
            return super().bind(prep, spec)
        call, qweight, bits, group, n, k = lowbit_cpu._C.linear_q8, prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k
        return lambda x, bias: call(x, qweight, bits, group, n, k, bias)


# Kernels for many rows (compute-bound): the whole weight is dequantized on every call, from the packed form
# the layer keeps anyway (no float copy stays in memory), then one torch GEMM runs. At 512+ rows a dequantized
# weight costs well under 5% of the GEMM's time, and the GEMM is torch's best. They are not timed below
# MIN_ROWS rows, where a GEMV that reads the packed weight once is bound to win.


class LowbitGemm(LowbitCPU):
    """lowbit_cpu's packed weight dequantized to float32 per call (lowbit._C), then one float32 GEMM."""

    name = "lowbit_gemm"
    form = "lowbit_cpu"
    min_rows = 64
    eager = None  # not lowbit_cpu's direct call: this kernel's own run is the computation

    def run(self, x, prep, spec, bias):
        w = ops.dequant(prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


class LowbitGemmBF16(LowbitGemm):
    """lowbit_cpu's packed weight dequantized per call and rounded to bf16, then a bf16 GEMM (bf16
    activations; on CPUs with native bf16 arithmetic only)."""

    name = "lowbit_gemm_bf16"
    act_dtype = torch.bfloat16

    def supports(self, spec):
        return native_bf16() and super().supports(spec)

    def refusal(self, spec):
        if self._takes(spec) and not native_bf16():
            return "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX)"
        return super().refusal(spec)

    def run(self, x, prep, spec, bias):
        w = ops.dequant(prep["qweight"], spec.bits, spec.group_size, spec.n, spec.k).to(torch.bfloat16)
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), w, b).to(x.dtype)


class BF16Gemm(BF16MM):
    """bf16 weights: a bf16 GEMM at every row count, on CPUs with native bf16 arithmetic."""

    name = "bf16_gemm"
    form = "bf16_mm"
    min_rows = 64

    def supports(self, spec):
        return native_bf16() and super().supports(spec)

    def refusal(self, spec):
        if super().supports(spec):
            return "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX)"
        return super().refusal(spec)

    def run(self, x, prep, spec, bias):
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), prep["weight"].state["weight"], b).to(x.dtype)


class DequantBF16(Dequant):
    """Formats decoded per call (codebooks, fp16, fp8: their GEMVs are for few rows) through the format's scheme
    into bf16, then a bf16 GEMM (native bf16 CPUs only). Simulated, like dequant, at half its GEMM cost."""

    name = "dequant_bf16"
    form = "dequant"
    act_dtype = torch.bfloat16
    min_rows = 64

    def supports(self, spec):
        # Integer codes go through lowbit_gemm_bf16, which dequantizes the packed form faster; bf16 weights
        # through bf16_gemm, which needs no decoding.
        return native_bf16() and spec.act is None and spec.family != "int" and spec.fmt != "bf16"

    def refusal(self, spec):
        if spec.act is None and spec.family != "int" and spec.fmt != "bf16":
            return "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX)"
        return "it runs formats without a low-bit kernel (codebooks, fp16, fp8), not integer codes or bf16"

    def prepare(self, weight, spec):
        return {"weight": weight}

    def run(self, x, prep, spec, bias):
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), prep["weight"].decode(torch.bfloat16), b).to(x.dtype)


class LowbitCodebook(WeightOnlyKernel):
    """Codebook (k-means) weights, 2 or 4 bits, on lowbit._C: the indices packed once, each table one
    register, every weight looked up by a permute (AVX-512: 16 entries in one; AVX2: two and a blend)
    and multiplied into float32 activations. A GEMV: few rows."""

    name = "lowbit_codebook"
    family = "codebook"

    def supports(self, spec):
        return (self._takes(spec) and lowbit_cpu.available()
                and lowbit_cpu.cb_supports(spec.n, spec.k, spec.bits, spec.group_size))

    def refusal(self, spec):
        if self._takes(spec) and lowbit_cpu.available():
            return (f"it takes {'/'.join(map(str, lowbit_cpu.CB_BITS))}-bit codebooks with K and the group a "
                    f"multiple of {lowbit_cpu.CB_CHUNK} (this layer: {spec.bits}-bit, K {spec.k}, group "
                    f"{spec.group_size})")
        if self._takes(spec):
            return "lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)"
        return super().refusal(spec)

    def prepare(self, weight, spec):
        codes, book = weight.codebook()
        return lowbit_cpu.cb_prepack(codes, book, spec.bits)

    def run(self, x, prep, spec, bias):
        return ops.cb_linear(x, prep["codes"], prep["book"], spec.bits, spec.group_size, spec.n, spec.k, bias)

    def eager(self, x, prep, spec, bias):
        return lowbit_cpu.cb_linear(x, prep, spec.bits, spec.group_size, spec.n, spec.k, bias)


class LowbitCodebookGemm(LowbitCodebook):
    """lowbit_codebook's packed form for many rows: the weight decoded a slab at a time (bf16 on CPUs with
    native bf16 arithmetic, the activations rounded to bf16; float32 elsewhere), then torch's GEMM."""

    name = "lowbit_codebook_gemm"
    form = "lowbit_codebook"
    min_rows = 16  # where the GEMV's rows per pass run out, the GEMM can already win
    eager = None  # not lowbit_codebook's direct call: this kernel's own run is the computation

    def __init__(self) -> None:
        # Decided once here: a traced call must not read the CPU's features (a file) again.
        self.bf16 = native_bf16()
        self.act_dtype = torch.bfloat16 if self.bf16 else torch.float32

    def run(self, x, prep, spec, bias):
        return ops.cb_gemm(x, prep["codes"], prep["book"], spec.bits, spec.group_size, spec.n, spec.k, bias,
                           self.bf16)


class LowbitHalf(WeightOnlyKernel):
    """float16 / bf16 weights on lowbit._C: read as stored, widened to float32 in registers, multiplied into
    float32 activations. A GEMV: few rows (half float32's bytes per weight, float32's arithmetic)."""

    name = "lowbit_half"
    family = "float"

    def supports(self, spec):
        return (self._takes(spec) and spec.fmt in ("fp16", "bf16") and lowbit_cpu.available()
                and spec.k % lowbit_cpu.CB_CHUNK == 0)

    def refusal(self, spec):
        if self._takes(spec) and spec.fmt in ("fp16", "bf16"):
            if not lowbit_cpu.available():
                return "lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)"
            return f"it needs K a multiple of {lowbit_cpu.CB_CHUNK} (this layer: {spec.k})"
        if self._takes(spec):
            return f"it runs fp16 and bf16 weights, not {spec.fmt}"
        return super().refusal(spec)

    def prepare(self, weight, spec):
        return {"w": weight.state["weight"].reshape(spec.n, spec.k).contiguous()}

    def run(self, x, prep, spec, bias):
        return ops.half_linear(x, prep["w"], bias)

    def eager(self, x, prep, spec, bias):
        return lowbit_cpu.half_linear(x, prep["w"], bias)


class LowbitFp8(WeightOnlyKernel):
    """fp8 weights (e4m3, e5m2) on lowbit._C: one byte per weight read as stored, each decoded exactly to
    float16 bits and widened in registers, times its group's float32 scale, multiplied into float32
    activations. A GEMV: few rows (a quarter of float32's bytes per weight, float32's arithmetic)."""

    name = "lowbit_fp8"
    family = "float"
    FORMATS = ("fp8_e4m3", "fp8_e5m2")

    def _fits(self, spec: LayerSpec) -> bool:
        g, chunk = spec.group_size, lowbit_cpu.CB_CHUNK
        return spec.k % chunk == 0 and g % chunk == 0 and spec.k % g == 0

    def supports(self, spec):
        return self._takes(spec) and spec.fmt in self.FORMATS and lowbit_cpu.available() and self._fits(spec)

    def refusal(self, spec):
        if self._takes(spec) and spec.fmt in self.FORMATS:
            if not lowbit_cpu.available():
                return "lowbit._C is not available (not built, or the CPU lacks AVX2/FMA)"
            return (f"it needs K and the scale's group multiples of {lowbit_cpu.CB_CHUNK} (this layer: K "
                    f"{spec.k}, group {spec.group_size})")
        if self._takes(spec):
            return f"it runs fp8 weights, not {spec.fmt}"
        return super().refusal(spec)

    def prepare(self, weight, spec):
        bits = weight.state["weight"].reshape(spec.n, spec.k).view(torch.uint8).contiguous()
        if spec.fmt == "fp8_e4m3" and bool(((bits & 0x7F) == 0x7F).any()):
            # The kernel decodes e4m3's NaN pattern as a number; a stored NaN must not turn into one.
            raise ValueError("fp8_e4m3 weight holds NaN values: the checkpoint is corrupt")
        scale = weight.state["scale"].float().reshape(spec.n, spec.k // spec.group_size).contiguous()
        return {"w": bits, "scale": scale}

    def run(self, x, prep, spec, bias):
        return ops.fp8_linear(x, prep["w"], prep["scale"], spec.group_size, spec.fmt == "fp8_e5m2", bias)

    def eager(self, x, prep, spec, bias):
        return lowbit_cpu.fp8_linear(x, prep["w"], prep["scale"], spec.group_size, spec.fmt == "fp8_e5m2", bias)


class LowbitFp8Gemm(LowbitFp8):
    """lowbit_fp8's weight for many rows: decoded a slab of rows at a time (bf16 on CPUs with native bf16
    arithmetic, the activations rounded to bf16; float32 elsewhere), then torch's GEMM."""

    name = "lowbit_fp8_gemm"
    form = "lowbit_fp8"
    min_rows = 16
    eager = None  # not lowbit_fp8's direct call: this kernel's own run is the computation

    def __init__(self) -> None:
        # Decided once here: a traced call must not read the CPU's features (a file) again.
        self.bf16 = native_bf16()
        self.act_dtype = torch.bfloat16 if self.bf16 else torch.float32

    def run(self, x, prep, spec, bias):
        return ops.fp8_gemm(x, prep["w"], prep["scale"], spec.group_size, spec.fmt == "fp8_e5m2", bias, self.bf16)


KERNELS: dict[str, Kernel] = {k.name: k for k in (LowbitCPU(), TorchInt4(), TorchInt8(), OneDNNInt8(), BF16MM(),
                                                   Dequant(), ReferenceInt8(), LowbitGemm(), LowbitGemmBF16(),
                                                   BF16Gemm(), DequantBF16(), LowbitQ8(), LowbitCodebook(),
                                                   LowbitCodebookGemm(), LowbitHalf(), LowbitFp8(),
                                                   LowbitFp8Gemm())}
# Preference when nothing is measured (backend="auto" measures these against each other where it can).
AUTO_ORDER = ("lowbit_cpu", "lowbit_codebook", "lowbit_half", "lowbit_fp8", "torch_int4pack", "torch_int8pack",
              "onednn", "bf16_mm", "dequant", "reference", "lowbit_gemm_bf16", "lowbit_gemm", "lowbit_codebook_gemm",
              "lowbit_fp8_gemm", "bf16_gemm", "dequant_bf16")


def parse_route(text: str) -> list[tuple[int | None, str]]:
    """"a<=16,b<=256,c" -> [(16, "a"), (256, "b"), (None, "c")]: kernel a for calls of up to 16 rows, b up to
    256, c for more. A single name is a route of one kernel. Raises ValueError for a malformed route."""
    parts = [p.strip() for p in str(text).split(",")]
    route: list[tuple[int | None, str]] = []
    for i, part in enumerate(parts):
        name, sep, bound = part.partition("<=")
        last = i == len(parts) - 1
        if not name or (sep and last) or (not sep and not last):
            raise ValueError(f"malformed kernel route {text!r}: expected 'kernel<=rows,...,kernel'")
        try:
            rows = int(bound) if sep else None
        except ValueError:
            raise ValueError(f"malformed kernel route {text!r}: {bound!r} is not a row count") from None
        if rows is not None and (rows < 1 or (route and rows <= route[-1][0])):
            raise ValueError(f"malformed kernel route {text!r}: row bounds must be positive and increasing")
        route.append((rows, name.strip()))
    return route


def format_route(route: list[tuple[int | None, str]]) -> str:
    """The text form parse_route reads; consecutive entries of one kernel merged."""
    merged: list[tuple[int | None, str]] = []
    for rows, name in route:
        if merged and merged[-1][1] == name:
            merged[-1] = (rows, name)
        else:
            merged.append((rows, name))
    return ",".join(name if rows is None else f"{name}<={rows}" for rows, name in merged)


def candidates(spec: LayerSpec) -> list[Kernel]:
    """The kernels that can run this layer here, in the default order of preference."""
    return [KERNELS[n] for n in AUTO_ORDER if KERNELS[n].supports(spec)]


def select_kernel(spec: LayerSpec, prefer: str = "auto") -> Kernel:
    """The kernel for one layer: `prefer` names one, or "auto" takes the first that supports it."""
    if prefer == "auto":
        found = candidates(spec)
        if not found:
            raise ValueError(f"no kernel can run a layer of {spec}")
        return found[0]
    if prefer not in KERNELS:
        raise ValueError(f"unknown kernel {prefer!r}; valid: auto, {', '.join(KERNELS)}")
    kernel = KERNELS[prefer]
    if not kernel.supports(spec):
        raise ValueError(f"kernel {prefer!r} cannot run this layer here: {kernel.refusal(spec)}")
    return kernel


def available_kernels() -> dict[str, bool]:
    """Which kernels this machine and build can run at all."""
    probe = {
        "lowbit_cpu": lowbit_cpu.available(),
        "torch_int4pack": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
        "torch_int8pack": hasattr(torch, "_weight_int8pack_mm"),
        "onednn": onednn.available(),
        "bf16_mm": True,
        "dequant": True,
        "reference": True,
        "lowbit_gemm": lowbit_cpu.available(),
        "lowbit_q8": lowbit_cpu.available() and lowbit_cpu.q8_path() != "none",
        "lowbit_gemm_bf16": lowbit_cpu.available() and native_bf16(),
        "bf16_gemm": native_bf16(),
        "dequant_bf16": native_bf16(),
        "lowbit_codebook": lowbit_cpu.available(),
        "lowbit_codebook_gemm": lowbit_cpu.available(),
        "lowbit_half": lowbit_cpu.available(),
        "lowbit_fp8": lowbit_cpu.available(),
        "lowbit_fp8_gemm": lowbit_cpu.available(),
    }
    return probe

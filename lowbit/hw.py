"""Describe the CPU that kernels run on: instruction-set features, name, cores, memory bandwidth, and
whether Linux grants the huge pages that lowbit's packed weights ask for."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

_CPUINFO = Path("/proc/cpuinfo")
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Feature name reported here -> flag names the Linux kernel uses in /proc/cpuinfo.
_LINUX_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    # Older kernels spell it avx512vnni; newer ones avx512_vnni.
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
}

FEATURES: tuple[str, ...] = tuple(_LINUX_FLAGS)


def _cpuinfo_field(name: str) -> str | None:
    # First occurrence is enough: all cores of one machine report the same model and flags.
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags() -> set[str] | None:
    """Raw CPU flags from /proc/cpuinfo, or None where that file does not exist (non-Linux)."""
    # x86 calls the field "flags"; ARM calls it "Features".
    flags = _cpuinfo_field("flags")
    if flags is None:
        flags = _cpuinfo_field("Features")
    return set(flags.split()) if flags is not None else None


def _features_from_capability(capability: str) -> dict[str, bool]:
    # torch only reports a coarse level (e.g. "AVX2", "AVX512"), so infer what that level implies.
    cap = capability.upper()
    avx2 = cap in {"AVX2", "AVX512"}
    feats = dict.fromkeys(FEATURES, False)
    # Every AVX2 CPU torch dispatches to also has FMA and F16C (torch's AVX2 level requires FMA).
    feats.update(avx2=avx2, fma=avx2, f16c=avx2, avx512f=cap == "AVX512")
    return feats


def torch_cpu_capability() -> str:
    """The vector ISA level torch's CPU kernels dispatch to (e.g. "AVX2", "AVX512", "DEFAULT")."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_features() -> dict[str, bool]:
    """Which low-bit-relevant x86 features the CPU has, as ``{name: bool}`` for every name in FEATURES."""
    flags = cpu_flags()
    if flags is None:
        return _features_from_capability(torch_cpu_capability())
    return {name: any(f in flags for f in aliases) for name, aliases in _LINUX_FLAGS.items()}


def cpu_name() -> str:
    """Human-readable CPU model name, best effort."""
    name = _cpuinfo_field("model name") or _cpuinfo_field("Hardware")
    if name:
        return name
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def read_buffer(nbytes: int) -> torch.Tensor:
    """A float32 tensor of ones, nbytes long, for timing memory reads: in memory as lowbit's packed weights
    get it (2 MB pages where Linux grants them, see lowbit_cpu.weight_bytes), so that a kernel reading
    packed weights is compared with a plain read on the same kind of pages. Every page is written."""
    from .backends import lowbit_cpu  # here: the backends import this module

    if lowbit_cpu.available() and nbytes >= 8:
        return lowbit_cpu.weight_bytes(nbytes // 4 * 4).view(torch.float32).fill_(1.0)
    return torch.ones(nbytes // 4, dtype=torch.float32)


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: best of ``repeats`` torch.sum passes over an nbytes float32 tensor
    (on the pages lowbit's packed weights get: see read_buffer)."""
    if nbytes < 4:
        raise ValueError(f"nbytes must be at least 4, got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    x = read_buffer(nbytes)
    # An untimed pass starts the thread pool before timing.
    torch.sum(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.sum(x)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def huge_pages_mode(text: str | None = None) -> str | None:
    """Linux's transparent huge page mode ("always", "madvise" or "never"; the bracketed word of
    /sys/kernel/mm/transparent_hugepage/enabled), or None where it cannot be read. lowbit's packed weights
    of 2 MB and more ask for huge pages (madvise), which every mode but "never" grants: with 4 KB pages a
    decode GEMV loses about a tenth of the memory's speed to page walks."""
    if text is None:
        try:
            text = _THP.read_text()
        except OSError:
            return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def hardware_info() -> dict[str, Any]:
    """One dict describing the machine, for benchmark reports."""
    return {
        "cpu": cpu_name(),
        "cores": cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch_cpu_capability(),
        "features": cpu_features(),
        "huge_pages": huge_pages_mode(),
    }

"""Builds lowbit._C, the CPU kernel: AVX2/FMA, plus AVX-512 functions chosen at run time when the CPU has
AVX-512 F/BW/VL/VBMI (compiled for that target function by function, see csrc/kernels_avx512.h).
Package metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .       # needs torch installed first
    python setup.py build_ext --inplace         # rebuild the kernel only

On non-x86 machines nothing is compiled and lowbit falls back to its other kernels; on x86 CPUs
without AVX2/FMA the module builds but lowbit.backends.lowbit_cpu.available() reports False.
"""

import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64", "x64"):
    ext_modules.append(
        CppExtension(
            name="lowbit._C",
            sources=["lowbit/backends/csrc/lowbit_cpu.cpp"],
            depends=["lowbit/backends/csrc/kernels.h", "lowbit/backends/csrc/kernels_avx512.h",
                     "lowbit/backends/csrc/kernels_q8.h", "lowbit/backends/csrc/kernels_decode.h",
                     "lowbit/backends/csrc/act_quant.h", "lowbit/backends/csrc/attention.h"],
            # -fopenmp: at::parallel_for is a header template that needs it to run on several threads;
            # -g0: no debug info (it would make the module 10x larger).
            extra_compile_args=["-O3", "-g0", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})

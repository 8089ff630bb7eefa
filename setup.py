"""Builds lowbit._C, the AVX2/FMA CPU kernel. Package metadata lives in pyproject.toml."""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            name="lowbit._C",
            sources=["lowbit/backends/csrc/lowbit_cpu.cpp"],
            # -fopenmp: at::parallel_for is a header template that needs it to run on several threads.
            extra_compile_args=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)

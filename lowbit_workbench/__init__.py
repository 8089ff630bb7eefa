"""lowbit's workbench: what the demo, the benchmarks, the scripts and the tests use besides the library.

STS-B evaluation, the small language model's corpus and helpers, MNIST and ResNet models, the demo and the
other toolkits the benchmarks compare against. Nothing in `lowbit` imports this package; its data
(`lowbit_workbench/data`, about 4 MB with the attribution notes of each set) is read from a clone of the
repository and is not part of the wheel.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def data_file(*parts: str) -> Path:
    """The path of a file in `DATA_DIR`, or a FileNotFoundError saying where the data comes from."""
    path = DATA_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the workbench's data is in lowbit_workbench/data of a clone of the lowbit "
            "repository (it is not part of the installed wheel)")
    return path

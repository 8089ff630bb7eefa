"""Measure kernels on this machine and remember the result.

`backend="auto"` times every kernel that can run a layer, and the float layer itself, at the input
shape the layer sees, once per distinct (layer kind, recipe, shape); the timings are kept in a JSON
file per machine (CPU model and features, thread count, torch and lowbit versions), so the next
quantization of the same shapes costs nothing. The cache lives in $LOWBIT_CACHE_DIR, else
$XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit; delete the file to measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import hw
from .files import FILE_MODE
from .version import __version__

CACHE_FILE = "autotune-v1.json"
FLOAT = "float"  # the name of the keep-it-in-float choice


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_CACHE_DIR"):
        return Path(os.environ["LOWBIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowbit"


def machine_key() -> str:
    feats = ",".join(sorted(k for k, v in hw.cpu_features().items() if v))
    text = f"{hw.cpu_name()}|{feats}|threads={torch.get_num_threads()}|torch={torch.__version__}|lowbit={__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def time_calls(fns: dict[str, Callable[[], object]], *, budget_s: float = 0.3, min_iters: int = 3,
               max_iters: int = 25) -> dict[str, float]:
    """Median seconds per call, candidates interleaved round by round so drift hits all alike."""
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: first calls allocate, pack, fault pages in
            fn()
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        start = time.perf_counter()
        for i in range(max_iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            if i + 1 >= min_iters and time.perf_counter() - start > budget_s:
                break
    return {name: statistics.median(ts) for name, ts in times.items()}


class Tuner:
    """Timings by layer key for this machine, read from and written to the cache file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / CACHE_FILE
        self.machine = machine_key()
        self.entries: dict[str, dict[str, float]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            self.entries = dict(data.get(self.machine, {}))
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or unreadable: measure afresh (the file is rewritten on save)

    def timings(self, key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        if key not in self.entries:
            self.entries[key] = measure()
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        """Merge into the cache file atomically; a failure to write is not an error (just no cache)."""
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            data.setdefault(self.machine, {}).update(self.entries)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, FILE_MODE)  # mkstemp creates it owner-only
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


def best(timings: dict[str, float], allow_float: bool) -> tuple[str, float]:
    """(fastest quantized kernel, or FLOAT when allowed and faster; its speed-up over float)."""
    quant = {k: v for k, v in timings.items() if k != FLOAT}
    name = min(quant, key=quant.get)
    if allow_float and FLOAT in timings and timings[FLOAT] < quant[name]:
        return FLOAT, 1.0
    ref = timings.get(FLOAT)
    return name, (ref / quant[name]) if ref else float("nan")

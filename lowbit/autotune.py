"""Measure kernels on this machine and remember the result.

`backend="auto"` times every kernel that can run a layer, and the float layer itself, once per distinct
(layer kind, recipe, shape). Weight-only linear layers are timed at a few row counts (TUNE_ROWS: one
row of decoding up to a batch of prompts) and get a route of kernels by rows (`row_route`): a GEMV while
reading the weight dominates, a GEMM on the dequantized weight when arithmetic does. Layers quantizing
their activations are timed at the input shape they see. The timings are kept in a JSON file per
machine (CPU model and features, thread count, torch and lowbit versions), so the next quantization of
the same shapes costs nothing. The cache lives in $LOWBIT_CACHE_DIR, else
$XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit; delete the file to measure again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import hw
from .backends import lowbit_cpu
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


def time_calls(fns: dict[str, Callable[[], object]], *, budget_s: float = 0.1, min_iters: int = 2,
               max_iters: int = 15) -> dict[str, float]:
    """Fastest seconds per call, candidates interleaved round by round so drift hits all alike.

    The minimum, not the median: other processes only ever add time to a call (on a loaded machine a
    parallel region can wait milliseconds for a descheduled thread), so the fastest call is the best
    estimate of what the kernel costs, and a few rounds suffice (`budget_s` bounds them: a quantization
    times every distinct layer shape, at several row counts for weight-only layers). Each function is
    called once untimed first: first calls allocate, pack and fault pages in."""
    with torch.inference_mode():
        for fn in fns.values():
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
    return {name: min(ts) for name, ts in times.items()}


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


# Row counts weight-only linears are timed at: decoding (1), small batches (16), a prompt (128), and past
# lowbit_cpu's GEMV range (its GEMV serves up to 256 rows) where every kernel is compute-bound: 512, and 2048
# for a batch of prompts (MiniLM's 384 x 384 layers: at 512 rows the bf16 GEMM was 1.16-1.3x lowbit_cpu's
# float32 path, a margin one timing can blur; at 2048, 1.6-1.8x). A call of any other row count takes the
# kernel of the nearest (on a log scale) of these.
TUNE_ROWS = (1, 16, 128, 512, 2048)
# Row counts past the first are timed only while a float call stays under this many multiply-adds (about
# 10 ms): an LM head of 128k x 2k at 512 rows would take seconds per call. Larger calls take the kernel of
# the largest row count timed (a 2048 x 2048 layer: up to 128 rows, already compute-bound).
TUNE_MAX_MACS = 1 << 30


def tune_rows(n: int, k: int) -> tuple[int, ...]:
    """The row counts a weight-only [n, k] layer is timed at."""
    return tuple(r for i, r in enumerate(TUNE_ROWS) if i == 0 or r * n * k <= TUNE_MAX_MACS)


def time_rows(make_fns: Callable[[int], dict[str, Callable[[], object]]],
              rows: Iterable[int] = TUNE_ROWS) -> dict[str, dict[str, float]]:
    """time_calls at each row count: {str(rows): {name: seconds}} (string keys: the cache is JSON).
    make_fns(rows) gives the functions to time on inputs of that many rows."""
    return {str(r): time_calls(make_fns(r)) for r in rows}


def nearest_rows(rows: int, measured: Iterable[int]) -> int:
    """The measured row count closest to `rows` on a log scale (what a call of `rows` rows is like)."""
    return min(measured, key=lambda m: (abs(math.log(max(rows, 1) / m)), m))


# Kernels within this share of the fastest count as tied (timings on a busy machine vary by more than 5%): a
# tie keeps the kernel of the fewer rows before (a route with fewer switches), else one whose weight form
# the route already holds (no second packed copy), else the one first in the order of preference.
ROUTE_TIE = 0.10
# Except at the largest row count measured, when it is past the GEMV range (256 rows): it stands for every
# larger call, where compute-bound kernels drift further apart (MiniLM's 384-wide int4 layers: the bf16 GEMM
# 1.16x lowbit_cpu's float32 path at 512 rows, about 1.3x at 4,096), so there only a near-exact tie keeps
# the kernel before.
ROUTE_TIE_LAST = 0.02


def gemv_rows() -> int:
    """The most rows lowbit_cpu's GEMV takes (its setting, 256 by default; 256 without the extension)."""
    return lowbit_cpu.gemv_max_m() if lowbit_cpu.available() else 256


def row_route(by_rows: dict[str, dict[str, float]], forms: dict[str, str] | None = None,
              order: Iterable[str] = ()) -> list[tuple[int | None, str]]:
    """The fastest quantized kernel at each measured row count, as a route [(most rows, kernel), ...,
    (None, kernel)]: a switch between two measured counts r1 < r2 is placed at sqrt(r1 * r2) rows.
    `forms` names the prepared weight form of each kernel (kernels sharing one share its memory); ties
    (ROUTE_TIE; ROUTE_TIE_LAST at a last count past the GEMV range) go to the kernel first in `order`, then
    the faster (the cache file does not keep the order)."""
    forms = forms or {}
    rank = {name: i for i, name in enumerate(order)}
    points = sorted((int(r), t) for r, t in by_rows.items())
    gemv = gemv_rows()
    route: list[tuple[int | None, str]] = []
    for i, (r, t) in enumerate(points):
        quant = sorted((rank.get(k, len(rank)), v, k) for k, v in t.items() if k != FLOAT)
        fastest = min(v for _, v, _ in quant)
        tie = ROUTE_TIE_LAST if i == len(points) - 1 and r > gemv else ROUTE_TIE
        tied = [k for _, v, k in quant if v <= fastest * (1 + tie)]  # preferred first
        held = {forms.get(k, k) for _, k in route}
        current = route[-1][1] if route else None
        name = current if current in tied else next((k for k in tied if forms.get(k, k) in held), tied[0])
        if route and route[-1][1] == name:
            route.pop()
        nxt = points[i + 1][0] if i + 1 < len(points) else None
        route.append((None if nxt is None else math.isqrt(r * nxt), name))
    return route


def route_speedups(by_rows: dict[str, dict[str, float]],
                   route: list[tuple[int | None, str]]) -> dict[int, tuple[str, float]]:
    """At each measured row count: the route's kernel there and its speed-up over float (NaN if float was
    not timed)."""
    out = {}
    for r, t in sorted(by_rows.items(), key=lambda kv: int(kv[0])):
        rows = int(r)
        name = next(n for bound, n in route if bound is None or rows <= bound)
        out[rows] = (name, t[FLOAT] / t[name] if FLOAT in t and name in t else float("nan"))
    return out


# Shapes `lowbit info` reports on: a decode step of a 1B-class decoder (memory-bound), encoder-sized
# matmuls (compute-bound) and a ResNet-style 3x3 convolution.
SURVEY = (
    ("linear 2048->8192, 1 row", (1, 2048), 8192,
     (("int8", "lowbit_cpu"), ("int4-g128", "lowbit_cpu"), ("int4-g128", "torch_int4pack"), ("int3-g64", "lowbit_cpu"),
      ("int2-g32", "lowbit_cpu"), ("bf16", "auto"), ("w8a8-dynamic", "onednn"))),
    ("linear 384->1536, 128 rows", (128, 384), 1536,
     (("int8", "lowbit_cpu"), ("int4-g128", "lowbit_cpu"), ("w8a8-dynamic", "onednn"), ("w8a8-static", "onednn"))),
    ("linear 384->1536, 4096 rows", (4096, 384), 1536,
     (("int8", "lowbit_cpu"), ("w8a8-dynamic", "onednn"), ("w8a8-static", "onednn"))),
    ("conv 3x3 64->64, 8x56x56", (8, 64, 56, 56), 64, (("w8a8-static", "onednn"),)),
)


def survey(progress: bool = False) -> list[dict]:
    """Measured speed-up over float of each kernel on a few representative shapes (cached like the rest).

    Each row: shape, recipe, kernel, act (activation dtype the kernel computes with), speedup.
    """
    import copy

    from torch import nn

    from .core.observers import make_observer
    from .modules import QuantLinear
    from .progress import progress_bar
    from .recipes import parse_recipe
    from .w8a8 import W8A8Conv, W8A8Linear

    tuner = Tuner()
    rows = []
    for label, shape, n_out, variants in progress_bar(SURVEY, desc="measure kernels", disable=not progress):
        torch.manual_seed(0)
        conv = len(shape) == 4
        base = (nn.Conv2d(shape[1], n_out, 3, padding=1) if conv else nn.Linear(shape[-1], n_out)).eval()
        x = torch.randn(shape)
        for recipe, kernel in variants:
            cfg = parse_recipe(recipe)
            key = f"survey|{label}|{recipe}|{kernel}"

            def measure(recipe=recipe, kernel=kernel, cfg=cfg, base=base, x=x) -> dict[str, float]:
                # The layer classes directly, not lowbit.quantize: the survey times kernels, not a model.
                try:
                    if cfg.act is None:
                        layer = QuantLinear.from_float(base, cfg, kernel)
                    else:
                        act = None
                        if cfg.act == "static":  # the range of the input the layer is timed on
                            obs = make_observer(cfg.observer)
                            obs.update(x[:1])
                            scale, zero = obs.qparams()
                            act = (float(scale), int(zero))
                        cls = W8A8Conv if isinstance(base, nn.Conv2d) else W8A8Linear
                        layer = cls.from_float(copy.deepcopy(base), cfg, act, kernel)
                except (ValueError, RuntimeError):
                    return {}  # this kernel cannot run the shape here
                return time_calls({"q": lambda: layer(x), FLOAT: lambda: base(x)})

            t = tuner.timings(key, measure)
            if not t:
                continue
            act = "bfloat16" if kernel == "torch_int4pack" or recipe == "bf16" else (
                "uint8" if cfg.act else "float32")
            rows.append({"shape": label, "recipe": recipe, "kernel": kernel, "act": act,
                         "speedup": t[FLOAT] / t["q"]})
    tuner.save()
    return rows

"""Search for a per-layer recipe under a budget: the smallest model that loses at most X on the user's
metric, or the best one that fits in Y MB.

1. lowbit.sensitivity measures, per layer and format, the model's output change and the stored bytes.
2. Treating the changes as additive, choosing one format per layer is a multiple-choice knapsack: dynamic
   programming over the size gives, for every size, the configuration with the least predicted change (the
   whole staircase, not only its convex hull): a front of candidates from the largest to the smallest.
3. The user's `evaluate(model) -> float` is measured on the candidates the budget points at: a binary
   search along the front for `max_drop` (the smallest candidate within the drop), the candidates just
   under the limit for `max_size_mb`. Uniform recipes of each format are measured as reference points.

Size is exact: the bytes of the tensors a checkpoint of the model stores (lowbit.save), predicted from the
per-layer encodings and checked on every model measured.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .recipes import LayerRecipe, parse_recipe
from .sensitivity import DEFAULT_FORMATS, Sensitivity, sensitivity

BUDGET_KEYS = ("max_drop", "max_size_mb", "max_latency_ms")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors lowbit.save writes for `model` (each state-dict entry; shared ones count once
    per name, as the checkpoint stores them)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class Point:
    """One configuration: its per-layer formats, predicted size and output change, and (once measured)
    the metric and the real size."""

    label: str
    formats: dict[str, str]  # layer -> format
    predicted_bytes: int
    predicted_effect: float
    kind: str = "candidate"  # "candidate", "uniform", "float"
    metric: float | None = None
    bytes: int | None = None
    seconds: float | None = None
    predicted_latency_ms: float | None = None  # from the kernel timings per layer shape (lowbit.autotune)
    latency_ms: float | None = None  # measured on the model, one calibration batch

    @property
    def size_mb(self) -> float:
        return (self.bytes if self.bytes is not None else self.predicted_bytes) / 1e6

    def recipe(self) -> LayerRecipe:
        """The per-layer recipe: the most common format for every layer ("*"), the others by name."""
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        common = max(counts, key=counts.get)
        rules = [(name, parse_recipe(f)) for name, f in self.formats.items() if f != common]
        return LayerRecipe(tuple(rules) + (("*", parse_recipe(common)),))


@dataclass
class SearchResult:
    """lowbit.search's result: the chosen model and recipe, and every configuration measured."""

    model: nn.Module
    chosen: Point
    baseline: float  # the float model's metric
    budget: dict
    points: list[Point] = field(default_factory=list)  # every configuration measured, in order
    front: list[Point] = field(default_factory=list)  # the predicted front (measured or not)
    higher_is_better: bool = True
    sensitivity: Sensitivity | None = None
    seconds: float = 0.0

    @property
    def recipe(self) -> LayerRecipe:
        return self.chosen.recipe()

    def drop(self, p: Point) -> float:
        return (self.baseline - p.metric) if self.higher_is_better else (p.metric - self.baseline)

    def pareto(self, by: str = "size") -> list[Point]:
        """The measured points no other measured point beats on both size (or "latency") and metric."""
        pts = [p for p in self.points if p.metric is not None]
        cost = (lambda p: p.bytes) if by == "size" else (lambda p: p.latency_ms)
        out = []
        for p in pts:
            if not any(q is not p and cost(q) <= cost(p) and self.drop(q) <= self.drop(p)
                       and (cost(q) < cost(p) or self.drop(q) < self.drop(p)) for q in pts):
                out.append(p)
        return sorted(out, key=cost)

    def to_markdown(self) -> str:
        front = {id(p) for p in self.pareto()}
        lines = [("| configuration | kind | size MB | latency ms (predicted) | metric | drop | predicted change | "
                  "Pareto (size) | chosen |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in sorted(self.points, key=lambda p: p.bytes):
            lat = "-" if p.latency_ms is None else f"{p.latency_ms:.1f}"
            if p.predicted_latency_ms is not None:
                lat += f" ({p.predicted_latency_ms:.1f})"
            lines.append(f"| {p.label} | {p.kind} | {p.size_mb:.2f} | {lat} | {p.metric:.3f} | {self.drop(p):+.3f} | "
                         f"{p.predicted_effect:.4g} | {'yes' if id(p) in front else ''} | "
                         f"{'**yes**' if p is self.chosen else ''} |")
        return "\n".join(lines)


def _front(sens: Sensitivity, formats: Sequence[str], cost: dict | None = None,
           latency: dict | None = None, resolution: int = 16384, keep: int = 256,
           limit: float | None = None) -> list[Point]:
    """The configurations with the least predicted change for their cost, from largest cost to smallest. The
    cost is the stored bytes unless `cost` gives one per (layer, format) (latency). Treating the changes as
    additive, this is a multiple-choice knapsack, solved by dynamic programming over the cost cut into
    `resolution` steps (each layer's cost rounded up, so a configuration never costs more than its step; exact
    for sizes when the range is at most `resolution` bytes): every configuration on the staircase, not only
    the corners of its convex hull, which can leave a budget's last tenth unspent. Consecutive points closer
    than 1/`keep` of the cost range are thinned out, except the best one within `limit` (a cost), which is
    always there."""
    import numpy as np

    table = {(r["part"], r["format"]): r for r in sens.layer_rows()}
    layers = sens.layers
    cost = cost if cost is not None else {k: r["bytes"] for k, r in table.items()}
    # Cost above each layer's cheapest format, so every step is >= 0.
    base = {n: min(cost[(n, f)] for f in formats) for n in layers}
    extra = {(n, f): cost[(n, f)] - base[n] for n in layers for f in formats}
    span = sum(max(extra[(n, f)] for f in formats) for n in layers)
    if all(float(v).is_integer() for v in extra.values()):  # bytes: whole steps, exact when the range is small
        unit = max(1, -(-int(span) // resolution))
    else:
        unit = span / resolution if span > 0 else 1.0
    steps = int(np.ceil(span / unit)) + len(layers)  # rounding up adds at most one step per layer
    best = np.zeros(steps + 1)  # least predicted change of the layers so far within c steps
    choice = np.zeros((len(layers), steps + 1), dtype=np.int16)
    width = {}
    for i, n in enumerate(layers):
        # Cheapest first, so among equal changes the smaller cost wins (strict < below).
        order = sorted(range(len(formats)), key=lambda j: (extra[(n, formats[j])], table[(n, formats[j])]["bytes"]))
        new = np.full(steps + 1, np.inf)
        for j in order:
            w = int(np.ceil(extra[(n, formats[j])] / unit - 1e-9))
            width[(i, j)] = w
            cand = np.full(steps + 1, np.inf)
            cand[w:] = best[:steps + 1 - w] + table[(n, formats[j])]["effect"]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    at_limit = None
    if limit is not None:
        at_limit = int(np.floor((limit - sum(base.values())) / unit + 1e-9))
    seen, points = set(), []
    previous, last_kept = np.inf, np.inf
    for c in range(steps, -1, -1):  # every step where the least change rises is a new configuration
        if c not in (at_limit, 0) and points and (not best[c] > previous or last_kept - c < steps / keep):
            continue
        previous, last_kept = best[c], c
        pick, left = {}, c
        for i in range(len(layers) - 1, -1, -1):
            j = int(choice[i, left])
            pick[layers[i]] = formats[j]
            left -= width[(i, j)]
        key = tuple(pick[n] for n in layers)
        if key in seen:
            continue
        seen.add(key)
        points.append(_point(sens, {n: pick[n] for n in layers}, f"front {len(points)}", latency=latency))
    if latency is not None and cost is latency["delta"]:
        points.sort(key=lambda p: -p.predicted_latency_ms)
    else:
        points.sort(key=lambda p: -p.predicted_bytes)
    return points


def _point(sens: Sensitivity, choice: dict[str, str], label: str, kind: str = "candidate",
           latency: dict | None = None) -> Point:
    nbytes = sens.other_bytes + sum(sens.get(n, f)["bytes"] for n, f in choice.items())
    effect = sum(sens.get(n, f)["effect"] for n, f in choice.items())
    p = Point(label, dict(choice), nbytes, effect, kind)
    if latency is not None:
        # Kernel timings and the model's are taken apart; where they disagree the sum can fall below what the
        # model's other work takes: a model is never predicted to take less than a tenth of the float one.
        total = latency["float"] + sum(latency["delta"][(n, f)] for n, f in choice.items())
        p.predicted_latency_ms = 1e3 * max(total, 0.1 * latency["float"])
    return p


def _key(formats: dict[str, str]) -> tuple:
    """A configuration as a hashable value (its (layer, format) items, sorted)."""
    return tuple(sorted(formats.items()))


def _swaps(sens: Sensitivity, formats: Sequence[str], point: Point, limit: float, skip: set = frozenset(),
           count: int = 1, latency: dict | None = None) -> list[Point]:
    """The configurations one layer up and one layer down from `point` (a format of more bytes and less
    predicted change for one layer, one of fewer bytes for another) that stay within the budget, least
    predicted change first. The front is built on the predicted changes, which add up only roughly; near
    the budget the measured metric decides between such neighbours. The budget is `limit` bytes, or with
    `latency` (layer_latencies, plus "float") `limit` seconds of predicted latency. Configurations in `skip`
    (as `_key` gives them) are left out; at most `count` are returned."""
    table = {(r["part"], r["format"]): r for r in sens.layer_rows()}
    now = point.formats
    if latency is None:
        cost = {key: r["bytes"] for key, r in table.items()}
        room = limit - sens.other_bytes
    else:
        cost = latency["delta"]
        room = limit - latency["float"]
    room -= sum(cost[(n, now[n])] for n in sens.layers)
    moves = [(n, f, table[(n, f)]["bytes"] - table[(n, now[n])]["bytes"],
              table[(n, f)]["effect"] - table[(n, now[n])]["effect"], cost[(n, f)] - cost[(n, now[n])])
             for n in sens.layers for f in formats if f != now[n]]
    ups = [m for m in moves if m[2] > 0 and m[3] < 0]  # more bytes for less change
    downs = [m for m in moves if m[2] < 0]
    pairs = []
    for a, fa, _, ea, ca in ups:
        for b, fb, _, eb, cb in downs:
            if b != a and ca + cb <= room:
                pairs.append((ea + eb, a, fa, b, fb))
    pairs.sort()
    out = []
    for _, a, fa, b, fb in pairs:
        choice = {**now, a: fa, b: fb}
        if _key(choice) not in skip:
            out.append(_point(sens, choice, f"{a} {fa}, {b} {fb}", latency=latency))
            if len(out) == count:
                break
    return out


def time_model(model: nn.Module, batch, iters: int = 7) -> float:
    """Median seconds of `model` on one calibration batch (after a warm-up call)."""
    import statistics

    from .sequential import call_model, inference

    with inference(model):
        call_model(model, batch)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            call_model(model, batch)
            times.append(time.perf_counter() - t)
    return statistics.median(times) if times else float("nan")


def layer_latencies(model: nn.Module, sens: Sensitivity, formats: Sequence[str], rows: int) -> dict:
    """Predicted latency: {"float": the float model's seconds on one batch (measured), "delta": {(layer,
    format): seconds the layer's kernel takes beyond its float matmul}} for calls of `rows` rows, read off
    the kernel timings per layer shape that lowbit.quantize chooses kernels by (lowbit.autotune; cached on
    disk, so layers of one shape are timed once). Embedding lookups count as unchanged."""
    from . import autotune, layers
    from .modules import QuantLinear
    from .quantize import route_for

    tuner = autotune.Tuner()
    delta: dict[tuple[str, str], float] = {}
    for name in sens.layers:
        mod = layers.as_torch(model.get_submodule(name))
        for f in formats:
            if not isinstance(mod, nn.Linear):
                delta[(name, f)] = 0.0
                continue
            new = QuantLinear.from_float(mod, parse_recipe(f), "auto")
            by_rows, route = route_for(tuner, mod, new)
            near = autotune.nearest_rows(rows, [int(r) for r in by_rows])
            t = by_rows[str(near)]
            kernel = next(k for bound, k in route if bound is None or near <= bound)
            delta[(name, f)] = (t[kernel] - t[autotune.FLOAT]) * rows / near
    tuner.save()
    return {"delta": delta}


def search(model: nn.Module, calibration: Iterable, evaluate: Callable[[nn.Module], float], budget: dict, *,
           formats: Sequence[str] = DEFAULT_FORMATS, higher_is_better: bool = True, uniform: bool = True,
           samples: int = 32, max_evals: int = 12, sens: Sensitivity | None = None,
           progress: bool = False) -> SearchResult:
    """A per-layer recipe for `model` within `budget` ({"max_drop": x}: the smallest model whose metric is
    at most x below the float model's; {"max_size_mb": y}: the best metric at most y MB; {"max_latency_ms":
    z}: the best metric running one calibration batch in at most z ms, predicted from the kernel timings
    per layer shape and measured on the candidates), by the metric
    `evaluate(model) -> float` (higher is better unless `higher_is_better=False`, e.g. perplexity). The
    candidates come from lowbit.sensitivity (over `formats`, on `samples` calibration samples; or pass
    `sens`); at most `max_evals` of them are measured, plus the float model and, with `uniform`, each format
    for every layer as reference points. Under `max_size_mb` and `max_latency_ms`, the evaluations the front
    leaves go to a local search from the best configuration measured (one layer up a format, another down,
    within the budget).
    `calibration` also feeds formats that fit to data (-gptq).
    Returns a SearchResult whose `.model` is the chosen model, quantized (the input model is not changed)."""
    t0 = time.perf_counter()
    unknown = set(budget) - set(BUDGET_KEYS)
    if len(budget) != 1 or unknown:
        raise ValueError(f"budget takes exactly one of {', '.join(BUDGET_KEYS)}, got {sorted(budget)}")
    from .quantize import quantize

    calibration = list(calibration)
    if sens is None:
        sens = sensitivity(model, calibration, formats, samples=samples, progress=progress)
    formats = list(formats)
    sign = 1.0 if higher_is_better else -1.0
    batch = calibration[0]
    rows = _tokens(batch)
    latency = None
    if "max_latency_ms" in budget:
        latency = layer_latencies(model, sens, formats, rows)
        latency["float"] = time_model(model, batch)

    def measure(p: Point) -> Point:
        if p.metric is not None:
            return p
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = quantize(copy.deepcopy(model), p.recipe(), calibration=calibration)
        p.metric = float(evaluate(m))
        p.bytes = stored_bytes(m)
        p.latency_ms = 1e3 * time_model(m, batch)
        p.seconds = time.perf_counter() - t
        p._model = m  # kept until the search ends (the chosen one is returned)
        points.append(p)
        return p

    points: list[Point] = []
    base = Point("float", {}, sens.other_bytes + sum(sens.float_bytes.values()), 0.0, "float")
    base.metric, base.bytes = float(evaluate(model)), stored_bytes(model)
    base.latency_ms = 1e3 * time_model(model, batch)
    if latency is not None:
        base.predicted_latency_ms = 1e3 * latency["float"]
    points.append(base)
    result = SearchResult(model=model, chosen=base, baseline=base.metric, budget=dict(budget),
                          higher_is_better=higher_is_better, sensitivity=sens)

    def drop(p: Point) -> float:
        return sign * (base.metric - p.metric)

    if uniform:
        for f in formats:
            measure(_point(sens, dict.fromkeys(sens.layers, f), f, "uniform", latency=latency))
    if "max_size_mb" in budget:
        limit_cost = float(budget["max_size_mb"]) * 1e6 - sens.other_bytes
    elif latency is not None:
        limit_cost = float(budget["max_latency_ms"]) / 1e3 - latency["float"]
    else:
        limit_cost = None
    front = _front(sens, formats, latency["delta"] if latency else None, latency, limit=limit_cost)
    result.front = front
    evals = 0

    def local_search(best_fit: Callable[[], Point | None], limit: float, latency: dict | None, evals: int) -> int:
        # The evaluations left go to a local search from the best configuration measured within the budget
        # (a uniform reference point too: the user's metric, not the prediction, ranks them): swap one layer
        # up and one down, the neighbour with the least predicted change first, and move on to whichever
        # measures best. Returns the evaluations spent so far.
        tried = {_key(p.formats) for p in points if p.kind != "float"}
        while evals < max_evals:
            start = best_fit()
            found = _swaps(sens, formats, start, limit, skip=tried, latency=latency) if start else []
            if not found:
                break
            nxt = found[0]
            tried.add(_key(nxt.formats))
            nxt.label = f"swap {evals}: {nxt.label}"
            measure(nxt)
            evals += 1
        return evals
    chosen: Point | None = None
    if "max_drop" in budget:
        limit = float(budget["max_drop"])
        # Binary search along the front (largest first): the drop grows as the size shrinks.
        lo, hi = 0, len(front) - 1  # front[lo] is the largest; find the last index within the drop
        best = None
        while lo <= hi and evals < max_evals:
            mid = (lo + hi) // 2
            p = measure(front[mid])
            evals += 1
            if drop(p) <= limit:
                best = p if best is None or p.bytes < best.bytes else best
                lo = mid + 1
            else:
                hi = mid - 1
        # The neighbours just past the boundary, while evaluations remain: the front's order is predicted.
        for p in front[lo:lo + 2]:
            if evals >= max_evals:
                break
            if p.metric is None:
                measure(p)
                evals += 1
        within = [p for p in points if p.kind != "float" and drop(p) <= limit]
        chosen = min(within, key=lambda p: (p.bytes, drop(p))) if within else None
        if chosen is None:
            chosen = base
            warnings.warn(f"no quantized configuration measured stays within a drop of {limit} "
                          f"({evals} measured); the float model is returned", stacklevel=2)
    elif "max_latency_ms" in budget:
        limit = float(budget["max_latency_ms"])
        under = [p for p in front if p.predicted_latency_ms <= limit]
        if not under:
            raise ValueError(f"no configuration of {', '.join(formats)} is predicted to run within {limit} ms "
                             f"(the fastest: {min(p.predicted_latency_ms for p in front):.1f} ms, float "
                             f"{base.latency_ms:.1f} ms, on a batch of {rows} tokens)")
        for p in under[:max(1, min(3, max_evals))]:
            measure(p)
            evals += 1

        def best_fit() -> Point | None:
            fits = [p for p in points if p.kind != "float" and p.latency_ms <= limit]
            return max(fits, key=lambda p: (-drop(p), -p.latency_ms)) if fits else None

        evals = local_search(best_fit, limit / 1e3, latency, evals)
        chosen = best_fit()
        if chosen is None:  # measured slower than predicted: the fastest measured, said so
            chosen = min((p for p in points if p.kind != "float"), key=lambda p: p.latency_ms)
            warnings.warn(f"no configuration measured within {limit} ms (predicted within it: "
                          f"{len(under)}); the fastest measured is returned", stacklevel=2)
    else:
        limit_bytes = float(budget["max_size_mb"]) * 1e6
        under = [p for p in front if p.predicted_bytes <= limit_bytes]
        if not under:
            raise ValueError(f"no configuration of {', '.join(formats)} fits in {budget['max_size_mb']} MB "
                             f"(the smallest is {front[-1].predicted_bytes / 1e6:.2f} MB)")
        for p in under[:max(1, min(3, max_evals))]:
            measure(p)
            evals += 1

        def best_fit() -> Point | None:
            fits = [p for p in points if p.kind != "float" and p.bytes <= limit_bytes]
            return max(fits, key=lambda p: (-drop(p), -p.bytes)) if fits else None

        evals = local_search(best_fit, limit_bytes, None, evals)
        chosen = best_fit()
    result.chosen = chosen
    result.model = getattr(chosen, "_model", model)
    for p in points:
        p.__dict__.pop("_model", None)
    result.points = points
    result.seconds = time.perf_counter() - t0
    return result


def _tokens(batch) -> int:
    """Rows a linear sees in one call of the model on `batch`: the tokens of its first tensor."""
    import torch

    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for t in items:
        if isinstance(t, torch.Tensor):
            return int(t.shape[0] * (t.shape[1] if t.dim() >= 2 else 1))
    return 1


def pareto_plot(result: SearchResult, path, metric_name: str = "metric") -> None:
    """Size against metric of every configuration measured, the Pareto front drawn, uniform recipes and the
    chosen one labelled (PNG; needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    pts = [p for p in result.points if p.metric is not None]
    for ax, (x, xlabel, front) in zip(axes, (
            (lambda p: p.size_mb, "stored size (MB)", result.pareto()),
            (lambda p: p.latency_ms, "latency on one calibration batch (ms)", result.pareto("latency")))):
        cand = [p for p in pts if p.kind == "candidate"]
        uni = [p for p in pts if p.kind == "uniform"]
        ax.scatter([x(p) for p in cand], [p.metric for p in cand], s=30, c="tab:blue", label="searched")
        ax.scatter([x(p) for p in uni], [p.metric for p in uni], s=40, c="tab:gray", marker="s", label="uniform")
        for p in uni:
            ax.annotate(p.label, (x(p), p.metric), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.plot([x(p) for p in front], [p.metric for p in front], c="tab:orange", lw=1.5, label="Pareto front")
        c = result.chosen
        ax.scatter([x(c)], [c.metric], s=160, facecolors="none", edgecolors="tab:red", lw=2, label="chosen")
        ax.axhline(result.baseline, c="k", lw=0.8, ls="--", label="float")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(result: SearchResult, directory, metric_name: str = "metric", title: str = "lowbit search") -> Path:
    """search.md (the table of every configuration measured, the chosen recipe), search.html and, with
    matplotlib, pareto.png in `directory`; each file written whole (temporary file, then renamed)."""
    import html
    import json
    import os

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plot = ""
    try:
        pareto_plot(result, out / ".pareto.png.tmp", metric_name)
        os.replace(out / ".pareto.png.tmp", out / "pareto.png")
        plot = "![size against metric](pareto.png)"
    except ImportError:
        plot = "(no plot: matplotlib is not installed)"
    c = result.chosen
    budget = ", ".join(f"{k} = {v}" for k, v in result.budget.items())
    summary = (f"Budget: {budget}. Float model: {metric_name} {result.baseline:.3f}, "
               f"{result.points[0].size_mb:.2f} MB. Chosen: {c.label}, {c.size_mb:.2f} MB "
               f"({c.size_mb / result.points[0].size_mb:.1%} of float), {metric_name} {c.metric:.3f} "
               f"(drop {result.drop(c):+.3f}). {len(result.points)} configurations measured in "
               f"{result.seconds:.0f} s (sensitivity {result.sensitivity.seconds:.0f} s).")
    recipe = json.dumps({p: (cfg.name if cfg else "float") for p, cfg in c.recipe().rules}, indent=1) \
        if c.formats else "(float)"
    md = (f"# {title}\n\n{summary}\n\nSizes are the bytes of the tensors a checkpoint stores. The predicted "
          "change is the sum of the per-layer output changes lowbit.sensitivity measured.\n\n"
          f"{result.to_markdown()}\n\n{plot}\n\nChosen per-layer recipe:\n\n```json\n{recipe}\n```\n")
    table = result.to_markdown().splitlines()
    head = "".join(f"<th>{html.escape(x.strip())}</th>" for x in table[0].strip("|").split("|"))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(x.strip().strip('*'))}</td>"
                                    for x in line.strip("|").split("|")) + "</tr>" for line in table[2:])
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p><table><tr>{head}</tr>{rows}</table>"
            + ("<p><img src='pareto.png'></p>" if plot.startswith("!") else "")
            + f"<h2>Chosen per-layer recipe</h2><pre>{html.escape(recipe)}</pre>")
    for name, text in (("search.md", md), ("search.html", page)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out


__all__ = ["Point", "SearchResult", "pareto_plot", "search", "stored_bytes", "write_report"]

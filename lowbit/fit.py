"""Methods that fit a model to calibration data, one stage (block) at a time: GPTQ, AWQ, SmoothQuant.

Each driver takes a stage (lowbit.sequential.Stage: a block and its inputs) and the linears inside it,
collects the statistics its method needs in one pass per group of linears that share an input, and
either replaces those linears with quantized ones (GPTQ, AWQ) or rescales the float model in place
(SmoothQuant). lowbit.quantize runs them; the math is in lowbit.algorithms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .algorithms import awq
from .recipes import QuantConfig
from .sequential import Stage, fold_scale, input_rows, main_output

Build = Callable[..., nn.Module]  # build(name, float_linear, **encode_options) -> quantized module
Replace = Callable[[str, nn.Module], None]


@dataclass
class InputStats:
    rows: int = 0  # real tokens (padded positions are left out: lowbit.sequential.input_rows)
    hessian: torch.Tensor | None = None  # sum of x^T x (over the rows not held out)
    held_out: torch.Tensor | None = None  # sum of x^T x over the held-out rows (every `holdout`-th)
    held_rows: int = 0
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    sample: torch.Tensor | None = None  # a seeded random subset of the rows

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def input_stats(stage: Stage, layer: nn.Module, k: int, *, hessian: bool = False, sample_rows: int = 0,
                seed: int = 0, holdout: int = 0) -> InputStats:
    """Statistics of everything `layer` (input size k) receives while the stage runs over its calls.
    holdout > 1: every holdout-th row goes to a second Hessian (`held_out`) instead of `hessian`."""
    st = InputStats(abs_sum=torch.zeros(k), abs_max=torch.zeros(k))
    if hessian:
        st.hessian = torch.zeros(k, k)
        if holdout > 1:
            st.held_out = torch.zeros(k, k)
    per_call = -(-sample_rows // max(len(stage.calls), 1))
    gen = torch.Generator().manual_seed(seed)
    samples = []

    def hook(mod, args):
        x = input_rows(args[0].detach(), k).float()
        first = st.rows
        st.rows += x.shape[0]
        st.abs_sum += x.abs().sum(0)
        torch.maximum(st.abs_max, x.abs().amax(0), out=st.abs_max)
        if st.held_out is not None:
            held = (torch.arange(first, st.rows) % holdout) == holdout - 1
            xh = x[held]
            st.held_rows += xh.shape[0]
            st.held_out.addmm_(xh.T, xh)
            x = x[~held]
        if hessian:
            st.hessian.addmm_(x.T, x)
        if per_call:
            pick = torch.randperm(x.shape[0], generator=gen)[:per_call]
            samples.append(x[pick])

    stage.run([(layer, hook)])
    if st.rows == 0:
        raise ValueError("the layer received no input during calibration")
    if samples:
        st.sample = torch.cat(samples)[:sample_rows]
    return st


def fold_group(stage: Stage, lin: list[nn.Module], s: torch.Tensor, producer: nn.Module | None,
               earlier: list[nn.Module]) -> bool:
    """Fold the group's input scale into the module that produced its input, or else into an earlier linear
    of the stage whose output reaches the group through linear ops only (v -> o, up -> down); the latest
    such linear is tried first. Every fold is checked on the stage's output (lowbit.sequential.fold_scale)."""
    if producer is not None and fold_scale(stage, producer, lin, s):
        return True
    return any(m.out_features == s.numel() and fold_scale(stage, m, lin, s) for m in reversed(earlier))


# GPTQ fits each layer to a Hessian estimated from the calibration tokens that reach it. With few tokens
# for the layer's width the estimate is noisy and GPTQ fits the noise: on all-MiniLM-L6-v2 with 128
# sentences (~1,500 tokens for layers 384 and 1,536 wide) it scored below plain rounding at 3 and 2 bits.
# Below THIN_TOKENS_PER_INPUT tokens per input, every HOLDOUT-th token is held out, and GPTQ on the Hessian
# shrunk toward its diagonal by each of SHRINK (the diagonal alone being plain rounding, also a candidate)
# is scored by its output error on the held-out tokens; the best is refitted on all tokens.
THIN_TOKENS_PER_INPUT = 32
HOLDOUT = 4
SHRINK = (0.0, 0.1, 0.3, 0.6)


def _shrunk(h: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return h
    out = h * (1.0 - alpha)
    out.diagonal().add_(h.diagonal(), alpha=alpha)
    return out


def _held_out_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Output error of weight q against w on inputs whose X^T X is h: trace((w - q) h (w - q)^T)."""
    d = w.float() - q.float()
    return float(((d @ h) * d).sum())


def gptq_stage(stage: Stage, layers: dict[str, nn.Linear], build: Build, replace: Replace) -> dict[str, dict]:
    """GPTQ each group on the Hessian of its inputs, group after group: later groups see the inputs the
    quantized earlier ones give them. With thin calibration (see THIN_TOKENS_PER_INPUT), the Hessian's
    shrinkage (or plain rounding: `build(..., method="rtn")`) is chosen per layer on held-out tokens.
    Returns, per layer, {"tokens", "inputs", "shrink"}: shrink None for plain GPTQ (enough tokens), a
    fraction, or "rtn"; with the held-out error of each candidate ("held_out")."""
    groups, _ = stage.groups(layers)
    notes: dict[str, dict] = {}
    for group in groups:
        first = layers[group[0]]
        k = first.in_features
        st = input_stats(stage, first, k, hessian=True, holdout=HOLDOUT)
        if st.rows < 2:
            raise ValueError(f"layer {group[0]!r}: {st.rows} calibration token(s) reached it")
        h_all = (st.hessian + st.held_out).div_(st.rows)
        thin = st.rows < THIN_TOKENS_PER_INPUT * k and st.held_rows > 0 and st.rows > st.held_rows
        h_fit = st.hessian.div_(st.rows - st.held_rows) if thin else None
        h_ho = st.held_out.div_(max(st.held_rows, 1)) if thin else None
        del st.hessian, st.held_out
        for name in group:
            mod = layers[name]
            note: dict = {"tokens": st.rows, "inputs": k, "shrink": None}
            if thin:
                w = mod.weight.detach()
                scores = {"rtn": _held_out_error(w, build(name, mod, method="rtn").weight, h_ho)}
                for alpha in SHRINK:
                    scores[alpha] = _held_out_error(w, build(name, mod, hessian=_shrunk(h_fit, alpha)).weight, h_ho)
                best = min(scores, key=scores.get)
                note.update(shrink=best, held_out={str(a): round(e, 6) for a, e in scores.items()})
                if best == "rtn":
                    replace(name, build(name, mod, method="rtn"))
                else:
                    replace(name, build(name, mod, hessian=_shrunk(h_all, best)))
            else:
                replace(name, build(name, mod, hessian=h_all))
            notes[name] = note
        del h_all, h_fit, h_ho
    return notes


def awq_stage(stage: Stage, layers: dict[str, nn.Linear], config_for: Callable[[str], QuantConfig], build: Build,
              replace: Replace) -> dict[str, str]:
    """AWQ: search each group's input-channel scale on the float stage (for the format of the group's first
    layer, `config_for(name)`) and fold it into the op before when that is exact; then search each layer's
    clipping in its own format, and quantize. Returns, per layer, where its scale went ("folded",
    "input_scale", or at 2 bits "unscaled": see lowbit.algorithms.awq)."""
    groups, producers = stage.groups(layers)
    plan, earlier = [], []
    calls = _calls_for_rows(stage, awq.SCALE_ROWS)
    for group in groups:
        lin = [layers[n] for n in group]
        k = lin[0].in_features
        config = config_for(group[0])
        low = config.bits <= awq.BLOCK_LOSS_BITS  # see lowbit.algorithms.awq
        st = input_stats(stage, lin[0], k, sample_rows=awq.SCALE_ROWS)
        if low:
            loss = awq.block_loss(lambda: [main_output(o) for o in stage.run(limit=calls)], lin, config.bits,
                                  config.group_size or k, config.symmetric)
        else:
            loss = awq.output_loss([m.weight.detach() for m in lin], st.sample, config.bits, config.group_size or k,
                                   config.symmetric)
        s, _ = awq.search_scale(loss, st.abs_mean)
        folded = fold_group(stage, lin, s, producers.get(group[0]), earlier)
        if low and not folded:
            s = torch.ones_like(s)
        plan.append((group, s, folded, st.sample[:awq.SCALE_ROWS if low else awq.CLIP_ROWS] / s, low))
        earlier.extend(lin)
    where = {}
    # Quantize only now: a later group's scale may have been folded into an earlier group's layer (v -> o).
    for group, s, folded, xs, low in plan:
        for name in group:
            m = layers[name]
            w = m.weight.detach().float() if folded else m.weight.detach().float() * s
            c = config_for(name)
            w = awq.search_clip(w, xs, c.bits, c.group_size or m.in_features, c.symmetric)
            unscaled = low and not folded
            replace(name, build(name, m, weight=w, input_scale=None if folded or unscaled else 1.0 / s))
            where[name] = "folded" if folded else ("unscaled" if unscaled else "input_scale")
    return where


def _calls_for_rows(stage: Stage, rows: int) -> int:
    """How many of the stage's calls hold about `rows` token rows (at least one)."""
    total = 0
    for i, (args, kwargs) in enumerate(stage.calls):
        h = args[0] if args else kwargs.get("hidden_states")
        total += h.numel() // h.shape[-1] if isinstance(h, torch.Tensor) and h.dim() else 1
        if total >= rows:
            return i + 1
    return len(stage.calls)


def smooth_stage(stage: Stage, layers: dict[str, nn.Linear], alpha: float) -> list[str]:
    """SmoothQuant: for each group, divide the input channels by s = max|x|^alpha / max|w|^(1 - alpha) and
    multiply the weights by s, where the division can be folded into the op before (exact in float, and
    free at run time; see fold_group). Groups with nothing to fold into are left as they are. Returns the
    names of the layers smoothed."""
    groups, producers = stage.groups(layers)
    done, earlier = [], []
    for group in groups:
        lin = [layers[n] for n in group]
        st = input_stats(stage, lin[0], lin[0].in_features)
        w_max = torch.stack([m.weight.detach().abs().amax(0) for m in lin]).amax(0).float()
        s = (st.abs_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-5, 1e5)
        s = torch.where(st.abs_max > 0, s, torch.ones_like(s))
        if fold_group(stage, lin, s, producers.get(group[0]), earlier):
            done.extend(group)
        earlier.extend(lin)
    return done

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
from .sequential import Stage, fold_scale

Build = Callable[..., nn.Module]  # build(name, float_linear, **encode_options) -> quantized module
Replace = Callable[[str, nn.Module], None]


@dataclass
class InputStats:
    rows: int = 0
    hessian: torch.Tensor | None = None  # sum of x^T x
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    sample: torch.Tensor | None = None  # a seeded random subset of the rows

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def input_stats(stage: Stage, layer: nn.Module, k: int, *, hessian: bool = False, sample_rows: int = 0,
                seed: int = 0) -> InputStats:
    """Statistics of everything `layer` (input size k) receives while the stage runs over its calls."""
    st = InputStats(abs_sum=torch.zeros(k), abs_max=torch.zeros(k))
    if hessian:
        st.hessian = torch.zeros(k, k)
    per_call = -(-sample_rows // max(len(stage.calls), 1))
    gen = torch.Generator().manual_seed(seed)
    samples = []

    def hook(mod, args):
        x = args[0].detach().reshape(-1, k).float()
        st.rows += x.shape[0]
        st.abs_sum += x.abs().sum(0)
        torch.maximum(st.abs_max, x.abs().amax(0), out=st.abs_max)
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


def gptq_stage(stage: Stage, layers: dict[str, nn.Linear], build: Build, replace: Replace) -> None:
    """GPTQ each group on the Hessian of its inputs, group after group: later groups see the inputs the
    quantized earlier ones give them."""
    groups, _ = stage.groups(layers)
    for group in groups:
        first = layers[group[0]]
        st = input_stats(stage, first, first.in_features, hessian=True)
        h = st.hessian.div_(st.rows)
        del st
        for name in group:
            replace(name, build(name, layers[name], hessian=h))


def awq_stage(stage: Stage, layers: dict[str, nn.Linear], config_for: Callable[[str], QuantConfig], build: Build,
              replace: Replace) -> dict[str, str]:
    """AWQ: search each group's input-channel scale on the float stage (for the format of the group's first
    layer, `config_for(name)`) and fold it into the op before when that is exact; then search each layer's
    clipping in its own format, and quantize. Returns, per layer, where its scale went ("folded" or
    "input_scale")."""
    groups, producers = stage.groups(layers)
    plan, earlier = [], []
    for group in groups:
        lin = [layers[n] for n in group]
        k = lin[0].in_features
        config = config_for(group[0])
        st = input_stats(stage, lin[0], k, sample_rows=awq.SCALE_ROWS)
        loss = awq.output_loss([m.weight.detach() for m in lin], st.sample, config.bits, config.group_size or k,
                               config.symmetric)
        s, _ = awq.search_scale(loss, st.abs_mean)
        folded = fold_group(stage, lin, s, producers.get(group[0]), earlier)
        plan.append((group, s, folded, st.sample[:awq.CLIP_ROWS] / s))
        earlier.extend(lin)
    where = {}
    # Quantize only now: a later group's scale may have been folded into an earlier group's layer (v -> o).
    for group, s, folded, xs in plan:
        for name in group:
            m = layers[name]
            w = m.weight.detach().float() if folded else m.weight.detach().float() * s
            c = config_for(name)
            w = awq.search_clip(w, xs, c.bits, c.group_size or m.in_features, c.symmetric)
            replace(name, build(name, m, weight=w, input_scale=None if folded else 1.0 / s))
            where[name] = "folded" if folded else "input_scale"
    return where


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

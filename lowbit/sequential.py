"""Running calibration data through a model, and sequential (block-at-a-time) fitting.

Methods that fit weights to the layers' inputs (GPTQ, AWQ) want each layer's inputs as the quantized
model will produce them: through the layers already quantized. Running the whole model once per layer
does that but costs a model pass per layer. Instead, the model's repeated blocks (the largest
nn.ModuleList of same-typed modules: transformer layers) are processed one at a time: the inputs of
block 0 are captured once, each block is fitted on its inputs, and its quantized outputs become the
next block's inputs. Inside a block, linears that read the same input tensor (q, k and v) form a group;
groups are fitted in the order the block calls them. Layers outside the blocks (a classifier head)
are fitted last, with the whole model as their stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .progress import progress_bar


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once it has what it came for."""


# ---------------------------------------------------------------------------------------------------
# Padded positions: calibration statistics leave them out

# The token mask ([batch, seq] bool, True = a real token) of the calibration call running now, or None.
_current_mask: torch.Tensor | None = None


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real-token positions of a calibration batch: its 2-D `attention_mask` (a dict item), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point():
        return mask != 0
    return None


@contextlib.contextmanager
def masking(mask: torch.Tensor | None) -> Iterator[None]:
    """Calls inside see `mask` as the running call's token mask (input_rows reads it)."""
    global _current_mask
    before, _current_mask = _current_mask, mask
    try:
        yield
    finally:
        _current_mask = before


def real_tokens(x: torch.Tensor) -> torch.Tensor:
    """A layer's input without the padded positions of the running calibration call ([tokens, features]):
    when its leading dimensions are the call's [batch, seq] and the batch carried an attention mask.
    Inputs of other shapes (a pooler's [batch, k], a convolution's) come back as they are."""
    mask = _current_mask
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x


def input_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """A layer's input as rows [*, k], padded positions left out (real_tokens)."""
    return real_tokens(x).reshape(-1, k)


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run one calibration item: a dict as keyword arguments, a tuple/list as positional, else one input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_len(batch: Any) -> int:
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for t in items:
        if isinstance(t, torch.Tensor):
            return int(t.shape[0]) if t.dim() else 1
    return 1


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout; BatchNorm running statistics), no autograd, no KV cache; restored after."""
    was_training = model.training
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    model.eval()
    if cache is not None:
        config.use_cache = False
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        if cache is not None:
            config.use_cache = cache


def feed(model: nn.Module, calibration: Iterable, handles: list, *, max_batches: int | None = None,
         progress: bool = False) -> tuple[int, int]:
    """Run `calibration` through `model` in eval mode without autograd, then remove the hook `handles`
    and restore the model's mode, whatever happens. Returns (batches, samples) seen."""
    batches = samples = 0
    try:
        with inference(model):
            for batch in progress_bar(calibration, desc="calibrate", unit="batch", disable=not progress):
                if max_batches is not None and batches >= max_batches:
                    break
                with masking(token_mask(batch)):
                    call_model(model, batch)
                batches += 1
                samples += batch_len(batch)
    finally:
        for h in handles:
            h.remove()
    return batches, samples


# ---------------------------------------------------------------------------------------------------
# Stages: a module and the inputs it is run on


Call = tuple[tuple, dict]  # positional and keyword arguments of one forward call

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _as_call(batch: Any) -> Call:
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the nn.ModuleList of two or more same-typed modules holding the most
    parameters (a transformer's layers), or None."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size and (best is None or size > best[2]):
                best = (name, mod, size)
    return None if best is None else (best[0], best[1])


def capture_inputs(model: nn.Module, block: nn.Module, calibration: Iterable) -> list[Call]:
    """The arguments `block` is called with while `model` runs over `calibration` (the pass stops there).
    A KV cache argument is dropped: the block is re-run on these inputs, and must not append to it."""
    calls: list[Call] = []

    def hook(mod, args, kwargs):
        kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with inference(model):
            for batch in calibration:
                try:
                    call_model(model, batch)
                except StopForward:
                    continue
                raise ValueError("the model's repeated blocks did not run on the calibration data")
    finally:
        handle.remove()
    return calls


def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a module's output: the output itself, or the first of a tuple or HF ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return out[0]


class Stage:
    """A module (one block, or the whole model, whose qualified name is `prefix`) and the calls to run it on;
    `masks`: each call's token mask (lowbit.sequential.token_mask of the batch it came from), if any."""

    def __init__(self, module: nn.Module, calls: list[Call], prefix: str = "",
                 masks: list[torch.Tensor | None] | None = None) -> None:
        self.module, self.calls, self.prefix = module, calls, prefix
        self.masks = masks if masks is not None else [None] * len(calls)

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix and name else self.prefix or name

    def run(self, hooks: Iterable[tuple[nn.Module, Callable]] = (), limit: int | None = None) -> list:
        """Run every call with forward pre-hooks (module, fn(module, args)) attached; return the outputs."""
        handles = [m.register_forward_pre_hook(fn) for m, fn in hooks]
        outs = []
        try:
            with inference(self.module):
                for (args, kwargs), mask in zip(self.calls[:limit], self.masks):
                    with masking(mask):
                        outs.append(self.module(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()
        return outs

    def next_calls(self, hooks: Iterable[tuple[nn.Module, Callable]] = ()) -> list[Call]:
        """The calls of the next block: this block's outputs in place of its hidden-state input. `hooks`
        (module, fn(module, args)) see the inputs on the way, as in `run`."""
        nxt = []
        for (args, kwargs), out in zip(self.calls, self.run(hooks)):
            h = main_output(out)
            if args:
                nxt.append(((h, *args[1:]), kwargs))
            else:
                nxt.append(((), {**kwargs, "hidden_states": h}))
        return nxt

    def groups(self, layers: dict[str, nn.Module]) -> tuple[list[list[str]], dict[str, nn.Module]]:
        """Split `layers` (qualified name -> module, all inside this stage) into groups of layers that read
        the same input tensor, in the order they are first called; and for each group's first layer, the
        module whose output that tensor is, if some module's is. Found on the first call."""
        by_module = {id(m): n for n, m in layers.items()}
        order: list[tuple[str, torch.Tensor]] = []
        produced: list[tuple[nn.Module, torch.Tensor]] = []  # holds the tensors: no reuse of freed ones

        def pre(mod, args):
            name = by_module[id(mod)]
            if args and all(n != name for n, _ in order):
                order.append((name, args[0]))

        def post(mod, args, out):
            if isinstance(out, torch.Tensor):
                produced.append((mod, out))

        handles = [m.register_forward_hook(post) for m in self.module.modules() if m is not self.module]
        try:
            self.run([(m, pre) for m in layers.values()], limit=1)
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        inputs: list[torch.Tensor] = []
        producers: dict[str, nn.Module] = {}
        for name, x in order:
            for g, t in zip(groups, inputs):
                if t is x:
                    g.append(name)
                    break
            else:
                groups.append([name])
                inputs.append(x)
                src = next((n for n, out in produced if out is x), None)  # innermost module first
                if src is not None:
                    producers[name] = src
        unseen = [n for n in layers if all(n not in g for g in groups)]
        if unseen:
            raise ValueError(f"{len(unseen)} layer(s) received no input during calibration: {', '.join(unseen[:5])}")
        return groups, producers


def stages(model: nn.Module, names: list[str], calibration: Iterable, *, progress: bool = False,
           desc: str = "block") -> Iterator[tuple[Stage, list[str]]]:
    """Yield (stage, qualified names of the layers in it) block by block, then the whole model for the layers
    outside the blocks. The caller fits the stage's layers before asking for the next one: each block's
    inputs are the previous block's outputs as they are then."""
    found = find_blocks(model)
    rest = list(names)
    if found is not None:
        prefix, blocks = found
        inside = [[n for n in names if n.startswith(f"{prefix}.{i}.".lstrip("."))] for i in range(len(blocks))]
        if any(inside):
            calls = capture_inputs(model, blocks[0], calibration)
            masks = [token_mask(b) for b in calibration]
            bar = progress_bar(total=len(blocks), desc=desc, unit="block", disable=not progress)
            for i, block in enumerate(blocks):
                stage = Stage(block, calls, f"{prefix}.{i}".lstrip("."), masks)
                if inside[i]:
                    yield stage, inside[i]
                if i + 1 < len(blocks):
                    calls = stage.next_calls()
                bar.update(1)
            bar.close()
            done = {n for grp in inside for n in grp}
            rest = [n for n in names if n not in done]
    if rest:
        yield Stage(model, [_as_call(b) for b in calibration], masks=[token_mask(b) for b in calibration]), rest


def fold_scale(stage: Stage, producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor,
               tol: float = 1e-4) -> bool:
    """Divide the output channels of `producer` (a norm's elementwise weight and bias, or a linear's output
    rows) by `s` and multiply the input columns of `consumers` by `s`: the same function, if the consumers
    are all that reads those channels and the path between is linear. That is checked, not assumed: the
    stage's output on its first call must stay within `tol` (relative); otherwise everything is restored
    and False returned."""
    k = s.numel()
    weight = getattr(producer, "weight", None)
    if isinstance(producer, nn.Linear):
        if producer.out_features != k:
            return False
        shape = (k, 1)
    elif isinstance(weight, nn.Parameter) and weight.dim() == 1 and weight.numel() == k:
        shape = (k,)
    else:
        return False
    bias = getattr(producer, "bias", None)
    tensors = [producer.weight] + ([bias] if isinstance(bias, torch.Tensor) else []) + [c.weight for c in consumers]
    saved = [t.detach().clone() for t in tensors]
    ref = main_output(stage.run(limit=1)[0]).float()
    with torch.no_grad():
        producer.weight.div_(s.reshape(shape))
        if isinstance(bias, torch.Tensor):
            bias.div_(s)
        for c in consumers:
            c.weight.mul_(s)
    new = main_output(stage.run(limit=1)[0]).float()
    if torch.isfinite(new).all() and (new - ref).norm() <= tol * ref.norm():
        return True
    with torch.no_grad():
        for t, old in zip(tensors, saved):
            t.copy_(old)
    return False

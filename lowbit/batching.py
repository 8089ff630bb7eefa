"""Layers that read one input in turn, run as one kernel call.

In decode, a transformer block calls its query, key and value projections one after the other on the same
activation tensor, and its MLP's gate and up projections likewise. Each call streams its own weight from
memory and returns to Python, and the memory system idles from one call's end to the next one's start.
One call over the weights of q, k and v (and one over gate and up) streams them back to back.

lowbit learns such runs while the model runs, with no knowledge of its architecture. A layer's first
decode-sized eager calls are watched: when the same layers are called one after the other on one unchanged
tensor (same object, same version counter) in two consecutive steps, and their kernel can run them as one
call (Kernel.bind_many), they become a group. From then on the first of them (the leader) computes every
member's output in one call, and each other member hands back its own when it is called on that very
tensor, unchanged (its version counter, or its values for inference tensors, which have no counter);
outputs are bit-identical to separate calls. Each layer's module is still called, so
hooks run. A member called on another tensor, or a leader whose previous outputs were not all taken,
disbands the group, and its layers then run alone. Layers in no group after a few calls stop being
watched, so a settled model pays one attribute check per call. Setting up a member's kernel again
disbands its group. Tracing (torch.compile, torch.export) never takes part: only QuantLinear's eager fast
path does. `set_enabled(False)` turns it off.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

_ENABLED = [True]
WATCHED_CALLS = 8  # calls a layer is watched for before it settles to running alone


def set_enabled(enabled: bool) -> bool:
    """Turn batching of layers that read one input on or off; returns the previous setting."""
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    return before


def enabled() -> bool:
    return _ENABLED[0]


class _Run(threading.local):
    """The calling thread's current run of watched layers on one input (weak references: a run left
    behind keeps no model alive)."""

    def __init__(self) -> None:
        self.x: weakref.ref | None = None
        self.version = -1
        self.layers: list[weakref.ref] = []


_RUN = _Run()


class Watching:
    """A layer not yet in a group: its calls are recorded in the thread's run."""

    __slots__ = ("calls", "count", "seen")

    def __init__(self) -> None:
        self.calls = 0
        self.seen: tuple | None = None  # the run it led last time (weak references)
        self.count = 0  # times in a row it led that run

    def call(self, layer: Any, x: torch.Tensor, fast: tuple) -> torch.Tensor:
        run = _RUN
        if not _ENABLED[0]:
            return fast[1](x, layer.bias)
        version = -1 if x.is_inference() else x._version
        if run.x is not None and run.x() is x and version == run.version:
            run.layers.append(weakref.ref(layer))
        else:
            _close(run)
            run.x, run.version, run.layers = weakref.ref(x), version, [weakref.ref(layer)]
        self.calls += 1
        if self.calls > WATCHED_CALLS and layer._batch is self:
            layer._batch = None  # settled: runs alone
        return fast[1](x, layer.bias)


def _close(run: _Run) -> None:
    """The run has ended (a watched call on another input): a leader seen twice in a row forms a group."""
    refs = run.layers
    run.x, run.layers = None, []
    if len(refs) < 2:
        return
    layers = [r() for r in refs]
    if any(layer is None for layer in layers) or len({id(layer) for layer in layers}) < len(layers):
        return
    state = layers[0]._batch
    if not isinstance(state, Watching) or not all(isinstance(layer._batch, Watching) for layer in layers):
        return
    if state.seen is not None and len(state.seen) == len(layers) and all(
            a() is b for a, b in zip(state.seen, layers)):
        state.count += 1
    else:
        state.seen, state.count = tuple(refs), 1
    if state.count >= 2:
        state.seen, state.count = None, 0
        _form(layers)


def _form(layers: list) -> None:
    fasts = [getattr(layer, "_fast", None) for layer in layers]
    if any(f is None for f in fasts) or any(type(f[3]) is not type(fasts[0][3]) for f in fasts):
        return
    if any("input_scale" in layer._buffers for layer in layers):
        return
    kernel, preps, specs = fasts[0][3], [f[2] for f in fasts], [layer.spec for layer in layers]
    if kernel.bind_many(preps, specs) is None:
        return
    kernel.pack_together(preps, specs)  # one stream for the shared call; every member binds its call anew
    for layer in layers:
        layer._rebind()
    many = kernel.bind_many(preps, specs)
    group = Group(layers, many, min(f[0] for f in fasts))
    layers[0]._batch = group
    for layer, slot in zip(layers[1:], group.slots):
        layer._batch = slot


class Group:
    """The leader's state: its followers, their slots, and the one call that computes all outputs."""

    __slots__ = ("layers", "limit", "many", "slots")

    def __init__(self, layers: list, many, limit: float) -> None:
        self.layers, self.many, self.limit = layers, many, limit
        self.slots = [Follower(self) for _ in layers[1:]]

    def call(self, layer: Any, x: torch.Tensor, fast: tuple) -> torch.Tensor:
        if not _ENABLED[0] or x.numel() > self.limit:
            return fast[1](x, layer.bias)
        for slot in self.slots:
            if slot.ready is not None:  # a follower did not take its last output: the pattern broke
                self.disband()
                return fast[1](x, layer.bias)
        ys = self.many(x, [m.bias for m in self.layers])
        stamp = _stamp(x)
        for slot, y in zip(self.slots, ys[1:]):
            slot.ready = (x, stamp, y)
        return ys[0]

    def disband(self) -> None:
        for m in self.layers:
            if m._batch is self or m._batch in self.slots:
                m._batch = None
        for slot in self.slots:
            slot.ready = None


class Follower:
    """A follower's state: the output its leader computed for it, with the input it was computed on."""

    __slots__ = ("group", "ready")

    def __init__(self, group: Group) -> None:
        self.group, self.ready = group, None

    def call(self, layer: Any, x: torch.Tensor, fast: tuple) -> torch.Tensor:
        ready = self.ready
        if ready is not None:
            self.ready = None
            if ready[0] is x and _unchanged(x, ready[1]):
                return ready[2]
            self.group.disband()  # called on another input than its leader's
        return fast[1](x, layer.bias)


def _stamp(x: torch.Tensor) -> int | torch.Tensor:
    """What tells whether x changed in place later: its version counter, or for an inference tensor (made
    under torch.inference_mode, which keeps no version counter) a copy of it (a decode input is a few KB)."""
    return x.clone() if x.is_inference() else x._version


def _unchanged(x: torch.Tensor, stamp: int | torch.Tensor) -> bool:
    return torch.equal(x, stamp) if isinstance(stamp, torch.Tensor) else x._version == stamp


def leave(layer: Any) -> None:
    """Before a layer's kernel is set up again: the group it is in (whose call holds its old form) ends."""
    state = getattr(layer, "_batch", None)
    if isinstance(state, Group):
        state.disband()
    elif isinstance(state, Follower):
        state.group.disband()

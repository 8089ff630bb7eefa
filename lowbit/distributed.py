"""Gradient compression for DistributedDataParallel: quantize what the processes exchange.

    ddp = DistributedDataParallel(model)
    stats = lowbit.distributed.compress_gradients(ddp, "int8")    # or "sign"; one call

"int8": each gradient bucket is cut into chunks of `chunk` values, each sent as int8 codes with one
float32 scale (max|g| / 127). "sign": 1 bit per value (packed 8 per byte) with one scale per chunk (the
chunk's mean |g|), and error feedback (Seide et al. 2014; Karimireddy et al. 2019): what the signs
did not carry is kept and added to the next step's gradient, so nothing is lost, only delayed.

An all-reduce cannot add int8 codes with different scales, so every process all-gathers the others'
codes and scales and decodes and averages them itself. Each process sends its compressed bucket once.
`stats.bytes_sent` counts the bytes each process hands to the collectives (payload); the training entry
also measures the bytes that crossed the network interface (scripts/qat_mnist.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .core import pack_bits, unpack_bits

SCHEMES = ("none", "fp32", "int8", "sign")


@dataclass
class HookState:
    scheme: str
    chunk: int
    group: object = None
    bytes_sent: int = 0  # payload bytes this process handed to collectives
    steps_buckets: int = 0
    error: dict = field(default_factory=dict)  # sign: per parameter, what was not sent yet


def _chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    pad = -t.numel() % chunk
    return torch.nn.functional.pad(t, (0, pad)).view(-1, chunk)


def _gather(state: HookState, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """all_gather each tensor; returns, per tensor, every process's copy."""
    world = dist.get_world_size(state.group)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=state.group)
        state.bytes_sent += t.numel() * t.element_size()
        out.append(parts)
    return out


def _done(t: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def _fp32_hook(state: HookState, bucket):  # no annotations: DDP checks them as objects
    """Plain averaging all-reduce, with its payload counted: the baseline."""
    t = bucket.buffer()
    state.bytes_sent += t.numel() * t.element_size()
    dist.all_reduce(t, group=state.group)
    return _done(t.div_(dist.get_world_size(state.group)))


def _int8_hook(state: HookState, bucket):  # no annotations: DDP checks them as objects
    t = bucket.buffer()
    x = _chunks(t.float(), state.chunk)
    scale = (x.abs().amax(1) / 127.0).clamp_min(1e-30)
    codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    all_codes, all_scales = _gather(state, [codes, scale])
    total = sum(c.float() * s[:, None] for c, s in zip(all_codes, all_scales))
    out = (total / len(all_codes)).reshape(-1)[: t.numel()]
    t.copy_(out.to(t.dtype))
    return _done(t)


def _sign_hook(state: HookState, bucket):  # no annotations: DDP checks them as objects
    t = bucket.buffer()
    n = t.numel()
    # The error is kept per parameter: DDP may regroup parameters into buckets after the first step.
    params = bucket.parameters()
    err = [state.error.get(p) for p in params]
    if all(e is not None for e in err) and sum(e.numel() for e in err) == n:
        x = t.float() + torch.cat(err)
    else:
        x = t.float()
    xc = _chunks(x, state.chunk)
    scale = xc.abs().mean(1)
    positive = xc >= 0
    sent = torch.where(positive, scale[:, None], -scale[:, None]).reshape(-1)[:n]
    left = x - sent
    for p, e in zip(params, left.split([p.numel() for p in params])):
        state.error[p] = e
    bits = pack_bits(positive.to(torch.uint8), 1)
    all_bits, all_scales = _gather(state, [bits, scale])
    total = torch.zeros_like(xc)
    for b, s in zip(all_bits, all_scales):
        pos = unpack_bits(b, 1, xc.numel()).reshape(xc.shape).bool()
        total += torch.where(pos, s[:, None], -s[:, None])
    t.copy_((total / len(all_bits)).reshape(-1)[:n].to(t.dtype))
    return _done(t)


_HOOKS = {"fp32": _fp32_hook, "int8": _int8_hook, "sign": _sign_hook}


def compress_gradients(ddp_model: torch.nn.parallel.DistributedDataParallel, scheme: str = "int8", *,
                       chunk: int | None = None, group=None) -> HookState:
    """Register the gradient communication hook `scheme` on a DDP model; returns its HookState (bytes
    counted there). Schemes: "int8", "sign" (1 bit + error feedback), "fp32" (uncompressed, counted),
    "none" (DDP's own all-reduce, nothing registered). chunk: values per scale (int8: 256, sign: 1024)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown gradient compression {scheme!r}; valid: {', '.join(SCHEMES)}")
    chunk = chunk or (1024 if scheme == "sign" else 256)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    state = HookState(scheme, chunk, group)
    if scheme != "none":
        ddp_model.register_comm_hook(state, _HOOKS[scheme])
    return state

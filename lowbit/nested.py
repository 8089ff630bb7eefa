"""One checkpoint, any precision: B-bit affine codes stored as bit planes, so that the top b planes are
themselves the codes of a b-bit format.

A weight-only B-bit layer (codes u in [0, 2^B), W = (u - zero) * scale per group) is saved as its B bit
planes, most significant first, each packed 8 codes to a byte, plus a scale and zero point per group for
every width offered. Loading at b bits reads the top b planes, u_b = u >> (B - b) (each b-bit code
stands for the 2^(B-b) B-bit codes under it), and that width's scales: an ordinary `int{b}-g{G}` layer
on the same kernels. A width's scale and zero point are fitted by least squares, group by group, to the
B-bit layer's weights given the b-bit codes (the centre of each code's bucket where a group's codes are
all equal); at b = B they are the layer's own, so a full-width load is the saved model bit for bit.

lowbit.save(model, dir, nested=True) writes it; lowbit.load(dir, bits=b) reads only the tensors width b
needs (each checked against its own sha256 in the manifest) and records the bytes read.
"""

from __future__ import annotations

import dataclasses

import torch

from . import core
from .modules import QuantEmbedding, QuantLinear, QuantModule
from .recipes import QuantConfig

WIDTHS = (8, 4, 3, 2)


def eligible(mod: object) -> bool:
    """Whether a module can be saved nested: a weight-only affine integer linear (without an input scale)
    or embedding table."""
    return (isinstance(mod, (QuantLinear, QuantEmbedding)) and mod.config.kind == "int" and mod.config.act is None
            and "input_scale" not in mod._buffers)


def _shape(mod: QuantModule) -> tuple[int, int]:
    if isinstance(mod, QuantEmbedding):
        return mod.num_embeddings, mod.embedding_dim
    return mod.out_features, mod.in_features


def widths_for(bits: int, widths: tuple[int, ...] = WIDTHS) -> list[int]:
    return sorted({b for b in widths if b <= bits} | {bits}, reverse=True)


def width_config(config: QuantConfig, b: int) -> QuantConfig:
    """The format a b-bit load of a layer saved in `config` runs as: asymmetric b-bit, same groups."""
    return dataclasses.replace(config, bits=b, symmetric=False, method="rtn")


def _planes(u: torch.Tensor, bits: int) -> list[torch.Tensor]:
    flat = u.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32))
    out = []
    for p in range(bits - 1, -1, -1):
        bit = ((flat >> p) & 1).to(torch.int32).view(-1, 8)
        out.append((bit * weights).sum(1).to(torch.uint8))
    return out


def _from_planes(planes: list[torch.Tensor], numel: int) -> torch.Tensor:
    """u_b from the top b planes (most significant first)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    u = None
    for p in planes:
        bits = ((p.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel]
        u = bits if u is None else (u << 1) | bits
    return u.to(torch.uint8)


def _fit_scales(u_b: torch.Tensor, w: torch.Tensor, s_full: torch.Tensor, z_full: torch.Tensor, shift: int,
                group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, w ~ (u_b - z) * s by least squares; the derived scales where the codes are constant or
    the fit is not increasing. u_b, w: [n, kp]; s_full, z_full: [n, groups]."""
    n, kp = u_b.shape
    x = u_b.float().view(n, kp // group, group)
    y = w.float().view(n, kp // group, group)
    mx, my = x.mean(-1), y.mean(-1)
    vx = (x - mx[..., None]).pow(2).mean(-1)
    cxy = ((x - mx[..., None]) * (y - my[..., None])).mean(-1)
    a = cxy / vx.clamp_min(1e-12)
    c = my - a * mx
    # Derived: each b-bit code stands for the centre of its bucket of 2^shift B-bit codes.
    step = 2 ** shift
    s_der = s_full * step
    z_der = z_full / step - (step - 1) / (2 * step)
    ok = (vx > 1e-12) & (a > 0) & torch.isfinite(a) & torch.isfinite(c)
    s = torch.where(ok, a, s_der)
    z = torch.where(ok, -c / a.clamp_min(1e-30), z_der)
    return s, z


def nested_tensors(name: str, mod: QuantModule, widths: tuple[int, ...] = WIDTHS) -> tuple[dict, dict]:
    """The tensors (name-prefixed) and the manifest "nested" record of one eligible layer."""
    config, shape = mod.config, _shape(mod)
    scheme = mod.scheme
    state = mod.canonical_state()
    u, s, z = scheme.affine_codes(state, shape)  # [n, kp], [n, groups] (one per row and group)
    bits = config.bits
    n, kp = u.shape
    group = kp // s.shape[1]
    w = ((u.float().view(n, kp // group, group) - z.float()[..., None]) * s.float()[..., None]).view(n, kp)
    out = {f"{name}.plane{i}": p for i, p in enumerate(_planes(u, bits))}
    record = {"bits": bits, "widths": widths_for(bits, widths), "n": n, "kp": kp, "group": group,
              "zero_point": "zero_point" in state}
    for b in record["widths"]:
        cfg = width_config(config, b)
        target = type(mod).scheme_for(cfg)
        if target.layout(shape).kp != kp:
            raise ValueError(f"layer {name!r}: a {b}-bit load would pad its {shape[1]} inputs to "
                             f"{target.layout(shape).kp}, the {bits}-bit codes to {kp}; leave {b} out of widths")
        if b == bits:  # the layer's own scales (and zero points), as its format stores them
            out[f"{name}.scale{b}"] = state["scale"].contiguous()
            if "zero_point" in state:
                out[f"{name}.zero_point{b}"] = state["zero_point"].contiguous()
            continue
        sb, zb = _fit_scales(u >> (bits - b), w, s.float(), z.float(), bits - b, group)
        if target.half:
            sb, zb = core.half_scale(sb), zb.to(torch.float16).float()
            sb, zb = sb.to(torch.float16) if core.half_exact(sb) else sb, zb.to(torch.float16)
        out[f"{name}.scale{b}"] = sb.contiguous()
        out[f"{name}.zero_point{b}"] = zb.contiguous()
    if getattr(mod, "bias", None) is not None:
        out[f"{name}.bias"] = mod.bias.detach().contiguous()
    return out, record


def needed(name: str, record: dict, bits: int | None) -> list[str]:
    """The tensor names a load at `bits` (None: full width) reads for one nested layer."""
    b = record["bits"] if bits is None else min(bits, record["bits"])
    if b not in record["widths"]:
        raise ValueError(f"layer {name!r} is stored for widths {record['widths']}, not {b}")
    names = [f"{name}.plane{i}" for i in range(b)] + [f"{name}.scale{b}"]
    if b < record["bits"] or record.get("zero_point", True):
        names.append(f"{name}.zero_point{b}")
    return names


def rebuild(name: str, entry: dict, record: dict, tensors: dict, bits: int | None) -> QuantModule:
    """The layer a nested entry describes, at `bits` (None: full width), from the tensors `needed` named."""
    full = QuantConfig.from_dict(entry["config"])
    b = record["bits"] if bits is None else min(bits, record["bits"])
    planes = [tensors[f"{name}.plane{i}"] for i in range(b)]
    n, kp = record["n"], record["kp"]
    u = _from_planes(planes, n * kp).view(n, kp)
    embedding = entry["type"] == "embedding"
    shape = (entry["num_embeddings"], entry["embedding_dim"]) if embedding else (entry["out_features"],
                                                                                 entry["in_features"])
    if b == full.bits:  # the layer as saved: its own format, codes and scales
        config = full
        scheme = (QuantEmbedding if embedding else QuantLinear).scheme_for(config)
        lay = scheme.layout(shape)
        q = scheme._signed_codes(u).reshape(lay.shape) if scheme.signed and b == 8 else core.pack_bits(u, b)
        state = {"qweight": q, "scale": tensors[f"{name}.scale{b}"]}
        if f"{name}.zero_point{b}" in tensors:
            state["zero_point"] = tensors[f"{name}.zero_point{b}"]
    else:
        config = width_config(full, b)
        state = {"qweight": core.pack_bits(u, b), "scale": tensors[f"{name}.scale{b}"],
                 "zero_point": tensors[f"{name}.zero_point{b}"]}
    if embedding:
        return QuantEmbedding(shape[0], shape[1], config, state, entry["padding_idx"])
    bias = tensors.get(f"{name}.bias")
    layer = QuantLinear(entry["in_features"], entry["out_features"], config, state, bias, kernel="auto")
    if b == full.bits:
        try:
            layer.set_kernel(entry["kernel"])  # as saved (a route lowbit.quantize chose)
        except ValueError:  # saved where another kernel ran: this machine's choice, same weights
            _choose_route(layer)
    else:
        _choose_route(layer)
    return layer


def _choose_route(layer: QuantLinear) -> None:
    """The route of kernels by row count lowbit.quantize would choose for this width (kernel timings per
    layer shape, cached on disk): timed beside a float layer of the same shape."""
    from torch import nn

    from . import autotune
    from .backends import format_route
    from .quantize import route_for

    tuner = autotune.Tuner()
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.dequantized_weight())
    _, route = route_for(tuner, lin.eval(), layer)
    tuner.save()
    layer.set_kernel(format_route(route))


__all__ = ["WIDTHS", "eligible", "needed", "nested_tensors", "rebuild", "width_config", "widths_for"]

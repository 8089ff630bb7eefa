"""Dense bit packing of integer codes into uint8 byte streams.

Layout: one LSB-first bit stream. Code i occupies stream bits [i*bits, (i+1)*bits), and stream bit j
is bit (j % 8) of byte j // 8. No padding between codes, so 8 three-bit codes take exactly 3 bytes;
only the last byte may carry unused (zero) high bits.
"""

from __future__ import annotations

import torch


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for `numel` codes of `bits` bits: ceil(numel * bits / 8)."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, each in [0, 2**bits)) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8), got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo = 0 if flat.dtype == torch.uint8 else int(flat.min())  # uint8 cannot be negative: skip a pass
    hi = int(flat.max())
    if lo < 0 or hi >= 2 ** bits:
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits}-bit packing, "
                         f"got range [{int(flat.min())}, {hi}]")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    nbytes = packed_nbytes(n, bits)
    if 8 % bits == 0:
        # Whole codes per byte: OR shifted columns together, staying in uint8 to keep memory at 1x.
        per = 8 // bits
        lanes = _pad_to(flat, per).view(-1, per)
        out = lanes[:, 0].clone()
        for j in range(1, per):
            out |= lanes[:, j] << (j * bits)
        return out
    # 3/5/6/7 bits: 8 codes fill exactly `bits` bytes. Each code lands in at most two bytes of its
    # group, so every byte is ORed together from shifted uint8 columns, never widening the data.
    lanes = _pad_to(flat, 8).view(-1, 8)
    out = torch.zeros(lanes.shape[0], bits, dtype=torch.uint8, device=codes.device)
    for j, (k, off) in enumerate(_group_layout(bits)):
        out[:, k] |= lanes[:, j] << off  # uint8 shift drops the bits that spill into byte k + 1
        if off + bits > 8:
            out[:, k + 1] |= lanes[:, j] >> (8 - off)
    # Padding codes were zero, so truncating drops only all-zero tail bytes.
    return out.view(-1)[:nbytes].clone()


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() != expected:
        raise ValueError(f"packed data has {flat.numel()} bytes but {numel} codes of {bits} bits need "
                         f"{expected}")
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        out = torch.empty(flat.numel(), per, dtype=torch.uint8, device=packed.device)
        for j in range(per):
            out[:, j] = (flat >> (j * bits)) & mask
        return out.view(-1)[:numel]
    lanes = _pad_to(flat, bits).view(-1, bits)
    out = torch.empty(lanes.shape[0], 8, dtype=torch.uint8, device=packed.device)
    for j, (k, off) in enumerate(_group_layout(bits)):
        col = lanes[:, k] >> off
        if off + bits > 8:
            col |= lanes[:, k + 1] << (8 - off)
        out[:, j] = col & mask
    return out.view(-1)[:numel]


def _group_layout(bits: int) -> list[tuple[int, int]]:
    """(byte index, bit offset) where each of the 8 codes of a `bits`-byte group starts."""
    return [divmod(j * bits, 8) for j in range(8)]


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a 1-D tensor to a length divisible by `multiple` (no copy when already divisible)."""
    rem = flat.numel() % multiple
    if rem == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(multiple - rem)])

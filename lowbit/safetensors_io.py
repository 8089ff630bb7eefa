"""Reading and writing safetensors files one tensor at a time, for models larger than memory.

The reader parses the header itself and reads each tensor with plain file reads into fresh memory: no
memory map, so pages of a shard that were read once do not stay resident in the process (a mapped file's
pages count toward its resident size until unmapped). The writer fills shards up to a size and writes
each one atomically.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import set_usual_mode

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data section) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has a corrupt header: {e}") from None
    header.pop("__metadata__", None)
    for name, e in header.items():
        if e.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
        if 8 + n + e["data_offsets"][1] > size:
            raise ValueError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
    return header, 8 + n


class Source:
    """The tensors of a Hugging Face model folder (one model.safetensors, or shards with an index)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{folder} has no {SINGLE} or {INDEX}: block-at-a-time quantization reads "
                                    "safetensors checkpoints only")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} named by {INDEX} is missing")
            header, start = read_header(path)
            for key, e in header.items():
                self.entries[key] = (path, e, start)
        self.nbytes = sum((folder / f).stat().st_size for f in files)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        path, e, start = self.entries[name]
        begin, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
        if t.numel() * t.element_size() != end - begin:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {e['shape']}")
        with open(path, "rb") as f:
            f.seek(start + begin)
            if t.numel() and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path} is truncated: could not read tensor {name!r}")
        return t


class ShardWriter:
    """Collects tensors and writes them to `folder` as shards of about `shard_bytes` each."""

    def __init__(self, folder: Path, shard_bytes: int = 1 << 30, prefix: str = "model") -> None:
        self.folder, self.shard_bytes, self.prefix = folder, shard_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        self.pending[name] = t.clone() if any(t.data_ptr() == p.data_ptr() for p in self.pending.values()
                                              if p.numel() and t.numel()) else t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(self.pending, str(tmp), metadata={"format": "lowbit"})
        set_usual_mode(tmp)  # safetensors creates it owner-only
        os.replace(tmp, self.folder / name)
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0

"""Permissions of the files lowbit writes.

Files written through a temporary name (mkstemp, mkdtemp, safetensors' own writer) are created owner-only
(0600, directories 0700), whatever the user's umask says. Once complete, they get the mode any new file of
the process would get: 0666 (0777 for directories) minus the umask, as `open()` and `mkdir` give.
"""

from __future__ import annotations

import os
from pathlib import Path


def _read_umask() -> int:
    # /proc reports the umask without changing it; elsewhere the only way is to set it and put it back,
    # which races with other threads creating files, so it is done once, at import.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


def set_usual_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a new file (or directory) of this process gets by default."""
    path = Path(path)
    os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def set_usual_modes(folder: str | os.PathLike) -> None:
    """`set_usual_mode` on `folder` and everything under it (symbolic links are left alone)."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            if not p.is_symlink():
                set_usual_mode(p)
    set_usual_mode(folder)

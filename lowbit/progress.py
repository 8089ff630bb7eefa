"""Progress of long stages: a live bar on a terminal or in a notebook, one line per stage anywhere else.

A bar redrawn in a log file or a CI log is one line per update; there, each stage prints a single line
when it ends (``quantize int4-g128: 37 layers, done in 4.2 s``), plus a line a minute while it runs, so a
long stage still shows it is alive.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm as _tqdm_auto
from tqdm.autonotebook import tqdm as _tqdm_notebook_or_std
from tqdm.std import tqdm as _tqdm_std

HEARTBEAT_SECONDS = 60.0


def _is_live(stream: IO[str]) -> bool:
    if _tqdm_notebook_or_std is not _tqdm_std:  # in a notebook: the widget draws, it does not log
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class StageLine:
    """The part of tqdm's interface lowbit uses (iterate, update, close), reporting a
    stage as one line on close instead of a bar."""

    def __init__(self, iterable: Iterable | None, *, desc: str, total: int | None, unit: str, stream: IO[str]):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.closed = total, 0, False
        self.start = self.last_line = time.perf_counter()

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None and self.n != self.total else ""
        return f"{self.n}{of} {_plural(self.unit, self.total if of else self.n)}"

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}" if self.desc else text, file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)  # counted once the caller is done with it, as tqdm does
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        finished = self.total is not None and self.n >= self.total  # the closing line follows
        if now - self.last_line >= HEARTBEAT_SECONDS and not finished:
            self.last_line = now
            self._line(f"{self._count()} after {now - self.start:.0f} s")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(f"{self._count()}, done in {time.perf_counter() - self.start:.1f} s")


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, unit: str = "step",
                 disable: bool = False, file: IO[str] | None = None) -> Any:
    """A tqdm bar (same arguments) on a terminal or in a notebook; on any other stream (a file, a pipe, a CI
    log) a `StageLine`, which prints one line when the stage ends. `file` defaults to stderr."""
    stream = sys.stderr if file is None else file
    if disable or _is_live(stream):
        return _tqdm_auto(iterable, desc=desc, total=total, unit=unit, disable=disable, file=file)
    return StageLine(iterable, desc=desc, total=total, unit=unit, stream=stream)

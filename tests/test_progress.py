"""Progress output: a bar on a terminal; one line per stage on a file, a pipe or a CI log."""

import io
import re

import torch
from torch import nn

import lowbit
from lowbit import progress
from lowbit.progress import StageLine, progress_bar

DONE = re.compile(r"^(?P<desc>.+): (?P<count>\d+(/\d+)?) (?P<unit>\w+), done in \d+\.\d s$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_line_per_stage_on_a_file():
    out = io.StringIO()
    assert [x * 2 for x in progress_bar(range(37), desc="quantize int4-g128", unit="layer", file=out)] == \
        [x * 2 for x in range(37)]
    bar = progress_bar(total=3, desc="perplexity", unit="window", file=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints nothing more
    for _ in progress_bar(iter(range(5)), desc="calibrate", unit="batch", file=out):  # no len: count only
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3, lines
    assert [DONE.match(line).group("desc", "count", "unit") for line in lines] == [
        ("quantize int4-g128", "37", "layers"), ("perplexity", "3", "windows"), ("calibrate", "5", "batches")]


def test_a_stage_left_early_says_how_far_it_got():
    out = io.StringIO()
    for i in progress_bar(range(10), desc="timing", unit="round", file=out):
        if i == 4:
            break
    assert DONE.match(out.getvalue().strip()).group("count", "unit") == ("4/10", "rounds")


def test_long_stage_prints_a_line_now_and_then(monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="block", unit="block", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert [line.split(" after ")[0] for line in lines[:2]] == ["block: 1/3 blocks", "block: 2/3 blocks"]
    assert len(lines) == 3 and DONE.match(lines[2])  # no progress line when the last step is done


def test_bar_on_a_terminal_and_nothing_when_disabled():
    term = Terminal()
    bar = progress_bar(range(3), desc="quantize", file=term)
    assert not isinstance(bar, StageLine) and list(bar) == [0, 1, 2]
    assert "\r" in term.getvalue()  # a redrawn tqdm bar
    quiet = io.StringIO()
    assert list(progress_bar(range(3), desc="quantize", disable=True, file=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_quantize_logs_one_line_per_stage(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))
    calibration = [torch.randn(4, 32) for _ in range(6)]
    lowbit.quantize(model, "w8a8-static", calibration=calibration, progress=True, backend="reference")
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = [line for line in err.splitlines() if line.strip()]
    assert "\r" not in err
    stages = [DONE.match(line).group("desc", "count", "unit") for line in lines if DONE.match(line)]
    assert ("calibrate", "6", "batches") in stages
    assert ("quantize w8a8-static", "3", "layers") in stages
    assert len(stages) == len(lines), lines  # nothing but stage lines

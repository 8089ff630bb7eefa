"""lowbit.sensitivity (per-layer and per-block output change by format, proxies, bytes) and lowbit.search
(per-layer recipes under a size or accuracy budget, the report)."""

import copy
import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lowbit
from lowbit.search import search, stored_bytes, write_report
from lowbit.sensitivity import proxy_correlations, rank_correlation, sensitivity

sens_mod = importlib.import_module("lowbit.sensitivity")  # the module (lowbit.sensitivity is the function)
FORMATS = ["int8", "int4-g32", "int2-g32"]


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(torch.relu(self.up(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, d=32, logits=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d), Block(d)])
        self.head = nn.Linear(d, vocab)
        self.logits = logits

    def forward(self, ids, attention_mask=None):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        y = self.head(x)
        return {"logits": y} if self.logits else y


def tiny(**kw):
    torch.manual_seed(0)
    m = TinyLM(**kw).eval()
    with torch.no_grad():  # one block's weights far wider than the rest: it should be the most sensitive
        m.blocks[1].up.weight.mul_(8)
    return m


def calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(n)]


def test_sensitivity_rows_bytes_and_the_model_left_alone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = sensitivity(model, calib(), FORMATS, samples=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = ["emb"] + [f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "up", "down")] + ["head"]
    assert s.layers == names and list(s.blocks) == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(s.rows) == (len(names) + 3) * len(FORMATS) and s.samples == 8
    for n in names:
        e = [s.get(n, f)["effect"] for f in FORMATS]
        b = [s.get(n, f)["bytes"] for f in FORMATS]
        assert 0 < e[0] < e[2] and b[0] > b[1] > b[2], n
    # Bytes are what the quantized layer stores: a uniform model's stored size is predicted exactly.
    for f in FORMATS:
        q = lowbit.quantize(tiny(), f)
        predicted = s.other_bytes + sum(s.get(n, f)["bytes"] for n in names)
        assert stored_bytes(q) == predicted, f
    # The widened layer is the most sensitive up-projection, and its block the most sensitive block.
    ups = {i: s.get(f"blocks.{i}.up", "int2-g32")["effect"] for i in range(3)}
    assert max(ups, key=ups.get) == 1
    blocks = {b: s.get(b, "int2-g32")["effect"] for b in s.blocks}
    assert max(blocks, key=blocks.get) == "blocks.1"
    corr = proxy_correlations(s)
    assert -1 <= corr["sqnr_db"] <= 1 and -1 <= corr["hessian_error"] <= 1
    assert "| blocks.1 |" in s.to_markdown("block")


def test_replayed_blocks_give_the_full_runs_numbers(monkeypatch):
    fast = sensitivity(tiny(), calib(), ["int2-g32"], samples=8)
    monkeypatch.setattr(sens_mod._Runner, "MAX_RECORD_BYTES", 0)  # no recording: every run a full pass
    slow = sensitivity(tiny(), calib(), ["int2-g32"], samples=8)
    for a, b in zip(fast.rows, slow.rows):
        assert a["part"] == b["part"] and a["effect"] == pytest.approx(b["effect"], rel=1e-5)


def test_kl_for_logits_and_padding_left_out():
    data = calib()
    for b in data:
        b["attention_mask"] = torch.ones(4, 12, dtype=torch.long)
        b["attention_mask"][:, 9:] = 0
    s = sensitivity(tiny(logits=True), data, ["int2-g32"], samples=8)
    assert s.effect_name == "kl" and all(r["effect"] > 0 for r in s.rows)
    # Changing the padded positions' tokens changes nothing measured.
    other = copy.deepcopy(data)
    for b in other:
        b["ids"][:, 9:] = 0
    s2 = sensitivity(tiny(logits=True), other, ["int2-g32"], samples=8)
    for a, b in zip(s.rows, s2.rows):
        if a["part"] != "emb":  # the padded ids' rows are looked up, but their outputs are left out
            assert a["effect"] == pytest.approx(b["effect"], rel=1e-4)
    with pytest.raises(ValueError, match="logits"):
        sensitivity(tiny(), calib(), ["int8"], metric="kl")
    with pytest.raises(ValueError, match="activations"):
        sensitivity(tiny(), calib(), ["w8a8-dynamic"])


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def held_out_score(model):
    """Higher is better: minus the relative output error against the float model on other data."""
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = tiny()(ids), model(ids)
    return -float((out - ref).norm() / ref.norm())


def test_search_within_a_size_budget():
    model = tiny()
    s = sensitivity(model, calib(), FORMATS, samples=8)
    sizes = {f: s.other_bytes + sum(s.get(n, f)["bytes"] for n in s.layers) for f in FORMATS}
    budget = (sizes["int4-g32"] + sizes["int2-g32"]) / 2 / 1e6  # between two uniform sizes
    r = search(model, calib(), held_out_score, {"max_size_mb": budget}, formats=FORMATS, sens=s, max_evals=3)
    assert r.chosen.bytes <= budget * 1e6 and stored_bytes(r.model) == r.chosen.bytes
    for p in r.points:  # every measured size was predicted exactly
        assert p.bytes == p.predicted_bytes, p.label
    fits = [p for p in r.points if p.kind != "float" and p.bytes <= budget * 1e6]
    assert r.chosen.metric == max(p.metric for p in fits)
    # Better than the uniform recipe that fits (int2-g32), since the budget allows more.
    uniform2 = next(p for p in r.points if p.label == "int2-g32")
    assert r.chosen.metric > uniform2.metric
    assert r.chosen.metric == pytest.approx(held_out_score(r.model))
    rules = dict(r.recipe.rules)
    assert "*" in rules and isinstance(r.recipe, lowbit.LayerRecipe)
    assert held_out_score(model) == 0.0  # the input model is not changed


def test_search_spends_its_evaluations_on_swaps_within_the_budget():
    model = tiny()
    s = sensitivity(model, calib(), FORMATS, samples=8)
    sizes = {f: s.other_bytes + sum(s.get(n, f)["bytes"] for n in s.layers) for f in FORMATS}
    budget = (sizes["int4-g32"] + sizes["int2-g32"]) / 2 / 1e6
    r = search(model, calib(), held_out_score, {"max_size_mb": budget}, formats=FORMATS, sens=s, max_evals=6,
               uniform=False)
    swaps = [p for p in r.points if p.label.startswith("swap")]
    assert len([p for p in r.points if p.kind != "float"]) == 6 and swaps
    for p in swaps:
        assert p.bytes == p.predicted_bytes <= budget * 1e6
    assert len({tuple(sorted(p.formats.items())) for p in r.points}) == len(r.points)  # none measured twice
    assert r.chosen.metric == max(p.metric for p in r.points if p.kind != "float")


def test_swaps_move_one_layer_up_and_one_down():
    from lowbit.search import _front, _key, _swaps

    s = sensitivity(tiny(), calib(), FORMATS, samples=8)
    front = _front(s, FORMATS)
    start = front[len(front) // 2]
    limit = start.predicted_bytes + 1000
    found = _swaps(s, FORMATS, start, limit, count=20)
    assert found
    effects = [p.predicted_effect for p in found]
    assert effects == sorted(effects)
    for p in found:
        changed = [n for n in s.layers if p.formats[n] != start.formats[n]]
        assert len(changed) == 2 and p.predicted_bytes <= limit
        grow = [s.get(n, p.formats[n])["bytes"] > s.get(n, start.formats[n])["bytes"] for n in changed]
        assert sorted(grow) == [False, True], changed
    skip = {_key(found[0].formats)}
    assert _swaps(s, FORMATS, start, limit, skip=skip)[0].formats == found[1].formats


def test_swaps_keep_within_a_latency_budget():
    from lowbit.search import _point, _swaps

    s = sensitivity(tiny(), calib(), FORMATS, samples=8)
    # Made-up timings where fewer bytes take longer (as a 2-bit kernel can, next to an 8-bit one): a byte
    # budget and a time budget then allow different swaps.
    lat = {"float": 0.01, "delta": {(n, f): 1e-9 * (10_000 - s.get(n, f)["bytes"]) for n in s.layers
                                    for f in FORMATS}}
    start = _point(s, dict.fromkeys(s.layers, "int4-g32"), "start", latency=lat)
    limit = start.predicted_latency_ms / 1e3
    found = _swaps(s, FORMATS, start, limit, count=50, latency=lat)
    assert found
    for p in found:
        assert p.predicted_latency_ms <= start.predicted_latency_ms * (1 + 1e-9)
    by_bytes = _swaps(s, FORMATS, start, start.predicted_bytes, count=50)
    assert any(p.predicted_bytes > start.predicted_bytes for p in found)  # time allows more bytes here
    assert all(p.predicted_bytes <= start.predicted_bytes for p in by_bytes)


def test_search_within_an_accuracy_budget(tmp_path):
    model = tiny()
    s = sensitivity(model, calib(), FORMATS, samples=8)
    r = search(model, calib(), held_out_score, {"max_drop": 0.05}, formats=FORMATS, sens=s, max_evals=6)
    assert r.baseline == 0.0 and r.drop(r.chosen) <= 0.05
    within = [p for p in r.points if p.kind != "float" and r.drop(p) <= 0.05]
    assert r.chosen.bytes == min(p.bytes for p in within)
    assert r.pareto() and all(p.metric is not None for p in r.pareto())
    out = write_report(r, tmp_path / "rep", metric_name="score")
    md = (out / "search.md").read_text()
    assert "| uniform |" in md and "**yes**" in md and (out / "search.html").is_file()
    with pytest.raises(ValueError, match="exactly one"):
        search(model, calib(), held_out_score, {"max_drop": 1, "max_size_mb": 1}, sens=s)


def test_command_line_search_and_sensitivity(tiny_bert_folder, tmp_path):
    from lowbit.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["sensitivity", str(tiny_bert_folder), "--formats", "int8,int2-g32", "--calib-size", "8",
                             "--samples", "8", "--report", str(tmp_path / "sens")])
    assert r.exit_code == 0, r.output
    assert "encoder.layer.1" in r.output and (tmp_path / "sens" / "sensitivity.md").is_file()
    r = runner.invoke(main, ["search", str(tiny_bert_folder), "--max-size-mb", "20", "--formats", "int8,int4-g32",
                             "--calib-size", "8", "--max-evals", "1", "--report", str(tmp_path / "rep"),
                             "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "chosen:" in r.output and (tmp_path / "rep" / "search.html").is_file()
    manifest = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert manifest["layer_recipe"]["rules"][-1][0] == "*"
    r = runner.invoke(main, ["search", str(tiny_bert_folder), "--calib-size", "8"])
    assert r.exit_code != 0 and "one budget" in r.output


def test_search_within_a_latency_budget():
    model = tiny()
    s = sensitivity(model, calib(), FORMATS, samples=8)
    r = search(model, calib(), held_out_score, {"max_latency_ms": 1e4}, formats=FORMATS, sens=s, max_evals=2)
    # Every point measured says how fast it ran, and the prediction is there for the searched ones.
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in r.points)
    assert all(p.predicted_latency_ms is not None for p in r.points if p.kind == "candidate")
    assert r.chosen.latency_ms <= 1e4 and r.chosen.kind != "float"
    assert r.pareto("latency")
    with pytest.raises(ValueError, match="predicted to run within"):
        search(model, calib(), held_out_score, {"max_latency_ms": 0.0}, formats=FORMATS, sens=s)


def test_latency_search_spends_its_evaluations_on_swaps_within_the_budget(monkeypatch):
    """With time standing in as a nanosecond per stored byte (measured and predicted alike, so the test does
    not depend on this machine's speed), the latency search runs as the size search does: the front, then
    swaps predicted within the budget."""
    search_mod = importlib.import_module("lowbit.search")  # lowbit.search is also the function
    model = tiny()
    s = sensitivity(model, calib(), FORMATS, samples=8)
    monkeypatch.setattr(search_mod, "time_model", lambda m, batch, iters=7: stored_bytes(m) * 1e-9)
    monkeypatch.setattr(search_mod, "layer_latencies", lambda m, sens, formats, rows: {
        "delta": {(n, f): (sens.get(n, f)["bytes"] - sens.float_bytes[n]) * 1e-9 for n in sens.layers
                  for f in formats}})
    sizes = {f: s.other_bytes + sum(s.get(n, f)["bytes"] for n in s.layers) for f in FORMATS}
    budget_ms = (sizes["int4-g32"] + sizes["int2-g32"]) / 2 * 1e-6
    r = search(model, calib(), held_out_score, {"max_latency_ms": budget_ms}, formats=FORMATS, sens=s, max_evals=6,
               uniform=False)
    swaps = [p for p in r.points if p.label.startswith("swap")]
    assert len([p for p in r.points if p.kind != "float"]) == 6 and swaps
    for p in swaps:
        assert p.predicted_latency_ms == pytest.approx(p.latency_ms) and p.latency_ms <= budget_ms
    assert r.chosen.metric == max(p.metric for p in r.points if p.kind != "float" and p.latency_ms <= budget_ms)


def test_front_is_the_least_predicted_change_for_every_size():
    """The front against brute force over every configuration of a synthetic sensitivity table: for any size
    limit, the best configuration within it is on the front, and no point on the front is beaten by a
    configuration at most its size (up to the front's resolution of the size range)."""
    import itertools
    import random

    from lowbit.search import _front
    from lowbit.sensitivity import Sensitivity

    rnd = random.Random(3)
    fmts = ["a", "b", "c"]
    layers = [f"l{i}" for i in range(6)]
    rows = []
    for n in layers:
        size = rnd.randint(50, 400)
        for j, f in enumerate(fmts):  # fewer bytes, more change, but not in proportion
            rows.append({"part": n, "kind": "layer", "format": f, "bytes": size * (4 - j),
                         "effect": rnd.random() * (j + 1) ** 2})
    s = Sensitivity(formats=fmts, rows=rows, layers=layers, other_bytes=10)
    table = {(r["part"], r["format"]): r for r in rows}
    configs = []
    for pick in itertools.product(fmts, repeat=len(layers)):
        configs.append((10 + sum(table[(n, f)]["bytes"] for n, f in zip(layers, pick)),
                        sum(table[(n, f)]["effect"] for n, f in zip(layers, pick))))
    for limit in (sorted(c[0] for c in configs)[i] for i in (0, 50, 200, 400, 700)):
        front = _front(s, fmts, limit=limit - 10)
        best = min(e for b, e in configs if b <= limit)
        on = [p for p in front if p.predicted_bytes <= limit]
        assert on and on[0].predicted_effect == pytest.approx(best), limit
        assert front[-1].predicted_bytes == min(c[0] for c in configs)
    front = _front(s, fmts, keep=10**6)
    assert [p.predicted_bytes for p in front] == sorted((p.predicted_bytes for p in front), reverse=True)
    assert all(a.predicted_effect < b.predicted_effect for a, b in itertools.pairwise(front))

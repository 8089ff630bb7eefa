"""Weight-only layers choose their kernel by the number of rows of each call, from timings at a few row counts."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import autotune
from lowbit.backends import KERNELS, Kernel, format_route, lowbit_cpu, onednn, parse_route
from lowbit.modules import QuantLinear
from lowbit.recipes import parse_recipe
from lowbit_workbench.demo import kernel_note

needs_kernel = pytest.mark.skipif(not lowbit_cpu.available(), reason="lowbit._C not built or no AVX2/FMA here")


def fake_rows(fast_below: str, fast_above: str, switch_after: int):
    """time_rows stand-in: `fast_below` is fastest at up to `switch_after` rows, `fast_above` beyond; every
    other kernel is slower than both, float in between."""
    calls = []

    def time_rows(make_fns, rows=autotune.TUNE_ROWS):
        out = {}
        for r in rows:
            names = set(make_fns(r))
            calls.append((r, sorted(names)))
            win, lose = (fast_below, fast_above) if r <= switch_after else (fast_above, fast_below)
            out[str(r)] = {n: 1.0 if n == win else 2.0 if n == lose else 1.5 if n == autotune.FLOAT else 3.0
                           for n in names | {fast_below, fast_above}}
        return out

    return time_rows, calls


def record_runs(monkeypatch, names, model):
    """Record (kernel, rows) for every call the named kernels get; the layers of `model` re-derive their
    forms afterwards, so that the calls they bound (Kernel.bind) are the recording ones."""
    ran = []
    for name in names:
        kernel = KERNELS[name]
        monkeypatch.setattr(kernel, "run", lambda x, *a, _run=kernel.run, _n=name: ran.append((_n, x.shape[0]))
                            or _run(x, *a))
        if kernel.eager is not None:  # the direct call eager layers make (rows: all but the last dimension)
            def bind(prep, spec, _bind=kernel.bind, _n=name):
                call = _bind(prep, spec)
                return lambda x, bias: ran.append((_n, x.numel() // x.shape[-1])) or call(x, bias)
            monkeypatch.setattr(kernel, "bind", bind)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_kernel(m.kernel_name)
    return ran


@needs_kernel
def test_calls_take_the_kernel_measured_fastest_for_their_row_count(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    timer, calls = fake_rows("lowbit_cpu", "dequant", switch_after=16)
    monkeypatch.setattr(autotune, "time_rows", timer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    q = lowbit.quantize(model, "int4-g32")
    assert [r for r, _ in calls] == list(autotune.TUNE_ROWS)  # one measurement, at every row count
    layer = q[0]
    # switch between the measured 16 and 128 rows, at their geometric mean
    assert layer.kernel_name == "lowbit_cpu<=45,dequant"
    assert lowbit.summary(q)[0]["kernel"] == "lowbit_cpu<=45,dequant"
    assert kernel_note(q) == "lowbit_cpu<=45,dequant (simulated) x1"  # the demo's kernel column
    ran = record_runs(monkeypatch, ["lowbit_cpu", "dequant"], q)
    for rows in (8, 45, 46, 512):
        x = torch.randn(rows, 64)
        y = layer(x)
        assert torch.allclose(y, F.linear(x, layer.dequantized_weight(), layer.bias), rtol=1e-4, atol=1e-5)
    assert ran == [("lowbit_cpu", 8), ("lowbit_cpu", 45), ("dequant", 46), ("dequant", 512)]
    # leading dimensions count as rows: 2 x 40 = 80 rows
    ran.clear()
    layer(torch.randn(2, 40, 64))
    assert ran == [("dequant", 80)]


@needs_kernel
def test_many_row_kernels_are_timed_only_at_many_rows_and_the_route_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    seen = []

    def time_calls(fns, **kw):  # the GEMM on the dequantized weight wins wherever it is timed
        seen.append(sorted(fns))
        return {n: 0.5 if n == "lowbit_gemm" else 1.0 if n == autotune.FLOAT else 2.0 for n in fns}

    monkeypatch.setattr(autotune, "time_calls", time_calls)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = lowbit.quantize(model, "int4-g32")
    assert len(seen) == len(autotune.TUNE_ROWS)  # both layers share one shape: measured once
    for rows, names in zip(autotune.TUNE_ROWS, seen):
        assert ("lowbit_gemm" in names) == (rows >= KERNELS["lowbit_gemm"].min_rows), (rows, names)
        assert "lowbit_cpu" in names and autotune.FLOAT in names
    small = min(r for r in autotune.TUNE_ROWS if r >= KERNELS["lowbit_gemm"].min_rows)
    before = max(r for r in autotune.TUNE_ROWS if r < small)
    route = q[0].kernel_name
    assert parse_route(route)[-1] == (None, "lowbit_gemm") and parse_route(route)[0][0] == int((before * small) ** 0.5)
    # slower than float at few rows (2.0 against 1.0): reported, with the row counts
    assert any("slower than float" in str(w.message) for w in caught)
    note = q.lowbit_slower_layers[0]
    assert note["rows"] == [r for r in autotune.TUNE_ROWS if r < small] and "0.50x of float at 1 row" in note["reason"]
    cache = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    [entry] = [v for k, v in next(iter(cache.values())).items() if k.startswith("rows=")]
    assert set(entry) == {str(r) for r in autotune.TUNE_ROWS}
    # the second quantization reads the cache: nothing timed, the same route
    seen.clear()
    again = lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), "int4-g32")
    assert seen == [] and again[0].kernel_name == route


@needs_kernel
def test_routes_survive_save_and_load(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "time_rows", fake_rows("lowbit_cpu", "lowbit_gemm", switch_after=16)[0])
    torch.manual_seed(0)
    def make():
        return nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32))

    q = lowbit.quantize(make(), "int3-g32")
    assert q[0].kernel_name == "lowbit_cpu<=45,lowbit_gemm"
    lowbit.save(q, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", model=make())
    assert loaded[0].kernel_name == q[0].kernel_name and loaded[2].kernel_name == q[2].kernel_name
    assert lowbit.summary(loaded) == lowbit.summary(q)
    for rows in (3, 300):
        x = torch.randn(rows, 96)
        assert torch.equal(loaded(x), q(x))


def test_a_route_of_one_kernel_is_its_name_and_bad_routes_are_refused():
    assert parse_route("dequant") == [(None, "dequant")]
    assert parse_route("a<=4, b<=300,c") == [(4, "a"), (300, "b"), (None, "c")]
    assert format_route([(4, "a"), (16, "a"), (None, "b")]) == "a<=16,b"
    for bad in ("a<=4", "a,b", "a<=x,b", "a<=16,b<=8,c", "a<=0,b", "", "<=4,b"):
        with pytest.raises(ValueError, match="malformed kernel route"):
            parse_route(bad)
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        QuantLinear.from_float(lin, parse_recipe("int4-g32"), kernel="dequant<=8,nope")
    with pytest.raises(ValueError, match="kernel 'bf16_mm' cannot run this layer"):
        QuantLinear.from_float(lin, parse_recipe("int4-g32"), kernel="dequant<=8,bf16_mm")


def test_route_keeps_its_kernel_or_form_on_near_ties(monkeypatch):
    t = {"1": {"a": 1.0, "b": 1.2, "float": 2.0}, "16": {"a": 1.0, "b": 0.97, "float": 2.0},
         "128": {"a": 2.0, "b": 1.0, "c": 0.98, "float": 2.0}, "512": {"a": 2.0, "b": 1.0, "c": 0.5, "float": 2.0}}
    # b is 3% faster at 16 rows: a tie, a stays; at 128 rows c is 2% faster than b but needs another form
    assert autotune.row_route(t, {"a": "p", "b": "p", "c": "q"}) == [(45, "a"), (256, "b"), (None, "c")]
    # without forms, every kernel is its own form: c wins at 128 rows already
    assert autotune.row_route(t) == [(45, "a"), (None, "c")]
    # within the tie margin the kernel preferred by `order` wins; past it, the faster
    assert autotune.row_route({"1": {"x": 1.0, "y": 0.95}}, order=["x", "y"]) == [(None, "x")]
    assert autotune.row_route({"1": {"x": 1.0, "y": 0.95}}) == [(None, "y")]
    assert autotune.row_route({"1": {"x": 1.0, "y": 0.8}}, order=["x", "y"]) == [(None, "y")]
    # past the GEMV range the last count stands for every larger call: 5% faster there is not a tie
    last = {"128": {"a": 1.0, "b": 1.2}, "512": {"a": 1.0, "b": 0.95}}
    assert autotune.row_route(last, {"a": "p", "b": "p"}) == [(256, "a"), (None, "b")]
    assert autotune.row_route({"128": {"a": 1.0, "b": 1.2}, "512": {"a": 1.0, "b": 0.99}}) == [(None, "a")]
    # the GEMV range is the kernel's own setting: 512 rows inside it is an ordinary count, where 5% is a tie
    monkeypatch.setattr(autotune, "gemv_rows", lambda: 1024)
    assert autotune.row_route(last, {"a": "p", "b": "p"}) == [(None, "a")]
    speed = autotune.route_speedups(t, [(45, "a"), (None, "c")])
    assert speed == {1: ("a", 2.0), 16: ("a", 2.0), 128: ("c", 2.0 / 0.98), 512: ("c", 4.0)}
    assert autotune.nearest_rows(4096, [1, 16, 128, 512]) == 512 and autotune.nearest_rows(3, [1, 16]) == 1
    assert autotune.nearest_rows(5, [1, 16]) == 16  # past sqrt(1 * 16) = 4


@needs_kernel
def test_routed_layer_compiles_without_breaks():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(64, 48), parse_recipe("int4-g32"), kernel="lowbit_cpu<=16,lowbit_gemm")
    model = nn.Sequential(layer, nn.GELU()).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for rows in (4, 100):
            x = torch.randn(rows, 64)
            assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        explained = torch._dynamo.explain(model)(torch.randn(100, 64))
    assert explained.graph_break_count == 0


def test_layers_kept_float_unless_faster_time_no_simulated_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    if not onednn.available():
        pytest.skip("oneDNN int8 ops not available: the simulated reference is the only kernel")
    seen = []
    monkeypatch.setattr(autotune, "time_calls", lambda fns, **kw: seen.append(sorted(fns)) or dict.fromkeys(fns, 1.0))
    lowbit.quantize(nn.Sequential(nn.Linear(32, 32)), "w8a8-dynamic")  # keeps float when no kernel beats it
    assert seen == [[autotune.FLOAT, "onednn"]]
    seen.clear()
    lowbit.quantize(nn.Sequential(nn.Linear(32, 32)), "w8a8-dynamic", keep_float_if_slower=False)
    assert seen == [[autotune.FLOAT, "onednn", "reference"]]


def test_large_layers_are_timed_at_fewer_rows():
    assert autotune.tune_rows(64, 64) == autotune.TUNE_ROWS
    # a 2k x 2k layer up to 128 rows; an LM head (128k x 2k) at 1 row only (16 would be 4 G multiply-adds)
    assert autotune.tune_rows(2048, 2048) == (1, 16, 128)
    assert autotune.tune_rows(128256, 2048) == (1,)
    assert autotune.tune_rows(10**9, 10**3) == (1,)  # always at least one row count
    assert autotune.tune_rows(1536, 384) == (1, 16, 128, 512)  # MiniLM's largest layers: up to 512 rows
    assert autotune.tune_rows(384, 384) == autotune.TUNE_ROWS  # its attention projections: every count


def test_direct_eager_calls_belong_to_the_kernel_that_runs():
    # A kernel's direct eager call must compute what its own `run` computes: a subclass that changes `run`
    # and inherited its parent's `eager` would silently run the parent's kernel.
    for kernel in KERNELS.values():
        if kernel.eager is None:
            continue
        owner_run = next(c for c in type(kernel).__mro__ if "run" in vars(c))
        owner_eager = next(c for c in type(kernel).__mro__ if "eager" in vars(c))
        assert owner_run is owner_eager, f"{kernel.name}: eager from {owner_eager.__name__}, run from {owner_run.__name__}"
        # The call a layer binds (Kernel.bind) is the base class's, which calls `eager`, or the eager's owner's.
        owner_bind = next(c for c in type(kernel).__mro__ if "bind" in vars(c))
        assert owner_bind in (Kernel, owner_eager), f"{kernel.name}: bind from {owner_bind.__name__}"


@needs_kernel
def test_layers_run_the_kernel_they_name(monkeypatch):
    torch.manual_seed(0)
    for name in ("lowbit_gemm", "lowbit_cpu"):
        q = lowbit.quantize(nn.Sequential(nn.Linear(64, 48)), "int4-g32", backend=name)
        ran = record_runs(monkeypatch, [name], q)
        q(torch.randn(1, 64))
        q(torch.randn(2, 70, 64))
        assert ran == [(name, 1), (name, 140)], (name, ran)

"""Per-layer SQNR report on a toy MLP: its numbers, its order, its use for `exclude=`, and its errors."""

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.modules import QuantModule
from lowbit.report import bits_per_weight, format_layer_report, layer_report, worst_layers

LINEARS = ["0", "2", "4"]
# The kernel autotuner's notes about tiny layers being faster in float are beside the point here.
pytestmark = pytest.mark.filterwarnings("ignore:.*slower than float:UserWarning")


def toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 64, generator=g) for _ in range(n)]


def quantized(model: nn.Module, recipe: str, **kw) -> nn.Module:
    return lowbit.quantize(copy.deepcopy(model), recipe, **kw)


def by_layer(rows: list[dict]) -> dict[str, dict]:
    return {r["layer"]: r for r in rows}


def test_rows_describe_every_quantized_layer():
    model = toy()
    q = quantized(model, "int8")
    rows = layer_report(model, q, calib())
    assert sorted(r["layer"] for r in rows) == LINEARS
    for r in rows:
        mod = q.get_submodule(r["layer"])
        assert r["type"] == "linear" and r["recipe"] == "int8" and r["kernel"] == mod.kernel_name
        assert r["calls"] == 4
        assert math.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 0
        assert r["rel_error"] == pytest.approx(10 ** (-r["sqnr_db"] / 20))


def test_quantized_layer_sees_the_float_input():
    # The last layer's figure must come from the float model's activations, not the quantized chain's.
    model = toy()
    q = quantized(model, "int2-g32")
    batches = calib()
    with torch.no_grad():
        signal = noise = 0.0
        for x in batches:
            h = model[:4](x)
            yf, yq = model[4](h).double(), q[4](h).double()
            signal += yf.square().sum().item()
            noise += (yq - yf).square().sum().item()
    row = by_layer(layer_report(model, q, batches))["4"]
    assert row["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert row["rel_error"] == pytest.approx(math.sqrt(noise / signal), rel=1e-9)


def test_int8_beats_int2_on_every_layer():
    model = toy()
    r8 = by_layer(layer_report(model, quantized(model, "int8"), calib()))
    r2 = by_layer(layer_report(model, quantized(model, "int2-g32"), calib()))
    for name in LINEARS:
        assert r8[name]["sqnr_db"] > r2[name]["sqnr_db"] + 10, name


def test_worst_first():
    # Layer 2 at 2 bits among 8-bit layers: it must come first, and the rest must be in rising order.
    model = toy()
    q = lowbit.quantize(copy.deepcopy(model), "int8", exclude=["2"])
    lowbit.quantize(q, "int2-g32")  # only layer 2 is still an nn.Linear
    rows = layer_report(model, q, calib())
    assert rows[0]["layer"] == "2" and rows[0]["recipe"] == "int2-g32"
    sqnr = [r["sqnr_db"] for r in rows]
    assert sqnr == sorted(sqnr)
    assert worst_layers(rows, 1) == ["2"]
    assert worst_layers(list(reversed(rows)), 2) == [r["layer"] for r in rows[:2]]
    assert worst_layers(rows, 0) == [] and len(worst_layers(rows, 10)) == 3


def test_excluding_the_worst_layer_keeps_it_float():
    model = toy()
    rows = layer_report(model, quantized(model, "int2-g32"), calib())
    worst = worst_layers(rows, 1)
    q = quantized(model, "int2-g32", exclude=worst)
    kept = q.get_submodule(worst[0])
    assert type(kept) is nn.Linear and not isinstance(kept, QuantModule)
    assert torch.equal(kept.weight, model.get_submodule(worst[0]).weight)
    again = layer_report(model, q, calib())
    assert worst[0] not in by_layer(again) and len(again) == 2


def test_identical_outputs_give_infinite_sqnr():
    # Weights already representable in fp16, upcast and multiplied as the float layer multiplies (the
    # dequant kernel; lowbit_half sums in another order): the fp16 layer computes exactly what the float one does.
    model = toy()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    rows = layer_report(model, quantized(model, "fp16", backend="dequant"), calib(1))
    assert all(r["sqnr_db"] == math.inf and r["rel_error"] == 0.0 for r in rows)
    assert "inf" in format_layer_report(rows)


def test_fused_relu_is_compared_with_float_relu():
    model = toy()
    q = quantized(model, "w8a8-static", calibration=calib(), backend="reference")
    assert q[0].relu and isinstance(q[1], nn.Identity)  # the ReLU after layer 0 now runs inside it
    rows = by_layer(layer_report(model, q, calib()))
    # Against the float layer's output before its ReLU, the negative half would count as noise (~3 dB).
    assert all(rows[n]["sqnr_db"] > 30 for n in LINEARS)


def test_calibration_forms_and_max_batches():
    model, batches = toy(), calib()
    q = quantized(model, "int4-g32")
    ref = by_layer(layer_report(model, q, batches))
    as_tuples = by_layer(layer_report(model, q, [(x,) for x in batches]))
    as_generator = by_layer(layer_report(model, q, (x for x in batches)))

    class Keyword(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    as_dicts = by_layer(layer_report(Keyword(model), Keyword(q), [{"x": x} for x in batches]))
    for name in LINEARS:
        for other in (as_tuples, as_generator):
            assert other[name]["sqnr_db"] == pytest.approx(ref[name]["sqnr_db"], rel=1e-9)
        assert as_dicts[f"inner.{name}"]["sqnr_db"] == pytest.approx(ref[name]["sqnr_db"], rel=1e-9)
    first = by_layer(layer_report(model, q, batches, max_batches=1))
    only_first = by_layer(layer_report(model, q, batches[:1]))
    assert all(first[n]["calls"] == 1 for n in LINEARS)
    assert first["4"]["sqnr_db"] == pytest.approx(only_first["4"]["sqnr_db"], rel=1e-9)
    assert first["4"]["sqnr_db"] != pytest.approx(ref["4"]["sqnr_db"], rel=1e-9)


def test_layer_never_reached_goes_last():
    class SkipsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = toy(), nn.Linear(32, 32)

        def forward(self, x):
            return self.body(x)

    model = SkipsLast().eval()
    rows = layer_report(model, quantized(model, "int8"), calib(1))
    assert rows[-1]["layer"] == "unused" and rows[-1]["calls"] == 0 and math.isnan(rows[-1]["sqnr_db"])
    assert worst_layers(rows, 1) != ["unused"]


def test_format_layer_report():
    model = toy()
    rows = layer_report(model, quantized(model, "int8"), calib(1))
    text = format_layer_report(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "recipe", "kernel"] and "SQNR dB" in lines[0]
    assert len(lines) == 2 + len(rows)
    for line, r in zip(lines[2:], rows):
        cells = line.split()
        assert cells[0] == r["layer"] and float(cells[4]) == pytest.approx(r["sqnr_db"], abs=0.005)


def test_errors():
    model = toy()
    q = quantized(model, "int8")
    with pytest.raises(ValueError, match="calibration is empty"):
        layer_report(model, q, [])
    with pytest.raises(ValueError, match="no quantized layers"):
        layer_report(model, copy.deepcopy(model), calib(1))
    with pytest.raises(ValueError, match="'2' .* missing from the float model"):
        layer_report(nn.Sequential(nn.Linear(64, 96)), q, calib(1))
    with pytest.raises(ValueError, match="same object"):
        layer_report(q, q, calib(1))
    with pytest.raises(TypeError, match="quantized too"):
        layer_report(quantized(model, "int4-g32"), q, calib(1))
    with pytest.raises(TypeError, match="iterable of model inputs"):
        layer_report(model, q, torch.randn(8, 64))
    with pytest.raises(ValueError, match="max_batches"):
        layer_report(model, q, calib(1), max_batches=0)
    with pytest.raises(ValueError, match="n must be"):
        worst_layers(layer_report(model, q, calib(1)), -1)
    # Hooks are removed even when a run fails: the float model computes as before.
    with pytest.raises(RuntimeError):
        layer_report(model, q, [torch.randn(2, 3)])
    assert all(not m._forward_hooks for m in model.modules())
    model.train()
    layer_report(model, q, calib(1))
    assert model.training  # left in the mode it came in


def with_norm_and_embedding() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 256), nn.Linear(256, 64), nn.LayerNorm(64), nn.Linear(64, 48)).eval()


@pytest.mark.parametrize("recipe", ["int8", "int4-g32", "int3-g64", "kmeans4", "kmeans4-g64", "bf16", "ternary",
                                    "w8a8-dynamic"])
def test_bits_per_weight_is_what_the_checkpoint_stores(recipe, tmp_path):
    from lowbit.safetensors_io import read_header

    model = with_norm_and_embedding()
    float_values = sum(t.numel() for t in model.state_dict().values())
    q = lowbit.quantize(copy.deepcopy(model), recipe, backend="reference" if "w8a8" in recipe else "auto")
    bits = bits_per_weight(q)
    header, _ = read_header(lowbit.save(q, tmp_path / "ckpt") / "model.safetensors")
    size = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()}
    layers = {r["layer"]: math.prod(r["shape"]) for r in lowbit.summary(q) if r["kernel"] != "float"}
    assert layers, "nothing was quantized"
    stored = sum(n for k, n in size.items() if k.split(".")[0] in layers and not k.endswith(".bias"))
    assert bits["quantized"] == pytest.approx(8 * stored / sum(layers.values()))
    assert bits["model"] == pytest.approx(8 * sum(size.values()) / float_values)
    assert bits["quantized_weights"] == sum(layers.values()) and bits["values"] == float_values


def test_codebooks_and_scales_are_counted():
    model = nn.Sequential(nn.Linear(1024, 32)).eval()
    bits = {r: bits_per_weight(quantized(model, r))["quantized"] for r in ("kmeans4", "kmeans4-g64", "int4-g32")}
    # 16 codebook entries per row of 1024 weights cost a quarter bit; per group of 64 they cost 4 bits.
    assert 4.0 < bits["kmeans4"] < 4.5
    assert 3.5 < bits["kmeans4-g64"] - bits["kmeans4"] < 4.0
    assert bits["kmeans4"] < bits["int4-g32"] < bits["kmeans4-g64"]
    fp32 = bits_per_weight(model)
    assert math.isnan(fp32["quantized"]) and fp32["model"] == 32.0

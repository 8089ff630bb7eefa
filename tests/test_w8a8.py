"""W8A8: activation quantization ops, int8 kernels against their float reference, calibration, ReLU and
BatchNorm folding, the measured kernel choice, checkpoints, and the MNIST CNN on real data."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import autotune, formats
from lowbit.backends import lowbit_cpu, onednn
from lowbit.recipes import parse_recipe
from lowbit.w8a8 import FusedReLU, W8A8Conv, W8A8Linear, fake_quant_rows, fake_quant_tensor
from lowbit_workbench import vision

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 ops not available here")
needs_kernel = pytest.mark.skipif(not lowbit_cpu.available(), reason="lowbit._C not available")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def calib(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------- the C++ activation ops


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 7), (37, 203), (64, 384), (5, 1)])
def test_quantize_rows_matches_its_definition(shape):
    C = lowbit_cpu.ops()
    x = torch.randn(*shape) * 3
    x[0] = 0.0  # an all-zero row gets the smallest step, not a division by zero
    if shape[0] > 2:
        x[1] = x[1].abs() + 1  # all positive: the range still includes 0
    q, s, z = C.quantize_rows_u8(x)
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    s_ref = ((hi - lo) / 255).clamp(min=1e-12)
    inv = 1 / s_ref
    z_ref = torch.round(-lo * inv).clamp(0, 255)
    q_ref = (torch.round(x * inv[:, None]) + z_ref[:, None]).clamp(0, 255).to(torch.uint8)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref.int()) and torch.equal(q, q_ref)
    # and dequantizing recovers x to half a step
    err = ((q.float() - z[:, None]) * s[:, None] - x).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()


@needs_kernel
def test_quantize_rows_rejects_nan():
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        lowbit_cpu.ops().quantize_rows_u8(x)


@needs_kernel
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_quantize_tensor_keeps_layout_and_clamps(layout):
    x = (torch.randn(2, 5, 7, 9) * 20).contiguous(memory_format=layout)
    q = lowbit_cpu.ops().quantize_u8(x, 10.0, 100)
    assert q.is_contiguous(memory_format=layout)
    assert torch.equal(q, (torch.round(x * 10.0) + 100).clamp(0, 255).to(torch.uint8))
    assert int(q.min()) == 0 and int(q.max()) == 255  # values far out of range clamp


@needs_kernel
def test_row_epilogue():
    y = torch.randn(33, 19)
    sx, sxz, csw, b = torch.rand(33), torch.rand(33), torch.randn(19), torch.randn(19)
    ref = y * sx[:, None] - sxz[:, None] * csw[None] + b
    lowbit_cpu.ops().row_epilogue_(y, sx, sxz, csw, b)
    assert (y - ref).abs().max() < 1e-5


# ---------------------------------------------------------------- kernels against the reference


@needs_onednn
@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-static"])
@pytest.mark.parametrize("k,n,bias", [(64, 48, True), (37, 5, False), (384, 1536, True)])
def test_linear_int8_kernel_matches_reference(recipe, k, n, bias):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    x = torch.randn(3, 11, k) * 2
    data = [t * 2 for t in calib((8, k))]  # calibrated on the distribution it then sees
    q = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), recipe, calibration=data, backend="onednn")[0]
    assert isinstance(q, W8A8Linear) and q.kernel_name == "onednn" and not q.simulated
    y = q(x)
    q.set_kernel("reference")
    ref = q(x)
    assert y.shape == (3, 11, n) and rel_err(y, ref) < 1e-5
    # the reference is what its docstring says: quantized activations times dequantized weights
    x2 = x.reshape(-1, k)
    xq = fake_quant_tensor(x2, *q.act_qparams) if q.static else fake_quant_rows(x2)
    assert rel_err(ref.reshape(-1, n), F.linear(xq, q.dequantized_weight(), q.bias)) < 1e-6
    # and close to float (static ranges come from other data, so looser)
    assert rel_err(y, lin(x)) < (0.02 if recipe == "w8a8-dynamic" else 0.05)


@needs_onednn
@needs_kernel
@pytest.mark.parametrize("rows", [1, 4])
def test_dynamic_few_rows_take_the_gemv_on_the_same_codes(rows):
    torch.manual_seed(0)
    lin = nn.Linear(200, 72)
    q = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), "w8a8-dynamic", backend="onednn")[0]
    x = torch.randn(rows, 200)
    # activations stay float32 on this path: exactly x @ dequant(W).T up to summation order
    assert rel_err(q(x), F.linear(x, q.dequantized_weight(), q.bias)) < 1e-5
    xs = torch.randn(lowbit.w8a8.GEMV_MAX_ROWS + 1, 200)
    assert rel_err(q(xs), F.linear(fake_quant_rows(xs), q.dequantized_weight(), q.bias)) < 1e-5


@needs_onednn
@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 16, 3, padding=1),
    nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),  # depthwise
    nn.Conv2d(8, 12, 3, stride=2, groups=4),  # grouped
    nn.Conv2d(16, 8, 1),
    nn.Conv1d(6, 10, 5, padding=2),
    nn.Conv1d(8, 8, 3, groups=8),
])
def test_conv_int8_kernel_matches_reference(conv):
    torch.manual_seed(0)
    shape = (4, conv.in_channels, 15, 15) if isinstance(conv, nn.Conv2d) else (4, conv.in_channels, 30)
    model = nn.Sequential(conv).eval()
    x = torch.randn(*shape)
    q = lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=calib(shape), backend="onednn")
    assert isinstance(q[0], W8A8Conv) and q[0].kernel_name == "onednn"
    y = q(x)
    q[0].set_kernel("reference")
    assert rel_err(y, q(x)) < 1e-5
    assert rel_err(y, model(x)) < 0.03


def test_weights_beyond_the_safe_range_never_reach_the_saturating_kernel(monkeypatch):
    """Codes in [-127, 127] (a VNNI machine's) on a CPU where int8 pairs saturate: reference path only."""
    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Linear(32, 16)), "w8a8-dynamic", backend="reference")[0]
    full = formats.AffineScheme(8, symmetric=True, signed=True, qmax=127)  # a VNNI machine's range
    q.qweight.copy_(full.encode(torch.randn(16, 32))["qweight"])
    monkeypatch.setattr(onednn, "weight_qmax", lambda: 63)
    assert q.candidate_kernels() == ["reference"]
    with pytest.raises(ValueError, match="saturate"):
        q.set_kernel("onednn")


def test_w8a8_weights_are_per_channel_symmetric_within_the_safe_range():
    w = torch.randn(24, 40)
    w[3] *= 100  # one loud channel does not coarsen the others
    state = lowbit.w8a8.weight_scheme(parse_recipe("w8a8-dynamic")).encode(w)
    codes, scale = state["qweight"], state["scale"]
    assert codes.dtype == torch.int8 and scale.shape == (24,)
    assert int(codes.abs().max()) == onednn.weight_qmax()
    assert (codes.abs().amax(1) == onednn.weight_qmax()).all()
    assert rel_err(codes.float() * scale[:, None], w) < 0.02


# ---------------------------------------------------------------- calibration and graph rewrites


def test_calibration_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="pass calibration"):
        lowbit.quantize(copy.deepcopy(model), "w8a8-static")
    with pytest.raises(ValueError, match="empty"):
        lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=[])
    with pytest.raises(ValueError, match="too small: 2 sample"):
        lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=[torch.randn(2, 8)])
    with pytest.raises(TypeError, match="iterable of model inputs"):
        lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=torch.randn(16, 8))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x)  # b never runs

    with pytest.raises(ValueError, match="no input during calibration.*: b;"):
        lowbit.quantize(Branchy(), "w8a8-static", calibration=calib((8, 8)))


def test_calibration_accepts_tuples_and_dicts():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x, scale=1.0):
            return self.lin(x * scale)

    for data in ([(t, 2.0) for t in calib((8, 8))], [{"x": t, "scale": 2.0} for t in calib((8, 8))]):
        q = lowbit.quantize(TwoInputs(), "w8a8-static", calibration=data, backend="reference")
        s, z = q.lin.act_qparams
        assert s > 0 and 0 <= z <= 255


def test_observer_is_part_of_the_recipe():
    """Planted outliers in the calibration data: min-max stretches the range over them, the percentile
    observer clips them, so inputs without outliers see a finer grid and less output error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    data = calib((256, 64), n=8)
    for t in data:
        t[0, 0] = 80.0  # one huge activation in 16384 (below the percentile observer's 0.01% tail)
    x = torch.cat(calib((64, 64), n=4, seed=1))
    errs = {}
    for recipe in ("w8a8-static", "w8a8-static-percentile"):
        q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=data, backend="reference")
        assert q[0].config.observer == ("percentile" if recipe.endswith("percentile") else "minmax")
        errs[recipe] = rel_err(q(x), model(x))
    assert errs["w8a8-static-percentile"] < errs["w8a8-static"] / 2, errs


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))  # functional relu after a BN: fold, then fuse
        y = self.shared(y + 1.0)  # a ReLU whose input is not a layer: stays
        return self.shared(self.fc(y.mean((2, 3))))  # same module again, after a layer


def test_relu_fusion_and_batchnorm_folding():
    torch.manual_seed(0)
    model = FunctionalRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 10, 10)
    ref = model(x)
    q = lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=calib((4, 3, 10, 10)), backend="reference")
    assert isinstance(q.bn, nn.Identity)  # folded into the conv
    assert q.conv.relu and q.fc.relu  # both layers feed a ReLU only
    assert isinstance(q.shared, nn.ReLU)  # one of its calls follows no layer, so it stays
    assert rel_err(q(x), ref) < 0.03

    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU()).eval()
    qs = lowbit.quantize(copy.deepcopy(seq), "w8a8-static", calibration=calib((4, 3, 10, 10)), backend="reference")
    assert isinstance(qs[1], FusedReLU) and isinstance(qs[3], FusedReLU)
    assert rel_err(qs(x), seq(x)) < 0.03


def test_unsupported_conv_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(256, 4))
    with pytest.raises(ValueError, match="layer '0'.*padding.*exclude it"):
        lowbit.quantize(model, "w8a8-static", calibration=calib((4, 3, 8, 8)))
    q = lowbit.quantize(model, "w8a8-static", calibration=calib((4, 3, 8, 8)), exclude=["0"])
    assert isinstance(q[0], nn.Conv2d)


# ---------------------------------------------------------------- backend="auto"


def fake_timer(slow: set[str]):
    """time_calls stand-in: kernels named in `slow` take 2 s, the float layer 1 s, the rest 0.5 s."""
    calls = []

    def time_calls(fns, **kw):
        calls.append(sorted(fns))
        return {name: 2.0 if name in slow else 1.0 if name == autotune.FLOAT else 0.5 for name in fns}

    return time_calls, calls


def test_auto_keeps_slower_layers_in_float_and_says_so(monkeypatch):
    timer, calls = fake_timer(slow={"onednn", "reference"})
    monkeypatch.setattr(autotune, "time_calls", timer)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    with pytest.warns(UserWarning, match=r"4 layer\(s\) kept in float.*fastest kernel"):
        q = lowbit.quantize(model, "w8a8-dynamic")
    assert all(isinstance(m, nn.Linear) for m in (q[0], q[2], q[3], q[4]))
    assert [n["layer"] for n in q.lowbit_float_layers] == ["0", "2", "3", "4"]
    assert len(calls) == 3  # three distinct shapes; the two 16->16 layers share one measurement
    assert any(r["kernel"] == "float" for r in lowbit.summary(q))


def test_auto_picks_the_fastest_and_caches_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    timer, calls = fake_timer(slow={"reference"})
    monkeypatch.setattr(autotune, "time_calls", timer)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is slower than float: no warning
        q = lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic")
    expected = "onednn" if onednn.available() else "reference"
    if expected == "onednn":
        assert q[0].kernel_name == "onednn" and q[2].kernel_name == "onednn"
    n_first = len(calls)
    cache = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    assert len(next(iter(cache.values()))) == n_first
    lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic")
    assert len(calls) == n_first  # the second time everything came from the cache


def test_weight_only_recipes_stay_quantized_when_slower(monkeypatch):
    timer, _ = fake_timer(slow={"lowbit_cpu", "torch_int4pack", "torch_int8pack", "dequant"})
    monkeypatch.setattr(autotune, "time_calls", timer)
    with pytest.warns(UserWarning, match="run slower than float here"):
        q = lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), "int4-g32")
    assert isinstance(q[0], lowbit.modules.QuantLinear) and q.lowbit_slower_layers[0]["layer"] == "0"


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-static", "w8a8-static-percentile"])
def test_checkpoint_round_trip_is_bit_exact(recipe, tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()

    backend = "onednn" if onednn.available() else "reference"
    q = lowbit.quantize(make(), recipe, calibration=calib((4, 3, 8, 8)), backend=backend)
    x = torch.randn(2, 3, 8, 8)
    lowbit.save(q, tmp_path / "ck")
    loaded = lowbit.load(tmp_path / "ck", model=make())
    assert torch.equal(q(x), loaded(x))
    assert [type(m) for m in q.modules()] == [type(m) for m in loaded.modules()]
    assert lowbit.summary(q) == lowbit.summary(loaded)
    twin = copy.deepcopy(loaded)  # the packed oneDNN weight is rebuilt, not copied
    assert torch.equal(twin(x), q(x))


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("observer", ["entropy", "mse"])
def test_mnist_cnn_other_observers(observer):
    """Post-ReLU activations are mostly exact zeros; entropy calibration once clipped them to 29% accuracy."""
    model = vision.load_mnist_model()
    x_train, _ = vision.load_mnist("train")
    data = [x_train[i:i + 64] for i in range(0, 512, 64)]
    q = lowbit.quantize(copy.deepcopy(model), f"w8a8-static-{observer}", calibration=data, backend="reference")
    assert vision.evaluate_mnist(model) - vision.evaluate_mnist(q) <= 0.5


def test_mnist_cnn_w8a8_static_within_0_2_points():
    """The shipped MNIST CNN (BatchNorms folded, ReLUs fused, depthwise conv) on its 2000-image eval split."""
    model = vision.load_mnist_model()
    fp32 = vision.evaluate_mnist(model)
    x_train, _ = vision.load_mnist("train")
    data = [x_train[i:i + 64] for i in range(0, 512, 64)]
    q = lowbit.quantize(copy.deepcopy(model), "w8a8-static", calibration=data,
                        backend="onednn" if onednn.available() else "reference")
    convs = [m for m in q.modules() if isinstance(m, W8A8Conv)]
    assert len(convs) == 4 and any(c.groups == 64 for c in convs)
    acc = vision.evaluate_mnist(q)
    assert fp32 > 99.0 and fp32 - acc <= 0.2, (fp32, acc)

"""Property tests for lowbit.formats: every weight format's encode / decode / fake quantization / storage."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import lowbit
from lowbit import core, formats
from lowbit.modules import QuantLinear
from lowbit.recipes import RECIPES, parse_recipe
from lowbit.w8a8 import W8A8Linear

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=20, deadline=None)

FAMILIES = ("int", "ternary", "binary", "kmeans", "float")
MANTISSA = {"fp16": 10, "bf16": 7, "fp8_e4m3": 3, "fp8_e5m2": 2}


# ---------------------------------------------------------------------------------------------------
# strategies


@st.composite
def cases(draw, families=FAMILIES):
    """(scheme, float32 weight): any family, layout, granularity and (padded or not) shape."""
    family = draw(st.sampled_from(families))
    rows = draw(st.integers(1, 5))
    group = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    gran = draw(st.sampled_from(["tensor", "channel", "group", "rows"]))
    if gran == "rows":  # blocks of several rows: one block size covers every granularity
        rows *= 2
    block = {"tensor": (None, None), "channel": (1, None), "group": (1, group), "rows": (2, group)}[gran]
    signed = family in ("int", "ternary", "binary") and draw(st.booleans())
    if family == "int":
        bits = draw(st.integers(2, 8))
        symmetric = signed or draw(st.booleans())
        qmax = draw(st.sampled_from([None, None, 1, 2 ** (bits - 1) - 1, 63 if bits == 8 else 1])) \
            if symmetric else None
        scheme = formats.AffineScheme(bits, symmetric, block, signed=signed, qmax=qmax)
    elif family == "ternary":
        scheme = formats.TernaryScheme(block, signed)
    elif family == "binary":
        scheme = formats.BinaryScheme(block, signed)
    elif family == "kmeans":
        scheme = formats.CodebookScheme(draw(st.integers(1, 3)), block)
    else:
        scheme = formats.FloatScheme(draw(st.sampled_from(sorted(MANTISSA))), block)
    cols = group * draw(st.integers(1, 4))
    if scheme.pads and gran in ("group", "rows"):
        cols += draw(st.integers(0, group - 1))  # inputs that do not fill the last group: zero-padded
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    elems = st.floats(-1.0, 1.0, width=32, allow_subnormal=False)
    w = torch.from_numpy(draw(arrays(np.float32, (rows, cols), elements=elems))) * scale
    shape = draw(st.sampled_from([(rows, cols), (rows, 1, cols), (rows, cols, 1, 1)]))
    return scheme, w.reshape(shape)


def per_element(param: torch.Tensor, scheme, shape) -> torch.Tensor:
    """A per-block parameter (on the block grid, or [N, Kp / G] as affine_codes gives it) at the weight's
    shape."""
    lay = scheme.layout(shape)
    block = lay.block if param.numel() == lay.blocks else (1, lay.block[1])
    full = core.broadcast_param(param.reshape(lay.n // block[0], -1), (lay.n, lay.kp), block)
    return full[:, :lay.k].reshape(shape)


def blocks_of(x2d: torch.Tensor, scheme, shape):
    """(block index grid position, values) for each block of the padded 2-D view, for naive checks."""
    lay = scheme.layout(shape)
    xp = torch.nn.functional.pad(x2d, (0, lay.kp - lay.k))
    br, bc = lay.block
    for i in range(0, lay.n, br):
        for j in range(0, lay.kp, bc):
            yield (slice(i, i + br), slice(j, j + bc)), xp[i:i + br, j:j + bc]


# ---------------------------------------------------------------------------------------------------
# encode -> decode


@FAST
@given(cases(), st.data())
def test_decode_rows_equals_the_rows_of_decode(case, data):
    """What an embedding lookup decodes: the gathered rows only, bit-identical to decoding everything."""
    scheme, w = case
    state = scheme.encode(w)
    lay = scheme.layout(w.shape)
    full = scheme.decode(state, w.shape).reshape(lay.n, lay.k)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, lay.n - 1), min_size=1, max_size=6))).reshape(-1, 1)
    codes = scheme.row_codes(state, w.shape)
    for kept in (codes, None):
        rows = scheme.decode_rows(state, w.shape, idx, kept)
        assert rows.shape == (idx.shape[0], 1, lay.k) and torch.equal(rows, full[idx])


@FAST
@given(cases())
def test_decode_of_encode_is_within_the_format_error(case):
    scheme, w = case
    state = scheme.encode(w)
    d = scheme.decode(state, w.shape)
    assert d.shape == w.shape and d.dtype == torch.float32
    err = (d - w).abs()
    if isinstance(scheme, formats.AffineScheme):
        _, s, _ = scheme.affine_codes(state, w.shape)
        step = per_element(s, scheme, w.shape)
        # half a step of the block's own grid, with float32 slack on the quotient. A scale rounded to float16
        # (half params) may come out up to 2^-11 of itself below the range's, so the grid can stop short of the
        # block's extreme by that much per step: up to 2^bits - 1 steps of it.
        slack = (2**scheme.bits - 1) * step * 2.0**-11 if scheme.half else 0.0
        assert (err <= 0.5 * step * (1 + 1e-5) + slack + 1e-6 * w.abs()).all()
    elif isinstance(scheme, formats.FloatScheme):
        m = MANTISSA[scheme.fmt]
        fi = torch.finfo(scheme.dtype)
        sub = fi.smallest_normal * 2.0 ** -m  # the smallest subnormal
        s = per_element(state["scale"], scheme, w.shape) if "scale" in state else torch.ones_like(w)
        assert (err <= w.abs() * 2.0 ** -(m + 1) + s * sub / 2 + 1e-6 * w.abs()).all()
    elif isinstance(scheme, formats.CodebookScheme):
        lay = scheme.layout(w.shape)
        book = state["codebook"].float().reshape(lay.blocks, -1)
        x2d = w.reshape(lay.n, lay.k)
        d2d = d.reshape(lay.n, lay.k)
        for b, (idx, xb) in enumerate(blocks_of(x2d, scheme, w.shape)):
            cols = min(idx[1].stop, lay.k) - idx[1].start
            if cols <= 0:
                continue
            xb = xb[:, :cols]
            nearest = (xb[..., None] - book[b]).abs().amin(-1)
            # each weight takes the nearest codebook entry (up to the fp16 rounding of the stored entries)
            tol = 2 * book[b].abs().max() * 2.0 ** -11 + 1e-6 * xb.abs()
            assert ((d2d[idx][:, :cols] - xb).abs() <= nearest + tol).all()
    else:  # ternary / binary: the definition, checked block by block
        lay = scheme.layout(w.shape)
        x2d, d2d = w.reshape(lay.n, lay.k).double(), d.reshape(lay.n, lay.k).double()
        for idx, xb in blocks_of(x2d, scheme, w.shape):
            db = torch.nn.functional.pad(d2d, (0, lay.kp - lay.k))[idx]
            real = torch.zeros_like(xb, dtype=torch.bool)
            real[:, :max(0, min(idx[1].stop, lay.k) - idx[1].start)] = True  # padding columns are not weights
            mags = db[real].abs()
            if isinstance(scheme, formats.BinaryScheme):
                a = max(xb.abs().mean().item(), core.SCALE_EPS)
                assert torch.allclose(mags, torch.full_like(mags, a), rtol=1e-5, atol=0)
                assert (torch.where(xb[real] >= 0, 1.0, -1.0) * db[real] > 0).all()
            else:
                delta = 0.7 * xb.abs().mean().item()
                far = (xb[real].abs() - delta).abs() > 1e-5 * delta  # away from the threshold's rounding
                big = xb[real].abs() > delta
                assert ((db[real] == 0) == ~big)[far].all()
                assert (torch.sign(db[real]) == torch.sign(xb[real]))[big & far].all()
                if big.any() and far.all():
                    a = xb[real][big].abs().sum().item() / xb.abs().gt(delta).sum().item()
                    assert torch.allclose(mags[big], torch.full_like(mags[big], a), rtol=1e-5, atol=0)


@FAST
@given(cases(("int", "ternary", "binary", "kmeans")))
def test_codes_lie_in_range_and_pack_densely(case):
    scheme, w = case
    state = scheme.encode(w)
    lay = scheme.layout(w.shape)
    u = scheme.codes(state, w.shape)
    assert u.dtype == torch.uint8 and u.shape == (lay.n, lay.kp) and int(u.max()) < 2 ** scheme.bits
    q = state["qweight"]
    if getattr(scheme, "signed", False) and scheme.bits == 8:
        assert q.dtype == torch.int8 and q.shape == w.shape  # int8 codes kept as they are
    else:
        assert q.dtype == torch.uint8 and q.numel() == math.ceil(lay.n * lay.kp * scheme.bits / 8)
    if isinstance(scheme, formats.CodebookScheme):
        return
    if scheme.zero is not None:  # symmetric: codes within +-qmax of the fixed zero point
        c, _ = scheme.int8_codes(state, w.shape)
        assert int(c.abs().max()) <= scheme.int8_qmax
        assert ((u.float() - scheme.zero) * scheme.mult).abs().max() <= scheme.int8_qmax
    else:
        _, _, z = scheme.affine_codes(state, w.shape)
        assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 2 ** scheme.bits - 1).all()


@FAST
@given(cases())
def test_storage_counts_every_tensor(case):
    scheme, w = case
    state = scheme.encode(w)
    assert set(state) == set(scheme.state_names) | ({"scale"} if "scale" in state else set())
    stored = sum(t.numel() * t.element_size() for t in state.values())
    # the estimate is exact (codebooks: fp16 unless a value does not fit, which these weights never hit;
    # 16-bit scales and zero points: a tensor with a value float16 cannot hold stays float32, 2 bytes more each)
    wide = sum(t.numel() for n, t in state.items() if n in ("scale", "zero_point") and t.dtype == torch.float32)
    assert scheme.nbytes(w.shape) + (2 * wide if getattr(scheme, "half", False) else 0) == stored
    numel = w.numel()
    assert scheme.bits_per_weight(w.shape, state) == pytest.approx(8 * stored / numel)
    # from the shape alone: 16-bit scales and zero points assumed (what the format stores unless a value
    # does not fit float16)
    assumed = stored - (2 * wide if getattr(scheme, "half", False) else 0)
    assert scheme.bits_per_weight(w.shape) == pytest.approx(8 * assumed / numel)


@FAST
@given(cases())
def test_state_round_trips_through_safetensors_bytes(case):
    scheme, w = case
    state = scheme.encode(w)
    back = st_load(st_save({k: v.contiguous() for k, v in state.items()}))
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        assert torch.equal(back[k].view(torch.uint8), state[k].contiguous().view(torch.uint8))
    assert torch.equal(scheme.decode(back, w.shape), scheme.decode(state, w.shape))


# ---------------------------------------------------------------------------------------------------
# fake quantization


@FAST
@given(cases())
def test_fake_quantize_is_decode_of_encode_with_straight_through_gradients(case):
    scheme, w = case
    w = w.clone().requires_grad_(True)
    y = scheme.fake_quantize(w)
    assert torch.equal(y.detach(), scheme.decode(scheme.encode(w.detach()), w.shape))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    y.backward(g)
    expected = g
    if isinstance(scheme, formats.AffineScheme) and not scheme.symmetric:
        # clamping stops the gradient where x / s + z rounds beyond the grid (the block maximum may)
        _, s, z = scheme.affine_codes(scheme.encode(w.detach()), w.shape)
        s, z = per_element(s, scheme, w.shape), per_element(z, scheme, w.shape)
        v = torch.round(w.detach() / s + z)
        expected = g * ((v >= 0) & (v <= 2 ** scheme.bits - 1))
    # x / s then * s: the unit gradient up to rounding (g * s is subnormal for an all-zero block's SCALE_EPS)
    assert torch.allclose(w.grad, expected, rtol=1e-3, atol=0) and torch.equal(w.grad == 0, expected == 0)


@FAST
@given(cases(("int", "ternary", "binary")), st.floats(0.25, 4.0))
def test_learned_scale_fake_quantizes_as_encode_with_that_scale(case, factor):
    scheme, w = case
    if not scheme.learns_scale:
        with pytest.raises(ValueError, match="zero points"):
            scheme.init_scale(w)
        return
    lay = scheme.layout(w.shape)
    param = (scheme.init_scale(w) * factor).requires_grad_(True)
    assert param.shape == lay.grid
    w = w.clone().requires_grad_(True)
    y = scheme.fake_quantize(w, param)
    state = scheme.encode(w.detach(), scale=scheme.learned_scale(param))
    assert torch.equal(y.detach(), scheme.decode(state, w.shape))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    used = scheme.learned_scale(param).detach()
    if getattr(scheme, "half", False):  # the forward computes with the scale as stored: float16 values
        used = core.half_scale(used)
    s = per_element(used.reshape(lay.grid).repeat_interleave(lay.block[0], 0), scheme, w.shape)
    x = w.detach()
    if isinstance(scheme, formats.AffineScheme):
        q = scheme.int8_qmax
        r = x / s
        inside = torch.round(r).abs() <= q
        # LSQ: d(q s)/ds = round(x/s) - x/s inside the range, +-qmax outside; to x: 1 inside, 0 outside
        dyds = torch.where(inside, torch.round(r) - r, torch.round(r).clamp(-q, q))
        assert torch.allclose(w.grad, g * inside, rtol=1e-3, atol=0)
        assert torch.equal(w.grad == 0, g * inside == 0)
        per = lay.block[0] * lay.block[1] * q
        size = (g.abs() * (1 + r.abs())).sum()  # autograd forms q - s * x / s**2: float rounding of that size
    else:
        dyds = torch.sign(scheme.decode(state, w.shape))  # the code's sign: value = s * sign
        assert torch.equal(w.grad, g)
        per = lay.block[0] * lay.block[1]
        size = g.abs().sum()
    pad = torch.nn.functional.pad((g * dyds).reshape(lay.n, lay.k), (0, lay.kp - lay.k))
    want = pad.reshape(lay.grid[0], lay.block[0], lay.grid[1], lay.block[1]).sum((1, 3)) / math.sqrt(per)
    # through |param| (clamped at SCALE_EPS: below it the scale stops moving)
    want = want * torch.sign(param.detach()) * (param.detach().abs() >= core.SCALE_EPS)
    assert torch.allclose(param.grad, want, rtol=1e-4, atol=1e-5 * float(size) / math.sqrt(per))


# ---------------------------------------------------------------------------------------------------
# bad input, granularity, kernels, registry


@pytest.mark.parametrize("scheme", [formats.AffineScheme(4), formats.AffineScheme(8, True, signed=True),
                                    formats.TernaryScheme(), formats.BinaryScheme((1, 4)),
                                    formats.CodebookScheme(2), formats.FloatScheme("fp8_e4m3"),
                                    formats.FloatScheme("bf16")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_rejected(scheme, bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="weight contains NaN/inf"):
        scheme.encode(w)
    if scheme.learns_scale:
        with pytest.raises(ValueError, match="NaN/inf"):
            scheme.init_scale(w)


def test_one_block_size_gives_every_granularity():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[:, 5] = 0.0
    for block, grid in {(None, None): (1, 1), (1, None): (6, 1), (1, 8): (6, 5), (3, 8): (2, 5),
                        (1, 16): (6, 3)}.items():  # 40 inputs in groups of 16: padded to 48
        for symmetric in (True, False):
            state = formats.AffineScheme(4, symmetric, block).encode(w)
            assert state["scale"].shape == grid and state["zero_point"].shape == grid
            if symmetric:
                assert (state["zero_point"] == 8).all()
            else:  # an integer zero point within the codes
                z = state["zero_point"]
                assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 15).all()
            # either way 0.0 is on the grid: zero weights decode to exactly zero
            assert (formats.AffineScheme(4, symmetric, block).decode(state, w.shape)[:, 5] == 0).all()
    # the int8 layout keeps one scale per output channel as a vector, [N, K / G] per group
    assert formats.AffineScheme(8, True, signed=True).encode(w)["scale"].shape == (6,)
    assert formats.TernaryScheme((1, 8), signed=True).encode(w)["scale"].shape == (6, 5)
    with pytest.raises(ValueError, match="group size 16 does not divide the layer's 40 inputs"):
        formats.BinaryScheme((1, 16), signed=True).encode(w)
    with pytest.raises(ValueError, match="symmetric"):
        formats.AffineScheme(4, False, signed=True)


def test_fixed_scale_and_zero_point_are_used_and_checked():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    sym = formats.AffineScheme(4, True, (1, 8))
    s = torch.full((4, 2), 0.05)
    s16 = s.half().float()  # 16-bit scales (the default): the given scale is rounded, then used
    assert s16[0, 0] != 0.05
    state = sym.encode(w, scale=s)
    assert state["scale"].dtype == torch.float16 and torch.equal(state["scale"].float(), s16)
    assert torch.equal(sym.decode(state, w.shape), (w / s16[0, 0]).round().clamp(-7, 7) * s16[0, 0])
    state = formats.AffineScheme(4, True, (1, 8), half_params=False).encode(w, scale=s)
    assert torch.equal(state["scale"], s)
    assert torch.equal(sym.decode(state, w.shape), (w / 0.05).round().clamp(-7, 7) * s[0, 0])
    with pytest.raises(ValueError, match="positive"):
        sym.encode(w, scale=-s)
    with pytest.raises(ValueError, match=r"3 values; the block grid \(4, 2\) needs 8"):
        sym.encode(w, scale=torch.ones(3))
    with pytest.raises(ValueError, match="zero point is fixed"):
        sym.encode(w, scale=s, zero_point=torch.zeros(4, 2))
    asym = formats.AffineScheme(3, False, (1, 8))
    z = torch.full((4, 2), 3.0)
    state = asym.encode(w, scale=s, zero_point=z)
    assert state["zero_point"].dtype == torch.float16 and torch.equal(state["zero_point"].float(), z)
    assert torch.equal(asym.codes(state, w.shape).float(), (w / s16[0, 0] + 3).round().clamp(0, 7))
    with pytest.raises(ValueError, match="together"):
        asym.encode(w, scale=s)
    with pytest.raises(ValueError, match="no scale"):
        formats.CodebookScheme(2).encode(w, scale=s)
    binary = formats.BinaryScheme((1, 8))  # a learned magnitude a: weight-only stores 2a with zero point 1/2
    state = binary.encode(w, scale=s)
    assert torch.equal(state["scale"], 2 * s) and torch.equal(binary.decode(state, w.shape).abs(),
                                                              torch.full_like(w, 0.05))


@FAST
@given(cases(("int", "ternary", "binary")))
def test_kernel_views_decode_to_the_same_weight(case):
    scheme, w = case
    state = scheme.encode(w)
    lay = scheme.layout(w.shape)
    d = scheme.decode(state, w.shape)
    u, s, z = scheme.affine_codes(state, w.shape)
    assert s.shape == z.shape == (lay.n, lay.kp // lay.block[1])
    ref = core.dequantize_affine(u, s, z, (1, lay.block[1]))[:, :lay.k].reshape(w.shape)
    assert torch.equal(ref, d)
    spec = scheme.kernel_spec(w.shape)
    if scheme.signed:
        assert spec is None and scheme.runs_on == "int8"
    else:
        assert (spec.n, spec.k, spec.bits, spec.group_size) == (lay.n, lay.kp, scheme.bits, lay.block[1])
        assert scheme.runs_on == "affine"
    if scheme.zero is not None:
        c, sc = scheme.int8_codes(state, w.shape)
        assert c.dtype == torch.int8
        c2 = c.reshape(lay.n, -1).float()
        full = core.broadcast_param(sc.reshape(lay.n // lay.block[0], -1).repeat_interleave(lay.block[0], 0),
                                    tuple(c2.shape), (1, lay.block[1]))
        assert torch.equal((c2 * full)[:, :lay.k].reshape(w.shape), d)


def test_every_recipe_has_its_scheme_and_layers_report_bits_per_weight():
    for recipe in RECIPES:
        config = parse_recipe(recipe)
        scheme = formats.scheme_for(config)
        assert type(scheme) is formats.SCHEMES[config.kind]
    with pytest.raises(ValueError, match="no int8 form"):
        formats.scheme_for(parse_recipe("kmeans4"), signed=True)
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    expected = {"int4-g128": 4 + 32 / 128, "int4-g128-fp32scales": 4 + 64 / 128, "int8": 8 + 32 / 256, "kmeans4": 4 + 16 * 16 / 256,
                "kmeans4-g64": 4 + 16 * 16 / 64, "ternary": 2 + 64 / 256, "fp16": 16, "fp8": 8 + 32 / 256}
    for recipe, bpw in expected.items():
        kernel = "dequant" if recipe[0] != "f" else "auto"
        layer = QuantLinear.from_float(lin, parse_recipe(recipe), kernel=kernel)
        assert layer.bits_per_weight == pytest.approx(bpw), recipe
        stored = sum(t.numel() * t.element_size() for n, t in layer.canonical_state().items() if n != "bias")
        assert layer.bits_per_weight == pytest.approx(stored * 8 / lin.weight.numel())  # what the state holds
        assert lowbit.summary(nn.Sequential(layer))[0]["bits_per_weight"] == layer.bits_per_weight
    w8 = W8A8Linear.from_float(lin, parse_recipe("w8a8-dynamic"), kernel="reference")
    assert w8.bits_per_weight == pytest.approx(8 + 32 / 256)
    assert w8.scheme.signed and w8.scheme.runs_on == "int8"


def test_quantize_takes_fixed_parameters_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    s, z = torch.full((16, 1), 0.02), torch.full((16, 1), 7.0)
    q = lowbit.quantize(model, "int4", backend="dequant", fixed={"0": {"scale": s, "zero_point": z}})
    assert torch.equal(q[0].scale, s.half()) and torch.equal(q[0].zero_point, z.half())
    assert not torch.equal(q[2].scale, torch.full_like(q[2].scale, 0.02))
    with pytest.raises(ValueError, match="does not quantize: 1"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), "int4", fixed={"1": {"scale": s}})

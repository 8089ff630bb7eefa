"""16-bit scales and zero points of weight-only integer formats: chosen as float16 values, stored as
float16, decoded from what is stored; GPTQ and HQQ fit with the rounded values; float32 on request and
in old checkpoints, which load as they were."""

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import lowbit
from lowbit import core, formats
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.modules import QuantLinear
from lowbit.recipes import QuantConfig, parse_recipe

FAST = settings(max_examples=60, deadline=None)


@st.composite
def weights(draw):
    """(weight-only AffineScheme with 16-bit parameters, float32 weight of ordinary magnitude)."""
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    group = draw(st.sampled_from([None, 4, 8, 16]))
    method = "rtn" if symmetric or group is None else draw(st.sampled_from(["rtn", "hqq"]))
    scheme = formats.AffineScheme(bits, symmetric, (1, group), method)
    rows = draw(st.integers(1, 6))
    cols = (group or 8) * draw(st.integers(1, 3)) + draw(st.integers(0, 3))
    scale = draw(st.sampled_from([0.1, 1.0, 300.0]))
    # magnitudes of 1/4 or more: every block's scale is then within float16's normal range (tiny blocks
    # keep float32, tested below)
    elems = st.one_of(st.floats(-1.0, -0.25, width=32), st.floats(0.25, 1.0, width=32))
    w = torch.from_numpy(draw(arrays(np.float32, (rows, cols), elements=elems))) * scale
    if draw(st.booleans()):
        w[0] = 0.0  # an all-zero row: its blocks' scales must stay float16-representable too
    return scheme, w


@FAST
@given(weights())
def test_stored_parameters_are_float16_and_decode_from_them(case):
    scheme, w = case
    assert scheme.half
    state = scheme.encode(w)
    s, z = state["scale"], state["zero_point"]
    assert s.dtype == z.dtype == torch.float16
    assert (s.float() >= core.HALF_TINY).all()
    lay = scheme.layout(w.shape)
    codes = core.unpack_bits(state["qweight"], scheme.bits, lay.n * lay.kp).reshape(lay.n, lay.kp)
    # (codes - zero) * scale from the stored float16 values, by hand, per element
    g = lay.block[1]
    sf = s.float().repeat_interleave(g, 1)
    zf = z.float().repeat_interleave(g, 1)
    expected = ((codes.float() - zf) * sf)[:, :lay.k]
    assert torch.equal(scheme.decode(state, w.shape), expected)
    # the codes are round-to-nearest under the stored parameters (what the encoder chose them with)
    xs = torch.nn.functional.pad(w, (0, lay.kp - lay.k)) / sf
    ref = (xs.round() + zf if scheme.symmetric else (xs + zf).round()).clamp(0, 2 ** scheme.bits - 1)
    if scheme.symmetric:
        q = scheme.int8_qmax
        ref = ref.clamp(scheme.zero - q, scheme.zero + q)
    assert torch.equal(codes.float(), ref)
    if not scheme.symmetric and scheme.method == "rtn":
        assert torch.equal(z.float(), z.float().round())
    # the float32 layout of the same format differs only by the scales' rounding
    wide = formats.AffineScheme(scheme.bits, scheme.symmetric, scheme.block, scheme.method, half_params=False)
    state32 = wide.encode(w)
    assert state32["scale"].dtype == torch.float32
    if scheme.method != "hqq":
        # (HQQ keeps, per group, the better of fits from two starting ranges, judged on what is stored: the
        # scales' rounding can tip that choice, so its two layouts may differ by more than the rounding.)
        assert torch.allclose(state32["scale"], s.float(), rtol=2 ** -11, atol=float(core.HALF_TINY))
    assert wide.nbytes(w.shape) - scheme.nbytes(w.shape) == 4 * lay.blocks


def test_scales_float16_cannot_hold_keep_the_tensor_float32():
    scheme = formats.AffineScheme(4, False, (1, 8))
    w = torch.randn(3, 16)
    w[1, :8] *= 1e-6  # one block of tiny nonzero values: its scale is below float16's normal range
    state = scheme.encode(w)
    assert state["scale"].dtype == torch.float32 and state["zero_point"].dtype == torch.float16
    wide = formats.AffineScheme(4, False, (1, 8), half_params=False)
    assert torch.equal(scheme.decode(state, w.shape), wide.decode(wide.encode(w), w.shape))
    assert scheme.bits_per_weight(w.shape, state) == pytest.approx(4 + 8 * 6 / 8)  # as stored
    big = formats.AffineScheme(8, True, (1, None)).encode(torch.full((2, 4), 1e7))  # scale beyond 65504
    assert big["scale"].dtype == torch.float32


def test_zero_blocks_decode_to_zero_with_float16_scales():
    for scheme in (formats.AffineScheme(4, False, (1, 8)), formats.AffineScheme(8, True, (1, None)),
                   formats.AffineScheme(3, False, (1, 8), "hqq")):
        w = torch.randn(2, 16)
        w[0] = 0.0
        state = scheme.encode(w)
        assert state["scale"].dtype == torch.float16
        assert torch.equal(scheme.decode(state, w.shape)[0], torch.zeros(16))


def test_gptq_quantizes_with_the_rounded_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    # A diagonal Hessian passes no error between columns: GPTQ's codes are then exactly round-to-nearest
    # under its scales, which shows which scales it rounded with (refit=False: the scales it rounded with,
    # not the ones solved after the codes).
    h = torch.diag(torch.rand(64) + 0.5)
    for symmetric in (False, True):
        codes, s, z = gptq_quantize(w, h, 4, 16, symmetric, half=True, refit=False)
        assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())
        ref_s, ref_z = core.choose_qparams_clipped(w, 4, 16, symmetric, torch.diag(h), half=True)
        assert torch.equal(s, ref_s) and torch.equal(z, ref_z)
        assert torch.equal(codes, core.quantize_affine(w, s, z, 4, (1, 16), symmetric=symmetric))
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    hx = x.T @ x
    codes, s, z = gptq_quantize(w, hx, 3, 16, False, half=True)
    out = core.dequantize_affine(codes, s, z, (1, 16))
    codes32, s32, z32 = gptq_quantize(w, hx, 3, 16, False)
    out32 = core.dequantize_affine(codes32, s32, z32, (1, 16))
    err, err32 = ((x @ (out - w).T) ** 2).mean(), ((x @ (out32 - w).T) ** 2).mean()
    assert err < 1.05 * err32  # the error correction still works with the rounded scales


def test_hqq_zero_points_are_float16_values_and_fit_the_codes():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    codes, s, z = hqq_quantize(w, 3, 32, half=True)
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())
    assert not torch.equal(z, z.round())  # fractional, as HQQ fits them
    assert torch.equal(codes, core.quantize_affine(w, s, z, 3, (1, 32)))
    err = (core.dequantize_affine(codes, s, z, (1, 32)) - w).abs().pow(0.7).sum()
    codes32, s32, z32 = hqq_quantize(w, 3, 32)
    err32 = (core.dequantize_affine(codes32, s32, z32, (1, 32)) - w).abs().pow(0.7).sum()
    assert err < 1.01 * err32


def test_learned_scales_fake_quantize_as_encode_stores_them():
    torch.manual_seed(0)
    scheme = formats.AffineScheme(4, True, (1, 16))
    w = torch.randn(4, 32, requires_grad=True)
    param = (scheme.init_scale(w) * 1.037).requires_grad_()  # not a float16 value
    fake = scheme.fake_quantize(w, param)
    state = scheme.encode(w, scale=scheme.learned_scale(param))
    assert state["scale"].dtype == torch.float16
    assert torch.equal(fake.detach(), scheme.decode(state, w.shape))
    fake.pow(2).sum().backward()
    assert param.grad is not None and param.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_recipe_option_and_config_round_trip():
    c = parse_recipe("int4-g128-gptq-fp32scales")
    assert (c.bits, c.group_size, c.method, c.scale_dtype) == (4, 128, "gptq", "float32")
    assert c.name == "int4-g128-gptq-fp32scales" and parse_recipe(c.name) == c
    assert QuantConfig.from_dict(c.to_dict()) == c
    d = parse_recipe("int4-g128").to_dict()
    assert "scale_dtype" not in d  # the default is not written: manifests read as they always did
    assert QuantConfig.from_dict(d).scale_dtype == "float16"
    assert not formats.scheme_for(c).half and formats.scheme_for(parse_recipe("int8")).half
    assert not formats.scheme_for(parse_recipe("int8"), signed=True).half  # the int8 kernels' layout
    for bad in ("w8a8-dynamic-fp32scales", "kmeans4-fp32scales", "int4-a8-fp32scales"):
        with pytest.raises(ValueError, match="weight-only integer"):
            parse_recipe(bad)
    with pytest.raises(ValueError, match="unknown scale dtype"):
        QuantConfig("int", 4, scale_dtype="bfloat16")


def test_w8a8_scales_stay_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    q = lowbit.quantize(model, "w8a8-dynamic", backend="reference")
    assert q[0].scale.dtype == torch.float32


def test_summary_counts_two_bytes_per_scale_and_zero_point():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    for recipe, per_group in (("int4-g32", 4), ("int4-g32-fp32scales", 8)):
        q = lowbit.quantize(nn.Sequential(lin), recipe, backend="dequant")
        bpw = lowbit.summary(q)[0]["bits_per_weight"]
        assert bpw == pytest.approx(4 + 8 * per_group / 32)
        assert q[0].scale.dtype == (torch.float16 if per_group == 4 else torch.float32)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 24), nn.GELU(), nn.Linear(24, 8))


def test_float16_parameters_survive_save_and_load(tmp_path):
    x = torch.randn(5, 40)
    q = lowbit.quantize(_model(), "int3-g8")
    lowbit.save(q, tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt", model=_model())
    for m in (loaded[0], loaded[2], loaded[4]):
        assert isinstance(m, QuantLinear)
        assert m.scale.dtype == m.zero_point.dtype == torch.float16
    assert torch.equal(loaded(x), q(x))


def test_old_float32_checkpoints_load_and_compute_as_before(tmp_path):
    """A checkpoint as lowbit wrote it before 16-bit parameters: float32 scales and zero points, and
    configs without scale_dtype. It loads with its float32 tensors and the outputs it had."""
    x = torch.randn(5, 40)
    q = lowbit.quantize(_model(), "int4-g8-fp32scales")
    lowbit.save(q, tmp_path / "old")
    path = tmp_path / "old" / "lowbit.json"
    manifest = json.loads(path.read_text())
    assert manifest["config"].pop("scale_dtype") == "float32"
    for entry in manifest["layers"].values():
        if "config" in entry:
            assert entry["config"].pop("scale_dtype") == "float32"
    manifest["recipe"] = "int4-g8"
    path.write_text(json.dumps(manifest))
    loaded = lowbit.load(tmp_path / "old", model=_model())
    assert loaded[0].scale.dtype == loaded[0].zero_point.dtype == torch.float32
    assert loaded[0].config.scale_dtype == "float16"  # what the recipe means now; the tensors say float32
    assert torch.equal(loaded(x), q(x))
    assert lowbit.summary(loaded)[0]["bits_per_weight"] == pytest.approx(4 + 8 * 8 / 8)
    # and the same weights with the default float16 parameters differ only by the scales' rounding
    new = lowbit.quantize(_model(), "int4-g8")
    assert torch.allclose(new(x), q(x), rtol=0.05, atol=0.05)


def test_load_state_dict_refuses_to_round_scales():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32))
    wide = lowbit.quantize(copy.deepcopy(base), "int4-g32-fp32scales", backend="dequant")
    narrow = lowbit.quantize(copy.deepcopy(base), "int4-g32", backend="dequant")
    assert wide[0].scale.dtype == torch.float32 and narrow[0].scale.dtype == torch.float16
    with pytest.raises(RuntimeError, match="'scale' is float32 in the state dict and float16 in the layer"):
        narrow.load_state_dict(wide.state_dict())
    # float16 values fit float32 buffers exactly: that direction loads, and computes the same
    wide.load_state_dict(narrow.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(wide(x), narrow(x))

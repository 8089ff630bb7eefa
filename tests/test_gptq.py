"""GPTQ: better than round-to-nearest on correlated inputs, same storage format, same verb."""

import copy

import pytest
import torch
from torch import nn

import lowbit
import lowbit.modules
from lowbit.algorithms import gptq
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.core import choose_qparams_clipped, dequantize_affine, quantize_affine
from lowbit.recipes import parse_recipe

MIX = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))


def data(n, seed):
    """Correlated activations (low rank plus noise), the structure GPTQ exploits and real layers have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ MIX + 0.1 * torch.randn(n, 128, generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("recipe,factor", [("int4-g32", 0.5), ("int3-g64", 0.5), ("int2-g32", 0.6), ("int4", 0.5),
                                           ("kmeans3-g64", 0.55)])
def test_gptq_beats_rtn_on_held_out_inputs(recipe, factor):
    calib = [data(64, i) for i in range(8)]
    x = data(512, 100)
    ref = model()(x)
    rtn = lowbit.quantize(model(), recipe, calibration=calib)
    gptq = lowbit.quantize(model(), recipe + "-gptq", calibration=calib)
    assert rel_err(gptq(x), ref) < factor * rel_err(rtn(x), ref)
    assert gptq[0].config.method == "gptq" and gptq[0].config.name == recipe + "-gptq"


def test_gptq_codes_are_ordinary_affine_codes():
    """Without the clip search and the refit, the same scales as RTN (chosen per group up front), codes in
    range, and RTN itself when H is the identity."""
    w = torch.randn(24, 64)
    h = torch.eye(64, dtype=torch.float64)
    codes, scale, zero = gptq_quantize(w, h, 4, 16, False, damp=0.0, act_order=False, clip=(1.0,), refit=False)
    rs, rz = lowbit.core.choose_qparams_affine(w, 4, (1, 16), False)
    assert torch.equal(scale, rs) and torch.equal(zero, rz)
    # with uncorrelated, equal-variance inputs there is no error to move: GPTQ is round-to-nearest
    assert torch.equal(codes, quantize_affine(w, rs, rz, 4, (1, 16)))
    assert int(codes.max()) <= 15
    assert dequantize_affine(codes, scale, zero, (1, 16)).shape == w.shape


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True)])
def test_clip_search_never_rounds_worse_than_min_max(bits, symmetric):
    """Per group, the clipped range's error (weighted by the input importance) is at most min-max's, and on
    heavy-tailed weights it is clearly lower in total; grid (1.0,) is min-max exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 128)) * 0.02
    imp = torch.rand(128, generator=g) + 0.1
    s0, z0 = lowbit.core.choose_qparams_affine(w, bits, (1, 32), symmetric)
    s1, z1 = choose_qparams_clipped(w, bits, 32, symmetric, imp, grid=(1.0,))
    assert torch.equal(s0, s1) and torch.equal(z0, z1)
    s, z = choose_qparams_clipped(w, bits, 32, symmetric, imp)

    def err(scale, zero):
        codes = quantize_affine(w, scale, zero, bits, (1, 32))
        e = (dequantize_affine(codes, scale, zero, (1, 32)) - w) ** 2 * imp
        return e.reshape(32, 4, 32).sum(-1)

    assert bool((err(s, z) <= err(s0, z0) * (1 + 1e-6)).all())
    assert err(s, z).sum() < 0.9 * err(s0, z0).sum()
    assert bool((s <= s0 * (1 + 1e-6)).all())  # only ever narrower


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True)])
def test_each_row_keeps_the_run_with_less_output_error(bits, symmetric):
    """With the clip search on, every output row's codes and scales are those of the clipped run or of the
    min-max run, whichever has the smaller dW H dW^T; so no row is worse than either run alone."""
    g = torch.Generator().manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((48, 128)) * 0.02
    x = data(256, 7) * (torch.rand(128, generator=g) + 0.2)
    h = x.T @ x

    def row_err(codes, scale, zero):
        dw = dequantize_affine(codes, scale, zero, (1, 32)) - w
        return ((dw @ h) * dw).sum(1)

    both = gptq_quantize(w, h, bits, 32, symmetric, refit=False)
    # each run alone, from the same pieces gptq_quantize uses
    order = torch.argsort(torch.diag(h), descending=True)
    u = gptq._inverse_cholesky(h, order, torch.zeros(128, dtype=torch.bool), 0.01)
    runs = []
    for grid in (lowbit.core.CLIP_GRID, (1.0,)):
        scale, zero = choose_qparams_clipped(w, bits, 32, symmetric, torch.diag(h), grid=grid)
        runs.append((gptq._propagate(w, u, order, torch.zeros(128, dtype=torch.bool), 32, bits, symmetric, scale,
                                     zero, None, 128), scale, zero))
    assert torch.equal(gptq_quantize(w, h, bits, 32, symmetric, clip=(1.0,), refit=False)[0], runs[1][0])
    e = row_err(*both)
    for other in runs:
        assert bool((e <= row_err(*other) * (1 + 1e-5)).all())
    assert e.sum() < min(row_err(*other).sum() for other in runs)  # both kinds of row occur
    for r in range(w.shape[0]):
        assert any(torch.equal(both[0][r], other[0][r]) and torch.equal(both[1][r], other[1][r])
                   for other in runs)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (2, False), (3, True)])
@pytest.mark.parametrize("half", [False, True])
def test_refitted_scales_lower_every_rows_output_error(bits, symmetric, half):
    """After the codes are chosen, each row's scales are solved again for the least dW H dW^T with codes and
    zero points fixed: no row gets worse, the total falls, the zero points stay integers, and with half the
    scales stay float16 values."""
    g = torch.Generator().manual_seed(10 + bits)
    w = torch.distributions.StudentT(3.0).sample((40, 128)) * 0.02
    x = data(512, 3) * (torch.rand(128, generator=g) + 0.2)
    x[:, 5] = 0.0  # a dead input
    h = x.T @ x

    dead = torch.zeros(128, dtype=torch.bool)
    dead[5] = True
    hd = gptq._damped(h, dead, 0.01)  # the objective the refit minimises: GPTQ's damped Hessian

    def row_err(codes, scale, zero, h=h):
        dw = dequantize_affine(codes, scale, zero, (1, 32)) - w
        dw[:, 5] = 0.0
        return ((dw @ h) * dw).sum(1)

    before = gptq_quantize(w, h, bits, 32, symmetric, half=half, refit=False)
    after = gptq_quantize(w, h, bits, 32, symmetric, half=half)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])  # same codes, same zeros
    assert torch.equal(after[2], after[2].round())
    e0, e1 = row_err(*before, h=hd), row_err(*after, h=hd)
    assert bool((e1 <= e0 * (1 + 1e-6)).all())
    assert row_err(*after).sum() < 0.995 * row_err(*before).sum()  # undamped too
    assert bool((after[1] > 0).all())
    if half:
        assert torch.equal(after[1], after[1].half().float())
    else:  # the least-squares optimum: no small move of one scale lowers the row's error
        for r, gi in ((0, 0), (7, 2)):
            for eps in (1e-3, -1e-3):
                s = after[1].clone()
                s[r, gi] *= 1 + eps
                assert row_err(after[0], s, after[2], h=hd)[r] >= e1[r] * (1 - 1e-6)


def test_dead_inputs_and_odd_sizes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(50, 20))  # 50 is not a multiple of the group: zero-padded
    calib = [torch.randn(16, 50) for _ in range(4)]
    for t in calib:
        t[:, 7] = 0.0  # an input that never fires
    q = lowbit.quantize(copy.deepcopy(m), "int4-g32-gptq", calibration=calib)
    x = torch.randn(8, 50)
    x[:, 7] = 0.0
    assert rel_err(q(x), m(x)) < 0.1


def test_gptq_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="pass calibration"):
        lowbit.quantize(model(), "int4-g32-gptq")
    with pytest.raises(ValueError, match="gptq takes integer or codebook formats"):
        parse_recipe("ternary-gptq")
    calib = [data(64, i) for i in range(4)]
    q = lowbit.quantize(model(), "int3-g32-gptq", calibration=calib)
    lowbit.save(q, tmp_path / "ck")
    loaded = lowbit.load(tmp_path / "ck", model=model())
    x = data(16, 7)
    assert torch.equal(q(x), loaded(x))


def test_embeddings_are_rounded_under_gptq():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(50, 128), nn.Linear(128, 32)).eval()
    calib = [torch.randint(0, 50, (4, 6)) for _ in range(4)]
    q = lowbit.quantize(copy.deepcopy(m), "int4-g32-gptq", calibration=calib)
    assert isinstance(q[0], lowbit.modules.QuantEmbedding) and q[1].config.method == "gptq"
    ids = torch.randint(0, 50, (3, 5))
    assert rel_err(q(ids), m(ids)) < 0.2
    # The table's groups take the range that rounds them best: never worse than min-max rounding, and at
    # 3 bits on these Gaussian rows clearly better.
    every = torch.arange(50)
    for bits in (4, 3):
        rtn = lowbit.quantize(copy.deepcopy(m), f"int{bits}-g32")
        fit = lowbit.quantize(copy.deepcopy(m), f"int{bits}-g32-gptq", calibration=calib)
        e_rtn, e_fit = rel_err(rtn[0](every), m[0](every)), rel_err(fit[0](every), m[0](every))
        assert e_fit <= e_rtn and (bits == 4 or e_fit < 0.95 * e_rtn), (bits, e_fit, e_rtn)


def test_thin_calibration_chooses_shrinkage_on_held_out_tokens():
    """Fewer tokens than fit.THIN_TOKENS_PER_INPUT per input: each layer gets the candidate (GPTQ on the
    Hessian shrunk by one of fit.SHRINK, or rounding) with the least held-out error, and says which."""
    from lowbit import fit

    calib = [data(16, i) for i in range(4)]  # 64 tokens for 128 and 256 inputs
    with pytest.warns(UserWarning, match="GPTQ: 2 layer\\(s\\) got fewer than"):
        q = lowbit.quantize(model(), "int3-g32-gptq", calibration=calib)
    notes = q.lowbit_fit_notes
    assert set(notes) == {"0", "2"}
    rtn = lowbit.quantize(model(), "int3-g32", calibration=calib)
    for name, note in notes.items():
        assert note["tokens"] == 64 and note["inputs"] == q.get_submodule(name).in_features
        scores = note["held_out"]
        assert set(scores) == {"rtn", *map(str, fit.SHRINK)}
        assert str(note["shrink"]) == min(scores, key=scores.get)
        layer = q.get_submodule(name)
        if note["shrink"] == "rtn":  # rounded: the layer's recipe and weights are plain rounding's
            assert layer.config.method == "rtn"
            assert torch.equal(layer.weight, rtn.get_submodule(name).weight)
        else:
            assert layer.config.method == "gptq"


def test_enough_tokens_fit_plain_gptq(monkeypatch):
    from lowbit import fit

    calib = [data(64, i) for i in range(8)]
    monkeypatch.setattr(fit, "THIN_TOKENS_PER_INPUT", 1)  # 512 tokens are plenty at one per input
    q = lowbit.quantize(model(), "int3-g32-gptq", calibration=calib)
    assert all(n["shrink"] is None for n in q.lowbit_fit_notes.values())
    # Plain GPTQ on all tokens' Hessian, as gptq_quantize computes it.
    x = torch.cat(calib)
    h = x.T @ x / x.shape[0]
    codes, scale, zero = gptq_quantize(model()[0].weight, h, 3, 32, False, half=True)
    w = (codes.float() - zero.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.allclose(q[0].weight, w, atol=1e-6)


def test_padded_positions_are_left_out_of_input_statistics():
    from lowbit.fit import input_stats
    from lowbit.sequential import Stage, token_mask

    lin = nn.Linear(8, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[0, 3:] = 1e3  # padding holds junk
    stage = Stage(lin, [((x,), {})], masks=[token_mask({"attention_mask": mask})])
    st = input_stats(stage, lin, 8, hessian=True)
    real = x[mask.bool()]
    assert st.rows == 8
    assert torch.allclose(st.hessian, real.T @ real, rtol=1e-5)
    assert torch.allclose(st.abs_max, real.abs().amax(0))
    # Without a mask every position counts.
    assert input_stats(Stage(lin, [((x,), {})]), lin, 8).rows == 10

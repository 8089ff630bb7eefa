"""HQQ: data-free zero-point fitting that must beat round-to-nearest on the error it minimizes."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.core import choose_qparams_affine, dequantize_affine, quantize_affine
from lowbit.recipes import parse_recipe


def heavy_tailed(n=256, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.002] *= 20  # a few outliers, as trained weights have
    return w


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (2, 32)])
def test_hqq_beats_rtn(bits, group):
    w = heavy_tailed()
    codes, scale, zero = hqq_quantize(w, bits, group)
    hqq = dequantize_affine(codes, scale, zero, (1, group))
    s, z = choose_qparams_affine(w, bits, (1, group), False)
    rtn = dequantize_affine(quantize_affine(w, s, z, bits, (1, group)), s, z, (1, group))

    def lp(e):
        return e.abs().pow(0.7).sum().item()

    assert lp(hqq - w) < 0.97 * lp(rtn - w)  # the norm HQQ minimizes
    assert (hqq - w).norm() < 0.99 * (rtn - w).norm()  # and the plain squared error follows
    assert torch.equal(scale, s) and int(codes.max()) < 2 ** bits


def test_hqq_recipe_runs_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
    q = lowbit.quantize(copy.deepcopy(m), "int3-g32-hqq")  # data-free: no calibration needed
    x = torch.randn(4, 128)
    assert ((q(x) - m(x)).norm() / m(x).norm()) < 0.3
    lowbit.save(q, tmp_path / "ck")
    assert torch.equal(lowbit.load(tmp_path / "ck", model=copy.deepcopy(m))(x), q(x))
    with pytest.raises(ValueError, match="asymmetric"):
        parse_recipe("int8-hqq")


@pytest.mark.parametrize("half", [False, True])
def test_hqq_keeps_each_groups_best_of_its_fits(half):
    from lowbit.algorithms import hqq

    w = heavy_tailed(64, 256, seed=3)
    w[:4] += 3.0  # groups away from zero: the two starts differ there
    bits, group = 2, 64
    codes, scale, zero = hqq_quantize(w, bits, group, half=half)
    W = w.reshape(64, -1, group)

    def group_err(s, z):
        q = torch.round(W / s + z).clamp(0, 2**bits - 1)
        return ((q - z) * s - W).pow(2).sum(-1)

    got = group_err(scale[..., None], zero[..., None])
    s0, z0 = choose_qparams_affine(w, bits, (1, group), False, half=half)
    kw = {"p": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20, "half": half}
    lowbit_start = hqq._fit_zero(W, s0[..., None], z0[..., None].clone(), 2**bits - 1, first_rise=False, **kw)
    assert (got <= group_err(s0[..., None], lowbit_start) + 1e-6).all()
    assert torch.equal(dequantize_affine(codes, scale, zero, (1, group)).reshape(W.shape),
                       (torch.round(W / scale[..., None] + zero[..., None]).clamp(0, 3) - zero[..., None])
                       * scale[..., None])
    if half:  # what is stored is what was judged
        assert torch.equal(scale.half().float(), scale) and torch.equal(zero.half().float(), zero)

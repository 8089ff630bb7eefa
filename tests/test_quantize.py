"""lowbit.quantize on small models: every recipe, every kernel, odd shapes, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.backends import KERNELS, LayerSpec, available_kernels, native_bf16, parse_route
from lowbit.modules import QuantEmbedding, QuantLinear
from lowbit.recipes import RECIPES, QuantConfig, parse_recipe


def mlp(k=96, h=160, n=37, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, n, bias=False)).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_names_round_trip(recipe):
    assert parse_recipe(recipe).name == recipe
    assert parse_recipe(parse_recipe(recipe).name) == parse_recipe(recipe)


def test_wrong_recipe_lists_valid_ones():
    with pytest.raises(ValueError, match="valid recipes: .*int4-g128"):
        parse_recipe("int4-g128-fancy")
    with pytest.raises(ValueError, match="valid recipes"):
        parse_recipe("int9")
    with pytest.raises(ValueError, match="valid recipes"):
        parse_recipe("bf16-g32")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not parse_recipe(r).act])
def test_every_recipe_matches_its_dequantized_weights(recipe):
    """The kernel computes x @ dequant(W).T: checked against the float reference of the stored weights."""
    model = mlp()
    x = torch.randn(5, 96)
    calib = [torch.randn(16, 96) for _ in range(4)] if parse_recipe(recipe).needs_calibration else None
    q = lowbit.quantize(mlp(), recipe, calibration=calib)
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            xin = x if name == "0" else torch.relu(q[0](x))
            ref = F.linear(xin, mod.dequantized_weight(), mod.bias)
            tol = 2e-2 if mod.act_dtype == torch.bfloat16 else 1e-5
            assert rel_err(mod(xin), ref) < tol, (recipe, name, mod.kernel_name)
    # and the quantized model stays near the float one (loosely: 1-2 bit formats lose a lot)
    bound = {"int8": 0.01, "bf16": 0.01, "fp16": 0.001, "fp8": 0.08}.get(recipe, 1.0)
    assert rel_err(q(x), model(x)) < bound


def test_error_falls_with_bits():
    x = torch.randn(64, 96)
    ref = mlp()(x)
    errs = [rel_err(lowbit.quantize(mlp(), r)(x), ref) for r in ("int2-g32", "int3-g64", "int4-g32", "int8")]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 0.01


@pytest.mark.parametrize("kernel", [k for k, ok in available_kernels().items() if ok])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128), (3, 64), (2, 32)])
def test_each_kernel_agrees_with_reference(kernel, bits, group):
    config = QuantConfig("int", bits, group, symmetric=bits == 8)
    torch.manual_seed(1)
    lin = nn.Linear(256, 64)
    n, k = lin.out_features, lin.in_features
    spec = LayerSpec(n, k, bits, group or k, bits == 8)
    if not KERNELS[kernel].supports(spec):
        pytest.skip(f"{kernel} does not take {spec}")
    q = QuantLinear.from_float(lin, config, kernel=kernel)
    assert q.kernel_name == kernel
    x = torch.randn(3, 7, 256)
    ref = F.linear(x, q.dequantized_weight(), q.bias)
    out = q(x)
    assert out.shape == (3, 7, 64) and out.dtype == x.dtype
    # bf16 and int8 activations (lowbit_q8, checked against its own rounding in test_q8.py) round x.
    assert rel_err(out, ref) < (2e-2 if q.act_dtype in (torch.bfloat16, torch.int8) else 1e-5)


def test_odd_shapes_and_non_dividing_groups_still_work():
    torch.manual_seed(2)
    lin = nn.Linear(100, 37)  # 100 is not a multiple of 32 or 64; 37 suits no kernel's tiling
    for recipe in ("int4-g32", "int3-g64", "int2-g32", "int8", "kmeans4-g64", "ternary", "binary"):
        q = QuantLinear.from_float(lin, parse_recipe(recipe))
        x = torch.randn(4, 100)
        assert q(x).shape == (4, 37)
        assert rel_err(q(x), F.linear(x, q.dequantized_weight(), q.bias)) < 2e-2
    # padding is zero columns: the int8 model of an odd layer stays close to the float layer
    assert rel_err(QuantLinear.from_float(lin, parse_recipe("int8"))(x), lin(x)) < 0.01


def test_real_kernels_chosen_for_llama_shapes():
    """On a 2048x2048 layer int4 and int8 must run on a low-bit kernel, not the simulated path."""
    for recipe in ("int4-g128", "int8"):
        q = lowbit.quantize(nn.Sequential(nn.Linear(2048, 2048)), recipe)
        row = lowbit.summary(q)[0]
        assert not row["simulated"], row
        # kernels by row count: the one for few rows (decoding) is a low-bit kernel
        assert parse_route(row["kernel"])[0][1] in ("lowbit_cpu", "torch_int4pack", "torch_int8pack"), row


def test_float_and_codebook_layers_choose_from_the_registry():
    """Every format is run by a registered kernel: bf16 by its bf16 GEMM (few rows) or dequant, the others
    by dequant; a kernel that cannot run a format says why."""
    torch.manual_seed(4)
    lin = nn.Linear(96, 40)
    few, many = torch.randn(2, 3, 96), torch.randn(5, 20, 96)
    bf = QuantLinear.from_float(lin, parse_recipe("bf16"))
    bf16_gemm = ["bf16_gemm"] if native_bf16() else []  # a bf16 GEMM for many rows, where bf16 is native
    assert bf.candidate_kernels() == ["bf16_mm", "dequant", *bf16_gemm] and bf.kernel_name == "bf16_mm"
    assert bf.act_dtype == torch.bfloat16 and not bf.simulated
    w = bf.dequantized_weight()
    assert torch.equal(bf(few), F.linear(few.bfloat16(), w.bfloat16(), lin.bias.bfloat16()).float())
    assert torch.equal(bf(many), F.linear(many, w, bf.bias))  # many rows: the weight upcast, an fp32 GEMM
    bf.set_kernel("dequant")
    assert bf.simulated and bf.act_dtype == torch.float32 and torch.equal(bf(few), F.linear(few, w, bf.bias))
    for recipe in ("fp16", "fp8", "kmeans4", "kmeans3-g32"):
        q = QuantLinear.from_float(lin, parse_recipe(recipe))
        assert q.candidate_kernels() == ["dequant", *(["dequant_bf16"] if native_bf16() else [])], recipe
        assert q.simulated, recipe
        assert torch.equal(q(few), F.linear(few, q.dequantized_weight(), q.bias)), recipe
    for recipe, kernel in (("kmeans4", "lowbit_cpu"), ("fp16", "bf16_mm"), ("bf16", "torch_int8pack")):
        with pytest.raises(ValueError, match=f"kernel '{kernel}' cannot run this layer"):
            QuantLinear.from_float(lin, parse_recipe(recipe), kernel=kernel)


def test_simulated_formats_say_so():
    # 3-bit codebooks have no kernel of their own; 4-bit codebooks and fp8 do (K a multiple of 64).
    for recipe, simulated in (("kmeans3-g64", True), ("kmeans4-g64", False), ("fp8", False)):
        q = lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), recipe)
        assert lowbit.summary(q)[0]["simulated"] is simulated, recipe
        assert ("simulated" in repr(q)) is simulated, recipe


def test_embeddings_quantized_and_gathered():
    torch.manual_seed(3)
    emb = nn.Embedding(50, 40, padding_idx=0)
    for recipe in ("int8", "int4-g32", "kmeans4-g64", "fp8", "bf16", "ternary"):
        q = QuantEmbedding.from_float(emb, parse_recipe(recipe))
        idx = torch.tensor([[1, 5, 49], [0, 2, 2]])
        assert torch.equal(q(idx), q.dequantized_weight()[idx])
    model = nn.Sequential(nn.Embedding(50, 40), nn.Linear(40, 8))
    lowbit.quantize(model, "int8")
    assert isinstance(model[0], QuantEmbedding)
    model = nn.Sequential(nn.Embedding(50, 40), nn.Linear(40, 8))
    lowbit.quantize(model, QuantConfig("int", 8, None, True, embeddings=False))
    assert isinstance(model[0], nn.Embedding)


def test_exclude_patterns():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    lowbit.quantize(model, "int8", exclude=["1.0", "*.1"])
    assert isinstance(model[0], QuantLinear)
    assert type(model[1][0]) is nn.Linear and type(model[1][1]) is nn.Linear


def test_nan_weights_name_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer '2'.*NaN"):
        lowbit.quantize(model, "int4-g32")


def test_nothing_to_quantize_and_wrong_kernel():
    with pytest.raises(ValueError, match="no layer to quantize"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(ValueError, match="unknown kernel"):
        lowbit.quantize(mlp(), "int8", backend="magic")


def test_output_dtype_follows_input():
    q = lowbit.quantize(nn.Sequential(nn.Linear(128, 64)), "int4-g32")
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert q(torch.randn(2, 128)).dtype == torch.float32


def test_sizes_follow_bits():
    lin = nn.Linear(1024, 256)
    nbytes = {r: QuantLinear.from_float(lin, parse_recipe(r)).nbytes for r in ("int8", "int4-g128", "int3-g64",
                                                                              "int2-g32", "binary")}
    w = 1024 * 256
    assert nbytes["int8"] < 1.05 * w + 4 * 1024
    assert nbytes["int4-g128"] < 0.5 * w + 8 * w / 128 + 4 * 1024 + 64
    assert nbytes["int3-g64"] < 0.375 * w + 8 * w / 64 + 4 * 1024 + 64
    assert nbytes["binary"] < w / 8 + 8 * 256 + 4 * 1024 + 64


def test_a_new_layer_kind_is_added_in_one_place(monkeypatch):
    """A module type lowbit does not know, registered once in lowbit.layers, is quantized, summarized,
    saved and loaded like nn.Linear (here: a linear that stores its weight transposed, as GPT-2's Conv1D)."""
    import lowbit.layers

    class TLinear(nn.Module):
        def __init__(self, k, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(k, n) / k ** 0.5)
            self.bias = nn.Parameter(torch.zeros(n))

        def forward(self, x):
            return x @ self.weight + self.bias

    def make():
        torch.manual_seed(0)
        return nn.Sequential(TLinear(64, 32), nn.GELU(), TLinear(32, 8))

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="no layer to quantize"):
        lowbit.quantize(make(), "int8")
    kind = lowbit.layers.FloatKind("tlinear", lambda m: isinstance(m, TLinear), lambda c: True, "",
                                   lambda m: lowbit.layers.FLOAT_KINDS[1].as_torch(m))
    monkeypatch.setattr(lowbit.layers, "FLOAT_KINDS", [*lowbit.layers.FLOAT_KINDS, kind])
    q = lowbit.quantize(make(), "int8")
    assert isinstance(q[0], QuantLinear) and rel_err(q(x), make()(x)) < 0.03  # bf16-activation kernels too
    assert [r["type"] for r in lowbit.summary(q)] == ["linear", "linear"]


def test_autotune_does_not_import_quantize():
    """The kernel timer sits below the pipeline that uses it: no import loop between them."""
    import ast
    import pathlib

    import lowbit.autotune

    tree = ast.parse(pathlib.Path(lowbit.autotune.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {"quantize", "stream", "lowbit.quantize"} & imported, imported


def test_static_ranges_leave_out_padded_positions():
    """Calibration batches with an attention mask: padded positions (junk here) do not widen the
    activation range a static recipe fixes."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x, attention_mask=None):
            return self.lin(x)

    torch.manual_seed(0)
    batches = []
    for i in range(4):
        x = torch.randn(4, 6, 16)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[:, 4:] = 0
        x[:, 4:] = 1e3
        batches.append({"x": x, "attention_mask": mask})
    q = lowbit.quantize(Masked().eval(), "w8a8-static", calibration=batches, backend="reference")
    real_max = max(float(b["x"][b["attention_mask"].bool()].abs().max()) for b in batches)
    scale = float(q.lin.act_scale) if hasattr(q.lin, "act_scale") else None
    assert scale is not None and scale * 255 < 4 * real_max  # junk of 1e3 would give a range of ~2e3

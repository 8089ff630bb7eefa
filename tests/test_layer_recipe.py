"""Recipes per layer pattern (lowbit.recipes.LayerRecipe): parsing, first match wins, fitting with each
layer's own format, summary, save/load and the command line."""

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lowbit
from lowbit.recipes import LayerRecipe, parse_recipe, read_recipe


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(torch.relu(self.up(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab=96, d=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def tiny():
    torch.manual_seed(0)
    return TinyLM().eval()


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (4, 24), generator=g) for _ in range(4)]


def recipes_of(model):
    return {r["layer"]: r["recipe"] for r in lowbit.summary(model) if r["type"] not in ("left float", "kept float")}


def test_parse_mapping_json_and_round_trip(tmp_path):
    r = read_recipe({"*.attn": "int8", "lm_head": "float", "emb": None, "*": "int4-g32-gptq"})
    assert isinstance(r, LayerRecipe)
    assert r.config_for("blocks.0.attn") == parse_recipe("int8")
    assert r.config_for("lm_head") is None and r.config_for("emb") is None
    assert r.config_for("blocks.1.up") == parse_recipe("int4-g32-gptq")
    assert r.needs_calibration
    assert LayerRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"*.attn": "int8", "lm_head": "float", "emb": None, "*": "int4-g32-gptq"}))
    assert read_recipe(str(path)) == r and read_recipe(path) == r
    assert read_recipe("int4-g128") == parse_recipe("int4-g128")  # a plain recipe stays a QuantConfig
    # A name covers what is inside it; the first match wins.
    r2 = read_recipe({"blocks.0": "int8", "*.up": "int2-g32", "*": "int4-g64"})
    assert r2.config_for("blocks.0.up").bits == 8 and r2.config_for("blocks.1.up").bits == 2
    assert r2.config_for("blocks.1.down").bits == 4 and r2.config_for("lm_head").bits == 4


def test_bad_recipes_say_where(tmp_path):
    with pytest.raises(ValueError, match="pattern '\\*.attn'.*int9"):
        read_recipe({"*.attn": "int9", "*": "int4"})
    with pytest.raises(ValueError, match="disagree"):
        read_recipe({"a": "w8a8-dynamic", "*": "w8a8-static"})
    with pytest.raises(ValueError, match="attention"):
        read_recipe({"a": "int4-g128-bf16attn", "*": "int4-g128"})
    with pytest.raises(ValueError, match="at least one"):
        read_recipe({})
    with pytest.raises(ValueError, match="does not exist"):
        read_recipe(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_recipe(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_recipe(str(bad))
    with pytest.raises(ValueError, match="every pattern keeps"):
        lowbit.quantize(tiny(), {"*": "float"})


def test_each_layer_gets_its_rule_and_rtn_layers_match_uniform():
    plan = {"*.attn": "int8", "blocks.1.up": "int2-g32", "lm_head": "float", "*": "int4-g32"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = lowbit.quantize(tiny(), plan)
    assert recipes_of(q) == {"emb": "int4-g32", "blocks.0.attn": "int8", "blocks.0.up": "int4-g32",
                             "blocks.0.down": "int4-g32", "blocks.1.attn": "int8", "blocks.1.up": "int2-g32",
                             "blocks.1.down": "int4-g32"}
    # lm_head was asked for by name: listed with its reason, not warned of.
    assert not [w for w in caught if "stay in float" in str(w.message)]
    left = {r["layer"]: r for r in lowbit.summary(q) if r["type"] == "left float"}
    assert set(left) == {"lm_head"} and "pattern 'lm_head'" in left["lm_head"]["reason"]
    # Weights from the weights alone: each layer is what the uniform recipe makes of it.
    for name, recipe in recipes_of(q).items():
        alone = lowbit.quantize(tiny(), recipe)
        assert torch.equal(q.get_submodule(name).weight, alone.get_submodule(name).weight), name
    s = lowbit.summary(q)
    expect = sum(r["bits_per_weight"] * r["weights"] for r in s) / sum(r["weights"] for r in s)
    assert s.bits_per_weight == pytest.approx(expect) and 4 < s.bits_per_weight < 32


def test_unmatched_layers_stay_float_with_a_warning():
    with pytest.warns(UserWarning, match="stay in float: lm_head"):
        q = lowbit.quantize(tiny(), {"blocks.*": "int8", "emb": "int8"})
    left = {r["layer"]: r["reason"] for r in lowbit.summary(q) if r["type"] == "left float"}
    assert left == {"lm_head": "no pattern of the per-layer recipe matches it"}


def test_gptq_and_awq_fit_each_layer_in_its_own_format():
    data = calib()
    plan = {"*.attn": "int8", "blocks.0.*": "int3-g32-gptq", "blocks.1.up": "int4-g32-awq", "*.down": "int2-g32-gptq",
            "*": "int4-g32"}
    q = lowbit.quantize(tiny(), plan, calibration=data)
    got = recipes_of(q)
    assert got["blocks.0.up"] == "int3-g32-gptq" and got["blocks.1.down"] == "int2-g32-gptq"
    assert got["blocks.1.up"] == "int4-g32-awq" and got["blocks.0.attn"] == "int8"
    for name, bits in (("blocks.0.up", 3), ("blocks.1.down", 2), ("blocks.1.up", 4), ("blocks.0.attn", 8)):
        assert q.get_submodule(name).config.bits == bits
    # A single rule for every layer is the uniform recipe, bit for bit (the same stages and fits).
    uniform = lowbit.quantize(tiny(), "int3-g32-gptq", calibration=data)
    mapped = lowbit.quantize(tiny(), {"*": "int3-g32-gptq"}, calibration=data)
    x = data[0]
    assert torch.equal(uniform(x), mapped(x))
    # GPTQ in each layer's format beats rounding the same formats, on held-out data.
    rtn = lowbit.quantize(tiny(), {k: v.replace("-gptq", "").replace("-awq", "") for k, v in plan.items()},
                          )
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(9))
    ref = tiny()(ids)
    assert (q(ids) - ref).norm() < (rtn(ids) - ref).norm()


def test_save_load_and_from_pretrained_keep_the_per_layer_recipe(tmp_path):
    plan = {"*.attn": "int8", "lm_head": "float", "*": "int4-g32"}
    q = lowbit.quantize(tiny(), plan)
    lowbit.save(q, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "lowbit.json").read_text())
    assert manifest["layer_recipe"] == read_recipe(plan).to_dict() and manifest["config"] is None
    back = lowbit.load(tmp_path / "c", model=tiny())
    assert back.lowbit_recipe == read_recipe(plan)
    assert recipes_of(back) == recipes_of(q)
    x = calib()[0]
    assert torch.equal(back(x), q(x))
    # A malformed record is the checkpoint's error, naming the file.
    manifest["layer_recipe"] = {"rules": [["*", {"kind": "nope", "bits": 4}]]}
    (tmp_path / "c" / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(lowbit.CheckpointError, match="lowbit.json"):
        lowbit.load(tmp_path / "c", model=tiny())


def test_block_at_a_time_takes_a_per_layer_recipe(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.stream import quantize_folder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    plan = {"*.mlp.*": "int3-g32-gptq", "lm_head": "int8", "model.embed_tokens": "float", "*": "int4-g32"}
    data = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    quantize_folder(tmp_path / "src", tmp_path / "q", plan, calibration=data, progress=False)
    streamed = lowbit.load(tmp_path / "q")
    in_memory = lowbit.quantize(copy.deepcopy(model), plan, calibration=data)
    assert recipes_of(streamed) == recipes_of(in_memory)
    assert recipes_of(streamed)["model.layers.0.mlp.up_proj"] == "int3-g32-gptq"
    assert recipes_of(streamed)["lm_head"] == "int8"


def test_command_line_reads_a_json_recipe(tiny_bert_folder, tmp_path):
    from lowbit.cli import main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"*.attention.*": "int8", "*": "int4-g32"}))
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(tiny_bert_folder), "--recipe", str(plan), "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = lowbit.load(out)
    got = recipes_of(model)
    assert got["encoder.layer.0.attention.self.query"] == "int8"
    assert got["encoder.layer.0.intermediate.dense"] == "int4-g32"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"*": "int9"}))
    r = CliRunner().invoke(main, ["quantize", str(tiny_bert_folder), "--recipe", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "int9" in r.output


def test_causal_lm_edges_stay_int8_under_narrow_recipes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    q = lowbit.quantize(copy.deepcopy(model), "int4-g32")
    rows = {r["layer"]: r for r in lowbit.summary(q)}
    for edge in ("model.embed_tokens", "lm_head"):
        assert rows[edge]["recipe"] == "int8" and "causal LM" in rows[edge]["reason"]
    assert rows["model.layers.0.mlp.up_proj"]["recipe"] == "int4-g32"
    lowbit.save(q, tmp_path / "c")
    back = {r["layer"]: r for r in lowbit.summary(lowbit.load(tmp_path / "c"))}
    assert back["lm_head"]["recipe"] == "int8" and "causal LM" in back["lm_head"]["reason"]
    # A per-layer recipe decides for itself; 8-bit recipes and non-LMs are left as they are.
    every = recipes_of(lowbit.quantize(copy.deepcopy(model), {"*": "int4-g32"}))
    assert every["lm_head"] == every["model.embed_tokens"] == "int4-g32"
    assert recipes_of(lowbit.quantize(copy.deepcopy(model), "int8"))["lm_head"] == "int8"
    assert recipes_of(lowbit.quantize(tiny(), "int4-g32"))["lm_head"] == "int4-g32"

"""lowbit.quantize on the small models of each family a new user tries first (random weights from configs):
the layer as the model, bf16 models on an empty timing cache, GPT-2's Conv1D, code that reads `.weight`,
layers left float, slower layers summarized, bits per weight."""

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lowbit
from lowbit import autotune
from lowbit.modules import QuantEmbedding, QuantLinear, QuantModule
from lowbit.stream import quantize_folder

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernel timing notes on tiny layers are beside the point here
        return fn(*args, **kwargs)


def tiny_llama(dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=32)
    return transformers.BertModel(cfg).to(dtype).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_t5(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def ids(vocab=256, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the model itself is the layer


@pytest.mark.parametrize("recipe", ["int4-g128", "int8", "bf16", "w8a8-dynamic"])
def test_the_model_itself_is_the_layer(recipe, tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(48, 16)
    x = torch.randn(5, 48)
    ref = lin(x)
    q = quiet(lowbit.quantize, lin, recipe, keep_float_if_slower=False)
    assert isinstance(q, QuantModule) and q.in_features == 48 and q.out_features == 16
    assert rel_err(q(x), ref) < (0.2 if recipe == "int4-g128" else 0.02)
    assert lowbit.summary(q)[0]["layer"] == ""
    lowbit.save(q, tmp_path / "layer")
    loaded = lowbit.load(tmp_path / "layer")  # one layer: rebuilt from the manifest, no skeleton needed
    assert type(loaded) is type(q) and torch.equal(loaded(x), q(x))


def test_the_model_itself_is_the_layer_with_a_fitting_method():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    calib = [torch.randn(256, 64) for _ in range(8)]  # 32 tokens per input: GPTQ proper, no held-out choice
    x = torch.randn(8, 64)
    q = quiet(lowbit.quantize, lin, "int4-g32-gptq", calibration=calib)
    assert isinstance(q, QuantLinear) and q.config.method == "gptq"
    assert rel_err(q(x), lin(x)) < 0.2
    emb = quiet(lowbit.quantize, nn.Embedding(30, 16), "int8")
    assert isinstance(emb, QuantEmbedding)


# ---------------------------------------------------------------- bf16 / fp16 models


@pytest.mark.parametrize("recipe", ["int4-g32", "int8", "w8a8-dynamic"])
def test_bf16_llama_quantizes_on_an_empty_timing_cache(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))  # nothing measured yet: every layer timed
    model = tiny_llama(torch.bfloat16)
    x = ids()
    ref = model(x).logits
    quiet(lowbit.quantize, model, recipe)
    out = model(x).logits
    assert out.dtype == torch.bfloat16  # every layer's output follows the model's dtype
    assert rel_err(out, ref) < (0.3 if recipe == "int4-g32" else 0.1)
    cache = json.loads((tmp_path / "cache" / autotune.CACHE_FILE).read_text())
    assert any("dtype=bfloat16" in k for k in next(iter(cache.values())))  # timed on bf16 inputs
    for m in model.modules():
        if isinstance(m, QuantModule):
            assert m.float_dtype == torch.bfloat16


def test_bf16_and_fp16_bert_round_trip_keeps_the_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    for dtype in (torch.bfloat16, torch.float16):
        model = quiet(lowbit.quantize, tiny_bert(dtype), "int8")
        inputs = {"input_ids": ids(120, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
        with torch.inference_mode():
            before = model(**inputs).last_hidden_state
        assert before.dtype == dtype and torch.isfinite(before).all()
        lowbit.save(model, tmp_path / str(dtype))
        loaded = lowbit.load(tmp_path / str(dtype))
        with torch.inference_mode():
            after = loaded(**inputs).last_hidden_state
        assert torch.equal(before, after)
        assert loaded.encoder.layer[0].output.dense.weight.dtype == dtype


# ---------------------------------------------------------------- GPT-2's Conv1D


def test_gpt2_conv1d_layers_are_quantized(tmp_path):
    model = tiny_gpt2()
    x = ids()
    ref = model(x).logits
    conv1d_names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d_names) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, "int8")
    assert not [w for w in caught if "stay in float" in str(w.message)]  # nothing left float silently or not
    assert model.lowbit_unquantized_layers == []
    for name in conv1d_names:
        assert isinstance(model.get_submodule(name), QuantLinear), name
    # the weight was transposed: out features first, and the layer computes what Conv1D did
    assert model.transformer.h[0].mlp.c_fc.out_features == 256
    assert rel_err(model(x).logits, ref) < 0.03
    rows = lowbit.summary(model)
    assert all(r["type"] != "left float" for r in rows)
    lowbit.save(model, tmp_path / "g")
    loaded = lowbit.load(tmp_path / "g")
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_gpt2_conv1d_fitted_and_streamed_block_by_block(tmp_path):
    model = tiny_gpt2()
    x = ids()
    ref = model(x).logits
    calib = [{"input_ids": ids(seed=s)} for s in range(4)]
    q = quiet(lowbit.quantize, tiny_gpt2(), "int4-g32-awq", calibration=calib)
    assert isinstance(q.transformer.h[1].attn.c_attn, QuantLinear)
    assert rel_err(q(x).logits, ref) < 0.2
    base = model.transformer  # the folder holds a GPT2Model: its names are the checkpoint's
    base.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    out = quiet(quantize_folder, tmp_path / "src", tmp_path / "q", "int4-g32-gptq", calibration=calib, progress=False)
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["layers"]["h.1.attn.c_attn"]["config"]["method"] == "gptq"
    streamed = lowbit.load(out)
    assert isinstance(streamed.h[0].mlp.c_proj, QuantLinear)
    assert rel_err(streamed(x).last_hidden_state, base(x).last_hidden_state) < 0.2


def test_layers_left_float_are_reported(monkeypatch):
    monkeypatch.setattr(autotune, "time_calls", lambda fns, **kw: dict.fromkeys(fns, 1.0))  # no slower notes
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    vit = transformers.ViTModel(cfg).eval()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) with \d+% of the layers' weights stay in float: "
                                         r"embeddings.patch_embeddings.projection \(Conv2d\)"):
        lowbit.quantize(vit, "int4-g32")
    [note] = vit.lowbit_unquantized_layers
    assert note["layer"] == "embeddings.patch_embeddings.projection" and "static activations" in note["reason"]
    [row] = [r for r in lowbit.summary(vit) if r["type"] == "left float"]
    assert row["bits_per_weight"] == 32.0 and row["weights"] == 32 * 3 * 8 * 8
    # asked for: an excluded layer is not reported
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="stay in float"):
        lowbit.quantize(mha, "int8", exclude=["0"])
    reasons = {n["layer"]: n["reason"] for n in mha.lowbit_unquantized_layers}
    assert "0" not in reasons and isinstance(mha[0], nn.Linear)
    assert "reads this weight directly" in reasons["1.out_proj"] and "MultiheadAttention" in reasons["1"]


# ---------------------------------------------------------------- code that reads `.weight`


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["int8", "int4-g32", "bf16", "fp8", "w8a8-dynamic"])
def test_t5_reads_its_quantized_weight(recipe, dtype):
    model = tiny_t5(dtype)
    enc, dec = ids(128, (2, 9)), ids(128, (2, 4), seed=1)
    ref = model(input_ids=enc, decoder_input_ids=dec).logits
    quiet(lowbit.quantize, model, recipe, keep_float_if_slower=False)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, QuantModule)
    out = model(input_ids=enc, decoder_input_ids=dec).logits  # T5's feed-forward reads wo.weight.dtype
    assert out.dtype == dtype
    assert rel_err(out, ref) < (0.35 if recipe == "int4-g32" else 0.15)
    w = wo.weight
    assert isinstance(w, torch.Tensor) and w.dtype == dtype and w.shape == (32, 64) and w.device == out.device
    assert torch.equal(w + 0, wo.dequantized_weight().to(dtype))  # reading it gives the dequantized value


def test_weight_property_adds_no_state():
    torch.manual_seed(0)
    for recipe, keys in (("bf16", {"weight", "bias"}), ("fp8", {"weight", "scale", "bias"}),
                         ("int4-g32", {"qweight", "scale", "zero_point", "bias"})):
        q = quiet(lowbit.quantize, nn.Sequential(nn.Linear(64, 32)), recipe)
        assert set(q[0].state_dict()) == keys, recipe  # the checkpoint's keys, as before
        assert q[0].weight.shape == (32, 64) and q[0].weight.dtype == torch.float32
    bf = q = quiet(lowbit.quantize, nn.Sequential(nn.Linear(64, 32)), "bf16")
    assert bf[0].state_dict()["weight"].dtype == torch.bfloat16  # stored values untouched by the property


# ---------------------------------------------------------------- slower layers, summarized


def _all_slower(fns, **kw):
    return {name: 1.0 if name == autotune.FLOAT else 3.0 if name == "dequant" else 2.0 for name in fns}


def test_slower_layers_are_summarized_in_one_warning_and_kept_in_summary(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))  # every layer timed by the stand-in
    monkeypatch.setattr(autotune, "time_calls", _all_slower)
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, "int4-g32")
    [msg] = [str(w.message) for w in caught if "slower than float" in str(w.message)]
    n = len(model.lowbit_slower_layers)
    assert n == 15  # 7 linears per block x 2, and the LM head
    assert msg.startswith(f"{n} quantized layer(s) run slower than float here (0.50x of float")
    assert "lowbit.summary(model)" in msg and "model.lowbit_slower_layers" in msg
    assert "model.layers.0.self_attn.q_proj" not in msg  # a count and a range, not the list
    slow_names = {x["layer"] for x in model.lowbit_slower_layers}
    slow_rows = [r for r in lowbit.summary(model) if r["layer"] in slow_names and r["kernel"] != "float"]
    assert len(slow_rows) == n and all("0.50x of float" in r["reason"] for r in slow_rows)
    lowbit.save(model, tmp_path / "q")
    assert lowbit.summary(lowbit.load(tmp_path / "q")) == lowbit.summary(model)


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *[f"w{i}" for i in range(200)]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(path)


def test_cli_quantize_prints_one_line_for_slower_layers(monkeypatch, tmp_path):
    from lowbit.cli import main

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "time_calls", _all_slower)
    tiny_llama().save_pretrained(tmp_path / "src")
    _word_tokenizer(tmp_path / "src")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["quantize", str(tmp_path / "src"), "--recipe", "int4-g32", "--out",
                                      str(tmp_path / "q"), "--in-memory"])
    assert r.exit_code == 0, r.output
    [line] = [str(w.message) for w in caught if "slower than float" in str(w.message)]
    assert "\n" not in line and re.match(r"15 quantized layer\(s\) run slower than float here \(0.50x", line)
    assert "q_proj" not in line
    manifest = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert len(manifest["slower_layers"]) == 15  # the full list, with reasons, stays in the checkpoint


# ---------------------------------------------------------------- bits per weight


def test_summary_gives_bits_per_weight():
    k, n = 256, 64
    expected = {
        "int8": 8 + 2 * 16 / k,  # codes, 16-bit scale and zero point per row
        "int4-g128": 4 + 2 * 16 / 128,
        "int4-g32": 4 + 2 * 16 / 32,
        "int4-g32-fp32scales": 4 + 2 * 32 / 32,
        "kmeans4-g64": 4 + 16 * 16 / 64,  # a 16-entry fp16 codebook per group of 64
        "kmeans4": 4 + 16 * 16 / k,
        "bf16": 16,
    }
    for recipe, bits in expected.items():
        q = quiet(lowbit.quantize, nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(k // 2 * 2, n)),
                  recipe) if False else quiet(lowbit.quantize, nn.Sequential(nn.Linear(k, n)), recipe)
        rows = lowbit.summary(q)
        assert rows[0]["bits_per_weight"] == pytest.approx(bits), recipe
        assert rows.bits_per_weight == pytest.approx(bits)
    # the average is over the model's layers, by their weights
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    q = quiet(lowbit.quantize, model, "int4-g32", exclude=["2"])
    rows = lowbit.summary(q)
    assert len(rows) == 1 and rows.bits_per_weight == pytest.approx(5.0)
    q = quiet(lowbit.quantize, nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32)), "int4-g32")
    assert lowbit.summary(q).bits_per_weight == pytest.approx(5.0)
    emb = quiet(lowbit.quantize, nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 32)), "int8")
    rows = lowbit.summary(emb)
    avg = (100 * 64 * (8 + 32 / 64) + 32 * 64 * (8 + 32 / 64)) / (100 * 64 + 32 * 64)
    assert rows.bits_per_weight == pytest.approx(avg)

"""lowbit's bf16 attention: the kernel against a reference of its documented roundings and against float32
SDPA; the `-bf16attn` recipe option on transformers models (switch, save/load, torch.compile, fallbacks)."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import lowbit
from lowbit import attention
from lowbit.backends import lowbit_cpu, ops
from lowbit.recipes import parse_recipe

needs_bf16 = pytest.mark.skipif(not attention.available(),
                                reason="this CPU lacks AVX-512 BF16: lowbit's bf16 attention kernel cannot run "
                                       "(its models use torch's SDPA, tested below)")
LOG2E = 1 / math.log(2)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def reference(q, k, v, mask, scale, causal):
    """The documented computation for keys that fit one softmax block (<= 256): Q*scale*log2(e), K, V and
    the unnormalized probabilities rounded to bf16, everything else in float64. [B, Sq, H, D]."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, 1)
    v = v.repeat_interleave(h // hkv, 1)
    s = bf16(q * (scale * LOG2E)) @ bf16(k).transpose(-1, -2)
    if mask is not None:
        s = s + mask.double().clamp_min(-1e30).masked_fill(mask == float("-inf"), float("-inf")) * LOG2E
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp2(s - m)
    out = (bf16(p.float()) @ bf16(v)) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).float()


def sdpa(q, k, v, mask, scale, causal):
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, 1)
    v = v.repeat_interleave(h // hkv, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale).transpose(1, 2)


def qkv(b, h, hkv, sq, sk, d, seed=0, layout="bshd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # as transformers hands them over: a transposed view of the projections' output
        q = torch.randn(b, sq, h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2) * 2
        v = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2)
    else:
        q = torch.randn(b, h, sq, d, generator=g)
        k = torch.randn(b, hkv, sk, d, generator=g) * 2
        v = torch.randn(b, hkv, sk, d, generator=g)
    return q, k, v


SHAPES = [  # b, h, hkv, sq, sk, d
    (2, 12, 12, 128, 128, 32),   # MiniLM
    (1, 4, 2, 77, 77, 64),       # grouped kv heads, rows not a multiple of the tiles
    (1, 2, 1, 1, 200, 128),      # one query row (decode)
    (3, 3, 3, 9, 31, 16),        # keys not a multiple of 32
    (1, 2, 2, 70, 250, 48),      # head_dim a multiple of 16, not 32
]


@needs_bf16
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_kernel_matches_its_rounding_reference(shape, layout):
    q, k, v = qkv(*shape, layout=layout)
    scale = shape[-1] ** -0.5
    out = lowbit_cpu.attention_bf16(q, k, v, None, scale, False)
    assert out.shape == (shape[0], shape[3], shape[1], shape[5]) and out.is_contiguous()
    ref = reference(q, k, v, None, scale, False)
    # float32 sums in another order, the 2^x polynomial (1e-7): far below bf16's 4e-3 steps.
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)
    # And near float32 attention: bf16's rounding, no more.
    err = (out - sdpa(q, k, v, None, scale, False)).abs()
    assert err.max() < 0.03 and err.mean() < 3e-3


@needs_bf16
@pytest.mark.parametrize("causal", [False, True])
def test_masks_and_causal(causal):
    b, h, s, d = 2, 4, 45, 32
    q, k, v = qkv(b, h, h, s, s, d, seed=1)
    pad = torch.zeros(b, 1, 1, s)
    pad[1, ..., 30:] = float("-inf")  # padding of the second sequence
    bias = torch.randn(1, h, s, s, generator=torch.Generator().manual_seed(2))  # a float bias per head and position
    for mask in (None, pad, bias, pad + bias):
        if causal and mask is not None:
            continue  # transformers passes causality as a mask or the flag, not both
        out = lowbit_cpu.attention_bf16(q, k, v, mask, d ** -0.5, causal)
        ref = reference(q, k, v, mask, d ** -0.5, causal)
        # The kernel adds the mask to float32 scores, the reference to float64 ones: a probability that lies
        # on a bf16 rounding boundary can round the other way, moving its output by up to one bf16 step of
        # that probability times |v|. Over 300 random biases: at most 0.21% of the outputs beyond the tight
        # tolerance, none beyond 3.4e-3.
        err = (out - ref).abs()
        assert (err > 2e-4 + 1e-3 * ref.abs()).float().mean() < 0.01 and err.max() < 1e-2, (mask is None, causal)
        assert (out - sdpa(q, k, v, mask, d ** -0.5, causal)).abs().max() < 0.03


@needs_bf16
def test_rows_masked_everywhere():
    q, k, v = qkv(1, 2, 2, 4, 40, 16, seed=2)
    m = torch.zeros(1, 1, 4, 40)
    m[0, 0, 1] = torch.finfo(torch.float32).min  # finite: every key weighs the same, as in torch's SDPA
    m[0, 0, 2] = float("-inf")  # nothing to attend to: 0, as torch's SDPA on the CPU gives
    out = lowbit_cpu.attention_bf16(q, k, v, m, 0.25, False)
    torch.testing.assert_close(out[0, 1], bf16(v[0]).float().mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 2], F.scaled_dot_product_attention(q, k, v, attn_mask=m)[0, :, 2])
    assert out[0, 2].abs().max() == 0
    assert out.isfinite().all()


@needs_bf16
def test_long_keys_stream_through_blocks():
    # 700 keys: three softmax blocks whose maxima differ (a large bias on late keys rescales earlier ones).
    q, k, v = qkv(1, 2, 2, 20, 700, 64, seed=3)
    bias = torch.zeros(1, 1, 1, 700)
    bias[..., 600:] = 6.0
    out = lowbit_cpu.attention_bf16(q, k, v, bias, 0.125, False)
    ref = sdpa(q, k, v, bias, 0.125, False)
    err = (out - ref).abs()
    assert err.max() < 0.03 and err.mean() < 3e-3


@needs_bf16
def test_bad_inputs_are_refused():
    q, k, v = qkv(1, 2, 2, 8, 8, 40)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 16"):
        lowbit_cpu.attention_bf16(q, k, v, None, 1.0, False)
    q, k, v = qkv(1, 3, 2, 8, 8, 32)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        lowbit_cpu.attention_bf16(q, k, v, None, 1.0, False)
    q, k, v = qkv(1, 2, 2, 8, 8, 32)
    with pytest.raises(RuntimeError, match="mask must be float32 and broadcast"):
        lowbit_cpu.attention_bf16(q, k, v, torch.zeros(1, 1, 8, 9), 1.0, False)
    with pytest.raises(RuntimeError, match="float32"):
        lowbit_cpu.attention_bf16(q.half(), k, v, None, 1.0, False)


# ---------------------------------------------------------------- the recipe option on transformers models


def test_recipe_attention_defaults_and_suffixes():
    c = parse_recipe("w8a8-dynamic")  # activations quantized: attention in bf16 by default
    assert c.attention == "bf16" and c.name == "w8a8-dynamic"
    assert parse_recipe("w8a8-dynamic-bf16attn") == c
    own = parse_recipe("w8a8-dynamic-floatattn")
    assert own.attention is None and own.name == "w8a8-dynamic-floatattn" and own.act == "dynamic"
    assert parse_recipe("int4-a8").attention == "bf16"
    assert parse_recipe("int4-g128").attention is None  # weight-only: the model's own unless asked
    assert parse_recipe("int4-g128-fp32scales-bf16attn").name == "int4-g128-fp32scales-bf16attn"
    # Manifests of weight-only recipes read as before; a W8A8 manifest without the key (written before the
    # option) is a model that ran its own attention.
    assert "attention" not in parse_recipe("int4-g128").to_dict()
    assert lowbit.QuantConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "attention"}) == own
    with pytest.raises(ValueError, match="unknown attention"):
        lowbit.QuantConfig("int", 8, symmetric=True, attention="int4")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def bert_batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0  # padding: the attention mask reaches the kernel
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hidden(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def test_bf16attn_model_switches_and_stays_close(monkeypatch):
    batches = bert_batches()
    plain = lowbit.quantize(tiny_bert(), "int8", calibration=batches)
    model = lowbit.quantize(tiny_bert(), "int8-bf16attn", calibration=batches)
    assert model.config._attn_implementation == attention.IMPLEMENTATION
    assert model.lowbit_attention == attention.path()
    calls = []
    real = ops.attention_bf16
    monkeypatch.setattr(ops, "attention_bf16", lambda *a: calls.append(a[3]) or real(*a))
    b = batches[0]
    out, ref = hidden(model, b), hidden(plain, b)
    keep = b["attention_mask"].bool()
    err = (out - ref)[keep].abs()
    if attention.available():
        assert len(calls) == 2 and calls[0] is not None  # both layers, with the padding mask...
        assert calls[0].shape == (4, 1, 1, 24)  # ...one row per sequence, broadcast over heads and queries
        assert err.max() < 0.1 and err.mean() < 0.01
        assert err.max() > 0  # bf16 did round something
    else:
        assert not calls and err.max() == 0  # torch's SDPA: the plain model's numbers


def test_bf16attn_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    model = lowbit.quantize(tiny_bert(), "int8-bf16attn", calibration=bert_batches())
    calls = []
    monkeypatch.setattr(ops, "attention_bf16", lambda *a: calls.append(1))
    batch = bert_batches()[0]
    model.train()  # attention dropout: torch's SDPA
    model(**batch)
    model.eval()
    q = torch.randn(1, 2, 5, 32, requires_grad=True)  # gradients wanted: torch's SDPA
    out, _ = attention.attention_forward(nn.Module(), q, q, q, None)
    out.sum().backward()
    assert not calls and q.grad is not None


def test_bf16attn_survives_save_and_load(tmp_path):
    batches = bert_batches()
    model = lowbit.quantize(tiny_bert(), "int8-bf16attn", calibration=batches)
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    assert back.lowbit_recipe.attention == "bf16"
    assert back.config._attn_implementation == attention.IMPLEMENTATION
    assert torch.equal(hidden(back, batches[0]), hidden(model, batches[0]))


def test_models_without_attention_interface_keep_theirs():
    model = lowbit.quantize(nn.Sequential(nn.Linear(32, 32)), "w8a8-dynamic", backend="onednn")
    assert "not a transformers model" in model.lowbit_attention
    assert "not a transformers model" in lowbit.summary(model).attention


def test_w8a8_on_transformers_runs_bf16_attention_unless_floatattn():
    batches = bert_batches()
    backend = "onednn"  # "auto" would keep these tiny layers in float
    model = lowbit.quantize(tiny_bert(), "w8a8-dynamic", calibration=batches, backend=backend)
    own = lowbit.quantize(tiny_bert(), "w8a8-dynamic-floatattn", calibration=batches, backend=backend)
    assert attention.uses(model) and not attention.uses(own)
    assert lowbit.summary(model).attention == attention.path() and lowbit.summary(own).attention is None
    keep = batches[0]["attention_mask"].bool()
    err = (hidden(model, batches[0]) - hidden(own, batches[0]))[keep].abs()
    assert err.max() < 0.1
    with attention.own_attention(model):  # export checks run the float attention
        assert torch.equal(hidden(model, batches[0]), hidden(own, batches[0]))
    assert attention.uses(model)


@needs_bf16
def test_bf16attn_compiles_in_one_graph():
    batches = bert_batches()
    model = lowbit.quantize(tiny_bert(), "int8-bf16attn", calibration=batches)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(**batches[0])
    assert explain.graph_break_count == 0, explain.break_reasons
    graph = "\n".join(str(g.graph) for g in explain.graphs)
    assert graph.count("lowbit.attention_bf16") == 2  # one opaque node per layer
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(hidden(compiled, batches[0]), hidden(model, batches[0]), atol=1e-5, rtol=1e-5)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_causal_lm_prefill_and_decode(monkeypatch):
    """A decoder with grouped kv heads: prefill goes through the kernel (causal), decode steps (one query row)
    through torch's SDPA; both stay close to the model with its own attention."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (2, 24), generator=g)
    model = lowbit.quantize(tiny_llama(), "int8-bf16attn", calibration=[{"input_ids": ids}] * 4)
    own = lowbit.quantize(tiny_llama(), "int8", calibration=[{"input_ids": ids}] * 4)
    rows = []
    real = ops.attention_bf16
    monkeypatch.setattr(ops, "attention_bf16", lambda *a: rows.append((a[0].shape[2], a[5])) or real(*a))
    with torch.inference_mode():
        logits, ref = model(ids).logits, own(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        out_own = own.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    if attention.available():
        assert rows and all(r == (24, True) for r in rows)  # prefill only, with the causal flag
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert out.shape == out_own.shape == (2, 27)

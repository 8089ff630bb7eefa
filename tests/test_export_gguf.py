"""GGUF export: lowbit's codes packed as llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks, the rope permutation, the
tokenizer and metadata llama.cpp reads, refusals, and the read-back check that every export runs."""

import json
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lowbit
from lowbit.export import ExportError, to_gguf
from lowbit.export import gguf as export_gguf

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores each weight in a few bits; the scales keep their range.",
    "def add(a, b):\n    return a + b  # 42 apples, 7 pears",
    "It's what they'd said: we'll see, you've seen, I'm here.",
    "llama.cpp reads GGUF files; lowbit writes them with its own codes.",
] * 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
VOCAB_ROWS = 320  # more rows than the tokenizer has tokens: the rest are written as unused


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(LINES, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                      max_position_embeddings=64, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that they are really compared
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def quantized(recipe):
    model = tiny_llama()
    # Every layer in the recipe's format, the embeddings and LM head too (a plain recipe keeps those at int8).
    config = lowbit.parse_recipe(recipe) if isinstance(recipe, str) else recipe
    lowbit.quantize(model, lowbit.LayerRecipe((("*", config),)), keep_float_if_slower=False)
    return model


def read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    f = reader.fields[key]
    if len(f.types) > 1 and f.types[0] == gguf.GGUFValueType.ARRAY:  # arrays: every element
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def hf_permute(w, heads):
    """llama.cpp's converter's permutation of q/k rows (written here from its definition)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SYM4 = lowbit.QuantConfig("int", 4, 32, symmetric=True)
CASES = [("int8", "Q8_0"), (SYM4, "Q4_0"), ("int4-g32", "Q4_1"), ("int4-g128", "Q4_1"),
         ("int4-g32-hqq", "Q4_1"), ("int3-g64", "Q4_1"), ("int2-g32", "Q4_1"),
         (lowbit.QuantConfig("int", 3, 64, symmetric=True), "Q4_0"),
         (lowbit.QuantConfig("int", 6, 32, symmetric=True), "Q8_0")]


@pytest.mark.parametrize("recipe,qtype", CASES,
                         ids=["int8", "int4-g32-sym", "int4-g32", "int4-g128", "int4-g32-hqq", "int3-g64",
                              "int2-g32", "int3-g64-sym", "int6-g32-sym"])
def test_export_reads_back_as_lowbit_weights(tmp_path, tokenizer, recipe, qtype):
    model = quantized(recipe)
    lines = []
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, echo=lines.append)
    assert path == tmp_path / "m.gguf" and sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary left
    assert any("read back" in line for line in lines), lines
    _, tensors = read(path)
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    layers = {"token_embd.weight": model.model.embed_tokens, "output.weight": model.lm_head}
    for i, block in enumerate(model.model.layers):
        a, m = block.self_attn, block.mlp
        layers |= {f"blk.{i}.attn_q.weight": a.q_proj, f"blk.{i}.attn_k.weight": a.k_proj,
                   f"blk.{i}.attn_v.weight": a.v_proj, f"blk.{i}.attn_output.weight": a.o_proj,
                   f"blk.{i}.ffn_gate.weight": m.gate_proj, f"blk.{i}.ffn_up.weight": m.up_proj,
                   f"blk.{i}.ffn_down.weight": m.down_proj}
    for name, layer in layers.items():
        t = tensors[name]
        assert t.tensor_type.name == qtype, name
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        want = layer.dequantized_weight().float()
        if "attn_q" in name:
            want = hf_permute(want, HEADS)
        elif "attn_k" in name:
            want = hf_permute(want, KV_HEADS)
        # Only the scales (and Q4_1's min) are rounded to fp16: relative 2**-11 of (|u| + |zero|) * scale,
        # at most (255 + 0) or (15 + 15) steps of a scale; a scale is at most max |w| / 7 here.
        bound = 2.0 ** -11 * want.abs().max() * (30 if qtype != "Q8_0" else 1.01)
        err = (got - want).abs().max()
        assert err <= bound, (name, err, bound)
        if layer.scale.dtype == torch.float16 and qtype != "Q4_1":
            assert err == 0, name  # 16-bit scales are the file's d as they are (Q4_1's m = -zero * d rounds)
    for name, t in tensors.items():
        if "norm" in name:
            assert t.tensor_type.name == "F32"
    norm = model.model.layers[1].post_attention_layernorm.weight
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.ffn_norm.weight"].data)), norm.detach())


def test_metadata_and_tokenizer(tmp_path, tokenizer):
    path = export_gguf(tiny_llama(), tmp_path / "f.gguf", tokenizer=tokenizer, echo=lambda s: None)
    reader, tensors = read(path)
    assert field(reader, "general.architecture") == "llama"
    expect = {"llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
              "llama.feed_forward_length": 128, "llama.attention.head_count": HEADS,
              "llama.attention.head_count_kv": KV_HEADS, "llama.rope.dimension_count": HEAD_DIM,
              "llama.vocab_size": VOCAB_ROWS, "tokenizer.ggml.bos_token_id": 0,
              "tokenizer.ggml.eos_token_id": 1,
              "general.file_type": int(gguf.LlamaFileType.ALL_F32)}
    for key, value in expect.items():
        assert field(reader, key) == value, key
    assert math.isclose(field(reader, "llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == VOCAB_ROWS and len(types) == VOCAB_ROWS
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[0] == types[1] == gguf.TokenType.CONTROL and types[5] == gguf.TokenType.NORMAL
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(len(vocab), VOCAB_ROWS))
    merges = field(reader, "tokenizer.ggml.merges")
    want = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in want] and merges
    # Float export: bit-exact weights.
    w = torch.from_numpy(np.array(tensors["blk.0.attn_v.weight"].data))
    assert torch.equal(w, tiny_llama().model.layers[0].self_attn.v_proj.weight.detach())


def test_permuted_rows_give_the_same_rotary_attention(tmp_path):
    """With the q/k rows as written, llama.cpp's rope (pairs of adjacent rows) gives HF's rope (first half
    with second half of each head) on the model's own rows: attention scores agree."""
    model = quantized("int4-g32")
    path = export_gguf(model, tmp_path / "m.gguf", echo=lambda s: None)
    _, tensors = read(path)

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).double()

    x = torch.randn(64, dtype=torch.float64)
    inv = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)

    def hf_rope(v, pos):  # v [heads, head_dim]: rotate_half
        c, s = torch.cos(pos * inv).repeat(2), torch.sin(pos * inv).repeat(2)
        h = HEAD_DIM // 2
        rot = torch.cat([-v[:, h:], v[:, :h]], dim=1)
        return v * c + rot * s

    def interleaved_rope(v, pos):  # ggml's normal rope: rows (2i, 2i+1) rotated by theta_i
        c, s = torch.cos(pos * inv), torch.sin(pos * inv)
        a, b = v[:, 0::2], v[:, 1::2]
        out = torch.empty_like(v)
        out[:, 0::2], out[:, 1::2] = a * c - b * s, a * s + b * c
        return out

    attn = model.model.layers[1].self_attn
    q_hf = (attn.q_proj.dequantized_weight().double() @ x).reshape(HEADS, HEAD_DIM)
    k_hf = (attn.k_proj.dequantized_weight().double() @ x).reshape(KV_HEADS, HEAD_DIM)
    q_gg = (deq("blk.1.attn_q.weight") @ x).reshape(HEADS, HEAD_DIM)
    k_gg = (deq("blk.1.attn_k.weight") @ x).reshape(KV_HEADS, HEAD_DIM)
    scores_hf = hf_rope(q_hf, 5) @ hf_rope(k_hf, 2).T
    scores_gg = interleaved_rope(q_gg, 5) @ interleaved_rope(k_gg, 2).T
    torch.testing.assert_close(scores_gg, scores_hf, rtol=1e-2, atol=1e-3 * scores_hf.abs().max().item())
    # Without the permutation the scores would differ: the check can fail.
    q_raw = (attn.q_proj.dequantized_weight().double() @ x).reshape(HEADS, HEAD_DIM)
    assert not torch.allclose(interleaved_rope(q_raw, 5) @ interleaved_rope(k_hf, 2).T, scores_hf, rtol=1e-2)


def _gguf_quantized(x, qtype):
    return gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])


def test_blocks_byte_identical_to_gguf_reference_packing():
    """On values every packer encodes the same way (fp16-exact scales, block extremes present), lowbit's
    blocks are byte for byte those of the gguf package's reference quantizer: same field and nibble order."""
    g = torch.Generator().manual_seed(1)
    n, k = 4, 64
    d = 2.0 ** torch.randint(-8, -2, (n, k // 32), generator=g).float()
    # Q8_0: q in [-127, 127] with 127 present per block (gguf picks d = amax / 127).
    q = torch.randint(-127, 128, (n, k), generator=g)
    q.view(n, k // 32, 32)[..., 3] = 127
    x = (q.view(n, k // 32, 32) * d.unsqueeze(-1)).reshape(n, k)
    assert np.array_equal(to_gguf.pack_q8_0(q, d.half()), _gguf_quantized(x, "Q8_0"))
    # Q4_0: u in [0, 15], value -8 * d present as each block's largest magnitude (gguf: d = max / -8).
    u = torch.randint(1, 16, (n, k), generator=g)
    u.view(n, k // 32, 32)[..., 7] = 0
    x = ((u.view(n, k // 32, 32) - 8) * d.unsqueeze(-1)).reshape(n, k)
    assert np.array_equal(to_gguf.pack_q4_0(u, d.half()), _gguf_quantized(x, "Q4_0"))
    # Q4_1: u in [0, 15] with 0 and 15 present (gguf: m = min, d = (max - min) / 15).
    u = torch.randint(0, 16, (n, k), generator=g)
    u.view(n, k // 32, 32)[..., 0], u.view(n, k // 32, 32)[..., 20] = 0, 15
    m = -3 * d
    x = (u.view(n, k // 32, 32) * d.unsqueeze(-1) + m.unsqueeze(-1)).reshape(n, k)
    assert np.array_equal(to_gguf.pack_q4_1(u, d.half(), m.half()), _gguf_quantized(x, "Q4_1"))


def test_verification_catches_a_wrong_nibble_order(tmp_path, monkeypatch):
    def swapped(u):  # the other plausible layout: element 2j low, 2j + 1 high
        n, k = u.shape
        b = u.to(torch.uint8).reshape(n, k // 32, 16, 2)
        return b[..., 0] | (b[..., 1] << 4)

    monkeypatch.setattr(to_gguf, "_nibbles", swapped)
    with pytest.raises(ExportError, match="differs from lowbit's weight"):
        export_gguf(quantized("int4-g32"), tmp_path / "m.gguf", echo=lambda s: None)
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


@pytest.mark.parametrize("recipe,words", [
    ("int6-g32", ["int6", "6-bit", "zero points"]),
    ("kmeans4", ["kmeans4"]),
    ("int4-g48", ["48", "multiple of 32"]),
    ("w8a8-dynamic", ["w8a8-dynamic", "activations"]),
])
def test_refuses_what_gguf_cannot_hold(tmp_path, recipe, words):
    with pytest.raises(ExportError) as e:
        export_gguf(quantized(recipe), tmp_path / "m.gguf", echo=lambda s: None)
    msg = str(e.value)
    assert "model.embed_tokens" in msg or "model.layers.0" in msg, msg  # names the layer
    assert all(w in msg for w in words), msg
    assert os.listdir(tmp_path) == []


def test_refuses_other_models_and_tokenizers(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="Llama-family"):
        export_gguf(torch.nn.Linear(32, 32), tmp_path / "m.gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    wp = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(ExportError, match="byte-level BPE"):
        export_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=other)
    assert os.listdir(tmp_path) == []


def test_cli_exports_a_saved_checkpoint(tmp_path, tokenizer):
    from click.testing import CliRunner

    from lowbit.cli import main

    model = quantized("int4-g32")
    lowbit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "out" / "model.gguf"
    r = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "read back" in r.output and f"wrote {out}" in r.output
    reader, tensors = read(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == VOCAB_ROWS
    # Same codes as exporting the in-memory model: loading the checkpoint changed nothing.
    direct = export_gguf(model, tmp_path / "direct.gguf", tokenizer=tokenizer, echo=lambda s: None)
    _, again = read(direct)
    assert all(np.array_equal(tensors[n].data, again[n].data) for n in tensors)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 0
    lowbit.save(quantized("kmeans4"), tmp_path / "km")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "km"), "-f", "gguf", "-o",
                                  str(tmp_path / "k.gguf")])
    assert r.exit_code != 0 and "kmeans4" in r.output and not (tmp_path / "k.gguf").exists()


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "llama-tied-fp16"])
def test_other_llama_family_shapes(tmp_path, tokenizer, kind):
    shape = {"vocab_size": VOCAB_ROWS, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64}
    torch.manual_seed(0)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=False))
    else:
        config = transformers.LlamaConfig(**shape, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config).half()
    if kind != "llama-tied-fp16":
        lowbit.quantize(model, "int4-g32", keep_float_if_slower=False)
    path = export_gguf(model.eval(), tmp_path / "m.gguf", tokenizer=tokenizer, echo=lambda s: None)
    reader, tensors = read(path)
    assert field(reader, "general.architecture") == ("qwen2" if kind == "qwen2" else "llama")
    attn = model.model.layers[0].self_attn
    q = torch.from_numpy(np.array(gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data,
                                                         tensors["blk.0.attn_q.weight"].tensor_type)))
    want = attn.q_proj.weight.float()
    if kind != "qwen2":  # llama.cpp's qwen2 ropes each head's halves, as Hugging Face does: not permuted
        want = hf_permute(want, HEADS)
    torch.testing.assert_close(q, want, rtol=0, atol=2.0 ** -10 * 30 * want.abs().max().item())
    if kind == "qwen2":
        bias = torch.from_numpy(np.array(tensors["blk.0.attn_k.bias"].data))
        assert torch.equal(bias, attn.k_proj.bias.float())
    if kind == "llama-tied-fp16":  # a tied head is read from token_embd; fp16 weights stay F16, norms F32
        assert "output.weight" not in tensors
        assert tensors["blk.0.attn_v.weight"].tensor_type.name == "F16"
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

"""compressed-tensors export: lowbit's codes, scales and zero points in the layout the compressed-tensors
package reads; folders load in transformers with lowbit unimportable and match lowbit's outputs; what the
format cannot hold is refused; the CLI exports a saved checkpoint."""

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.backends import onednn
from lowbit.export import ExportError
from lowbit.export import to_compressed_tensors as ct

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

CALIBRATION = [torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
SHAPE = {"vocab_size": 200, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}


def llama(**changes):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, num_key_value_heads=2, **changes)).eval()


def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(**SHAPE)).eval()


INT4_G128_SYM = dataclasses.replace(lowbit.parse_recipe("int4-g128"), symmetric=True)


def quantized(make, recipe, **kw):
    config = lowbit.parse_recipe(recipe)
    # The int8 kernel where it exists: W8A8 layers this small would otherwise stay float (slower here).
    backend = "onednn" if config.act and onednn.available() else "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Every layer in the recipe's format (a plain recipe keeps a causal LM's embeddings and head at int8).
        return lowbit.quantize(make(), lowbit.LayerRecipe((("*", config),)), backend=backend,
                               calibration=CALIBRATION if config.needs_calibration else None, **kw)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_the_packages_layout(bits):
    """Our packing gives the compressed-tensors package's words exactly (rows and columns, ragged lengths)."""
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2 ** bits, (5, 77), generator=g)
    signed = (u - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(ct.pack_int32(u, bits), pack_to_int32(signed, bits))
    assert torch.equal(ct.pack_int32(u, bits, dim=0), pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(ct.pack_int32(u, bits), bits, u.shape), signed)


def test_tensors_are_lowbits_codes(tmp_path):
    """The folder holds lowbit's own codes, scales and zero points (read back with the package's unpacking),
    the config says what compressed-tensors needs, and nothing was re-quantized."""
    model = quantized(llama, "int4-g32")
    ct.export(model, tmp_path / "out", verify_export=False, echo=lambda s: None)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    [group] = config["config_groups"].values()
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "dynamic": False}
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    layer = model.model.layers[1].mlp.down_proj
    u, scale, zero = layer.scheme.affine_codes(layer.canonical_state(), (128, 256))
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_shape"].tolist() == [128, 256]
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size([128, 256]))
    assert torch.equal(codes.to(torch.int64) + 8, u.to(torch.int64))
    zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4, torch.Size([128, 8]), packed_dim=0)
    assert torch.equal(zp.to(torch.float32) + 8, zero)
    assert torch.equal(tensors[f"{name}.weight_scale"], scale)
    # The embedding is written in float: the values lowbit's lookup returns.
    emb = tensors["model.embed_tokens.weight"]
    assert torch.equal(emb, model.model.embed_tokens(torch.arange(200)))


# (model, recipe): every one is exported, and all are loaded without lowbit in one interpreter.
CASES = [("llama", "int4-g32"), ("llama", "int4-g128"), ("llama", INT4_G128_SYM), ("llama", "int8"),
         ("llama", "w8a8-dynamic"), ("llama", "w8a8-static"), ("bert", "int4-g128"), ("bert", "int8"), ("bert", "w8a8-dynamic"), ("bert", "w8a8-static"), ("llama", "int3-g32"),
         ("llama", "int4-a8")]
FORMATS = {"w8a8-dynamic": "int-quantized", "w8a8-static": "int-quantized"}


def test_folders_load_without_lowbit_and_match(tmp_path):
    jobs, references, names = [], [], []
    inputs = {"input_ids": torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(7))}
    for kind, recipe in CASES:
        model = quantized(llama if kind == "llama" else bert, recipe)
        config = lowbit.parse_recipe(recipe)
        folder = tmp_path / f"{kind}-{config.name}-{'sym' if config.symmetric else 'asym'}"
        ct.export(model, folder, verify_export=False, echo=lambda s: None)
        written = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert written["format"] == FORMATS.get(config.name, "pack-quantized"), folder.name
        [group] = written["config_groups"].values()
        assert (group["input_activations"] or {}).get("dynamic") == (
            {"dynamic": True, "static": False}.get(config.act)), folder.name
        asym = not group["weights"]["symmetric"]
        jobs.append(ct.Job(folder, inputs, kind == "llama", dequantize=asym))
        references.append(ct.reference_output(model, inputs))
        names.append(folder.name)
    results = ct.run_without_lowbit(jobs)
    for name, reference, (got, compressed), job in zip(names, references, results, jobs, strict=True):
        agreement = ct.agreement(reference, got)
        assert agreement.cosine >= 0.9999, (name, agreement)
        if not job.dequantize:  # compressed-tensors kept its quantized layers (decompressed on first forward)
            assert compressed >= 13, (name, compressed)
    # The comparison is not vacuous: another model's outputs fail it.
    with pytest.raises(ExportError, match="does not match"):
        ct.agreement(references[0], results[1][0])


def test_export_verifies_and_replaces_its_own_folder(tmp_path):
    lines = []
    model = quantized(bert, "w8a8-static")
    out = ct.export(model, tmp_path / "out", echo=lines.append)
    assert any(line.startswith("verified: transformers + compressed-tensors (no lowbit)") for line in lines), lines
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".out.tmp-*"))
    # A second export replaces the folder this exporter wrote; a foreign non-empty folder is refused.
    ct.export(quantized(bert, "int8"), out, verify_export=False, echo=lambda s: None)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="did not write"):
        ct.export(model, foreign, verify_export=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_wrong_export_fails_its_check_and_writes_nothing(tmp_path, monkeypatch):
    """The automatic check runs the folder: scales written wrong (here doubled) fail it, and no folder appears."""
    real = ct._weight_only

    def doubled(name, mod, dtype):
        scheme, tensors = real(name, mod, dtype)
        return scheme, {**tensors, "weight_scale": tensors["weight_scale"] * 2}

    monkeypatch.setattr(ct, "_weight_only", doubled)
    with pytest.raises(ExportError, match="does not match lowbit's"):
        ct.export(quantized(llama, INT4_G128_SYM), tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("recipe,match", [
    ("int4-g128-hqq", r"zero points are fractional .*hqq"),
    ("kmeans4", "kmeans4 weights"),
    ("ternary", "ternary weights"),
    ("fp8", "fp8_e4m3 weights"),
    ("fp16", "fp16 weights"),
])
def test_refusals_name_the_layer(tmp_path, recipe, match):
    model = quantized(llama, recipe)
    with pytest.raises(ExportError, match=match) as e:
        ct.export(model, tmp_path / "out", verify_export=False)
    assert "layer 'model." in str(e.value) and "compressed-tensors cannot represent it" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_refuses_groups_that_do_not_divide_and_other_layer_kinds(tmp_path):
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "intermediate_size": 200}, num_key_value_heads=2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(odd, "int4-g128")
    with pytest.raises(ExportError, match=r"layer 'model\.layers\.0\.mlp\.down_proj': group size 128 does not "
                                          r"divide its 200 inputs"):
        ct.export(odd, tmp_path / "out", verify_export=False)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=1, n_head=4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(gpt2, "int8")
    with pytest.raises(ExportError, match="a quantized Conv1D"):
        ct.export(gpt2, tmp_path / "out", verify_export=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8")
    with pytest.raises(ExportError, match="not a Hugging Face transformers model"):
        ct.export(plain, tmp_path / "out")


def small_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(ct.SENTENCES * 4, trainers.BpeTrainer(vocab_size=150, special_tokens=["[PAD]", "[UNK]"],
                                                                  show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def test_cli_exports_a_saved_checkpoint(tmp_path):
    """With the tokenizer saved beside the checkpoint, the folder gets it and the check runs on text."""
    pytest.importorskip("click")
    from click.testing import CliRunner

    from lowbit.cli import main

    model = quantized(llama, "int4-g32")
    tokenizer = small_tokenizer()
    inputs = ct._example_inputs(model, tokenizer)
    assert set(inputs) >= {"input_ids", "attention_mask"} and inputs["input_ids"].shape[0] == len(ct.SENTENCES)
    lowbit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--format", "compressed-tensors", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "verified (loaded with CompressedTensorsConfig(dequantize=True)" in r.output
    assert (out / "tokenizer.json").is_file()
    direct = ct.export(model, tmp_path / "direct", verify_export=False, echo=lambda s: None)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lowbit.save(quantized(llama, "kmeans4"), tmp_path / "km")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "km"), "-f", "compressed-tensors", "-o",
                                  str(tmp_path / "k")])
    assert r.exit_code != 0 and "kmeans4" in r.output and not (tmp_path / "k").exists()

"""save_pretrained / from_pretrained of lowbit-quantized transformers models: the folder records the lowbit
quantization in config.json, and from_pretrained (in this process, and in fresh ones that import lowbit
before or after transformers) rebuilds lowbit's layers with outputs equal bit for bit to the saved model's."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.backends import onednn
from lowbit.modules import QuantModule

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
CALIBRATION = [torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


MODELS = {"llama": (llama, AutoModelForCausalLM), "llama-tied": (lambda: llama(tie=True), AutoModelForCausalLM),
          "bert": (bert, AutoModel)}


def output(model) -> torch.Tensor:
    with torch.inference_mode():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def quantized(kind: str, recipe: str):
    make, _ = MODELS[kind]
    # Force the int8 kernel where it exists, so that W8A8 layers this small are not kept in float.
    backend = "onednn" if recipe.startswith("w8a8") and onednn.available() else "auto"
    calibration = CALIBRATION if lowbit.parse_recipe(recipe).needs_calibration else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(make(), recipe, backend=backend, calibration=calibration)


def kernels(model) -> dict[str, str]:
    return {n: f"{type(m).__name__}:{getattr(m, 'kernel_name', '')}" for n, m in model.named_modules()
            if isinstance(m, QuantModule)}


CASES = [("llama", "int8"), ("llama", "int4-g32"), ("llama", "int4-g128-hqq"), ("llama", "w8a8-dynamic"),
         ("llama", "int4-g32-awq"), ("llama-tied", "int4-g32"), ("bert", "int8"), ("bert", "int4-g128-hqq"),
         ("bert", "w8a8-dynamic"), ("bert", "w8a8-static"), ("bert", "fp16")]


@pytest.mark.parametrize("kind,recipe", CASES)
def test_round_trip_in_process(tmp_path, kind, recipe):
    q = quantized(kind, recipe)
    before, layer_kernels = output(q), kernels(q)
    assert layer_kernels, "the recipe quantized nothing"
    q.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit"
    assert config["format_version"] == lowbit.checkpoint.FORMAT_VERSION
    assert config["recipe"] == lowbit.parse_recipe(recipe).name
    assert set(config["layers"]) == set(layer_kernels)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    # Each quantized layer's canonical tensors (codes, scales, ...) are in the weights file, under its name.
    for name, layer in q.named_modules():
        if isinstance(layer, QuantModule):
            for leaf, t in layer.canonical_state().items():
                assert torch.equal(tensors[f"{name}.{leaf}"], t), f"{name}.{leaf}"

    loaded = MODELS[kind][1].from_pretrained(tmp_path)
    assert kernels(loaded) == layer_kernels  # lowbit's layers, on the same kernels
    assert torch.equal(output(loaded), before)
    assert loaded.lowbit_recipe == q.lowbit_recipe
    assert lowbit.summary(loaded) == lowbit.summary(q)


def test_resave_and_lowbit_checkpoint(tmp_path):
    """A model loaded by from_pretrained saves again (both ways), and lowbit.load of a transformers model gives
    one that save_pretrained writes as lowbit-quantized; lowbit's manifest does not repeat the layers in the
    saved Hugging Face config."""
    q = quantized("llama", "int4-g32")
    before = output(q)
    q.save_pretrained(tmp_path / "a")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "b")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert torch.equal(output(b), before)

    lowbit.save(a, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())
    assert "quantization_config" not in manifest["model"]["hf_config"]
    c = lowbit.load(tmp_path / "ckpt")
    assert torch.equal(output(c), before)
    assert c.config.quantization_config.quant_method == "lowbit"
    c.save_pretrained(tmp_path / "c")
    assert torch.equal(output(AutoModelForCausalLM.from_pretrained(tmp_path / "c")), before)


def test_layers_described_as_they_are_when_saved(tmp_path):
    """A kernel chosen after quantize (set_kernel) is the one save_pretrained records and from_pretrained uses."""
    q = quantized("llama", "int4-g32")
    name, layer = next((n, m) for n, m in q.named_modules() if hasattr(m, "candidate_kernels")
                       and len(m.candidate_kernels()) > 1)
    other = next(k for k in layer.candidate_kernels() if k != layer.kernel_name)
    layer.set_kernel(other)
    before = output(q)
    q.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"][name]["kernel"] == other
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.get_submodule(name).kernel_name == other
    assert torch.equal(output(loaded), before)


def test_float_model_saves_and_loads_as_before(tmp_path):
    model = llama()
    before = output(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, QuantModule) for m in loaded.modules())
    assert torch.equal(output(loaded), before)


def test_newer_format_version_is_refused(tmp_path):
    q = quantized("bert", "int8")
    q.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99"):
        AutoModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Fresh interpreters: registration without lowbit having seen transformers, and without lowbit at all


def run_python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prelude = ""
    if blocked:
        prelude = textwrap.dedent(f"""
            import sys

            class Blocker:
                def find_spec(self, fullname, path=None, target=None):
                    if fullname.split(".")[0] in {set(blocked)!r}:
                        raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked)", name=fullname)
                    return None

            sys.meta_path.insert(0, Blocker())
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, check=False)


LOAD_ALL = """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM
    out, kinds = {}, {}
    ids = load_file(IDS_FILE)["ids"]
    for name, folder in FOLDERS.items():
        auto = AutoModelForCausalLM if name.startswith("llama") else AutoModel
        model = auto.from_pretrained(folder)
        with torch.inference_mode():
            o = model(ids)
        out[name] = (o.logits if hasattr(o, "logits") else o.last_hidden_state).contiguous()
        kinds[name] = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("lowbit")})
    save_file(out, OUT_FILE)
    print(json.dumps(kinds))
"""


@pytest.mark.parametrize("order", ["lowbit-first", "transformers-first"])
def test_round_trip_in_fresh_process(tmp_path, order):
    """`import lowbit` (before transformers: registered when transformers' quantizer registry is imported;
    after it: registered at once) is all from_pretrained needs."""
    expected, folders = {}, {}
    cases = ([("llama", "int4-g32"), ("bert", "int8")] if order == "lowbit-first"
             else [("llama", "w8a8-dynamic"), ("bert", "int4-g128-hqq")])
    for kind, recipe in cases:
        q = quantized(kind, recipe)
        name = f"{kind}-{recipe}"
        expected[name] = output(q)
        q.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    head = ("import lowbit\nassert 'transformers' not in sys.modules\nimport transformers\n"
            if order == "lowbit-first" else "import transformers, transformers.quantizers.auto\nimport lowbit\n")
    code = (f"import sys\n{head}FOLDERS = {folders!r}\nIDS_FILE = {str(tmp_path / 'ids.safetensors')!r}\n"
            f"OUT_FILE = {str(tmp_path / 'out.safetensors')!r}\n" + textwrap.dedent(LOAD_ALL))
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    kinds = json.loads(r.stdout.splitlines()[-1])
    got = load_file(str(tmp_path / "out.safetensors"))
    for name, want in expected.items():
        assert {"QuantLinear", "W8A8Linear"} & set(kinds[name]), (name, kinds[name])
        assert torch.equal(got[name], want), name


def test_loading_without_lowbit_is_not_silent(tmp_path):
    """Without lowbit, transformers does not know quant_method "lowbit": it says so and that it skips the
    quantization, and its load report lists every quantized layer's weight as missing (freshly initialized).
    This pins down that behaviour (transformers does not raise), so a change in it is noticed."""
    quantized("bert", "int8").save_pretrained(tmp_path)
    r = run_python(f"""
        import transformers
        from transformers import AutoModel
        AutoModel.from_pretrained({str(tmp_path)!r})
        print("loaded")
    """, blocked=("lowbit",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Unknown quantization type, got lowbit" in r.stderr
    assert "MISSING" in r.stderr and "encoder.layer.{0, 1}.attention.self.query.weight" in r.stderr


def test_bf16_model_round_trip(tmp_path):
    """A model loaded in bf16 and quantized keeps its dtype and its exact outputs through the round trip."""
    llama().save_pretrained(tmp_path / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16),
                            "int4-g32")
    before = output(q)
    assert before.dtype == torch.bfloat16
    q.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {m.float_dtype for m in loaded.modules() if isinstance(m, QuantModule)} == {torch.bfloat16}
    assert torch.equal(output(loaded), before)


def test_base_model_loads_under_a_head(tmp_path):
    """A quantized base model saved on its own loads inside a model with a head (names gain its prefix)."""
    q = quantized("bert", "int8")
    before = output(q)
    q.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        headed = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(headed.bert.encoder.layer[0].attention.self.query, QuantModule)
    assert torch.equal(output(headed.bert), before)

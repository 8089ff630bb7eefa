"""Quantized models compiled by inductor against the same models run eagerly, over changing batch sizes,
and `lowbit bench --compile` timing both side by side.

Tolerance: traced without code generation (AOTAutograd alone), every model gives eager's bits: the custom
ops run the very same kernels on the very same inputs. Inductor then fuses the float ops around them
(embedding decode, GELU, layer norm, residual adds), which may round differently in the last bit: outputs
are held to a cosine of at least 0.99999 and a relative error of 1e-5, except W8A8 with dynamic activations
(1e-3): there a last-bit difference in a layer's input can move an activation code by one step where it
sits at a rounding boundary, and with per-row scales one step is up to 1/255 of the row's range. On MiniLM,
whose feed-forward activations have outliers, that shows as cosine ~0.9997 to eager (and the same cosine to
fp32 as eager's): benchmarks/minilm_compile.py prints it.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import lowbit
from lowbit import bench
from lowbit.backends import available_kernels

COSINE = 0.99999
REL_ERR = {"w8a8-dynamic": 1e-3}  # else 1e-5


class TinyEncoder(nn.Module):
    """An encoder block in miniature: embedding, feed-forward with GELU, residual and layer norm, a head.
    Widths are multiples of 128 so that int4-g128 runs on lowbit's kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(60, 128)
        self.up, self.down = nn.Linear(128, 256), nn.Linear(256, 128)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.norm(h + self.down(F.gelu(self.up(h))))
        return self.head(h)


def ids(seed: int, batch: int, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 60, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Each recipe on the kernel that runs it fastest here: lowbit's own for weight-only, oneDNN's for W8A8.
# Two of them compile in the quick suite; the others (the same ops with other arguments) are marked slow.
CASES = [("int4-g128", "lowbit_cpu"), pytest.param("int8", "lowbit_cpu", marks=pytest.mark.slow),
         ("w8a8-dynamic", "onednn"), pytest.param("w8a8-static", "onednn", marks=pytest.mark.slow)]


def quantized(recipe: str, backend: str) -> nn.Module:
    if not available_kernels()[backend]:
        pytest.skip(f"kernel {backend} cannot run on this machine")
    torch.manual_seed(0)
    calib = [ids(i, 4) for i in range(4)] if lowbit.parse_recipe(recipe).needs_calibration else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "slower than float" notes for layers this small
        q = lowbit.quantize(TinyEncoder().eval(), recipe, calibration=calib, backend=backend)
    assert {m.kernel_name for m in q.modules() if isinstance(m, nn.Module) and hasattr(m, "_prep")} == {backend}
    return q


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe,backend", CASES)
def test_compiled_matches_eager_as_batch_size_changes(recipe, backend):
    """torch.compile's default (dynamic=None): the first batch size gets its own graph, the second one graph
    with a symbolic batch size, which then serves the third: two graphs, no graph break, eager's outputs."""
    q = quantized(recipe, backend)
    x = ids(0, 5)
    with torch.inference_mode():
        torch._dynamo.reset()
        assert torch.equal(torch.compile(q, backend="aot_eager", fullgraph=True)(x), q(x))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(q, backend="inductor")
        for seed, batch in ((1, 4), (2, 7), (3, 3)):
            x = ids(seed, batch)
            ref, y = q(x), compiled(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            assert rel_err(y, ref) < REL_ERR.get(recipe, 1e-5), (batch, rel_err(y, ref))
            assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) >= COSINE
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2


class Encoded(nn.Module):
    """A model called like a transformers encoder (model(**batch).last_hidden_state), for bench.compare."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return type("Out", (), {"last_hidden_state": self.inner(input_ids) * attention_mask[..., None]})


def tokenizer(texts, padding, truncation, max_length, return_tensors):
    """Word lengths as token ids, padded with 0 to max_length: a fixed-shape batch without a vocabulary file."""
    rows = [[1 + len(w) % 59 for w in t.split()][:max_length] for t in texts]
    ids_ = torch.tensor([r + [0] * (max_length - len(r)) for r in rows])
    return {"input_ids": ids_, "attention_mask": (ids_ > 0).long()}


def test_bench_compare_times_compiled_beside_eager():
    q = quantized("int4-g128", "lowbit_cpu")
    models = {"float": Encoded(TinyEncoder().eval()), "int4-g128": Encoded(q)}
    torch._dynamo.reset()
    compiled = bench.compile_models({"int4-g128": models["int4-g128"]})
    texts = ["a few words of text here", "and some more words", "three"]
    first = bench.compare(models, tokenizer, texts, seq=8, iters=2, compiled=compiled)
    assert [r["model"] for r in first] == ["float", "int4-g128", "int4-g128 (compiled)"]
    row = first[2]
    assert row["cosine_eager"] >= COSINE and row["graphs"] == 1 and row["compile_s"] > 0
    assert row["speedup_eager"] > 0 and row["latency_ms"] > 0
    assert "compile_s" not in first[1]
    again = bench.compare(models, tokenizer, texts, seq=8, iters=1, compiled=compiled)
    assert again[2]["graphs"] == 0  # same shape: the graph compiled before serves it
    with pytest.raises(ValueError, match="not among the models"):
        bench.compare(models, tokenizer, texts, seq=8, iters=1, compiled={"int8": compiled["int4-g128"]})


@pytest.mark.slow
def test_bench_command_compile(tmp_path):
    """`lowbit bench --compile` end to end on a small random BERT with MiniLM's tokenizer."""
    pytest.importorskip("transformers")
    from click.testing import CliRunner
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lowbit import hf
    from lowbit.cli import main

    try:
        tok = AutoTokenizer.from_pretrained(str(hf.resolve_model_path(hf.MINILM)), local_files_only=True)
    except (OSError, ValueError) as e:  # the tokenizer files are not installed here: say so
        pytest.skip(f"MiniLM's tokenizer is not available: {e}")
    if not available_kernels()["lowbit_cpu"]:
        pytest.skip("lowbit_cpu cannot run on this machine")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=64)
    src = tmp_path / "bert"
    BertModel(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(src), "--recipe", "int4-g128", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["bench", str(src), str(tmp_path / "q"), "--compile", "--batch", "2", "--seq", "16",
                             "--iters", "1"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("| int4-g128 (compiled) | 2 | 16 |")]
    assert len(lines) == 1, r.output
    cosine_eager = float(lines[0].split("|")[10])
    assert cosine_eager >= COSINE
    r = runner.invoke(main, ["bench", str(src), str(tmp_path / "q"), "--freeze"])
    assert r.exit_code != 0 and "--compile" in r.output

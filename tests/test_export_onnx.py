"""ONNX export: lowbit's codes written as MatMulNBits / code gathers, run in ONNX Runtime (optimizations off and
all on) and OpenVINO when it imports, against lowbit's own outputs; refusals, files and the command line."""

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import lowbit_cpu
from lowbit.export import ExportError, to_onnx
from lowbit.modules import QuantLinear

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


class MLP(nn.Module):
    """Odd widths: 100 inputs (no group size divides it: K is padded), 72 and 40 hidden."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(100, 72), nn.Linear(72, 40), nn.Linear(40, 8, bias=False)

    def forward(self, x):
        return self.fc3(nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp(recipe, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "runs slower than float here" on layers this small
        return lowbit.quantize(MLP().eval(), recipe, **kw)


def _graph(path):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return model, inits


def _float_weight_matmuls(model, inits):
    """MatMul / Gemm nodes reading a float initializer of 2+ dims (a float weight)."""
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
            and any(i in inits and inits[i].data_type == onnx.TensorProto.FLOAT and len(inits[i].dims) >= 2
                    for i in n.input)]


def _check_runs(path, model, inputs, feeds_name="input"):
    """The file at another batch size, in ONNX Runtime with optimizations off and all on: lowbit's numbers."""
    with torch.inference_mode():
        ref = model(inputs)
    for optimize in (False, True):
        got = to_onnx.run_onnxruntime(path, {feeds_name: inputs}, optimize=optimize)[0]
        assert got.shape == ref.shape
        cos = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0)
        assert cos >= 0.99999
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


CALIB = [torch.randn(16, 100, generator=torch.Generator().manual_seed(i)) for i in range(8)]
# int4-g32 is the tiny BERT's recipe below
RECIPES = {"int8": 8, "int3-g64": 4, "int2-g32": 2, "int4-g64-hqq": 4, "int4-g32-awq": 4, "ternary": 2}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_weight_only_recipes_run_in_onnxruntime(recipe, tmp_path):
    q = _mlp(recipe, calibration=CALIB if recipe.endswith("awq") else None)
    lines = []
    path = lowbit.export.onnx(q, (torch.randn(4, 100),), tmp_path / "m.onnx", echo=lines.append)
    assert path == tmp_path / "m.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    text = "\n".join(lines)
    assert text.count("ONNX Runtime (optimizations") == 2
    assert ("OpenVINO (CPU, f32)" in text) == HAS_OPENVINO
    if recipe.startswith("int3"):
        assert "3-bit codes stored as 4-bit" in text
    model, inits = _graph(path)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and all(n.domain == "com.microsoft" for n in nbits)
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {RECIPES[recipe]}
    assert _float_weight_matmuls(model, inits) == []
    _check_runs(path, q, torch.randn(9, 100))
    if recipe.endswith("awq"):  # an input scale stays on a layer after the GELU: multiplied in the graph
        assert any("input_scale" in m._buffers for m in q.modules() if isinstance(m, QuantLinear))


def test_tiny_bert_with_quantized_embeddings(bert_checkpoint, tmp_path):
    q = lowbit.load(bert_checkpoint)
    assert any(type(m).__name__ == "QuantEmbedding" for m in q.modules())
    ids = torch.randint(0, 500, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = lowbit.export.onnx(q, inputs, tmp_path / "q.onnx", echo=lambda s: None)
    model, inits = _graph(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    # 6 per layer; the pooler is not on the way to last_hidden_state, so the export drops it
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2 * 6
    assert _float_weight_matmuls(model, inits) == []
    # The word embedding table is in the file as its codes (4-bit, two to a byte), never as floats.
    big_floats = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT
                  and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 500 * 64]
    assert big_floats == []
    assert any(t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [500, 32] for t in inits.values())
    fp32_bytes = 4 * sum(m.weight.numel() for m in q.modules() if hasattr(m, "weight"))  # pooler included
    assert path.stat().st_size < 0.4 * fp32_bytes  # the graph's text included: a small model
    assert b"/work" not in path.read_bytes() and b"stack_trace" not in path.read_bytes()  # no debug notes
    # Dynamic batch and length: another shape than the traced one, padding included.
    ids = torch.randint(0, 500, (5, 12))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    exact = to_onnx._exact_copy(q, to_onnx._half_activation_layers(q))  # float32 where lowbit runs bf16
    with torch.inference_mode():
        ref = exact(input_ids=ids, attention_mask=mask).last_hidden_state
    bound = 1e-4
    for optimize in (False, True):
        got = to_onnx.run_onnxruntime(path, {"input_ids": ids, "attention_mask": mask}, optimize=optimize)[0]
        assert (got - ref).abs().max() <= bound * ref.abs().max()


def test_bound_follows_lowbit_kernels_with_bf16_activations(tmp_path):
    """PyTorch's int4 kernel runs on bf16 activations: lowbit's outputs are rounded to 8 bits there, the file's
    are not. The file is checked tightly against the same layers run in float32 from the same codes, and
    its agreement with the model as it runs is reported; the user's model keeps its kernels."""
    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval(), "int4-g32",
                        backend="torch_int4pack")
    assert {m.act_dtype for m in q.modules() if isinstance(m, QuantLinear)} == {torch.bfloat16}
    lines = []
    x = torch.randn(16, 128)
    path = lowbit.export.onnx(q, (x,), tmp_path / "m.onnx", echo=lines.append)
    assert any("bf16/fp16 or int8 activations" in line and "(e.g. 0)" in line for line in lines)
    assert any(line.startswith("ONNX Runtime vs lowbit's kernels on rounded activations") for line in lines)
    assert {m.kernel for m in q.modules() if isinstance(m, QuantLinear)} == {"torch_int4pack"}
    exact = to_onnx._exact_copy(q, to_onnx._half_activation_layers(q))
    with torch.no_grad():
        ref, as_run = exact(x), q(x)
    got = to_onnx.run_onnxruntime(path, {"input": x})[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # float32 on both sides: tight
    assert (as_run - ref).abs().max() > 1e-3 * ref.abs().max()  # the bf16 kernels do differ


@pytest.mark.skipif(not lowbit_cpu.available(), reason="lowbit._C not built or CPU without AVX2+FMA")
def test_int8_activation_decode_kernel_checked_against_float_activations(tmp_path):
    """lowbit_q8 rounds activations to int8 for decode-sized calls; the file keeps float activations, so it
    is checked against the same codes run in float32, and the model as it runs is reported."""
    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval(), "int4-g32",
                        backend="lowbit_q8<=16,lowbit_cpu")
    lines = []
    x = torch.randn(2, 64)
    path = lowbit.export.onnx(q, (x,), tmp_path / "m.onnx", echo=lines.append)
    assert any("int8 activations" in line for line in lines)
    assert {m.kernel for m in q.modules() if isinstance(m, QuantLinear)} == {"lowbit_q8<=16,lowbit_cpu"}
    got = to_onnx.run_onnxruntime(path, {"input": x})[0]
    with torch.no_grad():
        ref = to_onnx._exact_copy(q, to_onnx._half_activation_layers(q))(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_refuses_formats_without_an_onnx_form_naming_the_layer(tmp_path):
    q = _mlp("int4-g32", exclude=["fc2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.fc2 = lowbit.quantize(q.fc2, "kmeans4")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(ExportError, match=r"layer 'fc2' \(kmeans4\).*dequantize_unsupported=True"):
        lowbit.export.onnx(q, (torch.randn(3, 100),), tmp_path / "m.onnx", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    lines = []
    path = lowbit.export.onnx(q, (torch.randn(3, 100),), tmp_path / "m.onnx", echo=lines.append,
                              dequantize_unsupported=True)
    assert any("float weights" in line and "fc2 (kmeans4)" in line for line in lines)
    model, _ = _graph(path)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2
    # The user's model is the same object, unchanged, still running lowbit's kernels.
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(q.fc1, QuantLinear) and not q.training


@pytest.mark.parametrize("recipe", ["fp8", "bf16"])
def test_refuses_float_formats(recipe, tmp_path):
    q = _mlp(recipe)
    with pytest.raises(ExportError, match=rf"layer 'fc1' \({recipe}\)"):
        lowbit.export.onnx(q, (torch.randn(3, 100),), tmp_path / "m.onnx", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_layer_types_without_a_standin_are_refused(tmp_path, monkeypatch):
    """A lowbit layer type that no writer registered is refused naming the layer (W8A8's writer unplugged)."""
    from lowbit.w8a8 import W8A8Linear

    importlib.import_module("lowbit.export.onnx_w8a8")  # registers W8A8Linear; dropped again below
    monkeypatch.setattr(to_onnx, "STANDINS", {k: v for k, v in to_onnx.STANDINS.items() if k is not W8A8Linear})
    q = _mlp("w8a8-dynamic", backend="reference")  # kept int8 even where float would be faster
    w8a8 = [n for n, m in q.named_modules() if isinstance(m, W8A8Linear)]
    assert w8a8
    with pytest.raises(ExportError, match=rf"layer '{w8a8[0]}' \(w8a8-dynamic\)"):
        lowbit.export.onnx(q, (torch.randn(3, 100),), tmp_path / "m.onnx", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    q = _mlp("int4-g32")
    monkeypatch.setattr(to_onnx, "MIN_COSINE", 1.5)  # no output can pass
    with pytest.raises(ExportError, match="does not match lowbit's"):
        lowbit.export.onnx(q, (torch.randn(3, 100),), tmp_path / "m.onnx", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_standin_computes_what_the_file_holds():
    """The stand-ins unpack the very tensors written to the file: lowbit's outputs in PyTorch."""
    q = _mlp("int3-g64")
    standin, notes = to_onnx.prepare(q)
    assert len(notes) == 3 and isinstance(q.fc1, QuantLinear) and not isinstance(standin.fc1, QuantLinear)
    x = torch.randn(5, 100)
    with torch.inference_mode():
        assert torch.allclose(standin(x), q(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["int4-g32", "int3-g64", "binary"])
def test_embedding_codes_packed_and_exact(recipe, tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Embedding(50, 99)), recipe)  # 99: rows end mid-byte
    ids = torch.randint(0, 50, (3, 5))
    standin, _ = to_onnx.prepare(q)
    with torch.inference_mode():
        assert torch.equal(standin(ids), q(ids))
    path = lowbit.export.onnx(q, (ids,), tmp_path / "e.onnx", echo=lambda s: None)
    codes = [t for t in _graph(path)[1].values() if t.data_type == onnx.TensorProto.UINT8]
    width, group = {"int4-g32": (4, 32), "int3-g64": (4, 64), "binary": (2, 99)}[recipe]
    padded = -(-99 // group) * group  # lowbit pads each row to whole groups
    assert [list(t.dims) for t in codes] == [[50, -(-padded * width // 8)]]
    other = torch.randint(0, 50, (7, 2))
    with torch.inference_mode():
        assert torch.equal(to_onnx.run_onnxruntime(path, {"input": other})[0], q(other))  # same floats, same ops


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    """A saved int4-g32 tiny BERT with its tokenizer, as `lowbit quantize` writes it."""
    transformers = pytest.importorskip("transformers")
    tmp_path = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "quantized", "model", "runs", "in", "onnx",
             "runtime", ".", "short", "text", "the", "quick", "brown", "fox"] + [chr(c) for c in range(97, 123)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=96, max_position_embeddings=64)  # ids >= 45 unused here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(transformers.BertModel(config).eval(), "int4-g32")
    return lowbit.save(q, tmp_path / "ckpt", tokenizer=tokenizer)


def test_cli_export_then_bench_beside_the_checkpoint(bert_checkpoint, tmp_path):
    from click.testing import CliRunner

    from lowbit.cli import main

    out = tmp_path / "out" / "model.onnx"
    r = CliRunner().invoke(main, ["export", str(bert_checkpoint), "--format", "onnx", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "ONNX Runtime (optimizations all)" in r.output and f"wrote {out}" in r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    model, _ = _graph(out)
    assert {i.name for i in model.graph.input} >= {"input_ids", "attention_mask"}
    # `lowbit bench` times the file in ONNX Runtime in the same table as the checkpoint itself.
    pytest.importorskip("lowbit_workbench")
    r = CliRunner().invoke(main, ["bench", str(bert_checkpoint), "--onnx", str(out), "--batch", "2", "--seq", "16",
                                  "--iters", "2"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith(f"| ONNX Runtime: {out} | 2 | 16 |")]
    assert len(rows) == 1
    assert float(rows[0].split("|")[7]) > 0.9999  # the same quantized model as the reference, run by ORT
    assert float(rows[0].split("|")[4]) == pytest.approx(out.stat().st_size / 1e6, abs=0.06)
    r = CliRunner().invoke(main, ["bench", str(bert_checkpoint)])
    assert r.exit_code != 0 and "--onnx" in r.output


def test_cli_export_of_a_plain_module_checkpoint_says_what_to_do(tmp_path):
    """A checkpoint of a plain nn.Module has no config or tokenizer to trace with: one clear error."""
    from click.testing import CliRunner

    from lowbit.cli import main

    lowbit.save(_mlp("int8"), tmp_path / "mlp")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "mlp"), "--format", "onnx", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not a transformers model" in r.output and "lowbit.export.onnx" in r.output
    assert not (tmp_path / "x").exists()


def test_untraceable_model_is_one_clear_error(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # a branch on the data: nothing to trace

    q = lowbit.quantize(Branchy().eval(), "int4-g32")
    with pytest.raises(ExportError, match="could not trace the model: .*data-dependent"):
        lowbit.export.onnx(q, (torch.randn(4, 64),), tmp_path / "m.onnx", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_openvino_disagreeing_is_reported_loudly_and_fails_when_asked_for(tmp_path, monkeypatch):
    """ONNX Runtime's result bounds the export; OpenVINO reading the file otherwise is a warning, or an error
    with openvino=True. (OpenVINO's output is replaced here by a wrong one.)"""
    pytest.importorskip("openvino", reason="openvino is not installed")
    q = _mlp("int4-g32")
    x = (torch.randn(3, 100),)
    monkeypatch.setattr(to_onnx, "_run_openvino", lambda path, feeds: [torch.zeros(3, 8)])
    lines = []
    with pytest.warns(UserWarning, match="OpenVINO computes this file differently"):
        path = lowbit.export.onnx(q, x, tmp_path / "m.onnx", echo=lines.append)
    assert path.exists() and any("OpenVINO computes this file differently" in line for line in lines)
    with pytest.raises(ExportError, match="OpenVINO"):
        lowbit.export.onnx(q, x, tmp_path / "n.onnx", echo=lambda s: None, openvino=True)
    assert not (tmp_path / "n.onnx").exists()

"""ONNX export of W8A8 layers: static activations as QDQ, dynamic ones as per-row uint8 codes and an integer
matmul, run in ONNX Runtime (optimizations off and all on) against lowbit's own outputs; the integer weights
in the file, the few-row float route, convolutions, a tiny BERT and the real all-MiniLM-L6-v2."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import onednn
from lowbit.export import ExportError, to_onnx
from lowbit.w8a8 import W8A8Conv, W8A8Linear, fake_quant_rows

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from lowbit.export import onnx_w8a8

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 ops not available here")


class MLP(nn.Module):
    """A ReLU that lowbit fuses into fc1, a GELU it does not, a layer without bias."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.fc3(nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


# Layers after the first: another order of float sums can move a value across a rounding step of the next
# layer's activation codes, which moves that layer's output by one step of one code (~1e-3 of the largest
# output in these models; rarer with static scales than with per-row ones, which follow the row's extremes).
FLIPS = {"cos_min": 0.9999, "rel": 1e-2}

CALIB = [torch.randn(4, 10, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _quantized(model, recipe, backend, calibration=CALIB):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "slower than float" notes on layers this small
        q = lowbit.quantize(model.eval(), recipe, calibration=calibration, backend=backend,
                            keep_float_if_slower=False)
    assert any(isinstance(m, (W8A8Linear, W8A8Conv)) for m in q.modules())
    return q


def _agree(path, model, x, *, cos_min=0.99999, rel=1e-5):
    """ONNX Runtime (optimizations off and all on) gives lowbit's outputs on x: float rounding only (one layer),
    or see FLIPS."""
    with torch.inference_mode():
        ref = model(x)
    for optimize in (False, True):
        got = to_onnx.run_onnxruntime(path, {"input": x}, optimize=optimize)[0]
        assert got.shape == ref.shape
        cos = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0)
        assert cos >= cos_min, (optimize, cos)
        assert (got - ref).abs().max() <= rel * ref.abs().max(), (optimize, (got - ref).abs().max())


def _optimized_ops(path, tmp_path):
    """Op types of the graph ONNX Runtime runs after its fusions."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


LINEAR_CASES = [
    pytest.param("w8a8-dynamic", "onednn", marks=needs_onednn),
    ("w8a8-dynamic", "reference"),
    pytest.param("w8a8-static", "onednn", marks=needs_onednn),
    pytest.param("int4-a8", "onednn", marks=needs_onednn),  # 4-bit codes in the int8 layout
    ("int4-g32-a8-dynamic", "reference"),  # weight scales per group of 32 inputs
]


@pytest.mark.parametrize("recipe,backend", LINEAR_CASES)
def test_linear_recipes_give_lowbits_numbers(recipe, backend, tmp_path):
    q = _quantized(MLP(), recipe, backend)
    assert q.fc1.relu  # the ReLU is fused into the layer: the graph must apply it
    lines = []
    path = lowbit.export.onnx(q, (torch.randn(3, 10, 64),), tmp_path / "m.onnx", echo=lines.append, openvino=False)
    text = "\n".join(lines)
    assert text.count("W8A8") == 3 and text.count("ONNX Runtime (optimizations") == 2
    # other batch sizes and lengths than the traced ones, few rows included (lowbit's GEMV route)
    for shape in [(5, 33, 64), (1, 3, 64), (2, 2, 64)]:
        _agree(path, q, torch.randn(*shape) * 2, **FLIPS)


@needs_onednn
def test_few_row_calls_follow_lowbits_float_gemv(tmp_path):
    """Dynamic layers run calls of at most GEMV_MAX_ROWS rows in float (unquantized activations): the file
    does too, and that differs from quantizing them (so this test would see a graph that ignored it). One
    layer: float rounding only, either way."""
    q = _quantized(nn.Sequential(nn.Linear(64, 32)), "w8a8-dynamic", "onednn")
    layer = q[0]
    assert layer._prep["gemv"] is not None
    path = lowbit.export.onnx(q, (torch.randn(8, 64),), tmp_path / "m.onnx", echo=lambda s: None, openvino=False)
    x = torch.randn(3, 64)
    quantized = nn.functional.linear(fake_quant_rows(x), layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        ref = q(x)
    assert (quantized - ref).abs().max() > 1e-3 * ref.abs().max()
    _agree(path, q, x)
    _agree(path, q, torch.randn(5, 64))  # one row more: the integer route
    _agree(path, q, torch.randn(300, 64) * 3)


@needs_onednn
@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-static"])
def test_file_holds_int8_weights_and_runs_an_integer_matmul(recipe, tmp_path):
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    fp32 = lowbit.export.onnx(float_model, (torch.randn(2, 8, 256),), tmp_path / "fp32.onnx", echo=lambda s: None,
                              verify=False)
    calib = [torch.randn(2, 8, 256) for _ in range(4)]
    q = _quantized(copy.deepcopy(float_model), recipe, "onednn", calibration=calib)
    path = lowbit.export.onnx(q, (torch.randn(2, 8, 256),), tmp_path / "q.onnx", echo=lambda s: None,
                              openvino=False)
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert sorted(tuple(t.dims) for t in weights if t.data_type == onnx.TensorProto.INT8) == [(256, 512), (512, 256)]
    # no float weight matrix ([2, N] rows of the dynamic epilogue aside)
    assert [t.name for t in weights if t.data_type == onnx.TensorProto.FLOAT and min(t.dims) > 2] == []
    assert path.stat().st_size < 0.3 * fp32.stat().st_size
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 2
    if recipe == "w8a8-static":  # no float matmul left (dynamic layers keep one for few-row calls)
        assert "MatMul" not in ops and "Gemm" not in ops
    _agree(path, q, torch.randn(4, 20, 256), **FLIPS)


@pytest.mark.parametrize("dims,backend", [pytest.param(1, "onednn", marks=needs_onednn), (2, "reference")])
def test_static_convolutions_as_qdq(dims, backend, tmp_path):
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 16, 3, padding=1), nn.ReLU(), conv(16, 16, 3, stride=2, padding=1, groups=4),
                        nn.ReLU(), conv(16, 8, 1, bias=False), nn.Flatten(),
                        nn.Linear(8 * (8 if dims == 1 else 64), 10))
    shape = (3, 16) if dims == 1 else (3, 16, 16)
    calib = [torch.randn(4, *shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    q = _quantized(net, "w8a8-static", backend, calibration=calib)
    assert sum(isinstance(m, W8A8Conv) for m in q.modules()) == 3
    lines = []
    path = lowbit.export.onnx(q, (torch.randn(2, *shape),), tmp_path / "c.onnx", echo=lines.append, openvino=False)
    assert sum("QDQ Conv" in line for line in lines) == 3
    model = onnx.load(str(path))
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer) == 4  # 3 convs, 1 linear
    _agree(path, q, torch.randn(5, *shape), **FLIPS)


def _tiny_bert(transformers):
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("recipe", [pytest.param("w8a8-dynamic", marks=needs_onednn),
                                    pytest.param("w8a8-static", marks=needs_onednn)])
def test_tiny_bert(recipe, tmp_path):
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 300, (4, 16), generator=g)} for _ in range(4)]
    q = _quantized(_tiny_bert(transformers), recipe, "onednn", calibration=calib)
    assert sum(isinstance(m, W8A8Linear) for m in q.modules()) >= 6
    ids = torch.randint(0, 300, (2, 9), generator=g)
    lines = []  # OpenVINO, where it installs, reads the file too (and runs MatMulIntegerToFloat)
    path = lowbit.export.onnx(q, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "b.onnx",
                              echo=lines.append, openvino=recipe == "w8a8-dynamic" and None)
    assert sum(line.startswith("ONNX Runtime (optimizations") for line in lines) == 2
    # W8A8 recipes run a transformers model's attention with bf16 matmuls where the CPU can; the file's is
    # float32, and it is checked against lowbit's layers with float32 attention.
    assert lowbit.attention.uses(q)
    assert any("attention: float32 in the file" in line for line in lines)
    ids = torch.randint(0, 300, (5, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.inference_mode(), lowbit.attention.own_attention(q):
        ref = q(input_ids=ids, attention_mask=mask).last_hidden_state
    for optimize in (False, True):
        got = to_onnx.run_onnxruntime(path, {"input_ids": ids, "attention_mask": mask}, optimize=optimize)[0]
        cos = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0)
        assert cos >= 0.9999
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_standin_refuses_what_is_not_a_w8a8_layer():
    with pytest.raises(ExportError, match="layer 'head'"):
        onnx_w8a8.standin(nn.Linear(4, 4), "head")


def test_w8a8_layers_set_the_verification_bounds():
    dynamic = to_onnx.prepare(_quantized(MLP(), "w8a8-dynamic", "reference"))[0]
    static = to_onnx.prepare(_quantized(MLP(), "w8a8-static", "reference"))[0]
    assert to_onnx.verify_bounds(dynamic) == onnx_w8a8.DYNAMIC_BOUNDS
    assert to_onnx.verify_bounds(static) == onnx_w8a8.STATIC_BOUNDS
    assert to_onnx.verify_bounds(MLP()) == (to_onnx.MIN_COSINE, to_onnx.MAX_ABS_REL)


@needs_onednn
@pytest.mark.slow
def test_minilm_w8a8_dynamic(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lowbit import hf

    path = hf.resolve_model_path("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["A man is playing a guitar.", "Two dogs run across a snowy field.", "Stocks fell sharply on Monday.",
             "A woman slices an onion in the kitchen.", "The quick brown fox jumps over the lazy dog."]
    q = lowbit.quantize(transformers.AutoModel.from_pretrained(path).eval(), "w8a8-dynamic",
                        calibration=[dict(tokenizer(texts, padding=True, return_tensors="pt"))] * 2)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    out = lowbit.export.onnx(q, batch, tmp_path / "minilm.onnx", echo=lambda s: None)
    with torch.inference_mode():
        ref = q(**batch).last_hidden_state
    got = to_onnx.run_onnxruntime(out, batch)[0]
    mask = batch["attention_mask"][..., None].float()
    emb_ref, emb = (ref * mask).sum(1) / mask.sum(1), (got * mask).sum(1) / mask.sum(1)
    # Per sentence, the export's own bound: an activation code flipped by a last-place float difference
    # upstream moves one sentence's embedding by up to ~1e-3 (lowbit's own kernels differ from each other
    # by as much); over all five sentences together the file must agree to 5e-4.
    assert torch.nn.functional.cosine_similarity(emb, emb_ref, dim=1).min() >= onnx_w8a8.DYNAMIC_BOUNDS[0]
    assert torch.nn.functional.cosine_similarity(emb.flatten(), emb_ref.flatten(), dim=0) >= 0.9995

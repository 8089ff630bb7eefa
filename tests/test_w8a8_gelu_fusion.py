"""A GELU between two dynamic W8A8 linears moves into the first, which hands the second its int8 input codes:
found on torch.export's graph only where nothing else reads either edge; same numbers as unfused; kept
through save/load, torch.compile, layer reports and ONNX export."""

import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import onednn, ops
from lowbit.w8a8 import FusedAct, RowCodes, W8A8Linear

pytestmark = pytest.mark.skipif(not (onednn.available() and ops.int_mm_dynamic()),
                                reason="codes are handed over on the int8 x int8 matmul path (torch._int_mm "
                                       "with VNNI), which this machine does not run")
QUANTIZE = sys.modules["lowbit.quantize"]


class MLP(nn.Module):
    def __init__(self, act: nn.Module | None = None, reread: str = "") -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 128), act or nn.GELU(), nn.Linear(128, 64)
        self.reread = reread  # "pre": the pre-activation is read again; "post": the GELU's output is

    def forward(self, x):
        h = self.fc1(x)
        g = self.act(h)
        y = self.fc2(g)
        if self.reread == "pre":
            y = y + h[..., :64]
        elif self.reread == "post":
            y = y + g[..., :64]
        return y


def batches(n=3, rows=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, 64, generator=g) for _ in range(n)]


def quantized(model, fuse=True, monkeypatch=None):
    torch.manual_seed(0)
    if not fuse:
        monkeypatch.setattr(QUANTIZE, "gelu_chains", lambda *a: [])
    return lowbit.quantize(model, "w8a8-dynamic", calibration=batches(), backend="onednn")


def make(**kw):
    torch.manual_seed(0)
    return MLP(**kw).eval()


def test_gelu_moves_into_the_layer_before_and_hands_codes(monkeypatch):
    fused = quantized(make())
    assert fused.fc1.act_out == "gelu" and isinstance(fused.act, FusedAct)
    seen = []
    fused.fc2.register_forward_pre_hook(lambda m, a: seen.append(type(a[0])))
    plain = quantized(make(), fuse=False, monkeypatch=monkeypatch)
    assert plain.fc1.act_out is None and isinstance(plain.act, nn.GELU)
    x = torch.randn(40, 64)
    with torch.inference_mode():
        y, ref = fused(x), plain(x)
        few = fused(x[:3])  # few rows run the GEMV on float activations: the GELU's float output
    assert seen[0] is RowCodes and seen[1] is torch.Tensor
    # The same codes up to the last bits of the GELU (lowbit's erf is within 1.5e-7): a code may flip.
    torch.testing.assert_close(y, ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(few, plain(x[:3]), atol=1e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kw", [{"reread": "pre"}, {"reread": "post"}, {"act": nn.GELU(approximate="tanh")},
                                {"act": nn.SiLU()}])
def test_no_fusion_where_the_graph_does_not_allow_it(kw):
    model = quantized(make(**kw))
    assert model.fc1.act_out is None and not isinstance(model.act, FusedAct)


def test_fusion_survives_save_load_and_compile(tmp_path):
    model = quantized(make())
    x = torch.randn(40, 64)
    with torch.inference_mode():
        ref = model(x)
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q", model=make())
    assert back.fc1.act_out == "gelu" and isinstance(back.act, FusedAct)
    with torch.inference_mode():
        assert torch.equal(back(x), ref)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert "lowbit.int_epilogue_gelu_rows_s8" in "\n".join(str(g.graph) for g in explain.graphs)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


def test_layer_report_compares_after_the_gelu():
    float_model = make()
    model = quantized(make())
    rows = {r["layer"]: r for r in lowbit.layer_report(float_model, model, batches())}
    assert rows["fc1"]["sqnr_db"] > 30  # against GELU(fc1): not against fc1 alone
    assert rows["fc2"]["sqnr_db"] > 30


def quantized_bert(layers: int):
    """A tiny BERT quantized to w8a8-dynamic with calibration (so its GELUs are looked at), and a generator for
    more token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 200, (4, 24), generator=g)} for _ in range(3)]
    model = lowbit.quantize(transformers.BertModel(cfg).eval(), "w8a8-dynamic", calibration=calib, backend="onednn")
    return model, g


def test_bert_ffn_fused():
    model, _ = quantized_bert(2)
    fused = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear) and m.act_out == "gelu"]
    assert fused == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert all(isinstance(model.encoder.layer[i].intermediate.intermediate_act_fn, FusedAct) for i in (0, 1))


def test_bert_fusion_through_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, g = quantized_bert(1)
    ids = torch.randint(0, 200, (3, 20), generator=g)
    with torch.inference_mode():
        before = model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path)
    assert loaded.encoder.layer[0].intermediate.dense.act_out == "gelu"
    assert isinstance(loaded.encoder.layer[0].intermediate.intermediate_act_fn, FusedAct)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).last_hidden_state, before)

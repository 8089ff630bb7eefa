"""Quantized models under torch.compile and torch.export: no graph breaks, same outputs as eager.

Every kernel this machine can run is traced: lowbit's own and oneDNN's as custom ops
(torch.ops.lowbit.*), PyTorch's int4/int8 kernels and the simulated paths as the ATen ops they are.
Exported programs run the very same kernels, so they must give eager's bits exactly. A compiled model
may round the float ops around the kernels differently (inductor fuses GELU, the embedding's
dequantization and casts): it is held to a relative error of 1e-5 with float32 activations, and 1e-2
for the kernels that take bf16 activations (where a fused cast rounds once instead of twice)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.backends import KERNELS, available_kernels, lowbit_cpu, onednn
from lowbit.modules import QuantEmbedding

# The node each kernel puts in an exported graph (the simulated paths are plain ATen arithmetic).
KERNEL_OPS = {
    ("lowbit_cpu", None): "lowbit.linear.default",
    # dynamic W8A8 on VNNI CPUs traces as torch ops around the int8 x int8 matmul (see ops.w8a8_linear_dynamic)
    ("onednn", "dynamic"): "aten._int_mm.default" if onednn.int_mm_dynamic() else "lowbit.w8a8_linear_dynamic.default",
    ("onednn", "static"): "lowbit.w8a8_linear_static.default",
    ("torch_int4pack", None): "aten._weight_int4pack_mm_for_cpu.default",
    ("torch_int8pack", None): "aten._weight_int8pack_mm.default",
}


class TinyLM(nn.Module):
    """Embedding, then three linears with a GELU and a ReLU (which W8A8 fuses into the layer before)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 128)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.act = nn.ReLU()
        self.head = nn.Linear(128, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(self.act(self.down(F.gelu(self.up(h)))))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.line = nn.Conv1d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(F.relu(self.conv(x)))  # [B, 16, 7, 7]
        y = self.line(y.mean(3))  # Conv1d on [B, 16, 7]
        return self.fc(F.relu(y).flatten(1))


def ids(seed: int, batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))


def images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# (recipe, backend): every kernel family, the three recipes of the README first.
CASES = [
    ("int8", "lowbit_cpu"), ("int4-g128", "lowbit_cpu"), ("w8a8-dynamic", "onednn"),
    ("w8a8-static", "onednn"), ("int3-g64", "lowbit_cpu"), ("int2-g32", "lowbit_cpu"),
    ("int4-g32", "torch_int4pack"), ("int8", "torch_int8pack"), ("int4-g32", "dequant"),
    ("w8a8-dynamic", "reference"), ("w8a8-static", "reference"),
]


def quantized(model: nn.Module, recipe: str, backend: str, data: list[torch.Tensor]) -> nn.Module:
    if backend != "auto" and not available_kernels()[backend]:
        pytest.skip(f"kernel {backend} cannot run on this machine")
    calib = data if lowbit.parse_recipe(recipe).needs_calibration else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "slower than float" notes for these tiny layers
        q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib, backend=backend)
    return q.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(q: nn.Module, x: torch.Tensor, ops: set[str], tol: float) -> None:
    """No graph break; the exported program gives eager's bits; compiled within `tol`.

    Inductor compiles models whose kernels are lowbit's ops; models on ATen ops alone (simulated paths,
    PyTorch's int4/int8 kernels) go through AOTAutograd only, sparing seconds of C++ code generation
    for arithmetic that is PyTorch's own business."""
    with torch.no_grad():
        ref = q(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(q)(x)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1

        ep = torch.export.export(q, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert ops <= set(targets), targets  # the real kernels are in the graph
        assert torch.equal(ep.module()(x), ref)

        torch._dynamo.reset()
        compiled = torch.compile(q, backend="inductor" if any("lowbit" in op for op in ops) else "aot_eager",
                                 fullgraph=True)
        y = compiled(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert rel_err(y, ref) < tol


@pytest.mark.parametrize("recipe,backend", CASES)
def test_language_model_traces_without_breaks(recipe, backend):
    torch.manual_seed(0)
    q = quantized(TinyLM().eval(), recipe, backend, [ids(i) for i in range(4)])
    kernels = {m.kernel_name for m in q.modules() if hasattr(m, "kernel_name") and not isinstance(m, QuantEmbedding)}
    assert kernels == {backend}
    assert isinstance(q.emb, QuantEmbedding)
    act = lowbit.parse_recipe(recipe).act
    ops = {KERNEL_OPS[backend, act]} if (backend, act) in KERNEL_OPS else set()
    check(q, ids(10), ops, 1e-2 if KERNELS[backend].act_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("recipe,kernel", [("kmeans4", "dequant"), ("bf16", "bf16_mm"), ("bf16", "dequant"),
                                           ("fp8", "dequant")])
def test_other_formats_trace_without_breaks(recipe, kernel):
    """Codebook and float formats, on each kernel that can run them: plain ATen ops."""
    torch.manual_seed(0)
    q = quantized(TinyLM().eval(), recipe, kernel, [])
    assert {m.kernel_name for m in q.modules() if hasattr(m, "kernel_name") and not isinstance(m, QuantEmbedding)} == {
        kernel}
    for x in (ids(10), ids(11, batch=1, seq=5)):  # 21 rows, then 5 (bf16_mm's bf16 GEMM for few rows)
        check(q, x, set(), 1e-2 if recipe == "bf16" else 1e-5)


@pytest.mark.parametrize("recipe,kernel,op", [("kmeans4", "lowbit_codebook", "lowbit.cb_linear.default"),
                                              ("kmeans4", "lowbit_codebook_gemm", "lowbit.cb_gemm.default"),
                                              ("fp16", "lowbit_half", "lowbit.half_linear.default"),
                                              ("fp8", "lowbit_fp8", "lowbit.fp8_linear.default"),
                                              ("fp8", "lowbit_fp8_gemm", "lowbit.fp8_gemm.default")])
def test_decoding_kernels_trace_without_breaks(recipe, kernel, op):
    torch.manual_seed(0)
    q = quantized(TinyLM().eval(), recipe, kernel, [])
    assert {m.kernel_name for m in q.modules() if hasattr(m, "kernel_name") and not isinstance(m, QuantEmbedding)} == {
        kernel}
    check(q, ids(10), {op}, 1e-2 if KERNELS[kernel].act_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ["onednn", "reference"])
def test_convolutions_trace_without_breaks(backend):
    torch.manual_seed(0)
    q = quantized(TinyCNN().eval(), "w8a8-static", backend, [images(i) for i in range(4)])
    assert {m.kernel_name for m in q.modules() if hasattr(m, "kernel_name")} == {backend}
    assert q.conv.relu  # the ReLU after the first conv runs inside it
    ops = {"lowbit.w8a8_conv.default", KERNEL_OPS["onednn", "static"]} if backend == "onednn" else set()
    check(q, images(10), ops, 1e-5)


def test_dynamic_few_rows_path_under_compile():
    """The row count picks the GEMV or the int8 GEMM inside one op: one graph serves both."""
    if not (onednn.available() and lowbit_cpu.available()):
        pytest.skip("oneDNN int8 ops or lowbit._C not available")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    q = quantized(model, "w8a8-dynamic", "onednn", [])
    torch._dynamo.reset()
    compiled = torch.compile(q, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for rows in (1, lowbit.w8a8.GEMV_MAX_ROWS, lowbit.w8a8.GEMV_MAX_ROWS + 1, 33):
            x = torch.randn(rows, 64)
            assert torch.equal(compiled(x), q(x))


def test_packed_weights_are_made_once(monkeypatch):
    """oneDNN's packed weight is found again by the int8 codes when compiled and exported graphs run."""
    if not onednn.available():
        pytest.skip("oneDNN int8 ops not available")
    torch.manual_seed(0)
    q = quantized(TinyCNN().eval(), "w8a8-static", "onednn", [images(i) for i in range(4)])
    packs = []
    for name in ("prepack_linear", "prepack_conv"):
        real = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, real=real, **k: packs.append(real) or real(*a, **k))
    x = images(3)
    with torch.no_grad():
        ref = q(x)
        torch._dynamo.reset()
        compiled = torch.compile(q, fullgraph=True)
        module = torch.export.export(q, (x,)).module()
        for _ in range(2):
            assert rel_err(compiled(x), ref) < 1e-5
            assert torch.equal(module(x), ref)
        assert packs == []
        q.fc.codes.add_(0)  # changed in place (version counter): packed again, once
        q(x)
        q(x)
        assert len(packs) == 1


def op_samples() -> list[tuple[object, tuple]]:
    """(op, args) for each lowbit custom op, on small random layers, both row-count paths where they differ."""
    g = torch.Generator().manual_seed(0)
    samples = []
    if lowbit_cpu.available():
        codes = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=g)
        scale, zero = torch.rand(40, 2, generator=g) * 0.1, torch.full((40, 2), 8.0)
        qweight = lowbit_cpu.prepack(codes, scale, zero, 4, 32)["qweight"]
        for x in (torch.randn(3, 64, generator=g), torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)):
            samples.append((torch.ops.lowbit.linear.default, (x, qweight, 4, 32, 40, 64, torch.randn(40))))
    if onednn.available() and lowbit_cpu.available():
        w = torch.randint(-60, 61, (24, 48), dtype=torch.int8, generator=g)
        ws = torch.rand(24, generator=g) * 0.01
        layer = lowbit.w8a8.W8A8Linear(48, 24, lowbit.parse_recipe("w8a8-dynamic"), {"qweight": w, "scale": ws},
                                       torch.randn(24), kernel="onednn")
        p = layer._prep
        for rows in (2, 9):  # the GEMV, then the int8 GEMM
            samples.append((torch.ops.lowbit.w8a8_linear_dynamic.default,
                            (torch.randn(rows, 48, generator=g), w, ws, p["csw"], p["gemv"], layer.bias, True)))
        samples.append((torch.ops.lowbit.w8a8_linear_static.default,
                        (torch.randn(9, 48, generator=g), w, ws, None, 0.02, 100, False)))
        wc = torch.randint(-60, 61, (8, 2, 3, 3), dtype=torch.int8, generator=g)
        samples.append((torch.ops.lowbit.w8a8_conv.default,
                        (torch.randn(2, 4, 9, 9, generator=g), wc, torch.rand(8, generator=g) * 0.01, torch.randn(8),
                         0.03, 120, [2, 1], [1, 0], [1, 2], 2, True)))
        w1 = torch.randint(-60, 61, (6, 4, 3), dtype=torch.int8, generator=g)
        samples.append((torch.ops.lowbit.w8a8_conv.default,
                        (torch.randn(1, 4, 11, generator=g), w1, torch.rand(6, generator=g) * 0.01, None,
                         0.03, 0, [1], [1], [1], 1, False)))
    return samples


def test_custom_ops_agree_with_their_fake_implementations():
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides) and tracing by AOTAutograd."""
    samples = op_samples()
    if not samples:
        pytest.skip("neither lowbit._C nor oneDNN int8 ops are available")
    for op, args in samples:
        torch.library.opcheck(op, args)


class ReadsWeight(nn.Module):
    """A feed-forward block that reads its output layer's weight dtype, as T5's does."""

    def __init__(self) -> None:
        super().__init__()
        self.wi, self.wo = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wi(x))
        if h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h) + 0 * self.wo.weight.sum()  # values too


@pytest.mark.parametrize("recipe,backend", [("int4-g32", "lowbit_cpu"), ("w8a8-dynamic", "onednn")])
def test_reading_weight_does_not_break_the_graph(recipe, backend):
    torch.manual_seed(0)
    q = quantized(ReadsWeight().eval(), recipe, backend, [])
    # 4 rows: dynamic W8A8 takes its GEMV, an opaque lowbit op on every machine
    op = "lowbit.w8a8_linear_dynamic.default" if backend == "onednn" else KERNEL_OPS[backend, None]
    check(q, torch.randn(4, 64), {op}, 1e-5)

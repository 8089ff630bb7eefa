"""Layers that read one input in turn, run as one kernel call (lowbit.batching, lowbit._C's *_many calls).

Every check compares against the same layers called one by one with batching off: outputs must be
bit-identical, at every step, on every kernel path this CPU runs, while groups form, run and disband.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import batching
from lowbit.backends import lowbit_cpu
from lowbit.modules import QuantLinear

pytestmark = pytest.mark.skipif(not lowbit_cpu.available(), reason="lowbit._C not built, or CPU without AVX2+FMA")

KERNELS = ["lowbit_cpu", "lowbit_q8"]


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    if request.param not in lowbit_cpu.isas():
        pytest.skip(f"kernel path {request.param} not run: this CPU runs {', '.join(lowbit_cpu.isas())}")
    before = lowbit_cpu.isa()
    lowbit_cpu.set_isa(request.param)
    yield request.param
    lowbit_cpu.set_isa(before)


@pytest.fixture(autouse=True)
def batching_on():
    before = batching.set_enabled(True)
    yield
    batching.set_enabled(before)


class Block(nn.Module):
    """A decoder block's linears as a decoder calls them: q, k, v on one input; gate and up on another."""

    def __init__(self, d: int = 256, kv: int = 64, ff: int = 512) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv, bias=False), nn.Linear(d, d)
        self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + self.o(q * torch.sigmoid(k.sum(-1, keepdim=True)) + v.mean(-1, keepdim=True))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


def block(recipe, kernel, seed=0):
    torch.manual_seed(seed)
    return lowbit.quantize(Block().eval(), recipe, backend=kernel)


def unbatched(model, x):
    before = batching.set_enabled(False)
    try:
        return model(x)
    finally:
        batching.set_enabled(before)


def roles(model):
    return {name: type(m._batch).__name__ for name, m in model.named_children()}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("recipe", ["int4-g128", "int3-g64", "int2-g32", "int8"])
def test_groups_form_and_match_separate_calls(isa, kernel, recipe):
    model, twin = block(recipe, kernel), block(recipe, kernel)
    assert twin.q._batch is not model.q._batch
    for step in range(batching.WATCHED_CALLS + 2):
        x = torch.randn(1, 256)
        y = model(x)
        assert torch.equal(y, unbatched(twin, x)), f"step {step}"
    assert roles(model) == {"q": "Group", "k": "Follower", "v": "Follower", "o": "NoneType", "gate": "Group",
                            "up": "Follower", "down": "NoneType"}
    # in groups: still identical, for other leading shapes, bf16 inputs, and after the kernel path changes
    for x in (torch.randn(3, 256), torch.randn(2, 1, 256), torch.randn(1, 256).bfloat16()):
        assert torch.equal(model(x), unbatched(twin, x))
    assert roles(model)["k"] == "Follower"


def test_the_many_calls_match_single_calls(isa):
    torch.manual_seed(1)
    ns, k = [96, 32, 200], 256
    for bits, g in [(4, 128), (3, 64), (2, 32), (8, 256), (4, 32)]:
        packs = []
        for n in ns:
            codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
            scale = torch.rand(n, k // g) * 0.05 + 0.001
            zero = torch.randint(0, 2**bits, (n, k // g)).float()
            packs.append(lowbit_cpu._C.prepack(codes, scale, zero, bits, g))
        biases = [torch.randn(ns[0]), None, torch.randn(ns[2])]
        for rows in (1, 2, 7, 16, 17, 40):  # past the scratch (16), linear_many runs each weight's own call
            x = torch.randn(rows, k)
            ys = lowbit_cpu._C.linear_many(x, packs, bits, g, ns, k, biases)
            for y, p, n, b in zip(ys, packs, ns, biases):
                assert torch.equal(y, lowbit_cpu._C.linear(x, p, bits, g, n, k, b)), (bits, g, rows)
            if bits in lowbit_cpu.Q8_BITS:
                ys = lowbit_cpu._C.linear_q8_many(x, packs, bits, g, ns, k, biases)
                for y, p, n, b in zip(ys, packs, ns, biases):
                    assert torch.equal(y, lowbit_cpu._C.linear_q8(x, p, bits, g, n, k, b)), (bits, g, rows)
    with pytest.raises(RuntimeError, match="as many weights"):
        lowbit_cpu._C.linear_many(x, packs, bits, g, ns[:2], k, biases)
    with pytest.raises(RuntimeError, match="bias 1 must be"):
        lowbit_cpu._C.linear_q8_many(x, packs, bits, g, ns, k, [None, torch.randn(5), None])
    with pytest.raises(RuntimeError, match="does not match"):
        lowbit_cpu._C.linear_many(x, packs, bits, g, [96, 33, 200], k, biases)


def test_layers_of_different_formats_run_alone():
    torch.manual_seed(0)
    recipe = {"k": "int8", "*": "int4-g128"}  # q and k cannot share a call; gate and up can
    model = lowbit.quantize(Block().eval(), recipe, backend="lowbit_q8")
    twin = copy.deepcopy(model)
    for _ in range(12):
        x = torch.randn(1, 256)
        assert torch.equal(model(x), unbatched(twin, x))
    r = roles(model)
    assert r["q"] == "NoneType" and r["k"] == "NoneType" and r["gate"] == "Group" and r["up"] == "Follower"


def grouped(kernel="lowbit_q8"):
    model = block("int4-g128", kernel)
    twin = copy.deepcopy(model)
    for _ in range(3):
        model(torch.randn(1, 256))
    assert roles(model)["q"] == "Group"
    return model, twin


def test_a_tensor_changed_in_place_is_not_answered_from_before():
    model, twin = grouped()
    x = torch.randn(1, 256)
    yq = model.q(x)
    x.mul_(2)  # the version counter moves: k and v must see the new values
    assert torch.equal(yq, twin.q(x / 2))
    assert torch.equal(model.k(x), twin.k(x)) and torch.equal(model.v(x), twin.v(x))
    assert roles(model)["q"] == "NoneType"  # disbanded
    x = torch.randn(1, 256)
    assert torch.equal(model(x), unbatched(twin, x))


def test_a_follower_called_on_another_tensor_computes_its_own():
    model, twin = grouped()
    x, other = torch.randn(1, 256), torch.randn(1, 256)
    model.q(x)
    assert torch.equal(model.k(other), twin.k(other))
    assert roles(model)["k"] == "NoneType" and roles(model)["v"] == "NoneType"
    assert torch.equal(model.v(x), twin.v(x))


def test_a_leader_whose_outputs_were_not_taken_disbands():
    model, twin = grouped()
    x = torch.randn(1, 256)
    model.q(x)  # k and v never called on x
    x2 = torch.randn(1, 256)
    assert torch.equal(model.q(x2), twin.q(x2))
    assert roles(model)["q"] == "NoneType"
    assert torch.equal(model.k(x2), twin.k(x2)) and torch.equal(model.v(x2), twin.v(x2))


def test_hooks_still_run_and_a_replaced_input_is_honoured():
    model, twin = grouped()
    seen = []
    model.v.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = torch.randn(1, 256)
    assert torch.equal(model(x), unbatched(twin, x))
    assert seen == [torch.Size([1, 64])]
    model.k.register_forward_pre_hook(lambda m, a: (a[0] * 3,))
    twin.k.register_forward_pre_hook(lambda m, a: (a[0] * 3,))
    for _ in range(4):
        x = torch.randn(1, 256)
        assert torch.equal(model(x), unbatched(twin, x))


def test_a_new_kernel_ends_the_group_and_copies_start_afresh():
    model, twin = grouped("lowbit_cpu")
    model.k.set_kernel("lowbit_q8")
    twin.k.set_kernel("lowbit_q8")
    assert roles(model)["q"] == "NoneType" and roles(model)["v"] == "NoneType" and roles(model)["k"] == "Watching"
    for _ in range(3):
        x = torch.randn(1, 256)
        assert torch.equal(model(x), unbatched(twin, x))
    clone = copy.deepcopy(model)
    assert all(isinstance(m._batch, batching.Watching) for m in clone.modules() if isinstance(m, QuantLinear))
    x = torch.randn(1, 256)
    assert torch.equal(clone(x), unbatched(twin, x))


def test_off_means_alone():
    model = block("int4-g128", "lowbit_q8")
    batching.set_enabled(False)
    for _ in range(4):
        model(torch.randn(1, 256))
    assert set(roles(model).values()) <= {"Watching", "NoneType"}


def test_rows_over_the_fast_limit_take_the_layers_own_route():
    model, twin = grouped("lowbit_q8<=16,lowbit_cpu")
    assert model.q._batch.limit == 16 * 256
    x = torch.randn(40, 256)  # beyond the GEMV bound: each layer's own route, no shared call
    assert torch.equal(model(x), unbatched(twin, x))
    assert roles(model)["q"] == "Group"


def test_a_transformers_llama_decodes_the_same_with_its_projections_grouped():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    q = lowbit.quantize(model, {"lm_head": "float", "model.embed_tokens": "float", "*": "int4-g32"},
                        backend="lowbit_q8")
    prompt = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        before = batching.set_enabled(False)
        ref = q.generate(prompt, max_new_tokens=12, do_sample=False)
        batching.set_enabled(before)
        out = q.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    attn, mlp = q.model.layers[0].self_attn, q.model.layers[0].mlp
    assert isinstance(attn.q_proj._batch, batching.Group) and isinstance(attn.v_proj._batch, batching.Follower)
    assert isinstance(mlp.gate_proj._batch, batching.Group) and isinstance(mlp.up_proj._batch, batching.Follower)
    with torch.no_grad():  # one more decode step, grouped, against the same step alone
        steps = []
        for on in (True, False):
            before = batching.set_enabled(on)
            cache = q(out[:, :-1], use_cache=True).past_key_values
            steps.append(q(out[:, -1:], past_key_values=cache).logits)
            batching.set_enabled(before)
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_group_reads_its_weights_from_one_buffer(kernel):
    model, twin = grouped(kernel)
    for lead, names in (("q", "qkv"), ("gate", ("gate", "up"))):
        preps = [getattr(model, n)._fast[2]["qweight"] for n in names]
        assert [p.untyped_storage().data_ptr() for p in preps] == [preps[0].untyped_storage().data_ptr()] * len(preps)
        starts = [p.data_ptr() for p in preps]
        for a, p, b in zip(starts, preps, starts[1:]):
            assert a % 64 == 0 and 0 <= b - (a + p.numel()) < 64  # back to back, each 64-byte aligned
        assert all(getattr(model, n)._fast[1] is not getattr(twin, n)._fast[1] for n in names)
    for _ in range(3):
        x = torch.randn(1, 256)
        assert torch.equal(model(x), unbatched(twin, x))
    x = torch.randn(300, 256)  # rows past the GEMV: the layers' other kernels read the moved form too
    assert torch.equal(model(x), unbatched(twin, x))


def test_inference_tensors_changed_in_place_are_caught_by_value():
    model, twin = grouped()
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(1, 256)
            assert x.is_inference()
            assert torch.equal(model(x), unbatched(twin, x))
        assert roles(model)["q"] == "Group"
        x = torch.randn(1, 256)
        yq = model.q(x)
        x.mul_(2)  # no version counter to move: the follower must compare values
        assert torch.equal(yq, twin.q(x / 2))
        assert torch.equal(model.k(x), twin.k(x))
        assert roles(model)["q"] == "NoneType"

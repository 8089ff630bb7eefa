"""Quantized replacements for nn.Linear and nn.Embedding.

A quantized weight is held twice over: the canonical form that the checkpoint stores (packed codes,
scales, zero points, codebooks) and the form the chosen kernel runs on, derived from the canonical one
deterministically, so a model that was saved and loaded again computes bit-identical outputs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from . import core
from .algorithms.gptq import gptq_quantize
from .algorithms.hqq import hqq_quantize
from .backends import LayerSpec, candidates, select_kernel
from .recipes import QuantConfig

# bf16 weights: a bf16 GEMM wins while the matmul is memory-bound (few rows); beyond that, on CPUs
# without native bf16 arithmetic (AVX2), upcasting the weight and running fp32 GEMM was ~6x faster at
# 4096 rows. Measured on a Zen 3 with torch 2.13.
BF16_MM_MAX_ROWS = 16


def group_of(config: QuantConfig, k: int) -> int:
    """Effective group size along the input dim; per-channel means the whole (padded) row."""
    return k if config.group_size is None else config.group_size


def padded(k: int, g: int) -> int:
    return -(-k // g) * g


def encode_weight(w: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Quantize a 2-D float weight [N, K] into the canonical tensors the checkpoint stores.

    `hessian` (X^T X of the layer's inputs, [K, K]) is what error-correcting methods (gptq) work from.
    `qparams` (scale, zero point per row and group), for round-to-nearest integer formats, replaces the
    ones computed from w (QAT's learned scales)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf; refusing to quantize it")
    k = w.shape[1]
    if config.kind == "float":
        block = (1, k) if config.float_format.startswith("fp8") else None
        values, scale = core.quantize_float(w, config.float_format, block)
        out = {"weight": values}
        if scale is not None:
            out["scale"] = scale
        return out
    g = group_of(config, k)
    kp = padded(k, g)
    if kp != k:  # zero columns: the activations are zero-padded too, so they add nothing
        w = F.pad(w, (0, kp - k))
        if hessian is not None:
            hessian = F.pad(hessian, (0, kp - k, 0, kp - k))
    block = (1, g)
    if config.kind == "kmeans":
        codes, centroids = core.kmeans_quantize(w, config.bits, block)
        # fp16 centroids halve the codebook (16 per group of 64 would cost 1 byte per weight in fp32);
        # a table that does not fit fp16 stays fp32.
        book = centroids.to(torch.float16)
        if not torch.isfinite(book).all():
            book = centroids
        if config.method == "gptq":  # the codebooks stay; GPTQ chooses which entry each weight takes
            if hessian is None:
                raise ValueError("gptq needs the layer's calibration Hessian (pass calibration= to quantize)")
            codes, _, _ = gptq_quantize(w, hessian, config.bits, g, False, codebook=book.float())
        return {"qweight": core.pack_bits(codes, config.bits), "codebook": book}
    if config.kind in ("ternary", "binary"):
        quant = core.quantize_ternary if config.kind == "ternary" else core.quantize_binary
        codes, scale, zero = quant(w, block)
        if qparams is not None:  # the codes follow from w alone; only the magnitude was learned
            scale = qparams[0].detach().float().reshape(scale.shape)
    elif config.method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the layer's calibration Hessian (pass calibration= to quantize)")
        codes, scale, zero = gptq_quantize(w, hessian, config.bits, g, config.symmetric)
    elif config.method == "hqq":
        codes, scale, zero = hqq_quantize(w, config.bits, g)
    else:
        if qparams is not None:
            scale, zero = (t.detach().float().reshape(w.shape[0], kp // g) for t in qparams)
        else:
            scale, zero = core.choose_qparams_affine(w, config.bits, block, config.symmetric)
        codes = core.quantize_affine(w, scale, zero, config.bits, block, symmetric=config.symmetric)
    return {"qweight": core.pack_bits(codes, config.bits), "scale": scale.float(), "zero_point": zero.float()}


def dequantize_weight(state: dict[str, torch.Tensor], config: QuantConfig, n: int, k: int) -> torch.Tensor:
    """Float32 weight [N, K] back from canonical tensors (reference path, not the kernels)."""
    if config.kind == "float":
        block = (1, k) if "scale" in state else None
        return core.dequantize_float(state["weight"], state.get("scale"), block)
    g = group_of(config, k)
    kp = padded(k, g)
    codes = core.unpack_bits(state["qweight"], config.bits, n * kp).reshape(n, kp)
    if config.kind == "kmeans":
        w = core.kmeans_dequantize(codes, state["codebook"], (1, g))
    else:
        w = core.dequantize_affine(codes, state["scale"], state["zero_point"], (1, g))
    return w[:, :k]


class DequantizedWeight(torch.Tensor):
    """A quantized layer's `weight` as code written for float layers reads it: dtype, shape and device are
    answered for free; any operation on it runs on the dequantized weight, computed at that moment."""

    @staticmethod
    def __new__(cls, layer: QuantModule) -> torch.Tensor:
        buf = next(iter(layer.canonical_state().values()))
        t = torch.Tensor._make_wrapper_subclass(cls, layer.float_weight_shape(), dtype=layer.float_dtype,
                                                device=buf.device, requires_grad=False)
        t._layer = layer
        return t

    def __init__(self, layer: QuantModule) -> None:
        pass  # all done in __new__ (a tensor subclass must not call Tensor.__init__ with the layer)

    def materialize(self) -> torch.Tensor:
        return self._layer.dequantized_weight().reshape(self.shape).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(t):
            return t.materialize() if isinstance(t, DequantizedWeight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))

    def __repr__(self) -> str:
        return f"DequantizedWeight({self.materialize()!r})"


class QuantModule(nn.Module):
    """Base of every lowbit quantized layer: canonical state buffers, recipe, size."""

    # The dtype of the float layer it stands for (the model's): `weight` reads as that; set by lowbit.quantize.
    float_dtype: torch.dtype = torch.float32

    def _init_state(self, n: int, k: int, config: QuantConfig, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._n, self._k = n, k
        for name, t in state.items():
            if name == "weight":  # float-cast values; the `weight` attribute is the property below
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a float layer's (for code that reads `layer.weight`): dtype, shape and device of
        the float weight; reading its values dequantizes (a copy: writing to it changes nothing)."""
        if torch.compiler.is_compiling():  # a traced graph takes the values (dropped when unused), no subclass
            return self.dequantized_weight().reshape(self.float_weight_shape()).to(self.float_dtype)
        return DequantizedWeight(self)

    def float_weight_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, "weight_shape", None) or (self._n, self._k))

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {name: b for name, b in self.named_buffers(recurse=False)}

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with (an input scale, if any, folded into its columns)."""
        w = dequantize_weight(self.canonical_state(), self.config, self._n, self._k)
        if "input_scale" in self._buffers:
            w = w * self.input_scale
        return w

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.canonical_state().values())


class QuantLinear(QuantModule):
    """y = x @ W.T + b with W stored quantized; the kernel is chosen per layer."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig,
                 state: dict[str, torch.Tensor], bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_state(out_features, in_features, config, state)
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self._setup_kernel(kernel)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, kernel: str = "auto",
                   hessian: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None,
                   qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        """`weight` replaces the linear's own (a method's transformed weight); `input_scale` [K], when given,
        multiplies every input first (a per-channel scale that could not be folded into the op before);
        `qparams` fixes the scales and zero points (see encode_weight)."""
        state = encode_weight(linear.weight if weight is None else weight, config, hessian, qparams)
        if input_scale is not None:
            state["input_scale"] = input_scale.detach().float().contiguous()
        return cls(linear.in_features, linear.out_features, config, state, linear.bias, kernel)

    def _setup_kernel(self, prefer: str) -> None:
        """Derive the runtime form of the weight from the canonical buffers."""
        cfg, n, k = self.config, self.out_features, self.in_features
        self._prep: dict[str, torch.Tensor] = {}
        self.spec = None
        self._kernel = None
        if cfg.kind == "float":
            # bf16 has a real bf16 GEMM; fp16 and fp8 are upcast per call (simulated).
            self.kernel_name = "bf16_mm" if cfg.float_format == "bf16" else "dequant"
            if prefer not in ("auto", self.kernel_name):
                raise ValueError(f"kernel {prefer!r} cannot run {cfg.name} weights")
            return
        if cfg.kind == "kmeans":
            self.kernel_name = "dequant"
            if prefer not in ("auto", "dequant"):
                raise ValueError(f"kernel {prefer!r} cannot run codebook weights")
            return
        g = group_of(cfg, k)
        kp = padded(k, g)
        self.spec = LayerSpec(n=n, k=kp, bits=cfg.bits, group_size=g, symmetric=cfg.symmetric)
        kernel = select_kernel(self.spec, prefer)
        codes = core.unpack_bits(self.qweight, cfg.bits, n * kp).reshape(n, kp)
        self._prep = kernel.prepare(codes, self.scale, self.zero_point, self.spec)
        self._kernel = kernel
        self.kernel_name = kernel.name

    def candidate_kernels(self) -> list[str]:
        """Kernels that can run this layer here, in the default order of preference."""
        if self.spec is None:
            return [self.kernel_name]
        return [kernel.name for kernel in candidates(self.spec)]

    def set_kernel(self, name: str) -> None:
        self._setup_kernel(name)

    @property
    def kernel(self) -> str:
        return self.kernel_name

    @property
    def act_dtype(self) -> torch.dtype:
        if self.kernel_name == "bf16_mm":
            return torch.bfloat16
        return self._kernel.act_dtype if self._kernel is not None else torch.float32

    @property
    def simulated(self) -> bool:
        return self.kernel_name == "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            if self.kernel_name == "bf16_mm" and x.numel() <= BF16_MM_MAX_ROWS * self.in_features:
                b = None if self.bias is None else self.bias.to(torch.bfloat16)
                return F.linear(x.to(torch.bfloat16), self._buffers["weight"], b).to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        if "input_scale" in self._buffers:
            x = x * self.input_scale
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.spec.k != self.in_features:
            x2 = F.pad(x2, (0, self.spec.k - self.in_features))
        y = self._kernel.run(x2, self._prep, self.spec, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        act = str(self.act_dtype).replace("torch.", "")
        sim = ", simulated" if self.simulated else ""
        scaled = ", input_scale" if "input_scale" in self._buffers else ""
        return (f"in={self.in_features}, out={self.out_features}, recipe={self.config.name}, "
                f"kernel={self.kernel_name}, act={act}{sim}{scaled}")


class QuantEmbedding(QuantModule):
    """Embedding table quantized row-wise; a lookup dequantizes only the rows it gathers."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: QuantConfig,
                 state: dict[str, torch.Tensor], padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_state(num_embeddings, embedding_dim, config, state)
        self.kernel_name = "gather"
        self._codes = None
        if config.kind != "float":
            g = group_of(config, embedding_dim)
            self._g, self._kp = g, padded(embedding_dim, g)
            self._codes = core.unpack_bits(self.qweight, config.bits, num_embeddings * self._kp).reshape(
                num_embeddings, self._kp)

    @classmethod
    def from_float(cls, emb: nn.Embedding, config: QuantConfig,
                   qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantEmbedding:
        # A lookup table has no input activations for error-correcting methods to use: rows are rounded.
        state = encode_weight(emb.weight, dataclasses.replace(config, method="rtn", act=None, observer="minmax", smooth=None),
                              qparams=qparams)
        return cls(emb.num_embeddings, emb.embedding_dim, config, state, emb.padding_idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.kind == "float":
            rows = self._buffers["weight"][idx].float()
            if "scale" in self._buffers:
                rows = rows * self.scale[idx]
            return rows.to(self.float_dtype)  # the model's dtype: later layers see what they would
        codes = self._codes[idx].float()  # [..., Kp]
        g = self._g
        shape = codes.shape
        codes = codes.reshape(*shape[:-1], self._kp // g, g)
        if cfg.kind == "kmeans":
            book = self.codebook[idx].float()  # [..., Kp/g, 2^b]
            rows = torch.gather(book, -1, codes.long()).reshape(shape)
        else:
            rows = ((codes - self.zero_point[idx].unsqueeze(-1)) * self.scale[idx].unsqueeze(-1)).reshape(shape)
        return rows[..., : self.embedding_dim].to(self.float_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, recipe={self.config.name}, kernel=gather"

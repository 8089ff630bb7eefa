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
from .backends import StoredWeight, candidates, format_route, ops, parse_route, select_kernel
from .formats import Scheme, scheme_for
from .recipes import QuantConfig


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
    """Base of every lowbit quantized layer: canonical state buffers, recipe, weight format, size."""

    @classmethod
    def scheme_for(cls, config: QuantConfig) -> Scheme:
        """The weight format this kind of layer stores a recipe's weights in (lowbit.formats)."""
        return scheme_for(config)

    # The dtype of the float layer it stands for (the model's): `weight` reads as that; set by lowbit.quantize.
    float_dtype: torch.dtype = torch.float32

    def _init_state(self, n: int, k: int, config: QuantConfig, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.scheme = self.scheme_for(config)
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

    def _derive(self) -> None:
        """Rebuild what the layer derives from its canonical buffers (unpacked codes, the kernel's form)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # load_state_dict copies into the buffers in place (or assigns new tensors): the derived forms would
        # then compute with the old weights. Re-derive them when any buffer changed; lowbit.load assigns the
        # very tensors the layer was built from, which costs nothing here.
        before = {n: (id(b), b._version) for n, b in self._buffers.items() if b is not None}
        local_metadata, error_msgs = args[0], args[4]
        if not local_metadata.get("assign_to_params_buffers", False):
            # Copying in place casts to the buffer's dtype: float32 scales into a layer keeping float16 ones
            # would be rounded without a word. Refuse what the cast would change.
            for name, b in self._buffers.items():
                v = state_dict.get(prefix + name)
                if (b is not None and isinstance(v, torch.Tensor) and v.is_floating_point() and b.is_floating_point()
                        and v.dtype != b.dtype and not torch.equal(v.to(b.dtype).to(v.dtype), v)):
                    error_msgs.append(
                        f"layer {prefix[:-1]!r}: {name!r} is {str(v.dtype).replace('torch.', '')} in the state dict "
                        f"and {str(b.dtype).replace('torch.', '')} in the layer, and its values do not fit: build "
                        "the layer with the same scale dtype (QuantConfig(scale_dtype=...), recipe suffix "
                        "-fp32scales) or load with assign=True")
                    return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if before != {n: (id(b), b._version) for n, b in self._buffers.items() if b is not None}:
            self._derive()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with (an input scale, if any, folded into its columns)."""
        w = self.scheme.decode(self.canonical_state(), self.float_weight_shape())
        if "input_scale" in self._buffers:
            w = w * self.input_scale
        return w

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.canonical_state().values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the format's codes, scales, zero points and codebooks, and an input scale
        if the layer keeps one (not the bias or activation ranges)."""
        bits = self.scheme.bits_per_weight((self._n, self._k), self.canonical_state())
        if "input_scale" in self._buffers:
            bits += 8 * self.input_scale.numel() * self.input_scale.element_size() / (self._n * self._k)
        return bits


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
                   input_scale: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   zero_point: torch.Tensor | None = None) -> QuantLinear:
        """`weight` replaces the linear's own (a method's transformed weight); `input_scale` [K], when given,
        multiplies every input first (a per-channel scale that could not be folded into the op before);
        `scale` / `zero_point` fix the weight's (e.g. learned in QAT; see Scheme.encode)."""
        state = cls.scheme_for(config).encode(linear.weight if weight is None else weight, scale=scale,
                                              zero_point=zero_point, hessian=hessian)
        if input_scale is not None:
            state["input_scale"] = input_scale.detach().float().contiguous()
        return cls(linear.in_features, linear.out_features, config, state, linear.bias, kernel)

    def _setup_kernel(self, prefer: str) -> None:
        """Derive the runtime form of the weight from the canonical buffers. `prefer` names a kernel, "auto",
        or a route of kernels by row count ("lowbit_cpu<=256,lowbit_gemm_bf16", see lowbit.backends)."""
        self.spec = self.scheme.kernel_spec((self.out_features, self.in_features))
        # The module's own buffer dict: a kernel that reads canonical tensors per call sees them as they are.
        weight = StoredWeight(self.scheme, self._buffers, (self.out_features, self.in_features))
        forms: dict[str, dict] = {}
        route = []
        for rows, name in parse_route(prefer):
            kernel = select_kernel(self.spec, name)
            form = getattr(kernel, "form", kernel.name)  # kernels reading one form share one copy of it
            if form not in forms:
                forms[form] = kernel.prepare(weight, self.spec)
            route.append((rows, kernel, forms[form]))
        weight._forms.clear()  # unpacked codes etc. were only the way to the kernels' forms: do not keep them
        # (most rows, kernel, prepared form), in increasing bounds; the last takes every larger call.
        self._route = tuple(route)
        self._kernel, self._prep = route[-1][1], route[-1][2]
        # (most input elements, its call bound to this layer (Kernel.bind), form) of the first kernel when it
        # has a direct eager call: decode-sized calls skip the reshapes and casts below (they cost as much as a
        # small layer's GEMV moves bytes).
        rows, first, prep = route[0]
        self._fast = None
        if first.eager is not None and self.spec.k == self.in_features:
            limit = rows * self.in_features if len(route) > 1 else float("inf")
            self._fast = (limit, first.bind(prep, self.spec), prep)
        self.kernel_name = format_route([(rows, kernel.name) for rows, kernel, _ in route])

    def __getstate__(self) -> dict:
        # The kernels' forms are derived from the canonical buffers: a copy (copy.deepcopy goes through here)
        # or a pickle carries the buffers and derives its own forms, made as prepare makes them (packed
        # weights on huge pages, say) instead of a byte copy in ordinary memory.
        state = self.__dict__.copy()
        state["_route"], state["_prep"], state["_fast"], state["_kernel"] = (), None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._derive()

    def candidate_kernels(self) -> list[str]:
        """Kernels that can run this layer here, in the default order of preference."""
        return [kernel.name for kernel in candidates(self.spec)]

    def set_kernel(self, name: str) -> None:
        self._setup_kernel(name)

    def _derive(self) -> None:
        self._setup_kernel(self.kernel_name)

    @property
    def kernel(self) -> str:
        return self.kernel_name

    @property
    def act_dtype(self) -> torch.dtype:
        """The activations' dtype; with kernels by row count, the narrowest any of them rounds them to."""
        dtypes = [kernel.act_dtype for _, kernel, _ in self._route]
        return min(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)

    @property
    def simulated(self) -> bool:
        return any(kernel.simulated for _, kernel, _ in self._route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None and x.numel() <= fast[0] and "input_scale" not in self._buffers and ops.is_eager(x):
            return fast[1](x, self.bias)
        if "input_scale" in self._buffers:
            x = x * self.input_scale
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.spec.k != self.in_features:
            x2 = F.pad(x2, (0, self.spec.k - self.in_features))
        kernel, prep = self._kernel, self._prep
        if len(self._route) > 1:  # the kernel for this many rows: a compare per bound (a guard when traced)
            rows = x2.shape[0]
            for bound, k, p in self._route[:-1]:
                if rows <= bound:
                    kernel, prep = k, p
                    break
        y = kernel.run(x2, prep, self.spec, self.bias)
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
        self._derive()

    def _derive(self) -> None:
        # Unpacked once (not per lookup), when the format has codes.
        self._codes = self.scheme.row_codes(self._buffers, (self.num_embeddings, self.embedding_dim))

    @classmethod
    def from_float(cls, emb: nn.Embedding, config: QuantConfig, scale: torch.Tensor | None = None,
                   zero_point: torch.Tensor | None = None) -> QuantEmbedding:
        # A lookup table has no input activations for error-correcting methods to use: rows are rounded.
        # Under a method recipe, below 8 bits, each group's range is the one that rounds it best (all
        # columns alike: a row's error reaches the model whole, whichever token looks it up).
        cfg = dataclasses.replace(config, method="rtn", act=None, observer="minmax", smooth=None)
        group = config.group_size or emb.embedding_dim
        if (config.method != "rtn" and config.kind == "int" and config.bits < 8 and scale is None
                and zero_point is None and emb.embedding_dim % group == 0):
            scale, zero_point = core.choose_qparams_clipped(emb.weight.detach(), config.bits, group,
                                                            config.symmetric, half=config.scale_dtype == "float16")
        state = cls.scheme_for(cfg).encode(emb.weight, scale=scale, zero_point=zero_point)
        return cls(emb.num_embeddings, emb.embedding_dim, config, state, emb.padding_idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        shape = (self.num_embeddings, self.embedding_dim)
        rows = self.scheme.decode_rows(self._buffers, shape, idx, self._codes)
        return rows.to(self.float_dtype)  # the model's dtype: later layers see what they would

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, recipe={self.config.name}, kernel=gather"

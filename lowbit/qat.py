"""Quantization-aware training: train under simulated quantization, then convert to the real thing.

    model = lowbit.qat.prepare(model, "int4-a8")            # fake quantization inserted, in place
    ... train with your own loop and optimizer ...
    qmodel = lowbit.qat.convert(model)                      # the modules lowbit.quantize makes
    lowbit.save(qmodel, "out")

prepare() swaps each layer lowbit.quantize would quantize (same `targets`) for a subclass of the same
torch class (QATLinear is an nn.Linear, ...) that shares the original parameters, so an optimizer built
before or after prepare trains the same tensors. In the forward pass the weight goes through the
recipe's quantizer and the input through the activation quantizer, with straight-through gradients:
rounding passes the gradient unchanged, clamping stops it outside the range. With learn_scales=True
the weight scales are parameters trained by their own gradient (LSQ, Esser et al. 2019), scaled by
1/sqrt(weights per scale * qmax) as that paper does. The weight quantizer is the format's own
(lowbit.formats), the one the converted layer encodes with. Static activation ranges follow a moving
average of each batch's min and max in training and are frozen in eval mode.

BatchNorms after convolutions are folded into them at prepare (with their running statistics), as the
quantized model will have them; fine-tuning then trains the folded weights and biases.

convert() hands lowbit.quantize the trained float weights together with the scales and activation
ranges used in training (as its `fixed` parameters, which reach the format's encoder), so the converted
model computes what the fake-quantized one did, on the real kernels, up to the rounding of a different
summation order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .core import affine_qparams_from_range
from .formats import Scheme
from .layers import set_child
from .modules import QuantModule
from .quantize import CONV_TYPES, fold_batchnorm_, quantize, targets
from .recipes import QuantConfig, parse_recipe
from .w8a8 import W8A8Linear, fake_quant_rows

EMA = 0.01  # weight of each new batch in the moving average of activation ranges (as torch.ao uses)


class WeightFakeQuant(nn.Module):
    """The recipe's weight quantizer in float ops, with straight-through gradients: the weight format's
    own fake quantization (lowbit.formats), with a learned scale parameter when asked for."""

    def __init__(self, weight: torch.Tensor, config: QuantConfig, learn_scales: bool, scheme: Scheme) -> None:
        super().__init__()
        self.config = config
        self.scheme = scheme
        scheme.layout(weight.shape)  # a group size that does not fit the layer fails here, not in training
        self.scale = None
        if learn_scales:
            if not scheme.learns_scale:
                raise ValueError("learned scales take symmetric formats (e.g. int4-a8, ternary, binary); "
                                 f"{config.name} has zero points")
            self.scale = nn.Parameter(scheme.init_scale(weight.detach()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.scheme.fake_quantize(w, self.scale)

    def fixed(self) -> dict[str, torch.Tensor]:
        """What the format's encoder must be given to reproduce this quantizer: the learned scale, if any."""
        return {} if self.scale is None else {"scale": self.scheme.learned_scale(self.scale)}


class ActFakeQuant(nn.Module):
    """uint8 activations as the W8A8 kernels quantize them: per tensor with a tracked range ("static"),
    or per row at run time ("dynamic")."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def qparams(self) -> tuple[float, int]:
        if not bool(self.seen):
            raise ValueError("this layer's activation range was never observed: run training (or a few "
                             "batches in train mode) before converting")
        scale, zero = affine_qparams_from_range(self.lo, self.hi, 8)
        return float(scale), int(zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            x2 = x.reshape(-1, x.shape[-1])
            return x + (fake_quant_rows(x2.detach().float()).reshape(x.shape).to(x.dtype) - x).detach()
        if self.training:
            lo, hi = x.detach().min().float(), x.detach().max().float()
            if bool(self.seen):
                lo, hi = self.lo + EMA * (lo - self.lo), self.hi + EMA * (hi - self.hi)
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.seen.fill_(True)
        scale, zero = self.qparams()
        inv = torch.tensor(1.0 / scale, dtype=torch.float32)
        q = torch.round(x.detach() * inv) + zero
        inside = (q >= 0) & (q <= 255)
        xq = (q.clamp(0, 255) - zero) * scale
        return x * inside + (xq - x * inside).detach()  # gradient only where x was inside the range


class _QAT:
    """Shared by the QAT layers: the weight and input quantizers and what convert needs."""

    weight_fake: WeightFakeQuant
    act_fake: ActFakeQuant | None

    def _attach(self, config: QuantConfig, learn_scales: bool) -> None:
        self.lowbit_qat_config = config
        # The format of the layer convert() will make: W8A8 layers' int8 form, or the weight-only one.
        scheme = (W8A8Linear if config.act is not None else QuantModule).scheme_for(config)
        self.weight_fake = WeightFakeQuant(self.weight, config, learn_scales, scheme)
        self.act_fake = ActFakeQuant(config.act) if config.act is not None else None

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_fake is None else self.act_fake(x)

    def fixed(self) -> dict:
        """The quantization parameters fixed in training, as lowbit.quantize's `fixed` takes them: the
        learned weight scale ("scale") and a static layer's activation range ("act": scale, zero point)."""
        fixed = self.weight_fake.fixed()
        if self.act_fake is not None and self.act_fake.mode == "static":
            fixed["act"] = self.act_fake.qparams()
        return fixed


class QATLinear(nn.Linear, _QAT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._inputs(x), self.weight_fake(self.weight), self.bias)


class QATConv1d(nn.Conv1d, _QAT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._inputs(x), self.weight_fake(self.weight), self.bias)


class QATConv2d(nn.Conv2d, _QAT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._inputs(x), self.weight_fake(self.weight), self.bias)


class QATEmbedding(nn.Embedding, _QAT):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_fake(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


QAT_TYPES = {nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Embedding: QATEmbedding}


def _swap(mod: nn.Module, cls: type, config: QuantConfig, learn_scales: bool) -> nn.Module:
    new = copy.copy(mod)  # the same parameters, buffers and settings; only the class changes
    new.__dict__ = dict(mod.__dict__)
    new._parameters, new._buffers, new._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
    new.__class__ = cls
    if isinstance(new, QATEmbedding):  # a lookup has no activations: weights only
        config = QuantConfig(**{**config.to_dict(), "act": None, "observer": "minmax", "symmetric": config.symmetric})
    new._attach(config, learn_scales)
    return new


def prepare(model: nn.Module, recipe: str | QuantConfig, *, learn_scales: bool = False,
            exclude: Iterable[str] = ()) -> nn.Module:
    """Insert fake quantization into `model` (in place; returned) for training under `recipe`.

    The layers are those lowbit.quantize(model, recipe) would replace. Recipes with error-correcting
    methods (gptq, awq, hqq) or SmoothQuant are post-training only; float formats and codebooks have no
    quantization-aware form here."""
    config = parse_recipe(recipe)
    if config.method != "rtn" or config.smooth is not None:
        raise ValueError(f"{config.name}: methods and smoothing are post-training; QAT takes plain formats "
                         "(e.g. int4-g32, int4-a8, ternary-a8, binary-a8)")
    if config.kind not in ("int", "ternary", "binary"):
        raise ValueError(f"{config.name}: QAT takes integer, ternary or binary weights")
    if any(isinstance(m, _QAT) for m in model.modules()):
        raise ValueError("the model is prepared for QAT already")
    if config.act == "static":
        was = model.training
        model.eval()
        fold_batchnorm_(model)  # with its running statistics, as the converted model will have it
        model.train(was)
    todo = targets(model, config, exclude)
    if not todo:
        raise ValueError("found no layer to quantize (nn.Linear, nn.Embedding, or convolutions for static "
                         "recipes); check `exclude`")
    for name, mod in todo:
        cls = QAT_TYPES.get(type(mod))
        if cls is None:
            raise ValueError(f"layer {name!r}: {type(mod).__name__} has no QAT form; exclude it")
        if isinstance(mod, CONV_TYPES) and config.group_size is not None:
            raise ValueError(f"layer {name!r}: convolutions take one weight scale per channel (no group size)")
        set_child(model, name, _swap(mod, cls, config, learn_scales))
    model.lowbit_qat_config = config
    model.lowbit_qat_exclude = tuple(exclude)
    return model


def _float_twin(mod: nn.Module) -> nn.Module:
    base = next(b for b in type(mod).__mro__ if b in QAT_TYPES)
    twin = copy.copy(mod)
    twin.__dict__ = dict(mod.__dict__)
    twin._parameters = {k: v for k, v in mod._parameters.items() if k in ("weight", "bias")}
    twin._buffers, twin._modules = {}, {}
    twin.__class__ = base
    return twin


def convert(model: nn.Module, *, calibration: Iterable | None = None, backend: str = "auto") -> nn.Module:
    """The QAT model as the quantized model lowbit.quantize makes (in place; returned, in eval mode):
    the same modules, kernels and checkpoint, with the trained scales and activation ranges.
    `calibration` (optional) only gives the layers' input shapes for timing kernels."""
    config = getattr(model, "lowbit_qat_config", None)
    if config is None:
        raise ValueError("the model was not prepared with lowbit.qat.prepare")
    model.eval()
    fixed = {}
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, _QAT)]:
        if not torch.isfinite(mod.weight).all():
            raise ValueError(f"layer {name!r}: weight contains NaN or inf after training; refusing to convert")
        if params := mod.fixed():
            fixed[name] = params
        set_child(model, name, _float_twin(mod))
    exclude = getattr(model, "lowbit_qat_exclude", ())
    del model.lowbit_qat_config
    with torch.no_grad():
        return quantize(model, config, calibration=calibration, exclude=exclude, backend=backend,
                        keep_float_if_slower=False, fixed=fixed)


def distillation_loss(student: torch.Tensor | None, teacher: torch.Tensor | None,
                      target: torch.Tensor | None = None, *,
                      temperature: float = 2.0, alpha: float = 0.5,
                      hidden: Iterable[tuple[torch.Tensor, torch.Tensor]] = (), hidden_weight: float = 1.0
                      ) -> torch.Tensor:
    """alpha * KL(teacher || student) on logits softened by `temperature` (times T^2, so its gradient keeps
    its size as T changes; Hinton et al. 2015) + (1 - alpha) * cross-entropy with `target` when given,
    + hidden_weight * the mean squared error of each (student, teacher) pair of hidden states.
    With student and teacher None (models without logits, e.g. sentence encoders) only the hidden-state
    terms count. The teacher's tensors are detached: it is not trained."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    hidden = list(hidden)
    if student is None or teacher is None:
        if not hidden:
            raise ValueError("nothing to distill: pass student and teacher outputs, or hidden pairs")
        return hidden_weight * sum(F.mse_loss(hs, ht.detach()) for hs, ht in hidden)
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True) * t * t
    # Without labels the teacher is the only signal, whatever alpha says.
    loss = kl if target is None else alpha * kl + (1 - alpha) * F.cross_entropy(student, target)
    for hs, ht in hidden:
        loss = loss + hidden_weight * F.mse_loss(hs, ht.detach())
    return loss

"""Other toolkits' int8 paths for the same model, so benchmarks can put lowbit next to them.

Used by the scripts in `benchmarks/` only. None of these toolkits is a dependency of lowbit: install them
with `pip install lowbit[peers]` (torchao, onnx, onnxscript, onnxruntime). Each builder imports its toolkit
when called; `versions()` says which are present.

* torchao: `Int8DynamicActivationInt8WeightConfig` (int8 per-token activations, int8 per-channel weights)
  for linears, then `torch.compile(..., freezing=True)`. Its matmul is `torch._int_mm`; on an x86 CPU
  without VNNI or AVX-512 that op does not reach oneDNN and runs far slower than a float32 matmul.
* torch.ao (deprecated, still shipped, eager): `quantize_dynamic` for linears and FX static quantization
  with the x86 backend for conv nets.
* ONNX Runtime: an ONNX export run as is (fp32), `quantize_dynamic` (per-channel int8 weights, uint8
  activations quantized per call) and `quantize_static` in QDQ form (activation ranges from calibration).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

PEER_PACKAGES = ("torchao", "onnx", "onnxscript", "onnxruntime")


def versions() -> dict[str, str | None]:
    """Installed version of each peer package, None where it is missing or does not import."""
    out: dict[str, str | None] = {}
    for name in PEER_PACKAGES:
        try:
            with quiet():
                out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            out[name] = None
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation notices and import chatter of the peer toolkits for the duration."""
    # torchao logs a warning for each CUDA-only extension it cannot load on a CPU build.
    # torch.utils._pytree: torchao registers enums the way torch 2.13 deprecates.
    names = ("torchao", "torch.onnx", "onnxscript", "onnx_ir", "torch.utils._pytree")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------- torchao and torch.ao


def torchao_int8_dynamic(model: nn.Module) -> nn.Module:
    """`model` with every nn.Linear quantized in place by torchao to int8 weights and int8 dynamic activations.

    Eager or compiled, its matmul is `torch._int_mm` (int8 x int8 -> int32); `compile_frozen` fuses the
    activation quantization and rescaling around it.
    """
    with quiet():
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig as config_cls
        except ImportError:  # torchao < 0.10 named it as a function
            from torchao.quantization import int8_dynamic_activation_int8_weight as config_cls
        quantize_(model, config_cls())
    return model


def compile_frozen(model: nn.Module) -> nn.Module:
    """`torch.compile` with Inductor's freezing: weights become constants, so quantized weight packing and
    int8 matmul patterns are folded at compile time. Compiles lazily on the first call of each input shape
    (`dynamic=False`: one specialised graph per shape); call it once under `torch.inference_mode()` to
    warm up before timing."""
    return torch.compile(model, options={"freezing": True}, dynamic=False)


def torch_ao_dynamic(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """torch.ao's eager dynamic quantization of every nn.Linear (int8 weights, activations quantized per call
    per tensor, FBGEMM kernels). `per_channel=False` is torch.ao's default qconfig, one weight scale per
    layer (on all-MiniLM-L6-v2 that costs far more accuracy: cosine to fp32 about 0.90 against 0.97)."""
    with quiet():
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


def torch_ao_static_fx(model: nn.Module, example: tuple, calibration: Iterable[tuple]) -> nn.Module:
    """torch.ao's FX graph-mode static quantization with the "x86" backend (FBGEMM/oneDNN int8 kernels):
    per-channel int8 weights, per-tensor uint8 activations observed on `calibration` (input tuples).
    Deprecated in favour of PT2E, but it still ships and runs eagerly, without a compiler."""
    with quiet():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for args in calibration:
                prepared(*args)
        return convert_fx(prepared)


# ---------------------------------------------------------------- ONNX Runtime


class _OutputsOnly(nn.Module):
    """Adapts a Hugging Face encoder to positional tensor inputs and one tensor output, for export."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors)))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: str | Path,
                dynamic: Sequence[int] = (0,)) -> Path:
    """Export `model(**example)` to ONNX at `path`, with the dims in `dynamic` of every input left free.

    A model whose output has `.last_hidden_state` (a Hugging Face encoder) is exported to return just that
    tensor, named "last_hidden_state"; any other model must return one tensor, named "output".
    """
    path = Path(path)
    names = list(example)
    wrapped = _OutputsOnly(model, names).eval()
    with torch.no_grad():
        probe = model(**example)
    out_name = "last_hidden_state" if hasattr(probe, "last_hidden_state") else "output"
    dims = {d: torch.export.Dim.AUTO for d in dynamic}
    # forward takes *tensors: its one (variadic) argument gets one spec per tensor.
    with quiet():
        torch.onnx.export(wrapped, tuple(example.values()), str(path), input_names=names, output_names=[out_name],
                          dynamic_shapes=(tuple(dims for _ in names),), dynamo=True, verbose=False,
                          external_data=False)  # one file: the quantizer tools lose external data
    return path


def ort_session(path: str | Path, threads: int = 2):
    """An ONNX Runtime CPU session using `threads` intra-op threads that sleep instead of spinning when idle,
    so sessions and torch timed in turn in one process do not steal the cores from each other."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the call signature of the module it was exported from.

    Keyword tensors in, torch tensors out: an encoder exported by `export_onnx` returns an object with
    `.last_hidden_state`, so `lowbit.hf.encode` and `lowbit_workbench.evaluate.eval_stsb` take it like the original.
    Inputs the graph does not use are dropped.
    """

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        super().__init__()
        self.session = ort_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        feeds = dict(zip(self.input_names, args))
        feeds.update({k: v for k, v in kwargs.items() if k in self.input_names})
        out = torch.from_numpy(self.session.run(None, {k: _np(v) for k, v in feeds.items()})[0])
        if self.output_name == "last_hidden_state":
            return SimpleNamespace(last_hidden_state=out)
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second operand is a stored weight: the model's linear layers
    (attention's activation-by-activation products are left in float, as lowbit leaves them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]


def _preprocess(src: Path, work: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    # Symbolic shape inference does not follow the dynamo exporter's graphs; ONNX shape inference and the
    # graph optimisation are what the quantizer needs.
    quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out


def ort_quantize_dynamic(src: str | Path, dst: str | Path, per_channel: bool = True,
                         linears_only: bool = True) -> Path:
    """ONNX Runtime dynamic int8 quantization of `src` written to `dst` (one file, weights inside).

    The quantizer writes large scratch files into the current directory, so it runs in a temporary one.
    """
    import os

    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src).resolve(), Path(dst).resolve()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp, quiet():
        os.chdir(tmp)
        try:
            pre = _preprocess(src, Path(tmp))
            nodes = _weight_matmuls(pre) if linears_only else None
            quantize_dynamic(str(pre), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes)
        finally:
            os.chdir(cwd)
    return dst


class _Feeds:
    """An onnxruntime CalibrationDataReader over a list of feed dicts (duck-typed: get_next and rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def ort_quantize_static(src: str | Path, dst: str | Path, calibration: Iterable[dict[str, torch.Tensor]],
                        per_channel: bool = True, linears_only: bool = True,
                        op_types: Sequence[str] | None = ("MatMul", "Gemm")) -> Path:
    """ONNX Runtime static int8 quantization in QDQ form: per-channel int8 weights, uint8 activations with
    ranges from running `calibration` (dicts of input tensors) through the float graph (MinMax).

    `linears_only`: quantize only MatMul/Gemm nodes that multiply by a stored weight (for transformers);
    otherwise every node of `op_types`, or of every type the quantizer supports when None (conv nets).
    """
    import os

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(src).resolve(), Path(dst).resolve()
    calibration = list(calibration)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp, quiet():
        os.chdir(tmp)
        try:
            pre = _preprocess(src, Path(tmp))
            names = [i.name for i in ort_session(pre).get_inputs()]
            feeds = [{k: _np(v) for k, v in batch.items() if k in names} for batch in calibration]
            nodes = _weight_matmuls(pre) if linears_only else None
            quantize_static(str(pre), str(dst), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(op_types) if op_types else None,
                            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax)
        finally:
            os.chdir(cwd)
    return dst


def private_autotune_cache(prefix: str, keep_user_cache: bool) -> tempfile.TemporaryDirectory | None:
    """Point lowbit's kernel-timing cache at a fresh temporary directory, so a benchmark times kernel
    choices in its own run; returns it (call .cleanup() at the end), or None to keep the user's cache."""
    if keep_user_cache:
        return None
    cache = tempfile.TemporaryDirectory(prefix=prefix)
    os.environ["LOWBIT_CACHE_DIR"] = cache.name
    return cache

"""A Hugging Face folder in the compressed-tensors format: transformers loads it with the
`compressed-tensors` package, no lowbit needed (and vLLM-style servers read the same layout).

    lowbit.export.compressed_tensors(model, "out/", tokenizer=tokenizer)
    lowbit export CHECKPOINT --format compressed-tensors -o out/

Each quantized nn.Linear is written with lowbit's own codes, scales and zero points (nothing is
re-quantized):

  weight-only intB (B = 2..8, per output channel or per group):  "pack-quantized"
      weight_packed  int32 [N, ceil(K * B / 32)]: each row's unsigned codes u, element i at bit i * B
                     of the row's little-endian bit stream (32 codes fill exactly B words)
      weight_scale   [N, K / G] (or [N, 1] per channel), in the model's dtype
      weight_zero_point (asymmetric only) int32 [ceil(N * B / 32), K / G]: the zero points z, packed
                     the same way down each column
      weight_shape   int64 [2] = (N, K)
  W = (u - z) * scale, exactly lowbit's (compressed-tensors stores signed codes q = u - 2**(B-1) and
  zero points z - 2**(B-1), which its packing offsets back to u and z). Symmetric formats (z = 2**(B-1))
  store no zero point. Zero points must be integers: HQQ's fitted fractional ones are refused.

  W8A8 (int8 weights per channel, uint8 activations):  "int-quantized"
      weight int8 [N, K] (lowbit's symmetric codes), weight_scale [N, 1]; activations asymmetric int8
      per token at run time (dynamic) or per tensor with lowbit's calibrated scale and zero point
      (static: input_scale [1], input_zero_point int8 [1] = lowbit's uint8 zero point - 128).
  Narrower weights with int8 activations (int4-a8, ...) are "pack-quantized" with input activations.

Quantized embeddings are written in float, dequantized (the values lowbit's lookup returns). Codebook,
ternary, binary and float (fp16/bf16/fp8) layers, groups that do not divide a layer's inputs, input
scales (AWQ's, when not folded) and quantized layers that are not nn.Linear in the model's architecture
(GPT-2's Conv1D, convolutions) are refused with one ExportError naming the layer.

Every export is verified: in a fresh interpreter where lowbit cannot be imported, transformers loads the
folder with compressed-tensors and runs fixed inputs; its outputs are compared with lowbit's own model
(cosine and max |diff|). The folder is written under a temporary name beside the target and renamed into
place only when it agrees.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import attention
from ..files import set_usual_modes
from ..formats import AffineScheme
from ..modules import QuantEmbedding, QuantLinear, QuantModule
from ..w8a8 import W8A8Linear
from .verify import Agreement, ExportError, compare

__all__ = ["export", "from_checkpoint", "pack_int32"]

FORMAT = "compressed-tensors"
TENSORS = "model.safetensors"
MARK = {"format": "pt", "writer": "lowbit"}  # safetensors metadata: a folder this writer made (replaceable)
MIN_COSINE = 0.9999
# With int8 activations: an activation whose x / scale falls near a rounding boundary takes one code or the
# next depending on the last bits of float sums, and one flipped step moves the layers after it. lowbit's
# own two int8 kernels (oneDNN and the float reference) differ by cosine ~0.9997 on all-MiniLM-L6-v2's
# hidden states for random tokens, and by a max |diff| of 7% of the largest output on text: the same bounds
# cannot hold here.
MIN_COSINE_INT8_ACTS = 0.999
MAX_ABS_REL_INT8_ACTS = 0.1
# Max |diff| allowed, relative to lowbit's largest |output|: lowbit's kernels may run bf16 activations
# (PyTorch's int4 mm) or integer activations by another rounding of x / scale, the loader dequantizes
# and runs float matmuls.
MAX_ABS_REL = 0.02


# ---------------------------------------------------------------------------------------------------
# Packing


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes [R, C] (each in [0, 2**bits)) packed densely into int32 along `dim` (1: each row's
    codes; 0: each column's): code i of a line at bit i * bits of the line's bit stream, 32-bit words
    little-endian; ceil(C * bits / 32) words per line."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packing takes 1..8 bits, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"expected codes [rows, cols], got shape {tuple(codes.shape)}")
    u = codes.to(torch.int64)
    if u.numel() and (u.min() < 0 or u.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    words = -(-cols * bits // 32)
    # Every 32 codes fill exactly `bits` words: pad each line to whole groups of 32, pack group-wise.
    groups = -(-cols // 32)
    u = torch.nn.functional.pad(u, (0, groups * 32 - cols)).reshape(rows * groups, 32)
    out = torch.zeros(rows * groups, bits + 1, dtype=torch.int64)  # one spare word for the last spill
    start = torch.arange(32, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    for i in range(32):  # 32 columns: a short loop of whole-tensor operations
        v = u[:, i] << shift[i]
        out[:, word[i]] |= v & 0xFFFFFFFF
        out[:, word[i] + 1] |= v >> 32  # the bits that spill into the next word (0 when none do)
    out = out[:, :bits].reshape(rows, groups * bits)[:, :words]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # the same 32 bits, signed
    return (out.t() if dim == 0 else out).contiguous()


# ---------------------------------------------------------------------------------------------------
# What each layer becomes


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: the weights' and activations' quantization arguments."""

    fmt: str
    bits: int
    symmetric: bool
    group_size: int | None
    act: str | None  # None, "dynamic" (per token) or "static" (per tensor)

    def to_dict(self, targets: list[str]) -> dict:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "group" if self.group_size else "channel", "group_size": self.group_size,
                   "dynamic": False}
        acts = None
        if self.act is not None:
            acts = {"num_bits": 8, "type": "int", "symmetric": False,
                    "strategy": "token" if self.act == "dynamic" else "tensor", "group_size": None,
                    "dynamic": self.act == "dynamic"}
        return {"targets": targets, "weights": weights, "input_activations": acts, "output_activations": None,
                "format": self.fmt}


def _refuse(name: str, why: str) -> ExportError:
    return ExportError(f"layer {name!r}: {why}; compressed-tensors cannot represent it (export refused)")


def _affine(name: str, mod: QuantModule) -> AffineScheme:
    scheme = mod.scheme
    if not isinstance(scheme, AffineScheme):
        raise _refuse(name, f"{scheme.name} weights (recipe {mod.config.name}) have no integer codes with a scale "
                            "per channel or group")
    return scheme


def _group(name: str, mod: QuantModule, scheme: AffineScheme) -> int | None:
    """The layer's group size (None: one scale per output channel), when the format can hold it."""
    rows, g = scheme.block
    if rows != 1:
        raise _refuse(name, f"scales shared by blocks of {rows} rows")
    k = mod.float_weight_shape()[1]
    if g is not None and k % g:
        raise _refuse(name, f"group size {g} does not divide its {k} inputs")
    return g


def _weight_only(name: str, mod: QuantLinear, dtype: torch.dtype) -> tuple[Scheme, dict[str, torch.Tensor]]:
    scheme = _affine(name, mod)
    if "input_scale" in mod.canonical_state():
        raise _refuse(name, "it scales its inputs per channel first (an AWQ scale that could not be folded into "
                            "the layer before)")
    g = _group(name, mod, scheme)
    n, k = mod.out_features, mod.in_features
    bits = scheme.bits
    codes, scale, zero = scheme.affine_codes(mod.canonical_state(), (n, k))  # [N, Kp], [N, Kp / G] x 2
    codes = codes[:, :k]  # Kp == K: the group divides K
    if scheme.symmetric:
        if not torch.all(zero == 2 ** (bits - 1)):
            raise _refuse(name, "a symmetric format whose zero points are not 2**(bits - 1)")
    elif not torch.equal(zero, zero.round()):
        example = zero[zero != zero.round()][0].item()
        raise _refuse(name, f"its zero points are fractional (e.g. {example:.4g}, fitted by {scheme.method}, recipe "
                            f"{mod.config.name}); compressed-tensors stores integer zero points")
    elif zero.min() < 0 or zero.max() > 2 ** bits - 1:
        raise _refuse(name, f"its zero points leave the {bits}-bit code range")
    tensors = {"weight_packed": pack_int32(codes, bits),
               "weight_scale": scale.to(dtype).reshape(n, -1).contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not scheme.symmetric:
        tensors["weight_zero_point"] = pack_int32(zero.round().to(torch.int64).reshape(n, -1), bits, dim=0)
    return Scheme("pack-quantized", bits, scheme.symmetric, g, None), tensors


def _w8a8(name: str, mod: W8A8Linear, dtype: torch.dtype) -> tuple[Scheme, dict[str, torch.Tensor]]:
    scheme = _affine(name, mod)
    g = _group(name, mod, scheme)
    n, k = mod.out_features, mod.in_features
    codes, scale = scheme.int8_codes(mod.canonical_state(), (n, k))  # int8 [N, K], [N] or [N, K / G]
    codes = codes.reshape(n, k)
    scale = scale.to(dtype).reshape(n, -1).contiguous()
    if scheme.bits == 8:
        tensors = {"weight": codes.to(torch.int8).contiguous(), "weight_scale": scale}
        fmt = "int-quantized"
    else:
        offset = 2 ** (scheme.bits - 1)
        tensors = {"weight_packed": pack_int32(codes.to(torch.int64) + offset, scheme.bits),
                   "weight_scale": scale, "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        fmt = "pack-quantized"
    act = mod.config.act
    if act == "static":
        s, z = mod.act_qparams
        tensors["input_scale"] = torch.tensor([s], dtype=torch.float32).to(dtype)
        tensors["input_zero_point"] = torch.tensor([z - 128], dtype=torch.int8)  # uint8 -> int8 domain
    return Scheme(fmt, scheme.bits, True, g, act), tensors


def _float_skeleton(model: nn.Module) -> nn.Module:
    """The model's architecture as transformers builds it (on the meta device): what each layer was."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return type(model)(config)


def _convert(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[Scheme, list[str]], list[str], list[str]]:
    """(tensors, {scheme: layer names}, float linears, quantized embeddings written in float)."""
    skeleton = _float_skeleton(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -len(tensors) - 1
        tensors[key] = t.clone().contiguous() if ptr in seen else t.contiguous()  # tied: a copy each
        seen[ptr] = key
    groups: dict[Scheme, list[str]] = {}
    embeddings: list[str] = []
    for name, mod in quantized.items():
        try:
            original = skeleton.get_submodule(name)
        except AttributeError:
            raise _refuse(name, "it is not a layer of the model's architecture") from None
        dtype = mod.float_dtype
        prefix = f"{name}."
        if isinstance(mod, QuantEmbedding) and isinstance(original, nn.Embedding):
            shape = (mod.num_embeddings, mod.embedding_dim)
            tensors[prefix + "weight"] = mod.scheme.decode(mod.canonical_state(), shape).to(dtype).contiguous()
            embeddings.append(name)
            continue
        if type(original) is not nn.Linear or not isinstance(mod, (QuantLinear, W8A8Linear)):
            raise _refuse(name, f"a quantized {type(original).__name__} ({type(mod).__name__}); compressed-tensors "
                                "quantizes nn.Linear layers")
        scheme, layer = (_w8a8 if isinstance(mod, W8A8Linear) else _weight_only)(name, mod, dtype)
        if mod.bias is not None:
            layer["bias"] = mod.bias.detach().to(dtype).contiguous()
        tensors.update({prefix + k: v for k, v in layer.items()})
        groups.setdefault(scheme, []).append(name)
    floats = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    return tensors, groups, floats, embeddings


def _regex(name: str) -> str:
    return "re:^" + name.replace(".", r"\.") + "$"


def quantization_config(groups: dict[Scheme, list[str]], floats: list[str]) -> dict:
    """The config.json `quantization_config` of the layers `groups` (scheme -> names), `floats` left float."""
    if len(groups) == 1:
        scheme, _ = next(iter(groups.items()))
        config_groups = {"group_0": scheme.to_dict(["Linear"])}
        ignore = floats
    else:
        config_groups = {f"group_{i}": s.to_dict([_regex(n) for n in names])
                         for i, (s, names) in enumerate(groups.items())}
        ignore = []
    formats = {s.fmt for s in groups}
    config = {"quant_method": FORMAT, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
              "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
              "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
              "transform_config": {}}
    try:
        config["version"] = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        pass
    return config


# ---------------------------------------------------------------------------------------------------
# Writing and verifying


def _is_ours(directory: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    if not (directory / TENSORS).is_file():
        return False
    try:
        with safe_open(str(directory / TENSORS), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):  # not safetensors: not a folder this writer made
        return False
    return meta.get("writer") == MARK["writer"] and (directory / "config.json").is_file()


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportError(f"cannot write a compressed-tensors folder to {target}: it is an existing file")
    if any(target.iterdir()) and not _is_ours(target):
        raise ExportError(f"cannot write a compressed-tensors folder to {target}: it is a non-empty folder this "
                          "exporter did not write; replacing it would delete its contents, so choose another path "
                          "or empty it")


def _install(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup / "old", target)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


# The check's inputs when a tokenizer is given: text gives the activations the ranges were calibrated on
# (random token ids push static int8 activations far past them, where rounding differences grow).
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street.",
             "Quantized models run fast on ordinary CPUs.", "It rained all day, so we stayed inside and read."]


def _example_inputs(model: nn.Module, tokenizer: Any = None) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None:
            return {"input_ids": torch.cat([tokenizer(t, return_tensors="pt")["input_ids"][:, :8]
                                            for t in SENTENCES])}
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ExportError(f"{type(model).__name__}: the check runs token ids through the model, and its config "
                          "has no vocab_size; pass example_inputs={name: tensor}")
    # 4 x 16 tokens: more rows than the int8 layers' GEMV path takes, so their activations are quantized.
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (4, 16), generator=g)}


def _first_output(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ExportError(f"cannot find the output tensor of {type(out).__name__} (logits or last_hidden_state)")


RUN = """
import sys


class NoLowbit:
    # lowbit must not be importable: the folders have to load with transformers and compressed-tensors alone.
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "lowbit":
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


sys.meta_path.insert(0, NoLowbit())
sys.modules["lowbit"] = None
import json

import torch
from safetensors.torch import load_file, save_file
import transformers
from transformers import AutoModel, AutoModelForCausalLM

reports = []
for job in json.loads(open(sys.argv[1]).read()):
    auto = AutoModelForCausalLM if job["causal_lm"] else AutoModel
    options = {}
    if job["dequantize"]:
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = auto.from_pretrained(job["folder"], local_files_only=True, **options).eval()
    with torch.inference_mode():
        result = model(**load_file(job["inputs"]))
    for key in ("logits", "last_hidden_state"):
        value = getattr(result, key, None)
        if value is not None:
            break
    else:
        value = result[0]
    save_file({"out": value.detach().float().contiguous()}, job["out"])
    reports.append({"quantized_modules": sum(hasattr(m, "quantization_scheme") for m in model.modules())})
loaded = [n for n, m in sys.modules.items() if m is not None and n.split(".")[0] == "lowbit"]
print(json.dumps({"reports": reports, "lowbit_loaded": loaded}))
"""


@dataclass(frozen=True)
class Job:
    """One folder to load without lowbit and run on the inputs in a safetensors file."""

    folder: Path
    inputs: dict[str, torch.Tensor]
    causal_lm: bool
    dequantize: bool = False


def run_without_lowbit(jobs: list[Job], *, timeout: float = 900) -> list[tuple[torch.Tensor, int]]:
    """Load each job's folder with transformers + compressed-tensors in one fresh interpreter where lowbit
    cannot be imported, and run its inputs: [(output, number of modules compressed-tensors quantized)]."""
    for package in ("transformers", "compressed_tensors"):
        if importlib.util.find_spec(package) is None:
            raise ExportError(f"checking the export needs {package.replace('_', '-')} installed (pip install "
                              "'lowbit[export]'), or pass verify_export=False")
    with tempfile.TemporaryDirectory(prefix="lowbit-ct-check-") as tmp:
        spec = []
        for i, job in enumerate(jobs):
            save_file({k: v.contiguous() for k, v in job.inputs.items()}, f"{tmp}/in{i}.safetensors")
            spec.append({"folder": str(job.folder), "inputs": f"{tmp}/in{i}.safetensors",
                         "out": f"{tmp}/out{i}.safetensors", "causal_lm": job.causal_lm,
                         "dequantize": job.dequantize})
        (Path(tmp) / "jobs.json").write_text(json.dumps(spec))
        (Path(tmp) / "run.py").write_text(textwrap.dedent(RUN))
        # The environment as it is (transformers may be found through PYTHONPATH): the script's own import
        # blocker keeps lowbit out wherever it is installed.
        r = subprocess.run([sys.executable, "run.py", "jobs.json"], capture_output=True, text=True, cwd=tmp,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            folders = ", ".join(str(j.folder) for j in jobs)
            raise ExportError(f"transformers + compressed-tensors could not load or run {folders}:\n"
                              + r.stderr.strip()[-3000:])
        result = json.loads(r.stdout.strip().splitlines()[-1])
        if result["lowbit_loaded"]:
            raise ExportError("the check was not independent of lowbit: loading imported "
                              + ", ".join(result["lowbit_loaded"]))
        return [(load_file(f"{tmp}/out{i}.safetensors")["out"], rep["quantized_modules"])
                for i, rep in enumerate(result["reports"])]


def is_causal_lm(model: nn.Module) -> bool:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return any(a.endswith("ForCausalLM") for a in names)


def reference_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """lowbit's own model's output on `inputs` (logits or last hidden state), float32; attention in float32
    (as the loader runs it) where lowbit runs it with bf16 matmuls."""
    with torch.inference_mode(), attention.own_attention(model):
        return _first_output(model(**inputs)).float()


def agreement(reference: torch.Tensor, got: torch.Tensor, *, min_cosine: float = MIN_COSINE,
              max_abs_rel: float = MAX_ABS_REL) -> Agreement:
    """The loaded folder's output against lowbit's; ExportError past the bounds."""
    return compare(reference, got, "transformers + compressed-tensors (no lowbit)", min_cosine=min_cosine,
                   max_abs=max_abs_rel * reference.abs().max().item())


def verify(model: nn.Module, folder: Path, inputs: dict[str, torch.Tensor], *, expect_quantized: int,
           dequantize: bool = False, min_cosine: float = MIN_COSINE, max_abs_rel: float = MAX_ABS_REL) -> Agreement:
    """Load `folder` with transformers + compressed-tensors in a fresh interpreter where lowbit cannot be
    imported, run `inputs`, and compare with `model`'s outputs; ExportError past the bounds. dequantize:
    load with CompressedTensorsConfig(dequantize=True) (weights decompressed to float while loading)
    instead of keeping the compressed layout until the first forward."""
    reference = reference_output(model, inputs)
    [(got, quantized)] = run_without_lowbit([Job(folder, inputs, is_causal_lm(model), dequantize)])
    if not dequantize and quantized < expect_quantized:
        raise ExportError(f"compressed-tensors quantized {quantized} module(s) of {folder}; the export holds "
                          f"{expect_quantized} quantized layer(s)")
    return agreement(reference, got, min_cosine=min_cosine, max_abs_rel=max_abs_rel)


def export(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
           echo: Callable[[str], Any] = print, verify_export: bool = True,
           example_inputs: dict[str, torch.Tensor] | None = None, min_cosine: float | None = None,
           max_abs_rel: float | None = None) -> Path:
    """Write the lowbit-quantized transformers model `model` to `directory` as a compressed-tensors folder
    (config.json, model.safetensors, generation config and tokenizer files), check it by loading it in
    transformers + compressed-tensors without lowbit, and return the folder's path.

    example_inputs: keyword inputs of the model for the check (default: a few sentences through `tokenizer`,
    else 4 x 16 random token ids).
    min_cosine, max_abs_rel: the check's bounds, cosine and max |diff| relative to the largest |output|
    (default 0.9999 and 0.02; 0.999 and 0.1 when layers quantize their activations, see above).
    verify_export=False skips the check (when compressed-tensors is not installed)."""
    target = Path(directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError(f"{type(model).__name__} is not a Hugging Face transformers model (no config): the "
                          "compressed-tensors format is a transformers folder")
    tensors, groups, floats, embeddings = _convert(model)
    if not groups:
        raise ExportError(f"{type(model).__name__} has no quantized linear layer to write")
    qconfig = quantization_config(groups, floats)
    hf = config.to_dict()
    hf["quantization_config"] = qconfig
    hf["architectures"] = [type(model).__name__]
    hf["dtype"] = str(next((m.float_dtype for m in model.modules() if isinstance(m, QuantModule)),
                           torch.float32)).replace("torch.", "")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if hf.get("tie_word_embeddings") and isinstance(lm_head, QuantModule):
        hf["tie_word_embeddings"] = False  # the head has its own quantized weights now

    target_abs = target.resolve() if target.is_symlink() else target
    _check_target(target_abs)
    target_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_abs.name}.tmp-", dir=target_abs.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata=MARK)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        layers = sum(len(v) for v in groups.values())
        echo(f"compressed-tensors: {layers} quantized linear layer(s) as {qconfig['format']}"
             + (f", {len(embeddings)} quantized embedding(s) written in float (dequantized)" if embeddings else "")
             + (f", {len(floats)} float linear(s)" if floats else ""))
        if verify_export:
            # transformers 5 with compressed-tensors 0.20 sizes a packed zero point as an unpacked one when it
            # lays out a compressed layer, so folders with zero points (theirs as ours) load only with
            # CompressedTensorsConfig(dequantize=True); symmetric ones load either way.
            dequantize = any(not s.symmetric for s in groups)
            acts = any(s.act for s in groups)
            if min_cosine is None:
                min_cosine = MIN_COSINE_INT8_ACTS if acts else MIN_COSINE
            if max_abs_rel is None:
                max_abs_rel = MAX_ABS_REL_INT8_ACTS if acts else MAX_ABS_REL
            agreement = verify(model, tmp, example_inputs or _example_inputs(model, tokenizer), expect_quantized=layers,
                               dequantize=dequantize, min_cosine=min_cosine, max_abs_rel=max_abs_rel)
            how = " (loaded with CompressedTensorsConfig(dequantize=True): asymmetric weights)" if dequantize else ""
            echo(f"verified{how}: {agreement} (bounds: cosine >= {min_cosine}, max |diff| <= {max_abs_rel:g} x "
                 "the largest |output|)")
        set_usual_modes(tmp)  # mkdtemp and safetensors make owner-only files: readable like any other folder
        _check_target(target_abs)  # again: something may have been put there meanwhile
        _install(tmp, target_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def from_checkpoint(checkpoint: Path, out: Path, *, echo: Callable[[str], Any] = print, **options: Any) -> Path:
    """Export the lowbit checkpoint folder `checkpoint` (a transformers model saved by lowbit.save, with its
    tokenizer when it has one) as a compressed-tensors folder `out`."""
    from ..checkpoint import load

    model = load(checkpoint)
    tokenizer = options.pop("tokenizer", None)
    if tokenizer is None and any((Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return export(model, out, tokenizer=tokenizer, echo=echo, **options)

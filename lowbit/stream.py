"""Quantizing a model larger than memory, one block at a time.

The model is built with its parameters on the meta device. Everything outside the repeated blocks
(embeddings, final norm, LM head) is loaded; the calibration data is run up to the first block and its
inputs kept. Then, for each block: its weights are read from the safetensors shards, its linears are
quantized (fitted to the block's inputs for GPTQ/AWQ), the block's outputs become the next block's inputs,
and its quantized tensors are written to the output shards before the block is dropped. Peak memory is
about one float block, its calibration activations and the layers outside the blocks, whatever the
model's depth. The result is an ordinary lowbit checkpoint: lowbit.load reads it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, hf
from .progress import progress_bar
from .quantize import FITTED, Builder, fit_stage, lead_config, plan
from .recipes import LayerRecipe, Recipe, read_recipe
from .safetensors_io import ShardWriter, Source
from .sequential import Stage, capture_inputs, find_blocks, token_mask


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): the many mid-sized tensors of each block otherwise
    leave a fragmented heap that grows block after block (peak resident memory rose ~15 MB per block)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _materialize(root: nn.Module, source: Source, prefix: str, skip: str | None = None) -> None:
    """Load every meta parameter of `root` (qualified names start with `prefix`) from `source`, as fp32;
    tied parameters stay tied. Names under `skip` are left alone."""
    loaded: dict[int, nn.Parameter] = {}
    for name, param in list(root.named_parameters(remove_duplicate=False)):
        full = prefix + name
        if param.device.type != "meta" or (skip and full.startswith(skip)):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        if id(param) not in loaded:
            if full not in source:
                raise ValueError(f"the checkpoint has no tensor {full!r}")
            t = source.get(full).float()
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"tensor {full!r} has shape {tuple(t.shape)}; the model expects {tuple(param.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"tensor {full!r} contains NaN or inf")
            loaded[id(param)] = nn.Parameter(t, requires_grad=False)
        owner._parameters[attr] = loaded[id(param)]


def _largest_input(shapes: dict[str, tuple[int, ...]], name: str):
    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        if name not in shapes or x.numel() > torch.Size(shapes[name]).numel():
            shapes[name] = tuple(x.shape)
    return hook


def quantize_folder(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, *,
                    calibration: Iterable | None = None, exclude: Iterable[str] = (), tokenizer=None,
                    backend: str = "auto", keep_float_if_slower: bool | None = None, shard_bytes: int = 1 << 26,
                    progress: bool = True) -> Path:
    """Quantize the Hugging Face model in folder `src` by `recipe`, block by block, into checkpoint `out`.

    Weight-only recipes (any method) and w8a8-dynamic. GPTQ and AWQ fit the layers inside the blocks to
    `calibration`; layers outside the blocks (the LM head) are rounded to nearest, since fitting them would
    need the whole model at once. Otherwise this is lowbit.quantize's plan and build step: the same layers,
    encodings, ReLU fusions and kernel choice (`backend`, `keep_float_if_slower`), timed at the input
    shapes the calibration data gives the layers, or without it at lowbit.quantize's default rows."""
    recipe = read_recipe(recipe)
    config = lead_config(recipe)
    configs = recipe.configs if isinstance(recipe, LayerRecipe) else [recipe]
    for c in configs:
        if c.act == "static" or c.smooth is not None:
            raise ValueError(f"recipe {c.name} calibrates the whole model at once; block-at-a-time "
                             "quantization takes weight-only recipes and w8a8-dynamic")
        if c.needs_calibration and calibration is None:
            raise ValueError(f"recipe {c.name} fits weights to the layers' inputs: pass calibration data")
    from transformers import AutoConfig

    folder = hf.resolve_model_path(src)
    source = Source(folder)
    model = hf.skeleton_from_config(AutoConfig.from_pretrained(folder, local_files_only=True),
                                    hf.is_causal_lm(folder))
    found = find_blocks(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to quantize one at a time")
    prefix, blocks = found
    inside = f"{prefix}."
    _materialize(model, source, "", skip=inside)
    the_plan = plan(model, recipe, exclude, backend, keep_float_if_slower)  # names only: no float block held
    fitted = bool(the_plan.layers_by(lambda c: c.method in FITTED))
    for name in the_plan.layers:
        if not name.startswith(inside) and the_plan.configs[name].method in FITTED:
            the_plan.configs[name] = dataclasses.replace(the_plan.configs[name], method="rtn")
    block_todo = [[n for n in the_plan.layers if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    calibration = list(calibration) if calibration is not None else None
    calls = capture_inputs(model, blocks[0], calibration) if calibration is not None else None
    masks = [token_mask(b) for b in calibration] if calibration is not None else None
    b = Builder(model, the_plan)

    def fill(tmp: Path) -> dict:
        writer = ShardWriter(tmp, shard_bytes)
        entries: dict[str, dict] = {}
        bar = progress_bar(range(len(blocks)), desc=f"{config.name if recipe is config else 'per-layer recipe'} block", unit="block", disable=not progress)
        nonlocal calls
        for i in bar:
            block_name = f"{prefix}.{i}"
            block = blocks[i]
            _materialize(block, source, block_name + ".")
            names = block_todo[i]
            floats = b.to_torch_layout(names)
            stage = Stage(block, calls, block_name, masks) if calls is not None else None
            if fitted:
                fit_stage(b, stage, names)
            if stage is not None:  # the block's outputs for the next, and its layers' input shapes on the way
                hooks = [(b.model.get_submodule(n), _largest_input(b.shapes, n)) for n in names]
                if i + 1 < len(blocks):
                    calls = stage.next_calls(hooks)
                else:
                    stage.run(hooks)
            for name in names:
                b.install(name, floats[name])
            b.fuse_relus(block_name + ".")
            for name, t in block.state_dict().items():
                writer.add(f"{block_name}.{name}", t)
            entries.update(checkpoint.layer_entries(block, block_name + "."))
            b.forget(names)
            blocks[i] = nn.Module()  # drop the block: its tensors are in the writer or on disk
            del block, stage, floats
            _release_free_memory()
        bar.close()
        rest = [n for n in the_plan.layers if not n.startswith(inside)]
        floats = b.to_torch_layout(rest)
        for name in rest:
            b.install(name, floats[name])
        quantized = b.finish(stacklevel=5)  # finish < fill < commit < quantize_folder < caller
        for name, t in quantized.state_dict().items():
            if not name.startswith(inside):
                writer.add(name, t)
        writer.flush()
        entries.update({n: e for n, e in checkpoint.layer_entries(quantized).items() if not n.startswith(inside)})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = [checkpoint.file_entry(tmp / f) for f in writer.files]
        manifest = checkpoint.manifest_for(quantized, entries, {"files": files}, recipe=recipe)
        manifest["source"] = {"bytes": source.nbytes, "blocks": len(blocks), "block_at_a_time": True}
        return manifest

    return checkpoint.commit(out, fill)


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size of a Hugging Face folder's safetensors weights (0 if it has none)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        return sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    single = folder / "model.safetensors"
    return single.stat().st_size if single.is_file() else 0

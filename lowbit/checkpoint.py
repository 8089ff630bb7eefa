"""The checkpoint: one safetensors file of tensors plus a JSON manifest that says how to rebuild.

Layout of a checkpoint directory:
    lowbit.json         manifest: format version, recipe, per-layer spec, model class and config,
                        sha256 and size of each tensor file
    model.safetensors   packed codes, scales, zero points, codebooks, and every float tensor left
                        (or model-00001.safetensors, ... when written block by block, see lowbit.stream)
    (tokenizer files)   when the model came with a tokenizer

Writes go to a temporary directory beside the target, renamed into place at the end, so a crash never
leaves a half-written checkpoint. Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import attention, hf_quantizer, layers
from .files import set_usual_modes
from .recipes import recipe_fields, recipe_from_fields
from .version import FORMAT_VERSION

MANIFEST = "lowbit.json"
TENSORS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_entry(model: nn.Module) -> dict:
    entry = {"class": type(model).__name__, "module": type(model).__module__}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        entry["hf_config"] = config.to_dict()
        # The lowbit quantization_config repeats the manifest's layers: the manifest is what load reads.
        if hf_quantizer.is_lowbit_config(entry["hf_config"].get("quantization_config")):
            del entry["hf_config"]["quantization_config"]
        entry["hf_config_class"] = type(config).__name__
    return entry


def layer_entries(model: nn.Module, prefix: str = "") -> dict[str, dict]:
    """Manifest entries of the quantized layers (and fused ReLUs, folded-away modules) in `model`, named
    under `prefix`: every module of a kind lowbit.layers saves."""
    return {f"{prefix}{name}": layers.layer_entry(m) for name, m in model.named_modules()
            if layers.saved_kind(m) is not None}


def file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def tensor_bytes(manifest: dict) -> int:
    """Total size of a checkpoint's tensor files."""
    info = manifest["tensors"]
    return sum(f["bytes"] for f in info["files"]) if "files" in info else info["bytes"]


def _is_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a lowbit manifest (of any format version: old checkpoints are replaced too)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON (JSONDecodeError and UnicodeDecodeError)
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "lowbit"


def _check_target(target: Path) -> None:
    """Refuse to save where the swap into place would throw away something lowbit did not write: only a
    missing path, an empty directory or a lowbit checkpoint can be replaced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {target}: it is an existing file, not a checkpoint "
                              "directory; choose another path or remove the file")
    if not _is_checkpoint(target) and any(target.iterdir()):
        raise FileExistsError(f"cannot save a checkpoint to {target}: it is a non-empty directory that is not a "
                              f"lowbit checkpoint (no {MANIFEST}); saving would delete its contents, so choose "
                              "another path or empty it")


_BACKUP_SUFFIX = ".old-"


def _backup_path(target: Path) -> Path:
    """A free sibling name for the old checkpoint while the new one is renamed into place. Not hidden: if
    the process dies between the two renames, the old checkpoint stays there, in plain sight."""
    base = f"{target.name}{_BACKUP_SUFFIX}{os.getpid()}"
    path, n = target.with_name(base), 1
    while os.path.lexists(path):
        path, n = target.with_name(f"{base}-{n}"), n + 1
    return path


def _warn_stale_backups(target: Path) -> None:
    """Point at old checkpoints left beside `target` by a save whose process died between its two renames."""
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f"{glob.escape(target.name)}{_BACKUP_SUFFIX}*"):
        pid = path.name[len(target.name) + len(_BACKUP_SUFFIX):].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)) or not _is_checkpoint(path):
            continue  # another process's save in progress, or not ours
        warnings.warn(f"{path} holds the checkpoint an interrupted save moved aside from {target}; lowbit "
                      "leaves it there: move it back or delete it", stacklevel=4)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux RENAME_EXCHANGE), so no crash can leave neither in place.
    False where the system or file system cannot; the call is atomic, so then nothing has moved."""
    fn = _renameat2()
    at_fdcwd, rename_exchange = -100, 2
    return fn is not None and fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _install(tmp: Path, target: Path) -> None:
    """Move the complete directory `tmp` to `target`, replacing what is there (checked by _check_target)."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoint, now at the temporary name
        return
    # Two renames: between them the old checkpoint is only at the backup path.
    backup = _backup_path(target)
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.replace(backup, target)
        except OSError:
            raise OSError(f"saving to {target} failed ({e}) and the previous checkpoint could not be moved "
                          f"back: it is kept at {backup}") from e
        raise
    shutil.rmtree(backup, ignore_errors=True)


def commit(target: str | os.PathLike, fill) -> Path:
    """Write a checkpoint directory atomically: `fill(tmp)` writes the tensor files into a temporary
    directory beside `target` and returns the manifest; the directory is renamed into place at the end.

    `target` may be missing, an empty directory or a lowbit checkpoint (replaced whole); anything else is
    refused with FileExistsError before anything is written. A symbolic link is followed.
    """
    target = Path(target)
    path = target.resolve() if target.is_symlink() else target
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _warn_stale_backups(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        manifest = fill(tmp)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
        set_usual_modes(tmp)  # mkdtemp and safetensors create owner-only files: readable like any other
        _check_target(path)  # again: something may have been put there while fill ran
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def manifest_for(model: nn.Module, layers: dict, tensors: dict, recipe=None) -> dict:
    recipe = recipe if recipe is not None else getattr(model, "lowbit_recipe", None)
    return {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        **recipe_fields(recipe),
        "model": _model_entry(model),
        "layers": layers,
        "float_layers": list(getattr(model, "lowbit_float_layers", [])),
        "slower_layers": list(getattr(model, "lowbit_slower_layers", [])),
        "unquantized_layers": list(getattr(model, "lowbit_unquantized_layers", [])),
        "tensors": tensors,
    }


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def save(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
         nested: bool | tuple[int, ...] = False) -> Path:
    """Write `model` (quantized by lowbit.quantize, or partly float) to `directory`, atomically.

    nested: store the weight-only integer layers as bit planes, loadable at lower widths
    (lowbit.nested; True: 8, 4, 3 and 2 bits up to each layer's own; or a tuple of widths). Such a
    checkpoint also records each tensor's sha256, so a load at a lower width reads and checks only the
    tensors it needs."""
    entries = layer_entries(model)
    tensors = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; nothing to save")
        key = t.untyped_storage().data_ptr() if t.numel() else -len(tensors) - 1
        # safetensors refuses shared storage (tied weights): each name gets its own copy.
        tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen[key] = name
    digests = None
    if nested:
        from . import nested as nest

        widths = nest.WIDTHS if nested is True else tuple(nested)
        layers_done = 0
        for name, mod in model.named_modules():
            if not nest.eligible(mod):
                continue
            extra, record = nest.nested_tensors(name, mod, widths)
            prefix = f"{name}." if name else ""
            for k in [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]]:
                del tensors[k]
            tensors.update(extra)
            entries[name]["nested"] = record
            layers_done += 1
        if not layers_done:
            raise ValueError("nested=True: the model has no weight-only integer layer to store as bit planes")
        digests = {k: _tensor_sha256(t) for k, t in tensors.items()}

    def fill(tmp: Path) -> dict:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "lowbit"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest = manifest_for(model, entries, file_entry(tmp / TENSORS))
        if digests is not None:
            manifest["tensor_sha256"] = digests
        return manifest

    return commit(directory, fill)


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a lowbit checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise CheckpointError(f"{path} is not a lowbit manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('format_version')}; "
                              f"this lowbit reads version {FORMAT_VERSION}")
    return manifest


def _read_tensors(directory: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    info = manifest["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    for entry in info.get("files", [info]):
        path = directory / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, the manifest says {entry['bytes']}")
        if verify and _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} is corrupt or was modified: its sha256 does not match the manifest")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
    return tensors


def _skeleton(entry: dict) -> nn.Module:
    """An empty model of the saved class, built from the saved Hugging Face config; its parameters are on
    the meta device (no memory, no random init) until the saved tensors are assigned."""
    if "hf_config" not in entry:
        raise CheckpointError(f"the checkpoint holds a {entry['class']}, not a Hugging Face model: "
                              "pass the float model as lowbit.load(directory, model=...)")
    import transformers  # only named attributes of transformers are looked up: no arbitrary import

    config_cls = getattr(transformers, entry["hf_config_class"], None)
    model_cls = getattr(transformers, entry["class"], None)
    if config_cls is None or model_cls is None:
        raise CheckpointError(f"transformers {transformers.__version__} has no {entry['class']}")
    config = config_cls.from_dict(entry["hf_config"])
    from .hf import params_on_meta

    with params_on_meta():
        return model_cls(config)


def _read_nested(directory: Path, manifest: dict, verify: bool, bits: int | None) -> tuple[dict, int]:
    """The tensors a load at `bits` needs from a nested checkpoint (all but the nested layers' planes and
    scales beyond that width), each checked against its sha256; and the bytes read."""
    from safetensors import safe_open

    from . import nested as nest

    info = manifest["tensors"]
    files = info.get("files", [info])
    skip: set[str] = set()
    want: set[str] = set()
    for name, entry in manifest["layers"].items():
        record = entry.get("nested")
        if record is None:
            continue
        need = nest.needed(name, record, bits)
        want.update(need)
        prefix = f"{name}." if name else ""
        skip.update(f"{prefix}plane{i}" for i in range(record["bits"]))
        skip.update(f"{prefix}{k}{b}" for b in record["widths"] for k in ("scale", "zero_point"))
    digests = manifest.get("tensor_sha256", {})
    tensors, nbytes = {}, 0
    for entry in files:
        path = directory / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {path.stat().st_size} bytes, the manifest says "
                                  f"{entry['bytes']}")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # (a safe_open handle is not iterable)
                for key in names:
                    if key in skip and key not in want:
                        continue
                    t = f.get_tensor(key)
                    nbytes += t.numel() * t.element_size()
                    if verify and _tensor_sha256(t) != digests.get(key):
                        raise CheckpointError(f"{path}: tensor {key!r} is corrupt or was modified (its sha256 "
                                              "does not match the manifest)")
                    tensors[key] = t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
    missing = sorted(want - set(tensors))
    if missing:
        raise CheckpointError(f"{directory}: tensors missing for this width: {', '.join(missing[:5])}")
    return tensors, nbytes


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True,
         bits: int | None = None) -> nn.Module:
    """Rebuild a quantized model saved by lowbit.save.

    For a Hugging Face model the saved config is enough; for any other model pass a float instance of
    the same architecture as `model` (its weights are replaced). `verify` checks the tensor file's sha256.
    bits: for a checkpoint saved with nested=True, the width to load its nested layers at (8, 4, 3, 2, up
    to each layer's own; None: as saved): only those bytes are read (model.lowbit_nested says how many).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    entries = manifest["layers"]
    is_nested = any("nested" in e for e in entries.values())
    if bits is not None and not is_nested:
        raise CheckpointError(f"{directory} was not saved nested (lowbit.save(..., nested=True)): it loads only "
                              "at the width it was saved in; drop bits=")
    read_bytes = None
    if is_nested:
        try:
            tensors, read_bytes = _read_nested(directory, manifest, verify, bits)
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{directory}: {e}") from None
    else:
        tensors = _read_tensors(directory, manifest, verify)
    if model is None:
        # A checkpoint of one quantized layer (the model itself was the layer) needs no skeleton.
        model = nn.Module() if "" in entries else _skeleton(manifest["model"])
    for name, entry in entries.items():
        prefix = name + "." if name else ""
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        try:
            if "nested" in entry:
                from . import nested as nest

                new = nest.rebuild(name, entry, entry["nested"], tensors, bits)
                for k in state:
                    del tensors[prefix + k]
                tensors.update({prefix + k: v for k, v in new.state_dict().items()})
            else:
                new = layers.rebuild(name, entry, state)
            if name:
                layers.set_child(model, name, new)
            else:
                model = new
        except (KeyError, RuntimeError, ValueError, AttributeError, TypeError) as e:
            raise CheckpointError(f"layer {name!r} cannot be rebuilt from {directory}: {e}") from None
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory} does not match the model: {e}") from None
    model.lowbit_float_layers = manifest.get("float_layers", [])
    model.lowbit_slower_layers = manifest.get("slower_layers", [])
    model.lowbit_unquantized_layers = manifest.get("unquantized_layers", [])
    try:
        recipe = recipe_from_fields(manifest)
    except ValueError as e:
        raise CheckpointError(f"{directory / MANIFEST}: {e}") from None
    if recipe is not None:
        if bits is not None:
            from . import nested as nest
            from .recipes import QuantConfig

            if isinstance(recipe, QuantConfig) and recipe.kind == "int" and recipe.act is None and bits < recipe.bits:
                recipe = nest.width_config(recipe, bits)
        model.lowbit_recipe = recipe
        attention.apply(model, recipe.attention)
    if read_bytes is not None:
        model.lowbit_nested = {"bits": bits, "bytes_read": read_bytes,
                               "bytes_stored": sum(f["bytes"] for f in manifest["tensors"].get(
                                   "files", [manifest["tensors"]]))}
    hf_quantizer.attach(model)  # a transformers model: save_pretrained writes it as lowbit-quantized
    return model.eval()

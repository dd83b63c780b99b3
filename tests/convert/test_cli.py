"""`mm-convert` end to end through `launch.convert.main`: both subcommands, shard size, exit status on error."""

import json

import numpy as np
import pytest
import torch

from launch.convert import main, parse_size
from mm.checkpoints.safetensors_io import INDEX_FILE
from tests.helpers.hf_models import load_hf, make_model


def test_hf_to_mm_to_hf_via_cli_loads_in_transformers(tmp_path, capsys):
    src = make_model(tmp_path, "llama-llama3", dtype=torch.bfloat16, tokenizer=True)
    mm, hf = tmp_path / "mm", tmp_path / "hf"
    assert main(["hf-to-mm", "--src", str(src), "--dst", str(mm), "--dtype", "float32", "--no-progress"]) == 0
    assert json.loads((mm / "mm_config.json").read_text())["llm"]["param_dtype"] == "float32"
    assert main(["mm-to-hf", "--src", str(mm), "--dst", str(hf), "--dtype", "bfloat16", "--shard-size", "100KB",
                 "--no-progress"]) == 0
    assert (hf / INDEX_FILE).exists() and (hf / "tokenizer.json").exists()
    assert f"wrote {hf}" in capsys.readouterr().out
    ids = torch.tensor(np.random.RandomState(1).randint(0, 128, (1, 64)))
    with torch.no_grad():
        a, b = load_hf(src, torch.bfloat16)(ids).logits, load_hf(hf, torch.bfloat16)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cli_errors_exit_2_with_the_reason(tmp_path, capsys):
    src = make_model(tmp_path, "qwen2-tied")
    dst = tmp_path / "mm"
    dst.mkdir()
    assert main(["hf-to-mm", "--src", str(src), "--dst", str(dst), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["hf-to-mm", "--src", str(src), "--dst", str(dst), "--overwrite", "--no-progress"]) == 0
    assert main(["mm-to-hf", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "mm_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["hf-to-mm", "--src", str(src), "--dst", str(dst), "--dtype", "int8"])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000

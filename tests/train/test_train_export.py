"""`mm.train.export`: a finished run -> an mm directory `mm.from_pretrained` loads; `init.vision_checkpoint`."""

from __future__ import annotations

import numpy as np
import pytest

from mm.config import ConfigError
from mm.data.synthetic import write_llava_dataset
from tests.train.helpers_train import tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mm.tiny import train_tokenizer

    d = tmp_path_factory.mktemp("export")
    path, root = write_llava_dataset(str(d), 16, seed=2, min_side=16, max_side=40, text_only=0.5)
    tok = train_tokenizer(240)
    tok.save_pretrained(str(d / "tok"))
    return path, root, str(d / "tok"), len(tok)


def _cfg(data, kind="llm"):
    path, root, tok, vocab = data
    c = tiny("full")
    c.model.llm.vocab_size = 320
    c.model.kind = kind
    c.data.update(dict(kind="llava_json", path=path, image_root=root, tokenizer=tok, template="chat"))
    c.train.update(dict(steps=3, batch_size=2, seq_len=64))
    c.checkpoint.update(dict(every=0, use_async=False))
    if kind != "llm":
        c.param_groups = [("(projector|llm)/.*", 1.0), ("vision/.*", "frozen")]
    return c


def test_llm_run_exports_exactly_what_it_trained(data, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    import mm
    from mm.train import param_groups as pg
    from mm.train.export import export_run
    from mm.train.loop import train

    res = train(_cfg(data), tmp_path / "run", devices=jax.devices()[:1])
    assert sorted(res.losses) == [1, 2, 3]
    # rows with images are skipped (a plain LLM trains on text-only rows)
    h = mm.from_pretrained(export_run(tmp_path / "run", tmp_path / "out"))
    assert h.tokenizer is not None and h.config.hidden_size == 32
    with ocp.PyTreeCheckpointer() as ck:
        raw = ck.restore(tmp_path / "run" / "checkpoints" / "3" / "state")
    saved = pg.flatten(raw["params"])
    got = pg.flatten(jax.tree.map(np.asarray, h.params))
    assert set(saved) == set(got)
    for k in saved:
        assert np.array_equal(np.asarray(saved[k]), got[k]), k
    with pytest.raises(Exception, match="already exists"):
        export_run(tmp_path / "run", tmp_path / "out")
    from launch.convert import main as convert_main  # the CLI: mm-convert export-run

    assert convert_main(["export-run", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "cli"), "--step", "3"]) == 0
    assert mm.from_pretrained(tmp_path / "cli").config == h.config
    assert convert_main(["export-run", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "x"), "--step", "2"]) == 2


def test_export_errors_name_the_problem(data, tmp_path):
    from mm.train.export import export_run

    with pytest.raises(ConfigError, match="no config.json"):
        export_run(tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    from mm.train import config as tcfg

    (tmp_path / "empty" / "config.json").write_text(tcfg.to_json(_cfg(data)))
    with pytest.raises(ConfigError, match="no finished training checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_vision_checkpoint_loads_and_mismatches_name_the_field(data, tmp_path):
    import jax
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mm.convert.hf_vision import load_hf_vision
    from mm.train import config as tcfg
    from mm.train import param_groups as pg
    from mm.train.from_checkpoints import vision_section
    from mm.train.loop import build

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     image_size=28, patch_size=14)).save_pretrained(str(tmp_path / "clip"))
    c = _cfg(data, "llava")
    c.model.vision = vision_section(tmp_path / "clip")
    c.init.vision_checkpoint = str(tmp_path / "clip")
    b = build(c, log=False, devices=jax.devices()[:1])
    _, want = load_hf_vision(tmp_path / "clip")
    got = pg.flatten(b.frozen)
    for k, v in pg.flatten(want).items():
        assert np.array_equal(np.asarray(got[f"vision/{k}"]), v), k
    c.model.vision.num_layers = 3
    with pytest.raises(ConfigError, match="init.vision_checkpoint.*num_layers"):
        build(c, log=False, devices=jax.devices()[:1])
    c = _cfg(data, "llm")
    c.init.vision_checkpoint = str(tmp_path / "clip")
    with pytest.raises(ConfigError, match="init.vision_checkpoint"):
        tcfg.validate(c)

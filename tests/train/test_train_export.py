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

    run = str(tmp_path / "run")
    assert convert_main(["export-run", "--src", run, "--dst", str(tmp_path / "cli"), "--step", "3"]) == 0
    assert mm.from_pretrained(tmp_path / "cli").config == h.config
    assert convert_main(["export-run", "--src", run, "--dst", str(tmp_path / "x"), "--step", "2"]) == 2


def test_export_errors_name_the_problem(data, tmp_path):
    from mm.train.export import export_run

    with pytest.raises(ConfigError, match="no config.json"):
        export_run(tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    from mm.train import schema as tcfg

    (tmp_path / "empty" / "config.json").write_text(tcfg.to_json(_cfg(data)))
    with pytest.raises(ConfigError, match="no finished training checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_vision_checkpoint_loads_and_mismatches_name_the_field(data, tmp_path):
    import jax
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mm.convert.registry import load
    from mm.train import schema as tcfg
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
    _, want = load(tmp_path / "clip")
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


@pytest.mark.parametrize("kind", ["iaa", "llava"])
def test_vlm_export_logits_equal_the_trained_model(data, tmp_path, kind):
    """An iaa / llava run on pixel data exports to an mm "vlm" dir whose `VLMHandle` (one placeholder per
    image, expanded by the handle; pixels through the exported ViT) gives the training model's logits."""
    import jax
    import jax.numpy as jnp

    import mm
    from mm.models import iaa, llava
    from mm.train import models
    from mm.train.schema import vision_config_from
    from mm.train.export import export_run, trained_params
    from mm.train.loop import train

    c = _cfg(data, kind)
    if kind == "iaa":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/.*", 1.0), ("(base|vision)/.*", "frozen")]
    train(c, tmp_path / "run", devices=jax.devices()[:1])
    h = mm.from_pretrained(export_run(tmp_path / "run", tmp_path / "out"))
    assert h.config.is_iaa == (kind == "iaa") and h.tokenizer is not None
    cfg, params, _ = trained_params(tmp_path / "run")

    n_img = h.config.tokens_per_image
    prompt = [0, 2, 10, 11, h.image_token, 12, 13, 14]
    pixels = np.random.default_rng(0).standard_normal((1, 1, 3, 28, 28)).astype(np.float32)
    got = h.logits([prompt], pixel_values=pixels, workflow="mm")

    ids = np.asarray([prompt[:4] + [h.image_token] * n_img + prompt[5:]], np.int32)
    mask = np.zeros_like(ids, bool)
    mask[0, 4:4 + n_img] = True
    feats = models.tile_features(vision_config_from(cfg), int(cfg.model.vision_select_layer))(
        params["vision"], jnp.asarray(pixels))
    lm = {k: v for k, v in params.items() if k != "vision"}
    pos = jnp.arange(ids.shape[1])[None]
    if kind == "iaa":
        want = iaa.IAA(models.iaa_config(cfg)).apply({"params": lm}, ids, pos, workflow="mm", image_features=feats,
                                                     image_mask=mask)[0]
    else:
        want = llava.LLaVA(models.llava_config(cfg)).apply({"params": lm}, ids, pos, image_features=feats,
                                                           image_mask=mask)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    assert np.abs(got - h.logits([prompt], pixel_values=pixels * 0.0, workflow="mm")).max() > 1e-4  # pixels matter


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-tied"])
def test_llm_section_reads_hf_and_mm_dirs(tmp_path, family):
    from mm.convert.registry import hf_to_mm
    from mm.train import schema as tcfg
    from mm.train.from_checkpoints import llm_section
    from tests.helpers.hf_models import make_model

    hf = make_model(tmp_path, family)
    sec = llm_section(hf)
    c = tiny("full")
    c.model.llm = sec
    got = tcfg.llm_config_from(c)
    assert got.model_type == family.split("-")[0] and got.num_layers == 2 and got.hidden_size == 64
    assert got.tie_word_embeddings == (family == "qwen2-tied") and got.attention_bias == (family == "qwen2-tied")
    assert llm_section(hf_to_mm(hf, tmp_path / "mm", progress=False)) == sec
    with pytest.raises(ConfigError, match="neither"):
        llm_section(tmp_path)


def test_vision_section_reads_siglip(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from mm.train.from_checkpoints import vision_section

    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)).save_pretrained(
        str(tmp_path / "siglip"))
    sec = vision_section(tmp_path / "siglip")
    assert sec["model_type"] == "siglip_vision_model" and sec["num_layers"] == 2 and sec["patch_size"] == 14

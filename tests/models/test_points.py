"""POINTS (DESIGN.md section 4) as the `vlm` kind with an OCR tower and pixel shuffle, checked against the same
model composed from transformers parts: two `CLIPVisionModel`s (penultimate hidden state, class token dropped),
pixel shuffle and the projector written in torch from DESIGN's formulas, `LlamaForCausalLM` fed `inputs_embeds`;
the prompt carries two CATTY-tiled images of different aspect ratios."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from mm.config import ConfigError, LLaVAConfig, ProjectorConfig, VisionConfig, VLMConfig
from mm.convert import registry
from mm.data import images as img_lib
from mm.models import kinds
from mm.models.splice import expand_placeholders

PH = 5  # image placeholder id
TILE = 28  # the tiny towers' image size: 4x4 patches of 7 -> 2x2 positions of 4C after the shuffle
W = 0.3  # not the release's 0.5, so swapping the towers shows


def _clip(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=TILE, patch_size=7)).eval()
    with torch.no_grad():  # HF initialises norms to ones and biases to zeros, which would hide a mis-mapped one
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return m


def _torch_shuffle(x: torch.Tensor) -> torch.Tensor:
    """DESIGN.md: out[i, j, (2m+k)*C + c] = x[2i+m, 2j+k, c] over an h x w patch grid."""
    n, t, c = x.shape
    h = w = int(round(t ** 0.5))
    return x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, t // 4, 4 * c)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.helpers.hf_models import _randomise, llama_config, save_model

    d = tmp_path_factory.mktemp("points")
    general, ocr = _clip(0), _clip(1)
    general.save_pretrained(str(d / "general"))
    ocr.save_pretrained(str(d / "ocr"))
    torch.manual_seed(2)
    lm = LlamaForCausalLM(llama_config("gqa", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=2)).eval()
    _randomise(lm, 2)
    save_model(lm, d / "llama")
    torch.manual_seed(3)
    proj = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)).eval()
    return d, general, ocr, lm, proj


def _mm_model(d, proj, merge=(W, 1 - W), ocr=True):
    gc, gp = registry.load(d / "general")
    oc, op = registry.load(d / "ocr")
    lc, lp = registry.load(d / "llama")
    pc = ProjectorConfig(in_dim=4 * gc.hidden_size, out_dim=lc.hidden_size, merge=merge)
    cfg = VLMConfig(vision=gc, lm=LLaVAConfig(llm=lc, projector=pc), image_token_id=PH,
                    ocr_vision=oc if ocr else None, pixel_shuffle=True)
    params = {"vision": gp, "llm": lp, "projector": {
        f"linear_{k}": {"kernel": proj[2 * k].weight.detach().numpy().T, "bias": proj[2 * k].bias.detach().numpy()}
        for k in range(2)}}
    if ocr:
        params["ocr_vision"] = op
    return cfg, params


def _prompt():
    """Two CATTY-tiled images (wide and tall: different grids), their tiles + thumbnails in order, and the prompt
    with each placeholder expanded to (tiles + 1) * 4 positions."""
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (40, 90, 3), np.uint8)),  # 90x40: wide
            Image.fromarray(rng.integers(0, 255, (75, 30, 3), np.uint8))]  # 30x75: tall
    tiles = [img_lib.catty(p, img_lib.ProcessorConfig.clip(TILE), tile=TILE) for p in pics]
    assert tiles[0].grid != tiles[1].grid
    ids, mask = expand_placeholders([1, 9, PH, 11, 12, PH, 13, 14], PH, [len(t.pixel_values) * 4 for t in tiles])
    return ids, mask, tiles


def _reference(parts, ids, mask, tiles, w=W):
    _, general, ocr, lm, proj = parts
    feats = []
    with torch.no_grad():
        for t in tiles:
            px = torch.tensor(t.pixel_values)
            g = proj(_torch_shuffle(general(px, output_hidden_states=True).hidden_states[-2][:, 1:]))
            o = proj(_torch_shuffle(ocr(px, output_hidden_states=True).hidden_states[-2][:, 1:]))
            feats.append((w * g + (1 - w) * o).reshape(-1, g.shape[-1]))
        x = lm.get_input_embeddings()(torch.tensor([ids]))
        x[0, torch.tensor(mask)] = torch.cat(feats)
        return lm(inputs_embeds=x).logits[0].numpy()


def test_points_logits_match_transformers_parts(parts):
    cfg, params = _mm_model(parts[0], parts[4])
    ids, mask, tiles = _prompt()
    assert len(ids) == 8 - 2 + sum(4 * len(t.pixel_values) for t in tiles)
    pix = np.concatenate([t.pixel_values for t in tiles])[None]  # [1, all tiles, 3, T, T]
    model = kinds.of(cfg)
    got = np.asarray(jax.jit(lambda p, i, x: model.apply(p, i, workflow="mm", pixel_values=x)[0])(
        params, np.asarray([ids]), pix))[0]
    ref = _reference(parts, ids, mask, tiles)
    diff = float(np.abs(got - ref).max())
    print(f"POINTS parity: max |logits(mm) - logits(transformers parts)| = {diff:.3g}")
    assert diff <= 1e-4, diff
    # the merge is after the projector: w = 1 is the general tower alone, i.e. the single-ViT model
    one_cfg, one_params = _mm_model(parts[0], parts[4], merge=(), ocr=False)
    one = np.asarray(kinds.of(one_cfg).apply(one_params, np.asarray([ids]), workflow="mm", pixel_values=pix)[0])[0]
    assert float(np.abs(one - _reference(parts, ids, mask, tiles, w=1.0)).max()) <= 1e-4
    assert set(kinds.of(one_cfg).abstract_params()) == {"vision", "llm", "projector"}


def test_points_params_and_activations_have_logical_axes(parts):
    cfg, _ = _mm_model(parts[0], parts[4])
    abstract = kinds.of(cfg).abstract_params()
    assert set(abstract) == {"vision", "ocr_vision", "llm", "projector"}
    import flax.linen as nn

    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert cfg.tokens_per_image == 4  # 4x4 patches -> 2x2


def test_points_config_checks(parts):
    cfg, _ = _mm_model(parts[0], parts[4])
    with pytest.raises(ConfigError, match="in_dim"):  # pixel shuffle makes the width 4C
        VLMConfig(vision=cfg.vision, lm=cfg.lm, ocr_vision=cfg.ocr_vision)
    with pytest.raises(ConfigError, match="merge"):  # two towers need (w, 1 - w)
        VLMConfig(vision=cfg.vision, lm=LLaVAConfig(llm=cfg.lm.llm, projector=ProjectorConfig(in_dim=64, out_dim=32)),
                  pixel_shuffle=True, ocr_vision=cfg.ocr_vision)
    with pytest.raises(ConfigError, match="num_layers"):
        VLMConfig(vision=cfg.vision, lm=cfg.lm, pixel_shuffle=True, ocr_vision=cfg.vision.replace(num_layers=2))
    with pytest.raises(ConfigError, match="merge"):
        ProjectorConfig(in_dim=64, out_dim=32, merge=(1.5, -0.5))


def test_tokens_per_image_at_1920x1080():
    """A 1920x1080 image at release shapes: CATTY 4x2 tiles + thumbnail, 144 positions each with pixel shuffle
    (1296), 576 without (5184)."""
    from mm.data.tiling import catty_plan
    from mm.train import presets

    vc = VisionConfig(**presets.CLIP_VIT_L_336)
    lm = LLaVAConfig(llm=LLaVAConfig().llm, projector=ProjectorConfig(in_dim=4096, out_dim=4096, merge=(0.5, 0.5)))
    plan = catty_plan(1920, 1080, 336, 8, True)
    assert plan.grid == (4, 2) and plan.num_images == 9
    shuffled = VLMConfig(vision=vc, lm=lm, ocr_vision=vc, pixel_shuffle=True).tokens_per_image * plan.num_images
    plain = VLMConfig(vision=vc, lm=LLaVAConfig(llm=lm.llm, projector=ProjectorConfig(in_dim=1024))).tokens_per_image
    assert (shuffled, plain * plan.num_images) == (1296, 5184)


def test_points_mm_dir_handle_tiles_images_itself(parts, tmp_path):
    """The model saved as an mm `vlm` dir, loaded sharded (`mesh=`): the handle cuts PIL images / paths into the
    same CATTY tiles as the data pipeline, its logits match the transformers composition, and text comes out."""
    import dataclasses

    import mm
    from mm.sharding import make_mesh
    from tests.helpers.tokenizer import make_tokenizer

    cfg, params = _mm_model(parts[0], parts[4])
    cfg = dataclasses.replace(cfg, image_token_id=4, tiling="catty")  # the test tokenizer's `<image>`
    make_tokenizer(128).save_pretrained(str(tmp_path / "tok"))
    out = registry.save("vlm", cfg, params, tmp_path / "points", tokenizer_dir=tmp_path / "tok")
    h = mm.from_pretrained(out, mesh=make_mesh({"fsdp": -1, "tensor": 2}))
    assert h.config == cfg and set(h.params) == {"vision", "ocr_vision", "llm", "projector"}

    ids, mask, tiles = _prompt()
    rng = np.random.default_rng(0)  # the images of `_prompt`
    pics = [Image.fromarray(rng.integers(0, 255, (40, 90, 3), np.uint8)),
            Image.fromarray(rng.integers(0, 255, (75, 30, 3), np.uint8))]
    pics[1].save(tmp_path / "tall.png")
    pix, counts = h.tile([pics[0], tmp_path / "tall.png"])
    assert counts == [len(t.pixel_values) for t in tiles]
    np.testing.assert_array_equal(pix, np.concatenate([t.pixel_values for t in tiles]))
    prompt = [1, 9, 4, 11, 12, 4, 13, 14]
    got = h.logits([prompt], pixel_values=[pix], image_tiles=[counts])[0]
    ref = _reference(parts, [4 if m else t for t, m in zip(ids, mask)], mask, tiles)
    assert float(np.abs(got - ref).max()) <= 1e-4
    first = h.generate([prompt], pixel_values=[pix], image_tiles=[counts], max_new_tokens=1)[0, 0]
    assert first == int(np.argmax(ref[-1]))
    text = h.generate_text("<image> describe <image>", [pics[0], tmp_path / "tall.png"], max_new_tokens=4)
    assert isinstance(text, str)

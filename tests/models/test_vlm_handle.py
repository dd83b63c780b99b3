"""`mm.from_pretrained` for VLMs and towers: workflows per call, placeholders expanded, pixel inputs, caches."""

import numpy as np
import pytest
import torch

import mm
from mm.config import vlm_config_from_json, vlm_config_to_json
from mm.models import kinds
from tests.helpers.vlm_dirs import PH, tiny_iaa_vlm



@pytest.fixture(scope="module")
def iaa_dir(tmp_path_factory):
    return tiny_iaa_vlm(tmp_path_factory.mktemp("vlm") / "iaa")


def test_mm_vlm_dir_round_trip_and_workflows(iaa_dir):
    d, cfg, params = iaa_dir
    handle = mm.from_pretrained(d)
    assert isinstance(handle, mm.api.VLMHandle) and handle.workflows == ("text", "mm", "g")
    assert vlm_config_from_json(vlm_config_to_json(cfg)) == cfg
    rs = np.random.RandomState(0)
    prompts = [[1, 7, PH, 9, 10, 11], [1, 12, 13, PH, 14, PH, 15]]
    pix = [rs.randn(1, 3, 28, 28).astype(np.float32), rs.randn(2, 3, 28, 28).astype(np.float32)]
    out = handle.logits(prompts, pixel_values=pix, workflow="mm")
    assert out.shape == (2, 7 - 2 + 2 * 4, 64)  # each placeholder became 4 image positions
    # Row 1 alone, expanded by hand, through the plain functions.
    ids = np.array([[1, 12, 13] + [PH] * 4 + [14] + [PH] * 4 + [15]])
    ref, _ = kinds.of(cfg).apply(params, ids, pixel_values=pix[1][None], workflow="mm")
    np.testing.assert_allclose(out[1], np.asarray(ref[0]), atol=1e-5)
    text = handle.logits([[1, 7, 9, 10]], workflow="text")
    plain = mm.api.LLMHandle(config=cfg.lm.llm, params=params["base"]).logits([[1, 7, 9, 10]])
    assert np.array_equal(text, plain)  # the text workflow is the frozen LLM, bit for bit
    with pytest.raises(ValueError, match="no pixel_values"):
        handle.logits(prompts, workflow="mm")
    with pytest.raises(ValueError, match="takes no images"):
        handle.logits(prompts, pixel_values=pix, workflow="text")
    with pytest.raises(ValueError, match="workflow 'x'"):
        handle.logits(prompts, workflow="x")


def test_generate_per_workflow_starts_with_the_logits_argmax(iaa_dir):
    d, cfg, params = iaa_dir
    handle = mm.from_pretrained(d)
    rs = np.random.RandomState(1)
    prompts = [[1, 7, PH, 9], [1, PH, 3, 4, 8]]
    pix = [rs.randn(1, 3, 28, 28).astype(np.float32) for _ in range(2)]
    for wf in ("mm", "g"):
        toks = handle.generate(prompts, pixel_values=pix, workflow=wf, max_new_tokens=3, stop_tokens=())
        first = handle.logits(prompts, pixel_values=pix, workflow=wf)[:, -1].argmax(-1)
        assert toks[:, 0].tolist() == first.tolist()
    toks = handle.generate([[1, 7, 9]], workflow="text", max_new_tokens=2, stop_tokens=())
    assert toks[0, 0] == handle.logits([[1, 7, 9]], workflow="text")[0, -1].argmax()
    assert set(handle._generators) == {"mm", "g", "text"}  # one generator (and cache layout) per workflow


def test_hf_clip_dir_gives_a_vision_handle(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)).eval()
    m.save_pretrained(str(tmp_path / "clip"))
    handle = mm.from_pretrained(tmp_path / "clip")
    pix = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.tensor(pix), output_hidden_states=True)
    got = handle.hidden_states(pix)
    assert len(got) == len(ref.hidden_states) == 3
    assert max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got, ref.hidden_states)) <= 1e-4

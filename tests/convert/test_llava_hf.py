"""LLaVA-style model <-> transformers `LlavaForConditionalGeneration`: import, logits parity, export, round trip."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mm.convert import llava_hf
from mm.convert.registry import load
from mm.checkpoints.errors import ConversionError
from mm.models import kinds
from mm.config import VLMConfig
from tests.helpers.tower_naming import both_namings

IMG = 100  # image token id inside the vocabulary, as HF Llava wants
T = 260


def _hf_model(seed=0):
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=14, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG, image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if ("norm" in n and n.endswith("weight"))
                    else 0.08 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    model = _hf_model()
    model.save_pretrained(str(d))
    return d, model


def _inputs():
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 99, (2, T))
    ids[0, 3:7] = IMG  # row 0: two images (4 tokens each), row 1: one image
    ids[0, 50:54] = IMG
    ids[1, 10:14] = IMG
    pix = rs.randn(3, 3, 28, 28).astype(np.float32)
    mm_pix = np.zeros((2, 2, 3, 28, 28), np.float32)
    mm_pix[0] = pix[:2]
    mm_pix[1, 0] = pix[2]
    return ids, pix, mm_pix


def test_import_matches_transformers_logits(hf):
    d, model = hf
    config, params = load(d)
    assert config.feature == "patch" and config.feature_layer == -2 and config.image_token_id == IMG
    ids, pix, mm_pix = _inputs()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    got, _ = kinds.of(config).apply(params, ids, pixel_values=mm_pix)
    err = float(np.abs(np.asarray(got) - want).max())
    assert err <= 1e-4, err


def test_export_loads_in_transformers_and_round_trips_exactly(hf, tmp_path):
    d, model = hf
    config, params = load(d)
    out = llava_hf.export_llava(config, params, tmp_path / "out")
    back = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    ids, pix, _ = _inputs()
    with torch.no_grad():
        a = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits
        b = back(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits
    assert torch.equal(a, b)
    orig, new = load_file(str(d / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(orig) == set(new) and all(np.array_equal(orig[k], new[k]) for k in orig)


def test_generation_with_images_matches_uncached_argmax(hf):
    d, _ = hf
    config, params = load(d)
    from mm.generate import Generator

    ids, _, mm_pix = _inputs()
    prompt = ids[:1, :60].tolist()
    out, _ = Generator(kinds.of(config).decode_fns("mm")).__call__(params, prompt, max_new_tokens=4,
                                                      extra={"pixel_values": mm_pix[:1]})
    import jax

    # Uncached reference at one fixed length (causal: trailing zeros do not affect earlier positions).
    fwd = jax.jit(lambda p, x, m: kinds.of(config).apply(p, x, pixel_values=mm_pix[:1], image_mask=m)[0])
    seq = list(prompt[0])
    for _ in range(4):
        x = np.zeros((1, 64), np.int64)
        x[0, :len(seq)] = seq
        seq.append(int(np.argmax(fwd(params, x, x == IMG)[0, len(seq) - 1])))
    assert seq[60:] == out[0].tolist()


def test_iaa_configs_have_no_llava_layout():
    from mm.config import LLMConfig, VisionConfig
    from mm.models import iaa
    from mm.config import ProjectorConfig

    llm = LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8)
    proj = ProjectorConfig(in_dim=8, out_dim=16)
    cfg = VLMConfig(vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                                            image_size=28, patch_size=14),
                        lm=iaa.IAAConfig(llm=llm, branches=(iaa.BranchConfig("mm", (0,), proj),)))
    with pytest.raises(ConversionError, match="IAA"):
        llava_hf.llava_name_map(cfg)


def test_tower_with_or_without_the_vision_model_module_imports_the_same(hf, tmp_path):
    """`vision_tower.vision_model.*` (hub, transformers 4) and `vision_tower.*` (transformers >= 5.24) load to
    exactly the same params, which reproduce transformers' logits."""
    from flax.traverse_util import flatten_dict as flatten

    d, model = hf
    dirs = both_namings(d, tmp_path / "named", container="vision_tower.")
    (ca, a), (cb, b) = load(dirs[True]), load(dirs[False])
    assert ca == cb
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb) and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)
    ids, pix, mm_pix = _inputs()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    got, _ = kinds.of(cb).apply(b, ids, pixel_values=mm_pix)
    assert float(np.abs(np.asarray(got) - want).max()) <= 1e-4


@pytest.mark.parametrize("with_module", [True, False])
def test_an_unexpected_tower_tensor_is_named_with_its_file(hf, tmp_path, with_module):
    import re

    from safetensors.numpy import save_file

    d, _ = hf
    out = both_namings(d, tmp_path / "named", container="vision_tower.")[with_module]
    f = out / "model.safetensors"
    tensors = load_file(str(f))
    bogus = "vision_tower." + ("vision_model." if with_module else "") + "encoder.layers.0.self_attn.extra.weight"
    tensors[bogus] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(out))}: unexpected tensors "
                                              rf"\['{re.escape(bogus)} in model\.safetensors'\]"):
        load(out)


def test_cli_round_trip_through_an_mm_vlm_dir(hf, tmp_path):
    import mm
    from launch.convert import main as mm_convert

    d, model = hf
    assert mm_convert(["hf-to-mm", "--src", str(d), "--dst", str(tmp_path / "mm"), "--no-progress"]) == 0
    handle = mm.from_pretrained(tmp_path / "mm")
    ids, pix, _ = _inputs()
    prompts = [[t for i, t in enumerate(r) if not (t == IMG and i > 0 and r[i - 1] == IMG)] for r in ids.tolist()]
    per_row = [pix[:2], pix[2:]]  # one placeholder per image in the prompt; the handle expands it
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    got = handle.logits(prompts, pixel_values=per_row)
    assert float(np.abs(got - want).max()) <= 1e-4
    assert mm_convert(["mm-to-hf", "--src", str(tmp_path / "mm"), "--dst", str(tmp_path / "hf"), "--no-progress"]) == 0
    orig, new = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(orig) == set(new) and all(np.array_equal(orig[k], new[k]) for k in orig)


def test_a_bf16_llava_converts_streamed_and_stays_bf16_both_ways(hf, tmp_path):
    """hf-to-mm / mm-to-hf of a VLM keep each tensor's dtype ("keep"): bf16 in, bf16 in the mm dir and back,
    bit for bit; the mm dir's configs say bfloat16."""
    import json

    import ml_dtypes

    from mm.checkpoints.mm_dir import params_metadata
    from mm.convert.registry import hf_to_mm, mm_to_hf

    _, model = hf
    d = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(d))
    model.to(torch.float32)
    mm_dir = hf_to_mm(d, tmp_path / "mm", progress=False)
    assert {dt for _, dt in params_metadata(mm_dir).values()} == {np.dtype(ml_dtypes.bfloat16)}
    section = json.loads((mm_dir / "mm_config.json").read_text())["vlm"]
    assert section["vision"]["param_dtype"] == "bfloat16" and section["lm"]["llm"]["param_dtype"] == "bfloat16"
    back = mm_to_hf(mm_dir, tmp_path / "back", progress=False)
    orig, new = load_file(str(d / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(orig) == set(new)
    for k in orig:
        assert new[k].dtype == orig[k].dtype and np.array_equal(new[k].view(np.uint16), orig[k].view(np.uint16)), k

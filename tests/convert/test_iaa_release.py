"""The original IAA release layout: a tiny random checkpoint in that layout, a PyTorch reference forward composed
from transformers' Llama decoder layers as DESIGN.md section 2 describes, and mm's import / export of it.

Tensor names and insertion positions are DESIGN.md's literals, written here, not taken from the code under test."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from flax.traverse_util import flatten_dict as flatten

from mm.checkpoints.errors import ConversionError
from mm.convert import iaa_release as rel
from mm.convert import registry
from mm.models import iaa
from tests.helpers.tower_naming import both_namings

# DESIGN.md section 2, literally: IAA-14's insertion positions and the release's branch tensor names.
IAA_14 = (0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31)
RELEASE_NAMES = {
    "mm": dict(embed="model.embed_tokens_condition", layers="model.condition_layers", norm="model.norm_condition",
               head="lm_head_condtion", projector="model.mm_projector"),
    "g": dict(embed="model.embed_tokens_condition_grounding", layers="model.condition_layers_grounding",
              norm="model.norm_condition_grounding", head="lm_head_condtion_grounding",
              projector="model.mm_projector_G"),
}
TOWER_CONTAINER = "model.vision_tower.vision_tower."  # + "vision_model." in the release; without it when re-saved
RELEASE_TOWER = TOWER_CONTAINER + "vision_model."  # by transformers >= 5.24

VIS, T = 64, 260  # vision width 64: one 64-dim head, what the shape-based CLIP config inference assumes
CFG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=32, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager")


def load_release_vlm(d, **options):
    """(config, params, where the tower came from) of a release dir, through the registry."""
    with registry.open_checkpoint(d, **options) as opened:
        config, params = registry.load(opened)
    return config, params, opened.note


class ReleaseReference(torch.nn.Module):
    """The release's model, written from DESIGN.md: frozen Llama + per-branch condition layers etc."""

    def __init__(self):
        super().__init__()
        self.llm = LlamaForCausalLM(CFG).eval()
        self.rotary = LlamaRotaryEmbedding(CFG)
        self.branches = torch.nn.ModuleDict()
        for name in ("mm", "g"):
            b = torch.nn.Module()
            b.embed = torch.nn.Embedding(CFG.vocab_size, CFG.hidden_size)
            b.layers = torch.nn.ModuleList([LlamaDecoderLayer(CFG, layer_idx=k) for k in range(14)])
            b.norm = LlamaRMSNorm(CFG.hidden_size, eps=CFG.rms_norm_eps)
            b.head = torch.nn.Linear(CFG.hidden_size, CFG.vocab_size, bias=False)
            b.projector = torch.nn.Sequential(torch.nn.Linear(VIS, CFG.hidden_size), torch.nn.GELU(),
                                              torch.nn.Linear(CFG.hidden_size, CFG.hidden_size))
            self.branches[name] = b
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if n.endswith("norm.weight")
                        else 0.08 * torch.randn(p.shape, generator=g))

    def state_dict_release(self):
        sd = {k: v for k, v in self.llm.state_dict().items()}
        for name, b in self.branches.items():
            names = RELEASE_NAMES[name]
            sd[f"{names['embed']}.weight"] = b.embed.weight
            for k, layer in enumerate(b.layers):
                for n, v in layer.state_dict().items():
                    sd[f"{names['layers']}.{k}.{n}"] = v
            sd[f"{names['norm']}.weight"] = b.norm.weight
            sd[f"{names['head']}.weight"] = b.head.weight
            for i in (0, 2):  # Sequential(Linear, GELU, Linear): the Linears sit at 0 and 2
                sd[f"{names['projector']}.{i}.weight"] = b.projector[i].weight
                sd[f"{names['projector']}.{i}.bias"] = b.projector[i].bias
        return {k: v.detach().contiguous().clone() for k, v in sd.items()}

    @torch.no_grad()
    def forward(self, ids, workflow, feats=None, image_mask=None):
        if workflow == "text":
            return self.llm(ids).logits
        b = self.branches[workflow]
        x = b.embed(ids.clamp(min=0))
        if feats is not None:
            x = x.clone()
            proj = b.projector(feats)  # [B, M, D]: row r's first n features fill its n image positions
            for r in range(ids.shape[0]):
                n = int(image_mask[r].sum())
                x[r, image_mask[r]] = proj[r, :n]
        t = ids.shape[1]
        pos = torch.arange(t)[None].expand(ids.shape[0], -1)
        cos_sin = self.rotary(x, pos)
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        k = 0
        for i, layer in enumerate(self.llm.model.layers):
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            if k < 14 and IAA_14[k] == i:
                x = b.layers[k](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
                k += 1
        return b.head(b.norm(x))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(0)
    ref = ReleaseReference()
    sd = ref.state_dict_release()
    for k, v in _tower().state_dict().items():  # present in the release files, unused by its reference loader
        sd[RELEASE_TOWER + k.removeprefix("vision_model.")] = v.detach().clone()
    d = tmp_path_factory.mktemp("release")
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in halves.items():
        save_file({k: sd[k] for k in part}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}))
    cfg = CFG.to_dict()
    cfg.update(model_type="IAA", mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_hidden_size=VIS,
               mm_use_im_start_end=False, mm_use_im_patch_token=False)
    (d / "config.json").write_text(json.dumps(cfg))
    return d, ref


def _tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(7)
    cfg = CLIPVisionConfig(hidden_size=VIS, intermediate_size=96, num_hidden_layers=3, num_attention_heads=1,
                           image_size=28, patch_size=14, hidden_act="quick_gelu")
    return CLIPVisionModel(cfg).eval()


def _documented_names():
    """The release's tensor names as DESIGN.md lists them: the base under HF Llama names (from transformers),
    and per branch its embedding, 14 condition layers (HF decoder-layer names inside), norm, head, projector."""
    names = set(LlamaForCausalLM(CFG).state_dict())
    layer = set(LlamaDecoderLayer(CFG, layer_idx=0).state_dict())
    for n in RELEASE_NAMES.values():
        names |= {f"{n['embed']}.weight", f"{n['norm']}.weight", f"{n['head']}.weight"}
        names |= {f"{n['layers']}.{k}.{x}" for k in range(14) for x in layer}
        names |= {f"{n['projector']}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    return names


def _inputs():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 128, (2, T))
    mask = np.zeros((2, T), bool)
    mask[0, 5:21] = True  # 16 image tokens in row 0; row 1 is text only
    feats = rs.randn(2, 16, VIS).astype(np.float32)
    return ids, mask, feats


def test_import_matches_the_pytorch_reference_in_all_three_workflows(release):
    d, ref = release
    config, params, vision = rel.load_release(d)
    assert [b.name for b in config.branches] == ["mm", "g"] and all(b.positions == IAA_14 for b in config.branches)
    assert vision.in_checkpoint and vision.mm_vision_tower == "openai/clip-vit-large-patch14-336"
    ids, mask, feats = _inputs()
    model = iaa.IAA(config)
    for workflow in ("text", "mm", "g"):
        kw = {} if workflow == "text" else dict(image_features=feats, image_mask=mask)
        got, _ = model.apply({"params": params}, ids, workflow=workflow, **kw)
        want = ref(torch.tensor(ids), workflow, torch.tensor(feats), torch.tensor(mask)).numpy()
        err = float(np.abs(np.asarray(got) - want).max())
        assert err <= 1e-4, (workflow, err)


def test_export_reproduces_the_release_tensors_exactly(release, tmp_path):
    d, _ = release
    config, params, _ = rel.load_release(d)
    out = rel.export_release(config, params, tmp_path / "out", vision_tower="openai/clip-vit-large-patch14-336",
                             max_shard_bytes=200_000)
    orig, back = {}, {}
    for f in d.glob("*.safetensors"):
        orig.update(load_file(str(f)))
    for f in out.glob("*.safetensors"):
        back.update(load_file(str(f)))
    orig = {k: v for k, v in orig.items() if not k.startswith(TOWER_CONTAINER)}
    assert set(orig) == set(back) == _documented_names()
    assert all(np.array_equal(orig[k], back[k]) and orig[k].dtype == back[k].dtype for k in orig)
    assert (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "IAA" and cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_hidden_size"] == VIS
    config2, params2, vision2 = rel.load_release(out)
    assert config2 == config and not vision2.in_checkpoint


def test_base_and_adapter_export(release, tmp_path):
    d, ref = release
    config, params, _ = rel.load_release(d)
    out = rel.export_base_and_adapter(config, params, tmp_path / "split", vision_tower="clip")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), attn_implementation="eager").eval()
    ids = torch.tensor(_inputs()[0])
    with torch.no_grad():
        assert torch.equal(base(ids).logits, ref.llm(ids).logits)  # the base is the untouched LLM
    config2, params2 = rel.load_base_and_adapter(out)
    assert config2 == config
    a, b = flatten(params), flatten(params2)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_positions_are_required_when_not_iaa14(release, tmp_path):
    d, _ = release
    config, params, _ = rel.load_release(d)
    small = iaa.IAAConfig(llm=config.llm, branches=(iaa.BranchConfig("mm", (0, 5, 9), config.branches[0].projector),))
    p = {"base": params["base"], "mm": {**{k: v for k, v in params["mm"].items() if not k.startswith("layers_")},
                                        **{f"layers_{k}": params["mm"][f"layers_{k}"] for k in range(3)}}}
    out = rel.export_release(small, p, tmp_path / "three", vision_tower="clip")
    with pytest.raises(ConversionError, match="pass positions="):
        rel.load_release(out)
    config3, _, _ = rel.load_release(out, positions=(0, 5, 9))
    assert config3.branches[0].positions == (0, 5, 9)
    with pytest.raises(ConversionError, match="3 condition layers but 2 positions"):
        rel.load_release(out, positions=(0, 5))


@pytest.mark.parametrize("source", ["checkpoint", "local_dir"])
def test_full_vlm_from_release_with_pixels(release, tmp_path, source):
    from mm.models import kinds

    d, ref = release
    tower = _tower()
    vision = None
    if source == "local_dir":
        tower.save_pretrained(str(tmp_path / "clip"))
        vision = tmp_path / "clip"
    config, params, used = load_release_vlm(d, vision=vision)
    assert ("checkpoint" in used) == (source == "checkpoint"), used
    rs = np.random.RandomState(5)
    pix = rs.randn(1, 2, 3, 28, 28).astype(np.float32)  # two images of 4 patches each
    ids = rs.randint(3, 128, (1, 40))
    mask = np.zeros((1, 40), bool)
    mask[0, 2:6] = mask[0, 20:24] = True
    with torch.no_grad():
        feats = tower(torch.tensor(pix[0]), output_hidden_states=True).hidden_states[-2][:, 1:].reshape(1, 8, VIS)
        want = ref(torch.tensor(ids), "mm", feats, torch.tensor(mask)).numpy()
    got, _ = kinds.of(config).apply(params, ids, pixel_values=pix, image_mask=mask, workflow="mm")
    assert float(np.abs(np.asarray(got) - want).max()) <= 1e-4


def test_tower_with_or_without_the_vision_model_module_loads_the_same(release, tmp_path):
    """`model.vision_tower.vision_tower.vision_model.*` (the release) and `model.vision_tower.vision_tower.*` (the
    tower re-saved by transformers >= 5.24): the same VLM config and exactly the same params, the tower's
    equal to the CLIP tensors the release holds (so test_full_vlm_from_release_with_pixels's parity holds for
    both)."""
    d, _ = release
    dirs = both_namings(d, tmp_path / "named", container=TOWER_CONTAINER)
    (ca, a, used_a), (cb, b, used_b) = load_release_vlm(dirs[True]), load_release_vlm(dirs[False])
    assert RELEASE_TOWER in used_a and TOWER_CONTAINER in used_b and RELEASE_TOWER not in used_b
    assert ca == cb
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb) and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)
    tower = {k.removeprefix("vision_model."): v.numpy() for k, v in _tower().state_dict().items()}
    cls = fb[("vision", "embeddings", "class_embedding")]
    assert np.array_equal(cls, tower["embeddings.class_embedding"])
    _, lm, vision = rel.load_release(dirs[False])  # the LM alone ignores the tower in either naming
    assert vision.in_checkpoint
    fl = flatten(lm)
    assert all(np.array_equal(fl[k], fb[k]) for k in fl)


@pytest.mark.parametrize("with_module,bogus", [
    (True, "vision_model.encoder.layers.0.self_attn.extra.weight"),
    (False, "encoder.layers.0.self_attn.extra.weight"),
    (True, "extra.weight"),  # beside vision_model. but inside the tower's container: still not the release's
])
def test_an_unexpected_tower_tensor_is_named_with_its_file(release, tmp_path, with_module, bogus):
    from safetensors.numpy import save_file

    d, _ = release
    out = both_namings(d, tmp_path / "named", container=TOWER_CONTAINER)[with_module]
    shard = "model-00002-of-00002.safetensors"
    tensors = load_file(str(out / shard))
    tensors[TOWER_CONTAINER + bogus] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(out / shard))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"][TOWER_CONTAINER + bogus] = shard
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(out))}: unexpected tensors "
                                              rf"\['{re.escape(TOWER_CONTAINER + bogus)} in {re.escape(shard)}'\]"):
        load_release_vlm(out)


def test_hub_id_without_tensors_says_what_to_pass(release, tmp_path):
    d, _ = release
    config, params, _ = rel.load_release(d)
    out = rel.export_release(config, params, tmp_path / "no_tower", vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(ConversionError, match="pass vision="):
        load_release_vlm(out)


def test_cli_release_to_mm_and_back(release, tmp_path):
    from launch.convert import main as mm_convert

    d, _ = release
    assert mm_convert(["hf-to-mm", "--src", str(d), "--dst", str(tmp_path / "mm"), "--no-progress"]) == 0
    assert mm_convert(["mm-to-hf", "--src", str(tmp_path / "mm"), "--dst", str(tmp_path / "back"),
                       "--no-progress"]) == 0
    orig, back = {}, {}
    for f in d.glob("*.safetensors"):
        orig.update(load_file(str(f)))
    for f in (tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(str(f)))
    lm = {k: v for k, v in orig.items() if not k.startswith(TOWER_CONTAINER)}
    assert set(lm) == set(back) and all(np.array_equal(lm[k], back[k]) for k in lm)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str((tmp_path / "back" / "vision_tower").absolute())
    _, _, used = load_release_vlm(tmp_path / "back")  # the reference loader's path: mm_vision_tower, local
    assert "mm_vision_tower" in used

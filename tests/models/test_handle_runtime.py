"""`mm.from_pretrained(..., mesh=, dtype=, param_dtype=, attention_impl=)` is honoured by every handle: an HF
Llama (LLMHandle), an mm IAA and an HF Llava dir (VLMHandle) and an HF CLIP tower (VisionHandle).

With `mesh=make_mesh({"fsdp": -1, "tensor": 2})` on the 8 simulated devices the params are sharded by the rules
table ([embed, heads, head_dim] kernels over fsdp x tensor) and the outputs (logits per workflow, hidden states,
greedy tokens) equal the unsharded ones; `param_dtype` is the dtype every param is held in; `dtype="bfloat16"`
changes the compute but stays close; `attention_impl` reaches every attention call of the model (tower and LLM).
"""

import functools

import numpy as np
import pytest
import torch

import mm
from mm import attention as attn
from mm import sharding as sh
from mm.config import ConfigError
from tests.helpers import hf_models
from tests.helpers.vlm_dirs import PH, tiny_iaa_vlm

LLAVA_IMG = 100  # HF Llava's image token, inside the vocabulary
KINDS = ["llm", "iaa", "llava", "vision"]
# [embed, heads, head_dim] kernels, laid out by DEFAULT_RULES: embed -> fsdp, heads -> tensor.
Q_KERNELS = {
    "llm": ["layers_0/self_attn/q_proj/kernel"],
    "iaa": ["base/layers_0/self_attn/q_proj/kernel", "mm/layers_1/self_attn/q_proj/kernel",
            "g/layers_0/self_attn/q_proj/kernel", "vision/encoder/layers_0/self_attn/q_proj/kernel"],
    "llava": ["llm/layers_1/self_attn/q_proj/kernel", "vision/encoder/layers_1/self_attn/q_proj/kernel"],
    "vision": ["encoder/layers_0/self_attn/q_proj/kernel"],
}


def _llava_dir(path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14)
    tc = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=LLAVA_IMG,
                                                      image_seq_length=4)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if ("norm" in n and n.endswith("weight"))
                    else 0.08 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return path


def _iaa_dir(path):
    return tiny_iaa_vlm(path, scale=4.0)[0]


def _clip_dir(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=14)).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    return {"llm": hf_models.make_llama(root, "gqa"), "iaa": _iaa_dir(root / "iaa"),
            "llava": _llava_dir(root / "llava"), "vision": _clip_dir(root / "clip")}


def _outputs(kind, handle, workflows=None):
    """Every output the handle gives for fixed inputs (or those of some workflows), float32 arrays by name."""
    rs = np.random.RandomState(0)
    pix = [rs.randn(n, 3, 28, 28).astype(np.float32) for n in (1, 2)]
    if kind == "llm":
        return {"logits": handle.logits(rs.randint(3, 128, (4, 24)))}
    if kind == "vision":
        return {f"hidden_{i}": h for i, h in enumerate(handle.hidden_states(np.concatenate(pix)))}
    ph = PH if kind == "iaa" else LLAVA_IMG
    prompts = [[1, 7, ph, 9, 10, 11], [1, 12, 13, ph, 14, ph, 15]]
    workflows = handle.workflows if workflows is None else workflows
    out = {f"logits_{wf}": handle.logits(prompts, pixel_values=pix, workflow=wf) for wf in workflows if wf != "text"}
    if "text" in workflows:
        out["logits_text"] = handle.logits([[1, 7, 9, 10], [1, 3]], workflow="text")
    return out


def _tokens(kind, handle):
    if kind == "llm":
        return handle.generate([[1, 5, 9, 33], [1, 8]], max_new_tokens=4, stop_tokens=())
    if kind == "vision":
        return None
    pix = [np.random.RandomState(1).randn(1, 3, 28, 28).astype(np.float32)] * 2
    ph = PH if kind == "iaa" else LLAVA_IMG
    return handle.generate([[1, 7, ph, 9], [1, ph, 3, 4, 8]], pixel_values=pix, workflow="mm", max_new_tokens=4,
                           stop_tokens=())


def _configs(kind, handle, with_projectors=True):
    """The (sub-)configs a handle's model is built from: tower, LLM and projectors for a VLM."""
    c = handle.config
    if kind == "iaa":
        return [c.vision, c.lm.llm] + ([b.projector for b in c.lm.branches] if with_projectors else [])
    if kind == "llava":
        return [c.vision, c.lm.llm] + ([c.lm.projector] if with_projectors else [])
    return [c]


def _leaves(params):
    from flax import traverse_util

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def mesh():
    return sh.make_mesh({"fsdp": -1, "tensor": 2})


@pytest.fixture(scope="module")
def plain(dirs):
    """Unsharded float32 outputs and tokens per kind (computed once)."""
    out = {}
    for kind in KINDS:
        h = mm.from_pretrained(dirs[kind])
        out[kind] = (_outputs(kind, h), _tokens(kind, h))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_mesh_shards_params_and_keeps_float32_outputs(dirs, mesh, plain, kind):
    h = mm.from_pretrained(dirs[kind], mesh=mesh)
    leaves = _leaves(h.params)
    for path in Q_KERNELS[kind]:
        spec = tuple(leaves[path].sharding.spec)
        assert spec[:2] == ("fsdp", "tensor") and leaves[path].sharding.mesh == mesh, (path, spec)
    # every part of a VLM (tower, LLM / base, branches, projector) has sharded params
    for top in {p.split("/")[0] for p in leaves} if kind in ("iaa", "llava") else ():
        assert any(any(a is not None for a in v.sharding.spec) for p, v in leaves.items()
                   if p.split("/")[0] == top), top
    assert {str(v.dtype) for v in leaves.values()} == {"float32"}
    want, want_tokens = plain[kind]
    got = _outputs(kind, h)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= 1e-5, (name, err)
    if want_tokens is not None:
        assert _tokens(kind, h).tolist() == want_tokens.tolist()


def test_mm_dirs_restore_straight_onto_the_mesh(dirs, mesh, plain, tmp_path):
    """mm vision and LLM dirs (converted from the HF ones) come back sharded by Orbax's restore, with the HF
    dirs' unsharded outputs."""
    from mm.convert.registry import hf_to_mm

    for kind in ("vision", "llm"):
        h = mm.from_pretrained(hf_to_mm(dirs[kind], tmp_path / kind, progress=False), mesh=mesh)
        kernel = _leaves(h.params)[Q_KERNELS[kind][0]]
        assert tuple(kernel.sharding.spec)[:2] == ("fsdp", "tensor") and kernel.sharding.mesh == mesh, kind
        want, got = plain[kind][0], _outputs(kind, h)
        assert set(got) == set(want)
        for name in want:
            assert float(np.abs(got[name] - want[name]).max()) <= 1e-5, (kind, name)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_param_dtype_on_a_mesh(dirs, mesh, plain, kind):
    want, _ = plain[kind]
    bf16_compute = mm.from_pretrained(dirs[kind], mesh=mesh, dtype="bfloat16")
    assert {str(v.dtype) for v in _leaves(bf16_compute.params).values()} == {"float32"}
    assert {(c.dtype, c.param_dtype) for c in _configs(kind, bf16_compute)} == {("bfloat16", "float32")}
    got = _outputs(kind, bf16_compute)
    for name in want:
        err = float(np.abs(got[name] - want[name]).max())
        assert 1e-4 < err <= 5e-2, (name, err)  # a bf16 computation, not a float32 one, and close to it
    bf16_params = mm.from_pretrained(dirs[kind], mesh=mesh, param_dtype="bfloat16")
    leaves = _leaves(bf16_params.params)
    assert {str(v.dtype) for v in leaves.values()} == {"bfloat16"}
    assert {(c.dtype, c.param_dtype) for c in _configs(kind, bf16_params)} == {("float32", "bfloat16")}
    assert tuple(leaves[Q_KERNELS[kind][0]].sharding.spec)[:2] == ("fsdp", "tensor")
    got = _outputs(kind, bf16_params, workflows=("mm",))
    for name in got:
        err = float(np.abs(got[name] - want[name]).max())
        assert 1e-4 < err <= 5e-2, (name, err)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_impl_reaches_every_attention_call(dirs, mesh, plain, monkeypatch, kind):
    """attention_impl="cudnn" with the cuDNN path's XLA implementation (what runs on CPU): every attention call of
    the forward - causal ones in the LLM, bidirectional ones in the tower - goes through it, under the mesh."""
    calls = []

    def recording(q, k, v, **kw):
        calls.append(kw["causal"])
        return functools.partial(attn.cudnn_attention, sdpa_implementation="xla")(q, k, v, **kw)

    monkeypatch.setitem(attn._IMPLS, "cudnn", recording)
    h = mm.from_pretrained(dirs[kind], mesh=mesh, attention_impl="cudnn")
    assert {c.attention_impl for c in _configs(kind, h, with_projectors=False)} == {"cudnn"}
    calls.clear()
    got = _outputs(kind, h)
    expected = {"llm": {True}, "vision": {False}}.get(kind, {True, False})
    assert set(calls) == expected
    want, _ = plain[kind]
    for name in want:
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= 1e-5, (name, err)


def test_invalid_values_name_the_keyword(dirs):
    d = dirs["vision"]
    with pytest.raises(ConfigError, match=r"attention_impl='flash'.*'xla'"):
        mm.from_pretrained(d, attention_impl="flash")
    with pytest.raises(ConfigError, match=r"dtype='float33'"):
        mm.from_pretrained(d, dtype="float33")
    with pytest.raises(ConfigError, match=r"param_dtype='int8'"):
        mm.from_pretrained(d, param_dtype="int8")
    with pytest.raises(ConfigError, match=r"mesh='fsdp'"):
        mm.from_pretrained(d, mesh="fsdp")

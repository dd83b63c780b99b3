"""What the trainer needs from a model: abstract params (for shardings), initial params, a loss, FLOPs stages.

One adapter per model kind (`llm` as a text LM, `llava`, `iaa`); the loop, the step and the checkpoints are
generic over them. Multimodal models take precomputed vision features (the vision tower is frozen in every
stage trained here, so its forward runs once per image outside the step). With the Grain pipeline
(`data.kind = "llava_json"`, pixel tiles in the batch) they get a `vision` ViT subtree run in the step
(freeze it with a `("vision/.*", "frozen")` param group), as the `vlm` kind always does.

FLOPs stages list, in forward order, the matmul weights used once per token (parallel weights share a stage)
and the attention-core FLOPs per token; `mm.train.flops` turns them into per-step model FLOPs given which
parameters are trainable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import LLMConfig
from mm.models import llm as llm_lib
from mm.train import param_groups as pg
from mm.train.config import llm_config_from

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Stage:
    weights: tuple[str, ...] = ()  # '/'-joined param paths used as matmul weights (once per token)
    attn_flops: float = 0.0  # attention-core forward FLOPs per token (causal: half counted)
    touches: tuple[str, ...] = ()  # other params read here (embeddings, norms) - trainability only
    token_factor: float = 1.0  # this stage's tokens per text token (vision stages run on patches)


@dataclasses.dataclass
class TrainModel:
    kind: str
    llm_config: LLMConfig
    abstract: Any  # boxed abstract params (logical axes)
    init: Callable[[Array], Any]  # rng -> full params (unboxed)
    # (params, micro batch) -> (sum, tokens) or (sum, count, metric sums), see `mm.train.step`
    loss: Callable[[Any, dict[str, Array]], tuple[Any, ...]]
    eval_losses: dict[str, Callable[[Any, dict[str, Array]], tuple[Array, Array]]]
    stages: Callable[[int], list[Stage]]  # seq_len -> forward-ordered stages
    base_prefix: str = ""  # where the base LLM lives in the tree ("" for llm, "llm" llava, "base" iaa)
    # generation during eval: workflow -> `mm.generate.DecodeFns` over the params without `vision`, and
    # (full params, pixels [B, tiles, C, H, W]) -> image features for prefill (None: no ViT in this model)
    decode: dict[str, Any] = dataclasses.field(default_factory=dict)
    pixel_features: Callable[[Any, Array], Array] | None = None
    # params that start as copies of others: target subtree -> source subtree ('/'-joined). The trainer copies
    # them from whatever the source holds once checkpoints are loaded (IAA branches from the loaded base).
    derived: dict[str, str] = dataclasses.field(default_factory=dict)
    # (params, plain batch) -> (summed completion log-probs [B], completion tokens [B]) over the batch's
    # `labels` / `loss_mask`: what the preference loss scores (`mm.train.preference`); None: not supported
    sequence_logps: Callable[[Any, dict[str, Array]], tuple[Array, Array]] | None = None
    # LoRA adapters the param groups put on kernels (`mm.train.lora_groups.Adapter`s; empty without LoRA)
    adapters: tuple[Any, ...] = ()


def cross_entropy(logits: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
    """Sum of token NLL over `mask` (float32) and the mask's sum, from materialised logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mask), jnp.sum(mask)


def _mask(batch: dict[str, Array]) -> Array:
    return batch["loss_mask"] * batch["loss_weight"][:, None]


def token_loss(b: dict[str, Array], forward: Callable[..., Array], head_params: Any, tied: bool,
               chunk: int) -> tuple[Array, Array]:
    """(summed NLL, supervised tokens) of one micro batch. `forward(return_hidden=)` runs the model;
    with `chunk > 0` the head is applied by `mm.losses.chunked_cross_entropy`, so `[tokens, vocab]` logits
    are never materialised (for the loss or its gradient); `head_params` holds `lm_head` or, when tied,
    `embed_tokens`."""
    if chunk <= 0:
        return cross_entropy(forward(return_hidden=False), b["labels"], _mask(b))
    from mm.losses import chunked_cross_entropy

    h = forward(return_hidden=True)
    kernel = head_params["embed_tokens"]["embedding"].T if tied else head_params["lm_head"]["kernel"]
    d = h.shape[-1]
    return chunked_cross_entropy(h.reshape(-1, d), kernel.astype(h.dtype), b["labels"].reshape(-1),
                                 _mask(b).reshape(-1), reduction="sum", return_count=True, chunk_size=chunk)


def completion_logps(h: Array, head_params: Any, tied: bool, b: dict[str, Array], chunk: int
                     ) -> tuple[Array, Array]:
    """Summed log-probs `[B]` of each row's supervised labels and their count, from final hidden states `h`
    (`mm.losses.completion_logprobs`: float32 logits, chunked over tokens)."""
    from mm.losses import completion_logprobs

    kernel = head_params["embed_tokens"]["embedding"].T if tied else head_params["lm_head"]["kernel"]
    return completion_logprobs(h, kernel.astype(h.dtype), b["labels"], _mask(b), chunk_size=chunk or 512)


def _layer_stages(prefix: str, c: LLMConfig, seq_len: int) -> list[Stage]:
    p = f"{prefix}/" if prefix else ""
    attn = 0.5 * 4.0 * seq_len * c.num_heads * c.head_dim
    norms = (f"{p}input_layernorm/scale",)
    qkv = tuple(f"{p}self_attn/{n}_proj/kernel" for n in "qkv")
    bias = tuple(f"{p}self_attn/{n}_proj/bias" for n in "qkv") if c.attention_bias else ()
    return [Stage(qkv, 0.0, norms + bias), Stage((), attn), Stage((f"{p}self_attn/o_proj/kernel",)),
            Stage((f"{p}mlp/gate_proj/kernel", f"{p}mlp/up_proj/kernel"), 0.0, (f"{p}post_attention_layernorm/scale",)),
            Stage((f"{p}mlp/down_proj/kernel",))]


def _head_stage(prefix: str, c: LLMConfig) -> Stage:
    p = f"{prefix}/" if prefix else ""
    w = f"{p}embed_tokens/embedding" if c.tie_word_embeddings else f"{p}lm_head/kernel"
    return Stage((w,), 0.0, (f"{p}norm/scale",))


def _projector_stages(prefix: str, kind: str) -> list[Stage]:
    depth = 1 if kind == "linear" else (0 if kind == "identity" else int(kind[3:].split("x")[0]))
    return [Stage((f"{prefix}/linear_{k}/kernel",), 0.0, (f"{prefix}/linear_{k}/bias",)) for k in range(depth)]


def _llm_model(cfg: Any) -> TrainModel:
    c = llm_config_from(cfg)
    model = llm_lib.LLM(c)
    chunk = int(cfg.train.loss_chunk)

    def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
        def forward(return_hidden: bool) -> Array:
            return model.apply({"params": params}, b["input_ids"], b["positions"], segment_ids=b["segment_ids"],
                               return_hidden=return_hidden)[0]
        return token_loss(b, forward, params, c.tie_word_embeddings, chunk)

    def sequence_logps(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
        h = model.apply({"params": params}, b["input_ids"], b["positions"], segment_ids=b["segment_ids"],
                        return_hidden=True)[0]
        return completion_logps(h, params, c.tie_word_embeddings, b, chunk)

    def stages(seq_len: int) -> list[Stage]:
        out = [Stage((), 0.0, ("embed_tokens/embedding",))]
        for i in range(c.num_layers):
            out += _layer_stages(f"layers_{i}", c, seq_len)
        return out + [_head_stage("", c)]

    return TrainModel("llm", c, llm_lib.abstract_params(c), lambda rng: llm_lib.init_params(c, rng), loss,
                      {"text": loss}, stages, decode={"text": llm_lib.decode_fns(c)}, sequence_logps=sequence_logps)


def tile_features(vc: Any, layer: int) -> Callable[[Any, Array], Array]:
    """(ViT params, pixels) -> features `[B, tiles * patches, D]` (class token dropped), in the order the splice
    fills a row's image positions. Pixels are `[B, C, H, W]` (one image a row) or `[B, tiles, C, H, W]` (the
    Grain pipeline: a row's tiles in order, padding tiles last - their features are never spliced)."""
    from mm.models import vision

    def features(vparams: Any, pixels: Array) -> Array:
        if pixels.ndim == 4:
            return vision.image_features(vparams, vc, pixels, layer=layer, feature="patch")
        bsz, tiles = pixels.shape[:2]
        f = vision.image_features(vparams, vc, pixels.reshape((bsz * tiles,) + pixels.shape[2:]), layer=layer,
                                  feature="patch")
        return f.reshape(bsz, tiles * f.shape[1], f.shape[2])

    return features


@dataclasses.dataclass
class _Tower:
    """The ViT a `llava` / `iaa` model runs in the step when the data gives pixels (`data.kind = llava_json`)."""

    vc: Any
    layer: int
    features: Callable[[Any, Array], Array]

    def init(self, rng: Array) -> Any:
        from mm.models import vision

        return nn.unbox(vision.VisionTower(self.vc).init(rng, vision._dummy_pixels(self.vc)))["params"]

    def abstract(self) -> Any:
        from mm.models import vision

        return vision.abstract_params(self.vc)

    def stages(self, seq_len: int) -> list[Stage]:
        from mm.models import vision

        n_vis = self.vc.grid_size ** 2 + (1 if self.vc.has_class_token else 0)
        return _vit_stages("vision", self.vc, n_vis, n_vis / seq_len, vision.select_layer_index(self.layer,
                                                                                               self.vc.num_layers))


def _tower(cfg: Any) -> _Tower | None:
    from mm.train.config import has_tower, vision_config_from

    if not has_tower(cfg):
        return None

    vc = vision_config_from(cfg)
    layer = int(cfg.model.vision_select_layer)
    return _Tower(vc, layer, tile_features(vc, layer))


def _image_inputs(tower: _Tower | None, params: Any, b: dict[str, Array]) -> Any:
    if tower is not None and "pixel_values" in b:
        return tower.features(params["vision"], b["pixel_values"])
    return b.get("image_features")


def _without_vision(params: Any) -> Any:
    return {k: v for k, v in params.items() if k != "vision"}


def _projector_config(cfg: Any, c: LLMConfig) -> Any:
    from mm.config import ProjectorConfig

    tower = _tower(cfg)
    width = tower.vc.hidden_size if tower is not None else int(cfg.model.vision_width)
    return ProjectorConfig(kind=cfg.model.projector, in_dim=width, out_dim=c.hidden_size,
                           dtype=c.dtype, param_dtype=c.param_dtype)


def _with_tower(tower: Any, init_lm: Callable[[Array, Array], Any], abstract_lm: Any
                ) -> tuple[Callable[[Array], Any], Any, Callable[[Any, Array], Array] | None]:
    """init / abstract params / pixel-features of an LLM-side model (LLaVA, IAA), with the ViT under `vision`
    when the config runs one in the step."""
    def init(rng: Array) -> Any:
        k1, k2, k3 = jax.random.split(rng, 3)
        out = init_lm(k1, k2)
        if tower is not None:
            out["vision"] = tower.init(k3)
        return out

    abstract = dict(abstract_lm)
    if tower is not None:
        abstract["vision"] = tower.abstract()
    feats = (lambda p, px: tower.features(p["vision"], px)) if tower is not None else None
    return init, abstract, feats


def llava_config(cfg: Any) -> Any:
    """The `LLaVAConfig` a `llava` run trains (also what `mm.train.export` writes)."""
    from mm.models import llava

    c = llm_config_from(cfg)
    return llava.LLaVAConfig(llm=c, projector=_projector_config(cfg, c))


def iaa_config(cfg: Any) -> Any:
    """The `IAAConfig` an `iaa` run trains: one branch per `model.iaa_branches`, all at `model.iaa_positions`."""
    from mm.models import iaa

    c = llm_config_from(cfg)
    proj = _projector_config(cfg, c)
    branches = tuple(iaa.BranchConfig(n, tuple(cfg.model.iaa_positions), proj) for n in cfg.model.iaa_branches)
    return iaa.IAAConfig(llm=c, branches=branches)


def _llava_model(cfg: Any) -> TrainModel:
    from mm.models import llava

    lc = llava_config(cfg)
    c = lc.llm
    model = llava.LLaVA(lc)
    tower = _tower(cfg)

    chunk = int(cfg.train.loss_chunk)

    def run(params: Any, b: dict[str, Array], return_hidden: bool) -> Array:
        return model.apply({"params": _without_vision(params)}, b["input_ids"], b["positions"],
                           image_features=_image_inputs(tower, params, b), image_mask=b.get("image_mask"),
                           segment_ids=b["segment_ids"], return_hidden=return_hidden)[0]

    def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
        return token_loss(b, lambda return_hidden: run(params, b, return_hidden), params["llm"],
                          c.tie_word_embeddings, chunk)

    def sequence_logps(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
        return completion_logps(run(params, b, True), params["llm"], c.tie_word_embeddings, b, chunk)

    init, abstract, feats = _with_tower(tower, lambda k1, k2: llava.init_params(lc, llm_lib.init_params(c, k1), k2),
                                        llava.abstract_params(lc))

    def stages(seq_len: int) -> list[Stage]:
        out = tower.stages(seq_len) if tower is not None else []
        out += _projector_stages("projector", cfg.model.projector) + [Stage((), 0.0, ("llm/embed_tokens/embedding",))]
        for i in range(c.num_layers):
            out += _layer_stages(f"llm/layers_{i}", c, seq_len)
        return out + [_head_stage("llm", c)]

    return TrainModel("llava", c, abstract, init, loss, {"mm": loss}, stages, "llm",
                      {"mm": llava.decode_fns(lc)}, feats, sequence_logps=sequence_logps)


def _iaa_model(cfg: Any) -> TrainModel:
    from mm.models import iaa

    ic = iaa_config(cfg)
    c = ic.llm
    model = iaa.IAA(ic)
    wf = cfg.model.iaa_workflow
    tower = _tower(cfg)

    chunk = int(cfg.train.loss_chunk)

    def run(params: Any, b: dict[str, Array], workflow: str, return_hidden: bool) -> Array:
        mm_in = workflow != iaa.TEXT
        ids = b["input_ids"] if mm_in else jnp.maximum(b["input_ids"], 0)
        return model.apply({"params": _without_vision(params)}, ids, b["positions"], workflow=workflow,
                           image_features=_image_inputs(tower, params, b) if mm_in else None,
                           image_mask=b.get("image_mask") if mm_in else None, segment_ids=b["segment_ids"],
                           return_hidden=return_hidden)[0]

    def head(params: Any, workflow: str) -> Any:
        return params["base"] if workflow == iaa.TEXT else params[workflow]

    def make_loss(workflow: str) -> Callable[[Any, dict[str, Array]], tuple[Array, Array]]:
        def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
            return token_loss(b, lambda return_hidden: run(params, b, workflow, return_hidden),
                              head(params, workflow), c.tie_word_embeddings, chunk)
        return loss

    def sequence_logps(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:  # the workflow this stage trains
        return completion_logps(run(params, b, wf, True), head(params, wf), c.tie_word_embeddings, b, chunk)

    init, abstract, feats = _with_tower(tower, lambda k1, k2: iaa.init_params(ic, llm_lib.init_params(c, k1), k2),
                                        iaa.abstract_params(ic))

    def stages(seq_len: int) -> list[Stage]:
        positions = list(cfg.model.iaa_positions)
        out = tower.stages(seq_len) if tower is not None else []
        out += _projector_stages(f"{wf}/projector", cfg.model.projector) + [Stage((), 0.0, (f"{wf}/embed_tokens/embedding",))]
        for i in range(c.num_layers):
            out += _layer_stages(f"base/layers_{i}", c, seq_len)
            if i in positions:
                out += _layer_stages(f"{wf}/layers_{positions.index(i)}", c, seq_len)
        return out + [_head_stage(wf, c)]

    evals = {wf: make_loss(wf), "text": make_loss(iaa.TEXT)}
    derived = {f"{b.name}/{k}": f"base/{src}" for b in ic.branches for k, src in iaa.branch_sources(ic, b.name).items()}
    return TrainModel("iaa", c, abstract, init, make_loss(wf), evals, stages, "base",
                      {w: iaa.decode_fns(ic, w) for w in evals}, feats, derived, sequence_logps)


def _vit_stages(prefix: str, vc: Any, n_tokens: int, factor: float, upto: int) -> list[Stage]:
    """ViT layers 0..upto-1 (bidirectional attention: not halved), per patch token scaled by `factor`."""
    p = f"{prefix}/" if prefix else ""
    out = [Stage((f"{p}embeddings/patch_embedding/kernel",), 0.0,
                 (f"{p}embeddings/class_embedding", f"{p}embeddings/position_embedding/embedding",
                  f"{p}pre_layrnorm/scale"), factor)]
    attn = 4.0 * n_tokens * vc.hidden_size
    for i in range(upto):
        q = f"{p}encoder/layers_{i}"
        out += [Stage(tuple(f"{q}/self_attn/{n}_proj/kernel" for n in "qkv"), 0.0, (f"{q}/layer_norm1/scale",), factor),
                Stage((), attn, (), factor), Stage((f"{q}/self_attn/out_proj/kernel",), 0.0, (), factor),
                Stage((f"{q}/mlp/fc1/kernel",), 0.0, (f"{q}/layer_norm2/scale",), factor),
                Stage((f"{q}/mlp/fc2/kernel",), 0.0, (), factor)]
    return out


def _vlm_model(cfg: Any) -> TrainModel:
    """ViT (always in the step) -> projector -> LLaVA-style splice -> LLM: the LLaVA adapter, whose tower
    `_tower` always builds for this kind. Params `{vision, projector, llm}`."""
    return dataclasses.replace(_llava_model(cfg), kind="vlm")


KINDS = {"llm": _llm_model, "llava": _llava_model, "iaa": _iaa_model, "vlm": _vlm_model}


def build(cfg: Any) -> TrainModel:
    m = KINDS[cfg.model.kind](cfg)
    if pg.has_lora(cfg.param_groups):  # adapters on the kernels LoRA rules match (mm.train.lora_groups)
        from mm.models import lora
        from mm.train import lora_groups

        with lora.candidates():
            candidates = KINDS[cfg.model.kind](cfg).abstract
        m = lora_groups.attach(m, candidates, cfg.param_groups)
    if cfg.data.kind == "preference":  # the DPO-family loss on chosen / rejected pairs, also for evaluation
        from mm.train import preference

        if m.sequence_logps is None:
            raise ValueError(f"data.kind = 'preference': model.kind {m.kind!r} has no sequence log-probs")
        loss = preference.make_loss(m.sequence_logps, preference.settings(cfg), m.pixel_features)
        m = dataclasses.replace(m, loss=loss, eval_losses={"dpo": loss}, decode={})
    return m


def unboxed_shapes(abstract: Any) -> Any:
    return nn.unbox(abstract)

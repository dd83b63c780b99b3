"""What the trainer needs from a model: abstract params (for shardings), initial params, a loss, FLOPs stages.

One adapter (`TrainModel`) over whichever `mm.models.protocol.ModelKind` the config builds (`model_config`:
`model.kind` = `llm` as a text LM, `llava`, `iaa`, `vlm`); the loop, the step and the checkpoints are generic
over it. Multimodal models take precomputed vision features (the vision tower is frozen in every stage trained
here, so its forward runs once per image outside the step). With the Grain pipeline (`data.kind =
"llava_json"`, pixel tiles in the batch) they get a `vision` ViT subtree run in the step (freeze it with a
`("vision/.*", "frozen")` param group), as the `vlm` kind always does: the model is then a VLM kind.

FLOPs stages list, in forward order, the matmul weights used once per token (parallel weights share a stage)
and the attention-core FLOPs per token (`ModelKind.stages`); `mm.train.flops` turns them into per-step model
FLOPs given which parameters are trainable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from mm.config import LLMConfig
from mm.models.protocol import Stage
from mm.train import param_groups as pg
from mm.train.schema import llm_config_from

Array = jax.Array


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


def _mask(batch: dict[str, Array]) -> Array:
    return batch["loss_mask"] * batch["loss_weight"][:, None]


def token_loss(b: dict[str, Array], forward: Callable[..., Array], head_params: Any, tied: bool,
               chunk: int) -> tuple[Array, Array]:
    """(summed NLL, supervised tokens) of one micro batch. `forward(return_hidden=)` runs the model;
    with `chunk > 0` the head is applied by `mm.losses.chunked_cross_entropy`, so `[tokens, vocab]` logits
    are never materialised (for the loss or its gradient); `head_params` holds `lm_head` or, when tied,
    `embed_tokens`."""
    from mm.losses import chunked_cross_entropy, cross_entropy

    if chunk <= 0:
        return cross_entropy(forward(return_hidden=False), b["labels"], _mask(b))

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


def tile_features(vc: Any, layer: int) -> Callable[[Any, Array], Array]:
    """(ViT params, pixels) -> features `[B, tiles * patches, D]` (class token dropped), in the order the splice
    fills a row's image positions (`mm.models.vlm.encode_images`). Pixels are `[B, C, H, W]` (one image a row)
    or `[B, tiles, C, H, W]` (the Grain pipeline: a row's tiles in order, padding tiles last - their features
    are never spliced)."""
    from mm.models import vlm

    return lambda vparams, pixels: vlm.encode_images(vparams, vc, pixels, layer, "patch")


def llava_config(cfg: Any) -> Any:
    """The `LLaVAConfig` a `llava` / `vlm` run trains."""
    from mm.config import LLaVAConfig

    c = llm_config_from(cfg)
    return LLaVAConfig(llm=c, projector=_projector_config(cfg, c))


def iaa_config(cfg: Any) -> Any:
    """The `IAAConfig` an `iaa` run trains: one branch per `model.iaa_branches`, all at `model.iaa_positions`."""
    from mm.config import BranchConfig, IAAConfig

    c = llm_config_from(cfg)
    proj = _projector_config(cfg, c)
    branches = tuple(BranchConfig(n, tuple(cfg.model.iaa_positions), proj) for n in cfg.model.iaa_branches)
    return IAAConfig(llm=c, branches=branches)


# model.kind -> the config of the model (without its tower) that the run trains
LM_CONFIGS: dict[str, Callable[[Any], Any]] = {"llm": llm_config_from, "llava": llava_config, "iaa": iaa_config,
                                               "vlm": llava_config}


def model_config(cfg: Any, image_token_id: int | None = None) -> Any:
    """What the run trains: `LM_CONFIGS[model.kind]`, inside a `VLMConfig` with the tower when the step runs a
    ViT (`mm.train.schema.has_tower`). `image_token_id` is where features go when a batch has no `image_mask`."""
    from mm.config import VLMConfig
    from mm.train.schema import has_tower, vision_config_from

    lm = LM_CONFIGS[cfg.model.kind](cfg)
    if not has_tower(cfg):
        return lm
    extra = {} if image_token_id is None else {"image_token_id": image_token_id}
    vc = vision_config_from(cfg)
    return VLMConfig(vision=vc, lm=lm, feature_layer=int(cfg.model.vision_select_layer), feature="patch",
                     ocr_vision=vc if _points(cfg, "ocr_tower") else None,
                     pixel_shuffle=_points(cfg, "pixel_shuffle"),
                     tiling="catty" if str(cfg.data.tiling) == "catty" else "square", **extra)


def _points(cfg: Any, key: str) -> Any:
    """A POINTS key of `model` (`mm.train.schema`); config.json files from before the keys have none."""
    return cfg.model.get(key, {"ocr_tower": False, "pixel_shuffle": False, "ocr_weight": 0.5}[key])


def _projector_config(cfg: Any, c: LLMConfig) -> Any:
    """The projector; with POINTS' OCR tower it takes both towers' features and merges them (w, 1 - w)."""
    from mm.config import ProjectorConfig
    from mm.train.schema import has_tower, vision_config_from

    width = vision_config_from(cfg).hidden_size if has_tower(cfg) else int(cfg.model.vision_width)
    if has_tower(cfg) and _points(cfg, "pixel_shuffle"):
        width *= 4
    w = float(_points(cfg, "ocr_weight"))
    merge = (w, 1.0 - w) if has_tower(cfg) and _points(cfg, "ocr_tower") else ()
    return ProjectorConfig(kind=cfg.model.projector, in_dim=width, out_dim=c.hidden_size,
                           dtype=c.dtype, param_dtype=c.param_dtype, merge=merge)


def _train_model(cfg: Any) -> TrainModel:
    """The one adapter: the trainer's view of whichever `mm.models.protocol.ModelKind` the config builds."""
    from mm.models import kinds
    from mm.train.schema import GRAIN_KINDS, has_tower

    model = kinds.of(model_config(cfg))
    c = model.llm
    wf = model.trained_workflow(str(cfg.model.iaa_workflow))
    chunk = int(cfg.train.loss_chunk)

    def run(params: Any, b: dict[str, Array], workflow: str, return_hidden: bool) -> Array:
        image = {k: b[k] for k in ("image_features", "image_mask", "pixel_values") if k in b}
        return model.apply(params, b["input_ids"], b["positions"], workflow=workflow, segment_ids=b["segment_ids"],
                           return_hidden=return_hidden, **image)[0]

    def make_loss(workflow: str) -> Callable[[Any, dict[str, Array]], tuple[Array, Array]]:
        def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:
            return token_loss(b, lambda return_hidden: run(params, b, workflow, return_hidden),
                              model.head_params(params, workflow), c.tie_word_embeddings, chunk)
        return loss

    def sequence_logps(params: Any, b: dict[str, Array]) -> tuple[Array, Array]:  # the workflow this stage trains
        return completion_logps(run(params, b, wf, True), model.head_params(params, wf), c.tie_word_embeddings, b,
                                chunk)

    # evaluated (and decoded during eval): the trained workflow, and the base LLM's own text workflow beside it
    evals = dict.fromkeys([wf] + (["text"] if "text" in model.workflows and wf != "text" else []))
    tower = has_tower(cfg)
    # tiles a row's pixels hold: the Grain pipeline's tile budget, one image in a synthetic row
    tiles = {"tiles_per_row": int(cfg.data.max_tiles_per_row) if cfg.data.kind in GRAIN_KINDS else 1} if tower else {}
    return TrainModel(cfg.model.kind, c, model.abstract_params(), model.init_params, make_loss(wf),
                      {w: make_loss(w) for w in evals}, lambda seq_len: model.stages(seq_len, wf, **tiles),
                      model.base_prefix,
                      {w: model.decode_fns(w) for w in evals}, model.image_features if tower else None,
                      model.derived(), sequence_logps)

def build(cfg: Any) -> TrainModel:
    m = _train_model(cfg)
    if pg.has_lora(cfg.param_groups):  # adapters on the kernels LoRA rules match (mm.train.lora_groups)
        from mm.models import lora
        from mm.train import lora_groups

        with lora.candidates():
            candidates = _train_model(cfg).abstract
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

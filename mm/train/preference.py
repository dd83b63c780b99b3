"""Preference (DPO-family) training: the reference model and the loss over chosen / rejected pairs.

With `data.kind = "preference"` a batch holds each key twice, `chosen/<key>` and `rejected/<key>` (one pair a
row, see `mm.train.grain_source`). The loss runs the model's `sequence_logps` (summed completion log-probs,
float32 logits, `mm.losses.completion_logprobs`) on both halves at once for the policy and for the reference,
and scores them with `mm.dpo_losses.preference_loss` (config section `dpo`, TRL 1.13's loss names and metrics).
Multimodal models (`llava`, `iaa`'s trained workflow, `vlm`) run the ViT once per image for both halves.

The reference lives in the frozen tree under `REFERENCE_KEY`: only the params it replaces, i.e. a copy of the
trainable params as the run starts (`dpo.reference = ""`), or every param of the base LLM read from the
`dpo.reference` dir (plus starting copies of any trainable param that dir does not hold). Frozen params the
reference does not replace are the policy's own arrays, shared, never duplicated. The reference is not
checkpointed: `mm.train.loop.build` rebuilds it from the same init sources on every start (the config's
`init.*` and `dpo.reference`, which a resumed run reads again), so a resumed run scores against the same
reference as an uninterrupted one. Reference log-probs carry no gradient (`stop_gradient`; the reference is
also outside the differentiated tree).

The loss function returns `(loss * pairs, pairs, metrics * pairs)`, so the train step's sums over micro
batches and its division by the count give the mean over the step's pairs. Loss types that look across the
batch (`aot`, `aot_unpaired`, `sft`) see one micro batch at a time. Every row of a preference batch holds a
pair: the trainer's data repeats forever, so the packer always fills a batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mm.dpo_losses import METRICS, DPOSettings, PairLogps, preference_loss
from mm.train import param_groups as pg

Array = jax.Array
REFERENCE_KEY = "dpo_reference"  # not a param name: the merged tree's extra subtree
HALVES = ("chosen", "rejected")


def settings(cfg: Any) -> DPOSettings:
    d = cfg.dpo
    return DPOSettings(loss_type=tuple(d.loss_type), loss_weights=tuple(float(w) for w in d.loss_weights) or None,
                       beta=float(d.beta), label_smoothing=float(d.label_smoothing))


def _both_halves(b: Mapping[str, Array]) -> dict[str, Array]:
    """`chosen/<key>` and `rejected/<key>` stacked into one `[2B, ...]` batch: chosen rows first."""
    keys = [k.split("/", 1)[1] for k in b if k.startswith("chosen/")]
    return {k: jnp.concatenate([b[f"chosen/{k}"], b[f"rejected/{k}"]], axis=0) for k in keys}


def reference_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(policy params, reference params) from a merged tree holding `REFERENCE_KEY`: the reference is the
    policy's tree with the reference's leaves in place of its own."""
    policy = {k: v for k, v in params.items() if k != REFERENCE_KEY}
    flat = pg.flatten(policy)
    flat.update(pg.flatten(params[REFERENCE_KEY]))
    return policy, pg.unflatten(flat)


def without_reference(frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen tree's params alone (what an export merges with the trained params)."""
    return {k: v for k, v in frozen.items() if k != REFERENCE_KEY}


def _with_features(both: dict[str, Array], feats: Array) -> dict[str, Array]:
    out = {k: v for k, v in both.items() if k not in ("pixel_values", "tile_mask")}
    out["image_features"] = jnp.concatenate([feats, feats], axis=0)
    return out


def make_loss(sequence_logps: Callable[[Any, dict[str, Array]], tuple[Array, Array]], s: DPOSettings,
              pixel_features: Callable[[Any, Array], Array] | None = None
              ) -> Callable[[Any, dict[str, Array]], tuple[Array, Array, dict[str, Array]]]:
    """The preference loss of a model whose `sequence_logps(params, batch) -> (summed log-probs [B], completion
    tokens [B])` scores a plain batch. With `pixel_features` (a ViT in the step) each image's features are
    computed once, from the chosen half's tiles (both halves hold the row's images), and serve both halves;
    the reference reuses the policy's unless it holds its own `vision` params."""

    def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array, dict[str, Array]]:
        policy, reference = reference_params(params)
        both = ref_both = _both_halves(b)
        if pixel_features is not None and "pixel_values" in both:
            feats = pixel_features(policy, b["chosen/pixel_values"])
            both = _with_features(both, feats)
            own = "vision" in params[REFERENCE_KEY]  # a trained (or other) ViT: the reference's own features
            ref_both = _with_features(ref_both, pixel_features(reference, b["chosen/pixel_values"]) if own else feats)
        lp, n = sequence_logps(policy, both)
        ref, _ = sequence_logps(reference, ref_both)
        ref = jax.lax.stop_gradient(ref)
        pairs = lp.shape[0] // 2
        value, metrics = preference_loss(PairLogps(lp[:pairs], lp[pairs:], ref[:pairs], ref[pairs:], n[:pairs],
                                                   n[pairs:]), s)
        count = jnp.asarray(pairs, jnp.float32)
        return value * count, count, {k: metrics[k] * count for k in METRICS}

    return loss


def build_reference(cfg: Any, model: Any, trainable: Any, flat_sh: Mapping[str, Any], mesh: Any) -> dict[str, Any]:
    """The `REFERENCE_KEY` subtree (see the module docstring), on the params' shardings."""
    from mm.train.initial_params import load_base_llm

    flat_t = pg.flatten(trainable)
    loaded = load_base_llm(cfg.dpo.reference, model, flat_sh) if cfg.dpo.reference else {}
    starting = [p for p in flat_t if p not in loaded]
    with jax.set_mesh(mesh):  # fresh buffers: the train step donates (and updates) the trainable arrays
        copies = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=[flat_sh[p] for p in starting])(
            [flat_t[p] for p in starting])
    return pg.unflatten({**loaded, **dict(zip(starting, copies))})


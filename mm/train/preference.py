"""Preference (DPO-family) training: the reference model and the loss over chosen / rejected pairs.

With `data.kind = "preference"` a batch holds each key twice, `chosen/<key>` and `rejected/<key>` (one pair a
row, see `mm.train.grain_source`). The loss runs the model's `sequence_logps` (summed completion log-probs,
float32 logits, `mm.losses.completion_logprobs`) on both halves at once for the policy and for the reference,
and scores them with `mm.dpo_losses.preference_loss` (config section `dpo`, TRL 1.13's loss names and metrics).
Multimodal models (`llava`, `iaa`'s trained workflow, `vlm`) run the ViT once per image for both halves.

The reference lives in the frozen tree under `REFERENCE_KEY`: only the params it replaces, i.e. a copy of the
trainable params as the run starts (`dpo.reference = ""`), or every param of the base LLM read from the
`dpo.reference` dir (plus starting copies of any trainable param that dir does not hold). LoRA adapters are
never copied: the reference is the model with its adapters off, as TRL does with a PEFT model (a LoRA run
whose only trainable params are adapters holds an empty reference subtree: no second copy of anything). Frozen params
the
reference does not replace are the policy's own arrays, shared, never duplicated. The reference is not
checkpointed: `mm.train.loop.build` rebuilds it from the same init sources on every start (the config's
`init.*` and `dpo.reference`, which a resumed run reads again), so a resumed run scores against the same
reference as an uninterrupted one. Reference log-probs carry no gradient (`stop_gradient`; the reference is
also outside the differentiated tree). With `dpo.precompute_reference` there is no `REFERENCE_KEY` subtree:
the reference scores the data once before step 1 (`mm.train.reference_logps`) and batches bring its sums.

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
from mm import lora_params
from mm.train import param_groups as pg

Array = jax.Array
REFERENCE_KEY = "dpo_reference"  # not a param name: the merged tree's extra subtree
HALVES = ("chosen", "rejected")
REF_LOGPS = "ref_logps"  # batch key (under chosen/ and rejected/) of precomputed reference log-probs


def settings(cfg: Any) -> DPOSettings:
    d = cfg.dpo
    return DPOSettings(loss_type=tuple(d.loss_type), loss_weights=tuple(float(w) for w in d.loss_weights) or None,
                       beta=float(d.beta), label_smoothing=float(d.label_smoothing))


def _both_halves(b: Mapping[str, Array]) -> dict[str, Array]:
    """`chosen/<key>` and `rejected/<key>` stacked into one `[2B, ...]` batch: chosen rows first."""
    keys = [k.split("/", 1)[1] for k in b if k.startswith("chosen/") and k != f"chosen/{REF_LOGPS}"]
    return {k: jnp.concatenate([b[f"chosen/{k}"], b[f"rejected/{k}"]], axis=0) for k in keys}


def reference_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(policy params, reference params) from a merged tree holding `REFERENCE_KEY`: the reference is the
    policy's tree with the reference's leaves in place of its own. No reference (None) without that key (the
    reference log-probs are precomputed)."""
    policy = {k: v for k, v in params.items() if k != REFERENCE_KEY}
    if REFERENCE_KEY not in params:
        return policy, None
    flat = lora_params.strip(pg.flatten(policy))  # LoRA adapters off: the reference never holds them (TRL + PEFT)
    flat.update(pg.flatten(params[REFERENCE_KEY]))
    return policy, pg.unflatten(flat)


def without_reference(frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen tree's params alone (what an export merges with the trained params)."""
    return {k: v for k, v in frozen.items() if k != REFERENCE_KEY}


def _with_features(both: dict[str, Array], feats: Array) -> dict[str, Array]:
    out = {k: v for k, v in both.items() if k not in ("pixel_values", "tile_mask")}
    out["image_features"] = jnp.concatenate([feats, feats], axis=0)
    return out


SequenceLogps = Callable[[Any, dict[str, Array]], tuple[Array, Array]]


def pair_logps(sequence_logps: SequenceLogps, pixel_features: Callable[[Any, Array], Array] | None, params: Any,
               b: Mapping[str, Array], feats: Array | None = None) -> tuple[Array, Array, Array | None]:
    """(summed completion log-probs `[2B]`, completion tokens `[2B]`, the ViT features used) of a pair batch
    under `params`, chosen rows first. A multimodal model's ViT runs once per image (from the chosen half's
    tiles: both halves hold the row's images), or not at all when `feats` are given."""
    both = _both_halves(b)
    if pixel_features is not None and "pixel_values" in both:
        feats = pixel_features(params, b["chosen/pixel_values"]) if feats is None else feats
        both = _with_features(both, feats)
    lp, n = sequence_logps(params, both)
    return lp, n, feats


def make_loss(sequence_logps: SequenceLogps, s: DPOSettings, pixel_features: Callable[[Any, Array], Array] | None = None
              ) -> Callable[[Any, dict[str, Array]], tuple[Array, Array, dict[str, Array]]]:
    """The preference loss of a model whose `sequence_logps(params, batch) -> (summed log-probs [B], completion
    tokens [B])` scores a plain batch. With `pixel_features` (a ViT in the step) each image's features are
    computed once and serve both halves; the reference reuses the policy's unless it holds its own `vision`
    params. A batch with `chosen/ref_logps` and `rejected/ref_logps` (`dpo.precompute_reference`,
    `mm.train.reference_logps`) brings the reference's log-probs: no reference forward runs."""

    def loss(params: Any, b: dict[str, Array]) -> tuple[Array, Array, dict[str, Array]]:
        policy, reference = reference_params(params)
        lp, n, feats = pair_logps(sequence_logps, pixel_features, policy, b)
        if f"chosen/{REF_LOGPS}" in b:
            ref = jnp.concatenate([b[f"chosen/{REF_LOGPS}"], b[f"rejected/{REF_LOGPS}"]], axis=0)
        else:
            if reference is None:
                raise ValueError("preference loss: neither reference params nor precomputed reference log-probs")
            # a trained (or other, or LoRA-adapted) ViT: the reference computes its own features
            own = "vision" in params[REFERENCE_KEY] or any(
                map(lora_params.is_adapter, pg.flatten(policy.get("vision", {}))))
            ref, _, _ = pair_logps(sequence_logps, pixel_features, reference, b, None if own else feats)
        ref = jax.lax.stop_gradient(ref.astype(jnp.float32))
        pairs = lp.shape[0] // 2
        value, metrics = preference_loss(PairLogps(lp[:pairs], lp[pairs:], ref[:pairs], ref[pairs:], n[:pairs],
                                                   n[pairs:]), s)
        count = jnp.asarray(pairs, jnp.float32)
        return value * count, count, {k: metrics[k] * count for k in METRICS}

    return loss


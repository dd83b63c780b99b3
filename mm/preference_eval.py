"""Held-out preference metrics of a VLM checkpoint on preference pairs (`data.kind=preference` rows, what
`mm-bpo negatives` writes): does the model prefer the chosen (dataset) answers, and by how much?

For each pair the summed log-prob of the chosen and of the rejected final response (exactly the tokens the
DPO loss scores: the last answer and its end-of-turn token; earlier turns are prompt) is computed under the
policy and under a reference, with the pipeline's own pieces (`mm.data.pipeline.ExampleMaker` in preference
mode, `mm.data.packing.assemble`, float32 log-probs through `mm.ppl.nll_fn`'s chunked cross-entropy). Reported:

  TRL's metrics (`mm.dpo_losses.preference_metrics`, beta of the run): rewards/chosen, rewards/rejected,
      rewards/accuracies (strict >), rewards/margins, logps/chosen, logps/rejected - against the reference;
  the policy's own preference, no reference: `preference/accuracy` (share of pairs with log p(chosen) >
      log p(rejected)), `preference/margin` (mean log p(chosen) - log p(rejected), nats) and
      `preference/margin_per_token` (the same on per-token means: the answers' lengths differ);
  `pairs` scored, `skipped` by reason (a pair the pipeline cannot use is skipped and counted, never scored).

With policy == reference every reward is 0 (accuracy 0 by the strict >), so a model's "before" is read from
the `preference/*` numbers and the rewards measure the change a training made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mm.config import ConfigError


def pair_logps(handle: Any, pairs: Any, *, image_root: str | None = None, workflow: str = "mm",
               batch_size: int = 16, max_len: int = 2048, template: str = "chat", max_tiles_per_row: int = 8
               ) -> dict[str, Any]:
    """{"ids": [...], "chosen"/"rejected": summed log-probs float64 [N], "chosen_tokens"/"rejected_tokens":
    [N], "skipped": {reason: n}} of every usable pair of `pairs` (a JSON / JSONL file or a list of rows)
    under a loaded `VLMHandle`."""
    from mm.data.packing import assemble, bucket_length
    from mm.data.pipeline import DataConfig, ExampleMaker
    from mm.ppl import example_sums, nll_fn, processor_for, read_rows

    if workflow not in handle.workflows:
        raise ConfigError(f"workflow={workflow!r}: the model has {handle.workflows}")
    rows = read_rows(pairs)
    cfg = handle.config
    dcfg = DataConfig(kind="preference", template=template, max_len=max_len, batch_size=batch_size, pack=False,
                      tiling="square", tile=int(cfg.vision.image_size), tokens_per_tile=int(cfg.tokens_per_image),
                      max_tiles_per_row=max_tiles_per_row, shuffle=False, num_epochs=1)
    maker = ExampleMaker(dcfg, handle.tokenizer, image_root, processor=processor_for(handle))
    fn = nll_fn(handle, workflow)
    sums: dict[tuple[int, int], tuple[float, int]] = {}
    ids: dict[int, str] = {}
    skipped: dict[str, int] = {}
    queue: list[dict[str, Any]] = []

    def run(batch: list[dict[str, Any]]) -> None:
        rows_ = [[e] for e in batch]
        length = bucket_length(max(len(e["ids"]) for e in batch), dcfg.length_buckets)
        b = assemble(rows_, length, max(max_tiles_per_row, 1), dcfg.tile_shape, dcfg.np_pixel_dtype)
        args = handle.runtime.inputs(b["input_ids"], b["positions"], b["segment_ids"], b["labels"], b["loss_mask"],
                                     b["image_mask"], b["pixel_values"])
        for e, rec in zip(batch, example_sums(rows_, np.asarray(fn(handle.params, *args)), b)):
            sums[(e["index"], e["half"])] = (-rec["nll_sum"], rec["n_tokens"])

    for i in range(len(rows)):
        ex = maker(rows[i])
        if "skip" in ex:
            skipped[ex["skip"][0]] = skipped.get(ex["skip"][0], 0) + 1
            continue
        ids[i] = ex["id"]
        for half, e in enumerate(ex["pair"]):
            queue.append({**e, "index": i, "rid": ex["id"], "half": half})
        if len(queue) >= batch_size:
            run(queue[:batch_size])
            queue = queue[batch_size:]
    while queue:
        run(queue[:batch_size])
        queue = queue[batch_size:]
    order = sorted(ids)
    out: dict[str, Any] = {"ids": [ids[i] for i in order], "skipped": skipped}
    for half, name in enumerate(("chosen", "rejected")):
        out[name] = np.array([sums[(i, half)][0] for i in order], np.float64)
        out[f"{name}_tokens"] = np.array([sums[(i, half)][1] for i in order], np.int64)
    return out


def metrics(policy: dict[str, Any], reference: dict[str, Any], beta: float = 0.1) -> dict[str, Any]:
    """The module docstring's metrics from two `pair_logps` results over the same pairs."""
    import jax.numpy as jnp

    from mm.dpo_losses import PairLogps, preference_metrics

    if policy["ids"] != reference["ids"]:
        raise ValueError("policy and reference scored different pairs")
    if not policy["ids"]:
        raise ConfigError(f"no pair could be scored (skipped: {policy['skipped']})")
    lp = PairLogps(*(jnp.asarray(x, jnp.float32) for x in (policy["chosen"], policy["rejected"], reference["chosen"],
                                                            reference["rejected"])))
    out: dict[str, Any] = {k: float(v) for k, v in preference_metrics(lp, beta).items()}
    c, r = policy["chosen"], policy["rejected"]
    per_c, per_r = c / policy["chosen_tokens"], r / policy["rejected_tokens"]
    out.update({"preference/accuracy": float(np.mean(c > r)), "preference/margin": float(np.mean(c - r)),
                "preference/margin_per_token": float(np.mean(per_c - per_r)), "pairs": len(policy["ids"]),
                "skipped": dict(policy["skipped"])})
    return out


def evaluate(policy: str | Path, reference: str | Path, pairs: Any, *, image_root: str | None = None,
             beta: float = 0.1, workflow: str = "mm", loader: Any = None, **kw: Any) -> dict[str, Any]:
    """`metrics` of the checkpoint `policy` against `reference` (dirs; the same dir for a model's "before")
    on `pairs`. `loader`: an `mm.heldout.Loader` to reuse one handle (and its compiled functions)."""
    from mm.heldout import Loader

    load = loader or Loader()
    ref = pair_logps(load(reference), pairs, image_root=image_root, workflow=workflow, **kw)
    same = Path(policy).absolute() == Path(reference).absolute()
    pol = ref if same else pair_logps(load(policy), pairs, image_root=image_root, workflow=workflow, **kw)
    return metrics(pol, ref, beta)

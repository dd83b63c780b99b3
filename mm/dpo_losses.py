"""DPO-family preference losses on summed completion log-probs, named and defined as TRL 1.13's `DPOTrainer`.

Every loss reads a `PairLogps`: the policy's and the reference's summed completion log-probs of the chosen and
the rejected answer (float32 `[B]`, e.g. from `mm.losses.completion_logprobs`) and, where a variant needs them,
the completion token counts. `preference_loss` sums several loss types with weights (TRL's
`loss_type=[...]`, `loss_weights`), each averaged over the batch, and returns TRL's metrics: `rewards/chosen`,
`rewards/rejected` (beta times the policy / reference log-ratio), `rewards/accuracies` (chosen reward strictly
above the rejected one), `rewards/margins`, `logps/chosen`, `logps/rejected`, each a batch mean.

Loss types (TRL 1.13's names): sigmoid (DPO; with `label_smoothing` > 0 the conservative cDPO form), hinge,
ipo and sigmoid_norm (log-ratios averaged over completion tokens), exo_pair, nca_pair, robust, bco_pair,
sppo_hard, aot and aot_unpaired (sorted over the batch given), apo_zero, apo_down, discopop, sft (token-mean NLL
of the chosen completions). `f_divergence_type` (reverse_kl, forward_kl, js_divergence, alpha_divergence)
reshapes the log-ratios for the losses built on the chosen-rejected score difference, as in TRL.

One deliberate difference: TRL 1.13 ignores `label_smoothing` for `sigmoid`; here it gives cDPO. At the default
`label_smoothing=0` the two agree. TRL options not provided here: `ld_alpha` (LD-DPO, needs per-token log-probs)
and `use_weighting` (WPO, needs per-token log-sum-exps of doubled logits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Losses that TRL allows with a non-default f-divergence (they use only the chosen-rejected score difference).
_F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs `[B]` of each pair; token counts `[B]` for ipo, sigmoid_norm and sft. A
    pytree (passes through `jax.jit`)."""

    policy_chosen: Array
    policy_rejected: Array
    ref_chosen: Array
    ref_rejected: Array
    chosen_tokens: Array | None = None
    rejected_tokens: Array | None = None


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """TRL's `DPOConfig` fields that shape the loss, with TRL's defaults."""

    loss_type: tuple[str, ...] = ("sigmoid",)  # a name or a sequence of names
    loss_weights: tuple[float, ...] | None = None  # None: 1.0 each
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", (self.loss_type,))
        object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        self.check()

    def check(self) -> None:
        if not self.loss_type:
            raise ValueError("dpo.loss_type: at least one loss type is needed")
        unknown = [t for t in self.loss_type if t not in LOSSES]
        if unknown:
            raise ValueError(f"dpo.loss_type: unknown {unknown}; choose from {sorted(LOSSES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"dpo.loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss "
                             f"types {list(self.loss_type)}")
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"dpo.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if "robust" in self.loss_type and not self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must lie in [0, 0.5) for 'robust', got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("dpo.label_smoothing must be > 0 for 'exo_pair' (the EXO paper suggests 1e-3)")
        if "discopop" in self.loss_type and not self.discopop_tau > 0:
            raise ValueError(f"dpo.discopop_tau must be positive, got {self.discopop_tau}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"dpo.f_divergence_type={self.f_divergence_type!r}; choose from {F_DIVERGENCES}")
        if self.f_divergence_type != "reverse_kl":
            bad = sorted(set(self.loss_type) - _F_DIVERGENCE_LOSSES)
            if bad:
                raise ValueError(f"dpo.f_divergence_type={self.f_divergence_type!r} works only with "
                                 f"{sorted(_F_DIVERGENCE_LOSSES)}; not with {bad}")

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)


@dataclasses.dataclass(frozen=True)
class _Terms:
    """What the losses read: log-ratios (policy - reference), f-divergence scores and their difference."""

    lp: PairLogps
    chosen_ratio: Array
    rejected_ratio: Array
    chosen_score: Array
    rejected_score: Array

    @property
    def delta(self) -> Array:
        return self.chosen_score - self.rejected_score


def _scores(ratio: Array, s: DPOSettings) -> Array:
    """f'(t) at t = policy / reference probability ratio, as a function of log t."""
    if s.f_divergence_type == "reverse_kl":
        return ratio
    if s.f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-ratio)
    if s.f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(ratio)
    alpha = s.f_alpha_divergence_coef  # alpha_divergence: (t^(a-1) - 1) / (a-1); log t in the limit a -> 1
    if abs(alpha - 1.0) < 1e-6:
        return ratio
    x = jnp.minimum((alpha - 1.0) * ratio.astype(jnp.float32), 80.0)  # keep exp finite in float32
    return (jnp.exp(x) - 1.0).astype(ratio.dtype) / (alpha - 1.0)


def _tokens(x: Array | None, loss: str, which: str) -> Array:
    if x is None:
        raise ValueError(f"loss type {loss!r} needs the completion token counts (PairLogps.{which}_tokens)")
    return jnp.maximum(x.astype(jnp.float32), 1.0)


def _log_sigmoid_pair(x: Array, eps: float) -> Array:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): the logistic loss on labels flipped with prob. eps."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _sigmoid(t: _Terms, s: DPOSettings) -> Array:
    return _log_sigmoid_pair(s.beta * t.delta, s.label_smoothing)


def _hinge(t: _Terms, s: DPOSettings) -> Array:
    return jax.nn.relu(1.0 - s.beta * t.delta)


def _per_token_delta(t: _Terms, loss: str) -> Array:
    return (t.chosen_score / _tokens(t.lp.chosen_tokens, loss, "chosen")
            - t.rejected_score / _tokens(t.lp.rejected_tokens, loss, "rejected"))


def _ipo(t: _Terms, s: DPOSettings) -> Array:
    # IPO's squared loss on the token-averaged score difference, target 1 / (2 beta) (beta is IPO's tau).
    return jnp.square(_per_token_delta(t, "ipo") - 0.5 / s.beta)


def _sigmoid_norm(t: _Terms, s: DPOSettings) -> Array:
    return -jax.nn.log_sigmoid(s.beta * _per_token_delta(t, "sigmoid_norm"))


def _exo_pair(t: _Terms, s: DPOSettings) -> Array:
    # KL(softmax over {chosen, rejected} of beta * score || [1 - eps, eps])
    x, eps = s.beta * t.delta, s.label_smoothing
    log_q_w, log_q_l = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
    return (jnp.exp(log_q_w) * (log_q_w - math.log1p(-eps))
            + jnp.exp(log_q_l) * (log_q_l - math.log(eps)))


def _nca_pair(t: _Terms, s: DPOSettings) -> Array:
    rc, rr = s.beta * t.chosen_ratio, s.beta * t.rejected_ratio
    return -jax.nn.log_sigmoid(rc) - 0.5 * jax.nn.log_sigmoid(-rc) - 0.5 * jax.nn.log_sigmoid(-rr)


def _robust(t: _Terms, s: DPOSettings) -> Array:
    # unbiased estimate under labels flipped with probability eps
    x, eps = s.beta * t.delta, s.label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * eps)


def _bco_pair(t: _Terms, s: DPOSettings) -> Array:
    return -jax.nn.log_sigmoid(s.beta * t.chosen_ratio) - jax.nn.log_sigmoid(-s.beta * t.rejected_ratio)


def _sppo_hard(t: _Terms, s: DPOSettings) -> Array:
    # hard win probabilities: the chosen log-ratio is pulled to +1/(2 beta), the rejected one to -1/(2 beta)
    return jnp.square(t.chosen_ratio - 0.5 / s.beta) + jnp.square(t.rejected_ratio + 0.5 / s.beta)


def _aot(t: _Terms, s: DPOSettings) -> Array:
    # distributional dominance: the sorted policy margins against the sorted reference margins
    lp = t.lp
    d = jnp.sort(lp.policy_chosen - lp.policy_rejected) - jnp.sort(lp.ref_chosen - lp.ref_rejected)
    return _log_sigmoid_pair(s.beta * d, s.label_smoothing)


def _aot_unpaired(t: _Terms, s: DPOSettings) -> Array:
    d = jnp.sort(t.chosen_ratio) - jnp.sort(t.rejected_ratio)
    return _log_sigmoid_pair(s.beta * d, s.label_smoothing)


def _apo_zero(t: _Terms, s: DPOSettings) -> Array:
    return (1.0 - jax.nn.sigmoid(s.beta * t.chosen_ratio)) + jax.nn.sigmoid(s.beta * t.rejected_ratio)


def _apo_down(t: _Terms, s: DPOSettings) -> Array:
    return (jax.nn.sigmoid(s.beta * t.chosen_ratio)
            + (1.0 - jax.nn.sigmoid(s.beta * (t.chosen_ratio - t.rejected_ratio))))


def _discopop(t: _Terms, s: DPOSettings) -> Array:
    # logistic and exponential losses mixed by sigmoid(x / tau)
    x = s.beta * t.delta
    mix = jax.nn.sigmoid(x / s.discopop_tau)
    return -jax.nn.log_sigmoid(x) * (1.0 - mix) + jnp.exp(-x) * mix


def _sft(t: _Terms, s: DPOSettings) -> Array:
    # one batch-level value, the mean NLL over all chosen completion tokens, repeated per row
    n = jnp.sum(_tokens(t.lp.chosen_tokens, "sft", "chosen"))
    return jnp.broadcast_to(-jnp.sum(t.lp.policy_chosen) / n, t.lp.policy_chosen.shape)


LOSSES: Mapping[str, Callable[[_Terms, DPOSettings], Array]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}
LOSS_TYPES = tuple(LOSSES)


def _terms(lp: PairLogps, s: DPOSettings) -> _Terms:
    shapes = {lp.policy_chosen.shape, lp.policy_rejected.shape, lp.ref_chosen.shape, lp.ref_rejected.shape}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"PairLogps: the four log-probs must share one [B] shape, got {sorted(shapes)}")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    cr = f32(lp.policy_chosen) - f32(lp.ref_chosen)
    rr = f32(lp.policy_rejected) - f32(lp.ref_rejected)
    return _Terms(lp, cr, rr, _scores(cr, s), _scores(rr, s))


def per_sequence_losses(lp: PairLogps, settings: DPOSettings | None = None) -> dict[str, Array]:
    """Each configured loss type's per-pair loss `[B]` (unweighted)."""
    s = settings or DPOSettings()
    t = _terms(lp, s)
    return {name: LOSSES[name](t, s) for name in s.loss_type}


def preference_metrics(lp: PairLogps, beta: float = 0.1) -> dict[str, Array]:
    """TRL's reward and log-prob metrics, batch means (from the log-ratios, whatever the f-divergence); not
    differentiated."""
    pc, pr, c, r = (jax.lax.stop_gradient(x.astype(jnp.float32))
                    for x in (lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected))
    rc, rr = beta * (pc - c), beta * (pr - r)
    return {"rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr),
            "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)), "rewards/margins": jnp.mean(rc - rr),
            "logps/chosen": jnp.mean(pc), "logps/rejected": jnp.mean(pr)}


def preference_loss(lp: PairLogps, settings: DPOSettings | None = None) -> tuple[Array, dict[str, Array]]:
    """The weighted sum over loss types of each one's batch-mean loss, and TRL's metrics (plus `loss`)."""
    s = settings or DPOSettings()
    per = per_sequence_losses(lp, s)
    loss = sum(w * jnp.mean(per[name]) for name, w in zip(s.loss_type, s.weights))
    return loss, {"loss": jax.lax.stop_gradient(loss), **preference_metrics(lp, s.beta)}

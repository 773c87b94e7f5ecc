"""Multi-domain on-policy distillation (MOPD, Nemotron-Cascade 2 Eq. 4): sampled-token reverse KL."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks
from nemotron_jax.losses.aggregation import aggregate_loss, check_aggregation, masked_token_mean

sg = jax.lax.stop_gradient


def mopd_loss(
    logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    rollout_logprobs: jax.Array,
    mask: jax.Array,
    *,
    is_low: float = 0.5,
    is_high: float = 2.0,
    aggregation: str = "seq_mean_token_mean",
    num_tokens: Any = None,
    num_sequences: Any = None,
    max_tokens: Any = None,
    old_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MOPD loss: a policy gradient whose per-token advantage is the teacher-student log-prob gap.

    Per valid token t (all log-probs are of the token the rollout engine sampled), with o_t the training
    engine's log-prob under the parameters that generated the batch (`old_logprobs`; by default
    stop_gradient(logprobs), which it equals on the first minibatch of a step):
      a_t = sg(teacher_logprobs - o_t)                 sampled-token reverse-KL advantage,
      r_t = exp(o_t - rollout_logprobs)                training engine vs. inference engine,
      w_t = r_t * 1[is_low <= r_t <= is_high]          ICE-POP masked importance weight (stop-gradient),
      L_t = -w_t * a_t * logprobs,
    aggregated by `aggregate_loss`. This is NeMo-RL's MOPD (its OPD advantage estimator `teacher - prev`,
    then the REINFORCE loss `-A * logprobs` with ICE-POP weights `exp(prev - generation)`), so on a later
    minibatch (current != old) the advantage and weight stay those of the rollout, not of the live
    parameters. The default aggregation is the paper's per-sequence 1/|V(y)| (Eq. 4); NeMo-RL's MOPD recipe
    uses a token-level loss: pass `aggregation="token_mean"` to match it. The gradient is
    -w_t a_t grad log pi; minimising it lowers KL(pi || pi_teacher).

    Args:
      logprobs: `[B, T]` float, log pi_train of the sampled tokens (differentiated).
      teacher_logprobs: `[B, T]` float, the domain teacher's log-probs of the same tokens.
      rollout_logprobs: `[B, T]` float, the inference engine's log-probs of the same tokens.
      old_logprobs: optional `[B, T]` float, the training engine's log-probs under the parameters that
        generated the batch (no gradient flows into them); default stop_gradient(logprobs).
      mask: `[B, T]` bool/numeric, valid (trainable) response tokens; other positions are ignored.
      is_low, is_high: importance-weight band, 0 <= is_low <= is_high (paper: 0.5, 2.0).
      aggregation, num_tokens, num_sequences, max_tokens: see `aggregate_loss`.

    Returns:
      `(loss, metrics)`, metrics float32 scalars normalised by `num_tokens` (this batch's when None):
        "mean_advantage": mean a_t over valid tokens, i.e. minus the sampled-token estimate of
          KL(pi_train || pi_teacher); "reverse_kl_estimate" is its negation;
        "is_masked_fraction": valid tokens whose weight is zero (r_t outside [is_low, is_high]);
        "mean_is_weight": mean w_t.

    Raises:
      ValueError: shapes differ, unknown aggregation, is_low > is_high or negative bounds.
    """
    check_aggregation(aggregation)
    logprobs, teacher_logprobs, rollout_logprobs, mask = (
        _checks.as_array(x) for x in (logprobs, teacher_logprobs, rollout_logprobs, mask)
    )
    _checks.check_rank("logprobs", logprobs, 2)
    _checks.check_floating("logprobs", logprobs)
    _checks.check_same_shape("teacher_logprobs", teacher_logprobs, "logprobs", logprobs)
    _checks.check_same_shape("rollout_logprobs", rollout_logprobs, "logprobs", logprobs)
    _checks.check_same_shape("mask", mask, "logprobs", logprobs)
    if old_logprobs is not None:
        old_logprobs = _checks.as_array(old_logprobs)
        _checks.check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    _checks.check_importance_band(is_low, is_high)

    dtype = _checks.compute_dtype(logprobs, teacher_logprobs, rollout_logprobs, old_logprobs)
    zero = jnp.zeros((), dtype)
    valid = mask != 0
    logprobs = jnp.where(valid, jnp.asarray(logprobs, dtype), zero)
    teacher_logprobs = jnp.where(valid, jnp.asarray(teacher_logprobs, dtype), zero)
    rollout_logprobs = jnp.where(valid, jnp.asarray(rollout_logprobs, dtype), zero)

    old = sg(logprobs) if old_logprobs is None else sg(jnp.where(valid, jnp.asarray(old_logprobs, dtype), zero))
    advantage = sg(teacher_logprobs - old)
    ratio = sg(jnp.exp(old - rollout_logprobs))
    ratio = jnp.where(jnp.isfinite(ratio), ratio, zero)  # NeMo-RL's nan_to_num of the weight
    keep = (ratio >= is_low) & (ratio <= is_high)
    weight = jnp.where(keep, ratio, zero)
    per_token = -weight * advantage * logprobs
    loss = aggregate_loss(
        per_token,
        mask,
        aggregation,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        max_tokens=max_tokens,
    )
    mean_advantage = masked_token_mean(advantage, mask, num_tokens)
    metrics = {
        "mean_advantage": mean_advantage,
        "reverse_kl_estimate": -mean_advantage,
        "is_masked_fraction": masked_token_mean((~keep).astype(dtype), mask, num_tokens),
        "mean_is_weight": masked_token_mean(weight, mask, num_tokens),
    }
    return loss, {name: value.astype(jnp.float32) for name, value in metrics.items()}

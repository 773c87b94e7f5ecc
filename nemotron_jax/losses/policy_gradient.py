"""GRPO-family policy-gradient losses with train/rollout importance-sampling corrections."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks
from nemotron_jax.losses.aggregation import aggregate_loss, check_aggregation, masked_token_mean, sequence_mean

RATIO_KINDS = ("ppo", "on_policy", "gspo", "cispo")
IS_CORRECTIONS = (None, "is", "tis", "icepop", "seq_mask_tis")
IS_LEVELS = ("token", "sequence")

sg = jax.lax.stop_gradient


def _broadcast_advantages(advantages: jax.Array, logprobs: jax.Array) -> jax.Array:
    batch, length = jnp.shape(logprobs)
    if jnp.shape(advantages) == (batch,):
        return jnp.broadcast_to(jnp.reshape(advantages, (batch, 1)), (batch, length))
    if jnp.shape(advantages) == (batch, length):
        return advantages
    raise ValueError(
        f"advantages must have shape [B]={(batch,)} or [B, T]={(batch, length)} to match logprobs, "
        f"got {jnp.shape(advantages)}"
    )


def importance_weights(
    old_logprobs: jax.Array,
    rollout_logprobs: jax.Array,
    mask: jax.Array,
    is_correction: str,
    is_low: Any,
    is_high: Any,
    *,
    level: str = "token",
) -> tuple[jax.Array, jax.Array]:
    """Train/rollout importance weights, stop-gradient. Returns `(weights [B, T], dropped [B, T] bool)`.

    level="token": w = exp(old_logprobs - rollout_logprobs) per token;
    level="sequence": w_b = exp(sum_t (old_logprobs - rollout_logprobs)) per sequence (the product of its
      token ratios, NeMo-RL's `sequence_level_importance_ratios`), the same for all its tokens.
    A weight that overflows to infinity is 0 (NeMo-RL's nan_to_num). Then
      "is":           w                                             (untruncated; nothing dropped)
      "tis":          clip(w, is_low, is_high)                      (dropped: tokens whose w was clipped)
      "icepop":       w * 1[is_low <= w <= is_high]                 (dropped: tokens zeroed)
      "seq_mask_tis": w * 1[is_low <= g_b <= is_high], g_b = exp(masked mean_t log w) per sequence
                      (token level only; the per-token weights of kept sequences are not truncated;
                      dropped: tokens zeroed).
    The mask selects tokens (its values do not scale the log-ratios).
    """
    _checks.check_choice("level", level, IS_LEVELS)
    if level == "sequence" and is_correction == "seq_mask_tis":
        raise ValueError("is_correction='seq_mask_tis' masks sequences by their mean token log-ratio and keeps "
                         "token-level weights; it cannot be combined with sequence-level importance weights "
                         "(NeMo-RL rejects the same combination)")
    # The mask selects tokens; its value (a fractional loss weight) must not scale the log-ratio.
    log_w = sg(jnp.where(mask != 0, old_logprobs - rollout_logprobs, jnp.zeros((), old_logprobs.dtype)))
    if level == "sequence":
        log_w = jnp.broadcast_to(jnp.sum(log_w, axis=1, keepdims=True), log_w.shape)
    weights = jnp.exp(log_w)
    weights = jnp.where(jnp.isfinite(weights), weights, 0.0)
    if is_correction == "is":
        return weights, jnp.zeros(weights.shape, bool)
    if is_correction == "tis":
        dropped = (weights > is_high) | (weights < is_low)
        return jnp.clip(weights, is_low, is_high), dropped
    if is_correction == "icepop":
        keep = (weights >= is_low) & (weights <= is_high)
    else:  # seq_mask_tis
        sequence_weight = jnp.exp(sequence_mean(log_w, mask))
        keep = jnp.broadcast_to((sequence_weight >= is_low) & (sequence_weight <= is_high), weights.shape)
    return jnp.where(keep, weights, 0.0), ~keep


def policy_gradient_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    rollout_logprobs: jax.Array | None = None,
    ratio: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    is_correction: str | None = None,
    is_low: float = 0.5,
    is_high: float = 2.0,
    is_level: str = "token",
    aggregation: str = "token_mean",
    num_tokens: Any = None,
    num_sequences: Any = None,
    max_tokens: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (PPO / strict on-policy GRPO / GSPO / CISPO), to be minimised.

    Per token, with A the advantage and r the ratio:
      ratio="ppo":       r = exp(logprobs - old_logprobs);
                         L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)).
      ratio="on_policy": r = exp(logprobs - stop_gradient(logprobs)), value 1 and gradient grad log pi;
                         L = -A r (Cascade-2's strict on-policy GRPO; clipping can never be active).
                         `old_logprobs` may be None here; it then stands for stop_gradient(logprobs) in the
                         importance weights below.
      ratio="gspo":      r_b = exp(masked mean_t (logprobs - old_logprobs)) per sequence, the same for all its
                         tokens, clipped like "ppo" (GSPO uses much tighter clip ranges than PPO).
      ratio="cispo":     L = -A sg(clip(r, 1 - clip_low, 1 + clip_high)) logprobs with the token-level r.
      dual_clip=c (ppo/gspo/on_policy): where A < 0, L = min(L, -A c); c must be > 1.
    With is_correction, L -> w L with the stop-gradient weights of `importance_weights`
    (w = exp(old_logprobs - rollout_logprobs): the rollout engine's sampling vs. the training engine), per
    token (`is_level="token"`, the default, for every ratio) or per sequence (`is_level="sequence"`:
    w_b = exp(sum_t (old - rollout)), what NeMo-RL uses with GSPO).
    The result is aggregated by `aggregate_loss(L, mask, aggregation, num_tokens=..., num_sequences=...,
    max_tokens=...)`; pass the whole batch's counts to make micro-batch losses add up to the full-batch loss.

    Args:
      logprobs: `[B, T]` float, log pi_theta of the sampled tokens (the live, differentiated policy).
      old_logprobs: `[B, T]` float, log-probs under the parameters that generated the batch, as computed by
        the training engine (no gradient flows into them). May be None only with ratio="on_policy".
      advantages: `[B, T]` or `[B]` (broadcast over tokens) float.
      mask: `[B, T]` bool/numeric, valid response tokens. Values at invalid tokens of every input are ignored.
      rollout_logprobs: `[B, T]` float, log-probs reported by the rollout (inference) engine. Needed by
        `is_correction`; when given, the mismatch metric is reported.
      ratio: "ppo", "on_policy", "gspo" or "cispo".
      clip_low, clip_high: >= 0; the ratio is clipped to [1 - clip_low, 1 + clip_high].
      dual_clip: None or a number > 1 (not with "cispo").
      is_correction: None, "is" (untruncated), "tis" (clipped to [is_low, is_high]), "icepop" or
        "seq_mask_tis" (not with ratio="gspo" nor is_level="sequence", as in NeMo-RL).
      is_low, is_high: bounds of the importance weight, 0 <= is_low <= is_high, is_high > 0. For NeMo-RL's
        "tis" without `truncated_importance_sampling_ratio_min`, pass is_low=0.
      is_level: "token" (default) or "sequence", see above.
      aggregation, num_tokens, num_sequences, max_tokens: see `aggregate_loss`.

    Returns:
      `(loss, metrics)`: loss a float32 scalar; metrics a dict of float32 scalars, each a sum over valid
      tokens divided by `num_tokens` (this batch's count when None), so with the global `num_tokens` they too
      add up over micro-batches:
        "clip_fraction": tokens whose gradient the (PPO/GSPO) clip removed, or whose ratio CISPO truncated;
        "dual_clip_fraction" (with dual_clip): tokens where the dual clip is active;
        "mean_ratio": mean r;
        "is_masked_fraction" (icepop/seq_mask_tis) or "is_truncated_fraction" (tis): tokens whose importance
          weight was zeroed / clipped; "mean_is_weight" (with is_correction);
        "rollout_logprob_abs_diff" (with rollout_logprobs): mean |old_logprobs - rollout_logprobs|, the
          training/rollout engine mismatch.

    Raises:
      ValueError (at trace time): unknown `ratio`/`is_correction`/`aggregation`; is_low > is_high; bad clip
      values; shape mismatches; missing rollout_logprobs or old_logprobs.
    """
    _checks.check_choice("ratio", ratio, RATIO_KINDS)
    _checks.check_choice("is_correction", is_correction, IS_CORRECTIONS)
    _checks.check_choice("is_level", is_level, IS_LEVELS)
    if is_correction == "seq_mask_tis" and (ratio == "gspo" or is_level == "sequence"):
        raise ValueError(f"is_correction='seq_mask_tis' cannot be combined with ratio={ratio!r}, "
                         f"is_level={is_level!r}: it masks sequences but keeps token-level weights, while GSPO "
                         "works with sequence-level ratios (NeMo-RL rejects the same combination)")
    check_aggregation(aggregation)
    logprobs, old_logprobs, advantages, mask, rollout_logprobs = (
        _checks.as_array(x) for x in (logprobs, old_logprobs, advantages, mask, rollout_logprobs)
    )
    _checks.check_rank("logprobs", logprobs, 2)
    _checks.check_floating("logprobs", logprobs)
    _checks.check_same_shape("mask", mask, "logprobs", logprobs)
    if old_logprobs is None:
        if ratio != "on_policy":
            raise ValueError(f"old_logprobs is required for ratio={ratio!r} (only 'on_policy' may omit it)")
    else:
        _checks.check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    if rollout_logprobs is not None:
        _checks.check_same_shape("rollout_logprobs", rollout_logprobs, "logprobs", logprobs)
    elif is_correction is not None:
        raise ValueError(f"is_correction={is_correction!r} needs rollout_logprobs")
    _checks.check_number("clip_low", clip_low, minimum=0.0)
    _checks.check_number("clip_high", clip_high, minimum=0.0)
    if dual_clip is not None:
        if ratio == "cispo":
            raise ValueError("dual_clip is not defined for ratio='cispo'")
        _checks.check_number("dual_clip", dual_clip, minimum=1.0, exclusive_minimum=True)
    if is_correction is not None:
        _checks.check_importance_band(is_low, is_high)
    advantages = _broadcast_advantages(advantages, logprobs)

    dtype = _checks.compute_dtype(logprobs, old_logprobs, advantages, rollout_logprobs)
    zero = jnp.zeros((), dtype)
    valid = mask != 0
    # Zero every input at invalid tokens first: exp() of garbage there would give inf/NaN gradients.
    logprobs = jnp.where(valid, jnp.asarray(logprobs, dtype), zero)
    advantages = jnp.where(valid, jnp.asarray(advantages, dtype), zero)
    if old_logprobs is None:
        old_logprobs = sg(logprobs)
    else:
        old_logprobs = sg(jnp.where(valid, jnp.asarray(old_logprobs, dtype), zero))
    if rollout_logprobs is not None:
        rollout_logprobs = jnp.where(valid, jnp.asarray(rollout_logprobs, dtype), zero)

    if ratio == "on_policy":
        token_ratio = jnp.exp(logprobs - sg(logprobs))
    elif ratio == "gspo":
        token_ratio = jnp.broadcast_to(jnp.exp(sequence_mean(logprobs - old_logprobs, mask)), logprobs.shape)
    else:
        token_ratio = jnp.exp(logprobs - old_logprobs)
    clipped_ratio = jnp.clip(token_ratio, 1.0 - clip_low, 1.0 + clip_high)

    metrics: dict[str, jax.Array] = {}
    if ratio == "on_policy":
        per_token = -advantages * token_ratio
        clipped = jnp.zeros(logprobs.shape, bool)
    elif ratio == "cispo":
        per_token = -advantages * sg(clipped_ratio) * logprobs
        clipped = clipped_ratio != token_ratio
    else:
        unclipped_loss = -advantages * token_ratio
        clipped_loss = -advantages * clipped_ratio
        # Strictly greater: at a tie the unclipped branch (and its gradient) is used.
        clipped = clipped_loss > unclipped_loss
        per_token = jnp.where(clipped, clipped_loss, unclipped_loss)
    if dual_clip is not None:
        dual_clip_loss = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (dual_clip_loss < per_token)
        per_token = jnp.where(dual_clipped, dual_clip_loss, per_token)
        metrics["dual_clip_fraction"] = masked_token_mean(dual_clipped.astype(dtype), mask, num_tokens)
    metrics["clip_fraction"] = masked_token_mean(clipped.astype(dtype), mask, num_tokens)
    metrics["mean_ratio"] = masked_token_mean(sg(token_ratio), mask, num_tokens)

    if is_correction is not None:
        weights, dropped = importance_weights(old_logprobs, rollout_logprobs, mask, is_correction, is_low, is_high,
                                              level=is_level)
        per_token = weights * per_token
        if is_correction != "is":
            fraction_name = "is_truncated_fraction" if is_correction == "tis" else "is_masked_fraction"
            metrics[fraction_name] = masked_token_mean(dropped.astype(dtype), mask, num_tokens)
        metrics["mean_is_weight"] = masked_token_mean(weights, mask, num_tokens)
    if rollout_logprobs is not None:
        metrics["rollout_logprob_abs_diff"] = masked_token_mean(
            jnp.abs(old_logprobs - rollout_logprobs), mask, num_tokens
        )

    loss = aggregate_loss(
        per_token,
        mask,
        aggregation,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        max_tokens=max_tokens,
    )
    return loss, {name: value.astype(jnp.float32) for name, value in metrics.items()}

"""Per-token KL penalty estimators between the policy and a reference policy (Schulman's k1/k2/k3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    kind: str,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    With d = logprobs - ref_logprobs (= log pi - log pi_ref):
      k1 = d                        unbiased, can be negative per token;
      k2 = d^2 / 2                  biased, >= 0;
      k3 = exp(-d) - (-d) - 1       unbiased, >= 0 (NeMo-RL's default).

    Add it to a loss with the same aggregation as the loss, e.g.
    `loss + beta * aggregate_loss(kl_penalty(lp, ref_lp, "k3", mask=mask), mask, "token_mean", ...)`.
    Gradients flow to both inputs; pass `jax.lax.stop_gradient(ref_logprobs)` if the reference is frozen
    (it normally is an input computed without gradient anyway).

    Args:
      logprobs: `[B, T]` (any shape) float log pi of the sampled tokens.
      ref_logprobs: same shape, log pi_ref of the same tokens.
      kind: "k1", "k2" or "k3".
      mask: optional, same shape; where `mask == 0` the result is 0 and the inputs are not evaluated (so padded
        positions holding -inf or NaN do not produce NaN values or gradients).

    Returns:
      Per-token float32 values of the input shape (float64 for float64 inputs).

    Raises:
      ValueError: unknown `kind`, mismatched shapes, non-float inputs.
    """
    _checks.check_choice("kind", kind, KL_KINDS)
    logprobs, ref_logprobs, mask = (_checks.as_array(x) for x in (logprobs, ref_logprobs, mask))
    _checks.check_floating("logprobs", logprobs)
    _checks.check_floating("ref_logprobs", ref_logprobs)
    _checks.check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    dtype = _checks.compute_dtype(logprobs, ref_logprobs)
    log_ratio = jnp.asarray(logprobs, dtype) - jnp.asarray(ref_logprobs, dtype)
    if mask is not None:
        _checks.check_same_shape("mask", mask, "logprobs", logprobs)
        log_ratio = jnp.where(mask != 0, log_ratio, jnp.zeros((), dtype))
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    # k3; expm1 keeps precision when log_ratio is small (exp(-d) - 1 + d without cancellation).
    return jnp.expm1(-log_ratio) + log_ratio

"""Per-token KL penalty between the policy and a reference policy (Schulman's k1/k2/k3 estimators), with
NeMo-RL's gradient (score-function form), on-policy approximation and clamps."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks

KL_KINDS = ("k1", "k2", "k3")
KL_GRADIENTS = ("score_function", "pathwise")

sg = jax.lax.stop_gradient


def _estimate(kind: str, log_ratio: jax.Array) -> jax.Array:
    """k(r) of log_ratio = log pi_ref - log pi (NeMo-RL's `logr`)."""
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    # k3 = exp(logr) - 1 - logr; expm1 keeps precision when logr is small.
    return jnp.expm1(log_ratio) - log_ratio


def _score_function_gradients(kind: str, log_ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(d/d logprobs, d/d ref_logprobs) of w * k with w = exp(logprobs - stop_gradient(logprobs)), at w = 1.

    d/d logprobs = k + dk/d logprobs: for k3 that is exp(logr) - 1 - logr + 1 - exp(logr) = -logr, computed
    directly (the two exponentials cancel, which loses all precision in float32 once exp(logr) is large).
    """
    if kind == "k1":  # k = -logr; dk/dlp = 1
        return -log_ratio + 1.0, -jnp.ones_like(log_ratio)
    if kind == "k2":  # k = logr^2 / 2; dk/dlp = -logr
        return 0.5 * jnp.square(log_ratio) - log_ratio, log_ratio
    return -log_ratio, jnp.expm1(log_ratio)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _score_function_kl(kind, logprobs, ref_logprobs, log_weight, input_clamp, output_clamp):
    return _score_function_kl_forward(kind, logprobs, ref_logprobs, log_weight, input_clamp, output_clamp)[0]


def _score_function_kl_forward(kind, logprobs, ref_logprobs, log_weight, input_clamp, output_clamp):
    log_ratio = ref_logprobs - logprobs
    clamped_ratio = jnp.clip(log_ratio, -input_clamp, input_clamp)
    weight = jnp.exp(log_weight)
    weight = jnp.where(jnp.isfinite(weight), weight, 0.0)  # NeMo-RL's nan_to_num(nan=0, posinf=0, neginf=0)
    raw = weight * _estimate(kind, clamped_ratio)
    value = jnp.clip(raw, -output_clamp, output_clamp)
    # Where a clamp is active the token has no gradient (the input clamp also detaches the weight).
    live = (clamped_ratio == log_ratio) & (value == raw)
    return value, (log_ratio, weight, live)


def _score_function_kl_fwd(kind, logprobs, ref_logprobs, log_weight, input_clamp, output_clamp):
    value, residuals = _score_function_kl_forward(kind, logprobs, ref_logprobs, log_weight, input_clamp,
                                                  output_clamp)
    return value, (*residuals, input_clamp, output_clamp)


def _score_function_kl_bwd(kind, residuals, cotangent):
    log_ratio, weight, live, input_clamp, output_clamp = residuals
    d_logprobs, d_ref = _score_function_gradients(kind, log_ratio)
    scale = jnp.where(live, cotangent * weight, 0.0)
    zero = jnp.zeros_like(log_ratio)
    return (scale * d_logprobs, scale * d_ref, zero, jnp.zeros_like(input_clamp), jnp.zeros_like(output_clamp))


_score_function_kl.defvjp(_score_function_kl_fwd, _score_function_kl_bwd)


def kl_penalty(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    kind: str,
    *,
    mask: jax.Array | None = None,
    gradient: str = "score_function",
    sampling_logprobs: jax.Array | None = None,
    input_clamp: Any = 20.0,
    output_clamp: Any = 10.0,
) -> jax.Array:
    """Per-token KL(pi || pi_ref) penalty from log-probs of sampled tokens, as NeMo-RL computes it.

    With logr = ref_logprobs - logprobs (= log pi_ref - log pi), clamped to [-input_clamp, input_clamp]:
      k1 = -logr                    unbiased, can be negative per token;
      k2 = logr^2 / 2               biased, >= 0;
      k3 = exp(logr) - 1 - logr     unbiased, >= 0 (NeMo-RL's default);
    value = clip(w * k, -output_clamp, output_clamp), with w = 1, or with `sampling_logprobs` (NeMo-RL's
    `use_on_policy_kl_approximation`) w = exp(logprobs - sampling_logprobs) (0 where that overflows).

    `gradient` selects how the estimate is differentiated w.r.t. `logprobs`:
      "score_function" (default, NeMo-RL): the samples come from pi itself, so the gradient of E_pi[k]
        includes the score-function term: the loss is w * k with w carrying exp(lp - stop_gradient(lp)).
        d/d logprobs = w (k + dk/d logprobs), computed in closed form: k1: 1 - logr; k2: logr^2/2 - logr;
        k3: -logr = logprobs - ref_logprobs (bounded; no exp(logr) terms to cancel in float32).
      "pathwise": the derivative of the value alone (k3: 1 - pi_ref / pi, which explodes where
        pi_ref >> pi); the gradient this function had before, and what GRPO implementations that put k3
        in the loss (e.g. DeepSeek's) differentiate. With `sampling_logprobs`, w is then a constant.
    Either way, a token where a clamp is active gets no gradient (for "score_function" the input clamp also
    detaches w, as in NeMo-RL), and `ref_logprobs` receives w * dk/d ref_logprobs; `sampling_logprobs` is
    data (no gradient).

    Add it to a loss with the loss's aggregation, e.g.
    `loss + beta * aggregate_loss(kl_penalty(lp, ref_lp, "k3", mask=mask), mask, "token_mean", ...)`
    (NeMo-RL: `reference_policy_kl_penalty` = beta, aggregated like the policy loss).

    Args:
      logprobs: `[B, T]` (any shape) float log pi of the sampled tokens (the differentiated policy).
      ref_logprobs: same shape, log pi_ref of the same tokens.
      kind: "k1", "k2" or "k3".
      mask: optional, same shape; where `mask == 0` the result is 0 and the inputs are not evaluated (so padded
        positions holding -inf or NaN do not produce NaN values or gradients).
      gradient: "score_function" (default) or "pathwise".
      sampling_logprobs: optional, same shape: log-probs under the policy that sampled the tokens (the rollout
        engine's); turns on the on-policy KL approximation weight w.
      input_clamp, output_clamp: bounds of |logr| and |w k| (NeMo-RL's `kl_input_clamp_value` 20 and
        `kl_output_clamp_value` 10); None disables a clamp.

    Returns:
      Per-token float32 values of the input shape (float64 for float64 inputs).

    Raises:
      ValueError: unknown `kind`/`gradient`, mismatched shapes, non-float inputs, non-positive clamps.
    """
    _checks.check_choice("kind", kind, KL_KINDS)
    _checks.check_choice("gradient", gradient, KL_GRADIENTS)
    logprobs, ref_logprobs, mask, sampling_logprobs = (
        _checks.as_array(x) for x in (logprobs, ref_logprobs, mask, sampling_logprobs))
    _checks.check_floating("logprobs", logprobs)
    _checks.check_floating("ref_logprobs", ref_logprobs)
    _checks.check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if sampling_logprobs is not None:
        _checks.check_floating("sampling_logprobs", sampling_logprobs)
        _checks.check_same_shape("sampling_logprobs", sampling_logprobs, "logprobs", logprobs)
    for name, clamp in (("input_clamp", input_clamp), ("output_clamp", output_clamp)):
        if clamp is not None:
            _checks.check_number(name, clamp, minimum=0.0, exclusive_minimum=True)
    dtype = _checks.compute_dtype(logprobs, ref_logprobs, sampling_logprobs)
    zero = jnp.zeros((), dtype)
    logprobs = jnp.asarray(logprobs, dtype)
    ref_logprobs = jnp.asarray(ref_logprobs, dtype)
    if mask is not None:
        _checks.check_same_shape("mask", mask, "logprobs", logprobs)
        valid = mask != 0
        logprobs = jnp.where(valid, logprobs, zero)
        ref_logprobs = jnp.where(valid, ref_logprobs, zero)
    if sampling_logprobs is None:
        log_weight = jnp.zeros(logprobs.shape, dtype)
    else:
        log_weight = sg(logprobs) - sg(jnp.asarray(sampling_logprobs, dtype))
        if mask is not None:
            log_weight = jnp.where(valid, log_weight, zero)
    inf = jnp.asarray(jnp.inf, dtype)
    input_bound = inf if input_clamp is None else jnp.asarray(input_clamp, dtype)
    output_bound = inf if output_clamp is None else jnp.asarray(output_clamp, dtype)

    if gradient == "score_function":
        values = _score_function_kl(kind, logprobs, ref_logprobs, log_weight, input_bound, output_bound)
    else:
        log_ratio = jnp.clip(ref_logprobs - logprobs, -input_bound, input_bound)
        weight = jnp.exp(log_weight)
        weight = jnp.where(jnp.isfinite(weight), weight, zero)
        values = jnp.clip(weight * _estimate(kind, log_ratio), -output_bound, output_bound)
    if mask is not None:
        values = jnp.where(valid, values, zero)
    return values

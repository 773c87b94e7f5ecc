"""Supervised fine-tuning loss (token-level negative log-likelihood)."""

from __future__ import annotations

from typing import Any

import jax

from nemotron_jax.losses import _checks
from nemotron_jax.losses.aggregation import aggregate_loss


def sft_loss(
    logprobs: jax.Array,
    loss_mask: jax.Array,
    *,
    num_tokens: Any = None,
    aggregation: str = "token_mean",
    num_sequences: Any = None,
    max_tokens: Any = None,
) -> jax.Array:
    """Mean negative log-likelihood over loss tokens: `-sum(loss_mask * logprobs) / num_tokens`.

    Args:
      logprobs: `[B, T]` float log-probs of the target tokens (e.g. from `token_logprobs`).
      loss_mask: `[B, T]` bool/numeric, the tokens trained on (assistant turns); others are ignored, even if
        they hold -inf or NaN.
      num_tokens: scalar normaliser; defaults to `sum(loss_mask)` of this batch. Pass the global count so
        that micro-batch losses add up to the full-batch loss.
      aggregation, num_sequences, max_tokens: another `aggregate_loss` reduction of the per-token NLL, if
        wanted (default: the token mean above).

    Returns:
      float32 scalar (0 when there are no loss tokens).

    Raises:
      ValueError: shape mismatch, non-float logprobs, unknown aggregation.
    """
    logprobs, loss_mask = _checks.as_array(logprobs), _checks.as_array(loss_mask)
    _checks.check_floating("logprobs", logprobs)
    _checks.check_rank("logprobs", logprobs, 2)
    _checks.check_same_shape("loss_mask", loss_mask, "logprobs", logprobs)
    return aggregate_loss(
        -logprobs,
        loss_mask,
        aggregation,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        max_tokens=max_tokens,
    )

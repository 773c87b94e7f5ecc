"""Reducing per-token losses to a scalar, with normalisers that can be global.

Every loss in this package reduces its `[B, T]` per-token values through `aggregate_loss`. The normalisers
(`num_tokens`, `num_sequences`, `max_tokens`) are inputs: left as `None` they are this batch's own counts;
given the counts of the whole (global) batch, every aggregation becomes a plain sum over sequences, so the
sum of the losses of micro-batches equals the loss of the full batch, and so do the gradients.

Masks are `[B, T]`, boolean or numeric. A token is *valid* where `mask != 0`; numeric masks also weight the
token (`mask * L`), and counts use the mask values (`num_tokens = sum(mask)`). Values of `L` at invalid
tokens never reach the result, even when they are NaN or infinite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def check_aggregation(aggregation: str) -> None:
    """Raises ValueError for an unknown aggregation name."""
    _checks.check_choice("aggregation", aggregation, AGGREGATIONS)


def token_and_sequence_counts(mask: jax.Array, *, count_empty_rows: bool = False) -> tuple[jax.Array, jax.Array]:
    """The default normalisers of a batch: `(num_tokens, num_sequences)`, float32 scalars.

    Args:
      mask: `[B, T]` bool or numeric; valid tokens are `mask != 0`.
      count_empty_rows: count every row as a sequence (`num_sequences = B`), as NeMo-RL does (its
        `global_valid_seqs` is the number of valid samples, including those whose token mask is empty, e.g.
        a response cut to zero trainable tokens). Rows that are not samples at all (padding rows) should then
        be dropped from the batch, or their count subtracted.

    Returns:
      `num_tokens = sum(mask)`; `num_sequences` = the number of rows with at least one valid token (a row
      whose mask is all zero is not a sequence: it adds nothing to any loss and is not counted), or `B` with
      `count_empty_rows`. Compute these on the whole batch before splitting it into micro-batches and pass
      them to every micro-batch's loss.
    """
    mask = _checks.as_array(mask)
    _checks.check_rank("mask", mask, 2)
    weights = jnp.asarray(mask, jnp.float32)
    num_tokens = jnp.sum(weights)
    if count_empty_rows:
        num_sequences = jnp.asarray(mask.shape[0], jnp.float32)
    else:
        num_sequences = jnp.sum(jnp.any(mask != 0, axis=1).astype(jnp.float32))
    return num_tokens, num_sequences


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0 (with a finite gradient there too)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`mask * values` where `mask != 0`, exactly 0 elsewhere (also when `values` is NaN there)."""
    weights = jnp.asarray(mask, values.dtype) if jnp.issubdtype(values.dtype, jnp.floating) else mask
    return jnp.where(mask != 0, values * weights, jnp.zeros((), values.dtype))


def masked_token_mean(values: jax.Array, mask: jax.Array, num_tokens: Any = None) -> jax.Array:
    """`sum(mask * values) / num_tokens` (num_tokens defaults to `sum(mask)`); 0 when there are no tokens.

    Used for metrics: with the global `num_tokens` these also add up over micro-batches.
    """
    dtype = _checks.compute_dtype(values)
    values = jnp.asarray(values, dtype)
    if num_tokens is None:
        num_tokens = jnp.sum(jnp.asarray(mask, dtype))
    return safe_divide(jnp.sum(masked(values, mask)), jnp.asarray(num_tokens, dtype))


def sequence_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, T] -> [B, 1]`: `sum_t mask*values / sum_t mask` of each row (0 for a row without valid tokens)."""
    total = jnp.sum(masked(values, mask), axis=1, keepdims=True)
    return safe_divide(total, jnp.sum(jnp.asarray(mask, values.dtype), axis=1, keepdims=True))


def aggregate_loss(
    per_token_loss: jax.Array,
    mask: jax.Array,
    aggregation: str = "token_mean",
    *,
    num_tokens: Any = None,
    num_sequences: Any = None,
    max_tokens: Any = None,
) -> jax.Array:
    """Reduces a `[B, T]` per-token loss `L` to a scalar.

    Args:
      per_token_loss: `[B, T]` float.
      mask: `[B, T]` bool or numeric (see the module docstring).
      aggregation: one of
        - `"token_mean"`: `sum_{b,t} mask*L / num_tokens`.
        - `"seq_mean_token_mean"`: `(1/num_sequences) sum_b (sum_t mask*L / sum_t mask)`; a row with no valid
          token contributes 0 (not NaN).
        - `"seq_mean_token_sum"`: `(1/num_sequences) sum_b sum_t mask*L`.
        - `"seq_mean_token_sum_norm"` (Dr. GRPO): `sum_{b,t} mask*L / (num_sequences * max_tokens)`.
      num_tokens: scalar; defaults to `sum(mask)` of this batch. Used by `"token_mean"`.
      num_sequences: scalar; defaults to the number of rows of this batch that have at least one valid token.
        Rows whose mask is all zero (padding rows, filtered samples) are NOT counted, so the global value to
        pass is the number of non-empty rows of the whole batch (`token_and_sequence_counts`). Used by the
        three `seq_mean_*` aggregations. NeMo-RL divides by the number of valid samples instead, counting a
        sample whose token mask is empty (it contributes 0): pass that count (e.g.
        `token_and_sequence_counts(mask, count_empty_rows=True)`) to match it.
      max_tokens: scalar; defaults to `T` (this batch's padded length). Used by `"seq_mean_token_sum_norm"`;
        Dr. GRPO uses a constant here (the maximum generation length), and micro-batches padded to different
        lengths need that constant for their losses to add up.

    Returns:
      float32 scalar (float64 if `per_token_loss` is float64). A zero normaliser gives a loss of 0.

    Raises:
      ValueError: unknown `aggregation`, or `mask` and `per_token_loss` shapes differ or are not rank 2.
    """
    check_aggregation(aggregation)
    per_token_loss, mask = _checks.as_array(per_token_loss), _checks.as_array(mask)
    _checks.check_rank("per_token_loss", per_token_loss, 2)
    _checks.check_same_shape("mask", mask, "per_token_loss", per_token_loss)
    dtype = _checks.compute_dtype(per_token_loss)
    per_token_loss = jnp.asarray(per_token_loss, dtype)
    contributions = masked(per_token_loss, mask)

    if aggregation == "token_mean":
        if num_tokens is None:
            num_tokens = jnp.sum(jnp.asarray(mask, dtype))
        return safe_divide(jnp.sum(contributions), jnp.asarray(num_tokens, dtype))

    if num_sequences is None:
        num_sequences = jnp.sum(jnp.any(mask != 0, axis=1).astype(dtype))
    num_sequences = jnp.asarray(num_sequences, dtype)
    if aggregation == "seq_mean_token_mean":
        return safe_divide(jnp.sum(sequence_mean(per_token_loss, mask)), num_sequences)
    if aggregation == "seq_mean_token_sum":
        return safe_divide(jnp.sum(contributions), num_sequences)
    # seq_mean_token_sum_norm
    if max_tokens is None:
        max_tokens = per_token_loss.shape[1]
    return safe_divide(jnp.sum(contributions), num_sequences * jnp.asarray(max_tokens, dtype))

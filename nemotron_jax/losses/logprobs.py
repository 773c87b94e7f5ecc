"""Per-token log-probs and entropies from final hidden states, without materialising the logits.

`token_logprobs(hidden [B, T, D], lm_head [D, V], targets [B, T])` equals
`log_softmax(hidden @ lm_head)[b, t, targets[b, t]]`, but computes it one `[token block, vocabulary chunk]`
tile at a time with a streaming logsumexp, and differentiates it with a custom VJP that recomputes each
tile's logits in the backward pass. Neither pass holds more than a few tiles; the `[B*T, V]` logits (4 GiB
at 8192 tokens x 131072 vocabulary in float32) never exist.

Tile size: `token_chunk_size x chunk_size` float32 values; the defaults (8192 x 4096) make a 128 MiB tile.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nemotron_jax.losses import _checks
from nemotron_jax.losses._chunking import (
    lm_head_backward,
    lm_head_chunk,
    merge_token_blocks,
    online_logsumexp_update,
    scan_vocab_chunks,
    sequence_rows,
    split_token_blocks,
    tile_logits,
    token_block_size,
)

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_TOKEN_CHUNK_SIZE = 8192


def _check_inputs(hidden: Any, lm_head: Any, targets: Any):
    _checks.check_floating("hidden", hidden)
    _checks.check_floating("lm_head", lm_head)
    _checks.check_rank("lm_head", lm_head, 2)
    if jnp.ndim(hidden) < 1 or jnp.shape(hidden)[-1] != jnp.shape(lm_head)[0]:
        raise ValueError(
            f"hidden must be [..., D] with D = lm_head.shape[0] = {jnp.shape(lm_head)[0]}, "
            f"got hidden shape {jnp.shape(hidden)}"
        )
    _checks.check_integer("targets", targets)
    if jnp.shape(targets) != jnp.shape(hidden)[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {jnp.shape(hidden)[:-1]}, got {jnp.shape(targets)}"
        )


def _forward(hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows):
    """Returns `(logprobs [N], entropy [N], logsumexp [N])`, all float32 (float64 for float64 inputs)."""
    num_tokens = hidden2d.shape[0]
    vocab_size = lm_head.shape[1]
    dtype = _checks.compute_dtype(hidden2d, lm_head)
    block = token_block_size(num_tokens, token_chunk_size, rows)
    hidden_blocks = split_token_blocks(hidden2d, block, rows)
    target_blocks = split_token_blocks(targets1d, block, rows)
    stats_shape = target_blocks.shape
    # Per token: running max m, sum s = sum exp(l - m), u = sum exp(l - m) * (l - m), target logit.
    stats = (
        jnp.full(stats_shape, -jnp.inf, dtype),
        jnp.zeros(stats_shape, dtype),
        jnp.zeros(stats_shape, dtype),
        jnp.zeros(stats_shape, dtype),
    )

    def vocab_chunk(stats, start, size):
        weights = lm_head_chunk(lm_head, start, size)
        vocab_ids = start + lax.iota(jnp.int32, size)

        def token_block(_, inputs):
            hidden, targets, running_max, running_sum, running_u, target_logit = inputs
            logits = tile_logits(hidden, weights, dtype, precision)
            new_max, new_sum, rescale, shifted = online_logsumexp_update(running_max, running_sum, logits)
            # u is kept relative to the running max: moving the reference from m to m' adds (m - m') * s.
            old_u = jnp.where(running_sum > 0, rescale * (running_u + (running_max - new_max) * running_sum), 0)
            new_u = old_u + jnp.sum(jnp.exp(shifted) * shifted, axis=-1)
            is_target = vocab_ids[None, :] == targets[:, None]
            new_target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0), axis=-1)
            return None, (new_max, new_sum, new_u, new_target_logit)

        _, stats = lax.scan(token_block, None, (hidden_blocks, target_blocks) + stats)
        return stats

    running_max, running_sum, running_u, target_logit = scan_vocab_chunks(
        vocab_chunk, stats, vocab_size, chunk_size
    )
    logsumexp = running_max + jnp.log(running_sum)
    entropy = jnp.log(running_sum) - running_u / running_sum
    in_range = (target_blocks >= 0) & (target_blocks < vocab_size)
    logprobs = jnp.where(in_range, target_logit - logsumexp, jnp.nan)
    return tuple(merge_token_blocks(x, num_tokens, rows) for x in (logprobs, entropy, logsumexp))


def _backward(hidden2d, lm_head, targets1d, logsumexp, entropy, logprob_grad, entropy_grad, chunk_size,
              token_chunk_size, precision, rows):
    """Gradients w.r.t. `hidden2d` and `lm_head`, one recomputed tile at a time.

    For a token with logits l, p = softmax(l), target y, log-prob lp = l_y - logsumexp(l) and entropy
    H = -sum p log p:  d lp / d l = onehot(y) - p,   d H / d l = -p * (log p + H).
    """
    vocab_size = lm_head.shape[1]
    dtype = _checks.compute_dtype(hidden2d, lm_head)
    in_range = (targets1d >= 0) & (targets1d < vocab_size)
    logprob_grad = jnp.where(in_range, logprob_grad.astype(dtype), 0)
    per_token = (targets1d, logsumexp, entropy, logprob_grad, entropy_grad.astype(dtype))

    def chunk_logits_grad(start, size):
        vocab_ids = start + lax.iota(jnp.int32, size)

        def logits_grad(logits, targets, block_logsumexp, block_entropy, block_logprob_grad, block_entropy_grad):
            log_p = logits - block_logsumexp[:, None]
            p = jnp.exp(log_p)
            is_target = (vocab_ids[None, :] == targets[:, None]).astype(dtype)
            return block_logprob_grad[:, None] * (is_target - p) - block_entropy_grad[:, None] * p * (
                log_p + block_entropy[:, None]
            )

        return logits_grad

    return lm_head_backward(hidden2d, lm_head, per_token, chunk_logits_grad, dtype, chunk_size, token_chunk_size,
                            precision, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked_logprobs_and_entropy(hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows):
    logprobs, entropy, _ = _forward(hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows)
    return logprobs, entropy


def _chunked_fwd(hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows):
    logprobs, entropy, logsumexp = _forward(
        hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows
    )
    return (logprobs, entropy), (hidden2d, lm_head, targets1d, logsumexp, entropy)


def _chunked_bwd(chunk_size, token_chunk_size, precision, rows, residuals, cotangents):
    hidden2d, lm_head, targets1d, logsumexp, entropy = residuals
    logprob_grad, entropy_grad = cotangents
    hidden_grad, lm_head_grad = _backward(
        hidden2d, lm_head, targets1d, logsumexp, entropy, logprob_grad, entropy_grad,
        chunk_size, token_chunk_size, precision, rows,
    )
    return hidden_grad, lm_head_grad, None


_chunked_logprobs_and_entropy.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_and_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = DEFAULT_TOKEN_CHUNK_SIZE,
    precision: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` and the entropy of the next-token distribution, chunked; both differentiable.

    Args:
      hidden: `[..., D]` (typically `[B, T, D]`) final hidden states, float32 or bf16.
      lm_head: `[D, V]` output projection, float32 or bf16 (a tied embedding `[V, D]` must be transposed).
      targets: `[...]` (typically `[B, T]`) int token ids in `[0, V)`. An id outside that range gives a NaN
        log-prob (never a silently wrong number) and no gradient; mask such positions out of the loss
        (`aggregate_loss` ignores values at masked positions, NaN included).
      chunk_size: vocabulary columns per tile.
      token_chunk_size: tokens per tile over all rows (None: all tokens in one block); with `[B, T]` targets a
        block takes `ceil(token_chunk_size / B)` positions of every row. Tiles hold
        `token_chunk_size * chunk_size` float32 logits; the last partial chunk/block is handled without
        padding the weight.
      precision: `jax.lax.Precision` of the matmuls (None: JAX's default, which on GPU/TPU may use reduced
        precision passes for float32 inputs; pass `jax.lax.Precision.HIGHEST` for full float32).

    Returns:
      `(logprobs, entropy)`, each float32 with the shape of `targets` (float64 for float64 inputs). Softmax
      and reductions are float32 regardless of the input dtype.

    Raises:
      ValueError: shape or dtype mismatch, non-positive chunk sizes.
    """
    hidden, lm_head, targets = (_checks.as_array(x) for x in (hidden, lm_head, targets))
    _check_inputs(hidden, lm_head, targets)
    _checks.check_chunk_sizes(chunk_size, token_chunk_size)
    batch_shape = jnp.shape(targets)
    hidden2d = jnp.reshape(hidden, (-1, jnp.shape(hidden)[-1]))
    targets1d = jnp.reshape(targets, (-1,)).astype(jnp.int32)
    if hidden2d.shape[0] == 0:
        dtype = _checks.compute_dtype(hidden, lm_head)
        empty = jnp.zeros(batch_shape, dtype)
        return empty, empty
    rows = sequence_rows(batch_shape)  # token blocks cut across rows: a sharded batch axis stays sharded
    logprobs, entropy = _chunked_logprobs_and_entropy(
        hidden2d, lm_head, targets1d, chunk_size, token_chunk_size, precision, rows
    )
    return logprobs.reshape(batch_shape), entropy.reshape(batch_shape)


def token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = DEFAULT_TOKEN_CHUNK_SIZE,
    precision: Any = None,
) -> jax.Array:
    """`log_softmax(hidden @ lm_head)` at `targets`, float32 `[B, T]`, never materialising `[B, T, V]`.

    Memory-bounded in the forward and the backward pass (custom VJP recomputing logits tile by tile). See
    `token_logprobs_and_entropy` for the arguments; an out-of-range target gives NaN.
    """
    logprobs, _ = token_logprobs_and_entropy(
        hidden, lm_head, targets, chunk_size=chunk_size, token_chunk_size=token_chunk_size, precision=precision
    )
    return logprobs


def token_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = DEFAULT_TOKEN_CHUNK_SIZE,
    precision: Any = None,
) -> jax.Array:
    """Entropy `-sum_v p_v log p_v` of `softmax(hidden @ lm_head)`, float32 `hidden.shape[:-1]`, chunked.

    Differentiable (d H / d logits = -p (log p + H)), with the same memory bound as `token_logprobs`.
    """
    # Any in-range targets will do; the arguments are checked by token_logprobs_and_entropy.
    targets = jnp.zeros(jnp.shape(hidden)[:-1], jnp.int32)
    _, entropy = token_logprobs_and_entropy(
        hidden, lm_head, targets, chunk_size=chunk_size, token_chunk_size=token_chunk_size, precision=precision
    )
    return entropy


def token_logprobs_reference(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, precision: Any = None
) -> tuple[jax.Array, jax.Array]:
    """The slow twin: `(logprobs, entropy)` through the full `[..., V]` float32 logits (small inputs only)."""
    hidden, lm_head, targets = (_checks.as_array(x) for x in (hidden, lm_head, targets))
    _check_inputs(hidden, lm_head, targets)
    dtype = _checks.compute_dtype(hidden, lm_head)
    logits = tile_logits(hidden, lm_head, dtype, precision)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    vocab_size = jnp.shape(lm_head)[1]
    in_range = (targets >= 0) & (targets < vocab_size)
    safe_targets = jnp.where(in_range, targets, 0)
    picked = jnp.take_along_axis(log_p, safe_targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logprobs = jnp.where(in_range, picked, jnp.nan)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return logprobs, entropy

"""Chunked pieces of logit-level distillation: full-vocabulary KL from two (hidden, lm_head) pairs, the
teacher's top-k from (hidden, lm_head), and the student's logits at given token ids.

All three work one `[token block, vocabulary chunk]` tile (or one token block of gathered columns) at a
time; the two differentiable ones have custom VJPs that recompute tiles in the backward pass. Gradients flow
only to the student: the teacher is a constant of these functions.

Each takes `rows`: the `[N, ...]` token arrays are `rows` sequences of `N / rows` tokens flattened row-major
(`rows = B` for `[B, T, ...]` inputs). Token blocks then cut across every row at once (see
`split_token_blocks`), so that a batch axis sharded over devices stays sharded through the block loops instead
of every device all-gathering the whole batch's hidden states.
"""

from __future__ import annotations

import functools

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
    split_token_blocks,
    tile_logits,
    token_block_size,
)

# Bytes of gathered `[D, tokens, K]` weight columns per block in `gather_student_logits`.
GATHER_BLOCK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Full-vocabulary KL between softmax(student_hidden @ student_lm_head) and softmax(teacher ... ).


def _kl_forward(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight, chunk_size,
                token_chunk_size, precision, rows):
    """Returns `(kl [N], residual stats)`; kl = w * KL(p_T||p_S) + (1 - w) * KL(p_S||p_T) per token."""
    num_tokens = student_hidden.shape[0]
    vocab_size = student_lm_head.shape[1]
    dtype = _checks.compute_dtype(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head)
    block = token_block_size(num_tokens, token_chunk_size, rows)
    student_blocks = split_token_blocks(student_hidden, block, rows)
    teacher_blocks = split_token_blocks(teacher_hidden, block, rows)
    shape = student_blocks.shape[:2]
    # Per token and model: running max m, s = sum exp(l - m), and a = sum exp(l - m) * (l - l_other).
    stats = (
        jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
        jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
    )

    def vocab_chunk(stats, start, size):
        student_weights = lm_head_chunk(student_lm_head, start, size)
        teacher_weights = lm_head_chunk(teacher_lm_head, start, size)

        def token_block(_, inputs):
            student_h, teacher_h, s_max, s_sum, s_gap, t_max, t_sum, t_gap = inputs
            student_logits = tile_logits(student_h, student_weights, dtype, precision)
            teacher_logits = tile_logits(teacher_h, teacher_weights, dtype, precision)
            gap = student_logits - teacher_logits
            s_max, new_s_sum, s_rescale, s_shifted = online_logsumexp_update(s_max, s_sum, student_logits)
            t_max, new_t_sum, t_rescale, t_shifted = online_logsumexp_update(t_max, t_sum, teacher_logits)
            s_gap = s_gap * s_rescale + jnp.sum(jnp.exp(s_shifted) * gap, axis=-1)
            t_gap = t_gap * t_rescale - jnp.sum(jnp.exp(t_shifted) * gap, axis=-1)
            return None, (s_max, new_s_sum, s_gap, t_max, new_t_sum, t_gap)

        _, stats = lax.scan(token_block, None, (student_blocks, teacher_blocks) + stats)
        return stats

    s_max, s_sum, s_gap, t_max, t_sum, t_gap = scan_vocab_chunks(vocab_chunk, stats, vocab_size, chunk_size)
    student_lse = s_max + jnp.log(s_sum)
    teacher_lse = t_max + jnp.log(t_sum)
    # KL(p_S||p_T) = E_pS[l_S - l_T] - lse_S + lse_T;  KL(p_T||p_S) = E_pT[l_T - l_S] - lse_T + lse_S.
    reverse_kl = s_gap / s_sum - student_lse + teacher_lse
    forward_kl = t_gap / t_sum - teacher_lse + student_lse
    kl = forward_weight * forward_kl + (1.0 - forward_weight) * reverse_kl
    residual_stats = tuple(
        merge_token_blocks(x, num_tokens, rows) for x in (student_lse, teacher_lse, reverse_kl)
    )
    return merge_token_blocks(kl, num_tokens, rows), residual_stats


def _kl_backward(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight, stats,
                 kl_grad, chunk_size, token_chunk_size, precision, rows):
    """Student gradients. d KL(p_T||p_S)/d l_S = p_S - p_T;  d KL(p_S||p_T)/d l_S = p_S (log p_S/p_T - KL)."""
    dtype = _checks.compute_dtype(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head)
    per_token = (teacher_hidden,) + stats + (kl_grad.astype(dtype),)

    def chunk_logits_grad(start, size):
        teacher_weights = lm_head_chunk(teacher_lm_head, start, size)

        def logits_grad(student_logits, teacher_h, student_lse, teacher_lse, reverse_kl, block_grad):
            log_ps = student_logits - student_lse[:, None]
            log_pt = tile_logits(teacher_h, teacher_weights, dtype, precision) - teacher_lse[:, None]
            ps = jnp.exp(log_ps)
            logits_grad = forward_weight * (ps - jnp.exp(log_pt)) + (1.0 - forward_weight) * ps * (
                log_ps - log_pt - reverse_kl[:, None]
            )
            return block_grad[:, None] * logits_grad

        return logits_grad

    return lm_head_backward(student_hidden, student_lm_head, per_token, chunk_logits_grad, dtype, chunk_size,
                            token_chunk_size, precision, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def chunked_kl(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight, chunk_size,
               token_chunk_size, precision, rows=1):
    """Per-token `w * KL(p_T||p_S) + (1 - w) * KL(p_S||p_T)`, `[N]`, from `[N, D]` hidden and `[D, V]` heads.

    `forward_weight` (w) is a static Python float; `rows` (static) the number of sequences flattened into N.
    Gradients flow to the student hidden states and head only.
    """
    kl, _ = _kl_forward(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight,
                        chunk_size, token_chunk_size, precision, rows)
    return kl


def _chunked_kl_fwd(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight,
                    chunk_size, token_chunk_size, precision, rows):
    kl, stats = _kl_forward(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight,
                            chunk_size, token_chunk_size, precision, rows)
    return kl, (student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, stats)


def _chunked_kl_bwd(forward_weight, chunk_size, token_chunk_size, precision, rows, residuals, kl_grad):
    student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, stats = residuals
    hidden_grad, lm_head_grad = _kl_backward(
        student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, forward_weight, stats, kl_grad,
        chunk_size, token_chunk_size, precision, rows,
    )
    # The teacher is a constant of the loss (unused zeros are removed by XLA).
    return hidden_grad, lm_head_grad, jnp.zeros_like(teacher_hidden), jnp.zeros_like(teacher_lm_head)


chunked_kl.defvjp(_chunked_kl_fwd, _chunked_kl_bwd)


# ---------------------------------------------------------------------------------------------------------
# Teacher top-k over the vocabulary, chunked (no gradient).


def chunked_top_k(hidden, lm_head, top_k, chunk_size, token_chunk_size, precision, rows=1):
    """`(logits [N, k], indices [N, k] int32)` of the k largest logits of `hidden [N, D] @ lm_head [D, V]`,
    descending; `rows` is the number of sequences flattened into N."""
    num_tokens = hidden.shape[0]
    vocab_size = lm_head.shape[1]
    dtype = _checks.compute_dtype(hidden, lm_head)
    block = token_block_size(num_tokens, token_chunk_size, rows)
    hidden_blocks = split_token_blocks(lax.stop_gradient(hidden), block, rows)
    lm_head = lax.stop_gradient(lm_head)
    shape = hidden_blocks.shape[:2] + (top_k,)
    best = (jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, jnp.int32))

    def vocab_chunk(best, start, size):
        weights = lm_head_chunk(lm_head, start, size)

        def token_block(_, inputs):
            hidden_block, best_logits, best_ids = inputs
            logits = tile_logits(hidden_block, weights, dtype, precision)
            chunk_ids = jnp.broadcast_to(start + lax.iota(jnp.int32, size), logits.shape)
            candidates = jnp.concatenate([best_logits, logits], axis=-1)
            candidate_ids = jnp.concatenate([best_ids, chunk_ids], axis=-1)
            # A stable sort on the negated logits, not lax.top_k: XLA's SPMD partitioner replicates TopK
            # unless its sorted axis is the sharded one, so under a batch-sharded mesh every device would
            # all-gather every tile's logits; sort partitions along the (sharded) token axis. Same order as
            # top_k: descending, ties by lower id (earlier chunks hold lower ids and come first).
            negated, sorted_ids = lax.sort((-candidates, candidate_ids), dimension=1, is_stable=True, num_keys=1)
            return None, (-negated[:, :top_k], sorted_ids[:, :top_k])

        _, best = lax.scan(token_block, None, (hidden_blocks,) + best)
        return best

    logits, indices = scan_vocab_chunks(vocab_chunk, best, vocab_size, chunk_size)
    return merge_token_blocks(logits, num_tokens, rows), merge_token_blocks(indices, num_tokens, rows)


# ---------------------------------------------------------------------------------------------------------
# Student logits at given token ids, `hidden[n] . lm_head[:, ids[n, k]]`, gathered per token block.


def _gather_block_size(num_tokens, hidden_size, num_ids, itemsize, rows):
    """Tokens of each row per block: about GATHER_BLOCK_BYTES of gathered columns over all rows."""
    per_token = max(hidden_size * num_ids * itemsize, 1)
    tokens = max(1, min(num_tokens, GATHER_BLOCK_BYTES // per_token))
    return token_block_size(num_tokens, tokens, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gather_student_logits(hidden, lm_head, token_ids, precision, rows=1):
    """`[N, D], [D, V], [N, K] -> [N, K]` float32 logits of the given ids; never builds `[N, V]`.

    `rows` (static) is the number of sequences flattened into N.
    """
    return _gather_forward(hidden, lm_head, token_ids, precision, rows)


def _gather_forward(hidden, lm_head, token_ids, precision, rows):
    num_tokens, hidden_size = hidden.shape
    dtype = _checks.compute_dtype(hidden, lm_head)
    block = _gather_block_size(num_tokens, hidden_size, token_ids.shape[1], jnp.dtype(dtype).itemsize, rows)
    operand_dtype = jnp.promote_types(hidden.dtype, lm_head.dtype)

    def token_block(_, inputs):
        hidden_block, ids = inputs
        columns = jnp.take(lm_head, ids, axis=1).astype(operand_dtype)  # [D, block, K]
        logits = jnp.einsum("nd,dnk->nk", hidden_block.astype(operand_dtype), columns, precision=precision,
                            preferred_element_type=dtype)
        return None, logits

    _, logits = lax.scan(
        token_block, None, (split_token_blocks(hidden, block, rows), split_token_blocks(token_ids, block, rows))
    )
    return merge_token_blocks(logits, num_tokens, rows)


def _gather_fwd(hidden, lm_head, token_ids, precision, rows):
    return _gather_forward(hidden, lm_head, token_ids, precision, rows), (hidden, lm_head, token_ids)


def _gather_bwd(precision, rows, residuals, logits_grad):
    hidden, lm_head, token_ids = residuals
    num_tokens, hidden_size = hidden.shape
    dtype = _checks.compute_dtype(hidden, lm_head)
    block = _gather_block_size(num_tokens, hidden_size, token_ids.shape[1], jnp.dtype(dtype).itemsize, rows)

    def token_block(lm_head_grad, inputs):
        hidden_block, ids, block_grad = inputs
        columns = jnp.take(lm_head, ids, axis=1).astype(dtype)  # [D, block, K]
        block_grad = block_grad.astype(dtype)
        hidden_grad = jnp.einsum("nk,dnk->nd", block_grad, columns, precision=precision)
        updates = jnp.einsum("nd,nk->dnk", hidden_block.astype(dtype), block_grad, precision=precision)
        # Padded rows carry zero gradient, so their (id 0) updates add nothing.
        lm_head_grad = lm_head_grad.at[:, ids].add(updates)
        return lm_head_grad, hidden_grad

    lm_head_grad, hidden_grad = lax.scan(
        token_block,
        jnp.zeros(lm_head.shape, dtype),
        (split_token_blocks(hidden, block, rows), split_token_blocks(token_ids, block, rows),
         split_token_blocks(logits_grad, block, rows)),
    )
    hidden_grad = merge_token_blocks(hidden_grad, num_tokens, rows).astype(hidden.dtype)
    return hidden_grad, lm_head_grad.astype(lm_head.dtype), None


gather_student_logits.defvjp(_gather_fwd, _gather_bwd)

"""Loops over vocabulary chunks and token blocks, shared by the chunked log-prob and distillation losses.

The `[N, V]` logits of N tokens over a vocabulary of V are never built: work proceeds one tile of
`[token block, vocabulary chunk]` at a time, inside `lax.scan`, so that peak memory is a few tiles. The
backward passes share `lm_head_backward`, which recomputes each tile and turns its logits' gradient into
gradients of the hidden states and the weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

Carry = TypeVar("Carry")


def scan_vocab_chunks(
    body: Callable[[Carry, Any, int], Carry], carry: Carry, vocab_size: int, chunk_size: int
) -> Carry:
    """Folds `body(carry, start, size)` over `[start, start + size)` chunks covering `range(vocab_size)`.

    Full chunks run inside one `lax.scan` (`start` is traced, `size == chunk_size`); a shorter last chunk,
    if any, runs once after it with a Python-int `start`. Nothing is padded, so the `[D, V]` weight is never
    copied.
    """
    num_full = vocab_size // chunk_size
    tail = vocab_size - num_full * chunk_size
    if num_full:

        def step(current, chunk_index):
            return body(current, chunk_index * chunk_size, chunk_size), None

        carry, _ = lax.scan(step, carry, jnp.arange(num_full, dtype=jnp.int32))
    if tail:
        carry = body(carry, num_full * chunk_size, tail)
    return carry


def token_block_size(num_tokens: int, token_chunk_size: int | None, rows: int = 1) -> int:
    """Tokens of each row in one token block: blocks hold about `token_chunk_size` tokens over all rows."""
    per_row = num_tokens // rows
    if token_chunk_size is None:
        return max(per_row, 1)
    return max(min(-(-token_chunk_size // rows), per_row), 1)


def sequence_rows(positions_shape: tuple[int, ...]) -> int:
    """Rows (sequences) of `[..., T]` positions flattened row-major: every leading axis but the last, >= 1.

    Token blocks cut across all these rows at once (see `split_token_blocks`), so that a batch axis sharded
    over devices stays sharded through the block loops.
    """
    return max(math.prod(positions_shape[:-1]), 1) if len(positions_shape) > 1 else 1


def split_token_blocks(values: jax.Array, block: int, rows: int = 1) -> jax.Array:
    """`[N, ...] -> [ceil(T / block), rows * block, ...]` with `N = rows * T` (row-major), each row zero-padded.

    Blocks run along the token axis of every row at once (block `i` holds tokens `[i * block, (i + 1) * block)`
    of each row), so that a leading batch axis sharded over devices stays sharded: a scan over the blocks then
    slices an unsharded axis instead of gathering every row onto every device.
    """
    num_tokens = values.shape[0]
    if num_tokens % rows:
        raise ValueError(f"split_token_blocks: {num_tokens} tokens do not split into {rows} rows")
    per_row = num_tokens // rows
    trailing = values.shape[1:]
    num_blocks = -(-per_row // block)
    values = values.reshape((rows, per_row) + trailing)
    padding = num_blocks * block - per_row
    if padding:
        values = jnp.pad(values, [(0, 0), (0, padding)] + [(0, 0)] * len(trailing))
    values = jnp.moveaxis(values.reshape((rows, num_blocks, block) + trailing), 1, 0)
    return values.reshape((num_blocks, rows * block) + trailing)


def merge_token_blocks(values: jax.Array, num_tokens: int, rows: int = 1) -> jax.Array:
    """Inverse of `split_token_blocks`: `[num_blocks, rows * block, ...] -> [N, ...]`."""
    num_blocks, rows_times_block = values.shape[:2]
    trailing = values.shape[2:]
    block = rows_times_block // rows
    values = jnp.moveaxis(values.reshape((num_blocks, rows, block) + trailing), 0, 1)
    values = values.reshape((rows, num_blocks * block) + trailing)[:, : num_tokens // rows]
    return values.reshape((num_tokens,) + trailing)


def tile_logits(
    hidden_block: jax.Array, lm_head_chunk: jax.Array, dtype: Any, precision: Any
) -> jax.Array:
    """`[n, D] @ [D, c] -> [n, c]` logits accumulated in `dtype` (float32), operands in their own dtype.

    bf16 operands stay bf16 (products of bf16 values are exact in float32, and accumulation is float32), so a
    bf16 weight is never copied to float32 as a whole.
    """
    operand_dtype = jnp.promote_types(hidden_block.dtype, lm_head_chunk.dtype)
    return jnp.dot(
        hidden_block.astype(operand_dtype),
        lm_head_chunk.astype(operand_dtype),
        precision=precision,
        preferred_element_type=dtype,
    )


def lm_head_chunk(lm_head: jax.Array, start: Any, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(lm_head, start, size, axis=1)


def online_logsumexp_update(
    running_max: jax.Array, running_sum: jax.Array, logits: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of a streaming logsumexp over the last axis.

    `(m, s)` summarise the logits seen so far as `logsumexp = m + log(s)` (m = -inf, s = 0 before any).
    Returns `(new_max, new_sum, rescale, shifted)`: `rescale = exp(m - new_max)` multiplies any other sums
    kept relative to the old maximum, and `shifted = logits - new_max[:, None]`.
    """
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    rescale = jnp.exp(running_max - new_max)
    shifted = logits - new_max[..., None]
    new_sum = running_sum * rescale + jnp.sum(jnp.exp(shifted), axis=-1)
    return new_max, new_sum, rescale, shifted


def lm_head_backward(
    hidden2d: jax.Array,
    lm_head: jax.Array,
    per_token: tuple[jax.Array, ...],
    chunk_logits_grad: Callable[[Any, int], Callable[..., jax.Array]],
    dtype: Any,
    chunk_size: int,
    token_chunk_size: int | None,
    precision: Any,
    rows: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Gradients `(d hidden2d [N, D], d lm_head [D, V])` of a function of the logits `hidden2d @ lm_head`.

    `chunk_logits_grad(start, size)` is called once per vocabulary chunk (for work shared by its token blocks)
    and returns `logits_grad(logits [n, size], *blocks) -> [n, size]`, the gradient w.r.t. one recomputed
    tile of logits (accumulated in `dtype`), where `blocks` are the token blocks of the `[N, ...]` arrays
    `per_token`.
    """
    num_tokens, hidden_size = hidden2d.shape
    block = token_block_size(num_tokens, token_chunk_size, rows)
    hidden_blocks = split_token_blocks(hidden2d, block, rows)
    per_token_blocks = tuple(split_token_blocks(x, block, rows) for x in per_token)

    def vocab_chunk(carry, start, size):
        hidden_grad, lm_head_grad = carry
        weights = lm_head_chunk(lm_head, start, size)
        weights_compute = weights.astype(dtype)
        logits_grad_of_tile = chunk_logits_grad(start, size)

        def token_block(chunk_grad, inputs):
            hidden, *blocks = inputs
            logits_grad = logits_grad_of_tile(tile_logits(hidden, weights, dtype, precision), *blocks)
            block_hidden_grad = jnp.dot(logits_grad, weights_compute.T, precision=precision)
            chunk_grad = chunk_grad + jnp.dot(hidden.astype(dtype).T, logits_grad, precision=precision)
            return chunk_grad, block_hidden_grad

        chunk_grad, block_hidden_grads = lax.scan(
            token_block, jnp.zeros((hidden_size, size), dtype), (hidden_blocks,) + per_token_blocks
        )
        lm_head_grad = lax.dynamic_update_slice_in_dim(
            lm_head_grad, chunk_grad.astype(lm_head_grad.dtype), start, axis=1
        )
        return hidden_grad + block_hidden_grads, lm_head_grad

    carry = (jnp.zeros(hidden_blocks.shape, dtype), jnp.zeros(lm_head.shape, lm_head.dtype))
    hidden_grad, lm_head_grad = scan_vocab_chunks(vocab_chunk, carry, lm_head.shape[1], chunk_size)
    return merge_token_blocks(hidden_grad, num_tokens, rows).astype(hidden2d.dtype), lm_head_grad

"""Attention backends of the training forward (no decode cache): causal attention within runs of packed rows.

All take the grouped-query layout of `attention.Attention`: query [B, T, Hkv, R, Dh] (R query heads per KV
head, query head h = kv_head * R + r), key/value [B, S, Hkv, Dh], and the run ids of `segments.
contiguous_run_ids`; query t sees key s iff s is not after t and both are in the same run. Scores, the softmax
and its statistics are float32; the result is in the query's dtype.

- `xla`: the einsum reference (`masked_attention`): materialises [B, Hkv, R, T, S] float32 scores.
- `blockwise`: flash-style online softmax in plain JAX (`blockwise_attention`), tiles of queries x keys, tiles
  that causality or the runs mask entirely skipped, and a custom VJP that recomputes the tiles, so the
  forward+backward keeps O(T) memory (output + log-sum-exp), not O(T^2). Runs everywhere.
- `splash`: the Pallas TPU splash-attention kernel (segment ids + causal mask, its MQA kernel per KV head);
  interpreted off TPU (slow; for tests).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, which has no segment ids: rows holding one
  run go to it, packed batches to `blockwise` (a runtime `lax.cond`; both branches are compiled). Off GPU the
  same wrapper calls implementation "xla" (quadratic; for tests only).
- `auto` (`resolve_backend`): `splash` on TPU; `cudnn` on GPU in bfloat16/float16 (cuDNN has no float32
  flash kernel); elsewhere `xla` up to `AUTO_XLA_MAX_LENGTH` tokens (one fused einsum is fastest while the
  [T, T] scores are small) and `blockwise` beyond.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Kept in sync with `config.ATTENTION_BACKENDS` (the config imports no model code).
BACKENDS = ("auto", "xla", "blockwise", "splash", "cudnn")
AUTO_XLA_MAX_LENGTH = 2048

_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min


def resolve_backend(backend: str, length: int, compute_dtype: Any = jnp.float32, platform: str | None = None) -> str:
    """The concrete backend `backend` ("auto" or one of `BACKENDS`) stands for, for rows of `length` tokens."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(compute_dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla" if length <= AUTO_XLA_MAX_LENGTH else "blockwise"


# ------------------------------------------------------------------------------------------------ xla
def attention_weights_and_values(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, compute_dtype: Any
) -> jax.Array:
    """Softmax attention, scores and softmax in float32.

    query [B, T, Hkv, R, Dh] (R query heads per KV head), key/value [B, S, Hkv, Dh], mask bool [B, T, S].
    Returns [B, T, Hkv, R, Dh] in `compute_dtype`.
    """
    scale = query.shape[-1] ** -0.5
    scores = jnp.einsum("bthrd,bshd->bhrts", query, key, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    return jnp.einsum("bhrts,bshd->bthrd", probs, value, preferred_element_type=jnp.float32).astype(compute_dtype)


def masked_attention(query: jax.Array, key: jax.Array, value: jax.Array, q_positions: jax.Array,
                     kv_positions: jax.Array, q_runs: jax.Array, kv_runs: jax.Array, compute_dtype: Any) -> jax.Array:
    """Causal attention within runs, from explicit positions and runs.

    query [B, T, Hkv, R, Dh], key/value [B, S, Hkv, Dh], q_positions int [T], kv_positions int [S],
    q_runs [B, T], kv_runs [B, S]: query t sees key s iff kv_positions[s] <= q_positions[t] and the runs match.
    Returns [B, T, Hkv, R, Dh] in `compute_dtype`.
    """
    causal = kv_positions[None, :] <= q_positions[:, None]
    mask = causal[None] & (q_runs[:, :, None] == kv_runs[:, None, :])
    return attention_weights_and_values(query, key, value, mask, compute_dtype)


# ------------------------------------------------------------------------------------------ blockwise
def _pad_axis(array: jax.Array, axis: int, size: int, fill) -> jax.Array:
    pad = size - array.shape[axis]
    if pad == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, pad)
    return jnp.pad(array, widths, constant_values=fill)


def _tiles(array: jax.Array, axis: int, tile: int) -> jax.Array:
    """Splits `axis` into [n, tile] and moves n to the front: the scan axis."""
    shape = array.shape[:axis] + (array.shape[axis] // tile, tile) + array.shape[axis + 1:]
    return jnp.moveaxis(array.reshape(shape), axis, 0)


def _tile_visits(q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real) -> jax.Array:
    """bool [nq, nk]: whether query tile i may see any key of key tile j (else the tile is skipped).

    q_pos [nq, bq], kv_pos [nk, bk], q_runs [nq, B, bq], kv_runs [nk, B, bk], *_real bool like the positions
    (False on padding, which widens no range). Conservative: the run test compares [min, max] ranges per row,
    exact for the nondecreasing run ids of packed rows.
    """
    q_pos_max = jnp.max(jnp.where(q_real, q_pos, _INT_MIN), axis=1)  # [nq]
    kv_pos_min = jnp.min(jnp.where(kv_real, kv_pos, _INT_MAX), axis=1)  # [nk]
    q_run_min = jnp.min(jnp.where(q_real[:, None], q_runs, _INT_MAX), axis=2)  # [nq, B]
    q_run_max = jnp.max(jnp.where(q_real[:, None], q_runs, _INT_MIN), axis=2)
    kv_run_min = jnp.min(jnp.where(kv_real[:, None], kv_runs, _INT_MAX), axis=2)  # [nk, B]
    kv_run_max = jnp.max(jnp.where(kv_real[:, None], kv_runs, _INT_MIN), axis=2)
    causal = kv_pos_min[None, :] <= q_pos_max[:, None]
    overlap = (q_run_min[:, None] <= kv_run_max[None]) & (kv_run_min[None] <= q_run_max[:, None])  # [nq, nk, B]
    return causal & jnp.any(overlap, axis=-1)


def _tile_mask(q_pos, kv_pos, q_runs, kv_runs) -> jax.Array:
    """q_pos [bq], kv_pos [bk], q_runs [B, bq], kv_runs [B, bk] -> bool [B, 1, 1, bq, bk] (broadcast over heads)."""
    causal = kv_pos[None, :] <= q_pos[:, None]
    return (causal[None] & (q_runs[:, :, None] == kv_runs[:, None, :]))[:, None, None]


def _blockwise_forward(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q, block_kv):
    """Padded inputs (lengths multiples of the tiles) -> (out [B, Tp, Hkv, R, Dh], lse f32 [B, Hkv, R, Tp])."""
    batch, _, heads, repeats, head_dim = q.shape
    scale = head_dim ** -0.5
    visits = _tile_visits(_tiles(q_pos, 0, block_q), _tiles(kv_pos, 0, block_kv), _tiles(q_runs, 1, block_q),
                          _tiles(kv_runs, 1, block_kv), _tiles(q_real, 0, block_q), _tiles(kv_real, 0, block_kv))
    kv_xs = (_tiles(k, 1, block_kv), _tiles(v, 1, block_kv), _tiles(kv_pos, 0, block_kv),
             _tiles(kv_runs, 1, block_kv))

    def query_tile(xs):
        q_i, q_pos_i, q_runs_i, visits_i = xs

        def key_tile(carry, xs):
            k_j, v_j, kv_pos_j, kv_runs_j, visit = xs

            def update(carry):
                m, l, acc = carry
                s = jnp.einsum("bqhrd,bkhd->bhrqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                s = jnp.where(_tile_mask(q_pos_i, kv_pos_j, q_runs_i, kv_runs_j), s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet stay at 0
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                l = l * correction + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bhrqk,bkhd->bhrqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l, acc * correction[..., None] + pv

            return lax.cond(visit, update, lambda c: c, carry), None

        init = (jnp.full((batch, heads, repeats, block_q), -jnp.inf, jnp.float32),
                jnp.zeros((batch, heads, repeats, block_q), jnp.float32),
                jnp.zeros((batch, heads, repeats, block_q, head_dim), jnp.float32))
        (m, l, acc), _ = lax.scan(key_tile, init, (*kv_xs, visits_i))
        seen = l > 0  # False only for padding queries
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse  # [B, bq, Hkv, R, Dh], [B, Hkv, R, bq]

    out, lse = lax.map(query_tile, (_tiles(q, 1, block_q), _tiles(q_pos, 0, block_q), _tiles(q_runs, 1, block_q),
                                    visits))
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, -2).reshape(batch, heads, repeats, -1)
    return out, lse


def _blockwise_backward(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q, block_kv, out, lse,
                        d_out):
    """Gradients (dq, dk, dv) by recomputing each visited tile's probabilities from the saved log-sum-exp."""
    batch, _, heads, repeats, head_dim = q.shape
    scale = head_dim ** -0.5
    visits = _tile_visits(_tiles(q_pos, 0, block_q), _tiles(kv_pos, 0, block_kv), _tiles(q_runs, 1, block_q),
                          _tiles(kv_runs, 1, block_kv), _tiles(q_real, 0, block_q), _tiles(kv_real, 0, block_kv))
    # delta_t = sum_d dO_td O_td = sum_s P_ts dP_ts: the softmax Jacobian's row term.
    delta = jnp.einsum("bthrd,bthrd->bhrt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_xs = (_tiles(q, 1, block_q), _tiles(d_out, 1, block_q), _tiles(lse, 3, block_q), _tiles(delta, 3, block_q),
            _tiles(q_pos, 0, block_q), _tiles(q_runs, 1, block_q))
    num_q = q.shape[1] // block_q

    def key_tile(dq, xs):
        k_j, v_j, kv_pos_j, kv_runs_j, visits_j = xs

        def query_tile(carry, xs):
            q_i, do_i, lse_i, delta_i, q_pos_i, q_runs_i, visit = xs

            def grads(_):
                s = jnp.einsum("bqhrd,bkhd->bhrqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                mask = _tile_mask(q_pos_i, kv_pos_j, q_runs_i, kv_runs_j)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dv = jnp.einsum("bhrqk,bqhrd->bkhd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqhrd,bkhd->bhrqk", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
                dq = jnp.einsum("bhrqk,bkhd->bqhrd", ds, k_j, preferred_element_type=jnp.float32)
                dk = jnp.einsum("bhrqk,bqhrd->bkhd", ds, q_i, preferred_element_type=jnp.float32)
                return dq, dk, dv

            def skip(_):
                return (jnp.zeros(q_i.shape, jnp.float32), jnp.zeros(k_j.shape, jnp.float32),
                        jnp.zeros(v_j.shape, jnp.float32))

            dq_i, dk, dv = lax.cond(visit, grads, skip, None)
            return (carry[0] + dk, carry[1] + dv), dq_i

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk, dv), dq_tiles = lax.scan(query_tile, (zeros, zeros), (*q_xs, visits_j))
        return dq + dq_tiles, (dk, dv)

    dq0 = jnp.zeros((num_q, batch, block_q, heads, repeats, head_dim), jnp.float32)
    dq, (dk, dv) = lax.scan(key_tile, dq0, (_tiles(k, 1, block_kv), _tiles(v, 1, block_kv),
                                            _tiles(kv_pos, 0, block_kv), _tiles(kv_runs, 1, block_kv), visits.T))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# The forward's tile loops under `jax.checkpoint`: inside a `lax.scan` over layers (`scan_layers`), JAX's
# partial evaluation of the scan otherwise kept per-tile values of this forward (masks, probabilities) as
# stacked [q tiles, key tiles, B, Hkv, R, bq, bk] arrays, O(T^2) memory (256 GiB per device at 256K tokens),
# although the custom VJP needs only the output and the log-sum-exp. Checkpointing makes the loops opaque to it;
# nothing is recomputed (all their inputs are known in the forward).
# `tests/model/test_attention_backends.py::test_blockwise_in_a_layer_scan_keeps_no_tile_residuals`.
_blockwise_forward_opaque = jax.checkpoint(_blockwise_forward, static_argnums=(9, 10),
                                           policy=jax.checkpoint_policies.nothing_saveable)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _blockwise(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q, block_kv):
    return _blockwise_forward_opaque(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q,
                                     block_kv)[0]


def _blockwise_fwd(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q, block_kv):
    out, lse = _blockwise_forward_opaque(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q,
                                         block_kv)
    return out, (q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, out, lse)


def _blockwise_bwd(block_q, block_kv, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, out, lse = residuals
    dq, dk, dv = _blockwise_backward(q, k, v, q_pos, kv_pos, q_runs, kv_runs, q_real, kv_real, block_q, block_kv,
                                     out, lse, d_out)
    return dq, dk, dv, None, None, None, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(query: jax.Array, key: jax.Array, value: jax.Array, q_runs: jax.Array, kv_runs: jax.Array,
                        q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None, *,
                        block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """Memory-linear causal attention within runs (online softmax over tiles, recomputing backward).

    query [B, T, Hkv, R, Dh], key/value [B, S, Hkv, Dh], q_runs [B, T], kv_runs [B, S], q_positions int [T] /
    kv_positions int [S] (default 0..T-1 / 0..S-1): query t sees key s iff kv_positions[s] <= q_positions[t]
    and the runs match. Lengths need not be tile multiples (padded here). Returns [B, T, Hkv, R, Dh] in the
    query's dtype. Residuals for the backward: inputs, output and a float32 [B, Hkv, R, T] log-sum-exp.
    """
    if block_q <= 0 or block_kv <= 0:
        raise ValueError(f"blockwise attention: tile sizes must be positive, got {block_q}, {block_kv}")
    length, kv_length = query.shape[1], key.shape[1]
    if q_positions is None:
        q_positions = jnp.arange(length, dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(kv_length, dtype=jnp.int32)
    block_q, block_kv = min(block_q, length), min(block_kv, kv_length)
    padded_q = -(-length // block_q) * block_q
    padded_kv = -(-kv_length // block_kv) * block_kv
    # Padding queries and keys get runs of their own (distinct sentinels): nothing sees them, they see nothing.
    out = _blockwise(
        _pad_axis(query, 1, padded_q, 0), _pad_axis(key, 1, padded_kv, 0), _pad_axis(value, 1, padded_kv, 0),
        _pad_axis(q_positions.astype(jnp.int32), 0, padded_q, _INT_MAX),
        _pad_axis(kv_positions.astype(jnp.int32), 0, padded_kv, _INT_MAX),
        _pad_axis(q_runs.astype(jnp.int32), 1, padded_q, _INT_MIN),
        _pad_axis(kv_runs.astype(jnp.int32), 1, padded_kv, _INT_MIN + 1),
        _pad_axis(jnp.ones((length,), bool), 0, padded_q, False),
        _pad_axis(jnp.ones((kv_length,), bool), 0, padded_kv, False),
        block_q, block_kv)
    return out[:, :length]


# --------------------------------------------------------------------------------------------- splash
def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, q_runs: jax.Array, kv_runs: jax.Array, *,
                     block: int = 512, interpret: bool | None = None) -> jax.Array:
    """The Pallas splash-attention kernel: causal mask and segment ids = runs, one MQA call per KV head.

    query [B, T, Hkv, R, Dh], key/value [B, T, Hkv, Dh], q_runs/kv_runs [B, T] (aligned positions 0..T-1).
    `interpret` defaults to True off TPU. Returns [B, T, Hkv, R, Dh] in the query's dtype.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    batch, length, heads, repeats, head_dim = query.shape
    if key.shape[1] != length:
        raise ValueError(f"splash attention: needs as many keys as queries, got {key.shape[1]} and {length}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    # The kernel tiles are multiples of 128 lanes; pad to a tile multiple.
    block = max(128, min(block, -(-length // 128) * 128))
    padded = -(-length // block) * block
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * repeats)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    # The kernel does not scale the scores. Padding tokens form one segment of their own after every real token,
    # so no row of the mask is empty (the kernel's requirement) and no real token sees them.
    q = jnp.moveaxis(_pad_axis(query * jnp.asarray(head_dim ** -0.5, query.dtype), 1, padded, 0), 1, 3)
    k = jnp.moveaxis(_pad_axis(key, 1, padded, 0), 1, 2)  # [B, Hkv, Tp, Dh]
    v = jnp.moveaxis(_pad_axis(value, 1, padded, 0), 1, 2)
    segments = splash.SegmentIds(q=_pad_axis(q_runs.astype(jnp.int32), 1, padded, -1),
                                 kv=_pad_axis(kv_runs.astype(jnp.int32), 1, padded, -1))
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads: q [R, Tp, Dh], k/v [Tp, Dh]
    out = jax.vmap(per_head)(q, k, v, segments)  # [B, Hkv, R, Tp, Dh]
    return jnp.moveaxis(out, 3, 1)[:, :length].astype(query.dtype)


# ---------------------------------------------------------------------------------------------- cudnn
def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, q_runs: jax.Array, kv_runs: jax.Array, *,
                    implementation: str = "cudnn", block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """`jax.nn.dot_product_attention` (causal, native GQA) when every row is one run, else `blockwise_attention`.

    query [B, T, Hkv, R, Dh], key/value [B, T, Hkv, Dh], q_runs/kv_runs [B, T]. The choice is a runtime
    `lax.cond` (packing is data). `implementation="xla"` runs the same wrapper where cuDNN is absent (tests).
    Returns [B, T, Hkv, R, Dh] in the query's dtype.
    """
    batch, length, heads, repeats, head_dim = query.shape

    def dense(operands):
        query, key, value = operands
        # [B, T, Hkv * R, Dh]: query head n uses KV head n // R, the grouping dot_product_attention assumes.
        out = jax.nn.dot_product_attention(query.reshape(batch, length, heads * repeats, head_dim), key, value,
                                           is_causal=True, implementation=implementation)
        return out.reshape(query.shape).astype(query.dtype)

    def packed(operands):
        return blockwise_attention(*operands, q_runs, kv_runs, block_q=block_q, block_kv=block_kv)

    one_run = jnp.all(q_runs == q_runs[:, :1]) & jnp.all(kv_runs == q_runs[:, :1])
    return lax.cond(one_run, dense, packed, (query, key, value))


# ----------------------------------------------------------------------------------------------- attend
def attend(query: jax.Array, key: jax.Array, value: jax.Array, q_runs: jax.Array, kv_runs: jax.Array, *,
           backend: str, q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
           block_q: int = 512, block_kv: int = 512, compute_dtype: Any = None) -> jax.Array:
    """Causal attention within runs with the named backend (`resolve_backend` turns "auto" into one).

    query [B, T, Hkv, R, Dh], key/value [B, S, Hkv, Dh], q_runs [B, T], kv_runs [B, S]; explicit positions
    (q_positions [T], kv_positions [S]; default 0..T-1 / 0..S-1) are for `xla` and `blockwise` only (context
    parallelism); `splash` and `cudnn` need S == T and aligned positions. Returns [B, T, Hkv, R, Dh] in
    `compute_dtype` (default: the query's dtype).
    """
    compute_dtype = compute_dtype or query.dtype
    backend = resolve_backend(backend, key.shape[1], compute_dtype)
    aligned = q_positions is None and kv_positions is None
    if backend in ("splash", "cudnn") and not aligned:
        raise ValueError(f"attention backend {backend!r} supports aligned positions 0..T-1 only; "
                         "use 'blockwise' or 'xla' with explicit positions")
    if backend == "xla":
        if q_positions is None:
            q_positions = jnp.arange(query.shape[1])
        if kv_positions is None:
            kv_positions = jnp.arange(key.shape[1])
        return masked_attention(query, key, value, q_positions, kv_positions, q_runs, kv_runs, compute_dtype)
    if backend == "blockwise":
        out = blockwise_attention(query, key, value, q_runs, kv_runs, q_positions, kv_positions,
                                  block_q=block_q, block_kv=block_kv)
    elif backend == "splash":
        out = splash_attention(query, key, value, q_runs, kv_runs, block=max(block_q, block_kv))
    else:
        impl = "cudnn" if jax.default_backend() in ("gpu", "cuda") else "xla"
        out = cudnn_attention(query, key, value, q_runs, kv_runs, implementation=impl, block_q=block_q,
                              block_kv=block_kv)
    return out.astype(compute_dtype)

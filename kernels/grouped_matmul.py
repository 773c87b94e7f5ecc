"""Grouped matrix multiplication for dropless MoE dispatch: one API, several backends.

Rows of `lhs` are sorted by group (expert): rows `[start_g, end_g)` belong to group `g`, with
`end_g - start_g = group_sizes[g]`. `gmm` multiplies each row block by its group's matrix:

    out[start_g:end_g] = lhs[start_g:end_g] @ rhs[g]          lhs [M, K], rhs [G, K, N] -> out [M, N]

and `tgmm` is the weight gradient of that product:

    out[g] = lhs[start_g:end_g].T @ grad[start_g:end_g]       lhs [M, K], grad [M, N] -> out [G, K, N]

Local groups (expert parallelism). With `group_offset=o` (an int or a traced int32 scalar), `rhs` holds only
the `G_local = rhs.shape[0]` groups `o .. o + G_local - 1` of the `G = group_sizes.shape[0]` groups that
`group_sizes` describes; rows of the other groups come out zero and `tgmm` returns only the local groups
([G_local, K, N]). This is what an expert-sharded layer needs: every shard sees the same sorted rows and
`group_sizes` and multiplies only by its own experts. The gradients follow the same rule.

Backends (every one differentiable, every one dropless; `auto` picks per platform):
- "scan": the plain-JAX reference. Walks a static schedule of (row tile, group) visits with `lax.scan`, one
  `[tile, K] @ [K, N]` matmul per visit, rows of other groups masked. Work: the grouped work plus at most one
  partial tile per group boundary; memory: one output buffer.
- "blocks": the fast CPU path. Requires (or, unless `groups_aligned=True`, builds by one row gather) a
  layout where every group starts on a multiple of `tile_rows`; then each block of `tile_rows` rows belongs
  to exactly one group, and forward, input gradient and weight gradient are each one `lax.scan` of
  unmasked `[tile, K] @ [K, N]` products (a `custom_vjp`; the weight gradient accumulates in place into a
  [G, K, N] carry). The MoE dispatch (`nemotron_jax.model.moe`) builds that layout directly from the
  routing and runs the whole expert MLP per block (`blocks_moe`: gather, up, activation, down, weighted
  scatter-add into the tokens), so no [rows, hidden] buffer is built at all.
- "ragged_dot": `jax.lax.ragged_dot`. Native on GPU/TPU; on XLA:CPU a masked dense product ([G, M, K]).
- "pallas": this package's own Pallas kernels (`kernels.pallas_gmm`): a Mosaic-TPU kernel with
  scalar-prefetched visit metadata and a Pallas-Triton GPU kernel, both with `group_offset` and a
  `custom_vjp` (gmm + tgmm). On CPU they run in interpret mode (slow: for tests). "pallas_tpu" and
  "pallas_gpu" force one lowering (interpret mode off its platform).
- "megablox": `jax.experimental.pallas.ops.tpu.megablox` (TPU; interpret mode elsewhere).
- "tokamax": `tokamax.ragged_dot` with an explicit `implementation` (`mosaic` on TPU and Hopper GPUs, `xla`
  on CPU). Tokamax has no `group_offset`; with one, rows are shifted so the local groups come first.

Rows past `sum(group_sizes)` produce zeros. `group_sizes` must sum to at most `M` (not checked: traced).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("auto", "scan", "blocks", "ragged_dot", "pallas", "pallas_tpu", "pallas_gpu", "megablox", "tokamax")
# "pallas" uses the platform's lowering of our Pallas kernels; these two name one explicitly (off their
# platform in interpret mode: how CPU tests check both lowerings, down to the MoE layer).
_PALLAS_LOWERING = {"pallas": None, "pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """`auto` -> the fastest backend for `platform` (default: JAX's default backend); other names pass.

    CPU: "blocks". GPU and TPU: "tokamax" (its Mosaic kernels; library code preferred over ours).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (grouped matmul); one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    return "blocks" if platform == "cpu" else "tokamax"


# --------------------------------------------------------------------------------------------- schedules
def _local_groups(group_sizes: jax.Array, group_offset, num_local: int):
    """(local sizes [L], local starts [L], local ends [L]) of groups `offset .. offset + L - 1`."""
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    if group_offset is None and num_local == group_sizes.shape[0]:
        return group_sizes, starts, ends
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    pick = lambda a: lax.dynamic_slice_in_dim(a, offset, num_local)  # noqa: E731
    return pick(group_sizes), pick(starts), pick(ends)


def tile_schedule(group_sizes: jax.Array, num_rows: int, tile_rows: int, group_offset=None,
                  num_local_groups: int | None = None):
    """The (row tile, local group) pairs that a tiled grouped matmul visits, in row order.

    Args:
      group_sizes: int32 [G], rows per group (all groups).
      num_rows: M, rows of the (unpadded) lhs.
      tile_rows: rows per tile.
      group_offset: first local group (None: 0); num_local_groups: L (None: G).

    Returns:
      visit_tile, visit_group: int32 [V] with V = ceil(M / tile_rows) + L - 1 (a static bound: each group
        boundary inside a tile adds one visit), the group as a local index; visit_valid: bool [V], False for
        padding visits; group_starts, group_ends: int32 [L], rows of the local groups.
    """
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    num_tiles = -(-num_rows // tile_rows)
    sizes, group_starts, group_ends = _local_groups(group_sizes, group_offset, num_local)
    first_tile = group_starts // tile_rows
    last_tile = (group_ends - 1) // tile_rows
    visits_per_group = jnp.where(sizes > 0, last_tile - first_tile + 1, 0)
    visit_ends = jnp.cumsum(visits_per_group)
    visit_starts = visit_ends - visits_per_group
    num_visits = num_tiles + num_local - 1
    visit = jnp.arange(num_visits, dtype=jnp.int32)
    visit_valid = visit < visit_ends[-1]
    visit_group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_local - 1)
    visit_tile = first_tile[visit_group] + (visit - visit_starts[visit_group])
    visit_tile = jnp.where(visit_valid, visit_tile, 0).astype(jnp.int32)
    return visit_tile, visit_group.astype(jnp.int32), visit_valid, group_starts, group_ends


def _tile_row_mask(tile, group, valid, group_starts, group_ends, tile_rows):
    rows = tile * tile_rows + jnp.arange(tile_rows, dtype=jnp.int32)
    return valid & (rows >= group_starts[group]) & (rows < group_ends[group])


def _pad_rows(x: jax.Array, tile_rows: int) -> jax.Array:
    pad = (-x.shape[0]) % tile_rows
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


# ------------------------------------------------------------------------------------ "scan" (reference)
def _gmm_scan(lhs, rhs, group_sizes, group_offset, tile_rows: int, transpose_rhs: bool, out_dtype):
    """Forward-only grouped matmul over local groups; -> [M, N] in out_dtype (accumulation float32)."""
    num_rows = lhs.shape[0]
    out_cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs_padded = _pad_rows(lhs, tile_rows)
    tiles, groups, valid, starts, ends = tile_schedule(group_sizes, num_rows, tile_rows, group_offset, rhs.shape[0])
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(out, schedule_entry):
        tile, group, ok = schedule_entry
        row0 = tile * tile_rows
        rows = lax.dynamic_slice_in_dim(lhs_padded, row0, tile_rows, axis=0)

        def multiply(rows):
            weight = lax.dynamic_index_in_dim(rhs, group, 0, keepdims=False)
            product = lax.dot_general(rows, weight, contract, preferred_element_type=jnp.float32)
            mask = _tile_row_mask(tile, group, ok, starts, ends, tile_rows)
            return jnp.where(mask[:, None], product, 0.0)

        # Padding visits (up to L - 1 of them: all but one when a few rows meet many groups, as in a decode
        # step) skip the weight slice and the matmul; the output update stays outside the branch, so no
        # branch ever copies `out`.
        product = lax.cond(ok, multiply, lambda rows: jnp.zeros((tile_rows, out_cols), jnp.float32), rows)
        current = lax.dynamic_slice_in_dim(out, row0, tile_rows, axis=0)
        return lax.dynamic_update_slice_in_dim(out, current + product, row0, axis=0), None

    out = jnp.zeros((lhs_padded.shape[0], out_cols), jnp.float32)
    out, _ = lax.scan(visit, out, (tiles, groups, valid))
    return out[:num_rows].astype(out_dtype)


def _tgmm_scan(lhs, grad, group_sizes, group_offset, num_local: int, tile_rows: int, out_dtype):
    """Forward-only transposed grouped matmul; -> [L, K, N] in out_dtype."""
    num_rows = lhs.shape[0]
    lhs_padded = _pad_rows(lhs, tile_rows)
    grad_padded = _pad_rows(grad, tile_rows)
    tiles, groups, valid, starts, ends = tile_schedule(group_sizes, num_rows, tile_rows, group_offset, num_local)

    def visit(out, schedule_entry):
        tile, group, ok = schedule_entry
        row0 = tile * tile_rows
        mask = _tile_row_mask(tile, group, ok, starts, ends, tile_rows)
        rows = lax.dynamic_slice_in_dim(lhs_padded, row0, tile_rows, axis=0)
        rows = jnp.where(mask[:, None], rows, jnp.zeros((), rows.dtype))
        grad_rows = lax.dynamic_slice_in_dim(grad_padded, row0, tile_rows, axis=0)
        product = lax.dot_general(rows, grad_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        current = lax.dynamic_index_in_dim(out, group, 0, keepdims=False)
        return lax.dynamic_update_index_in_dim(out, current + product, group, 0), None

    out = jnp.zeros((num_local, lhs.shape[1], grad.shape[1]), jnp.float32)
    out, _ = lax.scan(visit, out, (tiles, groups, valid))
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm_scan_vjp(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype):
    return _gmm_scan(lhs, rhs, group_sizes, group_offset, tile_rows, False, out_dtype)


def _gmm_scan_fwd(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype):
    out = _gmm_scan(lhs, rhs, group_sizes, group_offset, tile_rows, False, out_dtype)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_scan_bwd(tile_rows, out_dtype, residuals, grad_out):
    lhs, rhs, group_sizes, group_offset = residuals
    grad_lhs = _gmm_scan(grad_out.astype(rhs.dtype), rhs, group_sizes, group_offset, tile_rows, True, lhs.dtype)
    grad_rhs = _tgmm_scan(lhs, grad_out.astype(lhs.dtype), group_sizes, group_offset, rhs.shape[0], tile_rows,
                          rhs.dtype)
    return grad_lhs, grad_rhs, None, None


_gmm_scan_vjp.defvjp(_gmm_scan_fwd, _gmm_scan_bwd)


# --------------------------------------------------------------------------------- "blocks" (fast CPU)
def aligned_num_rows(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """Static row count of the block-aligned layout of `num_rows` rows in `num_groups` groups: each group
    rounded up to a multiple of `tile_rows` adds at most `tile_rows - 1` rows (a multiple of tile_rows)."""
    return max(1, (num_rows + num_groups * (tile_rows - 1)) // tile_rows) * tile_rows


def aligned_group_sizes(group_sizes: jax.Array, tile_rows: int) -> jax.Array:
    """int32 [G]: each group size rounded up to a multiple of `tile_rows`."""
    return (-(-group_sizes.astype(jnp.int32) // tile_rows) * tile_rows).astype(jnp.int32)


def _block_schedule(group_sizes, num_blocks: int, tile_rows: int, group_offset, num_local: int):
    """For an aligned layout: local group int32 [B] and validity bool [B] of each block of rows."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32)) // tile_rows  # block ends, in blocks
    block = jnp.arange(num_blocks, dtype=jnp.int32)
    group = jnp.searchsorted(ends, block, side="right").astype(jnp.int32)
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    local = group - offset
    valid = (block < ends[-1]) & (local >= 0) & (local < num_local)
    return jnp.clip(local, 0, num_local - 1), valid


def _blocks_matmul(lhs_blocks, rhs, block_group, block_valid, transpose_rhs: bool, out_dtype):
    """lhs_blocks [B, t, K] @ rhs[block_group] -> [B, t, N]; invalid blocks give zeros (no matmul)."""
    tile = lhs_blocks.shape[1]
    out_cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def block(_, xs):
        rows, group, ok = xs

        def multiply(rows):
            weight = lax.dynamic_index_in_dim(rhs, group, 0, keepdims=False)
            return lax.dot_general(rows, weight, contract, preferred_element_type=jnp.float32).astype(out_dtype)

        return None, lax.cond(ok, multiply, lambda rows: jnp.zeros((tile, out_cols), out_dtype), rows)

    return lax.scan(block, None, (lhs_blocks, block_group, block_valid))[1]


def _blocks_tgmm(lhs_blocks, grad_blocks, block_group, block_valid, num_local: int, out_dtype):
    """sum over blocks b of group g: lhs_blocks[b].T @ grad_blocks[b] -> [L, K, N] (float32 accumulation)."""

    def block(out, xs):
        rows, grad_rows, group, ok = xs

        def accumulate(out):
            product = lax.dot_general(rows, grad_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            current = lax.dynamic_index_in_dim(out, group, 0, keepdims=False)
            return lax.dynamic_update_index_in_dim(out, current + product, group, 0)

        return lax.cond(ok, accumulate, lambda out: out, out), None

    out = jnp.zeros((num_local, lhs_blocks.shape[2], grad_blocks.shape[2]), jnp.float32)
    return lax.scan(block, out, (lhs_blocks, grad_blocks, block_group, block_valid))[0].astype(out_dtype)


def _as_blocks(x, tile_rows):
    return x.reshape(x.shape[0] // tile_rows, tile_rows, x.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm_blocks_aligned(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype):
    return _gmm_blocks_fwd(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype)[0]


def _gmm_blocks_fwd(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype):
    lhs_blocks = _as_blocks(lhs, tile_rows)
    block_group, block_valid = _block_schedule(group_sizes, lhs_blocks.shape[0], tile_rows, group_offset,
                                               rhs.shape[0])
    out = _blocks_matmul(lhs_blocks, rhs, block_group, block_valid, False, out_dtype)
    return out.reshape(lhs.shape[0], -1), (lhs_blocks, rhs, block_group, block_valid)


def _gmm_blocks_bwd(tile_rows, out_dtype, residuals, grad_out):
    lhs_blocks, rhs, block_group, block_valid = residuals
    grad_blocks = _as_blocks(grad_out, tile_rows)
    grad_lhs = _blocks_matmul(grad_blocks.astype(rhs.dtype), rhs, block_group, block_valid, True, lhs_blocks.dtype)
    grad_rhs = _blocks_tgmm(lhs_blocks, grad_blocks.astype(lhs_blocks.dtype), block_group, block_valid,
                            rhs.shape[0], rhs.dtype)
    return grad_lhs.reshape(-1, lhs_blocks.shape[2]), grad_rhs, None, None


_gmm_blocks_aligned.defvjp(_gmm_blocks_fwd, _gmm_blocks_bwd)


def _tgmm_blocks_aligned(lhs, grad, group_sizes, group_offset, num_local, tile_rows, out_dtype):
    lhs_blocks, grad_blocks = _as_blocks(lhs, tile_rows), _as_blocks(grad, tile_rows)
    block_group, block_valid = _block_schedule(group_sizes, lhs_blocks.shape[0], tile_rows, group_offset, num_local)
    return _blocks_tgmm(lhs_blocks, grad_blocks, block_group, block_valid, num_local, out_dtype)


def blocks_moe(tokens: jax.Array, row_token: jax.Array, row_weight: jax.Array, up: jax.Array, down: jax.Array,
               group_sizes: jax.Array, *, tile_rows: int, activation, visit_tiles: int = 8) -> jax.Array:
    """Routed experts straight from the tokens: `out[n] = sum over rows r of token n: row_weight[r] *
    act(tokens[n] @ up[g(r)]) @ down[g(r)]`, one expert's rows (up to `visit_tiles` tiles) per scan step.

    The MoE dispatch's CPU path ("blocks"). Each expert's run of rows is cut into visits of at most
    `visit_tiles * tile_rows` rows; a visit gathers its rows from `tokens`, runs both matmuls with M = its own
    row count (a `lax.switch` over the `visit_tiles` possible sizes) and scatter-adds its weighted outputs
    into the [N, D] result. The backward is one scan over the same visits (activation recomputed from the
    saved pre-activation, both weight gradients accumulated in place, the token gradient scatter-added).
    Why visits and not fixed 128-row blocks: on XLA:CPU a [128, 512] @ [512, 384] product runs at ~60% of
    the rate of a [512, 512] one, and a finer alignment (`tile_rows` 64 instead of 128) cuts the padding
    from ~18% to ~5% at the benchmark's shape. Nothing of size [R, D] is built: on XLA:CPU every fresh
    large buffer is paid for in page faults and a separate pass over memory.

    Args:
      tokens: [N, D] (the compute dtype).
      row_token: int32 [R], the token of each row of the block-aligned expert layout; N for padding rows.
      row_weight: float32 [R], the routing weight of each row (zero on padding rows).
      up: [G, D, F]; down: [G, F, D]; group_sizes: int32 [G], multiples of `tile_rows` (R a multiple too).
      activation: elementwise and hashable (e.g. `relu2`).
      visit_tiles: the largest visit in tiles (its matmuls have at most `visit_tiles * tile_rows` rows).

    Returns:
      float32 [N, D]. Differentiable w.r.t. tokens, row_weight, up and down.
    """
    if row_token.shape[0] % tile_rows:
        raise ValueError(f"blocks_moe: rows {row_token.shape} must be a multiple of tile_rows={tile_rows}")
    if visit_tiles < 1:
        raise ValueError(f"blocks_moe: visit_tiles must be at least 1, got {visit_tiles}")
    return _blocks_moe(tokens, row_weight.astype(jnp.float32), up, down, row_token.astype(jnp.int32),
                       group_sizes.astype(jnp.int32), tile_rows, visit_tiles, activation)


def visit_schedule(group_sizes: jax.Array, num_rows: int, tile_rows: int, visit_tiles: int):
    """Each group's run of an aligned layout cut into visits of at most `visit_tiles * tile_rows` rows.

    Args:
      group_sizes: int32 [G], multiples of `tile_rows`; num_rows: R, the layout's (static) row count.

    Returns:
      first_row, group, tiles: int32 [V] with V = ceil(R / visit_rows) + G (a static bound), in row order.
        Padding visits have tiles 0 and first_row R (their buffers' writes land past the real rows).
    """
    visit_rows = tile_rows * visit_tiles
    sizes = group_sizes.astype(jnp.int32)
    num_groups = sizes.shape[0]
    per_group = -(-sizes // visit_rows)
    visit_ends = jnp.cumsum(per_group)
    visit_starts = visit_ends - per_group
    group_starts = jnp.cumsum(sizes) - sizes
    visit = jnp.arange(-(-num_rows // visit_rows) + num_groups, dtype=jnp.int32)
    valid = visit < visit_ends[-1]
    group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1).astype(jnp.int32)
    piece = visit - visit_starts[group]
    first_row = jnp.where(valid, group_starts[group] + piece * visit_rows, num_rows)
    tiles = jnp.where(valid, jnp.minimum(sizes[group] - piece * visit_rows, visit_rows) // tile_rows, 0)
    return first_row.astype(jnp.int32), group, tiles.astype(jnp.int32)


def _pad_to_rows(x, rows: int):
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)) if x.shape[0] < rows else x


def _blocks_moe_prepare(tokens, row_weight, row_token, group_sizes, tile_rows, visit_tiles):
    """Padded copies (so that every visit's fixed-size slice is in bounds) and the visit schedule."""
    num_tokens, dim = tokens.shape
    visit_rows = tile_rows * visit_tiles
    padded_tokens = jnp.concatenate([tokens, jnp.zeros((1, dim), tokens.dtype)])  # row N: padding rows read zeros
    padded_row_token = jnp.concatenate([row_token, jnp.full((visit_rows,), num_tokens, jnp.int32)])
    padded_row_weight = jnp.concatenate([row_weight, jnp.zeros((visit_rows,), jnp.float32)])
    schedule = visit_schedule(group_sizes, row_token.shape[0], tile_rows, visit_tiles)
    return padded_tokens, padded_row_token, padded_row_weight, schedule


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blocks_moe(tokens, row_weight, up, down, row_token, group_sizes, tile_rows, visit_tiles, activation):
    return _blocks_moe_fwd(tokens, row_weight, up, down, row_token, group_sizes, tile_rows, visit_tiles,
                           activation)[0]


def _blocks_moe_fwd(tokens, row_weight, up, down, row_token, group_sizes, tile_rows, visit_tiles, activation):
    num_tokens, dim = tokens.shape
    num_rows, width, visit_rows = row_token.shape[0], up.shape[2], tile_rows * visit_tiles
    padded_tokens, row_token_p, row_weight_p, schedule = _blocks_moe_prepare(
        tokens, row_weight, row_token, group_sizes, tile_rows, visit_tiles)

    def visit_of(tiles):
        rows_used = tiles * tile_rows

        def run(index, weight, group):  # -> weighted outputs [V, D] and pre-activations [V, F], zero-padded
            rows = padded_tokens.at[index[:rows_used]].get(mode="promise_in_bounds")
            w_up = lax.dynamic_index_in_dim(up, group, 0, keepdims=False)
            w_down = lax.dynamic_index_in_dim(down, group, 0, keepdims=False)
            hidden = jnp.dot(rows, w_up, preferred_element_type=jnp.float32).astype(tokens.dtype)
            y = jnp.dot(activation(hidden), w_down, preferred_element_type=jnp.float32)
            return _pad_to_rows(weight[:rows_used, None] * y, visit_rows), _pad_to_rows(hidden, visit_rows)

        return run

    branches = [visit_of(tiles) for tiles in range(1, visit_tiles + 1)]

    def visit(carry, xs):
        out, hidden_rows = carry
        first_row, group, tiles = xs
        index = lax.dynamic_slice_in_dim(row_token_p, first_row, visit_rows)
        weight = lax.dynamic_slice_in_dim(row_weight_p, first_row, visit_rows)

        def compute(out):
            y, hidden = lax.switch(tiles - 1, branches, index, weight, group)
            # Rows past this visit's own (the next visit's) get zeros added; the buffers stay out of the
            # switch so that XLA updates them in place.
            return out.at[index].add(y, mode="promise_in_bounds"), hidden

        skip = lambda out: (out, jnp.zeros((visit_rows, width), tokens.dtype))  # noqa: E731
        out, hidden = lax.cond(tiles > 0, compute, skip, out)
        # Visits come in row order, so the zero rows written past a visit's own are rewritten by the next.
        return (out, lax.dynamic_update_slice_in_dim(hidden_rows, hidden, first_row, 0)), None

    init = (jnp.zeros((num_tokens + 1, dim), jnp.float32), jnp.zeros((num_rows + visit_rows, width), tokens.dtype))
    (out, hidden_rows), _ = lax.scan(visit, init, schedule)
    return out[:num_tokens], (padded_tokens, hidden_rows, up, down, row_token_p, row_weight_p, schedule)


def _blocks_moe_bwd(tile_rows, visit_tiles, activation, residuals, grad):
    padded_tokens, hidden_rows, up, down, row_token_p, row_weight_p, schedule = residuals
    num_tokens, dim = padded_tokens.shape[0] - 1, padded_tokens.shape[1]
    visit_rows = tile_rows * visit_tiles
    num_rows = hidden_rows.shape[0] - visit_rows
    grad_padded = jnp.concatenate([grad.astype(jnp.float32), jnp.zeros((1, dim), jnp.float32)])
    contract_rows = (((0,), (0,)), ((), ()))
    contract_cols = (((1,), (1,)), ((), ()))

    def visit_of(tiles):
        rows_used = tiles * tile_rows

        def run(index, weight, group, hidden):
            index, weight, hidden = index[:rows_used], weight[:rows_used, None], hidden[:rows_used]
            w_up = lax.dynamic_index_in_dim(up, group, 0, keepdims=False)
            w_down = lax.dynamic_index_in_dim(down, group, 0, keepdims=False)
            grad_y = grad_padded.at[index].get(mode="promise_in_bounds").astype(down.dtype)  # [m, D]
            act, act_vjp = jax.vjp(activation, hidden)
            # y . grad_y = act . (grad_y @ down^T): the routing-weight gradient without keeping y.
            u = lax.dot_general(grad_y, w_down, contract_cols, preferred_element_type=jnp.float32)  # [m, F]
            grad_weight = jnp.sum(act.astype(jnp.float32) * u, axis=1)
            d_down = lax.dot_general(act, (weight * grad_y).astype(down.dtype), contract_rows,
                                     preferred_element_type=jnp.float32)
            d_hidden = act_vjp((weight * u).astype(hidden.dtype))[0]
            rows = padded_tokens.at[index].get(mode="promise_in_bounds")
            d_up = lax.dot_general(rows, d_hidden.astype(rows.dtype), contract_rows, preferred_element_type=jnp.float32)
            d_rows = lax.dot_general(d_hidden.astype(up.dtype), w_up, contract_cols, preferred_element_type=jnp.float32)
            return _pad_to_rows(d_rows, visit_rows), d_up, d_down, _pad_to_rows(grad_weight, visit_rows)

        return run

    branches = [visit_of(tiles) for tiles in range(1, visit_tiles + 1)]

    def visit(carry, xs):
        first_row, group, tiles = xs
        index = lax.dynamic_slice_in_dim(row_token_p, first_row, visit_rows)
        weight = lax.dynamic_slice_in_dim(row_weight_p, first_row, visit_rows)
        hidden = lax.dynamic_slice_in_dim(hidden_rows, first_row, visit_rows)

        def compute(carry):
            grad_tokens, grad_up, grad_down, grad_weight_rows = carry
            d_rows, d_up, d_down, grad_weight = lax.switch(tiles - 1, branches, index, weight, group, hidden)
            grad_tokens = grad_tokens.at[index].add(d_rows, mode="promise_in_bounds")
            grad_up = lax.dynamic_update_index_in_dim(
                grad_up, lax.dynamic_index_in_dim(grad_up, group, 0, keepdims=False) + d_up, group, 0)
            grad_down = lax.dynamic_update_index_in_dim(
                grad_down, lax.dynamic_index_in_dim(grad_down, group, 0, keepdims=False) + d_down, group, 0)
            # Row order again: the zeros written past this visit's rows are rewritten by the next visit.
            grad_weight_rows = lax.dynamic_update_slice_in_dim(grad_weight_rows, grad_weight, first_row, 0)
            return grad_tokens, grad_up, grad_down, grad_weight_rows

        return lax.cond(tiles > 0, compute, lambda carry: carry, carry), None

    init = (jnp.zeros((num_tokens + 1, dim), jnp.float32), jnp.zeros(up.shape, jnp.float32),
            jnp.zeros(down.shape, jnp.float32), jnp.zeros((num_rows + visit_rows,), jnp.float32))
    (grad_tokens, grad_up, grad_down, grad_weight_rows), _ = lax.scan(visit, init, schedule)
    return (grad_tokens[:num_tokens].astype(padded_tokens.dtype), grad_weight_rows[:num_rows],
            grad_up.astype(up.dtype), grad_down.astype(down.dtype), None, None)


_blocks_moe.defvjp(_blocks_moe_fwd, _blocks_moe_bwd)


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """`x[index]` for an injective row map, with rows where `index == x.shape[0]` set to zero.

    Args:
      x: [R, C]. index: int32 [S] in [0, R]; every row of `x` is read at most once.
      inverse: int32 [R], the row of the result that row r went to, or S if none.

    Returns:
      [S, C]. Its gradient is again a gather (`grad[inverse]`), not a scatter-add: scatters are slow on CPU.
    """
    return _take_rows_fwd(x, index, inverse)[0]


def _take_rows_fwd(x, index, inverse):
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    return padded.at[index].get(mode="promise_in_bounds"), (index, inverse)


def _take_rows_bwd(residuals, grad):
    index, inverse = residuals
    grad_x = _take_rows_fwd(grad, inverse, index)[0]
    zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return grad_x, zero_int(index), zero_int(inverse)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _aligned_layout(group_sizes, num_rows: int, tile_rows: int):
    """Row maps between the compact sorted layout (M rows) and the block-aligned one (A rows).

    -> (to_aligned int32 [A]: compact row of each aligned row, M for padding; to_compact int32 [M]: aligned
    row of each compact row, A for rows past sum(group_sizes); aligned sizes int32 [G]).
    """
    sizes = group_sizes.astype(jnp.int32)
    num_aligned = aligned_num_rows(num_rows, sizes.shape[0], tile_rows)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    aligned = aligned_group_sizes(sizes, tile_rows)
    aligned_starts = jnp.cumsum(aligned) - aligned
    row = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), sizes.shape[0] - 1)
    to_compact = jnp.where(row < ends[-1], aligned_starts[group] + row - starts[group], num_aligned)
    arow = jnp.arange(num_aligned, dtype=jnp.int32)
    agroup = jnp.minimum(jnp.searchsorted(jnp.cumsum(aligned), arow, side="right"), sizes.shape[0] - 1)
    within = arow - aligned_starts[agroup]
    to_aligned = jnp.where((within < sizes[agroup]) & (arow < jnp.sum(aligned)), starts[agroup] + within, num_rows)
    return to_aligned.astype(jnp.int32), to_compact.astype(jnp.int32), aligned


# ----------------------------------------------------------------------------------------------- API
def _check(name, lhs, rhs, group_sizes, group_offset):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"{name}: expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, "
                         f"{rhs.shape}, {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"{name}: shape mismatch lhs {lhs.shape}, rhs {rhs.shape}: contraction sizes differ")
    if group_offset is None and rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"{name}: shape mismatch lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape}: rhs must have one matrix per group (or pass group_offset)")
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"{name}: rhs has {rhs.shape[0]} groups, more than group_sizes {group_sizes.shape}")


def _shift_local_rows_first(lhs, group_sizes, group_offset, num_local):
    """For backends without `group_offset`: the rows of the local groups moved to the top ->
    (shifted lhs [M, K], local sizes [L], first local row)."""
    sizes, starts, _ = _local_groups(group_sizes, group_offset, num_local)
    first = starts[0]
    padded = jnp.concatenate([lhs, jnp.zeros_like(lhs)])
    return lax.dynamic_slice_in_dim(padded, first, lhs.shape[0]), sizes, first


def _unshift(out, first):
    padded = jnp.concatenate([jnp.zeros_like(out), out])
    return lax.dynamic_slice_in_dim(padded, out.shape[0] - first, out.shape[0])


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    backend: str = "scan",
    tile_rows: int = 128,
    preferred_element_type: Any = jnp.float32,
    groups_aligned: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g - group_offset]`.

    Args:
      lhs: [M, K], rows sorted by group.
      rhs: [L, K, N], the matrices of groups `group_offset .. group_offset + L - 1` (L = G without offset).
      group_sizes: int32 [G], summing to at most M.
      group_offset: first group held by `rhs` (int or int32 scalar, may be traced); None means 0 with L = G.
      backend: one of `BACKENDS` (see the module docstring); "auto" picks per platform.
      tile_rows: rows per tile ("scan", "blocks", "pallas" row tile).
      preferred_element_type: dtype of the result (accumulation is float32).
      groups_aligned: "blocks" only: promise that every group starts at a multiple of `tile_rows` and
        M is a multiple of `tile_rows` (as `aligned_group_sizes` gives), so no re-layout is needed.
      interpret: "pallas"/"megablox": run the Pallas kernels in interpret mode (None: on CPU only).

    Returns:
      [M, N] in `preferred_element_type`; rows of non-local groups and rows past `sum(group_sizes)` are zero.
    """
    _check("gmm", lhs, rhs, group_sizes, group_offset)
    backend = resolve_backend(backend)
    group_sizes = group_sizes.astype(jnp.int32)
    num_local = rhs.shape[0]
    out_dtype = jnp.dtype(preferred_element_type)
    if backend == "scan":
        return _gmm_scan_vjp(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype)
    if backend == "blocks":
        if groups_aligned:
            if lhs.shape[0] % tile_rows:
                raise ValueError(f"gmm: groups_aligned needs M={lhs.shape[0]} to be a multiple of "
                                 f"tile_rows={tile_rows}")
            return _gmm_blocks_aligned(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype)
        to_aligned, to_compact, aligned = _aligned_layout(group_sizes, lhs.shape[0], tile_rows)
        out = _gmm_blocks_aligned(take_rows(lhs, to_aligned, to_compact), rhs, aligned, group_offset, tile_rows,
                                  out_dtype)
        return take_rows(out, to_compact, to_aligned)
    if backend in _PALLAS_LOWERING:
        from nemotron_jax.kernels import pallas_gmm

        return pallas_gmm.gmm(lhs, rhs, group_sizes, group_offset=group_offset, tile_rows=tile_rows,
                              preferred_element_type=out_dtype, lowering=_PALLAS_LOWERING[backend],
                              interpret=interpret)
    if backend == "megablox":
        from nemotron_jax.kernels import library_gmm

        return library_gmm.megablox_gmm(lhs, rhs, group_sizes, group_offset=group_offset, tile_rows=tile_rows,
                                        preferred_element_type=out_dtype, interpret=interpret)
    # ragged_dot and tokamax have no group offset: move the local rows to the top and back.
    first = None
    if group_offset is not None or num_local != group_sizes.shape[0]:
        lhs, group_sizes, first = _shift_local_rows_first(lhs, group_sizes, group_offset, num_local)
    if backend == "ragged_dot":
        out = lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(out_dtype)
    else:
        from nemotron_jax.kernels import library_gmm

        out = library_gmm.tokamax_gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
    return out if first is None else _unshift(out, first)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    num_local_groups: int | None = None,
    backend: str = "scan",
    tile_rows: int = 128,
    preferred_element_type: Any = jnp.float32,
    groups_aligned: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group `lhs[rows of g].T @ grad[rows of g]` for the local groups (the weight gradient of `gmm`).

    Args:
      lhs: [M, K]; grad: [M, N]; rows sorted by group.
      group_sizes: int32 [G]. group_offset / num_local_groups: the local groups (default: all G).
      backend: as for `gmm` ("ragged_dot" and "tokamax" use the transposed `jax.vjp` of their gmm).

    Returns:
      [L, K, N] in `preferred_element_type`.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: expected lhs [M, K] and grad [M, N]; got {lhs.shape}, {grad.shape}")
    backend = resolve_backend(backend)
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    group_sizes = group_sizes.astype(jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type)
    if backend == "scan":
        return _tgmm_scan(lhs, grad, group_sizes, group_offset, num_local, tile_rows, out_dtype)
    if backend == "blocks":
        if not groups_aligned:
            to_aligned, to_compact, group_sizes = _aligned_layout(group_sizes, lhs.shape[0], tile_rows)
            lhs, grad = take_rows(lhs, to_aligned, to_compact), take_rows(grad, to_aligned, to_compact)
        return _tgmm_blocks_aligned(lhs, grad, group_sizes, group_offset, num_local, tile_rows, out_dtype)
    if backend in _PALLAS_LOWERING:
        from nemotron_jax.kernels import pallas_gmm

        return pallas_gmm.tgmm(lhs, grad, group_sizes, group_offset=group_offset, num_local_groups=num_local,
                               tile_rows=tile_rows, preferred_element_type=out_dtype,
                               lowering=_PALLAS_LOWERING[backend], interpret=interpret)
    if backend == "megablox":
        from nemotron_jax.kernels import library_gmm

        return library_gmm.megablox_tgmm(lhs, grad, group_sizes, group_offset=group_offset,
                                         num_local_groups=num_local, tile_rows=tile_rows,
                                         preferred_element_type=out_dtype, interpret=interpret)
    rhs = jnp.zeros((num_local, lhs.shape[1], grad.shape[1]), lhs.dtype)
    _, pullback = jax.vjp(lambda w: gmm(lhs, w, group_sizes, group_offset=group_offset, backend=backend,
                                        preferred_element_type=jnp.float32), rhs)
    return pullback(grad.astype(jnp.float32))[0].astype(out_dtype)

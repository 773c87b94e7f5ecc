"""Grouped matrix multiplication for dropless MoE dispatch, in plain JAX.

Rows of `lhs` are sorted by group (expert): rows `[start_g, end_g)` belong to group `g`, with
`end_g - start_g = group_sizes[g]`. `gmm` multiplies each row block by its group's matrix:

    out[start_g:end_g] = lhs[start_g:end_g] @ rhs[g]          lhs [M, K], rhs [G, K, N] -> out [M, N]

and `tgmm` is the weight gradient of that product:

    out[g] = lhs[start_g:end_g].T @ grad[start_g:end_g]       lhs [M, K], grad [M, N] -> out [G, K, N]

Two backends:
- "scan": walks a static schedule of (row tile, group) visits with `lax.scan`, one `[tile, K] @ [K, N]`
  matmul per visit, masking the rows of a tile that belong to another group. Work is the real grouped
  work plus at most one partial tile per group boundary, and memory is one output buffer: nothing of size
  `[M, G, ...]` is ever built. It has a `custom_vjp` (gmm + tgmm, forward-only scans), so autodiff never
  stores per-visit residuals. This is the plain-JAX reference for the Pallas kernels and the CPU default.
- "ragged_dot": `jax.lax.ragged_dot`, native grouped GEMM on GPU/TPU. On XLA:CPU it lowers to a masked
  dense product that materialises a `[G, M, K]` operand, so it is not the CPU default.

Rows past `sum(group_sizes)` produce zeros. `group_sizes` must sum to at most `M` (not checked: it is
traced).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("scan", "ragged_dot")


def tile_schedule(group_sizes: jax.Array, num_rows: int, tile_rows: int):
    """The (row tile, group) pairs that the scan visits, in row order.

    Args:
      group_sizes: int32 [G], rows per group.
      num_rows: M, rows of the (unpadded) lhs.
      tile_rows: rows per tile.

    Returns:
      visit_tile, visit_group: int32 [V] with V = ceil(M / tile_rows) + G - 1 (a static bound: each group
        boundary inside a tile adds one visit); visit_valid: bool [V], False for padding visits;
        group_starts, group_ends: int32 [G].
    """
    num_groups = group_sizes.shape[0]
    num_tiles = -(-num_rows // tile_rows)
    group_sizes = group_sizes.astype(jnp.int32)
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes
    first_tile = group_starts // tile_rows
    last_tile = (group_ends - 1) // tile_rows
    visits_per_group = jnp.where(group_sizes > 0, last_tile - first_tile + 1, 0)
    visit_ends = jnp.cumsum(visits_per_group)
    visit_starts = visit_ends - visits_per_group
    num_visits = num_tiles + num_groups - 1
    visit = jnp.arange(num_visits, dtype=jnp.int32)
    visit_valid = visit < visit_ends[-1]
    visit_group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1)
    visit_tile = first_tile[visit_group] + (visit - visit_starts[visit_group])
    visit_tile = jnp.where(visit_valid, visit_tile, 0).astype(jnp.int32)
    return visit_tile, visit_group.astype(jnp.int32), visit_valid, group_starts, group_ends


def _tile_row_mask(tile, group, valid, group_starts, group_ends, tile_rows):
    rows = tile * tile_rows + jnp.arange(tile_rows, dtype=jnp.int32)
    return valid & (rows >= group_starts[group]) & (rows < group_ends[group])


def _pad_rows(x: jax.Array, tile_rows: int) -> jax.Array:
    pad = (-x.shape[0]) % tile_rows
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _gmm_scan(lhs, rhs, group_sizes, tile_rows: int, transpose_rhs: bool):
    """Forward-only grouped matmul; returns float32 [M, N]."""
    num_rows = lhs.shape[0]
    out_cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs_padded = _pad_rows(lhs, tile_rows)
    tiles, groups, valid, starts, ends = tile_schedule(group_sizes, num_rows, tile_rows)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(out, schedule_entry):
        tile, group, ok = schedule_entry
        row0 = tile * tile_rows
        rows = lax.dynamic_slice_in_dim(lhs_padded, row0, tile_rows, axis=0)

        def multiply(rows):
            product = lax.dot_general(rows, rhs[group], contract, preferred_element_type=jnp.float32)
            mask = _tile_row_mask(tile, group, ok, starts, ends, tile_rows)
            return jnp.where(mask[:, None], product, 0.0)

        # Padding visits (up to G - 1 of them: all but one when a few rows meet many groups, as in a decode
        # step) skip the weight slice and the matmul; the output update stays outside the branch, so no
        # branch ever copies `out`.
        product = lax.cond(ok, multiply, lambda rows: jnp.zeros((tile_rows, out_cols), jnp.float32), rows)
        current = lax.dynamic_slice_in_dim(out, row0, tile_rows, axis=0)
        return lax.dynamic_update_slice_in_dim(out, current + product, row0, axis=0), None

    out = jnp.zeros((lhs_padded.shape[0], out_cols), jnp.float32)
    out, _ = lax.scan(visit, out, (tiles, groups, valid))
    return out[:num_rows]


def _tgmm_scan(lhs, grad, group_sizes, tile_rows: int):
    """Forward-only transposed grouped matmul; returns float32 [G, K, N]."""
    num_rows = lhs.shape[0]
    num_groups = group_sizes.shape[0]
    lhs_padded = _pad_rows(lhs, tile_rows)
    grad_padded = _pad_rows(grad, tile_rows)
    tiles, groups, valid, starts, ends = tile_schedule(group_sizes, num_rows, tile_rows)

    def visit(out, schedule_entry):
        tile, group, ok = schedule_entry
        row0 = tile * tile_rows
        mask = _tile_row_mask(tile, group, ok, starts, ends, tile_rows)
        rows = lax.dynamic_slice_in_dim(lhs_padded, row0, tile_rows, axis=0)
        rows = jnp.where(mask[:, None], rows, jnp.zeros((), rows.dtype))
        grad_rows = lax.dynamic_slice_in_dim(grad_padded, row0, tile_rows, axis=0)
        product = lax.dot_general(rows, grad_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return out.at[group].add(product), None

    out = jnp.zeros((num_groups, lhs.shape[1], grad.shape[1]), jnp.float32)
    out, _ = lax.scan(visit, out, (tiles, groups, valid))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_scan_vjp(lhs, rhs, group_sizes, tile_rows):
    return _gmm_scan(lhs, rhs, group_sizes, tile_rows, transpose_rhs=False)


def _gmm_scan_fwd(lhs, rhs, group_sizes, tile_rows):
    return _gmm_scan(lhs, rhs, group_sizes, tile_rows, transpose_rhs=False), (lhs, rhs, group_sizes)


def _gmm_scan_bwd(tile_rows, residuals, grad_out):
    lhs, rhs, group_sizes = residuals
    grad_lhs = _gmm_scan(grad_out.astype(rhs.dtype), rhs, group_sizes, tile_rows, transpose_rhs=True)
    grad_rhs = _tgmm_scan(lhs, grad_out.astype(lhs.dtype), group_sizes, tile_rows)
    return grad_lhs.astype(lhs.dtype), grad_rhs.astype(rhs.dtype), None


_gmm_scan_vjp.defvjp(_gmm_scan_fwd, _gmm_scan_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "scan",
    tile_rows: int = 128,
    preferred_element_type=jnp.float32,
) -> jax.Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g]`.

    Args:
      lhs: [M, K], rows sorted by group.
      rhs: [G, K, N].
      group_sizes: int32 [G], summing to at most M.
      backend: "scan" or "ragged_dot" (see the module docstring).
      tile_rows: rows per tile of the "scan" backend.
      preferred_element_type: dtype of the result (accumulation is float32).

    Returns:
      [M, N] in `preferred_element_type`; rows past `sum(group_sizes)` are zero.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"gmm: expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, "
                         f"{rhs.shape}, {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"gmm: shape mismatch lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if backend == "scan":
        out = _gmm_scan_vjp(lhs, rhs, group_sizes.astype(jnp.int32), tile_rows)
    elif backend == "ragged_dot":
        out = lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"gmm: unknown backend {backend!r}; one of {BACKENDS}")
    return out.astype(preferred_element_type)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tile_rows: int = 128) -> jax.Array:
    """Per-group `lhs[rows of g].T @ grad[rows of g]`: lhs [M, K], grad [M, N] -> float32 [G, K, N]."""
    return _tgmm_scan(lhs, grad, group_sizes.astype(jnp.int32), tile_rows)

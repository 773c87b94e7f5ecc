"""This package's own Pallas grouped matmul (`gmm`) and its transposed form (`tgmm`), for TPU and GPU.

Why our own kernels next to tokamax and megablox (`kernels.library_gmm`): tokamax's `ragged_dot` has no
`group_offset`, and megablox is TPU-only (on GPU it runs only in interpret mode). Expert parallelism needs
both platforms to multiply the sorted rows of all groups by the weights of a *local subset* of groups
(`group_offset`, `rhs` holding only L of the G groups), with a backward pass.

    gmm(lhs [M, K], rhs [L, K, N], group_sizes [G], group_offset=o)  -> [M, N]
        rows of group o + l (l < L) times rhs[l]; other rows zero
    tgmm(lhs [M, K], grad [M, N], group_sizes [G], group_offset=o, num_local_groups=L) -> [L, K, N]

`gmm` is a `custom_vjp`: d lhs = gmm(grad, rhs, transpose_rhs=True), d rhs = tgmm(lhs, grad).

Two lowerings, chosen by `lowering` ("tpu", "gpu"; None: the default backend's, "tpu" on CPU):

- TPU (Mosaic). A static schedule of V = ceil(M / tm) + L - 1 (row tile, local group) visits in row order
  (`grouped_matmul.tile_schedule`) is scalar-prefetched into SMEM and drives the BlockSpec index maps, as
  in megablox. gmm's grid is (N tiles, visits, K tiles): consecutive visits of one row tile keep the output
  block resident in VMEM; each visit masks the rows of its group into it (the first visit of a tile writes
  the whole block). tgmm's grid is (K tiles, N tiles, visits), accumulating in VMEM scratch until the
  group changes. Tiles: tm = `tile_rows`, tk/tn the largest of 512/256/128 dividing K/N (else whole).
- GPU (Pallas on Triton). gmm: one program per (row tile, N tile) loops over the local groups that meet
  its rows (from per-tile group ranges computed outside), skipping empty ones, so no two programs write the
  same rows. tgmm: one program per (local group, K tile, N tile) loops over its group's row chunks.
  Block sizes are powers of two (Triton); rows are padded to the row block.

On CPU both run with `interpret=True` (tests). Rows outside the local groups, and groups without rows,
come out zero (a mask applied after the kernel: never-visited tiles are not written by the TPU kernel).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nemotron_jax.kernels.grouped_matmul import tile_schedule

LOWERINGS = ("tpu", "gpu")


def _tile(size: int, preferred: tuple[int, ...] = (512, 256, 128)) -> int:
    return next((t for t in preferred if size % t == 0), size)


def _pow2_tile(size: int, cap: int) -> int:
    """The largest power of two <= cap dividing `size` (Triton blocks are powers of two)."""
    tile = 1
    while tile * 2 <= cap and size % (tile * 2) == 0:
        tile *= 2
    return tile


def _local_groups(group_sizes, group_offset, num_local):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    pick = lambda a: lax.dynamic_slice_in_dim(a, offset, num_local)  # noqa: E731
    return pick(group_sizes), pick(starts), pick(ends)


def _local_row_mask(group_sizes, group_offset, num_local, num_rows):
    sizes, starts, ends = _local_groups(group_sizes, group_offset, num_local)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    return (rows >= starts[0]) & (rows < ends[-1])


def _pad_rows(x, multiple):
    pad = (-x.shape[0]) % multiple
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


# ------------------------------------------------------------------------------------------------ TPU
def _tpu_schedule(group_sizes, num_rows, tm, group_offset, num_local):
    tiles, groups, valid, starts, ends = tile_schedule(group_sizes, num_rows, tm, group_offset, num_local)
    # Padding visits repeat the last real visit's blocks (no new block is fetched or written back).
    last = jnp.maximum(jnp.sum(valid.astype(jnp.int32)) - 1, 0)
    tiles = jnp.where(valid, tiles, tiles[last])
    groups = jnp.where(valid, groups, groups[last])
    new_tile = jnp.concatenate([jnp.ones((1,), bool), tiles[1:] != tiles[:-1]])
    new_group = jnp.concatenate([jnp.ones((1,), bool), groups[1:] != groups[:-1]])
    last_of_group = jnp.concatenate([groups[1:] != groups[:-1], jnp.ones((1,), bool)])
    as_int = lambda a: a.astype(jnp.int32)  # noqa: E731
    return (tiles, groups, as_int(valid), as_int(new_tile), as_int(new_group), as_int(last_of_group), starts, ends)


def _tpu_gmm(lhs, rhs, group_sizes, group_offset, *, tile_rows, transpose_rhs, out_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    num_rows, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = tile_rows
    tk, tn = _tile(k), _tile(n)
    lhs_p = _pad_rows(lhs, tm)
    tiles, groups, valid, new_tile, _, _, starts, ends = _tpu_schedule(group_sizes, num_rows, tm, group_offset,
                                                                       num_local)
    num_visits = tiles.shape[0]
    num_k = k // tk

    def kernel(tiles_ref, groups_ref, valid_ref, new_tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref,
               acc_ref):
        v, kk = pl.program_id(1), pl.program_id(2)

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(valid_ref[v] == 1)
        def _():
            contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], contract, preferred_element_type=jnp.float32)

        @pl.when(kk == num_k - 1)
        def _():
            group = groups_ref[v]
            rows = tiles_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mask = (valid_ref[v] == 1) & (rows >= starts_ref[group]) & (rows < ends_ref[group])
            value = jnp.where(mask, acc_ref[...], 0.0).astype(out_ref.dtype)

            @pl.when(new_tile_ref[v] == 1)
            def _():
                out_ref[...] = value

            @pl.when(new_tile_ref[v] == 0)
            def _():
                out_ref[...] += value  # rows are disjoint between visits: exact in any dtype

    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, t, g, *_: (g[v], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, t, g, *_: (g[v], kk, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(n // tn, num_visits, num_k),
        in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, t, *_: (t[v], kk)), rhs_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda j, v, kk, t, *_: (t[v], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lhs_p.shape[0], n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="nemotron_gmm_tpu",
    )(tiles, groups, valid, new_tile, starts, ends, lhs_p, rhs)
    return out[:num_rows]


def _tpu_tgmm(lhs, grad, group_sizes, group_offset, num_local, *, tile_rows, out_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    num_rows, k = lhs.shape
    n = grad.shape[1]
    tm = tile_rows
    tk, tn = _tile(k), _tile(n)
    # Like megablox, the kernel reads lhs transposed ([K, M]) so that each visit is a plain matmul.
    lhs_t = _pad_rows(lhs, tm).swapaxes(0, 1)
    grad_p = _pad_rows(grad, tm)
    tiles, groups, valid, _, new_group, last_of_group, starts, ends = _tpu_schedule(
        group_sizes, num_rows, tm, group_offset, num_local)

    def kernel(tiles_ref, groups_ref, valid_ref, new_group_ref, last_ref, starts_ref, ends_ref, lhs_ref, grad_ref,
               out_ref, acc_ref):
        v = pl.program_id(2)

        @pl.when(new_group_ref[v] == 1)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(valid_ref[v] == 1)
        def _():
            group = groups_ref[v]
            cols = tiles_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tk, tm), 1)
            mask = (cols >= starts_ref[group]) & (cols < ends_ref[group])
            rows = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
            acc_ref[...] += jnp.dot(rows, grad_ref[...], preferred_element_type=jnp.float32)

        @pl.when(last_ref[v] == 1)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(k // tk, n // tn, tiles.shape[0]),
        in_specs=[pl.BlockSpec((tk, tm), lambda kk, j, v, t, *_: (kk, t[v])),
                  pl.BlockSpec((tm, tn), lambda kk, j, v, t, *_: (t[v], j))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda kk, j, v, t, g, *_: (g[v], kk, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nemotron_tgmm_tpu",
    )(tiles, groups, valid, new_group, last_of_group, starts, ends, lhs_t, grad_p)
    sizes, _, _ = _local_groups(group_sizes, group_offset, num_local)
    return jnp.where((sizes > 0)[:, None, None], out, jnp.zeros((), out.dtype))  # groups never visited


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_gmm(lhs, rhs, group_sizes, group_offset, *, tile_rows, transpose_rhs, out_dtype, interpret):
    import jax.experimental.pallas.triton as plgpu  # noqa: PLC0415

    num_rows, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm = max(16, _pow2_tile(tile_rows, 128))
    bk, bn = _pow2_tile(k, 64), _pow2_tile(n, 128)
    lhs_p = _pad_rows(lhs, bm)
    num_tiles = lhs_p.shape[0] // bm
    sizes, starts, ends = _local_groups(group_sizes, group_offset, num_local)
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * bm
    # Local groups meeting rows [tile_start, tile_start + bm): those ending after the start and starting
    # before the end (sorted rows make both monotone in the group index).
    first_group = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last_group = (jnp.searchsorted(starts, tile_start + bm, side="left") - 1).astype(jnp.int32)

    def kernel(first_ref, last_ref, sizes_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        row0 = i * bm
        rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)

        def group_product(g, acc):
            def multiply(acc):
                def k_step(kk, part):
                    a = lhs_ref[pl.ds(row0, bm), pl.ds(kk * bk, bk)]
                    if transpose_rhs:
                        b = rhs_ref[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)]
                        return part + plgpu.dot(a, b, trans_b=True).astype(jnp.float32)
                    b = rhs_ref[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]
                    return part + plgpu.dot(a, b).astype(jnp.float32)

                part = lax.fori_loop(0, k // bk, k_step, jnp.zeros((bm, bn), jnp.float32))
                mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
                return jnp.where(mask, part, acc)

            return lax.cond(sizes_ref[g] > 0, multiply, lambda acc: acc, acc)

        acc = lax.fori_loop(first_ref[i], last_ref[i] + 1, group_product, jnp.zeros((bm, bn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    whole = pl.no_block_spec  # whole-array refs in global memory, indexed with pl.ds in the kernel
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lhs_p.shape[0], n), out_dtype),
        grid=(num_tiles, n // bn),
        in_specs=[whole] * 7,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="nemotron_gmm_gpu",
    )(first_group, last_group, sizes, starts, ends, lhs_p, rhs)
    return out[:num_rows]


def _gpu_tgmm(lhs, grad, group_sizes, group_offset, num_local, *, tile_rows, out_dtype, interpret):
    import jax.experimental.pallas.triton as plgpu  # noqa: PLC0415

    num_rows, k = lhs.shape
    n = grad.shape[1]
    bm = max(16, _pow2_tile(tile_rows, 64))
    bk, bn = _pow2_tile(k, 64), _pow2_tile(n, 64)
    # Chunks of a group start anywhere: pad by one chunk so every read stays in bounds.
    lhs_p = jnp.pad(lhs, ((0, bm), (0, 0)))
    grad_p = jnp.pad(grad, ((0, bm), (0, 0)))
    sizes, starts, ends = _local_groups(group_sizes, group_offset, num_local)

    def kernel(sizes_ref, starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
        g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = starts_ref[g], ends_ref[g]

        def chunk(c, acc):
            row0 = start + c * bm
            rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
            a = jnp.where(rows < end, lhs_ref[pl.ds(row0, bm), pl.ds(kk * bk, bk)], 0)
            b = grad_ref[pl.ds(row0, bm), pl.ds(j * bn, bn)]
            return acc + plgpu.dot(a.astype(b.dtype), b, trans_a=True).astype(jnp.float32)

        num_chunks = (sizes_ref[g] + bm - 1) // bm
        acc = lax.fori_loop(0, num_chunks, chunk, jnp.zeros((bk, bn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    whole = pl.no_block_spec  # whole-array refs in global memory, indexed with pl.ds in the kernel
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid=(num_local, k // bk, n // bn),
        in_specs=[whole] * 5,
        out_specs=pl.BlockSpec((None, bk, bn), lambda g, kk, j: (g, kk, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nemotron_tgmm_gpu",
    )(sizes, starts, ends, lhs_p, grad_p)


# ------------------------------------------------------------------------------------------------ API
def _resolve(lowering, interpret):
    platform = jax.default_backend()
    if lowering is None:
        lowering = "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    if lowering not in LOWERINGS:
        raise ValueError(f"pallas gmm: unknown lowering {lowering!r}; one of {LOWERINGS}")
    if interpret is None:  # a lowering off its own platform can only be interpreted
        interpret = platform == "cpu" or (lowering == "tpu") != (platform == "tpu")
    return lowering, bool(interpret)


def _gmm_impl(lhs, rhs, group_sizes, group_offset, tile_rows, transpose_rhs, out_dtype, lowering, interpret):
    kernel = _tpu_gmm if lowering == "tpu" else _gpu_gmm
    out = kernel(lhs, rhs, group_sizes, group_offset, tile_rows=tile_rows, transpose_rhs=transpose_rhs,
                 out_dtype=out_dtype, interpret=interpret)
    mask = _local_row_mask(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])
    return jnp.where(mask[:, None], out, jnp.zeros((), out.dtype))


def _tgmm_impl(lhs, grad, group_sizes, group_offset, num_local, tile_rows, out_dtype, lowering, interpret):
    kernel = _tpu_tgmm if lowering == "tpu" else _gpu_tgmm
    return kernel(lhs, grad, group_sizes, group_offset, num_local, tile_rows=tile_rows, out_dtype=out_dtype,
                  interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm_vjp(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, lowering, interpret):
    return _gmm_impl(lhs, rhs, group_sizes, group_offset, tile_rows, False, out_dtype, lowering, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, lowering, interpret):
    out = _gmm_impl(lhs, rhs, group_sizes, group_offset, tile_rows, False, out_dtype, lowering, interpret)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(tile_rows, out_dtype, lowering, interpret, residuals, grad):
    lhs, rhs, group_sizes, group_offset = residuals
    grad_lhs = _gmm_impl(grad.astype(rhs.dtype), rhs, group_sizes, group_offset, tile_rows, True, lhs.dtype,
                         lowering, interpret)
    grad_rhs = _tgmm_impl(lhs, grad.astype(lhs.dtype), group_sizes, group_offset, rhs.shape[0], tile_rows,
                          rhs.dtype, lowering, interpret)
    return grad_lhs, grad_rhs, None, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset=None, tile_rows: int = 128,
        preferred_element_type: Any = jnp.float32, lowering: str | None = None,
        interpret: bool | None = None) -> jax.Array:
    """Pallas grouped matmul: lhs [M, K] (rows sorted by group), rhs [L, K, N], group_sizes int32 [G] ->
    [M, N] (see the module docstring). `lowering`: "tpu" or "gpu" (None: the platform's; CPU interprets the
    TPU kernel). `interpret`: None -> True on CPU."""
    lowering, interpret = _resolve(lowering, interpret)
    offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    return _gmm_vjp(lhs, rhs, group_sizes.astype(jnp.int32), offset, tile_rows, jnp.dtype(preferred_element_type),
                    lowering, interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, group_offset=None,
         num_local_groups: int | None = None, tile_rows: int = 128, preferred_element_type: Any = jnp.float32,
         lowering: str | None = None, interpret: bool | None = None) -> jax.Array:
    """Pallas transposed grouped matmul: lhs [M, K], grad [M, N] -> [L, K, N] for the local groups."""
    lowering, interpret = _resolve(lowering, interpret)
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    return _tgmm_impl(lhs, grad, group_sizes.astype(jnp.int32), offset, num_local, tile_rows,
                      jnp.dtype(preferred_element_type), lowering, interpret)

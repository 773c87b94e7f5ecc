"""Grouped matmuls from maintained libraries, behind the `kernels.grouped_matmul` API.

- `tokamax_gmm`: `tokamax.ragged_dot` (tokamax==0.0.12, the newest release that installs with jax 0.10.2).
  Its Mosaic-TPU (megablox-derived) and Mosaic-GPU (sm90+) kernels have a custom VJP. The implementation is
  always passed explicitly: "mosaic" on TPU and GPU, "xla" on CPU. Not "triton" for training:
  openxla/tokamax#887 gives wrong weight gradients for empty groups. Tokamax is imported on first use (it
  takes seconds to import), and has no `group_offset`.
- `megablox_gmm` / `megablox_tgmm`: `jax.experimental.pallas.ops.tpu.megablox`, the TPU kernel most JAX MoE
  code uses, with `group_offset`. Off TPU it runs in Pallas interpret mode (a correctness check only).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp

# Tokamax implementation per platform (see the module docstring).
TOKAMAX_IMPLEMENTATION = {"tpu": "mosaic", "gpu": "mosaic", "cuda": "mosaic", "rocm": "triton", "cpu": "xla"}


def tokamax_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type: Any,
                implementation: str | None = None) -> jax.Array:
    """`tokamax.ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`; implementation from
    `TOKAMAX_IMPLEMENTATION[jax.default_backend()]` unless given."""
    import tokamax  # noqa: PLC0415 (seconds to import; only the GPU/TPU paths need it)
    from absl import flags  # noqa: PLC0415

    # tokamax reads its config from absl flags and, when nothing has parsed them yet, parses `sys.argv`
    # itself: under any non-absl program (pytest, a user script) a foreign argv such as `-q` raises
    # UnrecognizedFlagError. Unparsed means nobody set tokamax's flags, so take their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    if implementation is None:
        platform = jax.default_backend()
        if platform not in TOKAMAX_IMPLEMENTATION:
            raise ValueError(f"tokamax_gmm: no tokamax implementation chosen for platform {platform!r}")
        implementation = TOKAMAX_IMPLEMENTATION[platform]
    return tokamax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type,
                              implementation=implementation)


def _megablox():  # -> (ops module, kernels module)
    # `megablox.gmm` (the package attribute) is the custom_vjp function and shadows the module `gmm`, which
    # holds `tgmm`; reach both modules through sys.modules.
    import jax.experimental.pallas.ops.tpu.megablox  # noqa: F401,PLC0415

    return (sys.modules["jax.experimental.pallas.ops.tpu.megablox.ops"],
            sys.modules["jax.experimental.pallas.ops.tpu.megablox.gmm"])


def _tile(size: int, preferred: tuple[int, ...] = (512, 256, 128)) -> int:
    """The largest preferred tile dividing `size`, else the whole dimension."""
    return next((t for t in preferred if size % t == 0), size)


def _row_tile(num_rows: int, tile_rows: int) -> int:
    return max(8, min(tile_rows, -(-num_rows // 8) * 8))


def _local_row_mask(group_sizes, group_offset, num_local, num_rows):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    first = starts[offset]
    last = ends[offset + num_local - 1]
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    return (rows >= first) & (rows < last)


def _megablox_gmm_raw(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, transpose_rhs, interpret):
    _, kernels = _megablox()
    num_rows = lhs.shape[0]
    tm = _row_tile(num_rows, tile_rows)
    padded = jnp.pad(lhs, ((0, (-num_rows) % tm), (0, 0)))
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = (tm, _tile(lhs.shape[1]), _tile(n))
    out = kernels.gmm(padded, rhs, group_sizes, out_dtype, tiling, group_offset, transpose_rhs=transpose_rhs,
                      interpret=interpret)[:num_rows]
    # megablox leaves rows outside the visited groups unwritten (NaN in interpret mode): zero them.
    mask = _local_row_mask(group_sizes, group_offset, rhs.shape[0], num_rows)
    return jnp.where(mask[:, None], out, jnp.zeros((), out.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _megablox_gmm(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, interpret):
    return _megablox_gmm_raw(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, False, interpret)


def _megablox_gmm_fwd(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, interpret):
    out = _megablox_gmm_raw(lhs, rhs, group_sizes, group_offset, tile_rows, out_dtype, False, interpret)
    return out, (lhs, rhs, group_sizes, group_offset)


def _megablox_gmm_bwd(tile_rows, out_dtype, interpret, residuals, grad):
    lhs, rhs, group_sizes, group_offset = residuals
    grad_lhs = _megablox_gmm_raw(grad.astype(rhs.dtype), rhs, group_sizes, group_offset, tile_rows, lhs.dtype, True,
                                 interpret)
    grad_rhs = megablox_tgmm(lhs, grad.astype(lhs.dtype), group_sizes, group_offset=group_offset,
                             num_local_groups=rhs.shape[0], tile_rows=tile_rows, preferred_element_type=rhs.dtype,
                             interpret=interpret)
    return grad_lhs, grad_rhs, None, None


_megablox_gmm.defvjp(_megablox_gmm_fwd, _megablox_gmm_bwd)


def megablox_gmm(lhs, rhs, group_sizes, *, group_offset=None, tile_rows: int = 128,
                 preferred_element_type: Any = jnp.float32, interpret: bool | None = None) -> jax.Array:
    """megablox `gmm` for lhs [M, K], rhs [L, K, N] -> [M, N]; rows outside the local groups are zero. Our
    own custom VJP around megablox's gmm/tgmm (megablox's leaves the gradient of such rows unwritten). Rows
    are padded to the row tile; K and N tiles are 512/256/128 or whole."""
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    return _megablox_gmm(lhs, rhs, group_sizes.astype(jnp.int32), offset, tile_rows,
                         jnp.dtype(preferred_element_type), bool(interpret))


def megablox_tgmm(lhs, grad, group_sizes, *, group_offset=None, num_local_groups: int, tile_rows: int = 128,
                  preferred_element_type: Any = jnp.float32, interpret: bool | None = None) -> jax.Array:
    """megablox `tgmm`: lhs [M, K], grad [M, N] -> [L, K, N] for the local groups."""
    _, kernels = _megablox()
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    num_rows = lhs.shape[0]
    tm = _row_tile(num_rows, tile_rows)
    pad = ((0, (-num_rows) % tm), (0, 0))
    tiling = (tm, _tile(lhs.shape[1]), _tile(grad.shape[1]))
    offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
    return kernels.tgmm(jnp.pad(lhs, pad).swapaxes(0, 1), jnp.pad(grad, pad), group_sizes.astype(jnp.int32),
                        jnp.dtype(preferred_element_type), tiling, offset, num_local_groups, interpret=interpret)

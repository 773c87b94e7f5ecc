"""Packed sequences: from user `segment_ids` to the contiguous run ids the mixers mask with."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contiguous_run_ids(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """Numbers the contiguous runs of equal `segment_ids` in each row: int32 [B, T], starting at 0.

    Two tokens may interact (attention, convolution window, SSM state) only if they are in the same run, so
    a segment id that reappears after another segment starts a new, separate sequence. Padding (any id,
    conventionally 0) is a run of its own. `None` means one sequence per row.
    Inside `parallel.context.context_parallel` (row split over devices) the numbering is the whole row's.
    """
    from nemotron_jax.parallel import context  # the parallel layer imports the model: import late

    if (axis := context.active_axis()) is not None:
        return context.global_run_ids(segment_ids, shape, axis)
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32)
    if segment_ids.shape != tuple(shape):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {tuple(shape)} like the tokens")
    starts = jnp.concatenate(
        [jnp.zeros((shape[0], 1), jnp.int32), (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1
    )
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)

"""Context parallelism: the tokens of one row split into contiguous chunks over a `context` mesh axis.

    wrapped = context_parallel(fn, mesh)          # fn(params, tokens [B, T], ...) -> per-token outputs
    out = jax.jit(wrapped)(params, tokens, segment_ids)

`context_parallel` runs `fn` inside a `jax.shard_map` that is manual over the `context` axis only (every other
mesh axis stays automatic, so `data` / `fsdp` / `tensor` shardings of the batch and of the parameters keep
working through GSPMD): device `i` of the axis sees tokens `[i * T/n, (i+1) * T/n)` of every row. Everything
per token (embeddings, norms, projections, MLP, MoE routing and dispatch, the lm head) is then local. The
mixers that look along the sequence notice the manual `context` axis (`active_axis`) and exchange what they
need with their neighbours:

- run ids (`global_run_ids`): the packed-segment numbering is made global: a run that crosses a device border
  keeps its id, so the masks below compare ids across devices.
- attention (`attention`): K, V and their run ids are all-gathered over the axis (cheap under GQA: 2 KV heads in
  `nano_30b_a3b`); each device attends with its own queries, causal by global position, within runs.
  The transpose of the all-gather is a reduce-scatter, so dK / dV come back to the device that owns them.
- the Mamba causal conv (`causal_conv`): the previous device's last `conv_kernel - 1` inputs arrive by
  `ppermute` (zero on device 0, and masked when a run starts at the border).
- the Mamba SSD scan (`ssd_scan`): the recurrence is linear in the state, so each device scans its chunk from a
  zero state, then the devices all-gather (final state, decay across the chunk) - a few MiB - and each
  combines its predecessors' states into the state entering its chunk, whose contribution
  `C_t . exp(sum_{u<=t} dt_u A) h_in` is added to the positions still in the run it came from.

All of it is exact (same arithmetic up to float32 summation order); tests compare against one device.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

CONTEXT_AXIS = "context"


# ------------------------------------------------------------------------------------------- wrapper
def active_axis(axis: str = CONTEXT_AXIS) -> str | None:
    """`axis` when tracing inside a shard_map that is manual over it with more than one device, else None.

    The model's sequence mixers call this to switch to their context-parallel forms.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if axis in getattr(mesh, "manual_axes", ()) and mesh.shape[axis] > 1:
        return axis
    return None


def context_parallel(fn: Callable[..., Any], mesh: Mesh, *, axis: str = CONTEXT_AXIS,
                     token_argnums: tuple[int, ...] | None = None) -> Callable[..., Any]:
    """Wraps `fn(*args)` to run with the tokens of each row split over the `axis` devices of `mesh`.

    Arguments in `token_argnums` (default: every argument but the first) are per-token arrays [B, T, ...] or
    None, split along axis 1; the others (parameters) are passed whole along `axis` (their sharding over other
    mesh axes is left to GSPMD). Every output leaf must be per-token, [B, T, ...]: reduce over tokens outside
    (e.g. compute per-token log-probs inside, sum them outside). T must divide by the axis size, and each chunk
    must hold at least `conv_kernel - 1` tokens.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; context_parallel needs an axis named {axis!r}")

    def wrapped(*args):
        token_args = range(1, len(args)) if token_argnums is None else token_argnums
        size = mesh.shape[axis]
        for i in token_args:
            if args[i] is not None:
                if args[i].ndim < 2 or args[i].shape[1] % size:
                    raise ValueError(
                        f"context_parallel: argument {i} has shape {args[i].shape}; its token axis (1) must divide "
                        f"by the {size} devices of mesh axis {axis!r}")
        specs = tuple(P(None, axis) if i in token_args else P() for i in range(len(args)))
        specs = tuple(None if a is None else s for a, s in zip(args, specs))
        # A None argument has no leaves; its spec must be None too (a pytree prefix of nothing).
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(None, axis), axis_names={axis},
                               check_vma=False)
        return mapped(*args)

    return wrapped


def _from_previous(value: jax.Array, axis: str) -> jax.Array:
    """Device i receives device i-1's `value`; device 0 receives zeros."""
    size = lax.axis_size(axis)
    return lax.ppermute(value, axis, [(i, i + 1) for i in range(size - 1)])


# ------------------------------------------------------------------------------------------- run ids
def global_run_ids(segment_ids: jax.Array | None, shape: tuple[int, int], axis: str) -> jax.Array:
    """`segments.contiguous_run_ids` of the whole row, computed on this device's chunk: int32 [B, Tl].

    segment_ids: [B, Tl] (this device's tokens) or None (one sequence per row). A run continues across the
    border when the previous device's last token has the same segment id.
    """
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32)
    if segment_ids.shape != tuple(shape):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {tuple(shape)} like the tokens")
    index = lax.axis_index(axis)
    previous_last = _from_previous(segment_ids[:, -1:], axis)
    first_start = jnp.where(index > 0, (segment_ids[:, :1] != previous_last), False).astype(jnp.int32)
    starts = jnp.concatenate([first_start, (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
    local = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    totals = lax.all_gather(local[:, -1], axis)  # [n, B] runs started on each device
    earlier = jnp.arange(totals.shape[0]) < index
    offset = jnp.sum(jnp.where(earlier[:, None], totals, 0), axis=0, dtype=jnp.int32)
    return local + offset[:, None]


# ------------------------------------------------------------------------------------------- attention
def attention(query: jax.Array, key: jax.Array, value: jax.Array, run_ids: jax.Array, axis: str,
              attend: Callable[..., jax.Array]) -> jax.Array:
    """Causal attention of this device's queries against the keys of the whole row.

    query [B, Tl, Hkv, R, Dh], key/value [B, Tl, Hkv, Dh], run_ids int32 [B, Tl] (global, see
    `global_run_ids`). `attend(query, key, value, q_positions, kv_positions, q_runs, kv_runs)` is the
    single-device attention with explicit query/key positions [Tl] / [T] and runs [B, Tl] / [B, T] (the model's
    backend); returns its result, [B, Tl, Hkv, R, Dh].
    """
    length = query.shape[1]
    all_keys = lax.all_gather(key, axis, axis=1, tiled=True)  # [B, T, Hkv, Dh]
    all_values = lax.all_gather(value, axis, axis=1, tiled=True)
    all_runs = lax.all_gather(run_ids, axis, axis=1, tiled=True)  # [B, T]
    q_positions = lax.axis_index(axis) * length + jnp.arange(length)
    kv_positions = jnp.arange(all_keys.shape[1])
    return attend(query, all_keys, all_values, q_positions, kv_positions, run_ids, all_runs)


# ------------------------------------------------------------------------------------------- Mamba-2
def causal_conv(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None, run_ids: jax.Array,
                axis: str) -> tuple[jax.Array, jax.Array]:
    """`mamba2.causal_depthwise_conv` of the whole row on this device's chunk.

    inputs [B, Tl, C], kernel [K, C], bias [C] | None, run_ids int32 [B, Tl] (global). Returns (float32
    outputs [B, Tl, C], the row's final window [B, K-1, C] - the last device's, the same on every device).
    """
    from nemotron_jax.model.mamba2 import causal_depthwise_conv

    window = kernel.shape[0] - 1
    length = inputs.shape[1]
    if window == 0:
        return causal_depthwise_conv(inputs, kernel, bias, run_ids)
    if length < window:
        raise ValueError(f"context parallelism: {length} tokens per device is fewer than the conv window "
                         f"({window}); use fewer devices on the context axis or longer rows")
    prefix = _from_previous(inputs[:, -window:], axis)
    prefix_runs = _from_previous(run_ids[:, -window:], axis)
    # Only inputs of the run that position 0 continues may enter its window.
    prefix = jnp.where((prefix_runs == run_ids[:, :1])[..., None], prefix, jnp.zeros((), prefix.dtype))
    out, tail = causal_depthwise_conv(inputs, kernel, bias, run_ids, prefix)
    return out, lax.all_gather(tail, axis)[-1]


def ssd_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, run_ids: jax.Array,
             chunk_size: int, axis: str) -> tuple[jax.Array, jax.Array]:
    """`mamba2.ssd_chunked_scan` of the whole row (zero initial state) on this device's chunk.

    x [B, Tl, H, P], dt [B, Tl, H], A [H], B/C [B, Tl, G, N] (float32), run_ids int32 [B, Tl] (global).
    Returns (y [B, Tl, H, P], the row's final state [B, H, P, N] - the same on every device).
    """
    from nemotron_jax.model.mamba2 import ssd_chunked_scan

    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    zero_state = jnp.zeros((batch, heads, head_dim, B.shape[3]), jnp.float32)
    zero_state = lax.pcast(zero_state, (axis,), to="varying")  # the scan carry varies over the axis
    y_local, state_local = ssd_chunked_scan(x, dt, A, B, C, run_ids, chunk_size, zero_state)

    index = lax.axis_index(axis)
    log_decay = jnp.cumsum(dt * A, axis=1)  # [B, Tl, H]: sum_{u <= t} dt_u A
    last_runs = lax.all_gather(run_ids[:, -1], axis)
    # The state entering chunk i survives it iff the run of the token before the chunk is still the run of its
    # last token (runs are numbered in order, so nothing starts in between).
    runs_before = jnp.concatenate([jnp.full((1, batch), -1, jnp.int32), last_runs[:-1]], axis=0)  # [n, B]
    survives = (runs_before == last_runs).astype(jnp.float32)
    chunk_decay = lax.all_gather(jnp.exp(log_decay[:, -1]), axis) * survives[..., None]  # [n, B, H]
    chunk_states = lax.all_gather(state_local, axis)  # [n, B, H, P, N]

    def step(state, chunk):
        decay, contribution = chunk
        return state * decay[..., None, None] + contribution, state

    final_state, entering = lax.scan(step, jnp.zeros_like(state_local), (chunk_decay, chunk_states))
    state_in = lax.dynamic_index_in_dim(entering, index, axis=0, keepdims=False)  # [B, H, P, N]
    run_before = lax.dynamic_index_in_dim(runs_before, index, axis=0, keepdims=False)  # [B]

    carried = jnp.where((run_ids == run_before[:, None])[..., None], jnp.exp(log_decay), 0.0)  # [B, Tl, H]
    per_group = heads // groups
    y_in = jnp.einsum("btgn,bgepn,btge->btgep", C,
                      state_in.reshape(batch, groups, per_group, head_dim, -1),
                      carried.reshape(batch, length, groups, per_group))
    return y_local + y_in.reshape(batch, length, heads, head_dim), final_state

"""Expert parallelism: each token copy travels to the device that holds its expert and comes back, in a
`jax.shard_map`.

Layout (mesh of `mesh.py`): tokens `[N, D]` are split over every mesh axis but `tensor` (data, fsdp, expert
and any extra automatic axis); the routed experts' weights `[E, D, F]` / `[E, F, D]` are split over `expert`
along E and over `tensor` along F (an FSDP split of D is all-gathered by XLA before the shard_map, as for any
FSDP weight). On each device, with `ep` devices on the expert axis and `E_l = E / ep` local experts:

1. sort the `m = n * k` local token copies by expert id (so by destination device, then local expert);
2. exchange copy counts (`all_gather` of an int32 `[E]` vector), then send each device its copies
   (the *transport*); each source's copies arrive as one block already sorted by local expert;
3. run the two grouped matmuls of `kernels.grouped_matmul.gmm` (`down(act(up(x)))`) on each source's block,
   one block at a time (`lax.map`, rematerialised), so no buffer of the expert computation is larger than
   one source's `m` rows; with `tensor > 1` each device holds an F-slice and the result is a partial sum;
4. send the results back by the reverse transport, weight them, add the k copies of each token, and `psum`
   the partial sums over `tensor`.

Transports (`TRANSPORTS`; "auto" picks "ragged_all_to_all" on TPU and GPU, "all_to_all" elsewhere):

- "ragged_all_to_all": `jax.lax.ragged_all_to_all` moves exactly the copies that go to each device into a
  receive buffer of the worst-case size `ep * m` rows. Not implemented by XLA:CPU. (On GPU it has had
  gradient-corruption and >32-rank problems, marin#8077, openxla/xla#47283: keep "all_to_all" in reach.)
- "all_to_all": a dense `jax.lax.all_to_all` of a capacity-padded `[ep, C, D]` buffer with `C = m`, the
  worst case (every local copy to one device), so no token is ever dropped whatever the routing; the price is
  `ep`-times the bytes of an exact exchange, on the wire and in memory. Runs everywhere, including XLA:CPU.

Both are dropless and exact: the same products as the single-device `dispatch_experts`, accumulated in float32
(each copy's expert output travels back in the compute dtype, so in bfloat16 it is rounded once before the
weighted float32 sum of the k copies; in float32 the results agree to rounding). Both are differentiable (the
transpose of each exchange is the reverse exchange). Padding rows of a block come after its real rows, where
`gmm` does no work for them. The shard_map runs with `check_vma=False`: the grouped
matmul's `lax.cond` / `lax.scan` are not annotated for the varying-manual-axes checker.

The MoE layer calls this through the hook of `model/moe.py` (`register` below) whenever the trace-time
context mesh (`parallel.activate(mesh)`, i.e. `jax.set_mesh`) has an `expert` axis.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nemotron_jax.kernels.grouped_matmul import gmm
from nemotron_jax.model import moe as moe_lib
from nemotron_jax.model.activations import relu2
from nemotron_jax.parallel.mesh import EXPERT, TENSOR

TRANSPORTS = ("auto", "ragged_all_to_all", "all_to_all")


def resolve_transport(transport: str, platform: str | None = None) -> str:
    """"auto" -> "ragged_all_to_all" on TPU/GPU, "all_to_all" otherwise (XLA:CPU has no ragged_all_to_all)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"expert-parallel transport {transport!r}: one of {TRANSPORTS}")
    if transport != "auto":
        return transport
    platform = platform or jax.default_backend()
    return "ragged_all_to_all" if platform in ("tpu", "gpu", "cuda", "rocm") else "all_to_all"


def _auto_axes(mesh) -> list[str]:
    """The mesh axes the dispatch's shard_map maps over: those not already manual (e.g. `context`)."""
    manual = set(getattr(mesh, "manual_axes", ()))
    return [name for name in mesh.axis_names if name not in manual]


def _token_split_axes(mesh) -> tuple[str, ...]:
    """The automatic mesh axes of more than one device that split the tokens (all but `tensor`)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(name for name in _auto_axes(mesh) if name != TENSOR and sizes[name] > 1)


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _grouped_experts(rows, group_sizes, up_proj, down_proj, *, backend, tile_rows, activation):
    """rows [M, D] sorted by local expert (group_sizes [E_l], summing to at most M) -> [M, D] in the rows'
    dtype (accumulated in float32; rows past sum(group_sizes) give zeros): the dispatch layer's grouped
    matmuls `down(act(up(x)))`."""
    hidden = gmm(rows, up_proj, group_sizes, backend=backend, tile_rows=tile_rows, preferred_element_type=rows.dtype)
    return gmm(activation(hidden), down_proj, group_sizes, backend=backend, tile_rows=tile_rows,
               preferred_element_type=rows.dtype)


def _per_source(received, starts, from_src, rows_per_source, experts):
    """The expert computation on a receive buffer, one source device's block at a time.

    received [R, D]; source s's copies are rows [starts[s], starts[s] + sum(from_src[s])), already sorted by
    local expert (the sender sorted them), with from_src [ep, E_l] copies per local expert. Returns
    [ep, rows_per_source, D]: block s holds source s's results in the same order, zeros after them.
    A `lax.map` over sources with a rematerialised body: besides the buffers, memory holds one source's block
    (at most `rows_per_source` rows) in the forward and the backward, never `ep` blocks.
    """

    @jax.checkpoint
    def block(start_and_sizes):
        start, sizes = start_and_sizes
        rows = lax.dynamic_slice_in_dim(received, start, rows_per_source, axis=0)
        return experts(rows, sizes)

    return lax.map(block, (starts, from_src))


def _expert_parallel_local(hidden, expert_ids, expert_weights, up_proj, down_proj, *, tokens_per_exchange, **kw):
    """Per device: hidden [n, D], expert_ids / expert_weights [n, k], up_proj [E_l, D, F_l],
    down_proj [E_l, F_l, D] -> float32 [n, D].

    The n local tokens go through the exchange in chunks of at most `tokens_per_exchange` (a rematerialised
    `lax.map`): the exchange buffers are sized for the worst case (`ep * chunk * k` rows per device, see the
    module docstring), so chunking bounds them whatever the number of tokens per device (at 8192 tokens,
    top-6, ep 8 and hidden 2688, one unchunked bfloat16 receive buffer is 2 GiB, and its float32 gradient 4).
    A last partial chunk is padded with copies of weight 0 (zero rows: no effect on any gradient).
    """
    num_tokens = hidden.shape[0]
    num_chunks = max(1, -(-num_tokens // tokens_per_exchange))
    if num_chunks == 1 or kw["num_shards"] == 1:  # no exchange: nothing worst-case-sized to bound
        return _exchange_and_compute(hidden, expert_ids, expert_weights, up_proj, down_proj, **kw)
    chunk = -(-num_tokens // num_chunks)
    pad = num_chunks * chunk - num_tokens

    def chunks(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    @jax.checkpoint
    def one_chunk(args):
        return _exchange_and_compute(*args, up_proj, down_proj, **kw)

    out = lax.map(one_chunk, (chunks(hidden), chunks(expert_ids), chunks(expert_weights)))
    return out.reshape((num_chunks * chunk,) + out.shape[2:])[:num_tokens]


def _exchange_and_compute(hidden, expert_ids, expert_weights, up_proj, down_proj, *, num_shards, tensor_axis,
                          transport, backend, tile_rows, activation, visit_tiles):
    """One chunk of `_expert_parallel_local`: hidden [n, D], expert_ids / expert_weights [n, k] -> float32 [n, D]."""
    if num_shards == 1:  # every expert is local: the single-program dispatch (on CPU the fused "blocks" path)
        combined = moe_lib.dispatch_experts(hidden, expert_ids, expert_weights, up_proj, down_proj, backend=backend,
                                            tile_rows=tile_rows, activation=activation, visit_tiles=visit_tiles)
        return lax.psum(combined, tensor_axis) if tensor_axis is not None else combined
    num_tokens, top_k = expert_ids.shape
    num_local = up_proj.shape[0]
    num_experts = num_local * num_shards
    copies = num_tokens * top_k
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # copy slot -> position in (device, local expert) order
    rows = hidden[order // top_k]  # [m, D]
    dtype = rows.dtype
    counts = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)  # [E]

    def experts(block_rows, group_sizes):
        return _grouped_experts(block_rows, group_sizes, up_proj, down_proj, backend=backend, tile_rows=tile_rows,
                                activation=activation)

    me = lax.axis_index(EXPERT)
    sizes = lax.all_gather(counts, EXPERT).reshape(num_shards, num_shards, num_local)  # [src, dst, e_l]
    pair = sizes.sum(-1)  # [src, dst] copies sent from src to dst
    send_sizes = pair[me]  # [ep]
    recv_sizes = pair[:, me]  # [ep]
    from_src = lax.dynamic_index_in_dim(sizes, me, axis=1, keepdims=False)  # [src, e_l]
    send_starts = _exclusive_cumsum(send_sizes)
    block_starts = jnp.arange(num_shards, dtype=jnp.int32) * copies
    if transport == "all_to_all":
        capacity = copies  # worst case: every local copy goes to one device
        slot = jnp.arange(capacity, dtype=jnp.int32)
        gather = jnp.minimum(send_starts[:, None] + slot[None], copies - 1)  # [ep, C]
        send = jnp.where((slot[None] < send_sizes[:, None])[..., None], rows[gather], jnp.zeros((), dtype))
        received = lax.all_to_all(send.reshape(num_shards * capacity, -1), EXPERT, 0, 0, tiled=True)
        out = _per_source(received, block_starts, from_src, capacity, experts)
        back = lax.all_to_all(out.reshape(num_shards * capacity, -1), EXPERT, 0, 0, tiled=True)
        destination = flat_ids[order] // num_local  # block j of `back` came from device j
        position = destination * capacity + jnp.arange(copies, dtype=jnp.int32) - send_starts[destination]
        out_sorted = back[position]
    elif transport == "ragged_all_to_all":
        received = lax.ragged_all_to_all(
            rows, jnp.zeros((num_shards * copies, rows.shape[1]), dtype), send_starts, send_sizes,
            _exclusive_cumsum(pair, axis=0)[me], recv_sizes, axis_name=EXPERT)
        out = _per_source(received, _exclusive_cumsum(recv_sizes), from_src, copies, experts)
        out_sorted = lax.ragged_all_to_all(
            out.reshape(num_shards * copies, -1), jnp.zeros((copies, rows.shape[1]), dtype), block_starts,
            recv_sizes, _exclusive_cumsum(pair, axis=1)[:, me], send_sizes, axis_name=EXPERT)
    else:
        raise ValueError(f"expert-parallel transport {transport!r}: one of {TRANSPORTS[1:]}")

    weighted = out_sorted.astype(jnp.float32) * expert_weights.reshape(-1)[order][:, None]
    combined = jnp.zeros_like(weighted).at[order].set(weighted).reshape(num_tokens, top_k, -1).sum(axis=1)
    if tensor_axis is not None:
        combined = lax.psum(combined, tensor_axis)
    return combined


def expert_parallel_dispatch(
    hidden: jax.Array,
    expert_ids: jax.Array,
    expert_weights: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    transport: str = "auto",
    backend: str = "scan",
    tile_rows: int = 64,
    activation: Callable[[jax.Array], jax.Array] = relu2,
    tokens_per_exchange: int = 1024,
    visit_tiles: int = 8,
) -> jax.Array:
    """`dispatch_experts` with the experts split over the `expert` mesh axis (see the module docstring).

    Args:
      hidden: [N, D] in the compute dtype; expert_ids: int32 [N, k]; expert_weights: float32 [N, k].
      up_proj: [E, D, F]; down_proj: [E, F, D].
      mesh: default: the context mesh (`jax.sharding.get_abstract_mesh()`); axes already manual (inside an
        enclosing shard_map, e.g. context parallelism) are left alone.
      transport: "auto", "ragged_all_to_all" or "all_to_all".
      tokens_per_exchange: each device's tokens go through the exchange in chunks of at most this many,
        which bounds the worst-case-sized exchange buffers (see `_expert_parallel_local`).

    Returns:
      float32 [N, D].
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        raise ValueError("expert_parallel_dispatch: no mesh (pass one or trace under parallel.activate(mesh))")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    auto = _auto_axes(mesh)
    num_shards = sizes.get(EXPERT, 1) if EXPERT in auto else 1
    tensor_axis = TENSOR if TENSOR in auto and sizes[TENSOR] > 1 else None
    num_experts = up_proj.shape[0]
    if tokens_per_exchange < 1:
        raise ValueError(f"expert_parallel_dispatch: tokens_per_exchange must be >= 1, got {tokens_per_exchange}")
    if num_experts % num_shards:
        raise ValueError(f"mesh axis expert={num_shards} does not divide the {num_experts} routed experts "
                         f"(dimension 0 of the expert weights {tuple(up_proj.shape)})")
    token_axes = _token_split_axes(mesh)
    token_split = math.prod(sizes[name] for name in token_axes)
    num_tokens = hidden.shape[0]
    pad = (-num_tokens) % token_split
    if pad:  # e.g. a decode step of fewer rows than devices: padding copies carry weight 0
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)))
        expert_weights = jnp.pad(expert_weights, ((0, pad), (0, 0)))
    tokens = P(token_axes or None)
    expert_axis = EXPERT if num_shards > 1 else None
    local = jax.shard_map(
        lambda *args: _expert_parallel_local(
            *args, tokens_per_exchange=tokens_per_exchange, num_shards=num_shards, tensor_axis=tensor_axis,
            transport=resolve_transport(transport), backend=backend, tile_rows=tile_rows, activation=activation,
            visit_tiles=visit_tiles),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)),
        out_specs=tokens,
        axis_names=set(auto),
        # The kernels' `lax.cond` / `lax.scan` carries are not annotated for the varying-manual-axes checker.
        check_vma=False,
    )
    out = local(hidden, expert_ids, expert_weights, up_proj, down_proj)
    return out[:num_tokens] if pad else out


def _hook(hidden, expert_ids, expert_weights, up_proj, down_proj, *, transport, backend, tile_rows, activation,
          visit_tiles):
    """The MoE layer's hook: under a context mesh with an `expert` axis, or with any automatic axis that splits
    the tokens (data, fsdp, ...), the shard_map dispatch of this module; else None (the layer then runs the
    single-program `dispatch_experts`). Without an expert axis this still matters: left to GSPMD, the sort of
    all token copies by expert is global, so every device would gather and sort every data shard's tokens (at
    256K tokens per row on fsdp 8 x context 8, 16 GiB buffers of all 8 rows' copies on each device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if EXPERT not in mesh.axis_names and not _token_split_axes(mesh):
        return None
    return expert_parallel_dispatch(hidden, expert_ids, expert_weights, up_proj, down_proj, mesh=mesh,
                                    transport=transport, backend=backend, tile_rows=tile_rows, activation=activation,
                                    visit_tiles=visit_tiles)


def register() -> None:
    """Installs the hook in `model/moe.py` (done when `nemotron_jax.parallel` is imported)."""
    moe_lib.set_expert_parallel_hook(_hook)

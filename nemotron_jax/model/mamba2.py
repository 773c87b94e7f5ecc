"""The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU -> SSD scan -> gated group RMSNorm -> out_proj.

Sequences may be packed: `run_ids [B, T]` numbers the contiguous segments of a row (see
`segments.contiguous_run_ids`), and neither the convolution window nor the SSM state crosses from one run
into the next. A position's state is reset at the first token of its run, exactly as if the run were a
sequence of its own.

The SSD ("state space duality") chunked scan follows Dao & Gu (2024): within a chunk of `L` tokens the
output is a masked, decayed attention-like product; across chunks a recurrence carries the
`[heads, head_dim, state]` state. All SSM arithmetic is float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.norms import GatedGroupRMSNorm


# --------------------------------------------------------------------------------------------- conv
def causal_depthwise_conv(
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    run_ids: jax.Array,
    prefix: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise 1-D convolution that does not look across run boundaries.

    Args:
      inputs: [B, T, C].
      kernel: [K, C]; tap `j` multiplies the input `K - 1 - j` steps back (PyTorch Conv1d order).
      bias: [C] or None.
      run_ids: int32 [B, T]; inputs of another run count as zero.
      prefix: [B, K - 1, C], the last K-1 inputs before `inputs` (a decode cache), or None for zeros.
        They are taken to belong to the run of position 0.

    Returns:
      (outputs float32 [B, T, C], new_prefix [B, K - 1, C]: the last K-1 inputs, zeroed where they belong to
      a run other than the last position's).
    """
    batch, length, channels = inputs.shape
    taps = kernel.shape[0]
    if prefix is None:
        prefix = jnp.zeros((batch, taps - 1, channels), inputs.dtype)
    padded = jnp.concatenate([prefix.astype(inputs.dtype), inputs], axis=1)
    padded_runs = jnp.concatenate([jnp.repeat(run_ids[:, :1], taps - 1, axis=1), run_ids], axis=1)
    out = jnp.zeros((batch, length, channels), jnp.float32)
    for tap in range(taps):
        window = lax.dynamic_slice_in_dim(padded, tap, length, axis=1).astype(jnp.float32)
        same_run = lax.dynamic_slice_in_dim(padded_runs, tap, length, axis=1) == run_ids
        out = out + jnp.where(same_run[..., None], window, 0.0) * kernel[tap].astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    tail = padded[:, length:]
    tail_same_run = padded_runs[:, length:] == run_ids[:, -1:]
    new_prefix = jnp.where(tail_same_run[..., None], tail, jnp.zeros((), tail.dtype))
    return out, new_prefix


# ---------------------------------------------------------------------------------------------- SSD
def _segment_sum(log_decay: jax.Array) -> jax.Array:
    """[..., L] -> [..., L, L] with out[l, s] = sum(log_decay[s+1 : l+1]) for s <= l, -inf above.

    Summing masked copies (rather than differencing a cumulative sum) keeps it exact for long chunks.
    """
    length = log_decay.shape[-1]
    expanded = jnp.broadcast_to(log_decay[..., :, None], (*log_decay.shape, length))  # [..., l, s] = a_l
    strictly_lower = jnp.tril(jnp.ones((length, length), bool), k=-1)
    sums = jnp.cumsum(jnp.where(strictly_lower, expanded, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((length, length), bool)), sums, -jnp.inf)


def _within_chunks(x_dt, log_decay, B, C, runs):
    """Steps 1-2 of `ssd_chunked_scan`: each chunk on its own (state passing is separate).

    x_dt [b, c, l, g, e, p], log_decay [b, c, h, l], B/C [b, c, l, g, n], runs [b, c, l] -> (y_diag
    [b, c, l, g, e, p], chunk_states [b, c, g, e, p, n], cum_decay [b, c, h, l]).
    """
    batch, num_chunks, chunk_size, groups, heads_per_group, _ = x_dt.shape
    cum_decay = jnp.cumsum(log_decay, axis=-1)
    same_run = runs[:, :, :, None] == runs[:, :, None, :]  # [b, c, l, s]

    # 1. Within chunks: y_l = sum_{s <= l, same run} exp(sum a_{s+1..l}) (C_l . B_s) x_s dt_s.
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    keep = (causal & same_run)[:, :, None]  # [b, c, 1, l, s]
    decay = jnp.where(keep, jnp.exp(jnp.where(keep, _segment_sum(log_decay), 0.0)), 0.0)  # [b, c, h, l, s]
    decay = decay.reshape(batch, num_chunks, groups, heads_per_group, chunk_size, chunk_size)
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)
    y_diag = jnp.einsum("bcgls,bcgels,bcsgep->bclgep", scores, decay, x_dt)

    # 2. Each chunk's contribution to the state at its last position (same run as that position only).
    runs_last = runs[:, :, -1]  # [b, c]
    to_chunk_end = jnp.exp(cum_decay[..., -1:] - cum_decay)  # [b, c, h, l]
    to_chunk_end = jnp.where((runs == runs_last[..., None])[:, :, None], to_chunk_end, 0.0)
    to_chunk_end = to_chunk_end.reshape(batch, num_chunks, groups, heads_per_group, chunk_size)
    chunk_states = jnp.einsum("bcsgn,bcges,bcsgep->bcgepn", B, to_chunk_end, x_dt)
    return y_diag, chunk_states, cum_decay


def ssd_chunked_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    run_ids: jax.Array,
    chunk_size: int,
    initial_state: jax.Array | None = None,
    remat: bool = True,
    group_tokens: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Selective state-space scan over full sequences, chunked (SSD), with run-boundary resets.

    Recurrence per head: `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`, `y_t = h_t C_t`, with `h_{t-1}`
    replaced by zero at the first token of a run.

    Args:
      x: [B, T, H, P] float32.
      dt: [B, T, H] float32, already softplus'ed and clamped.
      A: [H] float32, negative.
      B, C: [B, T, G, N] float32; head h reads group h // (H // G).
      run_ids: int32 [B, T].
      chunk_size: L.
      initial_state: [B, H, P, N] float32 state before position 0 (continuing run of position 0), or None.
      remat: recompute the within-chunk products in the backward pass (`jax.checkpoint`) instead of keeping
        their [B, T/L, H, L, L] decay matrix and [B, T/L, G, L, L] scores (L times the inputs' size) alive
        from the forward; the outputs are the same.
      group_tokens: the within-chunk products run over groups of `max(1, group_tokens // L)` chunks at a time
        (`lax.map`), so their [.., L, L] temporaries stay bounded whatever T; rows of at most `group_tokens`
        tokens take one group (all chunks at once).

    Returns:
      y [B, T, H, P] float32 (without the D skip), final_state [B, H, P, N] float32 after position T-1.
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    heads_per_group = heads // groups
    pad = (-length) % chunk_size
    num_chunks = (length + pad) // chunk_size

    def chunked(array, fill=0.0):
        if pad:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (array.ndim - 2)
            array = jnp.pad(array, widths, constant_values=fill)
        return array.reshape(batch, num_chunks, chunk_size, *array.shape[2:])

    # Padded positions decay by exp(0) = 1 and add nothing, so the final state is that of position T-1.
    x_dt = chunked((x * dt[..., None]).reshape(batch, length, groups, heads_per_group, head_dim))
    log_decay = chunked(dt * A)  # [b, c, l, h]
    B = chunked(B)  # [b, c, l, g, n]
    C = chunked(C)
    # Padded positions continue the last run, so they never mask anything real.
    runs = jnp.concatenate([run_ids, jnp.repeat(run_ids[:, -1:], pad, axis=1)], axis=1)
    runs = runs.reshape(batch, num_chunks, chunk_size)

    log_decay = jnp.moveaxis(log_decay, -1, 2)  # [b, c, h, l]
    within = jax.checkpoint(_within_chunks) if remat else _within_chunks
    group = max(1, group_tokens // chunk_size)
    if num_chunks <= group:
        y_diag, chunk_states, cum_decay = within(x_dt, log_decay, B, C, runs)
    else:
        # Whole groups of chunks; padding chunks (zero input, no decay) are computed and dropped.
        num_groups = -(-num_chunks // group)

        def grouped(array):
            array = jnp.pad(array, [(0, 0), (0, num_groups * group - num_chunks)] + [(0, 0)] * (array.ndim - 2))
            return jnp.moveaxis(array.reshape(batch, num_groups, group, *array.shape[2:]), 1, 0)

        def ungrouped(array):
            array = jnp.moveaxis(array, 0, 1)
            return array.reshape(batch, num_groups * group, *array.shape[3:])[:, :num_chunks]

        outs = lax.map(lambda xs: within(*xs), tuple(grouped(a) for a in (x_dt, log_decay, B, C, runs)))
        y_diag, chunk_states, cum_decay = (ungrouped(a) for a in outs)

    # 3. Across chunks: the state entering chunk c survives it iff no run starts inside it.
    runs_last = runs[:, :, -1]  # [b, c]
    runs_before = jnp.concatenate([runs[:, :1, 0], runs[:, :-1, -1]], axis=1)  # run of the position before
    survives = (runs_before == runs_last).astype(jnp.float32)  # [b, c]
    chunk_decay = jnp.exp(cum_decay[..., -1]).reshape(batch, num_chunks, groups, heads_per_group)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, state_size), jnp.float32)
    state0 = initial_state.astype(jnp.float32).reshape(batch, groups, heads_per_group, head_dim, state_size)

    def carry_state(state, chunk):
        contribution, decay_c, survives_c = chunk
        entering = state
        state = state * (decay_c * survives_c[:, None, None])[..., None, None] + contribution
        return state, entering

    final_state, entering_states = lax.scan(
        carry_state,
        state0,
        (jnp.moveaxis(chunk_states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(survives, 1, 0)),
    )
    entering_states = jnp.moveaxis(entering_states, 0, 1)  # [b, c, g, e, p, n]

    # 4. The entering state's contribution to each position still in the run it came from.
    from_chunk_start = jnp.exp(cum_decay)  # [b, c, h, l]
    from_chunk_start = jnp.where((runs == runs_before[..., None])[:, :, None], from_chunk_start, 0.0)
    from_chunk_start = from_chunk_start.reshape(batch, num_chunks, groups, heads_per_group, chunk_size)
    y_off = jnp.einsum("bclgn,bcgepn,bcgel->bclgep", C, entering_states, from_chunk_start)

    y = (y_diag + y_off).reshape(batch, num_chunks * chunk_size, heads, head_dim)[:, :length]
    return y, final_state.reshape(batch, heads, head_dim, state_size)


def ssd_recurrent_step(
    state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One decode step of the same recurrence.

    state [B, H, P, N], x [B, H, P], dt [B, H], A [H], B/C [B, G, N] (all float32) -> (y [B, H, P], state).
    """
    heads = x.shape[1]
    heads_per_group = heads // B.shape[1]
    B_heads = jnp.repeat(B, heads_per_group, axis=1)  # [b, h, n]
    C_heads = jnp.repeat(C, heads_per_group, axis=1)
    decay = jnp.exp(dt * A)[..., None, None]
    state = state * decay + (dt[..., None] * x)[..., None] * B_heads[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, C_heads)
    return y, state


# -------------------------------------------------------------------------------------------- module
def _dt_bias_init(cfg: ModelConfig):
    """Inverse softplus of dt ~ log-uniform[time_step_min, time_step_max], floored (transformers' init)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape)
        dt = jnp.exp(u * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min)) + math.log(cfg.time_step_min))
        dt = jnp.maximum(dt, cfg.time_step_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _uniform_fan_in(fan_in: int, scale: float = 1.0):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times `scale`."""
    bound = scale / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Mamba2Mixer(nn.Module):
    """x [B, T, D] -> [B, T, D]. With `cache` ({"conv": [B, K-1, conv_dim], "ssm": [B, H, P, N] f32}) the
    tokens continue the cached sequence and the updated cache is returned; otherwise the new cache is the
    state after the last token (used by prefill)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        dense = dict(dtype=cfg.compute_jnp_dtype, param_dtype=cfg.param_jnp_dtype, use_bias=cfg.use_bias)
        self.in_proj = nn.Dense(cfg.mamba_in_proj_dim, kernel_init=nn.initializers.normal(cfg.initializer_range),
                                **dense)
        out_scale = 1.0 / math.sqrt(cfg.num_layers) if cfg.rescale_prenorm_residual else 1.0
        self.out_proj = nn.Dense(cfg.hidden_size, kernel_init=_uniform_fan_in(cfg.mamba_d_inner, out_scale), **dense)
        conv_init = _uniform_fan_in(cfg.conv_kernel)
        self.conv_kernel = self.param("conv1d_kernel", conv_init, (cfg.conv_kernel, cfg.mamba_conv_dim),
                                      cfg.param_jnp_dtype)
        self.conv_bias = (self.param("conv1d_bias", conv_init, (cfg.mamba_conv_dim,), cfg.param_jnp_dtype)
                          if cfg.use_conv_bias else None)
        heads = cfg.mamba_num_heads
        self.A_log = self.param(
            "A_log", lambda key, shape, dtype: jnp.log(jnp.arange(1, heads + 1, dtype=jnp.float32)).astype(dtype),
            (heads,), cfg.param_jnp_dtype)
        self.D = self.param("D", nn.initializers.ones, (heads,), cfg.param_jnp_dtype)
        self.dt_bias = self.param("dt_bias", _dt_bias_init(cfg), (heads,), cfg.param_jnp_dtype)
        self.norm = GatedGroupRMSNorm(cfg.mamba_d_inner, cfg.mamba_d_inner // cfg.n_groups, cfg.layer_norm_epsilon,
                                      cfg.param_jnp_dtype)

    def __call__(
        self, hidden: jax.Array, run_ids: jax.Array, cache: dict[str, jax.Array] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        batch, length, _ = hidden.shape
        heads, head_dim, groups, state = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        projected = self.in_proj(hidden)
        gate, xbc, dt = jnp.split(projected, [cfg.mamba_d_inner, cfg.mamba_d_inner + cfg.mamba_conv_dim], axis=-1)

        # Inside `parallel.context.context_parallel` the row is split over devices (no cache there).
        from nemotron_jax.parallel import context  # late: the parallel package imports the model

        cp_axis = context.active_axis() if cache is None else None
        conv_prefix = None if cache is None else cache["conv"]
        if cp_axis is None:
            xbc, new_conv = causal_depthwise_conv(xbc, self.conv_kernel, self.conv_bias, run_ids, conv_prefix)
        else:
            xbc, new_conv = context.causal_conv(xbc, self.conv_kernel, self.conv_bias, run_ids, cp_axis)
        xbc = jax.nn.silu(xbc)  # float32
        x, B, C = jnp.split(xbc, [cfg.mamba_d_inner, cfg.mamba_d_inner + groups * state], axis=-1)
        x = x.reshape(batch, length, heads, head_dim)
        B = B.reshape(batch, length, groups, state)
        C = C.reshape(batch, length, groups, state)

        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
        dt = jnp.maximum(dt, cfg.time_step_min)  # transformers clamps dt to [time_step_min, inf)
        A = -jnp.exp(self.A_log.astype(jnp.float32))

        ssm_state = None if cache is None else cache["ssm"]
        if cache is not None and length == 1:
            y, new_state = ssd_recurrent_step(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y[:, None]
        elif cp_axis is not None:
            y, new_state = context.ssd_scan(x, dt, A, B, C, run_ids, cfg.chunk_size, cp_axis)
        else:
            y, new_state = ssd_chunked_scan(x, dt, A, B, C, run_ids, cfg.chunk_size, ssm_state)
        y = y + self.D.astype(jnp.float32)[:, None] * x
        y = self.norm(y.reshape(batch, length, cfg.mamba_d_inner), gate)
        out = self.out_proj(y.astype(cfg.compute_jnp_dtype))
        return out, {"conv": new_conv.astype(cfg.compute_jnp_dtype), "ssm": new_state}


def init_mamba_cache(cfg: ModelConfig, batch: int) -> dict[str, Any]:
    return {
        "conv": jnp.zeros((batch, cfg.conv_kernel - 1, cfg.mamba_conv_dim), cfg.compute_jnp_dtype),
        "ssm": jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), jnp.float32),
    }

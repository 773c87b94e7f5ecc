"""Causal grouped-query attention with no positional encoding (NoPE), masked to runs of packed rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nemotron_jax.model import attention_backends
from nemotron_jax.model.attention_backends import attention_weights_and_values, masked_attention  # noqa: F401
from nemotron_jax.model.config import ModelConfig


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D].

    Without a cache: causal attention within each run of `run_ids`, by `config.attention_backend` (see
    `attention_backends`; under context parallelism "xla" stays the einsum and every other backend runs
    "blockwise", which takes the global positions). With a cache ({"key", "value":
    [B, S, Hkv, Dh]}) and `cache_meta` ({"index": int32 [] filled positions, "run_ids": int32 [B, S] run of
    each cached position, already holding the new tokens' runs}): the new tokens are written at
    `[index, index + T)` and attend to every cached position of their own run up to themselves.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        run_ids: jax.Array,
        cache: dict[str, jax.Array] | None = None,
        cache_meta: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg = self.config
        batch, length, _ = hidden.shape
        kv_heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
        repeats = cfg.num_attention_heads // kv_heads
        dense = dict(dtype=cfg.compute_jnp_dtype, param_dtype=cfg.param_jnp_dtype, use_bias=False,
                     kernel_init=nn.initializers.normal(cfg.initializer_range))
        query = nn.Dense(cfg.num_attention_heads * head_dim, name="q_proj", **dense)(hidden)
        key = nn.Dense(kv_heads * head_dim, name="k_proj", **dense)(hidden)
        value = nn.Dense(kv_heads * head_dim, name="v_proj", **dense)(hidden)
        # Query head h uses KV head h // repeats (transformers' repeat_kv order).
        query = query.reshape(batch, length, kv_heads, repeats, head_dim)
        key = key.reshape(batch, length, kv_heads, head_dim)
        value = value.reshape(batch, length, kv_heads, head_dim)

        from nemotron_jax.parallel import context  # late: the parallel package imports the model

        tiles = dict(block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
                     compute_dtype=cfg.compute_jnp_dtype)
        if cache is None and (axis := context.active_axis()) is not None:

            def attend(query, key, value, q_positions, kv_positions, q_runs, kv_runs):
                backend = attention_backends.resolve_backend(cfg.attention_backend, key.shape[1],
                                                             cfg.compute_jnp_dtype)
                return attention_backends.attend(
                    query, key, value, q_runs, kv_runs, backend="xla" if backend == "xla" else "blockwise",
                    q_positions=q_positions, kv_positions=kv_positions, **tiles)

            out, new_cache = context.attention(query, key, value, run_ids, axis, attend), None
        elif cache is None:
            out = attention_backends.attend(query, key, value, run_ids, run_ids, backend=cfg.attention_backend,
                                            **tiles)
            new_cache = None
        else:  # decode / prefill with a cache: the einsum over the whole cache
            index = cache_meta["index"]
            key = lax.dynamic_update_slice_in_dim(cache["key"], key.astype(cache["key"].dtype), index, axis=1)
            value = lax.dynamic_update_slice_in_dim(cache["value"], value.astype(cache["value"].dtype), index,
                                                    axis=1)
            new_cache = {"key": key, "value": value}
            query_positions = index + jnp.arange(length)
            key_positions = jnp.arange(key.shape[1])
            causal = key_positions[None, :] <= query_positions[:, None]  # also excludes unfilled slots
            mask = causal[None] & (run_ids[:, :, None] == cache_meta["run_ids"][:, None, :])
            out = attention_weights_and_values(query, key, value, mask, cfg.compute_jnp_dtype)
        out = out.reshape(batch, length, cfg.num_attention_heads * head_dim)
        return nn.Dense(cfg.hidden_size, name="o_proj", **dense)(out), new_cache


def init_attention_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, jax.Array]:
    shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    return {"key": jnp.zeros(shape, cfg.compute_jnp_dtype), "value": jnp.zeros(shape, cfg.compute_jnp_dtype)}

"""Parameter shapes and counts (total and active per token) without allocating anything."""

from __future__ import annotations

import functools

from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.nemotron_h import NemotronH


def abstract_params(cfg: ModelConfig) -> Any:
    """The params pytree of `NemotronH(cfg)` as `jax.ShapeDtypeStruct`s (via `jax.eval_shape`)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda key, t: NemotronH(cfg).init(key, t), jax.random.key(0), tokens)
    return variables["params"]


def count_params(cfg: ModelConfig) -> int:
    """Total number of parameters."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(abstract_params(cfg)))


def count_active_params(cfg: ModelConfig, *, include_input_embedding: bool = False) -> int:
    """Parameters touched by one token: everything except the unrouted experts of each MoE layer
    (each token uses `num_experts_per_tok` routed experts plus the shared expert) and, unless asked,
    the input embedding table (a lookup, not a matmul)."""
    params = abstract_params(cfg)
    total = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    unrouted = cfg.n_routed_experts - cfg.num_experts_per_tok
    per_expert = 2 * cfg.moe_expert_dim * cfg.moe_intermediate_size
    inactive = cfg.layer_pattern.count("E") * unrouted * per_expert
    if not include_input_embedding:
        inactive += int(params["embeddings"]["embedding"].size)
    return total - inactive


def init_params(cfg: ModelConfig, key: jax.Array, *, shardings: Any = None) -> Any:
    """Randomly initialised params, built by one jitted `init` (optionally straight into `shardings`, a
    params-shaped pytree of `jax.sharding.Sharding`, so a large model is never materialised on one device)."""

    if shardings is None:  # one compilation per config, not per call
        return _jitted_init(cfg)(key)
    return jax.jit(functools.partial(_init, cfg), out_shardings=shardings)(key)


def _init(cfg: ModelConfig, key: jax.Array) -> Any:
    return NemotronH(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: ModelConfig):
    return jax.jit(functools.partial(_init, cfg))

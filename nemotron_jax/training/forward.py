"""The training forward: per-token log-probs of given targets, plus what the MoE layers recorded.

The same `NemotronH` code as generation; logits are never materialised (`losses.token_logprobs_and_entropy`
streams the vocabulary).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax.losses import token_logprobs_and_entropy
from nemotron_jax.model.config import LAYER_KINDS, ModelConfig
from nemotron_jax.model.layer_stack import unstack_layers
from nemotron_jax.model.nemotron_h import NemotronH


class ForwardOutput(NamedTuple):
    logprobs: jax.Array  # float32 [B, T]: log p(targets[b, t] | tokens[b, :t+1])
    entropy: jax.Array  # float32 [B, T]: entropy of the next-token distribution
    expert_ids: dict[str, jax.Array]  # MoE layer name -> int32 [B*T, k], the routing this forward used
    router_logits: dict[str, jax.Array]  # MoE layer name -> float32 [B*T, E]


def moe_layer_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Names ("layers_{i}") of the MoE layers, in order."""
    return tuple(f"layers_{i}" for i, char in enumerate(cfg.layer_pattern) if LAYER_KINDS[char] == "moe")


def policy_forward(cfg: ModelConfig, params: Any, tokens: jax.Array, targets: jax.Array,
                   segment_ids: jax.Array | None = None, *,
                   expert_ids: dict[str, jax.Array] | None = None) -> ForwardOutput:
    """tokens, targets, segment_ids int32 [B, T] -> `ForwardOutput`.

    `expert_ids` replays a recorded routing (router replay); the routing weights still come from the current
    router, so gradients reach it.
    """
    hidden, state = NemotronH(cfg).apply({"params": params}, tokens, segment_ids, None, expert_ids,
                                         method=NemotronH.hidden_states, mutable=["intermediates"])
    logprobs, entropy = token_logprobs_and_entropy(hidden, params["lm_head"]["kernel"], targets)
    recorded = unstack_layers(cfg, state.get("intermediates", {}))  # per-layer names with scan_layers too
    names = moe_layer_names(cfg)
    return ForwardOutput(
        logprobs=logprobs,
        entropy=entropy,
        expert_ids={name: recorded[name]["mixer"]["expert_ids"][0] for name in names},
        router_logits={name: recorded[name]["mixer"]["router_logits"][0] for name in names},
    )


def expert_counts(expert_ids: dict[str, jax.Array], num_experts: int, token_mask: jax.Array) -> jax.Array:
    """Tokens routed to each expert: float32 [num_moe_layers, E], counting only `token_mask` [B, T] tokens
    (padding is routed too, but does not count as load)."""
    weights = token_mask.reshape(-1).astype(jnp.float32)
    rows = []
    for name in sorted(expert_ids, key=lambda n: int(n.split("_")[1])):
        ids = expert_ids[name]  # [N, k]
        one_hot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32).sum(1)  # [N, E]
        rows.append(weights @ one_hot)
    if not rows:
        return jnp.zeros((0, num_experts), jnp.float32)
    return jnp.stack(rows)


def load_balancing_loss(router_logits: dict[str, jax.Array], expert_ids: dict[str, jax.Array], num_experts: int,
                        token_mask: jax.Array, num_tokens: Any) -> jax.Array:
    """Switch-style auxiliary loss, summed over MoE layers: E * sum_e f_e * P_e, with f_e the fraction of
    routed slots that chose expert e and P_e the mean normalised sigmoid score of e, over this batch's
    `token_mask` tokens; 1.0 per layer when balanced.

    f and P are products of batch statistics, so the value is computed per (micro-)batch and weighted by its
    share of the global `num_tokens`: micro-batch values add up to the token-weighted mean over micro-batches.
    """
    weights = token_mask.reshape(-1).astype(jnp.float32)
    local_tokens = jnp.sum(weights)
    safe_local = jnp.maximum(local_tokens, 1.0)
    total = jnp.zeros((), jnp.float32)
    for name, logits in router_logits.items():
        scores = jax.nn.sigmoid(logits)
        probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)  # [N, E]
        top_k = expert_ids[name].shape[-1]
        chosen = jax.lax.stop_gradient(jax.nn.one_hot(expert_ids[name], num_experts, dtype=jnp.float32).sum(1))
        fraction = (weights @ chosen) / (top_k * safe_local)
        mean_prob = (weights @ probs) / safe_local
        total = total + num_experts * jnp.sum(fraction * mean_prob)
    return total * local_tokens / jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)

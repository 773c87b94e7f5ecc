"""Mixture of experts: sigmoid router with aux-loss-free correction bias, group-limited top-k, dropless
routed experts (non-gated, squared ReLU in the released models) through a grouped matmul, optionally in a
latent space (Nemotron-3-Super), and one always-on shared expert."""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemotron_jax.kernels.grouped_matmul import gmm
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.activations import ACTIVATIONS, relu2
from nemotron_jax.model.logical import constrain
from nemotron_jax.model.mlp import MLP


# Expert parallelism (`nemotron_jax/parallel/expert_parallel.py`) installs itself here, so that this layer needs no
# knowledge of meshes: called with `dispatch_experts`' arguments (plus `transport`), the hook returns the routed
# output [N, D] when the trace-time context mesh calls for expert parallelism, or None to run `dispatch_experts`.
_expert_parallel_hook: Callable[..., jax.Array | None] | None = None


def set_expert_parallel_hook(hook: Callable[..., jax.Array | None] | None) -> None:
    global _expert_parallel_hook
    _expert_parallel_hook = hook


class Routing(NamedTuple):
    expert_ids: jax.Array  # int32 [N, k]
    expert_weights: jax.Array  # float32 [N, k]
    router_logits: jax.Array  # float32 [N, E]


def route(
    hidden: jax.Array,
    router_kernel: jax.Array,
    correction_bias: jax.Array,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    expert_ids: jax.Array | None = None,
) -> Routing:
    """DeepSeek-V3 style ("noaux_tc") routing, in float32.

    Args:
      hidden: [N, D] tokens.
      router_kernel: [D, E].
      correction_bias: [E]; added to the sigmoid scores for *selection only* (aux-loss-free balancing).
      top_k, n_group, topk_group: pick `topk_group` of `n_group` expert groups by the sum of each group's top-2
        biased scores, then the top-k experts within them.
      norm_topk_prob: renormalise the k weights to sum to one.
      routed_scaling_factor: multiplies the weights after normalisation.
      expert_ids: int32 [N, k] to replay a recorded routing instead of selecting (weights are recomputed
        from the current scores, so gradients still reach the router).

    Returns:
      `Routing` with ids, weights (from the un-biased scores) and the raw router logits.
    """
    logits = jnp.dot(hidden.astype(jnp.float32), router_kernel.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)
    if expert_ids is None:
        choice = jax.lax.stop_gradient(scores) + correction_bias.astype(jnp.float32)
        num_experts = choice.shape[-1]
        if n_group > 1:
            grouped = choice.reshape(-1, n_group, num_experts // n_group)
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, n_group]
            _, top_groups = jax.lax.top_k(group_scores, topk_group)
            group_mask = jnp.zeros_like(group_scores, bool).at[
                jnp.arange(group_scores.shape[0])[:, None], top_groups].set(True)
            expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=-1)
            choice = jnp.where(expert_mask, choice, -jnp.inf)
        _, expert_ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(expert_ids.astype(jnp.int32), weights * routed_scaling_factor, logits)


def dispatch_experts(
    hidden: jax.Array,
    expert_ids: jax.Array,
    expert_weights: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    backend: str = "scan",
    tile_rows: int = 128,
    activation: Callable[[jax.Array], jax.Array] = relu2,
) -> jax.Array:
    """Dropless routed-expert computation: `sum_k w_k * down_e(act(up_e(x)))` with e = expert_ids[:, k].

    Token copies are sorted by expert, each expert's contiguous block goes through a grouped matmul, and the
    results are un-sorted and combined. Nothing of size [tokens, experts, hidden] is built.

    Args:
      hidden: [N, D] in the compute dtype.
      expert_ids: int32 [N, k]; expert_weights: float32 [N, k].
      up_proj: [E, D, F]; down_proj: [E, F, D] (already in the compute dtype).

    Returns:
      float32 [N, D].
    """
    num_tokens, top_k = expert_ids.shape
    num_experts = up_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # copy slot -> position in expert order
    sorted_hidden = hidden[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    up = gmm(sorted_hidden, up_proj, group_sizes, backend=backend, tile_rows=tile_rows,
             preferred_element_type=hidden.dtype)
    out = gmm(activation(up), down_proj, group_sizes, backend=backend, tile_rows=tile_rows,
              preferred_element_type=jnp.float32)
    out = out * expert_weights.reshape(-1)[order][:, None]
    unsorted = jnp.zeros_like(out).at[order].set(out)  # back to [token, k] slot order
    return unsorted.reshape(num_tokens, top_k, -1).sum(axis=1)


class MoE(nn.Module):
    """x [B, T, D] -> [B, T, D]: routed experts plus the shared expert. Sows the chosen `expert_ids`
    ([B*T, k]) and the float32 `router_logits` ([B*T, E]) into the "intermediates" collection (rollouts
    record routing for replay; trainers measure expert load)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, expert_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        batch, length, dim = hidden.shape
        std = nn.initializers.normal(cfg.initializer_range)
        # The router and its correction bias stay float32 whatever the parameter dtype (as in transformers).
        router_kernel = self.param("router_kernel", std, (dim, cfg.n_routed_experts), jnp.float32)
        correction_bias = self.param("e_score_correction_bias", nn.initializers.zeros, (cfg.n_routed_experts,),
                                     jnp.float32)
        expert_dim = cfg.moe_expert_dim
        up_proj = self.param("experts_up_proj", std, (cfg.n_routed_experts, expert_dim, cfg.moe_intermediate_size),
                             cfg.param_jnp_dtype)
        down_proj = self.param("experts_down_proj", std,
                               (cfg.n_routed_experts, cfg.moe_intermediate_size, expert_dim), cfg.param_jnp_dtype)
        tokens = constrain(hidden.reshape(batch * length, dim), ("act_tokens", "act_embed"))
        routing = route(
            tokens, router_kernel, jax.lax.stop_gradient(correction_bias),
            top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
            expert_ids=expert_ids,
        )
        self.sow("intermediates", "expert_ids", routing.expert_ids)
        # Trainers read these for expert-load metrics and the optional load-balancing loss.
        self.sow("intermediates", "router_logits", routing.router_logits)
        compute = cfg.compute_jnp_dtype
        dense = dict(dtype=compute, param_dtype=cfg.param_jnp_dtype, use_bias=cfg.mlp_bias, kernel_init=std)
        expert_inputs = tokens.astype(compute)
        if cfg.moe_latent_size is not None:
            expert_inputs = nn.Dense(cfg.moe_latent_size, name="fc1_latent_proj", **dense)(expert_inputs)
        dispatch_args = (expert_inputs, routing.expert_ids, routing.expert_weights, up_proj.astype(compute),
                         down_proj.astype(compute))
        dispatch_kwargs = dict(backend=cfg.moe_backend, tile_rows=cfg.moe_tile_rows,
                               activation=ACTIVATIONS[cfg.mlp_hidden_act])
        routed = None
        if _expert_parallel_hook is not None:
            routed = _expert_parallel_hook(*dispatch_args, transport=cfg.moe_ep_transport, **dispatch_kwargs)
        if routed is None:
            routed = dispatch_experts(*dispatch_args, **dispatch_kwargs)
        routed = routed.astype(compute)
        if cfg.moe_latent_size is not None:
            routed = nn.Dense(dim, name="fc2_latent_proj", **dense)(routed)
        shared = MLP(cfg, cfg.moe_shared_expert_intermediate_size, name="shared_experts")(hidden)
        return routed.reshape(batch, length, dim).astype(hidden.dtype) + shared

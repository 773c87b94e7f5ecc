"""Mixture of experts: sigmoid router with aux-loss-free correction bias, group-limited top-k, dropless
routed experts (non-gated, squared ReLU in the released models) through a grouped matmul, optionally in a
latent space (Nemotron-3-Super), and one always-on shared expert."""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemotron_jax.kernels.grouped_matmul import (aligned_group_sizes, aligned_num_rows, blocks_moe, gmm,
                                                 resolve_backend)
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


class ExpertLayout(NamedTuple):
    """Where each (token, slot) copy sits in the expert-ordered row buffer that the grouped matmuls read.

    Rows of one expert are contiguous and experts come in id order (a stable argsort of the expert ids, so
    ties keep token order). With `align > 1` every expert's run starts at a multiple of `align` and is padded
    with zero rows to one (the layout of the "blocks" backend); with `align == 1` the buffer is compact.
    """

    row_of_copy: jax.Array  # int32 [N * k]: buffer row of copy t * k + j
    row_token: jax.Array  # int32 [R]: token each row reads; N for padding rows
    row_weight_index: jax.Array  # int32 [R]: copy each row holds; N * k for padding rows
    group_sizes: jax.Array  # int32 [E]: rows per expert in the buffer (multiples of `align`)


def expert_layout(expert_ids: jax.Array, num_experts: int, *, align: int = 1) -> ExpertLayout:
    """The sorted (and, for align > 1, block-aligned) layout of the copies of `expert_ids` [N, k].

    R = N * k when align == 1, else `grouped_matmul.aligned_num_rows(N * k, E, align)` (a static bound).
    """
    num_tokens, top_k = expert_ids.shape
    num_copies = num_tokens * top_k
    flat_ids = expert_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_ids, stable=True)  # sorted position -> copy
    counts = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    copy = jnp.arange(num_copies, dtype=jnp.int32)
    position = jnp.zeros((num_copies,), jnp.int32).at[order].set(copy, unique_indices=True)  # copy -> position
    if align == 1:
        row_of_copy, num_rows, group_sizes = position, num_copies, counts
        row_copy = order.astype(jnp.int32)
    else:
        group_sizes = aligned_group_sizes(counts, align)
        starts = jnp.cumsum(counts) - counts
        aligned_starts = jnp.cumsum(group_sizes) - group_sizes
        row_of_copy = aligned_starts[flat_ids] + position - starts[flat_ids]
        num_rows = aligned_num_rows(num_copies, num_experts, align)
        row_copy = jnp.full((num_rows,), num_copies, jnp.int32).at[row_of_copy].set(copy, unique_indices=True)
    return ExpertLayout(row_of_copy.astype(jnp.int32), (row_copy // top_k).astype(jnp.int32), row_copy, group_sizes)


def _pad_one_row(x):
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


@jax.custom_vjp
def gather_token_rows(hidden: jax.Array, row_token: jax.Array, row_of_copy: jax.Array) -> jax.Array:
    """hidden [N, D] -> the expert-ordered buffer [R, D] (`hidden[row_token]`, zero rows for padding).

    The gradient is a gather and a sum over each token's k copies, not a scatter-add (slow on CPU)."""
    return _pad_one_row(hidden).at[row_token].get(mode="promise_in_bounds")


def _gather_token_rows_fwd(hidden, row_token, row_of_copy):
    return gather_token_rows(hidden, row_token, row_of_copy), (row_token, row_of_copy, hidden.shape[0])


def _gather_token_rows_bwd(residuals, grad):
    row_token, row_of_copy, num_tokens = residuals
    copies = grad.at[row_of_copy].get(mode="promise_in_bounds")  # [N * k, D]
    grad_hidden = copies.reshape(num_tokens, -1, grad.shape[1]).sum(axis=1, dtype=jnp.float32).astype(grad.dtype)
    return grad_hidden, None, None


gather_token_rows.defvjp(_gather_token_rows_fwd, _gather_token_rows_bwd)


@jax.custom_vjp
def combine_rows(rows: jax.Array, expert_weights: jax.Array, layout: ExpertLayout) -> jax.Array:
    """out[t] = sum_j expert_weights[t, j] * rows[row_of_copy[t * k + j]]: [R, D], [N, k] -> float32 [N, D].

    Both gradients are gathers (w.r.t. rows: `g_out[row_token] * weight`, zero on padding rows)."""
    num_tokens, top_k = expert_weights.shape
    copies = rows.at[layout.row_of_copy].get(mode="promise_in_bounds").reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", copies.astype(jnp.float32), expert_weights.astype(jnp.float32))


def _combine_rows_fwd(rows, expert_weights, layout):
    return combine_rows(rows, expert_weights, layout), (rows, expert_weights, layout)


def _combine_rows_bwd(residuals, grad):
    rows, expert_weights, layout = residuals
    grad_f32 = grad.astype(jnp.float32)
    token_grad = _pad_one_row(grad_f32).at[layout.row_token].get(mode="promise_in_bounds")  # [R, D]
    row_weight = _pad_one_row(expert_weights.reshape(-1).astype(jnp.float32)).at[layout.row_weight_index].get(
        mode="promise_in_bounds")  # [R], zero on padding rows
    grad_rows = (token_grad * row_weight[:, None]).astype(rows.dtype)
    per_row = jnp.sum(rows.astype(jnp.float32) * token_grad, axis=1)  # [R]
    grad_weights = per_row.at[layout.row_of_copy].get(mode="promise_in_bounds").reshape(expert_weights.shape)
    zero_layout = jax.tree.map(lambda a: None, layout)
    return grad_rows, grad_weights.astype(expert_weights.dtype), zero_layout


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def dispatch_experts(
    hidden: jax.Array,
    expert_ids: jax.Array,
    expert_weights: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    backend: str = "auto",
    tile_rows: int = 64,
    activation: Callable[[jax.Array], jax.Array] = relu2,
    visit_tiles: int = 8,
) -> jax.Array:
    """Dropless routed-expert computation: `sum_k w_k * down_e(act(up_e(x)))` with e = expert_ids[:, k].

    Shared by every backend: the token copies are laid out by expert (`expert_layout`: stable argsort, block
    aligned for "blocks"), gathered (`gather_token_rows`), put through two grouped matmuls of
    `kernels.grouped_matmul.gmm` with the given backend, and gathered back and weighted (`combine_rows`).
    Every step's gradient is a gather or a grouped matmul. Nothing of size [tokens, experts, ...] is built.

    Args:
      hidden: [N, D] in the compute dtype.
      expert_ids: int32 [N, k]; expert_weights: float32 [N, k].
      up_proj: [E, D, F]; down_proj: [E, F, D] (already in the compute dtype).
      backend: a `kernels.grouped_matmul.BACKENDS` name; "auto" picks per platform ("blocks" on CPU).
      tile_rows: row tile of the grouped matmul (the alignment of each expert's rows for "blocks").
      visit_tiles: "blocks" only: the largest product of one scan step, in tiles (see `blocks_moe`).

    Returns:
      float32 [N, D].
    """
    backend = resolve_backend(backend)
    num_experts = up_proj.shape[0]
    align = tile_rows if backend == "blocks" else 1
    layout = expert_layout(expert_ids, num_experts, align=align)
    if backend == "blocks":  # gather, both matmuls and combine per block, no [R, D] buffers: see `blocks_moe`
        row_weight = _pad_one_row(expert_weights.reshape(-1).astype(jnp.float32))[layout.row_weight_index]
        return blocks_moe(hidden, layout.row_token, row_weight, up_proj, down_proj, layout.group_sizes,
                          tile_rows=tile_rows, activation=activation, visit_tiles=visit_tiles)
    rows = gather_token_rows(hidden, layout.row_token, layout.row_of_copy)
    kwargs = dict(backend=backend, tile_rows=tile_rows, groups_aligned=align > 1)
    up = gmm(rows, up_proj, layout.group_sizes, preferred_element_type=hidden.dtype, **kwargs)
    out = gmm(activation(up), down_proj, layout.group_sizes, preferred_element_type=jnp.float32, **kwargs)
    return combine_rows(out, expert_weights, layout)


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
                               activation=ACTIVATIONS[cfg.mlp_hidden_act], visit_tiles=cfg.moe_visit_tiles)
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

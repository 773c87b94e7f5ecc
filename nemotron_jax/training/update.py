"""One jitted optimiser step over a batch, with gradient accumulation over micro-batches.

Every algorithm (SFT, GRPO, MOPD) supplies a loss function

    loss_fn(params, microbatch: dict[str, Array], normalizers: dict[str, Array]) -> (loss, LossAux)

whose loss is already normalised by the *global* counts in `normalizers` (total loss tokens, sequences, ...),
so the micro-batch losses and gradients add up to the full-batch ones (see `losses.aggregate_loss`). Metrics
in `LossAux.metrics` follow the same convention and are summed over micro-batches, except names starting
with "max_", which are max-reduced.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nemotron_jax.training.optimizer import EXPERT_BIAS_NAME, set_learning_rate
from nemotron_jax.training.state import TrainState


class LossAux(NamedTuple):
    metrics: dict[str, jax.Array]  # float32 scalars, globally normalised
    expert_counts: jax.Array  # float32 [num_moe_layers, E]: tokens routed to each expert


LossFn = Callable[[Any, dict[str, jax.Array], dict[str, jax.Array]], tuple[jax.Array, LossAux]]


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int) -> dict[str, jax.Array]:
    """[B, ...] -> [M, B / M, ...] for every array of `batch`."""

    def split(name: str, x: jax.Array) -> jax.Array:
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, not a multiple of "
                             f"num_microbatches={num_microbatches}")
        return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])

    return {name: split(name, x) for name, x in batch.items()}


def expert_bias_update(params: Any, expert_counts: jax.Array, rate: float, layer_names: tuple[str, ...]) -> Any:
    """Aux-loss-free balancing (DeepSeek-V3): bias_e += rate * sign(mean load - load_e) in each MoE layer.

    expert_counts: float32 [len(layer_names), E]. Layers that saw no tokens are left alone.
    """
    params = dict(params)
    for row, name in enumerate(layer_names):
        counts = expert_counts[row]
        delta = rate * jnp.sign(jnp.mean(counts) - counts) * (jnp.sum(counts) > 0)
        layer = dict(params[name])
        mixer = dict(layer["mixer"])
        mixer[EXPERT_BIAS_NAME] = mixer[EXPERT_BIAS_NAME] + delta.astype(mixer[EXPERT_BIAS_NAME].dtype)
        layer["mixer"] = mixer
        params[name] = layer
    return params


def _reduce_metrics(total: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: (jnp.maximum if name.startswith("max_") else jnp.add)(total[name], new[name]) for name in total}


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_microbatches: int = 1,
    expert_bias_update_rate: float = 0.0,
    moe_layers: tuple[str, ...] = (),
    donate: bool = True,
    mesh: Any = None,
    state_shardings: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns jitted `step(state, batch, normalizers, learning_rate) -> (new_state, metrics)`.

    `learning_rate` (a scalar, traced) is set into the optimiser state of `optimizer.make_optimizer` before the
    update, so stages with different schedules share the compiled step.

    The batch's leading dimension is split into `num_microbatches` slices whose gradients are accumulated in
    a `lax.scan` (one compiled micro-step, memory of one micro-batch). Metrics: the loss function's, plus
    "loss", "grad_norm", "update_norm", "learning_rate", and "moe/max_load_ratio"
    (busiest expert's load over the mean, averaged over MoE layers) with "moe/expert_load" [layers, E]
    (fractions of each layer's routed slots).

    With a `mesh` (`nemotron_jax.parallel.make_mesh`), the step is traced under `parallel.activate(mesh)` (MoE
    layers expert-parallel, activation constraints on), takes and returns the state in `state_shardings`
    (required with a mesh: e.g. `parallel.tree_shardings(state, state.params, mesh)`, the params' rules for
    params and Adam moments), and takes the batch with rows split over (data, fsdp, expert).
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], normalizers: dict[str, jax.Array],
             learning_rate: jax.Array):
        micro = split_microbatches(batch, num_microbatches)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, aux_shape), _ = jax.eval_shape(grad_fn, state.params, first, normalizers)

        def accumulate(carry, microbatch):
            grads_sum, loss_sum, metrics, counts = carry
            (loss, aux), grads = grad_fn(state.params, microbatch, normalizers)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, _reduce_metrics(metrics, aux.metrics),
                    counts + aux.expert_counts), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        metric_zeros = {name: jnp.full(shape.shape, -jnp.inf if name.startswith("max_") else 0.0, shape.dtype)
                        for name, shape in aux_shape.metrics.items()}
        init = (zeros, jnp.zeros((), jnp.float32), metric_zeros,
                jnp.zeros(aux_shape.expert_counts.shape, jnp.float32))
        (grads, loss, metrics, counts), _ = jax.lax.scan(accumulate, init, micro)

        opt_state = set_learning_rate(state.opt_state, learning_rate)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if expert_bias_update_rate:
            params = expert_bias_update(params, counts, expert_bias_update_rate, moe_layers)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        if counts.shape[0]:
            per_layer_total = jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
            load = counts / per_layer_total
            metrics["moe/max_load_ratio"] = jnp.mean(jnp.max(load, -1) * counts.shape[-1])
            metrics["moe/expert_load"] = load
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    from nemotron_jax import parallel

    if state_shardings is None:
        raise ValueError("make_train_step: a mesh needs state_shardings (see parallel.tree_shardings)")
    batch_sharding = parallel.batch_sharding(mesh)
    return parallel.MeshJit(step, mesh, donate_argnums=donate_argnums,
                            in_shardings=(state_shardings, batch_sharding, None, None),
                            out_shardings=(state_shardings, None))

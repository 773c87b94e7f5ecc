"""Optimisers: AdamW with warmup + cosine/constant schedules, gradient clipping, and the MoE-specific masks.

Two kinds of parameter never move under the optimiser:
  * `e_score_correction_bias` of every MoE layer: it is the aux-loss-free balancing bias (DeepSeek-V3,
    Nemotron-H). It only changes through `update.expert_bias_update` (a sign rule on the expert load), or not at
    all when that rate is 0.
  * `router_kernel`, when `freeze_router=True` (a common choice for RL on MoE models: the routing of the
    sampled tokens then stays what the rollout saw).
Everything else gets `clip_by_global_norm` (over the trainable params only) followed by AdamW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

SCHEDULES = ("constant", "cosine")
EXPERT_BIAS_NAME = "e_score_correction_bias"
ROUTER_KERNEL_NAME = "router_kernel"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
      learning_rate: peak learning rate.
      schedule: "constant" (after warmup) or "cosine" (from the peak to `end_lr_ratio * peak` at the last step).
      warmup_steps: linear warmup from `warmup_init_lr` to the peak (MOPD: 30 steps from 2e-7 to 2e-6).
      warmup_init_lr: start of the warmup (default 0).
      end_lr_ratio: final learning rate of the cosine, as a fraction of the peak.
      b1, b2, eps, weight_decay: AdamW (decoupled weight decay).
      max_grad_norm: clip the global gradient norm (None: no clipping).
      freeze_router: keep every MoE `router_kernel` fixed.
    """

    learning_rate: float = 3e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    freeze_router: bool = False

    def validate(self) -> None:
        def fail(field: str, message: str) -> None:
            raise ValueError(f"OptimizerConfig.{field}: {message}")

        if not self.learning_rate > 0:
            fail("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.warmup_init_lr < 0:
            fail("warmup_init_lr", f"must be >= 0, got {self.warmup_init_lr}")
        if not 0 <= self.end_lr_ratio <= 1:
            fail("end_lr_ratio", f"must be in [0, 1], got {self.end_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            fail("max_grad_norm", f"must be positive or None, got {self.max_grad_norm}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Step -> learning rate: linear warmup, then constant or cosine decay until `total_steps`."""
    config.validate()
    peak = config.learning_rate
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        decay_steps = max(total_steps - config.warmup_steps, 1)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_ratio)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(config.warmup_init_lr, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def parameter_labels(params: Any, *, freeze_router: bool) -> Any:
    """A params-shaped pytree of "train" / "frozen" labels (see the module docstring)."""
    flat = traverse_util.flatten_dict(params)
    labels = {}
    for path in flat:
        name = path[-1]
        frozen = name == EXPERT_BIAS_NAME or (freeze_router and name == ROUTER_KERNEL_NAME)
        labels[path] = "frozen" if frozen else "train"
    return traverse_util.unflatten_dict(labels)


def make_optimizer(config: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The optax transformation for `params` (used only for their structure and names).

    The learning rate is an injected hyperparameter (`optax.inject_hyperparams`): the trainer sets it each
    step from `learning_rate_schedule` (see `set_learning_rate`), so one compiled update step serves stages
    that differ only in their schedule.
    """
    config.validate()
    labels = parameter_labels(params, freeze_router=config.freeze_router)

    def build(learning_rate):
        trainable = []
        if config.max_grad_norm is not None:
            trainable.append(optax.clip_by_global_norm(config.max_grad_norm))
        trainable.append(optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                                     weight_decay=config.weight_decay))
        return optax.multi_transform({"train": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)

    return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)


def set_learning_rate(opt_state: Any, learning_rate: Any) -> Any:
    """`opt_state` of `make_optimizer` with its learning rate replaced (traced values are fine)."""
    old = opt_state.hyperparams["learning_rate"]
    return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                           "learning_rate": jnp.asarray(learning_rate, old.dtype)})


def step_function_key(config: OptimizerConfig) -> tuple:
    """The optimiser settings that shape a compiled update step (the schedule does not)."""
    return (config.b1, config.b2, config.eps, config.weight_decay, config.max_grad_norm, config.freeze_router)


def trainable_mask(params: Any, *, freeze_router: bool) -> Any:
    """Params-shaped bools: True where the optimiser moves the parameter."""
    return jax.tree.map(lambda label: label == "train", parameter_labels(params, freeze_router=freeze_router))

"""Non-gated MLP `down(act(up(x)))`, act squared ReLU in the released models. Used for '-' layers and the
MoE shared expert."""

from __future__ import annotations

import flax.linen as nn
import jax

from nemotron_jax.model.activations import ACTIVATIONS
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.logical import constrain


class MLP(nn.Module):
    """x [..., D] -> [..., D] through `intermediate_size` hidden units."""

    config: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(dtype=cfg.compute_jnp_dtype, param_dtype=cfg.param_jnp_dtype, use_bias=cfg.mlp_bias,
                     kernel_init=nn.initializers.normal(cfg.initializer_range))
        hidden = ACTIVATIONS[cfg.mlp_hidden_act](nn.Dense(self.intermediate_size, name="up_proj", **dense)(x))
        if hidden.ndim == 3:
            hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return nn.Dense(cfg.hidden_size, name="down_proj", **dense)(hidden)

"""Activations of the non-gated MLPs and experts, by their transformers `ACT2FN` names."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


# transformers' ACT2FN names usable in the non-gated MLPs of nemotron_h ("relu2" in the released models).
ACTIVATIONS = {
    "relu2": relu2,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

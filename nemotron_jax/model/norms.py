"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer. Both compute in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x**2, -1) + eps)` in float32 over the last axis."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, computed in float32 and cast back to the input dtype. x: [..., D]."""

    features: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.features,), self.param_dtype)
        return (weight.astype(jnp.float32) * rms_normalize(x, self.eps)).astype(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2's output norm: `weight * RMSNorm_per_group(y * silu(gate))`, gate applied before the norm.

    y, gate: [..., D] with D split into groups of `group_size` channels normalised separately. Returns
    float32 (the caller casts before out_proj).
    """

    features: int
    group_size: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, gate: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.features,), self.param_dtype)
        gated = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.features // self.group_size, self.group_size)
        normed = rms_normalize(grouped, self.eps).reshape(gated.shape)
        return weight.astype(jnp.float32) * normed

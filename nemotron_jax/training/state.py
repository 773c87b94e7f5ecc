"""`TrainState`: everything a training step reads and writes, as one pytree (saved whole by Orbax)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

# Purposes of the per-step keys: distinct streams that never collide.
KEY_ROLLOUT = 1
KEY_DROPOUT = 2
KEY_EVAL = 3


@flax.struct.dataclass
class TrainState:
    """step int32 []; params; opt_state (optax); rng uint32 [2] (a raw key, so that it saves as an array).

    Randomness of a step comes from `step_key(purpose)` = fold_in(fold_in(rng, step), purpose): it depends
    only on the seed and the step, so a resumed run draws exactly what the uninterrupted run drew.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, seed: int) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.PRNGKey(seed))

    def step_key(self, purpose: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.rng, self.step), purpose)


def host_seed(key: jax.Array) -> int:
    """A Python int seed in [0, 2**31) drawn from `key` (for host-side samplers such as `nj.generate`)."""
    return int(jax.random.randint(key, (), 0, 2**31 - 1))

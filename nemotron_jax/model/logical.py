"""Logical axis names on activations (the parameter names live in `nemotron_jax/parallel/sharding.py`).

`constrain(x, names)` is `jax.lax.with_sharding_constraint` with the mesh axes that Flax's logical-axis rules
give `names`; it does nothing unless both the rules (`flax.linen.logical_axis_rules`) and a context mesh
(`jax.set_mesh`) are installed, as `nemotron_jax.parallel.activate(mesh)` does, so single-device code is
unchanged. A dimension that its mesh axes do not divide (a batch of one row on eight devices) is left
unconstrained, and axes that an enclosing `shard_map` made manual are skipped.

Names used by the model: act_batch, act_length, act_embed (the residual stream), act_vocab (logits),
act_tokens (flattened [B*T] tokens of the MoE layers), act_mlp (MLP hidden units).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x with its dimensions named `names` (len(names) == x.ndim) constrained to the rules' mesh axes."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    manual = set(getattr(mesh, "manual_axes", ()))
    spec = []
    for size, axes in zip(x.shape, nn.logical_to_mesh_axes(tuple(names), rules)):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a in sizes and a not in manual and sizes[a] > 1)
        split = math.prod(sizes[a] for a in axes)
        spec.append(None if not axes or size % split else (axes[0] if len(axes) == 1 else axes))
    return jax.lax.with_sharding_constraint(x, P(*spec))


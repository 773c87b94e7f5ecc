"""Parameters created directly into their shardings (never a full copy on one device).

Loading goes through the checkpoint layer: `nj.load_hf(directory, shardings=parallel.param_sharding_fn(mesh))`
places each tensor, as it is read, into its sharding (`jax.device_put` of the host array: each device receives
only its shard; with several processes each process keeps only its addressable shards).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.params import abstract_params, init_params
from nemotron_jax.parallel.sharding import param_sharding_fn, param_shardings


def validate_mesh(cfg: ModelConfig, mesh: Mesh) -> Any:
    """Checks that `mesh` can split every parameter of `cfg` (before anything is compiled or allocated) and
    returns the params-shaped tree of shardings. Raises ValueError naming the parameter, the dimension and the
    mesh axis, e.g. "mesh axis expert=3 does not divide dimension 0 ('expert', size 128)"."""
    return param_shardings(abstract_params(cfg), mesh)


def init_sharded_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh) -> Any:
    """Random params of `cfg`, produced by one jitted init whose `out_shardings` are the rules' shardings:
    each device computes and keeps only its own shards."""
    return init_params(cfg, key, shardings=validate_mesh(cfg, mesh))

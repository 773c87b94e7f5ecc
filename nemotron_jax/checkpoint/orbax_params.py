"""Orbax save/restore of model params together with their `ModelConfig`.

Layout of a params checkpoint directory:

    <dir>/model_config.json      ModelConfig fields
    <dir>/params/                Orbax (tensorstore) checkpoint of the params pytree

Orbax writes its own directory atomically; the config sits beside it and the pair is staged in a temporary
sibling directory that is renamed into place only when both are complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from nemotron_jax.checkpoint.atomic import atomic_directory
from nemotron_jax.checkpoint.hf import CONFIG_ERRORS, ShardingSpec, sharding_lookup
from nemotron_jax.checkpoint.safetensors_io import CheckpointError, read_json
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.params import abstract_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_params(cfg: ModelConfig, params: Any, directory: str, *, overwrite: bool = False) -> None:
    """Writes `params` (any sharding) and `cfg` to `directory` (created; must not exist unless overwrite)."""
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        checkpointer.close()


def load_config(directory: str) -> ModelConfig:
    """The `ModelConfig` saved beside the params (CheckpointError naming the file if missing or malformed)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a nemotron-jax params checkpoint")
    fields = read_json(path, "model config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: is a JSON {type(fields).__name__}, not an object")
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown ModelConfig fields {unknown}")
    try:
        return ModelConfig(**fields)
    except CONFIG_ERRORS as error:
        raise CheckpointError(f"{path}: unusable config ({type(error).__name__}: {error})") from None


def restore_params(directory: str, *, shardings: ShardingSpec = None) -> tuple[ModelConfig, Any]:
    """Reads a directory written by `save_params`; `shardings` as in `load_hf` (default: default device)."""
    cfg = load_config(directory)
    sharding_of = sharding_lookup(shardings)
    flat = traverse_util.flatten_dict(abstract_params(cfg))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = traverse_util.unflatten_dict({
        path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_of(path, leaf.shape) or default)
        for path, leaf in flat.items()
    })
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), target)
    finally:
        checkpointer.close()
    return cfg, params

"""Hugging Face `nemotron_h` checkpoints <-> `NemotronH` params.

Two naming schemes are read:
- "backbone": the released hub format (`backbone.layers.{i}...`, one 2-D tensor per expert:
  `mixer.experts.{e}.up_proj.weight [F, D]`); transformers writes this on `save_pretrained`.
- "model": transformers' in-memory names (`model.layers.{i}...`, experts fused into 3-D tensors
  `mixer.experts.up_proj [E, F, D]`, `mixer.experts.down_proj [E, D, F]`).
Linear weights are stored `[out, in]` there and `[in, out]` (Flax `kernel`) here.

`load_hf` streams: it reads one tensor at a time and places each finished parameter on its device(s) at
once, so host memory peaks at about one parameter array (a stacked expert tensor being filled) beyond the
result. Every tensor must be consumed exactly once and have the expected shape, or `CheckpointError`
names it.

HF names are per layer. With `ModelConfig.scan_layers` the params are stacked per scanned segment
(`model.layer_stack`): `tensor_mappings` still lists per-layer paths (`layers_{i}/...`), `load_hf` stacks the
rows of a segment's parameter on the device as soon as all of them are read, and `save_hf` slices one row at
a time, so the conversion happens at this boundary and costs at most one stacked parameter of extra memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import traverse_util

from nemotron_jax.checkpoint.atomic import atomic_directory
from nemotron_jax.checkpoint.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    checkpoint_tensors,
    count_non_finite,
    iterate_tensors,
    plan_shards,
    read_json,
    write_shard,
)
from nemotron_jax.model.config import LAYER_KINDS, ModelConfig
from nemotron_jax.model.layer_stack import layer_location, model_plan
from nemotron_jax.model.params import abstract_params

ParamPath = tuple[str, ...]
SCHEMES = ("backbone", "model")


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One parameter and the Hugging Face tensor(s) it is stored as.

    `hf_names` has one name, or one per expert (stacked along axis 0 of the parameter). `to_hf` / `from_hf`
    convert one HF tensor (one expert's slice for stacked ones); `hf_shape` is the shape of each HF tensor.
    """

    path: ParamPath
    param: jax.ShapeDtypeStruct  # shape and dtype of the parameter
    hf_names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return len(self.hf_names) > 1


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose_last2(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _conv_to_hf(kernel: np.ndarray) -> np.ndarray:  # [K, C] -> [C, 1, K]
    return kernel.T[:, None, :]


def _conv_from_hf(weight: np.ndarray) -> np.ndarray:  # [C, 1, K] -> [K, C]
    return weight[:, 0, :].T


def tensor_mappings(cfg: ModelConfig, scheme: str = "backbone", *, fused_experts: bool | None = None,
                    embedding_name: str = "embeddings") -> list[TensorMapping]:
    """All parameters of `cfg` with their HF names and conversions, in HF storage order.

    Paths are per layer (`layers_{i}/...`) whatever `cfg.scan_layers` (see the module docstring).

    Args:
      scheme: "backbone" or "model" (the prefix).
      fused_experts: 3-D expert tensors (default for "model") or one tensor per expert ("backbone").
      embedding_name: "embeddings" (standard) or "embedding" (some exports).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown naming scheme {scheme!r}; one of {SCHEMES}")
    if fused_experts is None:
        fused_experts = scheme == "model"
    shapes = traverse_util.flatten_dict(abstract_params(dataclasses.replace(cfg, scan_layers=False)))
    prefix = scheme + "."
    mappings: list[TensorMapping] = []

    def add(path: ParamPath, hf_name: str, to_hf=_identity, from_hf=_identity):
        hf_shape = tuple(to_hf(np.empty(shapes[path].shape, np.int8)).shape)
        mappings.append(TensorMapping(path, shapes[path], (hf_name,), hf_shape, to_hf, from_hf))

    def linear(path: ParamPath, hf_module: str, bias: bool):
        add(path + ("kernel",), hf_module + ".weight", _transpose_last2, _transpose_last2)
        if bias:
            add(path + ("bias",), hf_module + ".bias")

    def experts(path: ParamPath, hf_module: str, name: str):
        shape = tuple(shapes[path].shape)  # [E, in, out]
        if fused_experts:
            add(path, f"{hf_module}.experts.{name}", _transpose_last2, _transpose_last2)
        else:
            names = tuple(f"{hf_module}.experts.{e}.{name}.weight" for e in range(shape[0]))
            mappings.append(TensorMapping(path, shapes[path], names, (shape[2], shape[1]), _transpose_last2,
                                          _transpose_last2))

    add(("embeddings", "embedding"), f"{prefix}{embedding_name}.weight")
    for index, char in enumerate(cfg.layer_pattern):
        layer = f"layers_{index}"
        hf_layer = f"{prefix}layers.{index}"
        add((layer, "norm", "weight"), f"{hf_layer}.norm.weight")
        mixer, hf_mixer = (layer, "mixer"), f"{hf_layer}.mixer"
        kind = LAYER_KINDS[char]
        if kind == "mamba":
            linear(mixer + ("in_proj",), f"{hf_mixer}.in_proj", cfg.use_bias)
            add(mixer + ("conv1d_kernel",), f"{hf_mixer}.conv1d.weight", _conv_to_hf, _conv_from_hf)
            if cfg.use_conv_bias:
                add(mixer + ("conv1d_bias",), f"{hf_mixer}.conv1d.bias")
            for name in ("A_log", "D", "dt_bias"):
                add(mixer + (name,), f"{hf_mixer}.{name}")
            add(mixer + ("norm", "weight"), f"{hf_mixer}.norm.weight")
            linear(mixer + ("out_proj",), f"{hf_mixer}.out_proj", cfg.use_bias)
        elif kind == "attention":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear(mixer + (name,), f"{hf_mixer}.{name}", False)
        elif kind == "moe":
            add(mixer + ("router_kernel",), f"{hf_mixer}.gate.weight", _transpose_last2, _transpose_last2)
            add(mixer + ("e_score_correction_bias",), f"{hf_mixer}.gate.e_score_correction_bias")
            if cfg.moe_latent_size is not None:
                linear(mixer + ("fc1_latent_proj",), f"{hf_mixer}.fc1_latent_proj", cfg.mlp_bias)
                linear(mixer + ("fc2_latent_proj",), f"{hf_mixer}.fc2_latent_proj", cfg.mlp_bias)
            experts(mixer + ("experts_up_proj",), hf_mixer, "up_proj")
            experts(mixer + ("experts_down_proj",), hf_mixer, "down_proj")
            for name in ("up_proj", "down_proj"):
                linear(mixer + ("shared_experts", name), f"{hf_mixer}.shared_experts.{name}", cfg.mlp_bias)
        else:
            for name in ("up_proj", "down_proj"):
                linear(mixer + (name,), f"{hf_mixer}.{name}", cfg.mlp_bias)
    add(("norm_f", "weight"), f"{prefix}norm_f.weight")
    add(("lm_head", "kernel"), "lm_head.weight", _transpose_last2, _transpose_last2)
    missing = set(shapes) - {m.path for m in mappings}
    assert not missing, f"parameters without a Hugging Face name: {sorted(missing)}"
    return mappings


def _detect_layout(names: set[str]) -> dict[str, Any]:
    """The naming scheme, expert layout and embedding name that a checkpoint's tensor names use."""
    scheme = "model" if any(n.startswith("model.") for n in names) else "backbone"
    fused = any(".mixer.experts.up_proj" in n and not n.endswith(".weight") for n in names)
    embedding = "embedding" if f"{scheme}.embedding.weight" in names else "embeddings"
    return {"scheme": scheme, "fused_experts": fused, "embedding_name": embedding}


def read_hf_config(directory: str) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory as a dict (CheckpointError if missing or malformed)."""
    path = os.path.join(directory, "config.json")
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory}: no config.json")
    config = read_json(path, "config", unique_keys=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: is a JSON {type(config).__name__}, not an object")
    return config


# What a config with wrong types or values can make the config constructors raise.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError)


def config_from_hf(directory: str, **overrides: Any) -> ModelConfig:
    """`ModelConfig.from_hf_config` of the directory's `config.json`; any failure is a CheckpointError that
    names the file."""
    hf_config = read_hf_config(directory)
    try:
        return ModelConfig.from_hf_config(hf_config, **overrides)
    except CONFIG_ERRORS as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise CheckpointError(f"{os.path.join(directory, 'config.json')}: unusable config "
                              f"({type(error).__name__}: {detail})") from None


ShardingSpec = Any  # a Sharding, a params-shaped pytree of Shardings, or a callable (path, shape) -> Sharding


def sharding_lookup(shardings: ShardingSpec) -> Callable[[ParamPath, tuple[int, ...]], Any]:
    if shardings is None:
        return lambda path, shape: None
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda path, shape: shardings
    if callable(shardings):
        return shardings
    flat = traverse_util.flatten_dict(shardings)
    return lambda path, shape: flat[path]


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    """A host array into `sharding` (None: the default device), each device receiving only its own shard. With
    several processes each one slices its addressable shards out of its host copy (`jax.device_put` would
    first check, by a cross-process all-gather of the whole tensor, that every process holds the same value)."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _row_sharding(sharding: Any) -> Any:
    """The sharding of one row of a stacked parameter placed with `sharding` (None: default placement)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _stack_rows(rows: list[jax.Array], sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.numpy.stack(rows)
    return jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=sharding)(*rows)


class _Placer:
    """Puts loaded per-layer parameters into the layout of `cfg`: unrolled ones straight onto their device(s);
    rows of a scanned segment's parameter are placed as they arrive and stacked once all are there (freeing
    the rows), so device memory exceeds the result by at most the rows of unfinished parameters."""

    def __init__(self, cfg: ModelConfig, sharding_of: Callable[[ParamPath, tuple[int, ...]], Any]):
        self.cfg = cfg
        self.sharding_of = sharding_of
        self.repeats = {segment.name: segment.repeats for segment in model_plan(cfg)}
        self.rows: dict[ParamPath, dict[int, jax.Array]] = {}
        self.params: dict[ParamPath, jax.Array] = {}

    def put(self, path: ParamPath, value: np.ndarray) -> None:
        row = None
        if self.cfg.scan_layers and path[0].startswith("layers_"):
            prefix, row = layer_location(self.cfg, int(path[0].split("_")[1]))
            path = prefix + path[1:]
        if row is None:
            self.params[path] = _place(value, self.sharding_of(path, value.shape))
            return
        repeats = self.repeats[path[0]]
        sharding = self.sharding_of(path, (repeats, *value.shape))
        rows = self.rows.setdefault(path, {})
        rows[row] = jax.device_put(value, _row_sharding(sharding))
        if len(rows) == repeats:
            del self.rows[path]
            self.params[path] = _stack_rows([rows.pop(r) for r in range(repeats)], sharding)


class _Row:
    """Row `row` of a stacked parameter, sliced only when read (`_host`)."""

    def __init__(self, array: Any, row: int):
        self.array, self.row = array, row
        self.shape, self.dtype = tuple(array.shape[1:]), array.dtype


def _per_layer_flat(cfg: ModelConfig, params: Any) -> dict[ParamPath, Any]:
    """Flat params with per-layer paths; rows of stacked parameters as lazy `_Row`s."""
    flat = traverse_util.flatten_dict(params)
    if not cfg.scan_layers:
        return flat
    segments = {segment.name: segment for segment in model_plan(cfg)}
    out: dict[ParamPath, Any] = {}
    for path, value in flat.items():
        segment = segments.get(path[0])
        if segment is None or not segment.scanned:
            out[path] = value
            continue
        position = int(path[1].split("_")[1]) if len(path) > 1 and path[1].startswith("block_") else -1
        if not 0 <= position < len(segment.unit) or value.shape[:1] != (segment.repeats,):
            out[path] = value  # reported as an unexpected entry or shape by the caller
            continue
        for repeat in range(segment.repeats):
            out[(f"layers_{segment.layer_index(repeat, position)}",) + path[2:]] = _Row(value, repeat)
    return out


def _host(value: Any, index: tuple[int, ...] = ()) -> np.ndarray:
    """`value[index]` (a `_Row` sliced here) as a host array."""
    if isinstance(value, _Row):
        value, index = value.array, (value.row, *index)
    return np.asarray(jax.device_get(value[index] if index else value))


def load_hf(
    directory: str,
    *,
    config: ModelConfig | None = None,
    shardings: ShardingSpec = None,
    param_dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    ignore_tensors: tuple[str, ...] = (r"^mtp\.",),
    check_finite: bool = True,
) -> tuple[ModelConfig, Any]:
    """Loads a Hugging Face `nemotron_h` checkpoint directory.

    Args:
      directory: holds `config.json` and `model.safetensors` or `model-*.safetensors` with
        `model.safetensors.index.json`.
      config: use this config instead of the one in `config.json` (its sizes must match the tensors).
      shardings: where to put each parameter: one `jax.sharding.Sharding` for all, a params-shaped pytree of
        them, or a callable `(path tuple, shape) -> Sharding`. Default: the default device.
      param_dtype: store parameters in this dtype (default: the config's `torch_dtype`). The router weight
        and correction bias stay float32.
      progress: called as `progress(tensors_done, tensors_total)` after each tensor.
      ignore_tensors: regular expressions of tensor names to skip (logged with their count). The default
        skips the multi-token-prediction heads, which transformers does not build either.
      check_finite: reject a tensor holding NaN or infinity (also one that overflows when cast to
        `param_dtype`). On by default; costs one pass over each tensor while it is in memory anyway.

    Returns:
      (config, params) with params a nested dict of `jax.Array`.

    Raises:
      CheckpointError (a ValueError), naming the file and tensor: a missing, unexpected or wrongly shaped
      tensor (with both shapes); a malformed config.json, index or safetensors header (bad JSON or UTF-8,
      header over 100 MB, byte ranges that overlap, leave gaps, are negative or run past the file); a tensor
      stored in two shards; an index entry pointing outside `directory`; a shard that is not a regular file
      (e.g. a FIFO); non-finite values when `check_finite`.
    """
    cfg = config or config_from_hf(directory, **({"param_dtype": param_dtype} if param_dtype else {}))
    files, stored = checkpoint_tensors(directory)
    ignored = {name for name in stored if any(re.search(pattern, name) for pattern in ignore_tensors)}
    if ignored:
        logging.getLogger(__name__).warning("load_hf: skipping %d tensors matching %s (e.g. %s)", len(ignored),
                                            ignore_tensors, sorted(ignored)[0])
        stored = {name: info for name, info in stored.items() if name not in ignored}
    layout = _detect_layout(set(stored))
    mappings = tensor_mappings(cfg, **layout)
    by_hf_name = {name: (mapping, i) for mapping in mappings for i, name in enumerate(mapping.hf_names)}
    expected_names = set(by_hf_name)
    missing = sorted(expected_names - set(stored))
    unexpected = sorted(set(stored) - expected_names)
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                              f"({len(missing)} in all; naming scheme {layout['scheme']!r})")
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensors {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)")
    for name, info in stored.items():
        mapping, _ = by_hf_name[name]
        if tuple(info.shape) != mapping.hf_shape:
            raise CheckpointError(f"{directory}: tensor {name} has shape {tuple(info.shape)}, expected "
                                  f"{mapping.hf_shape} (from config.json)")

    sharding_of = sharding_lookup(shardings)
    filling: dict[ParamPath, tuple[np.ndarray, set[int]]] = {}
    placer = _Placer(cfg, sharding_of)
    done = 0
    seen_names: set[str] = set()
    for info, array in iterate_tensors(files, skip=ignored):
        done += 1
        # The headers were checked above; a file rewritten since then must still agree with them.
        if info.name not in by_hf_name or info.name in seen_names or info != stored.get(info.name):
            raise CheckpointError(f"{info.file}: tensor {info.name!r} changed while the checkpoint was loaded")
        seen_names.add(info.name)
        mapping, expert = by_hf_name[info.name]
        target = mapping.param
        # A view where no cast is needed: the only copies are the one read from disk and the placed array.
        with np.errstate(over="ignore"):  # an overflow to inf is reported below (check_finite)
            value = mapping.from_hf(array).astype(target.dtype, copy=False)
        if check_finite:
            bad = count_non_finite(value)
            if bad:
                stored_bad = count_non_finite(array) if value.dtype != array.dtype else bad
                cause = (f"{bad} of {value.size} values are NaN or infinite" if stored_bad else
                         f"{bad} of {value.size} values overflow to infinity when cast to {value.dtype}")
                raise CheckpointError(f"{info.file}: tensor {info.name!r}: {cause} (pass check_finite=False to "
                                      "load it anyway)")
        del array
        if mapping.stacked:
            buffer, seen = filling.setdefault(mapping.path, (np.empty(target.shape, target.dtype), set()))
            buffer[expert] = value
            seen.add(expert)
            if len(seen) < len(mapping.hf_names):
                continue
            value = filling.pop(mapping.path)[0]
        placer.put(mapping.path, value)
        del value
        if progress is not None:
            progress(done, len(stored))
    if seen_names != set(stored):
        raise CheckpointError(f"{directory}: tensors {sorted(set(stored) - seen_names)[:10]} vanished while the "
                              "checkpoint was loaded")
    assert not placer.rows, f"stacked parameters left incomplete: {sorted(placer.rows)}"
    return cfg, traverse_util.unflatten_dict(placer.params)


def hf_tensors(params: Any, mappings: list[TensorMapping], cfg: ModelConfig | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, host array) one tensor at a time; `params` in the layout of `cfg` (per layer if None)."""
    flat = _per_layer_flat(cfg, params) if cfg is not None else traverse_util.flatten_dict(params)
    for mapping in mappings:
        value = flat[mapping.path]
        if mapping.stacked:
            for expert, name in enumerate(mapping.hf_names):
                yield name, np.ascontiguousarray(mapping.to_hf(_host(value, (expert,))))
        else:
            yield mapping.hf_names[0], np.ascontiguousarray(mapping.to_hf(_host(value)))


def save_hf(
    cfg: ModelConfig,
    params: Any,
    directory: str,
    *,
    scheme: str = "backbone",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Writes a checkpoint that transformers' `NemotronHForCausalLM.from_pretrained` loads.

    Files go to a temporary sibling directory that is renamed to `directory` only when complete, so a crash
    never leaves a half-written checkpoint. Shards hold at most `max_shard_bytes` each (with
    `model.safetensors.index.json` when there is more than one). `scheme` "backbone" (default, the released
    format with one tensor per expert) or "model" (fused expert tensors). `params` in the layout of `cfg`
    (stacked with `cfg.scan_layers`); the checkpoint has per-layer names either way.
    """
    flat = _per_layer_flat(cfg, params)
    mappings = tensor_mappings(cfg, scheme)
    for mapping in mappings:
        if mapping.path not in flat:
            raise CheckpointError(f"params has no entry {'/'.join(mapping.path)}")
        if tuple(flat[mapping.path].shape) != tuple(mapping.param.shape):
            raise CheckpointError(f"params entry {'/'.join(mapping.path)} has shape "
                                  f"{tuple(flat[mapping.path].shape)}, expected {tuple(mapping.param.shape)} "
                                  "for this config")
    extra = sorted('/'.join(p) for p in set(flat) - {mapping.path for mapping in mappings})
    if extra:
        raise CheckpointError(f"params has entries the config does not define: {extra}")

    sizes = []
    for mapping in mappings:
        itemsize = np.dtype(flat[mapping.path].dtype).itemsize
        sizes.extend([int(np.prod(mapping.hf_shape)) * itemsize] * len(mapping.hf_names))
    names = [name for mapping in mappings for name in mapping.hf_names]
    shards = plan_shards(list(zip(names, sizes)), max_shard_bytes)
    file_names = ([SINGLE_FILE] if len(shards) == 1 else
                  [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    with atomic_directory(directory, overwrite=overwrite) as staging:
        tensors = hf_tensors(params, mappings, cfg)
        weight_map = {}
        done = 0
        for shard_names, file_name in zip(shards, file_names):
            shard = {}
            for expected_name in shard_names:
                name, array = next(tensors)
                assert name == expected_name
                shard[name] = array
                weight_map[name] = file_name
            write_shard(os.path.join(staging, file_name), shard)
            done += len(shard)
            del shard
            if progress is not None:
                progress(done, len(names))
        if len(shards) > 1:
            with open(os.path.join(staging, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg.to_hf_config(), f, indent=2)

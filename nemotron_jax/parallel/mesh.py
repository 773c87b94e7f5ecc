"""Device meshes from a config.

The mesh has the axes `data`, `fsdp`, `expert`, `tensor` (always all four, any of size 1) followed by any extra
axes a caller names (e.g. `context` for context parallelism):

    data    pure data parallelism: params replicated, batch split.
    fsdp    fully sharded data parallelism: batch split, and every weight split along its "embed" dimension
            (all-gathered for the matmul, gradients reduce-scattered).
    expert  expert parallelism: the routed experts of each MoE layer are split over it; it also splits the
            batch (outside the MoE layers a device of the expert axis is one more data-parallel replica).
    tensor  tensor parallelism: attention heads, Mamba heads and channels, MLP / expert widths, the vocabulary.

Axis types: **Auto** (`jax.sharding.AxisType.Auto`) for every axis. `jax.make_mesh` defaults to Explicit axes
in jax 0.10, under which every intermediate array carries a sharding in its type and an op whose operands
disagree (e.g. the `[B, T, D] -> [B*T, D]` reshapes, `top_k`, the gathers of the MoE dispatch) is a trace-time
error until resharded by hand. The model is written as plain `jnp`/Flax code for one device; under Auto
axes XLA (Shardy) propagates shardings from the parameters' and batch's shardings and from the logical
constraints on activations (`nn.with_logical_constraint`), and the one place where placement must be exact,
the expert dispatch, is a `shard_map` (manual over all axes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
BASE_AXES = (DATA, FSDP, EXPERT, TENSOR)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. Any may be 1; one of them may be -1 ("all remaining devices").

    Attributes:
      data, fsdp, expert, tensor: see the module docstring.
      extra_axes: further `(name, size)` axes after the four, e.g. `(("context", 2),)`.
    """

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    extra_axes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_string(cls, text: str) -> "MeshConfig":
        """Parses "fsdp=8,expert=8" (unnamed axes are 1; unknown names become extra axes, in order)."""
        sizes: dict[str, int] = {}
        extra: list[tuple[str, int]] = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            try:
                size = int(value)
            except ValueError:
                raise ValueError(f"mesh {text!r}: expected name=size items, got {item!r}") from None
            if name in BASE_AXES:
                sizes[name] = size
            else:
                extra.append((name, size))
        return cls(**sizes, extra_axes=tuple(extra))

    @property
    def axes(self) -> tuple[tuple[str, int], ...]:
        return ((DATA, self.data), (FSDP, self.fsdp), (EXPERT, self.expert), (TENSOR, self.tensor),
                *self.extra_axes)

    def resolved(self, num_devices: int) -> "MeshConfig":
        """This config with a -1 axis filled in; raises ValueError if the product is not `num_devices`."""
        names = [name for name, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"MeshConfig: repeated axis names {names}")
        for name, size in self.axes:
            if size == 0 or size < -1:
                raise ValueError(f"MeshConfig.{name}: size must be positive or -1, got {size}")
        unknown = [name for name, size in self.axes if size == -1]
        if len(unknown) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {unknown}")
        known = math.prod(size for _, size in self.axes if size != -1)
        sizes = dict(self.axes)
        if unknown:
            if num_devices % known:
                raise ValueError(f"MeshConfig: {num_devices} devices are not a multiple of the other axes' "
                                 f"product {known}; cannot size axis {unknown[0]!r}")
            sizes[unknown[0]] = num_devices // known
        total = math.prod(sizes.values())
        if total != num_devices:
            raise ValueError(f"MeshConfig: axes {sizes} need {total} devices, {num_devices} are available")
        base = {name: sizes[name] for name in BASE_AXES}
        return MeshConfig(**base, extra_axes=tuple((name, sizes[name]) for name, _ in self.extra_axes))


def make_mesh(config: MeshConfig | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` over `devices` (default: all devices of all processes) with Auto axes.

    Device order comes from `jax.make_mesh` (physical topology aware on TPU/GPU); axes later in the mesh are
    the fastest-varying, so `tensor` (and extra axes such as `context`) group neighbouring devices.
    """
    if isinstance(config, str):
        config = MeshConfig.from_string(config)
    devices = list(jax.devices() if devices is None else devices)
    config = config.resolved(len(devices))
    names = tuple(name for name, _ in config.axes)
    shape = tuple(size for _, size in config.axes)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def mesh_axis_size(mesh: Mesh | jax.sharding.AbstractMesh, name: str) -> int:
    """Size of axis `name`, 1 if the mesh has no such axis."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def token_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The mesh axes that split tokens (every axis but `tensor`), in mesh order."""
    return tuple(name for name in mesh.axis_names if name != TENSOR)


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The mesh axes that split the batch dimension: `data`, `fsdp`, `expert` (those present)."""
    return tuple(name for name in (DATA, FSDP, EXPERT) if name in mesh.axis_names)


def describe(mesh: Mesh) -> str:
    """e.g. "data=1 fsdp=8 expert=8 tensor=1 (64 devices, Auto axes)"."""
    sizes = " ".join(f"{name}={size}" for name, size in zip(mesh.axis_names, mesh.axis_sizes))
    return f"{sizes} ({int(np.prod(mesh.axis_sizes))} devices, Auto axes)"



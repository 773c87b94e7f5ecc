"""Logical axis names for every parameter and activation, and the rules that map them to mesh axes.

Parameters are named by their path in the params tree (`PARAM_LOGICAL_AXES`, regular expressions on the
"/"-joined path, first match wins), so the model code stays free of sharding annotations; a parameter that no
pattern names is an error (`param_logical_axes`), so a new layer cannot silently stay replicated. A leaf with
one more dimension than its pattern names (layers stacked for a scan over layers) gets the logical axis
"layers" (never split) in front.

Activations are named in the model code with `flax.linen.with_logical_constraint` (`ACTIVATION_AXES` lists
the names); those calls are no-ops until `activate(mesh)` installs the rules and the mesh.

Rules (`logical_rules(mesh)`), for the axes of `mesh.py`:

    parameters                                           activations
    embed (model width of dense weights)  -> fsdp        act_batch       -> (data, fsdp, expert)
    vocab, q_heads, kv_heads, mlp,        -> tensor      act_tokens      -> (data, fsdp, expert)
      expert_mlp, mamba_in_proj,                         act_heads, act_kv_heads, act_mlp,
      mamba_inner, mamba_conv, mamba_heads                 act_mamba_inner, act_vocab -> tensor
    expert                                -> expert      act_embed, act_length -> not split
    expert_embed (width of expert weights) -> fsdp
    everything else (norms, biases over the model width, router, conv taps, layers) -> not split

Every split is checked when the shardings are built: a mesh axis that does not divide the dimension it
splits raises `ValueError` naming the parameter, the dimension and the axis (at start-up, before compiling).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nemotron_jax.parallel.mesh import DATA, EXPERT, FSDP, TENSOR

LAYERS = "layers"

# (pattern on the "/"-joined param path, logical axis names per dimension). First match wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(^|/)embeddings/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    # Mamba-2 mixer
    (r"mixer/in_proj/kernel$", ("embed", "mamba_in_proj")),
    (r"mixer/in_proj/bias$", ("mamba_in_proj",)),
    (r"mixer/out_proj/kernel$", ("mamba_inner", "embed")),
    (r"mixer/out_proj/bias$", ("embed_vector",)),
    (r"mixer/conv1d_kernel$", ("conv_taps", "mamba_conv")),
    (r"mixer/conv1d_bias$", ("mamba_conv",)),
    (r"mixer/(A_log|D|dt_bias)$", ("mamba_heads",)),
    (r"mixer/norm/weight$", ("mamba_inner",)),
    # attention
    (r"mixer/q_proj/kernel$", ("embed", "q_heads")),
    (r"mixer/(k|v)_proj/kernel$", ("embed", "kv_heads")),
    (r"mixer/o_proj/kernel$", ("q_heads", "embed")),
    # mixture of experts
    (r"mixer/experts_up_proj$", ("expert", "expert_embed", "expert_mlp")),
    (r"mixer/experts_down_proj$", ("expert", "expert_mlp", "expert_embed")),
    (r"mixer/router_kernel$", ("embed", "router_experts")),
    (r"mixer/e_score_correction_bias$", ("router_experts",)),
    (r"mixer/fc1_latent_proj/kernel$", ("embed", "latent")),
    (r"mixer/fc1_latent_proj/bias$", ("latent",)),
    (r"mixer/fc2_latent_proj/kernel$", ("latent", "embed")),
    (r"mixer/fc2_latent_proj/bias$", ("embed_vector",)),
    # dense MLP layers and the shared expert
    (r"up_proj/kernel$", ("embed", "mlp")),
    (r"up_proj/bias$", ("mlp",)),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"down_proj/bias$", ("embed_vector",)),
    # RMSNorms of the blocks and the final norm
    (r"(^|/)(norm|norm_f)/weight$", ("norm",)),
)

# Logical names the model code puts on activations (see `activate`).
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
                   "act_mamba_inner", "act_vocab", "act_tokens")


def logical_rules(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[tuple[str, Any], ...]:
    """(logical name, mesh axis | tuple of mesh axes | None) pairs for `mesh` (axes it lacks are left out)."""
    present = set(mesh.axis_names)

    def axes(*names: str) -> Any:
        kept = tuple(name for name in names if name in present)
        return kept if len(kept) > 1 else (kept[0] if kept else None)

    tensor = axes(TENSOR)
    rules = [
        ("embed", axes(FSDP)),
        ("expert_embed", axes(FSDP)),
        ("expert", axes(EXPERT)),
        *[(name, tensor) for name in ("vocab", "q_heads", "kv_heads", "mlp", "expert_mlp", "mamba_in_proj",
                                       "mamba_inner", "mamba_conv", "mamba_heads")],
        *[(name, None) for name in ("embed_vector", "norm", "router_experts", "conv_taps", "latent", LAYERS)],
        ("act_batch", axes(DATA, FSDP, EXPERT)),
        # Sequence splitting over a `context` axis is parallel/context.py's shard_map, not a constraint here.
        ("act_length", None),
        ("act_tokens", axes(DATA, FSDP, EXPERT)),
        *[(name, tensor) for name in ("act_heads", "act_kv_heads", "act_mlp", "act_mamba_inner", "act_vocab")],
        ("act_embed", None),
    ]
    return tuple(rules)


def _path_string(path: Sequence[Any]) -> str:
    return "/".join(str(part) for part in path)


def logical_axes_of(path: Sequence[Any], ndim: int) -> tuple[str, ...]:
    """Logical axis names of the parameter at `path` (tuple of keys) with `ndim` dimensions.

    Raises ValueError naming the parameter if no pattern matches or the rank disagrees."""
    name = _path_string(path)
    for pattern, names in PARAM_LOGICAL_AXES:
        if re.search(pattern, name):
            if ndim == len(names):
                return names
            if ndim == len(names) + 1:  # stacked layers (scan over layers)
                return (LAYERS, *names)
            raise ValueError(f"parameter {name}: has {ndim} dimensions, its logical axes {names} name "
                             f"{len(names)}")
    raise ValueError(f"parameter {name}: no logical axis names (add a pattern to "
                     "nemotron_jax.parallel.sharding.PARAM_LOGICAL_AXES)")


def param_logical_axes(params: Any) -> Any:
    """A params-shaped tree of logical-axis tuples (params may be arrays or `jax.ShapeDtypeStruct`s)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: logical_axes_of(path, len(leaf.shape)) for path, leaf in flat.items()})


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
                    *, what: str = "array") -> P:
    """The `PartitionSpec` of an array with logical axes `names` and `shape` on `mesh`.

    A mesh axis already used by an earlier dimension is not used again. Raises ValueError naming `what`, the
    dimension and the mesh axis if the axis (product of axes) does not divide the dimension.
    """
    rules = dict(logical_rules(mesh))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"{what}: logical axis {name!r} has no rule")
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(axis for axis in mesh_axes if axis not in used and sizes[axis] > 1)
        split = math.prod(sizes[axis] for axis in mesh_axes)
        if size % split:
            detail = " x ".join(f"{axis}={sizes[axis]}" for axis in mesh_axes)
            raise ValueError(f"{what}: mesh axis {detail} does not divide dimension {dim} ({name!r}, size {size}) "
                             f"of shape {tuple(shape)}")
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_sharding(path: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """The `NamedSharding` of the parameter at `path` with `shape` (checks divisibility)."""
    names = logical_axes_of(path, len(shape))
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, what=f"parameter {_path_string(path)}"))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A params-shaped tree of `NamedSharding`s (params: arrays or `jax.ShapeDtypeStruct`s, e.g.
    `nj.model.params.abstract_params(cfg)`). Raises ValueError at the first parameter the mesh cannot split."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: param_sharding(path, leaf.shape, mesh) for path, leaf in flat.items()})


def param_sharding_fn(mesh: Mesh) -> Callable[[tuple[str, ...], tuple[int, ...]], NamedSharding]:
    """`(path, shape) -> NamedSharding`, the form `nj.load_hf(..., shardings=...)` takes."""
    return lambda path, shape: param_sharding(path, shape, mesh)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def tree_shardings(tree: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings for any pytree that holds params-shaped parts (a train state, an optimizer state).

    A leaf whose key path ends with a parameter's path and has that parameter's shape (params, Adam moments,
    gradients) gets the parameter's sharding; every other leaf (step counters, learning rate, RNG keys) is
    replicated.
    """
    param_paths = {tuple(str(k) for k in path): leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}
    longest = max((len(path) for path in param_paths), default=0)
    replicated = NamedSharding(mesh, P())

    def sharding_of(key_path, leaf):
        names = [_key_name(key) for key in key_path]
        for length in range(min(longest, len(names)), 0, -1):
            suffix = tuple(names[-length:])
            if suffix in param_paths and tuple(param_paths[suffix]) == tuple(leaf.shape):
                return param_sharding(suffix, leaf.shape, mesh)
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, tree)


def batch_spec(mesh: Mesh | jax.sharding.AbstractMesh, ndim: int = 2) -> P:
    """PartitionSpec of a `[B, T, ...]` batch array: rows over (data, fsdp, expert)."""
    del ndim
    return P(dict(logical_rules(mesh))["act_batch"])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def check_batch(shape: Sequence[int], mesh: Mesh, *, what: str = "batch") -> None:
    """Raises ValueError naming the axis if the batch rows (or tokens) do not split evenly over `mesh`."""
    logical_to_spec(("act_batch", "act_length")[:len(shape)], shape, mesh, what=what)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Within the block, jitted model code traces with `mesh` as the context mesh (`jax.set_mesh`) and with
    the logical rules installed, so the model's activation constraints take effect and the MoE layers
    dispatch tokens with expert parallelism (`expert_parallel.py`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(mesh)):
        yield mesh


class MeshJit:
    """`jax.jit(fn, ...)` whose calls and `lower` run under `activate(mesh)` (the mesh must be the trace-time
    context: `jax.set_mesh` cannot be entered inside a jitted function). Keyword arguments go to `jax.jit`."""

    def __init__(self, fn: Callable, mesh: Mesh, **jit_kwargs: Any):
        self.mesh = mesh
        self.jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with activate(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with activate(self.mesh):
            return self.jitted.lower(*args, **kwargs)

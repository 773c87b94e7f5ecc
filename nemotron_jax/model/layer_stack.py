"""Scan over layers: how the layer pattern is split into scanned stretches, and the per-layer <-> stacked trees.

With `ModelConfig.scan_layers`, `NemotronH` factors its layer pattern into segments (`layer_plan`): a segment
is a unit of layers repeated `repeats` times. A segment with `repeats >= 2` runs as one `lax.scan` (Flax
`nn.scan`) over the repeats, its unit's layers unrolled inside the scan body, with every parameter stacked
along a new leading axis of size `repeats`; a segment with `repeats == 1` is one unrolled layer. XLA compiles
each scan body once, so compile time follows the number of *distinct* layers in the plan, not the depth.

The plan minimises the layers XLA sees (each scan body once, each unrolled layer once, plus one per scan for
its loop), by dynamic programming over the pattern. For Nemotron-3-Nano's 52 layers
("MEMEM*E" x 5, then "MEMEMEM*EMEMEMEME"):

    layers 0-34   scan_0_35   "MEMEM*E" x 5
    layers 35-40  scan_35_41  "ME" x 3
    layers 41, 42 layers_41, layers_42 (unrolled)
    layers 43-50  scan_43_51  "EM" x 4
    layer 51      layers_51 (unrolled)

i.e. 14 layers compiled instead of 52.

Tree layout (params, the "intermediates" the MoE layers sow, gradients, decode caches alike):

    unrolled layer i           layers_{i}/...                 (as without scan)
    scanned segment [a, b)     scan_{a}_{b}/block_{j}/...     leaves [repeats, ...]; layer a + r * len(unit) + j
                                                              is row r of block_{j}

`stack_layers` / `unstack_layers` convert between that and the plain per-layer `layers_{i}` tree, so that
checkpoints (Hugging Face names) and everything keyed by "layers_{i}" (router replay, recorded routing) keep
per-layer names. Keys that are not layers (embeddings, norm_f, lm_head, ...) pass through unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax.model.config import ModelConfig

# `ModelConfig.remat_policy` names -> `jax.checkpoint` policy (None: remat saving nothing is jax's default).
_POLICY_FUNCTIONS = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_function(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a `REMAT_POLICIES` name other than "none"."""
    if name not in _POLICY_FUNCTIONS:
        raise ValueError(f"remat policy {name!r} has no jax.checkpoint policy; one of {sorted(_POLICY_FUNCTIONS)}")
    return _POLICY_FUNCTIONS[name]


class Segment(NamedTuple):
    """Layers [start, start + len(unit) * repeats) of the pattern: `unit` repeated `repeats` times."""

    start: int
    unit: str
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + len(self.unit) * self.repeats

    @property
    def scanned(self) -> bool:
        return self.repeats > 1

    @property
    def name(self) -> str:
        """The tree key: "scan_{start}_{stop}" for a scanned segment, "layers_{start}" for one layer."""
        return f"scan_{self.start}_{self.stop}" if self.scanned else f"layers_{self.start}"

    def layer_index(self, repeat: int, position: int) -> int:
        """The pattern index of the layer at unit `position` of repeat `repeat`."""
        return self.start + repeat * len(self.unit) + position


def block_name(position: int) -> str:
    return f"block_{position}"


@functools.lru_cache(maxsize=64)
def layer_plan(pattern: str, scan_cost: int = 1) -> tuple[Segment, ...]:
    """Splits `pattern` into segments minimising the layers XLA compiles.

    Cost of a plan: one per unrolled layer, `len(unit) + scan_cost` per scanned segment (its body once and the
    loop). Dynamic programming over prefixes, O(len(pattern)^3) string comparisons (instant for 100s of
    layers). Ties prefer fewer, longer scans (found first).
    """
    n = len(pattern)
    best = [0] + [n + 1] * n
    choice: list[Segment | None] = [None] * (n + 1)
    for stop in range(1, n + 1):
        best[stop] = best[stop - 1] + 1
        choice[stop] = Segment(stop - 1, pattern[stop - 1], 1)
        for start in range(stop - 1):
            span = stop - start
            for size in range(1, span // 2 + 1):
                if span % size:
                    continue
                unit = pattern[start:start + size]
                if unit * (span // size) != pattern[start:stop]:
                    continue
                cost = best[start] + size + scan_cost
                if cost < best[stop]:
                    best[stop] = cost
                    choice[stop] = Segment(start, unit, span // size)
    segments = []
    stop = n
    while stop > 0:
        segment = choice[stop]
        segments.append(segment)
        stop = segment.start
    return tuple(reversed(segments))


def model_plan(cfg: ModelConfig) -> tuple[Segment, ...]:
    """The segments `NemotronH(cfg)` runs: `layer_plan` with `scan_layers`, else one segment per layer."""
    if cfg.scan_layers:
        return layer_plan(cfg.layer_pattern)
    return tuple(Segment(i, char, 1) for i, char in enumerate(cfg.layer_pattern))


def layer_location(cfg: ModelConfig, index: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer `index` lives in the `cfg` tree: (key path, row of the stacked leaves or None)."""
    if not 0 <= index < cfg.num_layers:
        raise ValueError(f"layer index {index} out of range for {cfg.num_layers} layers")
    for segment in model_plan(cfg):
        if segment.start <= index < segment.stop:
            if not segment.scanned:
                return (segment.name,), None
            repeat, position = divmod(index - segment.start, len(segment.unit))
            return (segment.name, block_name(position)), repeat
    raise AssertionError("unreachable: the plan covers every layer")


def _layer_key(name: str) -> bool:
    return name.startswith("layers_") or name.startswith("scan_")


def stack_layers(cfg: ModelConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """A per-layer tree ("layers_{i}" keys) -> the layout of `cfg` (stacked segments if `cfg.scan_layers`).

    Layers absent from `tree` (e.g. MoE layers in a decode cache) stay absent; a scanned block must have all
    of its layers or none (ValueError naming the missing ones). Non-layer keys pass through. Leaves are
    stacked with `jnp.stack` (use under `jax.jit` to place the result with a sharding).
    """
    out = {key: value for key, value in tree.items() if not _layer_key(key)}
    known = {f"layers_{i}" for i in range(cfg.num_layers)}
    unknown = sorted(key for key in tree if _layer_key(key) and key not in known)
    if unknown:
        raise ValueError(f"stack_layers: keys {unknown} are not layers of the {cfg.num_layers}-layer pattern "
                         "(is the tree already stacked?)")
    for segment in model_plan(cfg):
        if not segment.scanned:
            if segment.name in tree:
                out[segment.name] = tree[segment.name]
            continue
        blocks = {}
        for position in range(len(segment.unit)):
            names = [f"layers_{segment.layer_index(r, position)}" for r in range(segment.repeats)]
            present = [name for name in names if name in tree]
            if not present:
                continue
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))
                raise ValueError(f"stack_layers: {segment.name}/{block_name(position)} stacks {names}, but "
                                 f"{missing} are missing")
            blocks[block_name(position)] = jax.tree.map(lambda *rows: jnp.stack(rows), *[tree[n] for n in names])
        if blocks:
            out[segment.name] = blocks
    return out


def unstack_layers(cfg: ModelConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """The layout of `cfg` -> a per-layer tree with "layers_{i}" keys (inverse of `stack_layers`).

    Rows of stacked leaves are sliced eagerly (inside `jax.jit` they are free to fuse); to walk a large model
    one layer at a time use `layer_location` and slice as you go.
    """
    out = {key: value for key, value in tree.items() if not _layer_key(key)}
    for segment in model_plan(cfg):
        if segment.name not in tree:
            continue
        if not segment.scanned:
            out[segment.name] = tree[segment.name]
            continue
        for block, value in tree[segment.name].items():
            position = int(block.split("_")[1])
            for repeat in range(segment.repeats):
                out[f"layers_{segment.layer_index(repeat, position)}"] = jax.tree.map(lambda x: x[repeat], value)
    expected = {segment.name for segment in model_plan(cfg)}
    unknown = sorted(key for key in tree if _layer_key(key) and key not in expected)
    if unknown:
        raise ValueError(f"unstack_layers: keys {unknown} are not segments of the layer plan of this config "
                         f"(scan_layers={cfg.scan_layers})")
    return out


def map_layers(cfg: ModelConfig, fn: Callable[[jax.Array], jax.Array], tree: dict[str, Any]) -> dict[str, Any]:
    """Applies the per-layer leaf function `fn` to every layer leaf of a `cfg`-layout tree (vmapped over the
    rows of stacked leaves); non-layer keys pass through. E.g. repeating the batch of a decode cache."""
    out = {}
    scanned = {segment.name for segment in model_plan(cfg) if segment.scanned}
    for key, value in tree.items():
        if key in scanned:
            out[key] = jax.tree.map(jax.vmap(fn), value)
        elif _layer_key(key):
            out[key] = jax.tree.map(fn, value)
        else:
            out[key] = value
    return out

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
    """Layers [start, stop) of the pattern: `unit` repeated `repeats` times, minus the `absent` layers.

    `absent` holds (repeat, position) pairs of unit positions that an "optional" position skips in that
    repeat: e.g. Nemotron-3-Nano is "M*E" x 23 with the attention ("*") present in 6 of the 23 repeats.
    Layers of a position that is absent somewhere ("optional positions") are not stacked: they keep their
    per-layer params `layers_{i}` and the scan body runs the one of its repeat (or none) by index.
    """

    start: int
    unit: str
    repeats: int
    absent: tuple[tuple[int, int], ...] = ()

    @property
    def stop(self) -> int:
        return self.start + len(self.unit) * self.repeats - len(self.absent)

    @property
    def scanned(self) -> bool:
        return self.repeats > 1

    @property
    def name(self) -> str:
        """The tree key: "scan_{start}_{stop}" for a scanned segment, "layers_{start}" for one layer."""
        return f"scan_{self.start}_{self.stop}" if self.scanned else f"layers_{self.start}"

    @property
    def optional_positions(self) -> tuple[int, ...]:
        return tuple(sorted({position for _, position in self.absent}))

    @property
    def pattern(self) -> str:
        """The layers of the segment as a pattern string."""
        absent = set(self.absent)
        return "".join(char for repeat in range(self.repeats) for position, char in enumerate(self.unit)
                       if (repeat, position) not in absent)

    def present(self, repeat: int, position: int) -> bool:
        return (repeat, position) not in self.absent

    def layer_index(self, repeat: int, position: int) -> int:
        """The pattern index of the layer at unit `position` of repeat `repeat` (ValueError if absent)."""
        if not self.absent:
            return self.start + repeat * len(self.unit) + position
        if not self.present(repeat, position):
            raise ValueError(f"{self.name}: unit position {position} is absent in repeat {repeat}")
        skipped = sum(1 for r, p in self.absent if r < repeat or (r == repeat and p < position))
        return self.start + repeat * len(self.unit) + position - skipped

    def slot_of(self, index: int) -> tuple[int, int]:
        """(repeat, unit position) of pattern layer `index` (within the segment)."""
        if not self.absent:
            return divmod(index - self.start, len(self.unit))
        layer = self.start
        for repeat in range(self.repeats):
            for position in range(len(self.unit)):
                if self.present(repeat, position):
                    if layer == index:
                        return repeat, position
                    layer += 1
        raise ValueError(f"{self.name}: layer {index} is not in this segment")

    def optional_rows(self, position: int) -> list[int]:
        """Per repeat, the row of optional `position`'s stacked layers that it runs, -1 where absent."""
        rows, count = [], 0
        for repeat in range(self.repeats):
            rows.append(count if self.present(repeat, position) else -1)
            count += self.present(repeat, position)
        return rows

    def optional_layers(self, position: int) -> list[int]:
        """Pattern indices of the layers at optional `position`, in repeat order (where present)."""
        return [self.layer_index(r, position) for r in range(self.repeats) if self.present(r, position)]


def block_name(position: int) -> str:
    return f"block_{position}"


@functools.lru_cache(maxsize=64)
def layer_plan(pattern: str, scan_cost: int = 1, allow_optional: bool = True) -> tuple[Segment, ...]:
    """Splits `pattern` into segments minimising the layers XLA compiles.

    Cost of a plan: one per unrolled layer, `len(unit) + scan_cost` per scanned segment (its body once and the
    loop). Dynamic programming over prefixes, O(len(pattern)^3) string comparisons (instant for 100s of
    layers). Ties prefer fewer, longer scans (found first). With `allow_optional`, the whole pattern as one
    segment with an optional position (`_optional_layer_segment`) is taken when it costs less.
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
    plan = tuple(reversed(segments))
    optional = _optional_layer_segment(pattern) if allow_optional else None
    if optional is not None and len(optional.unit) + scan_cost < best[n]:
        return (optional,)
    return plan


# Kinds a scan body may run conditionally: they sow nothing and replay no routing (MoE layers do both).
_OPTIONAL_KINDS = "*M-"


def _optional_layer_segment(pattern: str) -> Segment | None:
    """The whole `pattern` as one scanned segment with one optional position, if it is one: removing every
    layer of one kind leaves a unit repeated r >= 2 times, and each removed layer sits at the same place
    within its repeat (at most one per repeat). E.g. Nano's 52 layers: "ME" x 23 once the 6 attention
    layers are removed, each of which follows an "M": "M*E" x 23 with "*" absent from 17 repeats."""
    best = None
    for kind in _OPTIONAL_KINDS:
        if kind not in pattern:
            continue
        rest = pattern.replace(kind, "")
        size = next((size for size in range(1, len(rest) // 2 + 1)
                     if len(rest) % size == 0 and rest[:size] * (len(rest) // size) == rest), None)
        if size is None:
            continue
        repeats = len(rest) // size
        # slot of each removed layer: (repeat, number of unit layers before it in its repeat)
        slots, seen = [], 0
        for char in pattern:
            if char == kind:
                slots.append(divmod(seen, size))
            else:
                seen += 1
        places = {slot for _, slot in slots}
        if len(places) != 1 or len({repeat for repeat, _ in slots}) != len(slots):
            continue
        place = places.pop()
        unit = rest[:place] + kind + rest[place:size]
        present = {repeat for repeat, _ in slots}
        segment = Segment(0, unit, repeats, tuple((r, place) for r in range(repeats) if r not in present))
        if segment.pattern == pattern and (best is None or len(segment.unit) < len(best.unit)):
            best = segment
    return best


def model_plan(cfg: ModelConfig) -> tuple[Segment, ...]:
    """The segments `NemotronH(cfg)` runs: `layer_plan` with `scan_layers`, else one segment per layer."""
    if cfg.scan_layers:
        return layer_plan(cfg.layer_pattern, allow_optional=cfg.scan_optional_layers)
    return tuple(Segment(i, char, 1) for i, char in enumerate(cfg.layer_pattern))


def layer_location(cfg: ModelConfig, index: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer `index` lives in the `cfg` tree: (key path, row of the stacked leaves or None)."""
    if not 0 <= index < cfg.num_layers:
        raise ValueError(f"layer index {index} out of range for {cfg.num_layers} layers")
    for segment in model_plan(cfg):
        if segment.start <= index < segment.stop:
            if not segment.scanned:
                return (segment.name,), None
            repeat, position = segment.slot_of(index)
            if position in segment.optional_positions:  # per-layer params, indexed inside the scan
                return (f"layers_{index}",), None
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
        for position in segment.optional_positions:  # not stacked: per-layer params the scan body indexes
            out.update({f"layers_{i}": tree[f"layers_{i}"] for i in segment.optional_layers(position)
                        if f"layers_{i}" in tree})
        for position in range(len(segment.unit)):
            if position in segment.optional_positions:
                continue
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
    for segment in model_plan(cfg):
        for position in segment.optional_positions:
            names = [f"layers_{i}" for i in segment.optional_layers(position)]
            out.update({name: tree[name] for name in names if name in tree})
            expected.update(names)
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

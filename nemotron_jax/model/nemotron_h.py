"""`NemotronH`: the hybrid stack built from the layer pattern, as a Flax Linen module.

    tokens [B, T] -> embeddings -> for each layer: h = h + mixer(RMSNorm(h)) -> norm_f -> lm_head -> logits

Parameter tree (names mirror the Hugging Face checkpoint, see `checkpoint/hf.py` for the mapping):

    embeddings/embedding [V, D]       norm_f/weight [D]         lm_head/kernel [D, V]
    layers_{i}/norm/weight [D]
    layers_{i}/mixer/...              Mamba2Mixer | Attention | MoE | MLP

With `config.scan_layers` the periodic stretches of the layer pattern run as `nn.scan`s over stacked
parameters, `scan_{a}_{b}/block_{j}/...` with a leading [repeats] axis (see `layer_stack`, which also converts
to and from the per-layer tree). `config.remat_policy` wraps each block of a kind in `nn.remat` with that
kind's policy, scanned or not.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemotron_jax.model.attention import Attention, init_attention_cache
from nemotron_jax.model.config import LAYER_KINDS, ModelConfig
from nemotron_jax.model.layer_stack import Segment, block_name, model_plan, remat_policy_function, stack_layers
from nemotron_jax.model.logical import constrain
from nemotron_jax.model.mamba2 import Mamba2Mixer, init_mamba_cache
from nemotron_jax.model.mlp import MLP
from nemotron_jax.model.moe import MoE
from nemotron_jax.model.norms import RMSNorm
from nemotron_jax.model.segments import contiguous_run_ids


RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """Pre-norm residual block holding one mixer of kind `kind` ("mamba", "attention", "moe", "mlp")."""

    config: ModelConfig
    kind: str

    def setup(self) -> None:
        cfg = self.config
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_jnp_dtype)
        if self.kind == "mamba":
            self.mixer = Mamba2Mixer(cfg)
        elif self.kind == "attention":
            self.mixer = Attention(cfg)
        elif self.kind == "moe":
            self.mixer = MoE(cfg)
        else:
            self.mixer = MLP(cfg, cfg.intermediate_size)

    def __call__(self, hidden, run_ids, cache=None, cache_meta=None, expert_ids=None):
        mixer_input = self.norm(hidden)
        new_cache = None
        if self.kind == "mamba":
            out, new_cache = self.mixer(mixer_input, run_ids, cache)
        elif self.kind == "attention":
            out, new_cache = self.mixer(mixer_input, run_ids, cache, cache_meta)
        elif self.kind == "moe":
            out = self.mixer(mixer_input, expert_ids)
        else:
            out = self.mixer(mixer_input)
        return constrain(hidden + out.astype(hidden.dtype), RESIDUAL_AXES), new_cache


def _block_class(cfg: ModelConfig, kind: str, in_scan: bool) -> type[nn.Module]:
    """`Block`, or `Block` under `nn.remat` with the kind's policy (CSE is left on inside a scan, whose loop
    already keeps XLA from merging the recomputation into the forward, as jax.checkpoint recommends)."""
    policy = cfg.remat_policies[kind]
    if policy == "none":
        return Block
    return nn.remat(Block, policy=remat_policy_function(policy), prevent_cse=not in_scan)


class ScanUnit(nn.Module):
    """One repeat of a scanned segment: the layers of `unit` in order, as `block_{j}` (the `nn.scan` body).

    carry (hidden [B, T, D], optional caches {block_j: stacked caches of position j's layers} or None);
    broadcast run_ids [B, T], cache_meta and `optional_params` {block_j: position j's layers' params stacked
    [count, ...]}; scanned (one row per repeat) `caches` {block_j: cache of that layer} or None,
    `expert_ids` {block_j: int32 [B*T, k]} or None and `optional_index` {block_j: int32, the row of
    `optional_params[block_j]` this repeat runs, -1 where the position is absent}.
    Returns ((hidden, optional caches), {block_j: new cache} or None when `caches` is None).
    """

    config: ModelConfig
    unit: str
    optional: tuple[int, ...] = ()

    def setup(self) -> None:
        blocks = {}
        for position, char in enumerate(self.unit):
            if position in self.optional:
                continue
            kind = LAYER_KINDS[char]
            blocks[str(position)] = _block_class(self.config, kind, True)(self.config, kind)
        self.block = blocks  # submodules block_{j}

    def __call__(self, carry, run_ids, cache_meta, caches, expert_ids, optional_params, optional_index):
        hidden, optional_caches = carry
        new_caches = {}
        for position in range(len(self.unit)):
            name = block_name(position)
            if position in self.optional:
                hidden, optional_caches = self._optional_layer(
                    position, hidden, run_ids, cache_meta, optional_params[name], optional_index[name],
                    optional_caches)
                continue
            cache = None if caches is None else caches.get(name)
            replay = None if expert_ids is None else expert_ids.get(name)
            hidden, layer_cache = self.block[str(position)](hidden, run_ids, cache, cache_meta, replay)
            if caches is not None and layer_cache is not None and cache is not None:
                new_caches[name] = layer_cache
        return (hidden, optional_caches), (new_caches if caches is not None else None)

    def _optional_layer(self, position, hidden, run_ids, cache_meta, params, index, optional_caches):
        """Layer `params[index]` of optional `position` (a pure `apply` under `lax.cond`), or nothing."""
        kind = LAYER_KINDS[self.unit[position]]
        layer = _block_class(self.config, kind, True)(self.config, kind, parent=None)  # unbound: applied purely
        name = block_name(position)
        stacked_cache = None if optional_caches is None else optional_caches.get(name)
        row = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False), tree)

        def run(hidden, stacked_cache):
            cache = None if stacked_cache is None else row(stacked_cache)
            hidden, new_cache = layer.apply({"params": row(params)}, hidden, run_ids, cache, cache_meta, None)
            if stacked_cache is not None:
                stacked_cache = jax.tree.map(lambda a, c: jax.lax.dynamic_update_index_in_dim(a, c, index, 0),
                                             stacked_cache, new_cache)
            return hidden, stacked_cache

        hidden, stacked_cache = jax.lax.cond(index >= 0, run, lambda h, c: (h, c), hidden, stacked_cache)
        if stacked_cache is not None:
            optional_caches = {**optional_caches, name: stacked_cache}
        return hidden, optional_caches


def _scanned_unit(segment: Segment) -> type[nn.Module]:
    return nn.scan(
        ScanUnit,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, 0),
        length=segment.repeats,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def _optional_index(segment: Segment) -> dict[str, jax.Array]:
    """{block_j: int32 [repeats]} for each optional position: the row of its stacked layers, -1 if absent."""
    return {block_name(p): jnp.asarray(segment.optional_rows(p), jnp.int32) for p in segment.optional_positions}


def _segment_replay(segment: Segment, expert_ids: dict[str, jax.Array] | None) -> dict[str, jax.Array] | None:
    """Per-layer replay routing {"layers_{i}": [N, k]} -> {block_j: [repeats, N, k]} for a scanned segment."""
    if expert_ids is None:
        return None
    blocks = {}
    for position, char in enumerate(segment.unit):
        if LAYER_KINDS[char] != "moe":
            continue
        names = [f"layers_{segment.layer_index(r, position)}" for r in range(segment.repeats)]
        present = [name for name in names if name in expert_ids]
        if not present:
            continue
        if len(present) != len(names):
            raise ValueError(f"expert_ids: layers {names} run in one scan (scan_layers=True), so replay routing "
                             f"for all or none of them; missing {sorted(set(names) - set(present))}")
        blocks[block_name(position)] = jnp.stack([expert_ids[name] for name in names])
    return blocks or None


class NemotronH(nn.Module):
    """The `nemotron_h` causal LM.

    `model.apply({"params": params}, tokens, segment_ids=None)` -> float32 logits [B, T, V].
    Packed rows: `segment_ids` int [B, T]; tokens interact only within a contiguous run of one id.
    `positions` [B, T] is accepted (packers produce it) and checked for shape, but the architecture has no
    positional encoding: order comes from causality and the Mamba recurrence alone.
    Other entry points (use with `method=`): `hidden_states`, `logits_from_hidden`, `forward_cached`.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_jnp_dtype,
                                   param_dtype=cfg.param_jnp_dtype,
                                   embedding_init=nn.initializers.normal(cfg.initializer_range))
        self.plan = model_plan(cfg)
        layers, scans = {}, {}
        for segment in self.plan:
            if segment.scanned:
                scans[f"{segment.start}_{segment.stop}"] = _scanned_unit(segment)(cfg, segment.unit,
                                                                                  segment.optional_positions)
                for position in segment.optional_positions:  # their params, run by index inside the scan
                    kind = LAYER_KINDS[segment.unit[position]]
                    for index in segment.optional_layers(position):
                        layers[str(index)] = Block(cfg, kind)
            else:
                kind = LAYER_KINDS[segment.unit]
                layers[str(segment.start)] = _block_class(cfg, kind, False)(cfg, kind)
        self.layers = layers  # submodules layers_{i}: the unrolled layers
        self.scan = scans  # submodules scan_{a}_{b}: the scanned segments
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_jnp_dtype)
        self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_jnp_dtype,
                                param_dtype=cfg.param_jnp_dtype,
                                kernel_init=nn.initializers.normal(cfg.initializer_range))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, expert_ids: dict[str, jax.Array] | None = None) -> jax.Array:
        return self.logits_from_hidden(self.hidden_states(tokens, segment_ids, positions, expert_ids))

    def hidden_states(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None,
                      expert_ids: dict[str, jax.Array] | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, D] (compute dtype), e.g. for chunked log-probs.

        `expert_ids` maps "layers_{i}" of MoE layers to recorded routing int32 [B*T, k] to replay.
        """
        if positions is not None and positions.shape != tokens.shape:
            raise ValueError(f"positions has shape {positions.shape}, expected {tokens.shape} like the tokens")
        run_ids = contiguous_run_ids(segment_ids, tokens.shape)
        hidden = constrain(self.embeddings(tokens), RESIDUAL_AXES)
        if expert_ids is not None:
            unknown = sorted(set(expert_ids) - {f"layers_{i}" for i, c in enumerate(self.config.layer_pattern)
                                                if LAYER_KINDS[c] == "moe"})
            if unknown:
                raise ValueError(f"expert_ids: keys {unknown} are not MoE layers of the pattern")
        hidden, _ = self._run_layers(hidden, run_ids, None, None, expert_ids)
        return self.norm_f(hidden)

    def _run_layers(self, hidden, run_ids, caches, cache_meta, expert_ids):
        """Runs every layer of the plan; `caches` (the `init_cache` "layers" tree) or None.
        -> (hidden, new caches in the same layout, or None)."""
        new_caches = {}
        for segment in self.plan:
            name = segment.name
            cache = None if caches is None else caches.get(name)
            if segment.scanned:
                module = self.scan[f"{segment.start}_{segment.stop}"]
                if caches is not None and cache is None:
                    cache = {}  # a segment without cached layers (e.g. MLP/MoE only) still gets a cache tree
                optional_params, optional_caches = self._optional_inputs(segment, hidden, run_ids, caches)
                (hidden, optional_caches), segment_cache = module(
                    (hidden, optional_caches), run_ids, cache_meta, cache, _segment_replay(segment, expert_ids),
                    optional_params, _optional_index(segment))
                if segment_cache:
                    new_caches[name] = segment_cache
                for position in segment.optional_positions if optional_caches else ():
                    stacked = optional_caches.get(block_name(position))
                    for row, index in enumerate(segment.optional_layers(position) if stacked else ()):
                        new_caches[f"layers_{index}"] = jax.tree.map(lambda a, r=row: a[r], stacked)
            else:
                replay = None if expert_ids is None else expert_ids.get(name)
                hidden, layer_cache = self.layers[str(segment.start)](hidden, run_ids, cache, cache_meta, replay)
                if cache is not None and layer_cache is not None:
                    new_caches[name] = layer_cache
        return hidden, (new_caches if caches is not None else None)

    def _optional_inputs(self, segment, hidden, run_ids, caches):
        """A scanned segment's optional layers: ({block_j: params stacked [count, ...]}, {block_j: caches
        stacked [count, ...]} or None). At init each layer is called once, outside the scan, to create its
        params (its output is discarded)."""
        params, stacked_caches = {}, {}
        for position in segment.optional_positions:
            indices = segment.optional_layers(position)
            modules = [self.layers[str(index)] for index in indices]
            if self.is_initializing():
                for module in modules:
                    module(hidden, run_ids)
            params[block_name(position)] = jax.tree.map(lambda *rows: jnp.stack(rows),
                                                        *[module.variables["params"] for module in modules])
            names = [f"layers_{index}" for index in indices]
            if caches is not None and all(name in caches for name in names):
                stacked_caches[block_name(position)] = jax.tree.map(lambda *rows: jnp.stack(rows),
                                                                    *[caches[name] for name in names])
        return params, (stacked_caches if caches is not None else None)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]."""
        return constrain(self.lm_head(hidden), ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)

    def forward_cached(self, tokens: jax.Array, cache: dict[str, Any],
                       segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """Runs `tokens` [B, T] as the continuation of `cache` (see `init_cache`); returns (logits, cache).

        Prefill: a fresh cache, left-padded prompts with `segment_ids` 0 on padding and 1 on the prompt.
        Decode: T = 1, `segment_ids` None (the token continues the run of the last cached position).
        """
        batch, length = tokens.shape
        index = cache["index"]
        if segment_ids is None:
            last_run = jax.lax.dynamic_index_in_dim(cache["run_ids"], jnp.maximum(index - 1, 0), axis=1)
            run_ids = jnp.broadcast_to(last_run, (batch, length)).astype(jnp.int32)
        else:
            run_ids = contiguous_run_ids(segment_ids, tokens.shape)
        all_run_ids = jax.lax.dynamic_update_slice_in_dim(cache["run_ids"], run_ids, index, axis=1)
        cache_meta = {"index": index, "run_ids": all_run_ids}
        hidden = self.embeddings(tokens)
        hidden, new_layers = self._run_layers(hidden, run_ids, cache["layers"], cache_meta, None)
        logits = self.logits_from_hidden(self.norm_f(hidden))
        return logits, {"index": index + length, "run_ids": all_run_ids, "layers": new_layers}


def init_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, Any]:
    """An empty decode cache for `max_length` positions: Mamba conv/SSM states and attention KV.

    "layers" is in the layout of `cfg` (`layer_stack`): per layer "layers_{i}", or with `scan_layers` stacked
    per scanned segment (leaves [repeats, B, ...]; use `layer_stack.map_layers` for per-row edits)."""
    layers: dict[str, Any] = {}
    for i, char in enumerate(cfg.layer_pattern):
        kind = LAYER_KINDS[char]
        if kind == "mamba":
            layers[f"layers_{i}"] = init_mamba_cache(cfg, batch)
        elif kind == "attention":
            layers[f"layers_{i}"] = init_attention_cache(cfg, batch, max_length)
    return {"index": jnp.zeros((), jnp.int32), "run_ids": jnp.full((batch, max_length), -1, jnp.int32),
            "layers": stack_layers(cfg, layers)}

"""`NemotronH`: the hybrid stack built from the layer pattern, as a Flax Linen module.

    tokens [B, T] -> embeddings -> for each layer: h = h + mixer(RMSNorm(h)) -> norm_f -> lm_head -> logits

Parameter tree (names mirror the Hugging Face checkpoint, see `checkpoint/hf.py` for the mapping):

    embeddings/embedding [V, D]       norm_f/weight [D]         lm_head/kernel [D, V]
    layers_{i}/norm/weight [D]
    layers_{i}/mixer/...              Mamba2Mixer | Attention | MoE | MLP
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemotron_jax.model.attention import Attention, init_attention_cache
from nemotron_jax.model.config import LAYER_KINDS, ModelConfig
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
        self.layers = [Block(cfg, LAYER_KINDS[c]) for c in cfg.layer_pattern]
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
        for index, layer in enumerate(self.layers):
            replay = None if expert_ids is None else expert_ids.get(f"layers_{index}")
            hidden, _ = layer(hidden, run_ids, expert_ids=replay)
        return self.norm_f(hidden)

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
        new_layers = {}
        for i, layer in enumerate(self.layers):
            name = f"layers_{i}"
            hidden, layer_cache = layer(hidden, run_ids, cache["layers"].get(name), cache_meta)
            if layer_cache is not None:
                new_layers[name] = layer_cache
        logits = self.logits_from_hidden(self.norm_f(hidden))
        return logits, {"index": index + length, "run_ids": all_run_ids, "layers": new_layers}


def init_cache(cfg: ModelConfig, batch: int, max_length: int) -> dict[str, Any]:
    """An empty decode cache for `max_length` positions: Mamba conv/SSM states and attention KV."""
    layers: dict[str, Any] = {}
    for i, char in enumerate(cfg.layer_pattern):
        kind = LAYER_KINDS[char]
        if kind == "mamba":
            layers[f"layers_{i}"] = init_mamba_cache(cfg, batch)
        elif kind == "attention":
            layers[f"layers_{i}"] = init_attention_cache(cfg, batch, max_length)
    return {"index": jnp.zeros((), jnp.int32), "run_ids": jnp.full((batch, max_length), -1, jnp.int32),
            "layers": layers}

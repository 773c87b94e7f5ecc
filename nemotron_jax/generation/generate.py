"""Batched generation: left-padded prefill, then a jitted decode loop over the same `NemotronH` functions.

Prompts are left-padded to a common length; padding gets segment id 0 and the prompt 1, so neither the
attention, the convolution nor the SSM state of a prompt sees its padding. Prefill runs the chunked (SSD)
path over the whole prompt and leaves the Mamba conv/SSM states and the KV cache behind; each decode step
is one token through the recurrent path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.generation.sampling import sample_tokens
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.nemotron_h import NemotronH, init_cache


@dataclasses.dataclass
class GenerationOutput:
    """Per prompt, the generated part only: `tokens` (ending with the stop token if one was produced),
    `logprobs` of each generated token under the sampling policy, and whether a stop token ended it."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens int32 [B, P], segment_ids int32 [B, P] (0 on padding, 1 on the prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    return tokens, segment_ids


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p"))
def _generate_padded(cfg: ModelConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array,
                     stop_ids: jax.Array, key: jax.Array, *, max_new_tokens: int, temperature: float,
                     top_p: float):
    """tokens/segment_ids [B, P] -> (generated int32 [B, N], logprobs float32 [B, N], lengths int32 [B],
    finished bool [B]); positions after a sequence's stop token are padding."""
    model = NemotronH(cfg)
    batch, prompt_length = tokens.shape
    cache = init_cache(cfg, batch, prompt_length + max_new_tokens)
    logits, cache = model.apply({"params": params}, tokens, cache, segment_ids, method=NemotronH.forward_cached)
    keys = jax.random.split(key, max_new_tokens)
    token, logprob = sample_tokens(keys[0], logits[:, -1], temperature, top_p)
    generated = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    finished = jnp.isin(token, stop_ids)
    lengths = jnp.ones((batch,), jnp.int32)

    def not_done(state):
        step, _, _, _, finished, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def decode_step(state):
        step, token, generated, logprobs, finished, lengths, cache = state
        logits, cache = model.apply({"params": params}, token[:, None], cache, method=NemotronH.forward_cached)
        token, logprob = sample_tokens(keys[step], logits[:, -1], temperature, top_p)
        active = ~finished
        generated = generated.at[:, step].set(jnp.where(active, token, 0))
        logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        finished = finished | (active & jnp.isin(token, stop_ids))
        return step + 1, token, generated, logprobs, finished, lengths, cache

    state = (jnp.int32(1), token, generated, logprobs, finished, lengths, cache)
    _, _, generated, logprobs, finished, lengths, _ = jax.lax.while_loop(not_done, decode_step, state)
    return generated, logprobs, lengths, finished


def generate(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
) -> GenerationOutput:
    """Samples continuations of `prompts` (lists of token ids).

    Args:
      temperature: 0 for greedy decoding.
      top_p: nucleus sampling mass (1.0 = off).
      stop_token_ids: tokens that end a sequence (kept as its last token); default `cfg.eos_token_id`.

    Returns:
      `GenerationOutput` with the generated tokens and their log-probs under the sampling policy
      (`log_softmax(logits / temperature)`, top-p renormalised; the plain log-softmax when greedy).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if stop_token_ids is None:
        stop_token_ids = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    for prompt in prompts:
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    tokens, segment_ids = left_pad(prompts, cfg.pad_token_id or 0)
    stop_ids = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)
    generated, logprobs, lengths, finished = jax.device_get(_generate_padded(
        cfg, params, jnp.asarray(tokens), jnp.asarray(segment_ids), stop_ids, jax.random.key(seed),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p)))
    return GenerationOutput(
        tokens=[generated[i, :lengths[i]].tolist() for i in range(len(prompts))],
        logprobs=[logprobs[i, :lengths[i]].tolist() for i in range(len(prompts))],
        finished=[bool(f) for f in finished],
    )

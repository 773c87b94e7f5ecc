"""Token sampling from logits, with the log-probability of the chosen token under the sampling policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sampling_logprobs(logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """Log-probabilities of the distribution tokens are drawn from: float32 [..., V].

    temperature > 0: `log_softmax(logits / temperature)`, restricted to the smallest set of tokens whose
    probability reaches `top_p` (renormalised; tokens outside get -inf). temperature == 0 (greedy): the
    plain `log_softmax(logits)`, so that the reported log-prob is the model's own.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jax.nn.log_softmax(logits, axis=-1)
    logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    if top_p >= 1.0:
        return logprobs
    sorted_logprobs = jnp.sort(logprobs, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jnp.exp(sorted_logprobs), axis=-1)
    # Keep a token if the mass strictly before it is below top_p (so the top token is always kept).
    keep_sorted = (cumulative - jnp.exp(sorted_logprobs)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logprobs, jnp.inf), axis=-1, keepdims=True)
    kept = jnp.where(logprobs >= threshold, logprobs, -jnp.inf)
    return jax.nn.log_softmax(kept, axis=-1)


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: float, top_p: float = 1.0):
    """logits [B, V] -> (tokens int32 [B], logprobs float32 [B] of those tokens under the sampling policy)."""
    logprobs = sampling_logprobs(logits, temperature, top_p)
    if temperature == 0.0:
        tokens = jnp.argmax(logprobs, axis=-1)
    else:
        tokens = jax.random.categorical(key, logprobs, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), chosen

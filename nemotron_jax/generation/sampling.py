"""Token sampling from logits: temperature, top-k, top-p (nucleus) and greedy, all as traced values.

The knobs are ordinary (traced) arrays, so changing them between calls never recompiles a jitted caller.
Order of the filters (as in transformers' and vLLM's samplers): scale by `1 / temperature`, keep the
`top_k` most likely tokens (ties with the k-th kept), then keep the smallest set of those whose
renormalised probability reaches `top_p`, and renormalise.

Two log-probs come with every sampled token:
  * `logprob`: under the model's unmodified distribution, `log_softmax(logits)[token]` (temperature 1,
    nothing truncated) — what a training forward computes for the same token;
  * `sampling_logprob`: under the distribution the token was actually drawn from (temperature, top-k, top-p,
    renormalised). Greedy decoding (`temperature == 0`) draws from a point mass, so it is 0.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

# Below this a positive temperature turns `logits / temperature` into overflow-prone numbers while sampling
# is already greedy up to ties; ask for `temperature=0` instead.
MIN_TEMPERATURE = 1e-3


def check_sampling_args(temperature: Any, top_p: Any, top_k: Any) -> None:
    """Raises `ValueError` naming the argument for values the sampler cannot honour (Python numbers only)."""
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature} is below {MIN_TEMPERATURE}: that is greedy up to ties and "
                         "numerically unsafe; pass temperature=0 for greedy decoding")
    try:
        top_p = float(top_p)
    except (TypeError, ValueError):
        raise ValueError(f"top_p must be a number, got {top_p!r}") from None
    if not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool):
        raise ValueError(f"top_k must be an int (0 = off), got {top_k!r}")
    try:
        top_k = operator.index(top_k)
    except TypeError:
        raise ValueError(f"top_k must be an int (0 = off), got {top_k!r}") from None
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def sampling_logprobs(logits: jax.Array, temperature: Any, top_p: Any = 1.0, top_k: Any = 0) -> jax.Array:
    """Log-probabilities of the distribution tokens are drawn from: float32 [..., V].

    Args:
      logits: [..., V].
      temperature, top_p, top_k: scalars (Python or traced) or arrays broadcastable to `logits.shape[:-1]`.
        `temperature == 0` (greedy) gives the point mass on the first arg-max (0 there, -inf elsewhere);
        `top_k == 0` and `top_p == 1` switch those filters off.

    Returns:
      float32 [..., V]: `log_softmax(logits / temperature)` restricted to the kept tokens and renormalised;
      -inf outside them.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)[..., None]
    top_p = jnp.asarray(top_p, jnp.float32)[..., None]
    top_k = jnp.asarray(top_k, jnp.int32)[..., None]
    greedy = temperature == 0
    scaled = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, temperature), axis=-1)

    def truncate(scaled):
        descending = -jnp.sort(-scaled, axis=-1)
        # top-k: keep values >= the k-th largest (ties kept); k = 0 or k >= V keeps everything.
        k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
        kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, descending.shape[:-1] + (1,)), axis=-1)
        descending = jnp.where(descending >= kth, descending, -jnp.inf)
        # top-p over the renormalised top-k distribution: keep a token if the mass strictly before it is
        # below top_p (so the most likely token is always kept).
        probs = jax.nn.softmax(descending, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = (before < top_p) & (descending > -jnp.inf)
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        return jax.nn.log_softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)

    # The sort is skipped (a real branch, not a select) when neither filter is on for any row.
    filtering = jnp.any((top_k > 0) & (top_k < vocab)) | jnp.any(top_p < 1)
    out = jax.lax.cond(filtering, truncate, lambda s: s, scaled)
    point_mass = jnp.where(jnp.arange(vocab) == jnp.argmax(logits, axis=-1, keepdims=True), 0.0, -jnp.inf)
    return jnp.where(greedy, point_mass, out)


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: Any, top_p: Any = 1.0, top_k: Any = 0):
    """logits [B, V] -> (tokens int32 [B], logprobs float32 [B], sampling_logprobs float32 [B]).

    `logprobs` are the tokens' log-probs under the unmodified model distribution, `sampling_logprobs` under
    the sampling distribution (see the module docstring). Rows draw independently from `key`.
    """
    logits = logits.astype(jnp.float32)
    sampling = sampling_logprobs(logits, temperature, top_p, top_k)
    # Greedy rows hold a point mass, so the categorical draw is their arg-max too; when every row is greedy
    # the draw (a Gumbel noise array the size of the logits) is skipped.
    all_greedy = jnp.all(jnp.asarray(temperature) == 0)
    tokens = jax.lax.cond(all_greedy, lambda: jnp.argmax(sampling, axis=-1).astype(jnp.int32),
                          lambda: jax.random.categorical(key, sampling, axis=-1).astype(jnp.int32))
    chosen_sampling = jnp.take_along_axis(sampling, tokens[:, None], axis=-1)[:, 0]
    chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, chosen_sampling

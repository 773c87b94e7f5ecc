"""Batched generation: left-padded prefill, then a jitted decode loop over the same `NemotronH` functions.

    out = nj.generate(cfg, params, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
                      stop_token_ids=None, n=16, seed=0, return_routing=False)
    out.tokens[i * n + j]            # sample j of prompt i (prompt-major), generated part only
    out.logprobs, out.sampling_logprobs, out.finished, out.finish_reasons, out.routing

    arrays = generate_arrays(cfg, params, prompts, max_new_tokens=256, n=16)   # same, as padded jax arrays
    arrays.tokens [B*n, N], arrays.logprobs [B*n, N], arrays.lengths [B*n], ...

How it runs (one jitted function per (batch, padded prompt length, max_new_tokens, n, return_routing)):
  1. Prompts are left-padded to a common length rounded up to a multiple of `PROMPT_LENGTH_MULTIPLE`;
     padding gets segment id 0 and the prompt 1, so neither the attention, the convolution nor the SSM
     state of a prompt sees its padding.
  2. Prefill runs the chunked (SSD) path over the [B, P] prompts once and leaves the Mamba conv/SSM states
     and the attention KV cache (sized P + max_new_tokens) behind.
  3. The caches and the last logits are repeated `n` times along the batch (sample j of prompt i is row
     i*n + j), so the n samples of a prompt share its prefill.
  4. A `lax.while_loop` feeds one token per step through the recurrent path until every sample has produced
     a stop token or `max_new_tokens` tokens.
Temperature, top-p, top-k, the stop ids (padded to a fixed count) and the seed are traced arguments: new
values never recompile.

Log-probs: `logprobs` are under the model's unmodified distribution (`log_softmax(logits)`, temperature 1,
nothing truncated), which is what the training forward computes for the same tokens; `sampling_logprobs`
are under the distribution the token was drawn from (temperature, top-k, top-p renormalised; 0 when greedy).

Routing (`return_routing=True`): the expert ids every MoE layer chose for every prompt and response token,
ready to be replayed by the training forward (`NemotronH.apply(..., expert_ids=...)`, see
`replay_expert_ids`). The last generated token is fed through the model once more to record its routing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.generation.sampling import check_sampling_args, sample_tokens
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.layer_stack import map_layers, unstack_layers
from nemotron_jax.model.nemotron_h import NemotronH, init_cache

# Prompt lengths are padded up to a multiple of this, so that batches of slightly different prompt lengths
# share one compiled function.
PROMPT_LENGTH_MULTIPLE = 16
# Stop ids are padded (with -1) to at least this many, so that different stop sets share one compilation.
MIN_STOP_SLOTS = 8


@dataclasses.dataclass
class GenerationOutput:
    """Per sample (prompt-major: sample j of prompt i at index i*n + j), the generated part only.

    tokens: token ids, ending with the stop token if one was produced.
    logprobs: log-prob of each token under the model's unmodified distribution (temperature 1, no top-k/p).
    sampling_logprobs: log-prob of each token under the sampling distribution (0 for greedy).
    finished: whether a stop token ended the sample.
    finish_reasons: "stop" or "length" (max_new_tokens reached without a stop token).
    routing: None unless `return_routing`; then per sample an int32 array [num_moe_layers,
      prompt_len + len(tokens), k] of expert ids, MoE layers in model order (`moe_layer_names(cfg)`).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    sampling_logprobs: list[list[float]]
    finished: list[bool]
    finish_reasons: list[str]
    routing: list[np.ndarray] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerationArrays:
    """Padded arrays from `generate_arrays`; S = B * n samples (row i*n + j: sample j of prompt i), N =
    max_new_tokens, P = padded prompt length.

    tokens: int32 [S, N], 0 after `lengths`.
    logprobs, sampling_logprobs: float32 [S, N], 0 after `lengths` (see `GenerationOutput`).
    lengths: int32 [S], generated tokens per sample (including the stop token).
    finished: bool [S], a stop token ended the sample (else the length limit did).
    prompt_tokens: int32 [B, P], the prompts left-padded (pad id on the left).
    prompt_lengths: int32 [B].
    routing: None, or int32 [S, num_moe_layers, P + N, k] expert ids in the left-padded layout: prompt i
      occupies positions [P - prompt_lengths[i], P), the response [P, P + lengths[s]); other positions hold
      meaningless ids.
    """

    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    prompt_tokens: jax.Array
    prompt_lengths: jax.Array
    routing: jax.Array | None = None


def moe_layer_names(cfg: ModelConfig) -> list[str]:
    """Names ("layers_{i}") of the MoE layers, in model order: the rows of a routing array."""
    return [f"layers_{i}" for i, char in enumerate(cfg.layer_pattern) if char == "E"]


def replay_expert_ids(cfg: ModelConfig, routing: jax.Array) -> dict[str, jax.Array]:
    """Routing int [B, num_moe_layers, T, k] -> {"layers_{i}": int32 [B*T, k]} for `NemotronH.apply(tokens
    [B, T], ..., expert_ids=...)`, so that a training forward reuses the experts a rollout chose."""
    names = moe_layer_names(cfg)
    routing = jnp.asarray(routing)
    if routing.ndim != 4 or routing.shape[1] != len(names) or routing.shape[3] != cfg.num_experts_per_tok:
        raise ValueError(f"routing must be [B, {len(names)} MoE layers, T, {cfg.num_experts_per_tok}], "
                         f"got shape {routing.shape}")
    batch, _, length, k = routing.shape
    return {name: routing[:, index].reshape(batch * length, k).astype(jnp.int32)
            for index, name in enumerate(names)}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens int32 [B, P], segment_ids int32 [B, P] (0 on padding, 1 on the prompt); P is the longest
    prompt rounded up to a multiple of `multiple`."""
    if len(prompts) == 0:
        raise ValueError("generate: the prompt list is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    return tokens, segment_ids


def dispatch_tile_rows(cfg: ModelConfig, num_tokens: int) -> int:
    """Row tile of the "scan" expert dispatch for a step of `num_tokens` tokens.

    The scan visits ceil(M / t) + E - 1 tiles of t rows for M = num_tokens * k token copies and E experts, so
    its work is about M + (E - 1) * t rows: the training default (t = 128) wastes ~E * 128 rows on every
    decode step of a few tokens. t = M / E (a power of two in [8, cfg.moe_tile_rows]) keeps the waste at
    most about the real work.
    """
    copies = num_tokens * max(cfg.num_experts_per_tok, 1)
    per_expert = -(-copies // max(cfg.n_routed_experts, 1))
    return int(min(cfg.moe_tile_rows, max(8, 1 << max(per_expert - 1, 0).bit_length())))


def _repeat_samples(tree: Any, n: int) -> Any:
    """Repeats every batch-leading leaf n times (row i -> rows i*n .. i*n + n-1)."""
    return tree if n == 1 else jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _collect_routing(cfg: ModelConfig, state: dict[str, Any], names: list[str], dtype) -> jax.Array:
    """Sown MoE expert ids -> [num_moe_layers, B*T, k]."""
    recorded = unstack_layers(cfg, state["intermediates"])  # per-layer names with scan_layers too
    return jnp.stack([recorded[name]["mixer"]["expert_ids"][0] for name in names]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "n", "return_routing"))
def _rollout_jit(cfg: ModelConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array,
                 stop_ids: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                 top_k: jax.Array, *, max_new_tokens: int, n: int, return_routing: bool):
    """tokens/segment_ids [B, P] -> (generated int32 [S, N], logprobs float32 [S, N], sampling_logprobs
    float32 [S, N], lengths int32 [S], finished bool [S], routing [S, L, P + N, k] or None), S = B * n;
    positions after a sample's stop token are 0."""
    batch, prompt_length = tokens.shape
    samples = batch * n
    # The same model with expert-dispatch tiles sized for each phase (tiling does not change the results).
    prefill_model = NemotronH(dataclasses.replace(cfg, moe_tile_rows=dispatch_tile_rows(cfg, batch * prompt_length)))
    decode_model = NemotronH(dataclasses.replace(cfg, moe_tile_rows=dispatch_tile_rows(cfg, samples)))
    variables = {"params": params}
    names = moe_layer_names(cfg) if return_routing else []
    routing_dtype = jnp.uint8 if cfg.n_routed_experts <= 256 else jnp.int32
    mutable = ["intermediates"] if names else False

    def forward(tokens, cache, segment_ids=None):
        model = decode_model if segment_ids is None else prefill_model
        if not names:
            return model.apply(variables, tokens, cache, segment_ids, method=NemotronH.forward_cached), None
        out, state = model.apply(variables, tokens, cache, segment_ids, method=NemotronH.forward_cached,
                                 mutable=mutable)
        return out, _collect_routing(cfg, state, names, routing_dtype)

    cache = init_cache(cfg, batch, prompt_length + max_new_tokens)
    (logits, cache), prompt_routing = forward(tokens, cache, segment_ids)
    # n samples per prompt share this prefill: repeat its caches and last logits along the batch.
    cache = {"index": cache["index"], "run_ids": _repeat_samples(cache["run_ids"], n),
             "layers": map_layers(cfg, lambda leaf: _repeat_samples(leaf, n), cache["layers"])}
    last_logits = _repeat_samples(logits[:, -1], n)

    keys = jax.random.split(key, max_new_tokens)
    token, logprob, sampling_logprob = sample_tokens(keys[0], last_logits, temperature, top_p, top_k)
    generated = jnp.zeros((samples, max_new_tokens), jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((samples, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    sampling_lps = jnp.zeros((samples, max_new_tokens), jnp.float32).at[:, 0].set(sampling_logprob)
    finished = jnp.isin(token, stop_ids)
    lengths = jnp.ones((samples,), jnp.int32)
    if names:  # [L, S, N, k]: row p holds the routing of generated token p, recorded when it is fed back
        response_routing = jnp.zeros((len(names), samples, max_new_tokens, cfg.num_experts_per_tok),
                                     routing_dtype)
    else:
        response_routing = jnp.zeros((), routing_dtype)

    def not_done(state):
        step, finished = state[0], state[5]
        return (step < max_new_tokens) & ~jnp.all(finished)

    def decode_step(state):
        step, token, generated, logprobs, sampling_lps, finished, lengths, cache, response_routing = state
        (logits, cache), routing = forward(token[:, None], cache)
        if names:
            response_routing = jax.lax.dynamic_update_slice_in_dim(
                response_routing, routing[:, :, None], step - 1, axis=2)
        token, logprob, sampling_logprob = sample_tokens(keys[step], logits[:, -1], temperature, top_p, top_k)
        active = ~finished
        generated = generated.at[:, step].set(jnp.where(active, token, 0))
        logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
        sampling_lps = sampling_lps.at[:, step].set(jnp.where(active, sampling_logprob, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        finished = finished | (active & jnp.isin(token, stop_ids))
        return step + 1, token, generated, logprobs, sampling_lps, finished, lengths, cache, response_routing

    state = (jnp.int32(1), token, generated, logprobs, sampling_lps, finished, lengths, cache, response_routing)
    state = jax.lax.while_loop(not_done, decode_step, state)
    step, token, generated, logprobs, sampling_lps, finished, lengths, cache, response_routing = state
    routing = None
    if names:
        # Samples whose last token was sampled in the final step have not fed it back yet: do so once more.
        _, last = forward(token[:, None], cache)
        response_routing = jax.lax.dynamic_update_slice_in_dim(response_routing, last[:, :, None], step - 1, axis=2)
        prompt_routing = prompt_routing.reshape(len(names), batch, prompt_length, -1)
        prompt_routing = jnp.repeat(prompt_routing, n, axis=1)
        routing = jnp.concatenate([prompt_routing, response_routing], axis=2).transpose(1, 0, 2, 3)
        routing = routing.astype(jnp.int32)
    elif return_routing:  # no MoE layer
        routing = jnp.zeros((samples, 0, prompt_length + max_new_tokens, cfg.num_experts_per_tok), jnp.int32)
    return generated, logprobs, sampling_lps, lengths, finished, routing


def _generate_padded(cfg: ModelConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array,
                     stop_ids: jax.Array, key: jax.Array, *, max_new_tokens: int, temperature: float,
                     top_p: float):
    """Deprecated (the earlier internal entry point, kept for callers written against it); use
    `generate_arrays(cfg, params, prompts [B, P], prompt_lengths=..., ...)`.

    tokens/segment_ids [B, P] (left-padded, segment 1 on the prompt) -> (generated int32 [B, N], log-probs
    float32 [B, N] under the sampling distribution, lengths int32 [B], finished bool [B]).
    """
    check_sampling_args(temperature, top_p, 0)
    generated, _, sampling_lps, lengths, finished, _ = _rollout_jit(
        cfg, params, tokens, segment_ids, stop_ids, key, jnp.float32(temperature), jnp.float32(top_p),
        jnp.int32(0), max_new_tokens=max_new_tokens, n=1, return_routing=False)
    return generated, sampling_lps, lengths, finished


def _positive_int(name: str, value: Any) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"generate: {name} must be an int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"generate: {name} must be positive, got {value}")
    return value


def _as_key(seed: Any) -> jax.Array:
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    try:
        return jax.random.key(operator.index(seed))
    except TypeError:
        raise ValueError(f"generate: seed must be an int or a jax.random.key, got {seed!r}") from None


def _padded_prompts(cfg: ModelConfig, prompts: Any, prompt_lengths: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (tokens int32 [B, P], segment_ids int32 [B, P], prompt_lengths int32 [B]), validated."""
    pad_id = cfg.pad_token_id or 0
    if prompt_lengths is None:
        if isinstance(prompts, (np.ndarray, jax.Array)):
            raise ValueError("generate: an array of prompts needs prompt_lengths (prompts are left-padded)")
        prompts = [list(map(int, p)) for p in prompts]
        tokens, segment_ids = left_pad(prompts, pad_id, PROMPT_LENGTH_MULTIPLE)
        lengths = np.asarray([len(p) for p in prompts], np.int32)
    else:
        array = np.asarray(prompts)
        lengths = np.asarray(prompt_lengths)
        if array.ndim != 2 or lengths.shape != array.shape[:1] or array.shape[0] == 0:
            raise ValueError(f"generate: prompts must be a non-empty left-padded int array [B, P] with "
                             f"prompt_lengths [B]; got shapes {array.shape} and {lengths.shape}")
        if not (np.issubdtype(array.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)):
            raise ValueError(f"generate: prompts and prompt_lengths must be integer arrays, got {array.dtype}, "
                             f"{lengths.dtype}")
        if lengths.min() < 1 or lengths.max() > array.shape[1]:
            raise ValueError(f"generate: prompt_lengths must be in [1, {array.shape[1]}], got "
                             f"{lengths.min()}..{lengths.max()}")
        width = -(-array.shape[1] // PROMPT_LENGTH_MULTIPLE) * PROMPT_LENGTH_MULTIPLE
        tokens = np.full((array.shape[0], width), pad_id, np.int32)
        tokens[:, width - array.shape[1]:] = array
        segment_ids = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int32)
        tokens = np.where(segment_ids == 1, tokens, pad_id).astype(np.int32)
        lengths = lengths.astype(np.int32)
    in_prompt = segment_ids == 1
    bad = tokens[in_prompt & ((tokens < 0) | (tokens >= cfg.vocab_size))]
    if bad.size:
        raise ValueError(f"generate: token ids {bad[:5].tolist()} outside the vocabulary [0, {cfg.vocab_size})")
    return tokens, segment_ids, lengths


def generate_arrays(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    n: int = 1,
    seed: Any = 0,
    return_routing: bool = False,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
) -> GenerationArrays:
    """`generate`, returning padded device arrays (`GenerationArrays`) instead of Python lists.

    Args:
      prompts: token-id lists, or a left-padded int array [B, P] together with `prompt_lengths` [B].
      Others: as `generate`; `seed` may also be a `jax.random.key`.
    """
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    n = _positive_int("n", n)
    try:
        check_sampling_args(temperature, top_p, top_k)
    except ValueError as error:
        raise ValueError(f"generate: {error}") from None
    if stop_token_ids is None:
        stop_token_ids = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    stop_token_ids = [int(t) for t in stop_token_ids]
    bad_stops = [t for t in stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad_stops:
        raise ValueError(f"generate: stop_token_ids {bad_stops[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    tokens, segment_ids, lengths = _padded_prompts(cfg, prompts, prompt_lengths)
    if int(lengths.max()) + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"generate: the longest prompt ({int(lengths.max())} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) does not fit the cache of max_position_embeddings = "
                         f"{cfg.max_position_embeddings} positions")
    slots = max(MIN_STOP_SLOTS, 1 << math.ceil(math.log2(max(len(stop_token_ids), 1))))
    stop_ids = np.full((slots,), -1, np.int32)
    stop_ids[:len(stop_token_ids)] = stop_token_ids
    generated, logprobs, sampling_lps, out_lengths, finished, routing = _rollout_jit(
        cfg, params, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(stop_ids), _as_key(seed),
        jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k),
        max_new_tokens=max_new_tokens, n=n, return_routing=bool(return_routing))
    return GenerationArrays(tokens=generated, logprobs=logprobs, sampling_logprobs=sampling_lps,
                            lengths=out_lengths, finished=finished, prompt_tokens=jnp.asarray(tokens),
                            prompt_lengths=jnp.asarray(lengths), routing=routing)


def generate(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    n: int = 1,
    seed: Any = 0,
    return_routing: bool = False,
) -> GenerationOutput:
    """Samples `n` continuations of each of `prompts` (lists of token ids).

    Args:
      max_new_tokens: most tokens generated per sample.
      temperature: 0 for greedy decoding, else >= 1e-3 (`sampling.MIN_TEMPERATURE`).
      top_p: nucleus sampling mass in (0, 1] (1.0 = off).
      top_k: keep the k most likely tokens (0 = off).
      stop_token_ids: tokens that end a sample (kept as its last token); default `[cfg.eos_token_id]`.
      n: samples per prompt (e.g. a GRPO group); they share one prefill of the prompt.
      seed: an int (or a `jax.random.key`); equal seeds give equal results.
      return_routing: also return the expert ids of every MoE layer for every prompt and response token.

    Returns:
      `GenerationOutput`, prompt-major: sample j of prompt i at index i*n + j.

    Raises:
      ValueError: empty prompt list or prompt, token ids outside the vocabulary, a prompt that does not fit
        the cache, NaN / negative / tiny positive temperature, top_p outside (0, 1], negative top_k.
    """
    arrays = generate_arrays(cfg, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids, n=n, seed=seed,
                             return_routing=return_routing)
    host = jax.device_get(arrays)
    lengths = host.lengths.tolist()
    samples = len(lengths)
    routing = None
    if host.routing is not None:
        width = host.prompt_tokens.shape[1]
        routing = [host.routing[s, :, width - host.prompt_lengths[s // n]: width + lengths[s]]
                   for s in range(samples)]
    return GenerationOutput(
        tokens=[host.tokens[s, :lengths[s]].tolist() for s in range(samples)],
        logprobs=[host.logprobs[s, :lengths[s]].tolist() for s in range(samples)],
        sampling_logprobs=[host.sampling_logprobs[s, :lengths[s]].tolist() for s in range(samples)],
        finished=[bool(f) for f in host.finished],
        finish_reasons=["stop" if f else "length" for f in host.finished],
        routing=routing,
    )

"""Sampling filters: traced temperature / top-k / top-p, kept sets, the temperature distribution, bad values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemotron_jax.generation import check_sampling_args, sample_tokens, sampling_logprobs

VOCAB = 24
_sample = jax.jit(jax.vmap(sample_tokens, in_axes=(0, None, None, None, None)))  # keys [R] -> [R, B]
_filtered = jax.jit(sampling_logprobs)


def test_top_p_top_k_and_greedy_distributions():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = np.exp(np.asarray(_filtered(logits, 1.0, 0.7, 0)))[0]
    np.testing.assert_allclose(nucleus, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    top3 = np.exp(np.asarray(_filtered(logits, 1.0, 1.0, 3)))[0]
    np.testing.assert_allclose(top3, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)
    # top-p applies to the top-2 renormalised masses (0.625, 0.375): the first alone reaches 0.6.
    both = np.exp(np.asarray(_filtered(logits, 1.0, 0.6, 2)))[0]
    np.testing.assert_allclose(both, [1.0, 0, 0, 0], atol=1e-6)
    hot = np.exp(np.asarray(_filtered(logits, 2.0, 1.0, 0)))[0]
    np.testing.assert_allclose(hot, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum(),
                               atol=1e-6)
    greedy = np.asarray(_filtered(logits, 0.0, 1.0, 0))[0]
    assert greedy[0] == 0 and np.all(np.isneginf(greedy[1:]))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.05, 3.0), top_p=st.floats(0.01, 1.0),
       top_k=st.integers(0, VOCAB + 2))
def test_sampled_tokens_stay_in_the_kept_set(seed, temperature, top_p, top_k):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 2, (3, VOCAB)), jnp.float32)
    keys = jax.random.split(jax.random.key(seed), 64)
    tokens, logprobs, sampled_lps = _sample(keys, logits, temperature, top_p, top_k)
    tokens = np.asarray(tokens)
    # The kept set, computed here independently with NumPy.
    scaled = np.asarray(logits, np.float64) / temperature
    for row in range(3):
        order = np.argsort(-scaled[row], kind="stable")
        k = VOCAB if top_k == 0 else min(top_k, VOCAB)
        candidates = order[:k]
        probs = np.exp(scaled[row, candidates] - scaled[row, candidates].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        kept = set(candidates[before < top_p].tolist())
        assert set(tokens[:, row].tolist()) <= kept
        np.testing.assert_allclose(
            np.asarray(logprobs)[:, row], jax.nn.log_softmax(logits[row])[tokens[:, row]], atol=1e-5)
        kept_ids = sorted(kept)
        want = scaled[row, kept_ids] - np.log(np.exp(scaled[row, kept_ids]).sum())
        lookup = dict(zip(kept_ids, want))
        np.testing.assert_allclose(np.asarray(sampled_lps)[:, row], [lookup[t] for t in tokens[:, row]], atol=1e-4)


def test_temperature_sampling_matches_softmax_chi_square():
    # Five live tokens (the rest -inf), three identical rows; shapes shared with the property test's compile.
    five = np.asarray([1.0, 0.2, -0.5, 0.9, -2.0], np.float32)
    logits = jnp.asarray(np.tile(np.concatenate([five, np.full(VOCAB - 5, -np.inf, np.float32)]), (3, 1)))
    temperature = 0.7
    tokens = np.concatenate([np.asarray(_sample(jax.random.split(jax.random.key(i), 64), logits, temperature,
                                                1.0, 0)[0]).ravel() for i in range(100)])
    expected = len(tokens) * np.asarray(jax.nn.softmax(jnp.asarray(five) / temperature))
    observed = np.bincount(tokens, minlength=VOCAB)
    assert observed[5:].sum() == 0
    chi2 = float(((observed[:5] - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (chi2, observed, expected)  # chi-square, 4 degrees of freedom, p = 0.001


def test_same_key_same_tokens_and_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 1, (3, VOCAB)), jnp.float32)
    keys = jax.random.split(jax.random.key(5), 64)
    first = _sample(keys, logits, 1.0, 1.0, 0)[0]
    np.testing.assert_array_equal(first, _sample(keys, logits, 1.0, 1.0, 0)[0])
    assert len(np.unique(np.asarray(first)[:, 0])) > 1  # different keys, different draws
    tokens, logprobs, sampled = _sample(keys, logits, 0.0, 1.0, 0)
    np.testing.assert_array_equal(np.asarray(tokens), np.broadcast_to(np.argmax(np.asarray(logits), -1), (64, 3)))
    np.testing.assert_array_equal(np.asarray(sampled), 0.0)
    np.testing.assert_allclose(np.asarray(logprobs)[0], np.max(jax.nn.log_softmax(logits), axis=-1), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=1e-30), "pass temperature=0 for greedy"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=math.nan), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an int"),
])
def test_bad_sampling_values_are_rejected(kwargs, message):
    args = dict(temperature=1.0, top_p=1.0, top_k=0) | kwargs
    with pytest.raises(ValueError, match=message):
        check_sampling_args(**args)

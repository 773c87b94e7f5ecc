"""group_advantages against a float64 NumPy reference written per group."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import group_advantages


def reference_advantages(rewards, group_size, normalize_std, leave_one_out, std_ddof, eps):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        if np.all(group == group[0]):
            continue  # all equal: zero advantages
        for i, reward in enumerate(group):
            if leave_one_out:
                baseline = (group.sum() - reward) / (group_size - 1)
            else:
                baseline = group.mean()
            advantage = reward - baseline
            if normalize_std:
                advantage /= np.std(group, ddof=std_ddof) + eps
            out[start + i] = advantage
    return out


@pytest.mark.parametrize(
    "normalize_std,leave_one_out,std_ddof", list(itertools.product([True, False], [True, False], [0, 1]))
)
def test_matches_reference(normalize_std, leave_one_out, std_ddof):
    rng = np.random.default_rng(0)
    group_size = 4
    rewards = rng.normal(size=5 * group_size)
    rewards[4:8] = 0.7  # an all-equal group
    rewards[8:12] = [1.0, 0.0, 0.0, 0.0]  # binary rewards
    got = group_advantages(jnp.asarray(rewards, jnp.float32), group_size, normalize_std=normalize_std,
                           leave_one_out=leave_one_out, std_ddof=std_ddof, eps=1e-6)
    expected = reference_advantages(rewards, group_size, normalize_std, leave_one_out, std_ddof, 1e-6)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == rewards.shape


def test_equal_rewards_give_exact_zeros():
    rewards = jnp.asarray([0.1, 0.1, 0.1, 1 / 3, 1 / 3, 1 / 3], jnp.float32)
    for leave_one_out in (False, True):
        got = group_advantages(rewards, 3, leave_one_out=leave_one_out, eps=1e-12)
        assert np.all(np.asarray(got) == 0.0)


def test_cascade_formula_binary_rewards():
    # (r - mean) / (std + eps), unbiased std: rewards [1, 0, 0, 0] -> mean 0.25, std 0.5.
    got = group_advantages(jnp.asarray([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    np.testing.assert_allclose(np.asarray(got), [1.5, -0.5, -0.5, -0.5], rtol=1e-6)


def test_integer_and_bool_rewards_and_jit():
    got = jax.jit(group_advantages, static_argnums=1)(jnp.asarray([1, 0, 1, 1]), 2)
    np.testing.assert_allclose(np.asarray(got), reference_advantages([1, 0, 1, 1], 2, True, False, 1, 1e-6),
                               rtol=1e-6)
    got = group_advantages(jnp.asarray([True, False]), 2)
    assert got.dtype == jnp.float32


@pytest.mark.parametrize(
    "rewards,group_size,kwargs,match",
    [
        (np.zeros(6), 4, {}, "multiple of group_size"),
        (np.zeros((2, 3)), 3, {}, "rank 1"),
        (np.zeros(4), 0, {}, "group_size"),
        (np.zeros(4), 1, dict(leave_one_out=True), "leave_one_out"),
        (np.zeros(4), 2, dict(std_ddof=2), "std_ddof"),
        (np.zeros(4), 2, dict(eps=-1.0), "eps"),
    ],
)
def test_invalid_arguments(rewards, group_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(jnp.asarray(rewards), group_size, **kwargs)

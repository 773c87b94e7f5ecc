"""aggregate_loss against a float64 NumPy reference, counts, NaN isolation and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import AGGREGATIONS, aggregate_loss, token_and_sequence_counts


def reference_aggregate(values, mask, aggregation, num_tokens=None, num_sequences=None, max_tokens=None):
    """Float64 reference written from the formulas of the issue, row by row."""
    values = np.asarray(values, np.float64)
    mask = np.asarray(mask, np.float64)
    contributions = np.where(mask != 0, values * mask, 0.0)
    if num_tokens is None:
        num_tokens = mask.sum()
    if num_sequences is None:
        num_sequences = sum(1 for row in mask if np.any(row != 0))
    if max_tokens is None:
        max_tokens = mask.shape[1]
    if aggregation == "token_mean":
        return contributions.sum() / num_tokens if num_tokens else 0.0
    if aggregation == "seq_mean_token_mean":
        total = 0.0
        for row_values, row_mask in zip(contributions, mask):
            if row_mask.sum() != 0:
                total += row_values.sum() / row_mask.sum()
        return total / num_sequences if num_sequences else 0.0
    if aggregation == "seq_mean_token_sum":
        return contributions.sum() / num_sequences if num_sequences else 0.0
    return contributions.sum() / (num_sequences * max_tokens) if num_sequences else 0.0


def random_batch(seed, batch=5, length=7, float_mask=False):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(batch, length))
    mask = rng.random((batch, length)) < 0.6
    mask[1] = False  # a fully masked row
    if float_mask:
        mask = mask * rng.uniform(0.5, 2.0, size=(batch, length))
    return values, mask


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("float_mask", [False, True])
def test_matches_reference(aggregation, float_mask):
    values, mask = random_batch(0, float_mask=float_mask)
    got = aggregate_loss(jnp.asarray(values, jnp.float32), jnp.asarray(mask), aggregation)
    np.testing.assert_allclose(float(got), reference_aggregate(values, mask, aggregation), rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_explicit_normalisers(aggregation):
    values, mask = random_batch(1)
    kwargs = dict(num_tokens=40.0, num_sequences=9.0, max_tokens=11)
    got = aggregate_loss(jnp.asarray(values, jnp.float32), jnp.asarray(mask), aggregation, **kwargs)
    np.testing.assert_allclose(float(got), reference_aggregate(values, mask, aggregation, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_matches_reference_weights(aggregation):
    # The loss is linear in the per-token values: its gradient is the reference's weight of each token.
    values, mask = random_batch(2)
    grad = jax.grad(lambda v: aggregate_loss(v, jnp.asarray(mask), aggregation))(jnp.asarray(values, jnp.float32))
    expected = np.zeros_like(values)
    for index in np.ndindex(values.shape):
        unit = np.zeros_like(values)
        unit[index] = 1.0
        expected[index] = reference_aggregate(unit, mask, aggregation)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nan_at_masked_positions_is_ignored(aggregation):
    values, mask = random_batch(3)
    poisoned = np.where(mask, values, np.nan)
    loss, grad = jax.value_and_grad(lambda v: aggregate_loss(v, jnp.asarray(mask), aggregation))(
        jnp.asarray(poisoned, jnp.float32)
    )
    np.testing.assert_allclose(float(loss), reference_aggregate(values, mask, aggregation), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_mask_gives_zero(aggregation):
    loss = aggregate_loss(jnp.ones((2, 3)), jnp.zeros((2, 3), bool), aggregation)
    assert float(loss) == 0.0


def test_counts():
    mask = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]], bool)
    num_tokens, num_sequences = token_and_sequence_counts(jnp.asarray(mask))
    assert float(num_tokens) == 3.0
    assert float(num_sequences) == 2.0  # the all-zero row is not a sequence


def test_jittable_with_static_aggregation():
    values, mask = random_batch(4)
    jitted = jax.jit(aggregate_loss, static_argnames=("aggregation",))
    got = jitted(jnp.asarray(values, jnp.float32), jnp.asarray(mask), aggregation="seq_mean_token_mean")
    np.testing.assert_allclose(float(got), reference_aggregate(values, mask, "seq_mean_token_mean"), rtol=1e-5)


def test_invalid_arguments():
    values = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_loss(values, jnp.ones((2, 3)), "sequence_mean")
    with pytest.raises(ValueError, match="mask"):
        aggregate_loss(values, jnp.ones((2, 4)), "token_mean")
    with pytest.raises(ValueError, match="per_token_loss"):
        aggregate_loss(jnp.zeros((6,)), jnp.ones((6,)), "token_mean")


def test_array_likes_accepted():
    values = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    mask = [[1, 1, 0], [0, 0, 0]]
    np.testing.assert_allclose(float(aggregate_loss(values, mask, "seq_mean_token_mean")), 1.5, rtol=1e-6)
    num_tokens, num_sequences = token_and_sequence_counts(np.asarray(mask))
    assert (float(num_tokens), float(num_sequences)) == (2.0, 1.0)

"""kl_penalty: NumPy reference values and gradients, Monte Carlo check against the exact KL, signs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nemotron_jax.losses import aggregate_loss, kl_penalty


def reference_kl(lp, ref, kind):
    d = np.asarray(lp, np.float64) - np.asarray(ref, np.float64)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    return np.exp(-d) + d - 1.0


def reference_kl_grad(lp, ref, kind):
    """d k / d logprobs."""
    d = np.asarray(lp, np.float64) - np.asarray(ref, np.float64)
    if kind == "k1":
        return np.ones_like(d)
    if kind == "k2":
        return d
    return 1.0 - np.exp(-d)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_values_and_gradients(kind):
    rng = np.random.default_rng(0)
    lp = -rng.uniform(0.01, 4.0, size=(3, 5))
    ref = -rng.uniform(0.01, 4.0, size=(3, 5))
    got = kl_penalty(jnp.asarray(lp, jnp.float32), jnp.asarray(ref, jnp.float32), kind)
    np.testing.assert_allclose(np.asarray(got), reference_kl(lp, ref, kind), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(kl_penalty(x, jnp.asarray(ref, jnp.float32), kind)))(jnp.asarray(lp, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), reference_kl_grad(lp, ref, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_monte_carlo_mean_is_exact_kl(kind):
    # Sample tokens from pi over a small vocabulary; the unbiased estimators' mean is KL(pi || pi_ref).
    rng = np.random.default_rng(1)
    vocab = 6
    pi = rng.dirichlet(np.ones(vocab))
    pi_ref = rng.dirichlet(np.ones(vocab))
    exact = float(np.sum(pi * (np.log(pi) - np.log(pi_ref))))
    samples = rng.choice(vocab, size=200_000, p=pi)
    lp = np.log(pi)[samples].reshape(400, 500)
    ref = np.log(pi_ref)[samples].reshape(400, 500)
    values = np.asarray(kl_penalty(jnp.asarray(lp, jnp.float32), jnp.asarray(ref, jnp.float32), kind), np.float64)
    standard_error = values.std() / np.sqrt(values.size)
    assert abs(values.mean() - exact) < 4 * standard_error + 1e-5, (values.mean(), exact, standard_error)
    # And through the shared aggregation, as a loss term would use it.
    mask = jnp.ones(lp.shape, bool)
    aggregated = aggregate_loss(jnp.asarray(values, jnp.float32), mask, "token_mean")
    assert abs(float(aggregated) - exact) < 4 * standard_error + 1e-5


def test_k2_is_biased_but_close_for_close_policies():
    rng = np.random.default_rng(2)
    pi = rng.dirichlet(np.ones(5) * 50)
    pi_ref = 0.98 * pi + 0.02 * rng.dirichlet(np.ones(5) * 50)
    exact = float(np.sum(pi * (np.log(pi) - np.log(pi_ref))))
    samples = rng.choice(5, size=50_000, p=pi)
    values = kl_penalty(jnp.asarray(np.log(pi)[samples]), jnp.asarray(np.log(pi_ref)[samples]), "k2")
    assert float(jnp.mean(values)) == pytest.approx(exact, rel=0.1)


logprob_arrays = arrays(np.float32, (4, 6), elements=st.floats(-30.0, 0.0, width=32))


@settings(max_examples=30, deadline=None)
@given(lp=logprob_arrays, ref=logprob_arrays)
def test_k2_and_k3_are_nonnegative(lp, ref):
    for kind in ("k2", "k3"):
        values = np.asarray(kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind))
        assert np.all(values >= 0.0), (kind, values.min())


def test_mask_zeroes_and_protects_padding():
    lp = jnp.array([[-1.0, -jnp.inf], [-0.5, -0.2]])
    ref = jnp.array([[-2.0, -1.0], [jnp.nan, -0.1]])
    mask = jnp.array([[True, False], [False, True]])
    values, grad = jax.value_and_grad(lambda x: jnp.sum(kl_penalty(x, ref, "k3", mask=mask)))(lp)
    np.testing.assert_allclose(float(values), reference_kl(-1.0, -2.0, "k3") + reference_kl(-0.2, -0.1, "k3"),
                               rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((3, 2)), "k1")
    with pytest.raises(ValueError, match="mask"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k1", mask=jnp.ones((2,)))

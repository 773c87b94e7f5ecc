"""kl_penalty: NumPy reference values and gradients (pathwise and NeMo-RL's score-function form), exact
expectations against the true KL and its gradient, clamps, signs. The comparison with NeMo-RL's own formulas
is in test_nemo_rl_reference.py."""

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


NO_CLAMPS = dict(input_clamp=None, output_clamp=None)


@pytest.mark.parametrize("gradient", ["pathwise", "score_function"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_values_and_gradients(kind, gradient):
    rng = np.random.default_rng(0)
    lp = -rng.uniform(0.01, 4.0, size=(3, 5))
    ref = -rng.uniform(0.01, 4.0, size=(3, 5))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = kl_penalty(f32(lp), f32(ref), kind, gradient=gradient, **NO_CLAMPS)
    np.testing.assert_allclose(np.asarray(got), reference_kl(lp, ref, kind), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(kl_penalty(x, f32(ref), kind, gradient=gradient, **NO_CLAMPS)))(f32(lp))
    # Score-function form: d(w k)/d lp at w = exp(lp - sg(lp)) = 1 is k + dk/d lp.
    expected = reference_kl_grad(lp, ref, kind)
    if gradient == "score_function":
        expected = expected + reference_kl(lp, ref, kind)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_score_function_gradient_is_the_gradient_of_the_true_kl(kind):
    """Summed exactly over the vocabulary with the sampling probabilities, the per-token gradients are
    grad KL(pi || pi_ref) for the unbiased estimators; the pathwise k3 gradient (the old one) is not."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)
    ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 7)), jnp.float32))

    def true_kl(theta):
        lp = jax.nn.log_softmax(theta)
        return jnp.sum(jnp.exp(lp) * (lp - ref))

    def expected_estimate(theta, gradient):  # E_{y ~ sg(pi)} of the per-token penalty, exactly
        lp = jax.nn.log_softmax(theta)
        values = kl_penalty(lp, ref, kind, gradient=gradient, **NO_CLAMPS)
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(lp)) * values)

    want = jax.grad(true_kl)(logits)
    np.testing.assert_allclose(float(expected_estimate(logits, "score_function")), float(true_kl(logits)),
                               rtol=1e-5)
    np.testing.assert_allclose(jax.grad(expected_estimate)(logits, "score_function"), want, rtol=1e-4, atol=1e-6)
    if kind == "k3":
        pathwise = jax.grad(expected_estimate)(logits, "pathwise")
        assert np.abs(np.asarray(pathwise) - np.asarray(want)).max() > 1e-2


def test_k3_gradient_stays_bounded_where_the_reference_dominates():
    """pi_ref >> pi: the pathwise gradient 1 - pi_ref/pi is about -e^29 here; the score-function one is
    lp - ref, computed without the cancellation of two huge exponentials, and 0 once a clamp is active."""
    lp = jnp.array([[-30.0, -17.0, -1.0]])
    ref = jnp.array([[-1.0, -1.0, -1.5]])
    grad = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, "k3", **NO_CLAMPS)))(lp)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(lp - ref), rtol=1e-6)
    old = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, "k3", gradient="pathwise", **NO_CLAMPS)))(lp)
    assert float(old[0, 0]) < -1e12
    # NeMo-RL's default clamps: |logr| = 29 > 20 and k3(16) > 10 are clamped (no gradient), 0.5 is not.
    values, grad = jax.value_and_grad(lambda x: jnp.sum(kl_penalty(x, ref, "k3")))(lp)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, 0.0, 0.5]], atol=1e-7)
    np.testing.assert_allclose(float(values), 10.0 + 10.0 + float(reference_kl(-1.0, -1.5, "k3")), rtol=1e-6)


def test_on_policy_approximation_weights_value_and_gradient():
    rng = np.random.default_rng(4)
    lp = -rng.uniform(0.1, 2.0, size=(2, 4))
    ref = -rng.uniform(0.1, 2.0, size=lp.shape)
    sampling = lp + rng.normal(scale=0.3, size=lp.shape)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    fn = lambda x: kl_penalty(x, f32(ref), "k3", sampling_logprobs=f32(sampling))  # noqa: E731
    w = np.exp(lp - sampling)
    np.testing.assert_allclose(np.asarray(fn(f32(lp))), w * reference_kl(lp, ref, "k3"), rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(fn(x)))(f32(lp))
    np.testing.assert_allclose(np.asarray(grad), w * (lp - ref), rtol=1e-5, atol=1e-7)


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
    values = np.asarray(kl_penalty(jnp.asarray(lp, jnp.float32), jnp.asarray(ref, jnp.float32), kind, **NO_CLAMPS),
                        np.float64)
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
    values = kl_penalty(jnp.asarray(np.log(pi)[samples]), jnp.asarray(np.log(pi_ref)[samples]), "k2", **NO_CLAMPS)
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
    with pytest.raises(ValueError, match="gradient"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k1", gradient="reparam")
    with pytest.raises(ValueError, match="output_clamp"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k1", output_clamp=0.0)
    with pytest.raises(ValueError, match="sampling_logprobs"):
        kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k1", sampling_logprobs=jnp.zeros((3, 2)))

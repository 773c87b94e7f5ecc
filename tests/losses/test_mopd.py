"""mopd_loss (Nemotron-Cascade 2 Eq. 4) against a float64 NumPy reference: values, gradients, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import mopd_loss


def reference_mopd(lp, teacher, rollout, mask, low=0.5, high=2.0):
    """Returns (loss with per-sequence 1/|V(y)| normalisation, d loss / d lp, mean advantage, masked fraction)."""
    advantage = teacher - lp
    ratio = np.exp(lp - rollout)
    keep = (ratio >= low) & (ratio <= high)
    weight = ratio * keep
    rows = [b for b in range(lp.shape[0]) if mask[b].any()]
    loss = 0.0
    grad = np.zeros_like(lp)
    for b in rows:
        valid = mask[b]
        loss += np.sum(-(weight * advantage * lp)[b][valid]) / valid.sum()
        grad[b] = np.where(valid, -weight[b] * advantage[b], 0.0) / valid.sum()
    return loss / len(rows), grad / len(rows), advantage[mask].mean(), (~keep & mask).sum() / mask.sum()


def random_inputs(seed):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.01, 3.0, size=(4, 7))
    teacher = -rng.uniform(0.01, 3.0, size=lp.shape)
    rollout = lp + rng.normal(scale=0.6, size=lp.shape)
    mask = rng.random(lp.shape) < 0.7
    mask[:, 0] = True
    mask[2] = False
    return lp, teacher, rollout, mask


def test_matches_reference():
    lp, teacher, rollout, mask = random_inputs(0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(
        lambda x: mopd_loss(x, f32(teacher), f32(rollout), jnp.asarray(mask)), has_aux=True
    )(f32(lp))
    expected_loss, expected_grad, mean_advantage, masked_fraction = reference_mopd(lp, teacher, rollout, mask)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["mean_advantage"]), mean_advantage, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reverse_kl_estimate"]), -mean_advantage, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["is_masked_fraction"]), masked_fraction, rtol=1e-6)
    assert 0 < masked_fraction < 1


def test_converged_student_has_zero_gradient_and_token_mean_option():
    lp, _, rollout, mask = random_inputs(1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    grad = jax.grad(lambda x: mopd_loss(x, f32(lp), f32(rollout), jnp.asarray(mask))[0])(f32(lp))
    assert np.all(np.asarray(grad) == 0.0)
    lp, teacher, rollout, mask = random_inputs(2)
    loss, _ = mopd_loss(f32(lp), f32(teacher), f32(rollout), jnp.asarray(mask), aggregation="token_mean",
                        is_low=0.2, is_high=5.0)
    ratio = np.exp(lp - rollout)
    weight = ratio * ((ratio >= 0.2) & (ratio <= 5.0))
    expected = np.sum(np.where(mask, -weight * (teacher - lp) * lp, 0.0)) / mask.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_jittable():
    lp, teacher, rollout, mask = random_inputs(3)
    fn = jax.jit(mopd_loss, static_argnames=("aggregation",))
    loss, _ = fn(jnp.asarray(lp), jnp.asarray(teacher), jnp.asarray(rollout), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), reference_mopd(lp, teacher, rollout, mask)[0], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(is_low=2.5), "is_low"), (dict(is_low=-0.1), "is_low"), (dict(aggregation="sum"), "aggregation")],
)
def test_invalid_arguments(kwargs, match):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        mopd_loss(x, x, x, jnp.ones((2, 3), bool), **kwargs)


def test_shape_mismatch():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        mopd_loss(x, jnp.zeros((2, 4)), x, jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mopd_loss(x, x, jnp.zeros((3,)), jnp.ones((2, 3), bool))

"""sft_loss: mean NLL over loss tokens, global normaliser, padding isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import sft_loss


def test_value_gradient_and_normaliser():
    rng = np.random.default_rng(0)
    lp = -rng.uniform(0.0, 5.0, size=(3, 6))
    mask = rng.random((3, 6)) < 0.6
    loss, grad = jax.value_and_grad(lambda x: sft_loss(x, jnp.asarray(mask)))(jnp.asarray(lp, jnp.float32))
    np.testing.assert_allclose(float(loss), -lp[mask].sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), -mask.astype(np.float64) / mask.sum(), rtol=1e-6)
    loss = sft_loss(jnp.asarray(lp, jnp.float32), jnp.asarray(mask), num_tokens=50)
    np.testing.assert_allclose(float(loss), -lp[mask].sum() / 50, rtol=1e-6)


def test_padding_with_nan_is_ignored_and_jit():
    lp = jnp.array([[-1.0, jnp.nan], [-2.0, -3.0]])
    mask = jnp.array([[True, False], [True, True]])
    loss = jax.jit(sft_loss)(lp, mask)
    np.testing.assert_allclose(float(loss), 2.0, rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss(jnp.zeros((2, 3)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="logprobs"):
        sft_loss(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))

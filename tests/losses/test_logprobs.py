"""Chunked token log-probs and entropies against float64 NumPy references (values and analytic gradients),
and the compiled memory bound at the issue's size (compiled only, never run here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import token_entropy, token_logprobs, token_logprobs_and_entropy, token_logprobs_reference


def reference(hidden, lm_head, targets, logprob_weights, entropy_weights):
    """Float64: log-probs, entropies, and the gradients of sum(c * logprobs) + sum(d * entropy)."""
    hidden = np.asarray(hidden, np.float64)
    lm_head = np.asarray(lm_head, np.float64)
    logits = hidden @ lm_head
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    p = np.exp(log_p)
    logprobs = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    entropy = -(p * log_p).sum(axis=-1)
    onehot = np.eye(lm_head.shape[1])[targets]
    # d logprob / d logits = onehot - p;  d H / d logits = -p (log p + H).
    logits_grad = logprob_weights[..., None] * (onehot - p) - entropy_weights[..., None] * p * (
        log_p + entropy[..., None]
    )
    hidden_grad = logits_grad @ lm_head.T
    lm_head_grad = hidden.reshape(-1, hidden.shape[-1]).T @ logits_grad.reshape(-1, lm_head.shape[1])
    return logprobs, entropy, hidden_grad, lm_head_grad


def random_problem(seed, shape=(2, 9), hidden_size=12, vocab=37, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=shape + (hidden_size,)).astype(np.float32)
    lm_head = (scale * rng.normal(size=(hidden_size, vocab)) / np.sqrt(hidden_size)).astype(np.float32)
    targets = rng.integers(0, vocab, size=shape)
    c = rng.normal(size=shape)
    d = rng.normal(size=shape)
    return hidden, lm_head, targets, c, d


@functools.lru_cache(maxsize=None)
def _compiled_value_and_grads(**kwargs):
    """One jitted function per chunking, reused by every test with the same shapes (compiles dominate)."""

    def objective(h, w, targets, c, d):
        lp, ent = token_logprobs_and_entropy(h, w, targets, **kwargs)
        return jnp.sum(c * lp) + jnp.sum(d * ent), (lp, ent)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def value_and_grads(hidden, lm_head, targets, c, d, **kwargs):
    fn = _compiled_value_and_grads(**kwargs)
    (_, (lp, ent)), (hg, wg) = fn(jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets),
                                  jnp.asarray(c, jnp.float32), jnp.asarray(d, jnp.float32))
    return [np.asarray(x, np.float64) for x in (lp, ent, hg, wg)]


@pytest.mark.parametrize(
    "chunk_size,token_chunk_size",
    [(8, 5), (64, None), (36, 1)],  # tails in both directions, one tile, single tokens
)
def test_values_and_gradients_match_reference(chunk_size, token_chunk_size):
    hidden, lm_head, targets, c, d = random_problem(chunk_size * 31 + (token_chunk_size or 0), scale=3.0)
    got = value_and_grads(hidden, lm_head, targets, c, d, chunk_size=chunk_size, token_chunk_size=token_chunk_size)
    expected = reference(hidden, lm_head, targets, c, d)
    for name, g, e in zip(("logprobs", "entropy", "hidden grad", "lm_head grad"), got, expected):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)


def test_large_logits_are_stable():
    # Logits of magnitude ~1e3: a naive exp would overflow; the streaming logsumexp must not.
    hidden, lm_head, targets, c, d = random_problem(3, scale=400.0)
    got = value_and_grads(hidden, lm_head, targets, c, d, chunk_size=8, token_chunk_size=5)
    expected = reference(hidden, lm_head, targets, c, d)
    assert all(np.all(np.isfinite(x)) for x in got)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=5e-2)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-3, atol=5e-2)


def test_bf16_inputs_compute_in_float32():
    hidden, lm_head, targets, c, d = random_problem(4)
    hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)
    lm_head_bf16 = jnp.asarray(lm_head, jnp.bfloat16)

    @jax.jit
    def run(h, w, t):
        lp, ent = token_logprobs_and_entropy(h, w, t, chunk_size=37)
        grads = jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, t, chunk_size=37)), (0, 1))(h, w)
        return lp, ent, grads

    lp, ent, grads = run(hidden_bf16, lm_head_bf16, jnp.asarray(targets))
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    # The reference on the bf16-rounded values: only accumulation order differs.
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in (hidden_bf16, lm_head_bf16)]
    expected = reference(*rounded, targets, np.ones(targets.shape), np.zeros(targets.shape))
    np.testing.assert_allclose(np.asarray(lp), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), expected[1], rtol=1e-5, atol=1e-5)
    # bf16 gradients: compare at bf16 resolution.
    np.testing.assert_allclose(np.asarray(grads[1], np.float64), expected[3], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(grads[0], np.float64), expected[2], rtol=2e-2, atol=2e-2)


def test_entropy_function_and_slow_twin():
    hidden, lm_head, targets, _, d = random_problem(5)

    @jax.jit
    def run(h, w, t, weights):
        entropy, grad = jax.value_and_grad(lambda x: jnp.sum(weights * token_entropy(x, w, chunk_size=37)))(h)
        return token_entropy(h, w, chunk_size=37), grad, token_logprobs_reference(h, w, t)

    entropy, grad, (lp_ref, ent_ref) = run(jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets),
                                           jnp.asarray(d, jnp.float32))
    zero = np.zeros(targets.shape)
    expected = reference(hidden, lm_head, targets, zero, d)
    np.testing.assert_allclose(np.asarray(entropy), expected[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), expected[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_ref), expected[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp_ref), expected[0], rtol=1e-5, atol=1e-6)


def test_out_of_range_targets_give_nan_and_no_gradient():
    hidden, lm_head, _, _, _ = random_problem(6, shape=(1, 4), vocab=10)
    targets = jnp.array([[1, -1, 10, 3]])
    mask = jnp.array([[True, False, False, True]])

    @jax.jit
    def run(h, w):
        lp = token_logprobs(h, w, targets, chunk_size=10)
        grad = jax.grad(lambda x: jnp.sum(jnp.where(mask, token_logprobs(x, w, targets, chunk_size=10), 0.0)))(h)
        return lp, grad

    lp, grad = (np.asarray(x) for x in run(jnp.asarray(hidden), jnp.asarray(lm_head)))
    assert np.isfinite(lp[0, [0, 3]]).all() and np.isnan(lp[0, [1, 2]]).all()
    assert np.all(np.isfinite(grad)) and np.all(grad[0, 1:3] == 0.0) and np.any(grad[0, 0] != 0.0)


def test_rows_with_padded_token_blocks_match_reference():
    """[3, 10] tokens, 7 tokens per tile: blocks of 3 positions per row, the last block padded in every row."""
    hidden, lm_head, targets, c, d = random_problem(11, shape=(3, 10), scale=2.0)
    got = value_and_grads(hidden, lm_head, targets, c, d, chunk_size=8, token_chunk_size=7)
    expected = reference(hidden, lm_head, targets, c, d)
    for name, g, e in zip(("logprobs", "entropy", "hidden grad", "lm_head grad"), got, expected):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)


def test_batch_sharded_hidden_is_never_gathered(gathers_at_least):
    """With the batch axis sharded over 4 devices, the compiled forward+backward holds no all-gather of the
    [B, T, D] hidden states: token blocks cut across rows, so the block loop slices an unsharded axis."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    batch, length, hidden_size, vocab = 8, 64, 24, 40
    rows = NamedSharding(mesh, P("data"))
    args = (jax.ShapeDtypeStruct((batch, length, hidden_size), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows))

    def loss(h, w, t):
        return jnp.sum(token_logprobs(h, w, t, chunk_size=16, token_chunk_size=64))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    gathered = gathers_at_least(hlo, length * hidden_size)  # one row's hidden states, in any shape
    assert not gathered, gathered[:2]


def test_jit_any_leading_shape():
    hidden, lm_head, targets, c, d = random_problem(8, shape=(2, 3, 4))
    lp = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=16, token_chunk_size=5))(
        jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets)
    )
    assert lp.shape == (2, 3, 4)
    np.testing.assert_allclose(np.asarray(lp), reference(hidden, lm_head, targets, c, d)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hidden_shape,lm_head_shape,target_shape,kwargs,match",
    [
        ((2, 3, 4), (5, 7), (2, 3), {}, "hidden"),
        ((2, 3, 4), (4, 7), (2, 4), {}, "targets"),
        ((2, 3, 4), (4, 7, 1), (2, 3), {}, "lm_head"),
        ((2, 3, 4), (4, 7), (2, 3), dict(chunk_size=0), "chunk_size"),
        ((2, 3, 4), (4, 7), (2, 3), dict(token_chunk_size=-2), "token_chunk_size"),
    ],
)
def test_invalid_arguments(hidden_shape, lm_head_shape, target_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(jnp.zeros(hidden_shape), jnp.zeros(lm_head_shape), jnp.zeros(target_shape, jnp.int32),
                       **kwargs)


def test_float_targets_rejected():
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(jnp.zeros((2, 4)), jnp.zeros((4, 7)), jnp.zeros((2,)))


def test_compiled_memory_at_issue_size():
    """T=8192, V=131072, D=1024 float32: forward+gradient temporaries < 1 GiB, against > 4 GiB naively.

    Only compiled (from shapes), not run: the run with timings is experiments/benchmarks/token_logprobs_memory.
    """
    tokens, vocab, hidden_size = 8192, 131072, 1024
    shapes = (
        jax.ShapeDtypeStruct((1, tokens, hidden_size), jnp.float32),
        jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32),
        jax.ShapeDtypeStruct((1, tokens), jnp.int32),
    )

    def temp_bytes(logprob_fn):
        step = jax.value_and_grad(lambda h, w, t: jnp.sum(logprob_fn(h, w, t)), argnums=(0, 1))
        return jax.jit(step).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(token_logprobs)
    naive = temp_bytes(lambda h, w, t: token_logprobs_reference(h, w, t)[0])
    assert chunked < 2**30, chunked
    assert naive > 4 * 2**30, naive

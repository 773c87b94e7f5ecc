"""The plain-JAX grouped matmul against a NumPy per-group loop and `lax.ragged_dot`: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels import grouped_matmul as gm


def _numpy_gmm(lhs, rhs, group_sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
    start = 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = lhs[start:start + size].astype(np.float64) @ rhs[g].astype(np.float64)
        start += size
    return out


def _random_problem(seed, num_rows, num_groups, k, n, empty_groups=True, short=0):
    rng = np.random.default_rng(seed)
    lhs = rng.normal(size=(num_rows, k)).astype(np.float32)
    rhs = rng.normal(size=(num_groups, k, n)).astype(np.float32)
    weights = rng.random(num_groups)
    if empty_groups:
        weights[rng.random(num_groups) < 0.3] = 0.0
    weights[0] += 1e-3
    sizes = np.floor(weights / weights.sum() * (num_rows - short)).astype(np.int32)
    sizes[np.argmax(sizes)] += (num_rows - short) - sizes.sum()
    return lhs, rhs, sizes


@pytest.mark.parametrize("num_rows,num_groups,k,n,tile_rows,short", [
    (100, 7, 12, 9, 16, 0),     # rows not a multiple of the tile, empty groups
    (256, 3, 8, 5, 128, 0),
    (64, 16, 4, 6, 8, 10),      # trailing rows past sum(group_sizes) must come out zero
    (33, 1, 5, 3, 32, 0),
])
def test_gmm_matches_numpy_and_ragged_dot(num_rows, num_groups, k, n, tile_rows, short):
    lhs, rhs, sizes = _random_problem(num_rows, num_rows, num_groups, k, n, short=short)
    expected = _numpy_gmm(lhs, rhs, sizes)
    out = gm.gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tile_rows=tile_rows)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    ragged = gm.gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), backend="ragged_dot")
    np.testing.assert_allclose(np.asarray(ragged), expected, rtol=1e-5, atol=1e-5)


def test_gmm_gradients_match_ragged_dot():
    lhs, rhs, sizes = _random_problem(1, 90, 5, 6, 7)
    cotangent = np.random.default_rng(2).normal(size=(90, 7)).astype(np.float32)

    def loss(backend):
        return lambda a, b: jnp.sum(gm.gmm(a, b, jnp.asarray(sizes), backend=backend, tile_rows=16) * cotangent)

    grads_scan = jax.grad(loss("scan"), argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs))
    grads_ref = jax.grad(loss("ragged_dot"), argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs))
    for got, want in zip(grads_scan, grads_ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # tgmm is the rhs gradient.
    np.testing.assert_allclose(
        np.asarray(gm.tgmm(jnp.asarray(lhs), jnp.asarray(cotangent), jnp.asarray(sizes), tile_rows=16)),
        np.asarray(grads_ref[1]), rtol=1e-5, atol=1e-5)


def test_schedule_bound_and_coverage():
    sizes = jnp.array([0, 5, 0, 27, 1, 31], jnp.int32)
    tiles, groups, valid, starts, ends = gm.tile_schedule(sizes, 64, 16)
    assert tiles.shape[0] == 4 + 6 - 1
    covered = np.zeros(64, int)
    for t, g, ok in zip(np.asarray(tiles), np.asarray(groups), np.asarray(valid)):
        if ok:
            rows = np.arange(t * 16, t * 16 + 16)
            covered[rows[(rows >= starts[g]) & (rows < ends[g])]] += 1
    assert (covered == 1).all()  # every row visited by exactly its own group once


def test_scan_backend_never_builds_a_groups_by_rows_buffer():
    # M=4096 rows, K=512, G=8: ragged_dot on CPU materialises [G, M, K] (64 MiB); the scan must not.
    shapes = (jax.ShapeDtypeStruct((4096, 512), jnp.float32), jax.ShapeDtypeStruct((8, 512, 256), jnp.float32),
              jax.ShapeDtypeStruct((8,), jnp.int32))
    compiled = jax.jit(lambda a, b, s: gm.gmm(a, b, s, tile_rows=128)).lower(*shapes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * 4096 * 512 * 4 / 4, temp


def test_gmm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        gm.gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 2)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown backend"):
        gm.gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)), jnp.zeros((2,), jnp.int32), backend="magic")

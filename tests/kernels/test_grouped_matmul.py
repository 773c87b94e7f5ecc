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


def _blocks_moe_problem(seed, aligned_sizes, tile, num_tokens=9, dim=5, width=6):
    """A block-aligned layout with `aligned_sizes` rows per group (multiples of `tile`), some of them padding
    (token N, weight 0), and 1-2 tiles of spare rows at the end as the static layout has."""
    rng = np.random.default_rng(seed)
    num_groups = len(aligned_sizes)
    num_rows = int(sum(aligned_sizes)) + tile * int(rng.integers(1, 3))
    row_token = np.full(num_rows, num_tokens, np.int32)
    row_weight = np.zeros(num_rows, np.float32)
    start = 0
    for size in aligned_sizes:
        used = int(rng.integers(max(size - tile + 1, 0), size + 1)) if size else 0
        row_token[start:start + used] = rng.integers(0, num_tokens, used)
        row_weight[start:start + used] = rng.random(used)
        start += size
    tokens = rng.normal(size=(num_tokens, dim)).astype(np.float32)
    up = rng.normal(size=(num_groups, dim, width)).astype(np.float32)
    down = rng.normal(size=(num_groups, width, dim)).astype(np.float32)
    return (jnp.asarray(tokens), jnp.asarray(row_token), jnp.asarray(row_weight), jnp.asarray(up), jnp.asarray(down),
            jnp.asarray(np.asarray(aligned_sizes, np.int32)))


def _blocks_moe_reference(tokens, row_token, row_weight, up, down, group_sizes):
    """Row by row: out[token(r)] += weight(r) * relu2(tokens[token(r)] @ up[g(r)]) @ down[g(r)]."""
    group_of_row = jnp.repeat(jnp.arange(up.shape[0]), group_sizes, total_repeat_length=row_token.shape[0])
    rows = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]))])[row_token]
    hidden = jnp.einsum("rd,rdf->rf", rows, up[group_of_row])
    y = jnp.einsum("rf,rfd->rd", jnp.square(jnp.maximum(hidden, 0)), down[group_of_row]) * row_weight[:, None]
    return jnp.zeros((tokens.shape[0] + 1, tokens.shape[1])).at[row_token].add(y)[:-1]


@pytest.mark.parametrize("visit_tiles", [1, 3])
@pytest.mark.parametrize("aligned_sizes", [[0, 4, 0, 28, 8, 12], [40, 0, 0], [4, 4, 4, 4, 4]])
def test_blocks_moe_visits_match_row_by_row_reference(visit_tiles, aligned_sizes):
    # tile 4: groups longer than a visit are cut into several (28 rows = 7 tiles = 3 + 3 + 1 visits at 3),
    # visits of every size 1..visit_tiles occur, empty groups have none, and padding visits close the scan.
    from nemotron_jax.model.activations import relu2

    args = _blocks_moe_problem(0, aligned_sizes, tile=4)
    first_row, group, tiles = gm.visit_schedule(args[5], args[1].shape[0], 4, visit_tiles)
    visits = [(int(r), int(g), int(t)) for r, g, t in zip(first_row, group, tiles) if t > 0]
    covered = sorted(row for r, g, t in visits for row in range(r, r + 4 * t))
    assert covered == list(range(sum(aligned_sizes)))  # every real row in exactly one visit
    assert all(t <= visit_tiles for _, _, t in visits)

    def run(fn):
        def objective(tokens, row_weight, up, down):
            out = fn(tokens, args[1], row_weight, up, down, args[5])
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
        return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True))(
            args[0], args[2], args[3], args[4])

    (_, out), grads = run(lambda *a: gm.blocks_moe(*a, tile_rows=4, activation=relu2, visit_tiles=visit_tiles))
    (_, out_ref), grads_ref = run(_blocks_moe_reference)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("tokens", "row_weight", "up", "down"), grads, grads_ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4, err_msg=name)

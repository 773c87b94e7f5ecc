"""Every grouped-matmul backend against a float64 NumPy per-group loop: gmm forward, its gradients w.r.t.
lhs and rhs, and tgmm, with and without a (traced) `group_offset`, in float32 and bfloat16.

The Pallas kernels run in interpret mode on CPU: "pallas_tpu" (our Mosaic kernel), "pallas_gpu" (our
Triton kernel) and "megablox"; tokamax runs its "xla" implementation. Shapes are fixed per (backend, dtype)
and the group sizes and offset are traced, so each backend compiles once and the edge cases and the
hypothesis draws reuse it (interpret mode compiles slowly)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemotron_jax.kernels import grouped_matmul as gm

BACKENDS = ["scan", "blocks", "ragged_dot", "tokamax", "pallas_tpu", "pallas_gpu", "megablox"]
M, K, N, G, L, TILE = 40, 16, 24, 6, 3, 16  # rows, contraction, columns, groups, local groups, row tile
# Relative error bound (in the Frobenius norm) per dtype: float32 accumulation of K = 16 products, and
# bfloat16 inputs/outputs (8 mantissa bits: 2^-8 per rounding, a few roundings deep).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

EDGE_SIZES = {
    "empty_groups_and_partial_tiles": [7, 0, 20, 3, 0, 10],
    "all_rows_in_one_group": [0, 0, M, 0, 0, 0],
    "one_row": [0, 0, 0, 1, 0, 0],
    "rows_past_the_groups": [5, 0, 0, 9, 0, 2],
    "no_rows": [0] * G,
}


def _reference(lhs, rhs_all, cotangent, sizes, offset, num_local):
    """float64 (gmm out [M, N], d lhs [M, K], d rhs [L, K, N]) for local groups offset .. offset + L - 1."""
    lhs, rhs_all, cotangent = (np.asarray(a, np.float64) for a in (lhs, rhs_all, cotangent))
    out, grad_lhs = np.zeros((M, N)), np.zeros((M, K))
    grad_rhs = np.zeros((num_local, K, N))
    ends = np.cumsum(sizes)
    for g in range(offset, offset + num_local):
        rows = slice(ends[g] - sizes[g], ends[g])
        w = rhs_all[g - offset]
        out[rows] = lhs[rows] @ w
        grad_lhs[rows] = cotangent[rows] @ w.T
        grad_rhs[g - offset] = lhs[rows].T @ cotangent[rows]
    return out, grad_lhs, grad_rhs


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


@functools.cache
def _compiled(backend, dtype, local):
    """jit((lhs, rhs, cotangent, sizes, offset) -> (out, d lhs, d rhs, tgmm)) for one backend."""

    def run(lhs, rhs, cotangent, sizes, offset):
        offset = offset if local else None
        f = lambda a, b: gm.gmm(a, b, sizes, group_offset=offset, backend=backend, tile_rows=TILE,  # noqa: E731
                                preferred_element_type=dtype)
        out, pullback = jax.vjp(f, lhs, rhs)
        grad_lhs, grad_rhs = pullback(cotangent)
        weight_grad = gm.tgmm(lhs, cotangent, sizes, group_offset=offset, num_local_groups=rhs.shape[0],
                              backend=backend, tile_rows=TILE, preferred_element_type=jnp.float32)
        return out, grad_lhs, grad_rhs, weight_grad

    return jax.jit(run)


def _problem(seed, dtype, local):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
    rhs = jnp.asarray(rng.normal(size=(L if local else G, K, N)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(M, N)), dtype)
    return lhs, rhs, cotangent


def _check(backend, dtype, local, sizes, offset, seed=0):
    lhs, rhs, cotangent = _problem(seed, dtype, local)
    got = _compiled(backend, dtype, local)(lhs, rhs, cotangent, jnp.asarray(sizes, jnp.int32),
                                           jnp.asarray(offset, jnp.int32))
    want = _reference(lhs, rhs, cotangent, np.asarray(sizes), offset if local else 0, rhs.shape[0])
    tol = TOLERANCE[dtype]
    for name, value, expected in zip(("out", "d_lhs", "d_rhs", "tgmm"), got, want + (want[2],)):
        assert value.shape == expected.shape, (name, value.shape)
        assert np.isfinite(np.asarray(value, np.float32)).all(), name
        if not np.any(expected):
            assert not np.any(np.asarray(value, np.float32)), f"{backend} {name}: expected zeros"
        else:
            error = _relative_error(value, expected)
            assert error < tol, f"{backend} {dtype} {name} sizes={sizes} offset={offset}: rel. error {error:.2e}"
    assert got[0].dtype == jnp.dtype(dtype) and got[1].dtype == lhs.dtype and got[2].dtype == rhs.dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_reference_on_edge_cases(backend, dtype):
    for case, sizes in EDGE_SIZES.items():
        if dtype == "float32":  # bfloat16 without an offset: tests/model/test_moe_backends.py (CI time)
            _check(backend, dtype, False, sizes, 0)
        # Local groups 2..4 of 6 (expert-sharded weights): rows of groups 0, 1 and 5 must come out zero.
        _check(backend, dtype, True, sizes, 2)
    _check(backend, dtype, True, EDGE_SIZES["empty_groups_and_partial_tiles"], 0)  # offset 0, L < G
    _check(backend, dtype, True, EDGE_SIZES["empty_groups_and_partial_tiles"], G - L)  # the last groups


@st.composite
def _group_sizes(draw):
    """G sizes summing to at most M, often with empty groups, sometimes all rows in one group."""
    sizes = draw(st.lists(st.integers(0, M), min_size=G, max_size=G))
    if draw(st.booleans()):
        sizes = [s if draw(st.booleans()) else 0 for s in sizes]
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total > M:
        sizes = np.floor(sizes * (M / total)).astype(np.int64)
    return sizes.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=_group_sizes(), offset=st.integers(0, G - L), local=st.booleans(), seed=st.integers(0, 3))
def test_random_group_sizes_property(backend, sizes, offset, local, seed):
    _check(backend, "float32", local, sizes, offset, seed=seed)


def test_explicit_pallas_lowerings_are_backends():
    assert {"pallas_tpu", "pallas_gpu"} <= set(gm.BACKENDS)
    assert gm.resolve_backend("pallas_gpu") == "pallas_gpu"

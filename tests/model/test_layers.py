"""Layer functions against independent NumPy loops: SSD scan, causal conv, MoE routing and dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.model import mamba2, moe
from nemotron_jax.model.segments import contiguous_run_ids


def _numpy_ssm(x, dt, A, B, C, run_ids, initial_state=None):
    """Sequential float64 recurrence h_t = exp(dt A) h_{t-1} + dt x B^T (reset at run starts), y = h C."""
    batch, length, heads, head_dim = x.shape
    groups, state = B.shape[2:]
    per_group = heads // groups
    y = np.zeros(x.shape)
    finals = np.zeros((batch, heads, head_dim, state))
    for b in range(batch):
        h = np.zeros((heads, head_dim, state)) if initial_state is None else initial_state[b].astype(np.float64)
        for t in range(length):
            if t > 0 and run_ids[b, t] != run_ids[b, t - 1]:
                h = np.zeros_like(h)
            for head in range(heads):
                g = head // per_group
                h[head] = np.exp(dt[b, t, head] * A[head]) * h[head] + dt[b, t, head] * np.outer(x[b, t, head], B[b, t, g])
                y[b, t, head] = h[head] @ C[b, t, g]
        finals[b] = h
    return y, finals


def _random_ssm_inputs(seed, batch, length, heads, head_dim, groups, state):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    dt = np.log1p(np.exp(rng.normal(size=(batch, length, heads)))).astype(np.float32)
    A = -np.exp(rng.normal(size=heads)).astype(np.float32)
    B = rng.normal(size=(batch, length, groups, state)).astype(np.float32)
    C = rng.normal(size=(batch, length, groups, state)).astype(np.float32)
    return x, dt, A, B, C


@pytest.mark.parametrize("length,chunk", [(37, 8), (32, 8), (5, 16)])
def test_ssd_chunked_scan_matches_sequential_recurrence_with_resets(length, chunk):
    x, dt, A, B, C = _random_ssm_inputs(length, 2, length, 4, 3, 2, 5)
    rng = np.random.default_rng(1)
    segment_ids = np.sort(rng.integers(0, 4, (2, length)), axis=1)  # runs of random lengths, some at chunk edges
    if chunk < length:
        segment_ids[:, chunk] = 9  # a one-token run starting exactly at a chunk boundary
    run_ids = np.asarray(contiguous_run_ids(jnp.asarray(segment_ids), segment_ids.shape))
    initial = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    want_y, want_final = _numpy_ssm(x, dt, A, B, C, run_ids, initial)
    got_y, got_final = mamba2.ssd_chunked_scan(*map(jnp.asarray, (x, dt, A, B, C, run_ids)), chunk, jnp.asarray(initial))
    np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_final), want_final, rtol=2e-4, atol=2e-4)


def test_recurrent_step_continues_the_chunked_scan():
    x, dt, A, B, C = _random_ssm_inputs(3, 2, 12, 4, 3, 2, 5)
    run_ids = jnp.zeros((2, 12), jnp.int32)
    full_y, _ = mamba2.ssd_chunked_scan(*map(jnp.asarray, (x, dt, A, B, C)), run_ids, 4)
    _, state = mamba2.ssd_chunked_scan(*map(jnp.asarray, (x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11])),
                                       run_ids[:, :11], 4)
    step_y, _ = mamba2.ssd_recurrent_step(state, x[:, 11], dt[:, 11], jnp.asarray(A), B[:, 11], C[:, 11])
    np.testing.assert_allclose(np.asarray(step_y), np.asarray(full_y[:, 11]), rtol=1e-5, atol=1e-5)


def test_causal_conv_masks_other_runs_and_keeps_tail():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, 10, 3)).astype(np.float32)
    kernel = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    segment_ids = np.array([[1] * 4 + [2] * 6, [1] * 9 + [3]])
    run_ids = np.asarray(contiguous_run_ids(jnp.asarray(segment_ids), (2, 10)))
    want = np.zeros_like(inputs, dtype=np.float64)
    for b in range(2):
        for t in range(10):
            want[b, t] = bias
            for tap in range(4):
                source = t - (3 - tap)
                if source >= 0 and run_ids[b, source] == run_ids[b, t]:
                    want[b, t] += kernel[tap] * inputs[b, source]
    got, tail = mamba2.causal_depthwise_conv(jnp.asarray(inputs), jnp.asarray(kernel), jnp.asarray(bias),
                                             jnp.asarray(run_ids))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tail[0]), inputs[0, 7:])  # same run as the last token
    np.testing.assert_allclose(np.asarray(tail[1]), np.concatenate([np.zeros((2, 3)), inputs[1, 9:]]))


def _numpy_route(hidden, kernel, bias, top_k, n_group, topk_group, norm, scale):
    scores = 1 / (1 + np.exp(-(hidden.astype(np.float64) @ kernel)))
    choice = scores + bias
    experts = kernel.shape[1]
    ids = []
    for row in choice:
        groups = row.reshape(n_group, experts // n_group)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1) if n_group > 1 else np.zeros(1)
        allowed = np.zeros(experts, bool)
        for g in np.argsort(-group_score)[:topk_group]:
            allowed[g * (experts // n_group):(g + 1) * (experts // n_group)] = True
        ids.append(np.argsort(-np.where(allowed, row, -np.inf))[:top_k])
    ids = np.array(ids)
    weights = np.take_along_axis(scores, ids, 1)
    if norm:
        weights = weights / (weights.sum(1, keepdims=True) + 1e-20)
    return ids, weights * scale


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (4, 2, True), (3, 1, False)])
def test_route_matches_numpy(n_group, topk_group, norm):
    rng = np.random.default_rng(n_group)
    hidden = rng.normal(size=(50, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 12)).astype(np.float32)
    bias = 0.1 * rng.normal(size=12).astype(np.float32)
    top_k = 3 if topk_group * 12 // n_group >= 3 else 2
    want_ids, want_weights = _numpy_route(hidden, kernel, bias, top_k, n_group, topk_group, norm, 2.5)
    got = moe.route(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(bias), top_k=top_k, n_group=n_group,
                    topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    order = np.argsort(np.asarray(got.expert_ids), axis=1)  # compare as sets per token
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.expert_ids), order, 1), np.sort(want_ids, 1))
    want_sorted = np.take_along_axis(want_weights, np.argsort(want_ids, 1), 1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.expert_weights), order, 1), want_sorted, rtol=1e-5)


@pytest.mark.parametrize("backend", ["scan", "ragged_dot"])
def test_dispatch_matches_dense_loop_values_and_gradients(backend):
    rng = np.random.default_rng(0)
    tokens, dim, hidden_units, experts, top_k = 37, 8, 6, 5, 2
    x = jnp.asarray(rng.normal(size=(tokens, dim)).astype(np.float32))
    ids = jnp.asarray(np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32))
    weights = jnp.asarray(rng.random((tokens, top_k)).astype(np.float32))
    up = jnp.asarray(rng.normal(size=(experts, dim, hidden_units)).astype(np.float32))
    down = jnp.asarray(rng.normal(size=(experts, hidden_units, dim)).astype(np.float32))

    def dense(x, up, down):  # every token through every expert, then mask: the obvious (slow) form
        out = jnp.zeros((tokens, dim))
        for k in range(top_k):
            for e in range(experts):
                y = jnp.square(jax.nn.relu(x @ up[e])) @ down[e]
                out = out + jnp.where((ids[:, k] == e)[:, None], weights[:, k:k + 1] * y, 0.0)
        return out

    def fast(x, up, down):
        return moe.dispatch_experts(x, ids, weights, up, down, backend=backend, tile_rows=8)

    np.testing.assert_allclose(np.asarray(fast(x, up, down)), np.asarray(dense(x, up, down)), rtol=1e-5, atol=1e-4)
    probe = jnp.asarray(rng.normal(size=(tokens, dim)).astype(np.float32))
    grads_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * probe), argnums=(0, 1, 2))(x, up, down)
    grads_dense = jax.grad(lambda *a: jnp.sum(dense(*a) * probe), argnums=(0, 1, 2))(x, up, down)
    for got, want in zip(grads_fast, grads_dense):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_contiguous_run_ids():
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 3, 3]])
    np.testing.assert_array_equal(np.asarray(contiguous_run_ids(segment_ids, (2, 7))),
                                  [[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 2, 2]])
    with pytest.raises(ValueError, match="segment_ids has shape"):
        contiguous_run_ids(segment_ids, (2, 8))

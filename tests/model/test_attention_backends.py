"""Attention backends (blockwise, splash, cudnn) against the einsum reference, and the SSD scan's remat."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import nemotron_jax as nj
from nemotron_jax.model import attention_backends as ab
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.mamba2 import ssd_chunked_scan
from nemotron_jax.model.nemotron_h import NemotronH
from nemotron_jax.parallel.context import context_parallel

HEADS, REPEATS, HEAD_DIM = 2, 2, 8  # GQA: 2 KV heads, 2 query heads each


def _runs(lengths_per_row):
    """Segment lengths per row -> contiguous run ids [B, T] (runs numbered from 0)."""
    return np.stack([np.repeat(np.arange(len(lengths)), lengths) for lengths in lengths_per_row]).astype(np.int32)


# T = 45: not a multiple of the 16 / 8 tiles; row 0 has runs crossing the tile borders at 16 and 32 and 1-token
# runs (one right after a border, two in a row); row 1 ends with a trailing run (padding).
RUNS = _runs([[1, 20, 1, 1, 13, 9], [30, 14, 1]])
BLOCKS = dict(block_q=16, block_kv=8)


def _inputs(runs, dtype, seed=0):
    batch, length = runs.shape
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, HEADS, REPEATS, HEAD_DIM))
    k = rng.normal(size=(batch, length, HEADS, HEAD_DIM))
    v = rng.normal(size=(batch, length, HEADS, HEAD_DIM))
    weights = rng.normal(size=q.shape)  # a loss that weighs every output differently
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(weights, jnp.float32)


@functools.partial(jax.jit, static_argnames=("backend", "block_q", "block_kv"))
def _value_and_grads(q, k, v, runs, weights, backend, block_q=16, block_kv=8):
    def loss(q, k, v):
        out = ab.attend(q, k, v, runs, runs, backend=backend, block_q=block_q, block_kv=block_kv)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_close(actual, expected, tolerance, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= tolerance * scale, f"{what}: max |error| {err:.2e} > {tolerance} * max |reference| ({scale:.2e})"


def _assert_match(runs, dtype, backend, tolerance, **blocks):
    (q, k, v), weights = _inputs(runs, dtype)
    runs = jnp.asarray(runs)
    out, grads = _value_and_grads(q, k, v, runs, weights, backend, **blocks)
    ref_out, ref_grads = _value_and_grads(q, k, v, runs, weights, "xla")
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close(out, ref_out, tolerance, f"{backend} output")
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert grad.dtype == dtype
        _assert_close(grad, ref, tolerance, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["blockwise", "splash", "cudnn"])
def test_backend_equals_xla_on_packed_rows(backend):
    _assert_match(RUNS, jnp.float32, backend, 1e-5, **BLOCKS)


@pytest.mark.parametrize("backend", ["blockwise", "splash"])
def test_backend_equals_xla_in_bfloat16(backend):
    # Inputs are rounded to bfloat16 alike; the backends round probabilities at different points.
    _assert_match(RUNS, jnp.bfloat16, backend, 3e-2, **BLOCKS)


def test_cudnn_wrapper_on_unpacked_rows():
    """Rows of one run each take `jax.nn.dot_product_attention` (implementation "xla" off GPU)."""
    _assert_match(_runs([[45], [45]]), jnp.float32, "cudnn", 1e-5, **BLOCKS)


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(data=st.data(), length=st.just(40), blocks=st.sampled_from([(8, 8), (16, 4)]))
def test_blockwise_property(data, length, blocks):
    """Random segment layouts (1-token runs, runs across tiles, one run per row) and tilings."""
    rows = []
    for _ in range(2):
        cuts = data.draw(st.lists(st.integers(1, length - 1), max_size=6, unique=True))
        edges = [0, *sorted(cuts), length]
        rows.append(np.diff(edges))
    _assert_match(_runs(rows), jnp.float32, "blockwise", 1e-5, block_q=blocks[0], block_kv=blocks[1])


def test_tile_visits_skip_masked_tiles():
    """Two runs of 16 in a row of 32 with 8-token tiles: only the causal tiles of the diagonal blocks run."""
    runs = jnp.asarray(_runs([[16, 16]]))
    pos = jnp.arange(32, dtype=jnp.int32)
    real = jnp.ones(32, bool)
    tiles = functools.partial(ab._tiles, tile=8)
    visits = ab._tile_visits(tiles(pos, 0), tiles(pos, 0), tiles(runs, 1), tiles(runs, 1), tiles(real, 0),
                             tiles(real, 0))
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(visits), expected)


def test_blockwise_with_explicit_positions():
    """The context-parallel form: a slice of the queries (positions 24..44) against every key."""
    (q, k, v), _ = _inputs(RUNS, jnp.float32, seed=1)
    runs = jnp.asarray(RUNS)
    q_pos, kv_pos = jnp.arange(24, 45), jnp.arange(45)
    args = (q[:, 24:], k, v, runs[:, 24:], runs)
    out = jax.jit(functools.partial(ab.attend, backend="blockwise", **BLOCKS))(*args, q_positions=q_pos,
                                                                             kv_positions=kv_pos)
    ref = jax.jit(functools.partial(ab.attend, backend="xla"))(*args, q_positions=q_pos, kv_positions=kv_pos)
    _assert_close(out, ref, 1e-5, "blockwise with positions")
    with pytest.raises(ValueError, match="splash"):
        ab.attend(*args, backend="splash", q_positions=q_pos, kv_positions=kv_pos)


def test_blockwise_memory_is_linear():
    """Compiled forward+backward temporaries at T = 4096 are far below one [H, T, T] float32 score tensor."""
    length = 4096
    q = jax.ShapeDtypeStruct((1, length, HEADS, REPEATS, HEAD_DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
    runs = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, runs):
        return jnp.sum(ab.blockwise_attention(q, k, v, runs, runs, block_q=512, block_kv=512))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, runs).compile()
    scores = HEADS * REPEATS * length * length * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * scores


def test_blockwise_in_a_layer_scan_keeps_no_tile_residuals():
    """Inside a `lax.scan` over layers (as `scan_layers` runs it), forward+backward temporaries stay far below
    one [H, T, T] float32 score tensor (JAX's scan partial evaluation used to stack every tile's mask and
    probabilities, O(T^2))."""
    length = 4096
    q = jax.ShapeDtypeStruct((1, length, HEADS, REPEATS, HEAD_DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
    runs = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, runs, layer_scales):
        def layer(x, scale):
            return ab.blockwise_attention(x * scale, k, v, runs, runs, block_q=512, block_kv=512), None
        return jnp.sum(jax.lax.scan(layer, q, layer_scales)[0])

    scales = jax.ShapeDtypeStruct((3,), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, runs, scales).compile()
    scores = HEADS * REPEATS * length * length * 4  # 256 MiB; the stacked tiles took 400 MiB, now 26 MiB
    assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * scores


def test_resolve_backend():
    assert ab.resolve_backend("auto", 2048, platform="cpu") == "xla"
    assert ab.resolve_backend("auto", 2049, platform="cpu") == "blockwise"
    assert ab.resolve_backend("auto", 64, platform="tpu") == "splash"
    assert ab.resolve_backend("auto", 64, jnp.bfloat16, platform="gpu") == "cudnn"
    assert ab.resolve_backend("auto", 64, jnp.float32, platform="gpu") == "xla"
    assert ab.resolve_backend("splash", 64, platform="cpu") == "splash"
    assert ab.BACKENDS == nj.model.config.ATTENTION_BACKENDS
    with pytest.raises(ValueError, match="flash"):
        ab.resolve_backend("flash", 64)
    with pytest.raises(ValueError, match="ModelConfig.attention_backend"):
        ModelConfig.preset("tiny", attention_backend="flash")


# ------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def tiny():
    # The tiny preset's Mamba and attention layers only (its MoE and MLP layers are the slowest to compile and
    # take no part in attention).
    cfg = ModelConfig.preset("tiny", layer_pattern="M*", attention_backend="xla")
    params = nj.init_params(cfg, jax.random.key(5))
    rng = np.random.default_rng(5)
    segment_ids = np.repeat(np.array([[1, 2, 3, 4, 0]]), [13, 1, 20, 6, 8], axis=1)  # 48 tokens, padding last
    segment_ids = np.concatenate([segment_ids, np.ones_like(segment_ids)]).astype(np.int32)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, segment_ids.shape), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(*segment_ids.shape, cfg.vocab_size)), jnp.float32)

    def loss_and_grads(cfg, apply=None):
        def loss(p, tok, seg):
            logits = (apply or NemotronH(cfg).apply)({"params": p}, tok, seg)
            return jnp.sum(logits * weights), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, logits), grads = loss_and_grads(cfg)(params, tokens, jnp.asarray(segment_ids))
    return dict(cfg=cfg, params=params, tokens=tokens, segment_ids=jnp.asarray(segment_ids), logits=logits,
                grads=grads, loss_and_grads=loss_and_grads)


def _assert_model_match(tiny, logits, grads, what):
    _assert_close(logits, tiny["logits"], 1e-5, f"{what} logits")
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    expected = jax.tree.leaves(tiny["grads"])
    assert len(flat) == len(expected)
    for (path, grad), ref in zip(flat, expected):
        _assert_close(grad, ref, 1e-5, f"{what} grad {jax.tree_util.keystr(path)}")


def test_model_blockwise_equals_xla(tiny):
    cfg = tiny["cfg"].replace(attention_backend="blockwise", attention_block_q=16, attention_block_kv=8)
    (_, logits), grads = tiny["loss_and_grads"](cfg)(tiny["params"], tiny["tokens"], tiny["segment_ids"])
    _assert_model_match(tiny, logits, grads, "blockwise")


def test_model_context_parallel_blockwise_equals_xla(tiny):
    """Under context parallelism (4 devices of 12 tokens) blockwise takes the global positions."""
    cfg = tiny["cfg"].replace(attention_backend="blockwise", attention_block_q=8, attention_block_kv=16)
    mesh = jax.make_mesh((4,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    tokens, segment_ids = (jax.device_put(a, NamedSharding(mesh, P(None, "context")))
                           for a in (tiny["tokens"], tiny["segment_ids"]))
    apply = context_parallel(lambda variables, tok, seg: NemotronH(cfg).apply(variables, tok, seg), mesh)
    (_, logits), grads = tiny["loss_and_grads"](cfg, apply)(tiny["params"], tokens, segment_ids)
    _assert_model_match(tiny, logits, grads, "context-parallel blockwise")


# ----------------------------------------------------------------------------------------------- SSD
def test_ssd_remat_equals_no_remat():
    batch, length, heads, head_dim, groups, state = 2, 40, 4, 8, 2, 8
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.01, 0.2, size=(batch, length, heads)), jnp.float32)
    A = -jnp.arange(1.0, heads + 1)
    B = jnp.asarray(rng.normal(size=(batch, length, groups, state)), jnp.float32)
    C = jnp.asarray(rng.normal(size=(batch, length, groups, state)), jnp.float32)
    runs = jnp.asarray(_runs([[7, 1, 20, 12], [40]]))
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(remat, group_tokens=4096):
        def loss(x, dt, A, B, C):
            y, final = ssd_chunked_scan(x, dt, A, B, C, runs, 16, remat=remat, group_tokens=group_tokens)
            return jnp.sum(y * weights) + jnp.sum(final), (y, final)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, dt, A, B, C)

    (_, (y_ref, final_ref)), grads_ref = run(False)
    (_, (y, final)), grads = run(True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    for grad, ref in zip(grads, grads_ref):
        _assert_close(grad, ref, 1e-6, "SSD gradient with remat")
    # Groups of 2 chunks: 3 chunks of 16 make a second, padded group.
    (_, (y, final)), grads = run(True, group_tokens=32)
    _assert_close(y, y_ref, 1e-6, "SSD output in chunk groups")
    _assert_close(final, final_ref, 1e-6, "SSD final state in chunk groups")
    for grad, ref in zip(grads, grads_ref):
        _assert_close(grad, ref, 1e-6, "SSD gradient in chunk groups")

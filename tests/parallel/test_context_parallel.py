"""Context parallelism: one row's tokens split over the `context` mesh axis give the single-device logits and
gradients, on packed rows whose segments cross device borders (8 fake CPU devices, see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import nemotron_jax as nj
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.nemotron_h import NemotronH
from nemotron_jax.model.segments import contiguous_run_ids
from nemotron_jax.parallel.context import context_parallel, global_run_ids

LENGTH = 64  # 16 tokens per device at context=4 (one Mamba chunk of the tiny config), 32 at context=2

# Segment lengths per row. Row 0: segments crossing the borders at 16, 32 and 48, 1-token segments right
# before and after the border at 32 and inside a device. Row 1: runs that start exactly on the borders,
# a 1-token run at 47 that ends on a border, and segment id 1 coming back (a new run) across a border.
ROWS = [
    ([1, 2, 3, 4, 5, 6, 7, 8], [13, 18, 1, 1, 9, 1, 10, 11]),
    ([1, 2, 1, 3, 4, 5], [16, 16, 8, 7, 1, 16]),
]


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.fixture(scope="module")
def case():
    cfg = ModelConfig.preset("tiny")
    params = nj.init_params(cfg, jax.random.key(3))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "e_score_correction_bias" in jax.tree_util.keystr(path) else x, params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (len(ROWS), LENGTH)), jnp.int32)
    segment_ids = jnp.asarray(np.stack([np.repeat(ids, lengths) for ids, lengths in ROWS]), jnp.int32)
    assert segment_ids.shape == tokens.shape
    weights = jnp.asarray(rng.normal(size=(len(ROWS), LENGTH, cfg.vocab_size)), jnp.float32)

    def logits_fn(p, tok, seg):
        return NemotronH(cfg).apply({"params": p}, tok, seg)

    def loss_and_grads(apply):
        def loss(p, tok, seg):
            logits = apply(p, tok, seg)
            return jnp.sum(logits * weights), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, logits), grads = loss_and_grads(logits_fn)(params, tokens, segment_ids)
    return dict(params=params, tokens=tokens, segment_ids=segment_ids, logits_fn=logits_fn,
                loss_and_grads=loss_and_grads, logits=logits, grads=grads)


def _assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= 1e-5 * scale, f"{what}: max |error| {err:.2e} > 1e-5 * max |reference| ({scale:.2e})"


@pytest.mark.parametrize("shape,names", [((4,), ("context",)), ((2, 2), ("data", "context"))])
def test_logits_and_grads_equal_single_device(case, shape, names):
    mesh = _mesh(shape, names)
    batch_axis = "data" if "data" in names else None
    tokens, segment_ids = (jax.device_put(a, NamedSharding(mesh, P(batch_axis, "context")))
                           for a in (case["tokens"], case["segment_ids"]))
    apply = context_parallel(case["logits_fn"], mesh)
    (_, logits), grads = case["loss_and_grads"](apply)(case["params"], tokens, segment_ids)
    assert logits.sharding.spec[1] == "context", logits.sharding
    _assert_close(logits, case["logits"], f"logits on {dict(zip(names, shape))}")
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    expected = jax.tree.leaves(case["grads"])
    assert len(flat) == len(expected)
    for (path, grad), ref in zip(flat, expected):
        _assert_close(grad, ref, f"grad {jax.tree_util.keystr(path)} on {dict(zip(names, shape))}")


def test_global_run_ids_number_the_whole_row(case):
    mesh = _mesh((4,), ("context",))
    ids = context_parallel(lambda seg: global_run_ids(seg, seg.shape, "context"), mesh, token_argnums=(0,))
    got = jax.jit(ids)(case["segment_ids"])
    np.testing.assert_array_equal(got, contiguous_run_ids(case["segment_ids"], case["segment_ids"].shape))


def test_rejects_rows_that_do_not_split(case):
    mesh = _mesh((4,), ("context",))
    with pytest.raises(ValueError, match="argument 1 has shape \\(2, 62\\).*4 devices of mesh axis 'context'"):
        context_parallel(case["logits_fn"], mesh)(case["params"], case["tokens"][:, :62],
                                                  case["segment_ids"][:, :62])
    with pytest.raises(ValueError, match="needs an axis named 'context'"):
        context_parallel(case["logits_fn"], _mesh((4,), ("data",)))


def test_scanned_layers_with_an_optional_attention_equal_single_device(case):
    """Scan over layers whose unit has an optional attention position ("M*E" x 5, attention in repeats 1 and
    3: the plan of Nano's layers, in small) under context=4: the conditional attention gathers K/V across
    the axis like the unrolled one."""
    cfg = ModelConfig.preset("tiny", layer_pattern="MEM*EMEM*EME", scan_layers=True)
    params = nj.init_params(cfg, jax.random.key(4))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(len(ROWS), LENGTH, cfg.vocab_size)), jnp.float32)

    def logits_fn(p, tok, seg):
        return NemotronH(cfg).apply({"params": p}, tok, seg)

    def loss_and_grads(apply):
        return jax.jit(jax.value_and_grad(lambda p, tok, seg: jnp.sum(apply(p, tok, seg) * weights)))

    expected_loss, expected = loss_and_grads(logits_fn)(params, case["tokens"], case["segment_ids"])
    mesh = _mesh((4,), ("context",))
    tokens, segment_ids = (jax.device_put(a, NamedSharding(mesh, P(None, "context")))
                           for a in (case["tokens"], case["segment_ids"]))
    loss, grads = loss_and_grads(context_parallel(logits_fn, mesh))(params, tokens, segment_ids)
    _assert_close(loss, expected_loss, "loss, scanned with an optional attention, context=4")
    for (path, grad), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(expected)):
        _assert_close(grad, ref, f"grad {jax.tree_util.keystr(path)}, scanned, context=4")

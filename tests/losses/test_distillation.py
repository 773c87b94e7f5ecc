"""Logit-level distillation KL (forward / reverse / mixed, full vocabulary and teacher top-k) against float64
NumPy references: values and analytic gradients, for logits inputs and chunked (hidden, lm_head) inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import LMHeadInputs, TopKLogits, distillation_kl, distillation_loss

FORWARD_WEIGHT = {"forward": 1.0, "reverse": 0.0, "mixed": 0.3}


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_kl(student_logits, teacher_logits, kind, top_k=None):
    """Float64 per-position KL and its gradient w.r.t. the student's logits [..., V]."""
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    support = np.ones(s.shape, bool)
    if top_k is not None:
        order = np.argsort(-t, axis=-1)[..., :top_k]
        support = np.zeros(s.shape, bool)
        np.put_along_axis(support, order, True, axis=-1)
    # Renormalise over the support (the whole vocabulary when top_k is None).
    s_in = np.where(support, s, -np.inf)
    t_in = np.where(support, t, -np.inf)
    log_ps, log_pt = log_softmax(s_in), log_softmax(t_in)
    ps, pt = np.exp(log_ps), np.exp(log_pt)
    with np.errstate(invalid="ignore"):  # -inf - -inf outside the support, replaced by 0
        gap = np.where(support, log_ps - log_pt, 0.0)
    forward = np.sum(np.where(support, pt * -gap, 0.0), axis=-1)
    reverse = np.sum(np.where(support, ps * gap, 0.0), axis=-1)
    w = FORWARD_WEIGHT[kind]
    kl = w * forward + (1 - w) * reverse
    grad = w * (ps - pt) + (1 - w) * ps * (gap - reverse[..., None])
    return kl, np.where(support, grad, 0.0)


def random_models(seed, shape=(2, 5), student_dim=6, teacher_dim=4, vocab=23):
    rng = np.random.default_rng(seed)
    student_hidden = rng.normal(size=shape + (student_dim,)).astype(np.float32)
    student_head = (2 * rng.normal(size=(student_dim, vocab)) / np.sqrt(student_dim)).astype(np.float32)
    teacher_hidden = rng.normal(size=shape + (teacher_dim,)).astype(np.float32)
    teacher_head = (2 * rng.normal(size=(teacher_dim, vocab)) / np.sqrt(teacher_dim)).astype(np.float32)
    weights = rng.normal(size=shape)
    return student_hidden, student_head, teacher_hidden, teacher_head, weights


def kwargs_for(kind):
    return dict(kind=kind, mixed_forward_weight=FORWARD_WEIGHT[kind] if kind == "mixed" else None)


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("kind", ["forward", "reverse", "mixed"])
def test_logits_inputs(kind, top_k):
    sh, sw, th, tw, weights = random_models(1)
    student_logits, teacher_logits = sh @ sw, th @ tw

    @jax.jit
    def run(s, t):
        objective = lambda x: jnp.sum(weights * distillation_kl(x, t, top_k=top_k, **kwargs_for(kind)))  # noqa
        return distillation_kl(s, t, top_k=top_k, **kwargs_for(kind)), jax.grad(objective)(s)

    kl, grad = run(jnp.asarray(student_logits), jnp.asarray(teacher_logits))
    expected_kl, expected_grad = reference_kl(student_logits, teacher_logits, kind, top_k)
    np.testing.assert_allclose(np.asarray(kl), expected_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), weights[..., None] * expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    # "mixed" (weights 0.3 / 0.7) exercises the forward and the reverse gradient at once.
    "kind,top_k,teacher_as_top_k", [("mixed", None, False), ("forward", 5, False), ("reverse", 5, True)]
)
def test_chunked_hidden_inputs(kind, top_k, teacher_as_top_k):
    sh, sw, th, tw, weights = random_models(2)
    teacher_logits = th @ tw
    if teacher_as_top_k:
        ids = np.argsort(-teacher_logits, axis=-1)[..., :top_k]
        teacher = TopKLogits(jnp.asarray(np.take_along_axis(teacher_logits, ids, axis=-1)), jnp.asarray(ids))
    else:
        teacher = LMHeadInputs(jnp.asarray(th), jnp.asarray(tw))
    options = dict(top_k=top_k, chunk_size=7, token_chunk_size=4, **kwargs_for(kind))  # tails on both axes

    teacher_floats, rebuild = (teacher.logits, lambda x: TopKLogits(x, teacher.indices)) if teacher_as_top_k \
        else (teacher, lambda x: x)

    @jax.jit
    def run(h, w, teacher_floats):
        def objective(h, w, teacher_floats):
            return jnp.sum(weights * distillation_kl(LMHeadInputs(h, w), rebuild(teacher_floats), **options))

        kl = distillation_kl(LMHeadInputs(h, w), rebuild(teacher_floats), **options)
        return kl, jax.grad(objective, argnums=(0, 1, 2))(h, w, teacher_floats)

    kl, (hidden_grad, head_grad, teacher_grad) = run(jnp.asarray(sh), jnp.asarray(sw), teacher_floats)
    expected_kl, logits_grad = reference_kl(sh @ sw, teacher_logits, kind, top_k)
    logits_grad = weights[..., None] * logits_grad
    np.testing.assert_allclose(np.asarray(kl), expected_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hidden_grad), logits_grad @ sw.T.astype(np.float64), rtol=1e-4,
                               atol=1e-6)
    expected_head_grad = sh.reshape(-1, sh.shape[-1]).T.astype(np.float64) @ logits_grad.reshape(-1, sw.shape[1])
    np.testing.assert_allclose(np.asarray(head_grad), expected_head_grad, rtol=1e-4, atol=1e-6)
    # The teacher is a constant of the loss.
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(teacher_grad))


def test_loss_aggregates_with_mask_and_matches_logits_path():
    sh, sw, th, tw, _ = random_models(3)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
    expected_kl, _ = reference_kl(sh @ sw, th @ tw, "reverse")
    expected = {
        "token_mean": expected_kl[mask].sum() / mask.sum(),
        "seq_mean_token_mean": expected_kl[0][mask[0]].mean(),
    }

    @jax.jit
    def run(sh, sw, th, tw, mask):
        losses = {}
        for aggregation in expected:
            chunked = distillation_loss(LMHeadInputs(sh, sw), LMHeadInputs(th, tw), mask, aggregation=aggregation,
                                        chunk_size=23)
            from_logits = distillation_loss(sh @ sw, th @ tw, mask, aggregation=aggregation)
            losses[aggregation] = (chunked, from_logits)
        return losses

    losses = run(*(jnp.asarray(x) for x in (sh, sw, th, tw, mask)))
    for aggregation, value in expected.items():
        np.testing.assert_allclose(float(losses[aggregation][0]), value, rtol=1e-5)
        np.testing.assert_allclose(float(losses[aggregation][1]), value, rtol=1e-5)


def test_chunked_top_k_finds_the_teachers_largest_logits():
    sh, sw, th, tw, _ = random_models(4)
    teacher_logits = th @ tw
    student = jnp.asarray(sh @ sw)
    # The teacher top-k support found chunk by chunk must give the same KL as the exact support.
    got = distillation_kl(student, LMHeadInputs(jnp.asarray(th), jnp.asarray(tw)), top_k=6, chunk_size=4,
                          token_chunk_size=3)
    expected, _ = reference_kl(sh @ sw, teacher_logits, "reverse", top_k=6)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_bf16_hidden_inputs():
    sh, sw, th, tw, _ = random_models(5)
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    kl = distillation_kl(LMHeadInputs(cast(sh), cast(sw)), LMHeadInputs(cast(th), cast(tw)), kind="forward",
                         chunk_size=23)
    assert kl.dtype == jnp.float32
    rounded = [np.asarray(cast(x).astype(jnp.float32), np.float64) for x in (sh, sw, th, tw)]
    expected, _ = reference_kl(rounded[0] @ rounded[1], rounded[2] @ rounded[3], "forward")
    np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make_args,kwargs,match",
    [
        (lambda s, t: (s, t), dict(kind="js"), "kind"),
        (lambda s, t: (s, t), dict(kind="forward", mixed_forward_weight=0.2), "mixed_forward_weight"),
        (lambda s, t: (s, t), dict(kind="mixed", mixed_forward_weight=1.5), "mixed_forward_weight"),
        (lambda s, t: (s, t[..., :-1]), {}, "vocabulary"),
        (lambda s, t: (s, t[:1]), {}, "positions"),
        (lambda s, t: (s, (t, t)), {}, "LMHeadInputs"),
        (lambda s, t: (s, LMHeadInputs(jnp.zeros((2, 5, 3)), jnp.zeros((3, 23)))), {}, "full-vocabulary"),
        (lambda s, t: (s, TopKLogits(t[..., :3], jnp.zeros((2, 5, 3), jnp.int32))), dict(top_k=4), "top_k"),
        (lambda s, t: (s, t), dict(top_k=24), "top_k"),
        (lambda s, t: (TopKLogits(s[..., :3], jnp.zeros((2, 5, 3), jnp.int32)), t), {}, "student"),
        (lambda s, t: (LMHeadInputs(jnp.zeros((2, 5, 3)), jnp.zeros((4, 23))), t), dict(top_k=2), "hidden"),
    ],
)
def test_invalid_arguments(make_args, kwargs, match):
    student, teacher = jnp.zeros((2, 5, 23)), jnp.zeros((2, 5, 23))
    with pytest.raises(ValueError, match=match):
        distillation_kl(*make_args(student, teacher), **kwargs)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(jnp.zeros((2, 5, 23)), jnp.zeros((2, 5, 23)), jnp.ones((2, 4)))


@pytest.mark.parametrize("top_k", [None, 5])  # full-vocabulary KL; teacher top-k + gathered student logits
def test_batch_sharded_hidden_is_never_gathered(top_k, gathers_at_least):
    """Batch axis sharded over 4 devices: values and gradients equal the single-device ones, and the compiled
    forward+backward all-gathers nothing as large as one sequence's hidden states (token blocks cut across
    rows, so the block loops slice an unsharded axis; the teacher's top-k sorts tiles rather than calling
    TopK, which XLA would replicate, gathering every tile's logits)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    batch, length = 8, 64
    sh, sw, th, tw, weights = random_models(6, shape=(batch, length), student_dim=24, teacher_dim=20, vocab=40)
    # 48 tokens per tile: 6 positions of every row, the last block padded; 32-column vocabulary chunks, so
    # a [48, 32] logits tile is larger than the threshold below, like the hidden states.
    options = dict(kind="mixed", mixed_forward_weight=0.3, top_k=top_k, chunk_size=32, token_chunk_size=48)

    def value_and_grads(h, w, teacher_h, teacher_w, c):
        def objective(h, w):
            kl = distillation_kl(LMHeadInputs(h, w), LMHeadInputs(teacher_h, teacher_w), **options)
            return jnp.sum(c * kl), kl

        (_, kl), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, w)
        return kl, grads

    step = jax.jit(value_and_grads)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    by_row, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    inputs = [jnp.asarray(x, jnp.float32) for x in (sh, sw, th, tw, weights)]
    sharded = [jax.device_put(x, s) for x, s in zip(inputs, (by_row, replicated, by_row, replicated, by_row))]
    compiled = step.lower(*sharded).compile()

    gathered = gathers_at_least(compiled.as_text(), length * min(sh.shape[-1], th.shape[-1]))
    assert not gathered, gathered[:3]
    got = jax.tree.map(np.asarray, compiled(*sharded))
    expected = jax.tree.map(np.asarray, step(*inputs))
    for name, g, e in zip(("kl", "hidden grad", "lm_head grad"), jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=name)
    # Both equal the logits path (top-k support taken from the exact teacher logits).
    kl_from_logits = distillation_kl(jnp.asarray(sh @ sw), jnp.asarray(th @ tw), **options)
    np.testing.assert_allclose(got[0], np.asarray(kl_from_logits), rtol=1e-4, atol=1e-5)

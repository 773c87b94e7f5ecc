"""policy_gradient_loss against float64 NumPy references of the issue's formulas: values, gradients, metrics,
the on-policy / REINFORCE equivalences, and argument errors."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import aggregate_loss, importance_weights, policy_gradient_loss

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


# ------------------------------------------------------------------ float64 NumPy reference


def aggregation_weights(mask, aggregation, max_tokens=None):
    """d loss / d L[b, t] for each aggregation (the loss is linear in the per-token losses L)."""
    mask = np.asarray(mask, np.float64)
    row_counts = mask.sum(axis=1, keepdims=True)
    num_sequences = float(np.sum(row_counts[:, 0] > 0))
    max_tokens = mask.shape[1] if max_tokens is None else max_tokens
    if aggregation == "token_mean":
        return mask / mask.sum()
    if aggregation == "seq_mean_token_mean":
        return np.where(row_counts > 0, mask / np.maximum(row_counts, 1), 0.0) / num_sequences
    if aggregation == "seq_mean_token_sum":
        return mask / num_sequences
    return mask / (num_sequences * max_tokens)


def reference_is_weights(old, rollout, mask, kind, low, high):
    w = np.exp(old - rollout)
    if kind is None:
        return np.ones_like(w)
    if kind == "tis":
        return np.clip(w, low, high)
    if kind == "icepop":
        return w * ((w >= low) & (w <= high))
    out = np.zeros_like(w)
    for b in range(w.shape[0]):
        valid = mask[b] != 0
        if valid.any():
            geometric_mean = np.exp(np.mean(old[b][valid] - rollout[b][valid]))
            if low <= geometric_mean <= high:
                out[b] = w[b]
    return out


def reference_per_token(lp, old, adv, mask, ratio, clip_low, clip_high, dual_clip):
    """Per-token L (before IS weights) for ratio kinds with a well-defined value."""
    if ratio == "gspo":
        r = np.zeros_like(lp)
        for b in range(lp.shape[0]):
            valid = mask[b] != 0
            seq = np.exp(np.mean((lp - old)[b][valid])) if valid.any() else 1.0
            r[b] = seq
    elif ratio == "on_policy":
        r = np.ones_like(lp)
    else:
        r = np.exp(lp - old)
    clipped = np.clip(r, 1 - clip_low, 1 + clip_high)
    if ratio == "cispo":
        return -adv * clipped * lp
    loss = np.maximum(-adv * r, -adv * clipped)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual_clip), loss)
    return loss


def reference_loss(lp, old, adv, mask, rollout, ratio, is_correction, aggregation, clip_low=0.2, clip_high=0.28,
                   dual_clip=None, is_low=0.5, is_high=2.0):
    per_token = reference_per_token(lp, old, adv, mask, ratio, clip_low, clip_high, dual_clip)
    per_token = per_token * reference_is_weights(old, rollout, mask, is_correction, is_low, is_high)
    return float(np.sum(np.where(mask != 0, per_token, 0.0) * aggregation_weights(mask, aggregation)))


def finite_difference_grad(function, x, step=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad


def random_inputs(seed, batch=4, length=6, per_sequence_advantages=False):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.05, 3.0, size=(batch, length))
    old = lp + rng.normal(scale=0.3, size=lp.shape)
    rollout = old + rng.normal(scale=0.4, size=lp.shape)
    adv = rng.normal(size=(batch,) if per_sequence_advantages else (batch, length))
    mask = rng.random((batch, length)) < 0.75
    mask[:, 0] = True
    mask[-1] = False  # one padding row
    return lp, old, adv, mask, rollout


def run(lp, old, adv, mask, rollout, **kwargs):
    def loss_fn(logprobs):
        loss, metrics = policy_gradient_loss(
            logprobs, None if old is None else jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
            jnp.asarray(mask), rollout_logprobs=None if rollout is None else jnp.asarray(rollout, jnp.float32),
            **kwargs,
        )
        return loss, metrics

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(lp, jnp.float32))
    return float(loss), metrics, np.asarray(grad, np.float64)


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize(
    "ratio,is_correction,aggregation",
    [
        combo
        for combo in itertools.product(("ppo", "gspo"), (None, "tis", "icepop", "seq_mask_tis"), AGGREGATIONS)
        if (combo[1] is None or combo[2] == "seq_mean_token_mean") and combo[:2] != ("gspo", "seq_mask_tis")
    ],
)
def test_ppo_and_gspo_values_and_gradients(ratio, is_correction, aggregation):
    lp, old, adv, mask, rollout = random_inputs(zlib.crc32(f"{ratio}-{is_correction}-{aggregation}".encode()) % 1000)
    kwargs = dict(ratio=ratio, is_correction=is_correction, aggregation=aggregation, clip_low=0.2, clip_high=0.28)
    loss, _, grad = run(lp, old, adv, mask, rollout, **kwargs)

    def reference(x):
        return reference_loss(x, old, adv, mask, rollout, ratio, is_correction, aggregation)

    np.testing.assert_allclose(loss, reference(lp), rtol=1e-5, atol=1e-6)
    # The reference is differentiated by central differences: an independent check of the gradient.
    np.testing.assert_allclose(grad, finite_difference_grad(reference, lp), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("ratio", ["ppo", "gspo"])
def test_dual_clip(ratio):
    lp, old, adv, mask, rollout = random_inputs(7)
    old = lp - np.random.default_rng(1).normal(scale=1.5, size=lp.shape)  # large ratios so that dual clip acts
    loss, metrics, grad = run(lp, old, adv, mask, rollout, ratio=ratio, dual_clip=3.0, clip_high=0.28)

    def reference(x):
        return reference_loss(x, old, adv, mask, rollout, ratio, None, "token_mean", dual_clip=3.0)

    np.testing.assert_allclose(loss, reference(lp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, finite_difference_grad(reference, lp), rtol=2e-4, atol=2e-6)
    if ratio == "ppo":
        r = np.exp(lp - old)
        expected = np.sum(mask & (adv < 0) & (r > 3.0)) / mask.sum()
        np.testing.assert_allclose(float(metrics["dual_clip_fraction"]), expected, rtol=1e-6)
        assert expected > 0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("is_correction", [None, "icepop"])
def test_cispo_value_and_gradient(aggregation, is_correction):
    lp, old, adv, mask, rollout = random_inputs(11)
    loss, _, grad = run(lp, old, adv, mask, rollout, ratio="cispo", clip_low=0.2, clip_high=0.28,
                        aggregation=aggregation, is_correction=is_correction)
    np.testing.assert_allclose(
        loss, reference_loss(lp, old, adv, mask, rollout, "cispo", is_correction, aggregation), rtol=1e-5, atol=1e-6
    )
    # The clipped ratio is a stop-gradient weight: dL/dlp = -A * clip(r).
    weights = reference_is_weights(old, rollout, mask, is_correction, 0.5, 2.0)
    expected = -adv * np.clip(np.exp(lp - old), 0.8, 1.28) * weights * aggregation_weights(mask, aggregation)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("per_sequence_advantages", [False, True])
def test_on_policy_value_and_gradient(aggregation, per_sequence_advantages):
    lp, _, adv, mask, rollout = random_inputs(13, per_sequence_advantages=per_sequence_advantages)
    loss, metrics, grad = run(lp, None, adv, mask, None, ratio="on_policy", aggregation=aggregation)
    full_adv = adv[:, None] * np.ones_like(lp) if per_sequence_advantages else adv
    weights = aggregation_weights(mask, aggregation)
    # Value: -A * r with r == 1; gradient: -A * grad log pi, aggregated.
    np.testing.assert_allclose(loss, np.sum(-full_adv * weights), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, -full_adv * weights, rtol=1e-5, atol=1e-8)
    assert float(metrics["clip_fraction"]) == 0.0
    np.testing.assert_allclose(float(metrics["mean_ratio"]), 1.0, rtol=1e-6)


def _tiny_policy_logprobs(params, tokens):
    """log pi(token) of a tiny softmax policy: params [B, T, V] logits."""
    return jnp.take_along_axis(jax.nn.log_softmax(params, axis=-1), tokens[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_equals_reinforce_and_ppo_at_old_equal_current(aggregation):
    rng = np.random.default_rng(5)
    params = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, size=(3, 5)))
    adv = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 5)) < 0.8).at[:, 0].set(True)

    def on_policy(p):
        return policy_gradient_loss(_tiny_policy_logprobs(p, tokens), None, adv, mask, ratio="on_policy",
                                    aggregation=aggregation)[0]

    def ppo_at_current(p):
        lp = _tiny_policy_logprobs(p, tokens)
        return policy_gradient_loss(lp, jax.lax.stop_gradient(lp), adv, mask, ratio="ppo",
                                    aggregation=aggregation)[0]

    def reinforce(p):  # the REINFORCE surrogate: -A log pi
        lp = _tiny_policy_logprobs(p, tokens)
        return aggregate_loss(-adv[:, None] * lp, mask, aggregation)

    def reinforce_value(p):  # -A * r with r = 1
        return aggregate_loss(-adv[:, None] * jnp.ones((3, 5)), mask, aggregation)

    on_policy_grad = jax.grad(on_policy)(params)
    np.testing.assert_allclose(float(on_policy(params)), float(reinforce_value(params)), rtol=1e-6)
    np.testing.assert_allclose(on_policy_grad, jax.grad(reinforce)(params), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.grad(ppo_at_current)(params), on_policy_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(ppo_at_current(params)), float(on_policy(params)), rtol=1e-6)


def test_metrics_match_reference():
    lp, old, adv, mask, rollout = random_inputs(17)
    _, metrics, _ = run(lp, old, adv, mask, rollout, ratio="ppo", clip_low=0.2, clip_high=0.28,
                        is_correction="icepop", is_low=0.5, is_high=2.0)
    valid = mask != 0
    count = valid.sum()
    r = np.exp(lp - old)
    clipped = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8))
    w = np.exp(old - rollout)
    kept = (w >= 0.5) & (w <= 2.0)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), (clipped & valid).sum() / count, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_ratio"]), r[valid].sum() / count, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["is_masked_fraction"]), (~kept & valid).sum() / count, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_is_weight"]), (w * kept)[valid].sum() / count, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["rollout_logprob_abs_diff"]), np.abs(old - rollout)[valid].sum() / count, rtol=1e-5
    )
    assert all(value.dtype == jnp.float32 and value.shape == () for value in metrics.values())


def test_tis_truncated_fraction_and_seq_mask_drops_whole_sequences():
    lp, old, adv, mask, rollout = random_inputs(19)
    rollout[0] = old[0] - 1.5  # sequence 0: geometric-mean weight e^1.5 > 2, dropped whole
    _, metrics, grad = run(lp, old, adv, mask, rollout, ratio="ppo", is_correction="seq_mask_tis")
    assert np.all(grad[0] == 0.0)
    assert np.any(grad[1:] != 0.0)
    _, metrics, _ = run(lp, old, adv, mask, rollout, ratio="ppo", is_correction="tis", is_high=2.0)
    w = np.exp(old - rollout)
    np.testing.assert_allclose(float(metrics["is_truncated_fraction"]),
                               (mask & ((w > 2.0) | (w < 0.5))).sum() / mask.sum(), rtol=1e-6)


def test_garbage_at_masked_positions_is_ignored():
    lp, old, adv, mask, rollout = random_inputs(23)
    poisoned = [np.where(mask, x, value) for x, value in ((lp, -np.inf), (old, np.nan), (rollout, np.inf))]
    loss, _, grad = run(poisoned[0], poisoned[1], adv, mask, poisoned[2], ratio="ppo", is_correction="icepop")
    clean_loss, _, clean_grad = run(lp, old, adv, mask, rollout, ratio="ppo", is_correction="icepop")
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)


def test_jit_and_global_normalisers():
    lp, old, adv, mask, rollout = random_inputs(29)
    fn = jax.jit(policy_gradient_loss, static_argnames=("ratio", "is_correction", "aggregation"))
    loss, _ = fn(jnp.asarray(lp, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                 jnp.asarray(mask), rollout_logprobs=jnp.asarray(rollout, jnp.float32), ratio="ppo",
                 is_correction="tis", num_tokens=100.0)
    per_token = reference_per_token(lp, old, adv, mask, "ppo", 0.2, 0.2, None)
    per_token *= reference_is_weights(old, rollout, mask, "tis", 0.5, 2.0)
    np.testing.assert_allclose(float(loss), np.sum(np.where(mask, per_token, 0)) / 100.0, rtol=1e-5)


# ------------------------------------------------------------------ argument errors


def _args():
    return jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,)), jnp.ones((2, 3), bool)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(aggregation="mean"), "aggregation"),
        (dict(ratio="trpo"), "ratio"),
        (dict(is_correction="mis", rollout_logprobs=jnp.zeros((2, 3))), "is_correction"),
        (dict(is_correction="icepop"), "rollout_logprobs"),
        (dict(is_correction="icepop", rollout_logprobs=jnp.zeros((2, 3)), is_low=3.0, is_high=2.0), "is_low"),
        (dict(is_correction="tis", rollout_logprobs=jnp.zeros((2, 3)), is_high=0.0), "is_high"),
        (dict(rollout_logprobs=jnp.zeros((2, 4))), "rollout_logprobs"),
        (dict(dual_clip=0.9), "dual_clip"),
        (dict(dual_clip=3.0, ratio="cispo"), "dual_clip"),
        (dict(clip_low=-0.1), "clip_low"),
        # NeMo-RL rejects seq-mask-TIS with GSPO / sequence-level importance ratios.
        (dict(ratio="gspo", is_correction="seq_mask_tis", rollout_logprobs=jnp.zeros((2, 3))), "seq_mask_tis"),
        (dict(is_level="sequence", is_correction="seq_mask_tis", rollout_logprobs=jnp.zeros((2, 3))), "seq_mask_tis"),
        (dict(is_level="sequences", is_correction="tis", rollout_logprobs=jnp.zeros((2, 3))), "is_level"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_gradient_loss(*_args(), **kwargs)


def test_invalid_shapes():
    lp, old, adv, mask = _args()
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(lp, old, jnp.zeros((3,)), mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_gradient_loss(lp, jnp.zeros((2, 4)), adv, mask)
    with pytest.raises(ValueError, match="mask"):
        policy_gradient_loss(lp, old, adv, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="old_logprobs is required"):
        policy_gradient_loss(lp, None, adv, mask, ratio="ppo")
    with pytest.raises(ValueError, match="logprobs must have rank 2"):
        policy_gradient_loss(jnp.zeros((6,)), jnp.zeros((6,)), jnp.zeros((6,)), jnp.ones((6,)))


def test_errors_raise_at_trace_time_under_jit():
    fn = jax.jit(lambda lp, old, adv, mask: policy_gradient_loss(lp, old, adv, mask, aggregation="bogus"))
    with pytest.raises(ValueError, match="aggregation"):
        fn(*_args())


def test_fractional_mask_weights_the_loss_not_the_importance_ratio():
    """A mask value of 0.5 halves a token's loss; w = exp(old - rollout) itself does not depend on it."""
    old = jnp.array([[1.0, -0.2]])
    rollout = jnp.array([[0.0, 0.0]])
    weights, _ = importance_weights(old, rollout, jnp.array([[0.5, 1.0]]), "tis", 0.5, 5.0)
    np.testing.assert_allclose(np.asarray(weights)[0], [np.e, np.exp(-0.2)], rtol=1e-6)
    weights, dropped = importance_weights(old, rollout, jnp.array([[0.5, 1.0]]), "seq_mask_tis", 0.5, 2.0)
    g = np.exp((0.5 * 1.0 + 1.0 * -0.2) / 1.5)  # mask-weighted geometric mean of the sequence
    assert 0.5 <= g <= 2.0 and not bool(np.asarray(dropped).any())

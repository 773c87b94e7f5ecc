"""`make_train_step` against a hand-assembled update (loss + jax.grad + the same optax optimiser), for the SFT,
GRPO and MOPD losses; micro-batching with global normalisers; frozen parameters.

The model is the tiny preset with layer pattern "*E" (attention + MoE): the step's plumbing does not depend on
the layer kinds, and without Mamba layers each gradient compiles in a few seconds on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import nemotron_jax as nj
from nemotron_jax.training import (
    GRPOConfig,
    MOPDConfig,
    OptimizerConfig,
    SFTConfig,
    TrainState,
    make_grpo_loss,
    make_mopd_loss,
    make_optimizer,
    make_sft_loss,
    make_train_step,
)
from nemotron_jax.training.grpo import update_normalizers

B, T = 4, 32
LEARNING_RATES = (1e-3, 4e-4)  # two steps: the second uses Adam's moments and a changed learning rate
OPTIMIZER = OptimizerConfig(learning_rate=LEARNING_RATES[0], weight_decay=0.1, max_grad_norm=0.5)
# Row 3 has no loss token (a padding row): sequence-mean normalisers must not count it. The two
# micro-batches (rows 0-1, 2-3) hold very different numbers of loss tokens.
LOSS_SPANS = ((3, 30), (10, 14), (20, 22), None)


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return tiny_cfg.replace(layer_pattern="*E")


@pytest.fixture(scope="module")
def params(cfg):
    params = nj.init_params(cfg, jax.random.PRNGKey(1))
    # A non-zero expert bias: weight decay would shrink it if the optimiser touched it.
    flat = traverse_util.flatten_dict(params)
    for path in flat:
        if path[-1] == "e_score_correction_bias":
            flat[path] = 0.1 * jax.random.normal(jax.random.PRNGKey(len(path)), flat[path].shape, flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def optimizer(params):
    return make_optimizer(OPTIMIZER, params)


@pytest.fixture(scope="module")
def jit_opt_update(optimizer):
    return jax.jit(optimizer.update)


def _common_arrays(cfg, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, cfg.vocab_size, (B, T)).astype(np.int32)
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[0, 16:] = 2  # two packed documents in row 0
    segment_ids[1, 28:] = 0  # right padding
    segment_ids[3, 12:] = 0
    tokens[segment_ids == 0] = cfg.pad_token_id
    targets = np.roll(tokens, -1, axis=1)
    mask = np.zeros((B, T), np.float32)
    for row, span in enumerate(LOSS_SPANS):
        if span is not None:
            mask[row, span[0]:span[1]] = 1.0
    return rng, {"tokens": tokens, "targets": targets, "segment_ids": segment_ids}, mask


def sft_case(cfg):
    _, batch, mask = _common_arrays(cfg, 0)
    batch["loss_mask"] = mask.astype(np.int32)
    normalizers = {"num_tokens": np.float32(mask.sum()), "num_input_tokens": np.float32((batch["segment_ids"] > 0).sum())}
    return make_sft_loss(cfg, SFTConfig(load_balance_coef=0.0)), batch, normalizers


def grpo_case(cfg):
    rng, batch, mask = _common_arrays(cfg, 1)
    batch["mask"] = mask
    uniform = -np.log(cfg.vocab_size)  # a random tiny model is close to uniform
    batch["rollout_logprobs"] = (uniform + 0.1 * rng.standard_normal((B, T))).astype(np.float32) * mask
    batch["ref_logprobs"] = (uniform + 0.3 * rng.standard_normal((B, T))).astype(np.float32)
    batch["advantages"] = np.asarray([1.0, -0.5, 0.7, 0.0], np.float32)
    config = GRPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=T, aggregation="seq_mean_token_mean",
                        kl_coef=0.05, is_correction="tis")
    return make_grpo_loss(cfg, config), batch, update_normalizers(batch)


def mopd_case(cfg):
    rng, batch, mask = _common_arrays(cfg, 2)
    batch["mask"] = mask
    uniform = -np.log(cfg.vocab_size)
    batch["rollout_logprobs"] = (uniform + 0.1 * rng.standard_normal((B, T))).astype(np.float32) * mask
    batch["teacher_logprobs"] = (uniform + rng.standard_normal((B, T))).astype(np.float32) * mask
    config = MOPDConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=T)  # seq_mean_token_mean
    return make_mopd_loss(cfg, config), batch, update_normalizers(batch)


CASES = {"sft": sft_case, "grpo": grpo_case, "mopd": mopd_case}


@pytest.fixture(scope="module")
def case(request, cfg):
    return CASES[request.param](cfg)


def run_step(step, state, batch, normalizers):
    metrics = []
    for lr in LEARNING_RATES:
        state, m = step(state, batch, normalizers, np.float32(lr))
        metrics.append(jax.device_get(m))
    return state, metrics


def reference_run(loss_fn, optimizer, jit_opt_update, params, batch, normalizers):
    """Two updates by hand: jax.grad of the whole-batch loss, then the optimiser's own update."""
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    opt_state = optimizer.init(params)
    losses, aux_metrics, grad_norms = [], [], []
    for lr in LEARNING_RATES:
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        (loss, aux), grads = grad_fn(params, batch, normalizers)
        updates, opt_state = jit_opt_update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
        grad_norms.append(float(optax.tree.norm(grads)))
        aux_metrics.append(jax.device_get(aux.metrics))
    return params, losses, aux_metrics, grad_norms


def assert_params_close(actual, expected, atol):
    flat_a = traverse_util.flatten_dict(actual)
    flat_e = traverse_util.flatten_dict(expected)
    assert flat_a.keys() == flat_e.keys()
    for path in flat_e:
        np.testing.assert_allclose(np.asarray(flat_a[path]), np.asarray(flat_e[path]), rtol=1e-5, atol=atol,
                                   err_msg="/".join(path))


def params_distance(a, b):
    return float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b)))


def assert_frozen_leaves_kept(before, after):
    """The expert bias never moves (no expert-bias update, and weight decay must not touch it); the router
    kernel (not frozen here) does."""
    kinds = _labels(before)
    before, after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    assert sorted(set(kinds.values())) == ["bias", "other", "router"]
    for path, kind in kinds.items():
        unchanged = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
        assert unchanged == (kind == "bias"), path


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_step_matches_hand_assembled_update_and_microbatching(case, params, optimizer, jit_opt_update):
    loss_fn, batch, normalizers = case
    expected, losses, aux_metrics, grad_norms = reference_run(loss_fn, optimizer, jit_opt_update, params, batch, normalizers)
    assert min(grad_norms) > 1e-3  # the gradient is not trivially zero
    assert params_distance(expected, params) > 1e-3

    state = TrainState.create(params, optimizer, seed=0)
    one = make_train_step(loss_fn, optimizer, num_microbatches=1, donate=False)
    state_1, metrics_1 = run_step(one, state, batch, normalizers)
    # Adam's first steps move every parameter by ~lr: compare to a small fraction of it.
    assert_params_close(state_1.params, expected, atol=1e-6)
    assert int(state_1.step) == 2
    assert_frozen_leaves_kept(params, state_1.params)
    for m, loss, aux, grad_norm in zip(metrics_1, losses, aux_metrics, grad_norms):
        # Adam is nearly invariant to the gradient's scale: check the scale through the norm.
        np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=1e-5)
        np.testing.assert_allclose(m["loss"], loss, rtol=1e-5, atol=1e-7)
        for name, value in aux.items():
            np.testing.assert_allclose(m[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert [float(m["learning_rate"]) for m in metrics_1] == pytest.approx(LEARNING_RATES)

    two = make_train_step(loss_fn, optimizer, num_microbatches=2, donate=False)
    state_2, metrics_2 = run_step(two, state, batch, normalizers)
    assert_params_close(state_2.params, state_1.params, atol=1e-6)
    for m1, m2 in zip(metrics_1, metrics_2):
        for name in ("loss", "grad_norm", "update_norm", "entropy"):
            np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(m2["moe/expert_load"], m1["moe/expert_load"], rtol=1e-6)


def _labels(params):
    names = {}
    for path in traverse_util.flatten_dict(params):
        names[path] = ("bias" if path[-1] == "e_score_correction_bias"
                       else "router" if path[-1] == "router_kernel" else "other")
    return names


@pytest.mark.parametrize("freeze_router", [False, True])
def test_optimizer_never_moves_frozen_leaves(params, freeze_router):
    """Gradients of ones everywhere (and weight decay, which would shrink the non-zero bias): frozen leaves
    get an update of exactly 0; everything else moves."""
    config = dataclasses.replace(OPTIMIZER, freeze_router=freeze_router)
    optimizer = make_optimizer(config, params)
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = optimizer.init(params)
    for _ in range(2):
        updates, opt_state = jax.jit(optimizer.update)(grads, opt_state, params)
    flat = traverse_util.flatten_dict(updates)
    kinds = _labels(params)
    assert sorted(set(kinds.values())) == ["bias", "other", "router"]
    for path, update in flat.items():
        frozen = kinds[path] == "bias" or (freeze_router and kinds[path] == "router")
        if frozen:
            assert not np.any(np.asarray(update)), path
        else:
            assert np.all(np.abs(np.asarray(update)) > 0), path

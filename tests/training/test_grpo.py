"""GRPO: dynamic filtering (`collect_groups`) against a fake sampler, alignment of the rollout training arrays
with the sampler's log-probs, and GRPO learning the vowel task on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemotron_jax.data import chat_stop_token_ids
from nemotron_jax.training import GRPOConfig, OptimizerConfig, Scorer, sample_rollouts, training_arrays, trainers
from nemotron_jax.training import grpo as grpo_lib
from nemotron_jax.training.trainers import GRPOTrainer
from tests.training.conftest import fresh_copy, rl_prompt_tokens, stage_environment

# ------------------------------------------------------------------------------------ dynamic filtering


@dataclasses.dataclass
class FakeRollouts:
    prompt_tokens: list
    response_tokens: list
    rollout_logprobs: list
    finished: np.ndarray


class FakeSampler:
    """`sample(attempt)` for `collect_groups`: round k returns `rounds[k]` (a list of per-group reward lists),
    or None once the rounds run out (the prompt stream is exhausted). Every sample names its (round, group,
    index), so the test can tell where each kept row came from."""

    def __init__(self, rounds: list[list[list[float]]], n: int):
        self.rounds, self.n, self.calls = rounds, n, []

    def __call__(self, attempt: int):
        self.calls.append(attempt)
        if len(self.calls) > len(self.rounds):
            return None
        groups = self.rounds[len(self.calls) - 1]
        prompts = [(attempt, g) for g in range(len(groups))]
        rows = [(attempt, g, j) for g in range(len(groups)) for j in range(self.n)]
        rollouts = FakeRollouts(prompt_tokens=[np.asarray(r[:2], np.int32) for r in rows],
                                response_tokens=[list(r) for r in rows],
                                rollout_logprobs=[[-float(r[2])] for r in rows],
                                finished=np.asarray([r[2] % 2 == 0 for r in rows]))
        rewards = np.asarray([value for group in groups for value in group], np.float32)
        return grpo_lib.SampledGroups(prompts, rollouts, rewards)


@st.composite
def filtering_cases(draw):
    n = draw(st.integers(2, 4))
    prompts_per_step = draw(st.integers(1, 5))
    max_refill = draw(st.integers(0, 3))
    dynamic = draw(st.booleans())
    values = st.sampled_from([0.0, 0.5, 1.0])
    # A group is all-equal (no signal) or free (which may still come out all-equal).
    group = st.one_of(values.map(lambda v: [v] * n), st.lists(values, min_size=n, max_size=n))
    round_ = st.lists(group, min_size=1, max_size=prompts_per_step + 2)
    rounds = draw(st.lists(round_, min_size=0, max_size=max_refill + 2))
    config = GRPOConfig(prompts_per_step=prompts_per_step, samples_per_prompt=n, dynamic_filtering=dynamic,
                        max_refill_batches=max_refill)
    return config, rounds


def expected_collection(config: GRPOConfig, rounds):
    """The documented contract, written out: sample rounds in order until `prompts_per_step` groups are kept,
    the stream ends, or `max_refill_batches` refills (dynamic filtering) / the first round (without) are used;
    keep groups in sampling order, with filtering only those whose rewards differ."""
    attempts = config.max_refill_batches + 1 if config.dynamic_filtering else 1
    kept, calls, sampled = [], [], []
    for attempt in range(attempts):
        calls.append(attempt)
        if attempt >= len(rounds):
            break
        sampled.append(rounds[attempt])
        for g, rewards in enumerate(rounds[attempt]):
            if len(kept) < config.prompts_per_step and (not config.dynamic_filtering or len(set(rewards)) > 1):
                kept.append((attempt, g))
        if len(kept) == config.prompts_per_step:
            break
    return kept, calls, sampled


@settings(max_examples=300, deadline=None)
@given(filtering_cases())
def test_collect_groups_dynamic_filtering(case):
    config, rounds = case
    n = config.samples_per_prompt
    sampler = FakeSampler(rounds, n)
    batch = grpo_lib.collect_groups(sampler, config)
    kept, calls, sampled = expected_collection(config, rounds)

    assert sampler.calls == calls  # refills come from the sampler, in order, and stop as documented
    assert batch.prompts == kept
    # Batch-size contract: at most prompts_per_step groups, n rows each, prompt-major, row-aligned fields.
    assert len(batch.prompts) <= config.prompts_per_step
    assert len(batch.prompt_tokens) == len(batch.response_tokens) == len(batch.rollout_logprobs) == len(batch.rewards) \
        == n * len(batch.prompts)
    for index, (attempt, g) in enumerate(batch.prompts):
        for j in range(n):
            row = index * n + j
            assert batch.response_tokens[row] == [attempt, g, j]
            assert batch.prompt_tokens[row].tolist() == [attempt, g]
            assert batch.rollout_logprobs[row] == [-float(j)]
            assert batch.rewards[row] == rounds[attempt][g][j]
    if config.dynamic_filtering:
        grouped = batch.rewards.reshape(-1, n)
        assert np.all(grouped.max(1) > grouped.min(1))  # no all-equal group ever reaches the batch
    if len(batch.prompts) < config.prompts_per_step:
        # Short batch: only when the stream ended or the refills (or, without filtering, the one round) ran out.
        ended = len(calls) > len(rounds)
        assert ended or len(calls) == (config.max_refill_batches + 1 if config.dynamic_filtering else 1)

    all_rewards = [v for round_ in sampled for group in round_ for v in group]
    assert batch.stats["groups_sampled"] == sum(len(r) for r in sampled)
    assert batch.stats["groups_kept"] == len(kept)
    if all_rewards:
        assert batch.stats["reward"] == pytest.approx(np.mean(all_rewards))
    else:
        assert math.isnan(batch.stats["reward"])


def test_short_batch_pads_with_zero_advantage_rows():
    """When the refills run out with fewer groups than `prompts_per_step`, the update batch is padded: the
    padding rows carry no loss token and no advantage."""
    config = GRPOConfig(prompts_per_step=3, samples_per_prompt=2, max_refill_batches=1)
    rounds = [[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]
    batch = grpo_lib.collect_groups(FakeSampler(rounds, 2), config)
    assert batch.prompts == [(0, 1)]
    rows = config.rows_per_step
    advantages = grpo_lib.advantages_for(batch.rewards, rows, config)
    assert advantages[0] < 0 < advantages[1] and advantages[:2].sum() == pytest.approx(0.0, abs=1e-6)
    assert not advantages[2:].any()
    arrays = training_arrays(batch.prompt_tokens, [[7, 8]] * 2, [[-1.0, -2.0]] * 2, length=8, pad_id=0,
                             num_rows=rows)
    assert arrays["mask"][:2].sum(1).tolist() == [2, 2] and not arrays["mask"][2:].any()
    assert not arrays["segment_ids"][2:].any()


# ------------------------------------------------------------------------------------ rollout arrays

# Shapes shared by the alignment test and the GRPO run: one compiled decode loop serves both.
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, PROMPT_WIDTH = 8, 4, 12, 64


def test_training_arrays_align_with_sampler_logprobs(tiny_cfg, tiny_params, task_tokenizer):
    """The training forward (`policy_forward`) at the masked positions reproduces the sampler's per-token
    log-probs: the mask, targets and rollout_logprobs of `training_arrays` line up with what `sample_rollouts`
    generated."""
    # Committed to a device like a trainer's params, so that the GRPO run below reuses these compilations.
    params = jax.device_put(tiny_params, jax.devices()[0])
    texts = ("say apple kiwi", "say lemon", "say olive echo plum", "say umbrella", "say grape melon peach onion")
    prompts = [rl_prompt_tokens(task_tokenizer, text) for text in texts]
    assert len({len(p) for p in prompts}) > 1  # left-padded for sampling, right-padded for training
    n = SAMPLES_PER_PROMPT
    rollouts = sample_rollouts(tiny_cfg, params, prompts, n=n, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                               top_p=1.0, stop_token_ids=chat_stop_token_ids(task_tokenizer), seed=3,
                               prompt_length=PROMPT_WIDTH, num_rows=PROMPTS_PER_STEP * n)
    assert len(rollouts) == len(prompts) * n
    num_rows = PROMPTS_PER_STEP * n  # the GRPO run's update rows: its trainer compiles the same forward
    arrays = training_arrays(rollouts.prompt_tokens, rollouts.response_tokens, rollouts.rollout_logprobs,
                             length=PROMPT_WIDTH + MAX_NEW_TOKENS, pad_id=task_tokenizer.pad_id, num_rows=num_rows)
    mask = arrays["mask"] > 0
    for row in range(len(rollouts)):
        response = rollouts.response_tokens[row]
        assert len(response) >= 1
        assert rollouts.prompt_tokens[row].tolist() == prompts[row // n].tolist()
        assert arrays["tokens"][row, :len(prompts[row // n])].tolist() == prompts[row // n].tolist()
        assert arrays["targets"][row][mask[row]].tolist() == response
        assert mask[row].sum() == len(response) == len(rollouts.rollout_logprobs[row])
    assert not mask[len(rollouts):].any()

    # The trainers' jitted `policy_forward` (old / reference / teacher log-probs).
    logprobs = np.asarray(trainers._logprob_fn(tiny_cfg)(params, arrays))
    np.testing.assert_allclose(logprobs[mask], arrays["rollout_logprobs"][mask], atol=1e-4)
    assert not arrays["rollout_logprobs"][~mask].any()


# ------------------------------------------------------------------------------------ learning

GRPO_STEPS, WINDOW = 24, 4


def step_metrics(run_dir: str, stage: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["stage"] == stage]


def test_grpo_learns_vowel_task(tiny_cfg, format_params, task_tokenizer, vowel_files, tmp_path):
    """GRPOTrainer on the vowel task (reward 1 when the response starts with a vowel), from the SFT-ed tiny
    model: the mean sampled reward of the last steps is clearly above that of the first steps. A small KL
    penalty to the initial params keeps the KL reference in use on every step (it was once donated away)."""
    config = GRPOConfig(prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=SAMPLES_PER_PROMPT,
                        max_new_tokens=MAX_NEW_TOKENS, max_prompt_length=PROMPT_WIDTH, max_refill_batches=1,
                        kl_coef=1e-3)  # a small KL penalty, so that the reference path runs past step 1
    trainer = GRPOTrainer("grpo", GRPO_STEPS, OptimizerConfig(learning_rate=3e-3), [vowel_files["rl"]],
                          stage_environment(tiny_cfg, task_tokenizer, str(tmp_path)), seed=0, enable_thinking=False,
                          config=config, scorer=Scorer(0))
    trainer.run(fresh_copy(format_params))
    steps = step_metrics(str(tmp_path), "grpo")
    assert [r["step"] for r in steps] == list(range(1, GRPO_STEPS + 1))
    rewards = [r["reward"] for r in steps]
    first, last = np.mean(rewards[:WINDOW]), np.mean(rewards[-WINDOW:])
    print(f"vowel reward per step: {np.round(rewards, 2).tolist()}")
    assert last >= first + 0.3, rewards
    assert not any(r.get("skipped_update") for r in steps[-WINDOW:])
    assert all(np.isfinite(r["kl"]) for r in steps if not r.get("skipped_update"))


def test_ppo_minibatches_with_router_replay_run_and_update(tiny_cfg, format_params, task_tokenizer, vowel_files,
                                                           tmp_path):
    """The configurable PPO path: two minibatch updates per rollout batch against the old policy's log-probs,
    replaying the old policy's expert choices. Every step makes finite updates that move the params."""
    config = GRPOConfig(prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=SAMPLES_PER_PROMPT,
                        max_new_tokens=MAX_NEW_TOKENS, max_prompt_length=PROMPT_WIDTH, max_refill_batches=1,
                        dynamic_filtering=False, ratio="ppo", minibatches_per_step=2, router_replay="old_policy")
    trainer = GRPOTrainer("ppo", 2, OptimizerConfig(learning_rate=1e-3), [vowel_files["rl"]],
                          stage_environment(tiny_cfg, task_tokenizer, str(tmp_path)), seed=0, enable_thinking=False,
                          config=config, scorer=Scorer(0))
    start = fresh_copy(format_params)
    before = jax.tree.map(np.asarray, start)
    params, _ = trainer.run(start)
    steps = step_metrics(str(tmp_path), "ppo")
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert all(np.isfinite(record[k]) for k in ("loss", "grad_norm", "update_norm", "clip_fraction", "mean_ratio"))
        assert record["update_norm"] > 0
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, params)
    assert any(jax.tree.leaves(moved))

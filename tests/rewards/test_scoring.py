"""Batched scoring: the overlong rule, thinking mode, failures (raise / hang / crash / bad value), process pool."""

import textwrap

import numpy as np
import pytest

from nemotron_jax.rewards import RewardPool, register_reward, score_batch, score_in_process, unregister_reward

# Reward functions that misbehave, as a user's module would define them (the pool's workers import it by name).
MISBEHAVING_MODULE = textwrap.dedent(
    """
    import os
    import time

    def raising(response, spec):
        raise RuntimeError("verifier bug")

    def hanging(response, spec):
        while True:
            pass

    def huge_power(response, spec):  # C code that never returns to the interpreter: signals cannot stop it
        return float(10 ** (10 ** 8) > 0)  # minutes of big-integer arithmetic, about 40 MB

    def crashing(response, spec):
        os._exit(7)

    def out_of_range(response, spec):
        return 3.0

    def length_is_even(response, spec):
        return float(len(response) % 2 == 0)

    def sleeping(response, spec):
        time.sleep(0.5)
        return 1.0
    """
)
MISBEHAVING = ("raising", "hanging", "huge_power", "crashing", "out_of_range", "length_is_even", "sleeping")


@pytest.fixture(scope="module")
def misbehaving_rewards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user_rewards")
    (directory / "user_rewards_for_scoring_tests.py").write_text(MISBEHAVING_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        import user_rewards_for_scoring_tests as module

        for name in MISBEHAVING:
            register_reward(f"test_{name}", getattr(module, name), timeout_s=1.5)
        yield
        for name in MISBEHAVING:
            unregister_reward(f"test_{name}")


@pytest.fixture(scope="module")
def pool(misbehaving_rewards):
    with RewardPool(num_workers=2) as reward_pool:
        reward_pool.wait_ready()
        yield reward_pool


def mixed_batch():
    responses = [
        r"<think>try \boxed{3}</think>So \boxed{\frac{1}{2}}",
        r"\boxed{0.33}",
        "Reasoning.\nAnswer: C",
        "Final Choice: D",
        "<<Title>> no commas here",
        "<<Title>> a comma, here",
    ]
    specs = [
        {"expected_answer": "0.5"},
        {"ground_truth": r"\frac{1}{3}"},
        {"expected_answer": "C"},
        {"expected_answer": "C", "template_metadata": {"output_regex": r"Final Choice:\s*([A-Za-z])"}},
        {"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [None, {}]},
        {"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [None, {}]},
    ]
    domains = ["math", "math_with_judge_simple_agent", "mcqa", "mcqa_simple_agent"] + ["instruction_following"] * 2
    return responses, specs, domains, np.array([1, 0, 1, 0, 1, 0], dtype=np.float32)


def test_pool_scores_a_mixed_batch_like_the_in_process_path(pool):
    responses, specs, domains, expected = mixed_batch()
    rewards, stats = pool.score(responses, specs, domains)
    assert rewards.dtype == np.float32 and rewards.shape == (6,)
    np.testing.assert_array_equal(rewards, expected)
    assert stats.num_scored == 6 and stats.num_failures == 0
    in_process_rewards, _ = score_in_process(responses, specs, domains)
    np.testing.assert_array_equal(in_process_rewards, expected)


def test_truncated_responses_get_zero_without_running_the_verifier(pool):
    responses, specs, domains, expected = mixed_batch()
    truncated = [True, False, True, False, False, False]
    rewards, stats = pool.score(responses, specs, domains, truncated=truncated)
    np.testing.assert_array_equal(rewards, np.where(truncated, 0.0, expected))
    assert stats.num_truncated == 2 and stats.num_failures == 0
    assert stats.statuses[0] == "truncated"
    # The verifier is not called: a truncated item of a crashing domain does not crash anything.
    rewards, stats = pool.score(["x"], [{}], ["test_crashing"], truncated=True)
    assert stats.statuses == ("truncated",) and stats.worker_restarts == 0


def test_thinking_mode_without_closing_tag_has_no_answer(pool):
    responses = [r"reasoning \boxed{2}", r"reasoning</think>\boxed{2}"]
    rewards, stats = pool.score(responses, [{"expected_answer": "2"}] * 2, ["math"] * 2, thinking=True)
    np.testing.assert_array_equal(rewards, [0.0, 1.0])
    assert stats.statuses == ("unfinished_thinking", "ok")


def test_failing_verifiers_do_not_kill_the_batch(pool):
    domains = ["test_length_is_even", "test_raising", "test_hanging", "test_length_is_even", "test_crashing",
               "test_out_of_range", "test_huge_power", "math", "test_length_is_even"]  # fmt: skip
    responses = ["ab", "x", "x", "abc", "x", "x", "x", r"\boxed{4}", "abcd"]
    specs = [{}] * 7 + [{"expected_answer": "4"}, {}]
    rewards, stats = pool.score(responses, specs, domains)
    np.testing.assert_array_equal(rewards, [1, 0, 0, 0, 0, 0, 0, 1, 1])
    assert stats.statuses == ("ok", "error", "timeout", "ok", "crashed", "error", "timeout", "ok", "ok")
    assert (stats.num_errors, stats.num_timeouts, stats.num_crashes, stats.num_failures) == (2, 2, 1, 5)
    assert stats.failures_by_domain == {
        "test_raising": 1, "test_hanging": 1, "test_crashing": 1, "test_out_of_range": 1, "test_huge_power": 1,
    }  # fmt: skip
    assert stats.worker_restarts == 3  # two killed on timeout, one crashed
    assert any("RuntimeError: verifier bug" in message for message in stats.failure_messages)
    # The pool is healthy afterwards.
    rewards, stats = pool.score(*mixed_batch()[:3])
    np.testing.assert_array_equal(rewards, mixed_batch()[3])


def test_workers_score_items_concurrently(pool):
    # Items that wait (not compute) show the concurrency whatever else runs on the machine: 4 x 0.5 s on 2
    # workers take about 1 s, not 2 s.
    rewards, stats = pool.score(["x"] * 4, [{}] * 4, ["test_sleeping"] * 4)
    assert rewards.tolist() == [1.0] * 4
    assert stats.wall_time_s < 1.6


def test_bad_batches_raise_clear_errors(pool):
    with pytest.raises(ValueError, match=r"domains\[1\].*no_such_domain"):
        pool.score(["a", "b"], [{}, {}], ["math", "no_such_domain"])
    with pytest.raises(ValueError, match="same length"):
        pool.score(["a", "b"], [{}], ["math", "math"])
    with pytest.raises(ValueError, match="truncated has 1 entries"):
        pool.score(["a", "b"], [{}, {}], ["mcqa", "mcqa"], truncated=[True])
    with pytest.raises(ValueError, match="truncated must be booleans"):
        pool.score(["a", "b"], [{}, {}], ["mcqa", "mcqa"], truncated=["length", "stop"])
    with pytest.raises(ValueError, match=r"item 1 \(mcqa\): its response or spec"):
        pool.score(["a", "b"], [{"expected_answer": "A"}, {"expected_answer": "A", "hook": lambda: 0}], ["mcqa"] * 2)
    rewards, _ = pool.score(["Answer: A"], [{"expected_answer": "A"}], ["mcqa"])  # still usable
    assert rewards.tolist() == [1.0]
    register_reward("test_lambda", lambda response, spec: 1.0)
    try:
        with pytest.raises(ValueError, match="test_lambda.*top level"):
            pool.score(["a"], [{}], ["test_lambda"])
    finally:
        unregister_reward("test_lambda")


def test_a_spec_that_breaks_the_time_limit_fails_only_its_item(pool):
    specs = [{"tests": [], "timeout_s": "ten"}, {"expected_answer": "C"}]
    rewards, stats = pool.score(["x", "Answer: C"], specs, ["code", "mcqa"])
    np.testing.assert_array_equal(rewards, [0.0, 1.0])
    assert stats.statuses == ("error", "ok") and "time limit" in stats.failure_messages[0]


def test_score_batch_in_process_and_with_agent_refs():
    responses, specs, domains, expected = mixed_batch()
    agent_refs = [{"type": "responses_api_agents", "name": name} for name in domains]
    rewards, stats = score_batch(responses, specs, agent_refs, num_workers=0, truncated=np.zeros(6, bool))
    np.testing.assert_array_equal(rewards, expected)
    assert stats.num_workers == 0 and stats.summary()["num_scored"] == 6

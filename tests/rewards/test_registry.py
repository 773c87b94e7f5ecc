"""The reward registry: built-in names and aliases, spec adapters, user entries, unknown names."""

import pytest

from nemotron_jax.rewards import compute_reward, get_reward, register_reward, reward_names, unregister_reward


@pytest.mark.parametrize(
    ("domain", "name"),
    [
        ("math", "math"),
        ("math_with_judge", "math"),
        ("math_with_judge_simple_agent", "math"),
        ("mcqa", "mcqa"),
        ("mcqa_simple_agent", "mcqa"),
        ("instruction_following", "instruction_following"),
        ("instruction_following_simple_agent", "instruction_following"),
        ("code", "code"),
        ("code_gen", "code"),
        ({"type": "responses_api_agents", "name": "mcqa_simple_agent"}, "mcqa"),
    ],
)
def test_builtin_names_and_aliases(domain, name):
    assert get_reward(domain).name == name


def test_unknown_domain_raises_naming_it():
    with pytest.raises(ValueError, match="workbench_simple_agent"):
        get_reward("workbench_simple_agent")


def test_spec_adapters():
    assert compute_reward("math", r"\boxed{\frac{1}{2}}", {"expected_answer": "0.5"}) == 1.0
    assert compute_reward("math", r"\boxed{2}", {"ground_truth": "2"}) == 1.0
    mcqa_spec = {"expected_answer": "B", "template_metadata": {"output_regex": r"Final Choice:\s*([A-Za-z])"}}
    assert compute_reward("mcqa_simple_agent", "Final Choice: B", mcqa_spec) == 1.0
    assert compute_reward("mcqa_simple_agent", "Answer: B", mcqa_spec) == 0.0
    if_spec = {
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
        "kwargs": [{"keywords": None}, None],
    }
    assert compute_reward("instruction_following", "<<T>> a, b", if_spec) == 0.0
    assert compute_reward("instruction_following_fraction", "<<T>> a, b", if_spec) == 0.5
    with pytest.raises(ValueError, match="expected_answer"):
        compute_reward("math", r"\boxed{1}", {"question": "?"})


def test_code_entry_runs_the_answer_program_in_the_sandbox():
    # The reasoning's draft would fail; the answer's block echoes its input and passes.
    response = "<think>```python\nprint('draft')\n```</think>Here:\n```python\nprint(input())\n```"
    spec = {"tests": [{"input": "1\n", "output": "1\n"}, {"input": "x\n", "output": "x"}], "timeout_s": 2}
    assert compute_reward("code_gen", response, spec) == 1.0
    assert compute_reward("code", response.replace("print(input())", "print('1')"), spec) == 0.0
    assert compute_reward("code", "no code block", spec) == 0.0  # no program at all
    assert compute_reward("code", "<think>```python\nprint(input())\n```", spec) == 0.0  # unfinished thinking
    assert get_reward("code").timeout_for(spec) == pytest.approx(34.0)


def test_user_registration_and_removal():
    def shout_reward(response, spec):
        return 1.0 if response.isupper() else 0.0

    register_reward("test_shout", shout_reward, timeout_s=2.0, aliases=("test_shout_agent",))
    try:
        assert "test_shout_agent" in reward_names()
        assert compute_reward("test_shout_agent", "HI", {}) == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_shout", shout_reward)
        register_reward("test_shout", lambda response, spec: 0.0, overwrite=True)
        assert compute_reward("test_shout", "HI", {}) == 0.0
        # Aliases keep pointing at the name: overriding "math" also overrides "math_with_judge_simple_agent".
        assert compute_reward("test_shout_agent", "HI", {}) == 0.0
    finally:
        unregister_reward("test_shout")
    with pytest.raises(ValueError, match="test_shout"):
        get_reward("test_shout")


def test_reward_value_is_checked():
    register_reward("test_bad_value", lambda response, spec: 1.5)
    try:
        with pytest.raises(ValueError, match="outside"):
            compute_reward("test_bad_value", "x", {})
    finally:
        unregister_reward("test_bad_value")

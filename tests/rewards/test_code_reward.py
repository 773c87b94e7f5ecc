"""Tests for `nemotron_jax.rewards.code`: extraction, test parsing, stdin/stdout and function-call judging,
batching, and the throughput line of issue 4 (256 trivial programs in under 30 s on 2 cores)."""

from __future__ import annotations

import time

import pytest

from nemotron_jax.rewards.code import (
    CodeTestReport,
    code_reward,
    code_reward_batch,
    extract_code_block,
    normalize_stdout,
    parse_tests,
    program_from_response,
    run_code_tests,
    values_equal,
)
from nemotron_jax.rewards.sandbox import SandboxStatus

LIMITS = {"timeout_s": 5.0, "memory_mb": 256}

ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]


# ---------------------------------------------------------------------------------------------------------
# extraction and parsing (no sandbox)


def test_extract_code_block_takes_the_last_python_block_after_thinking():
    response = (
        "<think>\nMaybe:\n```python\nprint('draft')\n```\n</think>\n"
        "First attempt:\n```python\nprint('first')\n```\n"
        "A C++ version:\n```cpp\nint main() {}\n```\n"
        "Final:\n```py\nprint('final')\n```\nDone."
    )
    assert extract_code_block(response) == "print('final')"  # the newline before the fence is not kept
    assert extract_code_block("```\nprint(1)\n```") == "print(1)"  # untagged counts
    assert extract_code_block("```Python3 \nprint(2)\n```") == "print(2)"
    assert extract_code_block("<think>```python\nprint(1)\n```</think> no code") is None
    assert extract_code_block("```cpp\nint main() {}\n```") is None
    assert extract_code_block("```python\nprint('unterminated')\n") is None


def test_program_from_response():
    assert program_from_response("print(1)\n") == "print(1)\n"  # no fence: the text is the program
    assert program_from_response("<think>hmm</think>print(2)") == "print(2)"
    assert program_from_response("```cpp\nint main() {}\n```") is None  # fences, but no Python


def test_parse_tests_errors_name_the_test_and_field():
    with pytest.raises(ValueError, match="empty"):
        parse_tests([])
    with pytest.raises(ValueError, match=r"tests\[1\] is missing field 'output'"):
        parse_tests([{"input": "", "output": ""}, {"input": "1"}])
    with pytest.raises(TypeError, match=r"tests\[0\]\['input'\] must be a str"):
        parse_tests([{"input": 5, "output": "5"}])
    with pytest.raises(ValueError, match=r"tests\[0\] is missing field 'expected'"):
        parse_tests([{"fn_name": "f", "args": []}])
    with pytest.raises(ValueError, match="identifier"):
        parse_tests([{"fn_name": "not a name", "args": [], "expected": 1}])
    with pytest.raises(TypeError, match=r"tests\[0\]\['args'\] must be a list"):
        parse_tests([{"fn_name": "f", "args": "1, 2", "expected": 1}])
    with pytest.raises(ValueError, match="neither"):
        parse_tests([{"stdin": "1", "stdout": "1"}])
    with pytest.raises(TypeError, match="list of test dicts"):
        parse_tests("print(1)")
    with pytest.raises(ValueError, match="empty"):
        code_reward(ADD_PROGRAM, [], **LIMITS)


def test_stdout_normalisation():
    assert normalize_stdout("3 \r\n4\t\n\n\n") == ["3", "4"]
    assert normalize_stdout(" 3\n") == [" 3"]  # leading whitespace counts
    assert normalize_stdout("a\n\nb\n") == ["a", "", "b"]  # inner blank lines count


def test_values_equal():
    assert values_equal(0.30000000000000004, 0.3)
    assert not values_equal(0.31, 0.3)
    assert values_equal([1, [2, 3]], [1, [2, 3]]) and not values_equal([1, 2], [2, 1])
    assert not values_equal(True, 1) and not values_equal(1, True) and values_equal(False, False)
    assert values_equal(1, 1.0000000001) and not values_equal(1, 2)
    assert values_equal({"a": 1}, {"a": 1.0}) and not values_equal({"a": 1}, {"b": 1})
    assert not values_equal("1", 1) and not values_equal(None, 0) and values_equal(None, None)
    assert values_equal(float("nan"), float("nan")) and values_equal(float("inf"), float("inf"))


# ---------------------------------------------------------------------------------------------------------
# running programs


def test_stdin_stdout_tests():
    assert code_reward(ADD_PROGRAM, ADD_TESTS, **LIMITS) == 1.0
    assert code_reward("a, b = map(int, input().split())\nprint(a - b)\n", ADD_TESTS, **LIMITS) == 0.0
    # Trailing whitespace and trailing newlines do not matter; anything else does.
    assert code_reward("print('3   ')\nprint()\nprint()", [{"input": "", "output": "3"}], **LIMITS) == 1.0
    assert code_reward("print(' 3')", [{"input": "", "output": "3"}], **LIMITS) == 0.0
    assert code_reward("print('Yes')", [{"input": "", "output": "YES"}], **LIMITS) == 0.0
    # A model response is reduced to its last Python block.
    response = f"Here is my solution.\n```python\n{ADD_PROGRAM}```\n"
    assert code_reward(response, ADD_TESTS, **LIMITS) == 1.0
    assert code_reward("```cpp\nint main() {}\n```", ADD_TESTS, **LIMITS) == 0.0


def test_function_call_tests():
    program = (
        "import sys\n"
        "def add(a, b, scale=1):\n    print('debug output is ignored')\n    return (a + b) * scale\n"
        "def pair(x):\n    return (x, [x], {'k': {x}})\n"
        "def half(x):\n    return x / 2\n"
        "def is_even(x):\n    return x % 2 == 0\n"
        "if __name__ == '__main__':\n    sys.exit('the main block must not run for function-call tests')\n"
    )
    tests = [
        {"fn_name": "add", "args": [1, 2], "expected": 3},
        {"fn_name": "add", "args": [1, 2], "kwargs": {"scale": 10}, "expected": 30},
        {"fn_name": "pair", "args": ["a"], "expected": ["a", ["a"], {"k": ["a"]}]},
        {"fn_name": "half", "args": [1], "expected": 0.5000000001},
        {"fn_name": "is_even", "args": [4], "expected": True},
    ]
    report = run_code_tests(program, tests, **LIMITS)
    assert report.all_passed and report.reward == 1.0, report
    assert [o.kind for o in report.outcomes] == ["function_call"] * 5
    wrong = [{"fn_name": "is_even", "args": [3], "expected": True}]
    assert code_reward(program, wrong, **LIMITS) == 0.0
    int_for_bool = [{"fn_name": "add", "args": [0, 1], "expected": True}]
    assert code_reward(program, int_for_bool, **LIMITS) == 0.0


def test_leetcode_style_solution_class():
    program = (
        "from typing import List\n"
        "class Solution:\n"
        "    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        seen = {}\n"
        "        for i, n in enumerate(nums):\n"
        "            if target - n in seen:\n                return [seen[target - n], i]\n"
        "            seen[n] = i\n"
    )
    tests = [{"fn_name": "twoSum", "args": [[2, 7, 11, 15], 9], "expected": [0, 1]},
             {"fn_name": "twoSum", "args": [[3, 2, 4], 6], "expected": [1, 2]}]
    assert code_reward(program, tests, **LIMITS) == 1.0


def test_report_explains_each_failure():
    program = (
        "import sys\n"
        "data = sys.stdin.read().split()\n"
        "if data[0] == 'loop':\n    while True:\n        pass\n"
        "if data[0] == 'crash':\n    raise RuntimeError('bad input')\n"
        "print(data[0])\n"
    )
    tests = [
        {"input": "ok", "output": "ok"},
        {"input": "wrong", "output": "right"},
        {"input": "crash", "output": "crash"},
        {"input": "loop", "output": "loop"},
    ]
    report = run_code_tests(program, tests, timeout_s=1.0, memory_mb=256)
    assert isinstance(report, CodeTestReport) and report.num_tests == 4 and report.num_passed == 1
    assert [o.passed for o in report.outcomes] == [True, False, False, False]
    assert report.outcomes[1].reason == "wrong output" and report.outcomes[1].actual == "wrong\n"
    assert report.outcomes[2].status is SandboxStatus.FAILED and "RuntimeError: bad input" in report.outcomes[2].reason
    assert report.outcomes[3].status is SandboxStatus.TIMED_OUT
    assert report.reward == 0.0
    # code_reward stops at the first failure: the 1 s timeout is never reached.
    start = time.monotonic()
    assert code_reward(program, tests, timeout_s=1.0, memory_mb=256) == 0.0
    assert time.monotonic() - start < 1.0
    missing = run_code_tests("def g():\n    return 1\n", [{"fn_name": "f", "args": [], "expected": 1}], **LIMITS)
    assert not missing.all_passed and "defines no function 'f'" in missing.outcomes[0].reason


def test_expected_output_never_enters_the_sandbox():
    # A program that forges a plausible result on file descriptor 1 and exits before the harness runs
    # cannot pass unless it produces the expected value itself.
    forger = "import os\nos.write(1, b'42')\nos._exit(0)\n"
    assert code_reward(forger, [{"fn_name": "f", "args": [], "expected": 41}], **LIMITS) == 0.0
    nested = "import os\nos.write(1, b'[' * 200000)\nos._exit(0)\n"  # would overflow a recursive parser
    report = run_code_tests(nested, [{"fn_name": "f", "args": [], "expected": 1}], **LIMITS)
    assert not report.all_passed and "no readable JSON" in report.outcomes[0].reason
    reader = "import os\nprint(sorted(os.listdir('.')), open(__file__).read().count('expected'))"
    report = run_code_tests(reader, [{"input": "", "output": "secret-answer"}], **LIMITS)
    assert "secret-answer" not in report.outcomes[0].actual


def test_batch_matches_single_and_keeps_order():
    programs = [ADD_PROGRAM, "print('nope')", f"```python\n{ADD_PROGRAM}```", "while True: pass"] * 3
    tests_list = [ADD_TESTS] * len(programs)
    rewards = code_reward_batch(programs, tests_list, timeout_s=1.0, memory_mb=256)
    assert rewards == [1.0, 0.0, 1.0, 0.0] * 3
    with pytest.raises(ValueError, match="programs has 2 entries but tests_list has 1"):
        code_reward_batch(["a", "b"], [ADD_TESTS], **LIMITS)
    with pytest.raises(ValueError, match=r"tests_list\[1\] is empty"):
        code_reward_batch(["a", "b"], [ADD_TESTS, []], **LIMITS)
    assert code_reward_batch([], [], **LIMITS) == []


def test_throughput_256_trivial_programs_under_30_seconds():
    programs = [f"a, b = map(int, input().split())\nprint(a + b + {i} - {i})\n" for i in range(256)]
    tests_list = [[{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"}] for i in range(256)]
    start = time.monotonic()
    rewards = code_reward_batch(programs, tests_list, **LIMITS)
    elapsed = time.monotonic() - start
    assert rewards == [1.0] * 256
    assert elapsed < 30.0, f"256 trivial programs took {elapsed:.1f} s"

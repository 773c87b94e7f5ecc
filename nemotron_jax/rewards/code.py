"""Code reward: run a (model-written) Python program against test cases in the sandbox.

Two kinds of test case, as plain dicts (the form data sets store):

- stdin/stdout: `{"input": str, "output": str}`. The program gets `input` on stdin; its stdout must equal
  `output` after normalisation: trailing whitespace is removed from every line (so `\\r\\n` and `\\n` agree)
  and trailing empty lines are dropped. Leading whitespace, blank lines inside the output and letter case
  all count.
- function call: `{"fn_name": str, "args": list, "expected": any JSON value}` (optional `"kwargs": dict`).
  The program is loaded as a module named `solution` (so an `if __name__ == "__main__":` block does not
  run), then `fn_name(*args, **kwargs)` is called: a top-level function of that name, or else a method of a
  class `Solution` (LeetCode style, called on `Solution()`). The return value travels back as JSON (tuples
  become lists, sets sorted lists) and is compared with `expected`: equal types and structure, strings
  exactly, floats with `math.isclose(rel_tol=1e-6, abs_tol=1e-6)`, bools not equal to numbers.

Each test runs in its own sandboxed process (`sandbox.run_sandboxed`), with `timeout_s` and `memory_mb` per
test. `code_reward` is 1.0 only if every test passes, else 0.0 (it stops at the first failure);
`run_code_tests` returns a per-test `CodeTestReport` for debugging; `code_reward_batch` scores many programs
concurrently on every core.

Program extraction: a model response is reduced to the program by `extract_code_block`, which looks only at
the text after the last `</think>` (when there is one) and takes the LAST fenced block tagged `python`,
`py`, `python3` or untagged. Text with no ``` fence at all is taken as the program itself; text with fences
but no Python block yields no program (reward 0).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from nemotron_jax.rewards.answer import THINK_CLOSE, last_code_block
from nemotron_jax.rewards.sandbox import SandboxResult, SandboxStatus, run_sandboxed

FLOAT_REL_TOL = 1e-6
FLOAT_ABS_TOL = 1e-6
_SHOWN_CHARS = 500  # how much of expected / actual output a report keeps
_DEFAULT_WORKERS_PER_CPU = 4


@dataclasses.dataclass(frozen=True)
class StdioTest:
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class FunctionCallTest:
    fn_name: str
    args: tuple
    kwargs: Mapping[str, Any]
    expected: Any


TestCase = StdioTest | FunctionCallTest


@dataclasses.dataclass(frozen=True)
class TestOutcome:
    """One test's result. `status` is the sandbox status of its run; `reason` says why it failed."""

    index: int
    kind: str  # "stdio" or "function_call"
    passed: bool
    status: SandboxStatus
    reason: str
    expected: str
    actual: str
    wall_time_s: float


@dataclasses.dataclass(frozen=True)
class CodeTestReport:
    """All tests of one program. `outcomes` stops early when `stop_on_first_failure` was set."""

    program: str | None
    num_tests: int
    outcomes: tuple[TestOutcome, ...]
    message: str = ""

    @property
    def num_passed(self) -> int:
        return sum(outcome.passed for outcome in self.outcomes)

    @property
    def all_passed(self) -> bool:
        return self.program is not None and self.num_passed == self.num_tests

    @property
    def reward(self) -> float:
        return 1.0 if self.all_passed else 0.0


# ----------------------------------------------------------------------------------------------------------
# parsing


def extract_code_block(response: str) -> str | None:
    """The last ```python (or ```py, ```python3, untagged) block after the last `</think>`, or None."""
    return last_code_block(response.rsplit(THINK_CLOSE, 1)[-1])


def program_from_response(response: str) -> str | None:
    """The program to run: the extracted code block, or the whole text when it has no ``` fence at all."""
    text = response.rsplit(THINK_CLOSE, 1)[-1]
    block = last_code_block(text)
    if block is not None:
        return block
    return None if "```" in text else text


def parse_tests(tests: Sequence[Mapping[str, Any]], *, where: str = "tests") -> list[TestCase]:
    """Validates test dicts into `StdioTest` / `FunctionCallTest`; errors name the test index and field."""
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence):
        raise TypeError(f"{where} must be a list of test dicts, got {type(tests).__name__}")
    if len(tests) == 0:
        raise ValueError(f"{where} is empty: a code reward needs at least one test")
    parsed: list[TestCase] = []
    for index, test in enumerate(tests):
        label = f"{where}[{index}]"
        if not isinstance(test, Mapping):
            raise TypeError(f"{label} must be a dict, got {type(test).__name__}")
        if "fn_name" in test:
            parsed.append(_parse_function_call(test, label))
        elif "input" in test or "output" in test:
            for field in ("input", "output"):
                if field not in test:
                    raise ValueError(f"{label} is missing field {field!r} (stdin/stdout tests need input and output)")
                if not isinstance(test[field], str):
                    raise TypeError(f"{label}[{field!r}] must be a str, got {type(test[field]).__name__}")
            parsed.append(StdioTest(test["input"], test["output"]))
        else:
            raise ValueError(
                f"{label} has neither 'input'/'output' (stdin/stdout test) nor 'fn_name' (function-call test); "
                f"fields: {sorted(test)}"
            )
    return parsed


def _parse_function_call(test: Mapping[str, Any], label: str) -> FunctionCallTest:
    fn_name = test["fn_name"]
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"{label}['fn_name'] must be a Python identifier, got {fn_name!r}")
    for field in ("args", "expected"):
        if field not in test:
            raise ValueError(f"{label} is missing field {field!r} (function-call tests need fn_name, args, expected)")
    args, kwargs = test["args"], test.get("kwargs", {})
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"{label}['args'] must be a list of positional arguments, got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{label}['kwargs'] must be a dict, got {type(kwargs).__name__}")
    for field, value in (("args", list(args)), ("kwargs", dict(kwargs)), ("expected", test["expected"])):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{label}[{field!r}] is not JSON-serialisable: {error}") from None
    return FunctionCallTest(fn_name, tuple(args), dict(kwargs), test["expected"])


# ----------------------------------------------------------------------------------------------------------
# comparison


def normalize_stdout(text: str) -> list[str]:
    """Lines with trailing whitespace removed and trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def values_equal(actual: Any, expected: Any) -> bool:
    """Structural equality of JSON values, floats within FLOAT_REL_TOL / FLOAT_ABS_TOL, bool != number."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        try:
            if math.isnan(actual) or math.isnan(expected):
                return math.isnan(actual) and math.isnan(expected)
            return math.isclose(actual, expected, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
        except OverflowError:  # an int beyond float range (10**400) is not close to any float
            return False
    if isinstance(actual, list) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(values_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, Mapping):
        return actual.keys() == expected.keys() and all(values_equal(actual[k], expected[k]) for k in actual)
    if actual is None or expected is None:
        return actual is None and expected is None
    return type(actual) is type(expected) and actual == expected


# ----------------------------------------------------------------------------------------------------------
# running

# The program is exec'd as module `solution`; its prints go to stderr so that stdout carries only the
# result, as JSON. The harness imports nothing (not even `json`, whose import costs as much as a whole run):
# the call arrives as Python literals and the result is encoded by `_encode` below.
_HARNESS = """\
import sys as _sys

def _encode(value, out):
    if value is None or value is True or value is False:
        out.append("null" if value is None else "true" if value else "false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append("NaN" if value != value else "Infinity" if value == float("inf")
                   else "-Infinity" if value == float("-inf") else float.__repr__(value))
    elif isinstance(value, str):
        out.append('"')
        for char in value:
            out.append('\\\\' + char if char in '"\\\\' else char if char >= " " else "\\\\u%04x" % ord(char))
        out.append('"')
    elif isinstance(value, (list, tuple, set, frozenset)):
        if isinstance(value, (set, frozenset)):
            try:
                value = sorted(value)
            except TypeError:
                value = list(value)
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(", ")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(", ")
            if not isinstance(key, str):
                if key is not None and not isinstance(key, (int, float)):
                    raise TypeError("dict key of type %s cannot be a JSON key" % type(key).__name__)
                key = "".join(_encode_to_list(key)).strip('"')
            _encode(key, out)
            out.append(": ")
            _encode(item, out)
        out.append("}")
    else:
        raise TypeError("return value of type %s is not JSON-like" % type(value).__name__)

def _encode_to_list(value):
    out = []
    _encode(value, out)
    return out

def _main(source, fn_name, args, kwargs):
    result_stream, _sys.stdout = _sys.stdout, _sys.stderr
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    exec(compile(source, "solution.py", "exec"), namespace)
    target = namespace.get(fn_name)
    if not callable(target):
        solution_class = namespace.get("Solution")
        if solution_class is None or not callable(getattr(solution_class, fn_name, None)):
            raise SystemExit("harness: the program defines no function %r (nor Solution.%s)" % (fn_name, fn_name))
        target = getattr(solution_class(), fn_name)
    encoded = "".join(_encode_to_list(target(*args, **kwargs)))
    _sys.stdout.flush()
    result_stream.write(encoded)
    result_stream.flush()

"""


def _python_literal(value: Any) -> str:
    """Python source for a JSON value (what `json.loads` returns), including non-finite floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)  # None, bool, int, finite float, str


def _harness_program(program: str, test: FunctionCallTest) -> str:
    call = ", ".join(_python_literal(part) for part in (program, test.fn_name, list(test.args), dict(test.kwargs)))
    return _HARNESS + f"_main({call})\n"


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... [{len(text)} chars]"


def _run_one(program: str, test: TestCase, index: int, timeout_s: float, memory_mb: int,
             sandbox_options: Mapping[str, Any]) -> TestOutcome:
    if isinstance(test, StdioTest):
        result = run_sandboxed(program, stdin=test.input, timeout_s=timeout_s, memory_mb=memory_mb, **sandbox_options)
        expected_text = test.output
        passed, reason = _judge_stdio(result, test)
        kind = "stdio"
    else:
        result = run_sandboxed(_harness_program(program, test), timeout_s=timeout_s, memory_mb=memory_mb,
                               **sandbox_options)
        expected_text = json.dumps(test.expected)
        passed, reason = _judge_function_call(result, test)
        kind = "function_call"
    return TestOutcome(index, kind, passed, result.status, reason, _shown(expected_text), _shown(result.stdout),
                       result.wall_time_s)


def _failure_reason(result: SandboxResult) -> str:
    tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
    return f"{result.status.value}: {result.message}" + (f" ({tail[0][:200]})" if tail else "")


def _judge_stdio(result: SandboxResult, test: StdioTest) -> tuple[bool, str]:
    if not result.passed:
        return False, _failure_reason(result)
    if normalize_stdout(result.stdout) != normalize_stdout(test.output):
        return False, "wrong output"
    return True, ""


def _judge_function_call(result: SandboxResult, test: FunctionCallTest) -> tuple[bool, str]:
    if not result.passed:
        return False, _failure_reason(result)
    try:
        actual = json.loads(result.stdout)
    except (ValueError, RecursionError):  # the program can write to file descriptor 1 itself
        return False, "the harness printed no readable JSON result (did the program write to file descriptor 1?)"
    if not values_equal(actual, test.expected):
        return False, "wrong return value"
    return True, ""


def run_code_tests(
    program: str,
    tests: Sequence[Mapping[str, Any]],
    *,
    timeout_s: float,
    memory_mb: int,
    stop_on_first_failure: bool = False,
    extract: bool = True,
    **sandbox_options: Any,
) -> CodeTestReport:
    """Runs `program` (or the program in a model response, when `extract`) on each test, one sandbox each.

    `timeout_s` and `memory_mb` apply to each test's run; `sandbox_options` go to `run_sandboxed`
    (e.g. `max_output_bytes`). Raises ValueError / TypeError for malformed tests, naming the test.
    """
    parsed = parse_tests(tests)
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    source = program_from_response(program) if extract else program
    if source is None:
        return CodeTestReport(None, len(parsed), (), message="the response has code fences but no Python block")
    outcomes = []
    for index, test in enumerate(parsed):
        outcome = _run_one(source, test, index, timeout_s, memory_mb, sandbox_options)
        outcomes.append(outcome)
        if stop_on_first_failure and not outcome.passed:
            break
    return CodeTestReport(source, len(parsed), tuple(outcomes))


def code_reward(
    program: str,
    tests: Sequence[Mapping[str, Any]],
    *,
    timeout_s: float,
    memory_mb: int,
    **sandbox_options: Any,
) -> float:
    """1.0 if `program` (a program or a model response) passes every test, else 0.0. See module docstring."""
    report = run_code_tests(program, tests, timeout_s=timeout_s, memory_mb=memory_mb, stop_on_first_failure=True,
                            **sandbox_options)
    return report.reward


def code_reward_batch(
    programs: Sequence[str],
    tests_list: Sequence[Sequence[Mapping[str, Any]]],
    *,
    timeout_s: float,
    memory_mb: int,
    max_workers: int | None = None,
    **sandbox_options: Any,
) -> list[float]:
    """`code_reward` for each (program, tests) pair, run concurrently; returns rewards in input order.

    The work happens in the sandboxed child processes, so threads (one waiting on each child) keep every
    core busy; `max_workers` defaults to four times the number of CPUs, because part of a run's wall time
    is spent waiting on the kernel (namespace set-up and tear-down), not computing; on a loaded 2-core
    machine 8 workers gave 2.3x the throughput of 2. All tests are validated before anything runs.
    """
    if len(programs) != len(tests_list):
        raise ValueError(f"programs has {len(programs)} entries but tests_list has {len(tests_list)}")
    for index, tests in enumerate(tests_list):
        parse_tests(tests, where=f"tests_list[{index}]")
    workers = max_workers if max_workers is not None else _DEFAULT_WORKERS_PER_CPU * (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    if not programs:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-reward") as pool:
        futures = [
            pool.submit(code_reward, program, tests, timeout_s=timeout_s, memory_mb=memory_mb, **sandbox_options)
            for program, tests in zip(programs, tests_list)
        ]
        return [future.result() for future in futures]

"""Throughput of `code_reward_batch` on trivial programs (issue 4: 256 programs in under 30 s on 2 cores).

Runs, side by side in one process: the batch at several worker counts and tests per program, stdin/stdout
and function-call tests, with and without namespaces, plus the latency of single sequential runs. Writes
JSON (machine load included, since other work on the machine changes the figures).

    python -m experiments.benchmarks.code_reward_throughput --output=/tmp/code_reward_throughput.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

from nemotron_jax.rewards.code import code_reward_batch
from nemotron_jax.rewards.sandbox import run_sandboxed, sandbox_capabilities

_NUM_PROGRAMS = flags.DEFINE_integer("num_programs", 256, "programs per batch")
_TESTS_PER_PROGRAM = flags.DEFINE_list("tests_per_program", ["1", "3"], "test cases per program")
_WORKERS = flags.DEFINE_list("max_workers", ["0", "2", "16"], "thread counts to compare; 0 = library default")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 5.0, "per-test wall-clock limit")
_MEMORY_MB = flags.DEFINE_integer("memory_mb", 256, "per-process memory limit")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 30, "sequential single runs for the latency figures")
_OUTPUT = flags.DEFINE_string("output", "code_reward_throughput.json", "where to write the JSON results")


def _stdio_batch(num_programs: int, tests_per_program: int):
    programs = [f"a, b = map(int, input().split())\nprint(a + b + {i} - {i})\n" for i in range(num_programs)]
    tests = [
        [{"input": f"{i} {j}\n", "output": f"{i + j}\n"} for j in range(tests_per_program)]
        for i in range(num_programs)
    ]
    return programs, tests


def _function_call_batch(num_programs: int, tests_per_program: int):
    programs = [f"def add(a, b):\n    return a + b + {i} - {i}\n" for i in range(num_programs)]
    tests = [
        [{"fn_name": "add", "args": [i, j], "expected": i + j} for j in range(tests_per_program)]
        for i in range(num_programs)
    ]
    return programs, tests


def _timed_batch(programs, tests, workers: int, namespaces: bool = True) -> dict:
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    rewards = code_reward_batch(
        programs, tests, timeout_s=_TIMEOUT_S.value, memory_mb=_MEMORY_MB.value,
        max_workers=workers or None, namespaces=namespaces,
    )
    wall_s = time.monotonic() - start
    runs = sum(len(t) for t in tests)
    return {
        "programs": len(programs),
        "sandbox_runs": runs,
        "max_workers": workers or f"default ({4 * (os.cpu_count() or 1)})",
        "namespaces": namespaces,
        "wall_s": round(wall_s, 3),
        "runs_per_s": round(runs / wall_s, 1),
        "all_rewards_1": all(r == 1.0 for r in rewards),
        "loadavg_1min_before": load_before,
    }


def _latency(namespaces: bool) -> dict:
    times = []
    for i in range(_LATENCY_RUNS.value):
        result = run_sandboxed(f"print({i})", timeout_s=_TIMEOUT_S.value, memory_mb=_MEMORY_MB.value,
                               namespaces=namespaces)
        assert result.passed, result
        times.append(result.wall_time_s * 1000)
    return {"namespaces": namespaces, "runs": len(times), "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 2)}


def main(argv):
    del argv
    capabilities = sandbox_capabilities()
    results = {
        "benchmark": "code_reward_throughput",
        "command": " ".join([sys.executable, "-m", "experiments.benchmarks.code_reward_throughput"] + sys.argv[1:]),
        "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg(),
        },
        "sandbox": {"isolation": sorted(capabilities.isolation), "python": capabilities.python,
                    "degradations": list(capabilities.degradations)},
        "latency": [_latency(True), _latency(False)],
        "batches": [],
    }
    for tests_per_program in (int(n) for n in _TESTS_PER_PROGRAM.value):
        for kind, make in (("stdio", _stdio_batch), ("function_call", _function_call_batch)):
            programs, tests = make(_NUM_PROGRAMS.value, tests_per_program)
            for workers in (int(w) for w in _WORKERS.value):
                entry = {"kind": kind, "tests_per_program": tests_per_program}
                entry.update(_timed_batch(programs, tests, workers))
                results["batches"].append(entry)
                print(json.dumps(entry), flush=True)
    programs, tests = _stdio_batch(_NUM_PROGRAMS.value, 1)
    entry = {"kind": "stdio", "tests_per_program": 1}
    entry.update(_timed_batch(programs, tests, 0, namespaces=False))
    results["batches"].append(entry)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    with open(_OUTPUT.value, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["latency"]))
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)

"""Scoring rules and statistics shared by the process pool (``reward_pool``) and in-process scoring.

``score_batch`` (in ``reward_pool``) and ``score_in_process`` return the rewards ``float32 [B]`` and a
``ScoreStats`` that counts every item that was not scored normally. The rules, in order:

1. ``truncated[i]`` (the response hit the length limit; "overlong") -> reward 0, status ``truncated``; the
   verifier is not called. This is Cascade RL's overlong penalty, applied here once for every domain.
2. ``thinking[i]`` and the response has no ``</think>`` -> reward 0, status ``unfinished_thinking`` (the model
   stopped inside its reasoning; there is no answer to grade).
3. Otherwise the domain's registered reward function runs (in the pool, in a worker process). It returns a
   float in [0, 1] (status ``ok``), or: it raises / returns a non-number or a value outside [0, 1] -> 0, status
   ``error``; it runs past its time limit (or raises ``TimeoutError``) -> 0, status ``timeout``, and the worker
   is killed and replaced; its worker process dies -> 0, status ``crashed``, and the worker is replaced.
   Failures never abort the batch, and never pass silently: ``stats.num_failures`` counts them, ``stats.failure_messages``
   names the first ones, ``stats.statuses`` has every item's status.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from nemotron_jax.rewards.answer import THINK_CLOSE
from nemotron_jax.rewards.registry import check_reward_value, get_reward

STATUS_OK = "ok"
STATUS_TRUNCATED = "truncated"
STATUS_UNFINISHED_THINKING = "unfinished_thinking"
STATUS_ERROR = "error"
STATUS_TIMEOUT = "timeout"
STATUS_CRASHED = "crashed"
FAILURE_STATUSES = frozenset({STATUS_ERROR, STATUS_TIMEOUT, STATUS_CRASHED})

# ``truncated`` / ``thinking``: one bool for the whole batch, or ``[B]`` bools; ``None`` = all False.
ItemFlags = bool | Sequence[bool] | np.ndarray | None

_MAX_FAILURE_MESSAGES = 20
_MAX_MESSAGE_CHARS = 500


@dataclasses.dataclass(frozen=True)
class ScoreStats:
    """What happened to each item of a scored batch.

    ``statuses[i]`` is one of ``ok``, ``truncated``, ``unfinished_thinking`` (zero reward by rule, not failures)
    and ``error``, ``timeout``, ``crashed`` (failures: the reward is 0 because the verifier failed).
    """

    statuses: tuple[str, ...]
    failures_by_domain: Mapping[str, int]
    failure_messages: tuple[str, ...]
    num_workers: int
    worker_restarts: int
    wall_time_s: float
    verifier_cpu_s: float  # CPU time spent in reward functions (worker processes, not programs they start)

    def count(self, status: str) -> int:
        return sum(1 for each in self.statuses if each == status)

    @property
    def num_items(self) -> int:
        return len(self.statuses)

    @property
    def num_scored(self) -> int:
        return self.count(STATUS_OK)

    @property
    def num_truncated(self) -> int:
        return self.count(STATUS_TRUNCATED)

    @property
    def num_unfinished_thinking(self) -> int:
        return self.count(STATUS_UNFINISHED_THINKING)

    @property
    def num_errors(self) -> int:
        return self.count(STATUS_ERROR)

    @property
    def num_timeouts(self) -> int:
        return self.count(STATUS_TIMEOUT)

    @property
    def num_crashes(self) -> int:
        return self.count(STATUS_CRASHED)

    @property
    def num_failures(self) -> int:
        return self.num_errors + self.num_timeouts + self.num_crashes

    def summary(self) -> dict[str, Any]:
        """Counts as a flat dict (for metrics logging)."""
        return {
            "num_items": self.num_items,
            "num_scored": self.num_scored,
            "num_truncated": self.num_truncated,
            "num_unfinished_thinking": self.num_unfinished_thinking,
            "num_errors": self.num_errors,
            "num_timeouts": self.num_timeouts,
            "num_crashes": self.num_crashes,
            "num_failures": self.num_failures,
            "worker_restarts": self.worker_restarts,
            "num_workers": self.num_workers,
            "wall_time_s": self.wall_time_s,
            "verifier_cpu_s": self.verifier_cpu_s,
        }


class ScoredBatch(NamedTuple):
    rewards: np.ndarray  # float32 [B]
    stats: ScoreStats


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# Batch preparation, shared by the pool and the in-process path.


@dataclasses.dataclass
class BatchItem:
    index: int
    domain: str
    fn: Any
    response: str
    spec: Mapping[str, Any]
    timeout_s: float


class BatchState:
    """Rewards, statuses and failure messages of one batch being scored."""

    def __init__(self, size: int) -> None:
        self.rewards = np.zeros(size, dtype=np.float32)
        self.statuses: list[str | None] = [None] * size
        self.domains: list[str] = [""] * size
        self.messages: list[str] = []
        self.cpu_seconds = 0.0

    def record(
        self, index: int, reward: float, status: str, message: str | None = None, cpu_seconds: float = 0.0
    ) -> None:
        self.cpu_seconds += cpu_seconds
        self.rewards[index] = reward if status == STATUS_OK else 0.0
        self.statuses[index] = status
        if status in FAILURE_STATUSES and len(self.messages) < _MAX_FAILURE_MESSAGES:
            text = f"item {index} ({self.domains[index]}): {status}"
            if message:
                text += f": {message[:_MAX_MESSAGE_CHARS]}"
            self.messages.append(text)

    def finish(self, num_workers: int, worker_restarts: int, started_at: float) -> ScoredBatch:
        missing = [index for index, status in enumerate(self.statuses) if status is None]
        if missing:  # an internal invariant, not a user error
            raise RuntimeError(f"items {missing[:10]} were never scored")
        failures = collections.Counter(
            self.domains[index] for index, status in enumerate(self.statuses) if status in FAILURE_STATUSES
        )
        stats = ScoreStats(
            statuses=tuple(self.statuses),  # type: ignore[arg-type]
            failures_by_domain=dict(failures),
            failure_messages=tuple(self.messages),
            num_workers=num_workers,
            worker_restarts=worker_restarts,
            wall_time_s=time.perf_counter() - started_at,
            verifier_cpu_s=self.cpu_seconds,
        )
        return ScoredBatch(self.rewards, stats)


def _as_flags(values: ItemFlags, size: int, name: str) -> list[bool]:
    if values is None:
        return [False] * size
    if isinstance(values, (bool, np.bool_)):
        return [bool(values)] * size
    array = np.asarray(values)
    if array.dtype.kind not in "biu":  # e.g. finish reasons: pass `finish_reason == "length"` instead
        raise ValueError(f"{name} must be booleans, got an array of dtype {array.dtype}")
    flags = [bool(value) for value in array.reshape(-1)]
    if len(flags) != size:
        raise ValueError(f"{name} has {len(flags)} entries but there are {size} responses")
    return flags


def prepare_batch(
    responses: Sequence[str],
    specs: Sequence[Mapping[str, Any]],
    domains: Sequence[str | Mapping[str, Any]],
    truncated: ItemFlags,
    thinking: ItemFlags,
    timeout_s: float | None,
) -> tuple[BatchState, list[BatchItem]]:
    size = len(responses)
    if len(specs) != size or len(domains) != size:
        raise ValueError(
            f"responses, specs and domains must have the same length, got {size}, {len(specs)}, {len(domains)}"
        )
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    truncated_flags = _as_flags(truncated, size, "truncated")
    thinking_flags = _as_flags(thinking, size, "thinking")
    state = BatchState(size)
    items = []
    for index, (response, spec, domain) in enumerate(zip(responses, specs, domains)):
        if not isinstance(response, str):
            raise ValueError(f"responses[{index}] must be a str, got {type(response).__name__}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"specs[{index}] must be a mapping, got {type(spec).__name__}")
        try:
            entry = get_reward(domain)
        except ValueError as error:
            raise ValueError(f"domains[{index}]: {error}") from None
        state.domains[index] = entry.name
        if truncated_flags[index]:
            state.record(index, 0.0, STATUS_TRUNCATED)
        elif thinking_flags[index] and THINK_CLOSE not in response:
            state.record(index, 0.0, STATUS_UNFINISHED_THINKING)
        else:
            try:
                item_timeout = timeout_s if timeout_s is not None else entry.timeout_for(spec)
            except Exception as error:  # a malformed spec: this item fails, the batch goes on
                state.record(index, 0.0, STATUS_ERROR, f"time limit: {type(error).__name__}: {error}")
                continue
            items.append(BatchItem(index, entry.name, entry.fn, response, spec, item_timeout))
    return state, items


def run_reward(
    fn: Any, domain: str, response: str, spec: Mapping[str, Any]
) -> tuple[float, str, str | None, float]:
    """Runs one reward function: (reward, status, error message, CPU seconds). Never raises."""
    started = time.process_time()
    try:
        reward, status, message = check_reward_value(fn(response, spec), domain), STATUS_OK, None
    except TimeoutError as error:  # e.g. math-verify's own limit (MathVerifyTimeout)
        reward, status, message = 0.0, STATUS_TIMEOUT, f"{type(error).__name__}: {error}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - a verifier may raise anything; it is reported, not hidden
        reward, status, message = 0.0, STATUS_ERROR, f"{type(error).__name__}: {error}"
    return reward, status, message, time.process_time() - started


def score_in_process(
    responses: Sequence[str],
    specs: Sequence[Mapping[str, Any]],
    domains: Sequence[str | Mapping[str, Any]],
    *,
    truncated: ItemFlags = None,
    thinking: ItemFlags = None,
) -> ScoredBatch:
    """The same rules as ``score_batch``, one item after another in this process, WITHOUT time limits.

    For debugging and small batches; a hanging verifier hangs this call.
    """
    started_at = time.perf_counter()
    state, items = prepare_batch(responses, specs, domains, truncated, thinking, None)
    for item in items:
        state.record(item.index, *run_reward(item.fn, item.domain, item.response, item.spec))
    return state.finish(num_workers=0, worker_restarts=0, started_at=started_at)

"""Batched reward scoring on every core, robust to verifiers that raise, hang or crash.

``score_batch(responses, specs, domains, truncated=...)`` returns the rewards ``float32 [B]`` and a
``ScoreStats`` that counts every item that was not scored normally. The rules, in order:

1. ``truncated[i]`` (the response hit the length limit; "overlong") -> reward 0, status ``truncated``; the
   verifier is not called. This is Cascade RL's overlong penalty, applied here once for every domain.
2. ``thinking[i]`` and the response has no ``</think>`` -> reward 0, status ``unfinished_thinking`` (the model
   stopped inside its reasoning; there is no answer to grade).
3. Otherwise the domain's registered reward function runs in a worker process. It returns a float in [0, 1]
   (status ``ok``), or: it raises / returns a non-number or a value outside [0, 1] -> 0, status ``error``; it
   runs past its time limit (or raises ``TimeoutError``) -> 0, status ``timeout``, and the worker is killed and
   replaced; its worker process dies -> 0, status ``crashed``, and the worker is replaced. Failures never
   abort the batch, and never pass silently: ``stats.num_failures`` counts them, ``stats.failure_messages``
   names the first ones, ``stats.statuses`` has every item's status.

Workers never fork the caller: the parent usually has JAX (and its threads) loaded, and forking a multi-threaded
process is unsafe. On Linux they come from multiprocessing's ``forkserver``, a clean single-threaded process
that first imports ``nemotron_jax.rewards.worker_preload`` (SymPy, math-verify, langdetect's profiles: a few
seconds, once), so that each worker, and each replacement of a killed one, starts in milliseconds; elsewhere
(or with ``start_method="spawn"``) every worker imports those itself. A training loop should keep one
``RewardPool`` for the whole run; ``score_batch`` without a pool starts and stops one per call.

Each item gets a hard wall-clock limit enforced by the parent, which kills the worker's whole process group:
unlike a signal inside the worker, this also stops C code that never returns to the interpreter (a
catastrophic regex, a huge integer power). Workers also die with the parent (Linux parent-death signal).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
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
class _Item:
    index: int
    domain: str
    fn: Any
    response: str
    spec: Mapping[str, Any]
    timeout_s: float


class _BatchState:
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


def _as_flags(values: bool | Sequence[bool] | np.ndarray | None, size: int, name: str) -> list[bool]:
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


def _prepare(
    responses: Sequence[str],
    specs: Sequence[Mapping[str, Any]],
    domains: Sequence[str | Mapping[str, Any]],
    truncated: bool | Sequence[bool] | np.ndarray | None,
    thinking: bool | Sequence[bool] | np.ndarray | None,
    timeout_s: float | None,
) -> tuple[_BatchState, list[_Item]]:
    size = len(responses)
    if len(specs) != size or len(domains) != size:
        raise ValueError(
            f"responses, specs and domains must have the same length, got {size}, {len(specs)}, {len(domains)}"
        )
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    truncated_flags = _as_flags(truncated, size, "truncated")
    thinking_flags = _as_flags(thinking, size, "thinking")
    state = _BatchState(size)
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
            items.append(_Item(index, entry.name, entry.fn, response, spec, item_timeout))
    return state, items


def _run_item(
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
    truncated: bool | Sequence[bool] | np.ndarray | None = None,
    thinking: bool | Sequence[bool] | np.ndarray | None = None,
) -> ScoredBatch:
    """The same rules as ``score_batch``, one item after another in this process, WITHOUT time limits.

    For debugging and small batches; a hanging verifier hangs this call.
    """
    started_at = time.perf_counter()
    state, items = _prepare(responses, specs, domains, truncated, thinking, None)
    for item in items:
        state.record(item.index, *_run_item(item.fn, item.domain, item.response, item.spec))
    return state.finish(num_workers=0, worker_restarts=0, started_at=started_at)


# ----------------------------------------------------------------------------------------------------------------
# Worker process.


def _set_parent_death_signal() -> None:
    """Linux: SIGKILL this process when the thread that started it exits (the parent dies)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's close() and atexit still stop workers
        pass


def warm_up_verifiers() -> None:
    """Imports and loads what the built-in verifiers need, so that no item pays for it under its time limit."""
    import math_verify  # noqa: F401  (SymPy, the LaTeX parser)

    from nemotron_jax.rewards import registry  # noqa: F401
    from nemotron_jax.rewards.text_units import detect_language

    detect_language("warm up the language profiles")


def _worker_main(connection: multiprocessing.connection.Connection) -> None:
    """Receives chunks of items, sends one result per item as soon as it is done."""
    try:
        os.setpgid(0, 0)  # own process group: the parent can kill this worker and anything it started
    except OSError:
        pass
    _set_parent_death_signal()
    try:
        warm_up_verifiers()  # instant in a worker forked from a preloaded fork server
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("startup_error", traceback.format_exc()))
        return
    connection.send(("ready", os.getpid(), os.getpgid(0)))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        for index, domain, fn, response, spec in message[1]:
            connection.send(("result", index, *_run_item(fn, domain, response, spec)))


# ----------------------------------------------------------------------------------------------------------------
# The pool.


@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    process_group: int | None = None
    outstanding: collections.deque = dataclasses.field(default_factory=collections.deque)  # of _Item
    item_started_at: float = 0.0


_STARTUP_LIMIT_S = 120.0  # a worker that is not ready by then is broken (imports hang)


_PRELOAD_MODULE = "nemotron_jax.rewards.worker_preload"


def _add_forkserver_preload(context: Any) -> None:
    """Adds the verifier preload to the fork server's list (effective if the server is not running yet)."""
    from multiprocessing import forkserver

    modules = list(getattr(forkserver._forkserver, "_preload_modules", []))  # no public getter exists
    if _PRELOAD_MODULE not in modules:
        context.set_forkserver_preload([*modules, _PRELOAD_MODULE])


def _unpicklable_item(chunk: list[_Item]) -> str:
    """Names the first item of ``chunk`` whose response or spec does not pickle."""
    for item in chunk:
        try:
            pickle.dumps((item.response, item.spec))
        except Exception:
            return f"item {item.index} ({item.domain}): its response or spec"
    return "an item"


def _kill_worker(worker: _Worker) -> None:
    """SIGKILLs the worker and, if it leads its own process group, whatever it started that is still there."""
    try:
        if worker.process_group is not None and worker.process_group == worker.process.pid:
            # Also when the worker itself is gone: processes it started may survive it in its group.
            os.killpg(worker.process_group, signal.SIGKILL)
        elif worker.process.is_alive():
            worker.process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    worker.process.join(timeout=5.0)
    worker.connection.close()


def _stop_workers(workers: list[_Worker]) -> None:
    """Asks every worker to stop, then kills the ones that do not (also run at interpreter exit)."""
    for worker in workers:
        try:
            worker.connection.send(("stop",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        _kill_worker(worker)
    workers.clear()


class RewardPool:
    """A persistent pool of reward worker processes.

    Usage::

        with RewardPool(num_workers=None) as pool:      # None: every available CPU
            rewards, stats = pool.score(responses, specs, domains, truncated=truncated)

    One ``score`` call runs at a time (calls from several threads are serialised).
    """

    def __init__(
        self, num_workers: int | None = None, *, start_method: str | None = None, max_chunk_items: int = 64
    ):
        if num_workers is None:
            num_workers = available_cpus()
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers} (use score_in_process for 0)")
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver' (fork is unsafe with JAX), got {start_method!r}"
            )
        if max_chunk_items < 1:
            raise ValueError(f"max_chunk_items must be >= 1, got {max_chunk_items}")
        self.num_workers = num_workers
        self.max_chunk_items = max_chunk_items
        self.start_method = start_method
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            _add_forkserver_preload(self._context)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.worker_restarts = 0
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    # -- lifecycle

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(child_end,), name="reward-worker", daemon=False)
        process.start()
        child_end.close()
        return _Worker(process=process, connection=parent_end, started_at=time.monotonic())

    def wait_ready(self, timeout_s: float = _STARTUP_LIMIT_S) -> None:
        """Blocks until every worker has started (imports done). Optional: ``score`` waits by itself."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            while not all(worker.ready for worker in self._workers):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reward workers not ready after {timeout_s} s")
                self._poll(None, timeout=0.5)

    def close(self) -> None:
        """Stops every worker (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- scoring

    def score(
        self,
        responses: Sequence[str],
        specs: Sequence[Mapping[str, Any]],
        domains: Sequence[str | Mapping[str, Any]],
        *,
        truncated: bool | Sequence[bool] | np.ndarray | None = None,
        thinking: bool | Sequence[bool] | np.ndarray | None = None,
        timeout_s: float | None = None,
    ) -> ScoredBatch:
        """Scores a batch; see ``score_batch``."""
        started_at = time.perf_counter()
        state, items = _prepare(responses, specs, domains, truncated, thinking, timeout_s)
        with self._lock:
            if self._closed:
                raise RuntimeError("this RewardPool is closed")
            restarts_before = self.worker_restarts
            self._check_picklable(items)
            pending = collections.deque(items)
            try:
                while pending or any(worker.outstanding for worker in self._workers):
                    self._dispatch(pending)
                    self._poll(state, timeout=self._next_wake_up(), pending=pending)
            except BaseException:
                # Interrupted (Ctrl-C, an unsendable item, a broken worker): workers still busy with this batch
                # would send stale results into the next one, so they are replaced.
                for slot, worker in enumerate(self._workers):
                    if worker.outstanding:
                        worker.outstanding.clear()
                        self._replace(slot, None, None)
                raise
            return state.finish(self.num_workers, self.worker_restarts - restarts_before, started_at)

    @staticmethod
    def _check_picklable(items: list[_Item]) -> None:
        checked: set[str] = set()
        for item in items:
            if item.domain in checked:
                continue
            try:
                pickle.dumps(item.fn)
            except Exception as error:
                raise ValueError(
                    f"the reward function of domain {item.domain!r} cannot be sent to a worker process ({error}); "
                    "define it at the top level of an importable module"
                ) from None
            checked.add(item.domain)

    def _chunk_size(self, num_pending: int) -> int:
        # Guided self-scheduling: big chunks while much is pending (each chunk costs a round trip through this
        # process, slow when the machine is loaded), shrinking towards the end so the workers finish together.
        return max(1, min(self.max_chunk_items, math.ceil(num_pending / (2 * self.num_workers))))

    def _dispatch(self, pending: collections.deque) -> None:
        for slot, worker in enumerate(self._workers):
            if not pending:
                return
            if not worker.ready or worker.outstanding:
                continue
            if not worker.process.is_alive():  # died while idle (e.g. killed from outside): just replace it
                self._replace(slot, None, pending)
                continue
            chunk = [pending.popleft() for _ in range(min(self._chunk_size(len(pending)), len(pending)))]
            payload = [(item.index, item.domain, item.fn, item.response, item.spec) for item in chunk]
            try:
                worker.connection.send(("items", payload))
            except (pickle.PicklingError, TypeError, AttributeError) as error:
                pending.extendleft(reversed(chunk))
                raise ValueError(f"{_unpicklable_item(chunk)} cannot be sent to a worker: {error}") from error
            except (OSError, ValueError):  # the worker is gone; its replacement gets the chunk
                pending.extendleft(reversed(chunk))
                self._replace(slot, None, pending)
                continue
            worker.outstanding.extend(chunk)
            worker.item_started_at = time.monotonic()

    def _next_wake_up(self) -> float:
        now = time.monotonic()
        wake_ups = [1.0]
        for worker in self._workers:
            if worker.outstanding:
                wake_ups.append(worker.item_started_at + worker.outstanding[0].timeout_s - now)
            elif not worker.ready:
                wake_ups.append(worker.started_at + _STARTUP_LIMIT_S - now)
        return max(0.0, min(wake_ups))

    def _poll(self, state: _BatchState | None, *, timeout: float, pending: collections.deque | None = None) -> None:
        """Waits for messages or deaths, handles them, enforces time limits."""
        waitables: list[Any] = []
        for worker in self._workers:
            waitables.extend((worker.connection, worker.process.sentinel))
        ready = set(multiprocessing.connection.wait(waitables, timeout=timeout))
        for slot, worker in enumerate(self._workers):
            if worker.connection in ready or worker.process.sentinel in ready:
                self._drain(slot, worker, state, pending)
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker.outstanding and now - worker.item_started_at > worker.outstanding[0].timeout_s:
                item = worker.outstanding[0]
                assert state is not None and pending is not None
                state.record(item.index, 0.0, STATUS_TIMEOUT, f"no result after {item.timeout_s:.1f} s; worker killed")
                worker.outstanding.popleft()
                self._replace(slot, state, pending)
            elif not worker.ready and now - worker.started_at > _STARTUP_LIMIT_S:
                _kill_worker(worker)
                raise RuntimeError(f"a reward worker did not start within {_STARTUP_LIMIT_S} s")

    def _drain(self, slot: int, worker: _Worker, state: _BatchState | None, pending: collections.deque | None) -> None:
        """Reads every message the worker has sent; replaces it if it died."""
        try:
            while worker.connection.poll():
                message = worker.connection.recv()
                kind = message[0]
                if kind == "ready":
                    worker.ready = True
                    worker.process_group = message[2]
                elif kind == "startup_error":
                    _kill_worker(worker)
                    raise RuntimeError(f"a reward worker failed to start:\n{message[1]}")
                elif kind == "result":
                    _, index, reward, status, error, cpu_seconds = message
                    item = worker.outstanding.popleft()
                    if item.index != index:  # the protocol is strictly in order
                        raise RuntimeError(f"reward worker sent item {index}, expected {item.index}")
                    assert state is not None
                    state.record(index, reward, status, error, cpu_seconds)
                    worker.item_started_at = time.monotonic()
        except (EOFError, OSError):
            pass  # the worker died; handled below
        if not worker.process.is_alive():
            worker.process.join(timeout=1.0)
            if not worker.ready:
                raise RuntimeError(
                    f"a reward worker exited during start-up with code {worker.process.exitcode} (see its stderr)"
                )
            if worker.outstanding:
                item = worker.outstanding.popleft()
                assert state is not None
                state.record(item.index, 0.0, STATUS_CRASHED, f"worker exited with code {worker.process.exitcode}")
            self._replace(slot, state, pending)

    def _replace(self, slot: int, state: _BatchState | None, pending: collections.deque | None) -> None:
        """Kills the worker in ``slot``, puts its unfinished items back in front of the queue, starts a new one."""
        worker = self._workers[slot]
        _kill_worker(worker)
        if worker.outstanding:
            assert pending is not None
            pending.extendleft(reversed(worker.outstanding))
            worker.outstanding.clear()
        self._workers[slot] = self._start_worker()
        self.worker_restarts += 1


def score_batch(
    responses: Sequence[str],
    specs: Sequence[Mapping[str, Any]],
    domains: Sequence[str | Mapping[str, Any]],
    *,
    truncated: bool | Sequence[bool] | np.ndarray | None = None,
    thinking: bool | Sequence[bool] | np.ndarray | None = None,
    num_workers: int | None = None,
    pool: RewardPool | None = None,
    timeout_s: float | None = None,
) -> ScoredBatch:
    """Scores ``B`` responses with their domains' registered rewards, in parallel.

    Args:
      responses: ``B`` generated texts.
      specs: ``B`` per-environment field dicts (see ``nemotron_jax.rewards.registry``).
      domains: ``B`` registry names, aliases or NeMo Gym ``agent_ref`` mappings.
      truncated: bool or ``[B]`` bools: the response was cut at the length limit -> reward 0 (overlong penalty).
      thinking: bool or ``[B]`` bools: the response was generated in thinking mode (the ``<think>`` tag was in
        the prompt); without ``</think>`` it has no answer -> reward 0.
      num_workers: worker processes when no ``pool`` is given; ``None`` = every available CPU; ``0`` scores in
        this process without time limits (``score_in_process``).
      pool: a running ``RewardPool`` to use (recommended in a training loop; avoids the start-up cost).
      timeout_s: per-item wall-clock limit for every item; ``None`` = each domain's registered limit.

    Returns:
      ``ScoredBatch(rewards float32 [B], stats ScoreStats)``.

    Raises:
      ValueError: mismatched lengths, an unknown domain (with its index), a non-str response or non-mapping
        spec, or a reward function that cannot be sent to a worker. Verifier failures do NOT raise; see stats.
    """
    if pool is not None:
        return pool.score(responses, specs, domains, truncated=truncated, thinking=thinking, timeout_s=timeout_s)
    if num_workers == 0:
        return score_in_process(responses, specs, domains, truncated=truncated, thinking=thinking)
    with RewardPool(num_workers) as new_pool:
        return new_pool.score(responses, specs, domains, truncated=truncated, thinking=thinking, timeout_s=timeout_s)

"""The reward worker pool: scores batches on every core, robust to verifiers that raise, hang or crash.

``score_batch(responses, specs, domains, truncated=...)`` applies the rules of ``nemotron_jax.rewards.scoring``
(overlong -> 0, unfinished thinking -> 0, failures -> 0 and counted) with each item in a worker process.

Workers never fork the caller: the parent usually has JAX (and its threads) loaded, and forking a multi-threaded
process is unsafe. On Linux they come from multiprocessing's ``forkserver``, a clean single-threaded process that
first imports ``nemotron_jax.rewards.worker_preload`` (SymPy, math-verify, langdetect's profiles, NLTK's Punkt
model: a few seconds, once), so that each worker, and each replacement of a killed one, starts in milliseconds;
elsewhere (or with ``start_method="spawn"``) every worker imports those itself. A training loop should keep one
``RewardPool`` for the whole run; ``score_batch`` without a pool starts and stops one per call.

Each item gets a hard wall-clock limit enforced by the parent, which kills the worker's whole process group:
unlike a signal inside the worker, this also stops C code that never returns to the interpreter (a
catastrophic regex, a huge integer power).

Workers die with the process that owns the pool, however it ends (SIGKILL included): each worker has a
watchdog thread blocked on a pipe whose only write end the owner holds, and when it reads end-of-file it
SIGKILLs the worker's process group; the worker's code sandbox (``sandbox.py``) dies with the worker. (A
parent-death signal is not enough: a worker's parent is the fork server, which multiprocessing keeps alive
as long as any worker lives.)

Like every multiprocessing ``forkserver``/``spawn`` pool, the workers import the main script; a script that
creates a pool (or calls ``score_batch``) at its top level must do so under ``if __name__ == "__main__":``.
Without the guard, the pool refuses to start and says so (``_check_main_guard``) instead of letting every
worker run the script again.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from nemotron_jax.rewards.scoring import (
    STATUS_CRASHED,
    STATUS_TIMEOUT,
    BatchItem,
    BatchState,
    ItemFlags,
    ScoredBatch,
    available_cpus,
    prepare_batch,
    run_reward,
    score_in_process,
)

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

    from nemotron_jax.rewards.text_units import detect_language, word_tokenize

    detect_language("warm up the language profiles")
    word_tokenize("Warm up NLTK's Punkt model. And its word tokenizer.")


def _watch_owner(owner_alive: multiprocessing.connection.Connection) -> None:
    """Thread body: blocks until the owner's end of `owner_alive` closes (the owner exited or was killed, or
    it is stopping this worker), then SIGKILLs this worker's process group."""
    try:
        while True:
            owner_alive.recv_bytes()  # the owner never writes: this returns only by EOF
    except (EOFError, OSError):
        pass
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _worker_main(
    connection: multiprocessing.connection.Connection, owner_alive: multiprocessing.connection.Connection
) -> None:
    """Receives chunks of items, sends one result per item as soon as it is done."""
    try:
        os.setpgid(0, 0)  # own process group: the parent can kill this worker and anything it started
    except OSError:
        pass
    _set_parent_death_signal()
    threading.Thread(target=_watch_owner, args=(owner_alive,), name="owner-watchdog", daemon=True).start()
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
            connection.send(("result", index, *run_reward(fn, domain, response, spec)))


# ----------------------------------------------------------------------------------------------------------------
# The pool.


@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    process_group: int | None = None
    outstanding: collections.deque = dataclasses.field(default_factory=collections.deque)  # of BatchItem
    item_started_at: float = 0.0
    owner_alive: multiprocessing.connection.Connection | None = None  # closing it kills the worker


_STARTUP_LIMIT_S = 120.0  # a worker that is not ready by then is broken (imports hang)


_PRELOAD_MODULE = "nemotron_jax.rewards.worker_preload"


def _add_forkserver_preload(context: Any) -> None:
    """Adds the verifier preload to the fork server's list (effective if the server is not running yet)."""
    from multiprocessing import forkserver

    modules = list(getattr(forkserver._forkserver, "_preload_modules", []))  # no public getter exists
    if _PRELOAD_MODULE not in modules:
        context.set_forkserver_preload([*modules, _PRELOAD_MODULE])


_GUARD_ADVICE = (
    "The reward workers are started by multiprocessing's {method}, which imports the main script in every "
    "worker, so this call would run again in each of them. Put the code that scores under\n\n"
    "    if __name__ == \"__main__\":\n        ...\n\n"
    "at the bottom of the script (or score in this process, without time limits, with num_workers=0)."
)


def _check_main_guard(start_method: str = "forkserver") -> None:
    """Raises RuntimeError, saying what to add, if a reward pool is being created by the top-level code of the
    main script outside an ``if __name__ == "__main__":`` block, or while a worker imports that script."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return  # python -c, an interactive session, a notebook: workers do not import anything
    advice = _GUARD_ADVICE.format(method=start_method)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"a reward pool was started while a worker process was importing {path}. {advice}")
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            if not _inside_main_guard(path, frame.f_lineno):
                raise RuntimeError(
                    f"score_batch / RewardPool was called at the top level of {path} (line {frame.f_lineno}) "
                    f"without an `if __name__ == \"__main__\":` guard. {advice}"
                )
            return
        frame = frame.f_back


def _inside_main_guard(path: str, line: int) -> bool:
    """Whether `line` of the script `path` lies in a top-level ``if __name__ == "__main__":`` block (True when the
    script cannot be read or parsed: then nothing is claimed)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return True

    def names_main(test: ast.expr) -> bool:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            return False
        sides = [test.left, test.comparators[0]]
        return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
            isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
        )

    return any(
        isinstance(node, ast.If) and names_main(node.test) and node.lineno <= line <= (node.end_lineno or line)
        for node in tree.body
    )


def _unpicklable_item(chunk: list[BatchItem]) -> str:
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
    if worker.owner_alive is not None:
        worker.owner_alive.close()


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
        _check_main_guard(start_method)
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
        watched_end, owner_end = self._context.Pipe(duplex=False)  # only this process holds owner_end
        process = self._context.Process(
            target=_worker_main, args=(child_end, watched_end), name="reward-worker", daemon=False
        )
        try:
            process.start()
        except BaseException:
            for end in (parent_end, owner_end):
                end.close()
            raise
        finally:
            child_end.close()
            watched_end.close()
        return _Worker(process=process, connection=parent_end, started_at=time.monotonic(), owner_alive=owner_end)

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
        truncated: ItemFlags = None,
        thinking: ItemFlags = None,
        timeout_s: float | None = None,
    ) -> ScoredBatch:
        """Scores a batch; see ``score_batch``."""
        started_at = time.perf_counter()
        state, items = prepare_batch(responses, specs, domains, truncated, thinking, timeout_s)
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
    def _check_picklable(items: list[BatchItem]) -> None:
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
        # Never more than num_pending (>= 1): ceil(n / (2 w)) <= n.
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
            chunk = [pending.popleft() for _ in range(self._chunk_size(len(pending)))]
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

    def _poll(self, state: BatchState | None, *, timeout: float, pending: collections.deque | None = None) -> None:
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

    def _drain(self, slot: int, worker: _Worker, state: BatchState | None, pending: collections.deque | None) -> None:
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

    def _replace(self, slot: int, state: BatchState | None, pending: collections.deque | None) -> None:
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
    truncated: ItemFlags = None,
    thinking: ItemFlags = None,
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

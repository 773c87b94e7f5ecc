"""Run untrusted Python programs (model-written code) in a contained child process.

`run_sandboxed(program, stdin=..., timeout_s=..., memory_mb=...)` runs one program in its own process
tree and always returns a `SandboxResult` (passed / failed / timed_out / crashed / output_too_large),
never raises because of what the program did, and never hangs past `timeout_s` plus a few hundred ms of
clean-up. `sandbox_capabilities()` reports which isolation mechanisms this machine actually provides.

How a run works: each caller process keeps one small fork server per interpreter (`_sandbox_child.py`,
started as `python -I -S -B -X utf8` with an empty environment). A run is a request to it: it forks a
launcher, which sets up namespaces, mounts and limits, and the program finally runs as `__main__` in a
forked copy of that fresh, isolated interpreter (no second interpreter start). A trivial run takes about
13 ms of wall time on an idle 2-core machine, and 40-50 ms on one loaded ~10x over, much of it the kernel
setting up and tearing down namespaces (`experiments/benchmarks/code_reward_throughput.py`).
The caller passes stdin as a sealed read-only memfd, reads stdout/stderr from pipes incrementally and
enforces the wall-clock limit itself.

What is isolated, and how:

| threat | mechanism | needs |
|---|---|---|
| runaway CPU (infinite loop) | wall-clock limit enforced by the caller (SIGKILL to the run's process group, which takes the PID namespace with it); `RLIMIT_CPU` per process | - |
| memory bomb | `RLIMIT_AS` = `memory_mb` per process (Python raises `MemoryError`, reported as `crashed`); `oom_score_adj` 1000, so that if memory still runs out the kernel's OOM killer picks the sandbox, not the caller | - |
| fork bomb | `RLIMIT_NPROC` = `max_processes` tasks (processes + threads) for a uid that only this run uses; PID namespace | root (`RLIMIT_NPROC` does not apply to root) |
| disk filling / big writes | `RLIMIT_FSIZE` per file, and the working directory is a tmpfs of `max_file_bytes` in total | mount namespace for the tmpfs |
| writing/deleting files outside the working directory | whole mount tree re-mounted read-only (and nosuid) in a private mount namespace; the program also runs as an unprivileged uid | mount namespace; root for the uid |
| reading the caller's environment | the program gets a fresh environment (`PATH`, `LANG`, `LC_ALL`, `HOME`, `TMPDIR` only) in an interpreter started with `-I -S`; other processes' `/proc/PID/environ` are out of reach (PID namespace, other uid) | - |
| network access | a new, empty network namespace (only a down loopback: connecting to 127.0.0.1 fails; abstract unix sockets are separate too); without one, the seccomp filter refuses AF_INET/AF_INET6 sockets | network namespace, or seccomp |
| other socket families (AF_VSOCK reaches the hypervisor and is not network-namespaced; netlink, packet, ...) | seccomp filter: `socket`/`socketpair` only for AF_UNIX (and AF_INET/AF_INET6 inside the empty network namespace), else EAFNOSUPPORT; io_uring (which can open sockets by itself) is refused | seccomp (x86_64, aarch64) |
| data left for a later run in kernel keyrings (they persist per uid) | seccomp filter: `add_key`/`keyctl`/`request_key` fail with EPERM, as in Docker's default profile | seccomp |
| system calls through another ABI (i386 `int 0x80`, x32 numbers), which would dodge the filter | the filter kills the process | seccomp |
| killing the caller / other processes | PID namespace (the caller's pids do not exist for the program; `/proc` shows only the sandbox) and an unprivileged uid (cannot signal root's processes) | PID namespace; root for the uid |
| processes that outlive the program | the program's supervisor is pid 1 of the PID namespace: when the program exits, the kernel kills everything left in the namespace; without a PID namespace the caller SIGKILLs the process group and every thread group of the run's dedicated uid that has a live thread (a main thread that exited alone leaves a zombie leader whose other threads run on) | PID namespace, or root for the uid sweep |
| unbounded output | stdout and stderr are read incrementally, `max_output_bytes` each; beyond that the run is killed (`output_too_large`) | - |
| privilege escalation through setuid binaries | `PR_SET_NO_NEW_PRIVS`, nosuid mounts, all capabilities dropped with the uid change | - |
| the caller dying mid-run | the fork server exits when its socket to the caller closes; launcher and supervisor have `PR_SET_PDEATHSIG(SIGKILL)`. The working directory on the host is the caller's (mode 0700, the program reaches it through its tmpfs) and each run holds a slot lease marked "running": the next run that takes the slot (or the next process's first run) removes what a killed caller left, and kills the uid's leftover processes, before its program starts | - |

What is NOT isolated:

- Reading files: the program sees the host's file tree (read-only). World-readable files (the Python
  standard library, `/etc`, world-readable data or source checkouts) can be read; files readable only by
  root (for example a `0700` pytest `tmp_path`) cannot, because the program runs as an unprivileged uid.
  Test expectations never enter the sandbox (`code.py` compares outputs in the caller).
- CPU and memory bandwidth are shared: a busy program slows its neighbours (no cgroups are used). Memory is
  limited per process (`RLIMIT_AS`), so the worst case for one run is about `max_processes * memory_mb`;
  memory that is never mapped (memfd files, pipe buffers) is bounded only by `max_file_bytes` per file
  times `max_open_files`. If memory does run out, `oom_score_adj` 1000 makes the sandbox's processes the
  OOM killer's first victims, and killing them frees all of it.
- The seccomp filter allows every other system call (a deny list, not Docker's allow list); the namespaces,
  the uid and the read-only mounts are the main boundary. Kernel vulnerabilities are out of scope.
- Unix sockets in the (read-only) file tree that are writable by "others" can still be connected to.
- `/dev/shm` is read-only, so `multiprocessing` locks do not work inside the sandbox.
- All runs of one caller are forks of one interpreter, so they share its string-hash seed (set iteration
  order is the same from run to run; it differs between caller processes).

How it degrades (reported by `sandbox_capabilities()` and in each `SandboxResult.isolation`, never
silently):

- Not root, but user namespaces allowed: the launcher creates a user namespace and gets all the other
  namespaces inside it. The program keeps the caller's uid (mapped to itself): it can read every file the
  caller can, and `RLIMIT_NPROC` counts the caller's own tasks too (the limit is set to the caller's current
  task count plus `max_processes`); the PID namespace still keeps it away from the caller's processes.
- No seccomp (another architecture, or a kernel without it): other socket families and keyrings are open.
- No namespaces at all (old kernel, locked-down container, `namespaces=False`): network sockets are refused
  only by the seccomp filter (the host's abstract unix sockets stay reachable), no read-only file tree, the
  working directory is a plain temporary directory. As root, the uid drop still protects root-owned files,
  keeps `RLIMIT_NPROC` effective and lets the caller sweep every process of the run's uid. As a non-root
  user without namespaces the program runs with the caller's uid and could signal the caller's processes.
  `sandbox_capabilities().degradations` lists what is missing.
- A mount step that fails (e.g. no `mount_setattr` and a mount that cannot be remounted) is reported as a
  warning in `SandboxResult.message` and drops `read_only_root` / `private_tmpfs_workdir` from `isolation`.

Why not bubblewrap: `bwrap` sets up the same namespaces, but each run would then exec bwrap and a fresh
interpreter (measured 1.18x the time of a run here, without the seccomp filter, limits or uid leases that
would still be needed), and it is a system package that CI would have to install. The namespace code below
is a few dozen lines and keeps runs as forks of one idle interpreter.

The program's interpreter: with an unprivileged uid the program cannot run an interpreter inside a
directory only root can enter (for example a pyenv under `/root`). With `python=None` (the default) the
first interpreter among the caller's `sys.executable` (resolved), its base executable, `/usr/local/bin/python3`
and `/usr/bin/python3` that the sandbox uid can actually run is used (probed once);
`sandbox_capabilities().python` names it. Programs get the standard library only (`-S`: no site-packages).
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_PROGRAM_FILE = "main.py"

DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PROCESSES = 16
DEFAULT_MAX_OPEN_FILES = 256
_TMPFS_INODES = 4096
_STATUS_BYTES_CAP = 64 * 1024
_READ_CHUNK = 1 << 16
_SERVER_REPLY_TIMEOUT_S = 30.0
# After the program is done (or killed), how long to keep reading output that is still in the pipes.
_DRAIN_GRACE_S = 2.0

# A block of uids nobody else uses: each concurrent run leases its own (RLIMIT_NPROC is per uid, and the
# clean-up sweep kills every process of the uid). Leases are flock()s, so they also work across processes.
_UID_BLOCK_START = 1_500_000_000
_UID_BLOCK_SIZE = 4096
_NOBODY_UID = 65534
_UID_LOCK_DIR = os.path.join(tempfile.gettempdir(), "nemotron_jax_sandbox_uid_locks")

_PROGRAM_PATH_ENV = "/usr/local/bin:/usr/bin:/bin"
# False runs without the seccomp filter, as on a machine that has none (tests of the degraded mode only).
_USE_SECCOMP = True


class SandboxStatus(str, enum.Enum):
    """How a sandboxed run ended."""

    PASSED = "passed"  # exited with status 0
    OK = "passed"  # alias of PASSED
    FAILED = "failed"  # exited with a non-zero status
    TIMED_OUT = "timed_out"  # wall-clock or CPU-time limit
    CRASHED = "crashed"  # killed by a signal, out of memory, or the sandbox could not start it
    OUTPUT_TOO_LARGE = "output_too_large"  # stdout or stderr went past max_output_bytes


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one `run_sandboxed` call.

    stdout / stderr are decoded as UTF-8 (invalid bytes replaced) and hold at most `max_output_bytes`
    bytes each; the `*_truncated` flags say whether more was written. `exit_code` is None when the program
    was killed by a signal (`signal` then holds its number) or never started. `cpu_time_s` and
    `max_rss_kib` are the usage of the program process (and of the children it waited for), from wait4,
    None when unknown. `isolation` names the
    mechanisms that were active for this run (see the module docstring).
    """

    status: SandboxStatus
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    wall_time_s: float = 0.0
    cpu_time_s: float | None = None
    max_rss_kib: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    message: str = ""
    isolation: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status is SandboxStatus.PASSED


@dataclasses.dataclass(frozen=True)
class SandboxCapabilities:
    """What `run_sandboxed` provides on this machine, measured by running a probe program."""

    isolation: frozenset[str]
    python: str | None
    degradations: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def network_isolated(self) -> bool:
        """No network: an empty network namespace, or (without one) the seccomp filter refusing inet sockets."""
        return "net_namespace" in self.isolation or "inet_sockets_blocked" in self.isolation

    @property
    def seccomp_filter(self) -> bool:
        return "seccomp_filter" in self.isolation

    @property
    def pid_namespace(self) -> bool:
        return "pid_namespace" in self.isolation

    @property
    def filesystem_read_only(self) -> bool:
        return "read_only_root" in self.isolation

    @property
    def unprivileged_uid(self) -> bool:
        return "unprivileged_uid" in self.isolation

    @property
    def fully_isolated(self) -> bool:
        return not self.degradations


# ----------------------------------------------------------------------------------------------------------
# uid leases


class _Lease:
    """An exclusive claim on one run slot, held by an flock on the slot's file in a lock directory.

    As root with the sandbox uid block mapped, the slot is a dedicated uid (`uid`, uid == gid) that no
    concurrent run uses. Otherwise `uid` is the shared `_NOBODY_UID` (root without the block) or -1 (not
    root: the program keeps the caller's uid), and the slot only names the run's working directory.

    The slot file is non-empty while a run is in progress (`begin_run` / `end_run`). A slot found non-empty
    when acquired belonged to a caller that died mid-run (SIGKILL, OOM): what it left is removed first, so
    a later run of the same uid never sees it (see `_clean_up_dead_run`).
    """

    def __init__(self, slot: str, uid: int, lock_fd: int, dedicated_uid: bool):
        self.slot = slot
        self.uid = uid
        self.lock_fd: int | None = lock_fd
        self.dedicated_uid = dedicated_uid
        _active_leases.add(self)

    @property
    def workdir_prefix(self) -> str:
        return f"{_WORKDIR_PREFIX}{self.slot}-"

    def begin_run(self) -> None:
        os.pwrite(self.lock_fd, b"running\n", 0)

    def end_run(self) -> None:
        os.ftruncate(self.lock_fd, 0)

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the last descriptor drops the flock
            self.lock_fd = None
        _active_leases.discard(self)


_active_leases: set[_Lease] = set()
_WORKDIR_PREFIX = "nemotron-jax-sandbox-"


def _uid_block_available() -> bool:
    last = _UID_BLOCK_START + _UID_BLOCK_SIZE
    return all(_range_mapped(f"/proc/self/{kind}_map", _UID_BLOCK_START, last) for kind in ("uid", "gid"))


def _range_mapped(path: str, first: int, last: int) -> bool:
    """Whether ids [first, last) exist in this process's user namespace (an id map file); True if unreadable."""
    try:
        with open(path) as f:
            ranges = [(int(inside), int(inside) + int(count)) for inside, _, count in (line.split() for line in f)]
    except (OSError, ValueError):
        return True
    return any(start <= first and last <= end for start, end in ranges)


def _lock_directory() -> tuple[str, bool]:
    """(directory of the slot files, whether its slots are dedicated uids)."""
    if os.geteuid() == 0:
        # Slot files are named by uid (the same files as earlier versions of this module, so that runs of
        # both never share a uid); without the uid block the numbers only name slots.
        return _UID_LOCK_DIR, _uid_block_available()
    return f"{_UID_LOCK_DIR}-{os.geteuid()}", False


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _clean_up_dead_run(slot: str, uid: int | None, fd: int) -> None:
    """What a caller killed mid-run left in `slot` (whose lock the caller of this function holds): processes
    of the slot's dedicated uid (`uid`, None if not dedicated) and working directories; then marks it clean."""
    if uid is not None:
        _kill_all_of_uid(uid)
    root = tempfile.gettempdir()
    prefix = f"{_WORKDIR_PREFIX}{slot}-"
    try:
        names = [name for name in os.listdir(root) if name.startswith(prefix)]
    except OSError:
        names = []
    for name in names:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # fd-based: never follows symlinks
    os.ftruncate(fd, 0)


_swept_pid: int | None = None


def _sweep_stale_slots() -> None:
    """Cleans every unlocked slot left in the running state (once per process, at its first run): a caller
    killed mid-run leaves a slot that no later run may happen to acquire."""
    global _swept_pid
    _swept_pid = os.getpid()
    directory, dedicated = _lock_directory()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_size == 0:
                continue
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:
            continue  # in use
        try:
            if os.fstat(fd).st_size:
                _clean_up_dead_run(name, int(name) if dedicated and name.isdigit() else None, fd)
        finally:
            os.close(fd)


def _acquire_lease() -> _Lease:
    if _swept_pid != os.getpid():
        _sweep_stale_slots()
    directory, dedicated = _lock_directory()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    root = os.geteuid() == 0
    for offset in range(_UID_BLOCK_SIZE):
        slot = str(_UID_BLOCK_START + offset) if root else str(offset)
        fd = _try_lock(os.path.join(directory, slot))
        if fd is None:
            continue
        if dedicated:
            uid = int(slot)
        else:
            # One shared uid (root without the uid block): RLIMIT_NPROC is then shared by concurrent runs
            # (reported as a degradation).
            uid = _NOBODY_UID if root else -1
        if os.fstat(fd).st_size:
            _clean_up_dead_run(slot, uid if dedicated else None, fd)
        return _Lease(slot, uid, fd, dedicated)
    raise RuntimeError(f"all {_UID_BLOCK_SIZE} sandbox slots are in use")


def _processes_of_uid(uid: int) -> list[int]:
    """Thread groups of `uid` with a live thread: pids whose /proc entry belongs to `uid`.

    A thread group counts while any of its threads lives, not only its main thread: a main thread that
    called exit() (not exit_group) shows as a zombie while the other threads run on.
    """
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            if _thread_group_alive(int(name)):
                pids.append(int(name))
        except OSError:
            continue
    return pids


def _thread_group_alive(pid: int) -> bool:
    """Whether any thread of thread group `pid` is alive (not a zombie); raises OSError if it is gone."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def _kill_all_of_uid(uid: int, timeout_s: float = 2.0) -> int:
    """SIGKILLs every process of a sandbox uid until none is left; returns how many were killed.

    Signals go through a pidfd that is re-checked to belong to `uid`, so a recycled pid is never hit.
    """
    killed = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _processes_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.005)
    return killed


def _task_count_of_uid(uid: int) -> int:
    """Tasks (threads) owned by `uid`, which is what RLIMIT_NPROC counts."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


# ----------------------------------------------------------------------------------------------------------
# the program's interpreter


def _interpreter_candidates() -> list[str]:
    candidates = [os.path.realpath(sys.executable)]
    base = getattr(sys, "_base_executable", None)
    if base:
        candidates.append(os.path.realpath(base))
    candidates += ["/usr/local/bin/python3", "/usr/bin/python3"]
    which = shutil.which("python3")
    if which:
        candidates.append(os.path.realpath(which))
    unique = []
    for path in candidates:
        if path not in unique and os.path.isfile(path):
            unique.append(path)
    return unique


_PROBE_PROGRAM = "import sys, json, math, collections, itertools, heapq, bisect\nprint(sys.version_info[0])\n"


@dataclasses.dataclass(frozen=True)
class _Probe:
    python: str | None  # the interpreter the sandbox uid can run, None if none
    namespaces_usable: bool  # False: namespace set-up fails here, so runs go without (a degradation)
    problems: tuple[str, ...]
    probed_at: float


_probe_lock = threading.Lock()
_probe: _Probe | None = None
_PROBE_RETRY_S = 30.0  # a failed probe (e.g. on an overloaded machine) is repeated after this long


def _probe_sandbox() -> _Probe:
    """Finds (once) an interpreter the sandbox uid can run, and whether the namespaces can be set up.

    If a run with namespaces fails in set-up (say, a kernel that allows `unshare` but not what follows),
    the probe tries without them; when that works, every later run goes without namespaces, and
    `sandbox_capabilities()` lists what that loses.
    """
    global _probe
    with _probe_lock:
        if _probe is not None and (_probe.python is not None or time.monotonic() - _probe.probed_at < _PROBE_RETRY_S):
            return _probe
        problems = []
        found, namespaces_usable = None, True
        for candidate in _interpreter_candidates():
            for namespaces in (True, False):
                result = _run(_PROBE_PROGRAM, b"", 10.0, 512, None, 4096, 1 << 20, 16, 64, candidate, namespaces)
                if result.passed and result.stdout.strip() == "3":
                    found, namespaces_usable = candidate, namespaces
                    break
                problems.append(
                    f"{candidate} ({'with' if namespaces else 'without'} namespaces): {result.status.value}: "
                    f"{result.message or result.stderr[-300:]}"
                )
                if "sandbox setup failed" not in result.message:
                    break  # not a namespace problem: this interpreter does not work at all
            if found is not None:
                break
            _discard_fork_server(candidate)
        _probe = _Probe(found, namespaces_usable, tuple(problems), time.monotonic())
        return _probe


_capabilities_lock = threading.Lock()
_capabilities_cache: SandboxCapabilities | None = None


def sandbox_capabilities() -> SandboxCapabilities:
    """Runs a probe program once (cached) and reports the isolation this machine provides."""
    global _capabilities_cache
    with _capabilities_lock:
        if _capabilities_cache is None or _capabilities_cache.python is None:
            _capabilities_cache = _probe_capabilities()
        return _capabilities_cache


def _probe_capabilities() -> SandboxCapabilities:
    probe = _probe_sandbox()
    python, problems = probe.python, probe.problems
    if python is None:
        return SandboxCapabilities(frozenset(), None, ("no Python interpreter runs inside the sandbox",), problems)
    result = _run("pass\n", b"", 10.0, 256, None, 4096, 1 << 20, 16, 64, python, probe.namespaces_usable)
    isolation = frozenset(result.isolation)
    no_netns = "no network namespace: the program can open network connections"
    if "inet_sockets_blocked" in isolation:
        no_netns = ("no network namespace: inet sockets are refused by the seccomp filter, but the host's abstract "
                    "unix sockets can be reached")
    missing = {
        "net_namespace": no_netns,
        "pid_namespace": "no PID namespace: the program can see other processes",
        "read_only_root": "file tree not read-only: the program can write wherever its uid may (e.g. /tmp)",
        "private_tmpfs_workdir": "working directory is on the host disk (only RLIMIT_FSIZE per file)",
        "unprivileged_uid": "program runs with the caller's uid (it can read every file the caller can)",
        "seccomp_filter": "no seccomp filter: the program can open any socket family (e.g. AF_VSOCK to the "
                          "hypervisor) and use kernel keyrings that outlive the run",
    }
    degradations = [text for name, text in missing.items() if name not in isolation]
    if not probe.namespaces_usable:
        degradations.insert(0, "namespace set-up fails on this machine, so runs go without namespaces")
    if "unprivileged_uid" in isolation and not _uid_block_available():
        degradations.append("sandbox uid block unmapped: concurrent runs share uid 65534 (shared RLIMIT_NPROC)")
    warnings = tuple(problems) + tuple(line for line in result.message.split("; ") if line)
    return SandboxCapabilities(isolation, python, tuple(degradations), warnings)


# ----------------------------------------------------------------------------------------------------------
# running one program


def run_sandboxed(
    program: str,
    *,
    stdin: str | bytes = "",
    timeout_s: float,
    memory_mb: int,
    cpu_time_s: float | None = None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    max_open_files: int = DEFAULT_MAX_OPEN_FILES,
    python: str | None = None,
    namespaces: bool = True,
) -> SandboxResult:
    """Runs the Python source `program` in the sandbox and returns how it ended.

    Args:
      program: Python source, run as the script `main.py` in an empty working directory.
      stdin: the program's standard input (str is encoded as UTF-8).
      timeout_s: wall-clock limit, measured from the launch (sandbox start-up, ~tens of ms, included).
      memory_mb: address-space limit per process (RLIMIT_AS), in MiB.
      cpu_time_s: CPU-time limit per process; default `ceil(timeout_s) + 1` (the wall limit usually wins).
      max_output_bytes: cap for stdout and for stderr, each; going past it kills the run.
      max_file_bytes: largest file the program may write, and total size of its working directory.
      max_processes: most tasks (processes and threads) the program may have at once.
      max_open_files: RLIMIT_NOFILE.
      python: interpreter for the program; None picks one the sandbox uid can run (see module docstring).
      namespaces: False skips the namespaces (the degraded mode, for comparison and tests).

    Returns a `SandboxResult`; whatever the program does, this function does not raise. Invalid arguments
    (a caller bug, not program behaviour) raise ValueError / TypeError naming the argument.
    """
    _validate(program, stdin, timeout_s, memory_mb, cpu_time_s, max_output_bytes, max_file_bytes,
              max_processes, max_open_files)
    stdin_bytes = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
    start = time.monotonic()
    try:
        probe = _probe_sandbox()
        namespaces = namespaces and probe.namespaces_usable
        if python is None:
            python = probe.python
            if python is None:
                return SandboxResult(
                    SandboxStatus.CRASHED,
                    message="no Python interpreter can run inside the sandbox: " + "; ".join(probe.problems),
                )
        return _run(program, stdin_bytes, float(timeout_s), int(memory_mb), cpu_time_s, max_output_bytes,
                    max_file_bytes, max_processes, max_open_files, python, namespaces)
    except Exception as error:  # noqa: BLE001 - the caller always gets a result
        return SandboxResult(
            SandboxStatus.CRASHED,
            wall_time_s=time.monotonic() - start,
            message=f"sandbox failed to run the program: {type(error).__name__}: {error}",
        )


def _validate(program, stdin, timeout_s, memory_mb, cpu_time_s, max_output_bytes, max_file_bytes,
              max_processes, max_open_files) -> None:
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if not isinstance(stdin, (str, bytes, bytearray)):
        raise TypeError(f"stdin must be str or bytes, got {type(stdin).__name__}")
    positive = {
        "timeout_s": timeout_s, "memory_mb": memory_mb, "max_output_bytes": max_output_bytes,
        "max_file_bytes": max_file_bytes, "max_processes": max_processes, "max_open_files": max_open_files,
    }
    if cpu_time_s is not None:
        positive["cpu_time_s"] = cpu_time_s
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the Python interpreter alone needs that), got {memory_mb}")


def _stdin_file(data: bytes) -> int:
    """A read-only, sealed in-memory file holding `data`, positioned at 0 (no pipe, so no writer thread)."""
    fd = os.memfd_create("sandbox-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    return read_only


class _Capture:
    """Bytes read from one pipe, kept up to `cap`; the count of everything read goes on."""

    def __init__(self, cap: int):
        self.cap = cap
        self.kept = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def overflowed(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


class _ForkServer:
    """Handle on one `_sandbox_child.serve` process (started with the program's interpreter).

    Runs are forks of that idle interpreter, which saves an interpreter start (~15-25 ms of CPU) per run.
    One server per caller process and interpreter; requests from several threads are serialised by a lock
    (a request is a fork, well under a millisecond). The server exits when this process does.
    """

    def __init__(self, python: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(_SERVER_REPLY_TIMEOUT_S)
        try:
            self.process = subprocess.Popen(
                [python, "-I", "-S", "-B", "-X", "utf8", _CHILD_SCRIPT, "--serve", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), env={}, cwd="/", start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.socket = ours
        self.owner_pid = os.getpid()
        self.lock = threading.Lock()

    def usable(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def launch(self, config: list[str], fds: list[int]) -> int:
        """Starts one run's launcher; returns its pid (also its process-group id)."""
        request = ("run\0" + "\0".join(config)).encode("utf-8")
        with self.lock:
            try:
                socket.send_fds(self.socket, [request], fds)
                reply = self.socket.recv(4096).decode("utf-8", errors="replace")
            except TimeoutError:
                # A late reply would be read by the next request: this server can no longer be used.
                self.process.kill()
                raise
        if not reply:
            raise ConnectionError("the sandbox fork server exited")
        if not reply.isdigit():
            raise OSError(f"sandbox fork server: {reply}")
        return int(reply)

    def reap(self, pid: int) -> None:
        with self.lock:
            self.socket.send(f"reap\0{pid}".encode())

    def close(self) -> None:
        self.socket.close()  # EOF ends the server
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


_servers: dict[str, _ForkServer] = {}
_servers_lock = threading.Lock()


def _forget_parent_state_in_child() -> None:
    """After os.fork() (e.g. a multiprocessing pool), the child starts its own fork server and leases.

    The inherited locks may have been held by threads that do not exist in the child, and the inherited
    sockets and lease descriptors belong to the parent (closing the child's copies changes nothing there).
    """
    global _servers_lock
    _servers_lock = threading.Lock()
    for server in _servers.values():
        try:
            server.socket.close()
        except OSError:
            pass
    _servers.clear()
    for lease in list(_active_leases):
        if lease.lock_fd is not None:
            try:
                os.close(lease.lock_fd)
            except OSError:
                pass
            lease.lock_fd = None
    _active_leases.clear()


os.register_at_fork(after_in_child=_forget_parent_state_in_child)


def _fork_server(python: str, *, fresh: bool = False) -> _ForkServer:
    with _servers_lock:
        server = _servers.get(python)
        if server is not None and (fresh or not server.usable()):
            if server.owner_pid == os.getpid():
                server.close()
            server = None
        if server is None:
            server = _servers[python] = _ForkServer(python)
        return server


def _discard_fork_server(python: str) -> None:
    with _servers_lock:
        server = _servers.pop(python, None)
    if server is not None and server.owner_pid == os.getpid():
        server.close()


def _launch(python: str, config: list[str], fds: list[int]) -> tuple[_ForkServer, int]:
    server = _fork_server(python)
    try:
        return server, server.launch(config, fds)
    except (ConnectionError, TimeoutError):  # the server died or hangs: one retry with a new one
        server = _fork_server(python, fresh=True)
        return server, server.launch(config, fds)


def _run(program, stdin_bytes, timeout_s, memory_mb, cpu_time_s, max_output_bytes, max_file_bytes,
         max_processes, max_open_files, python, namespaces) -> SandboxResult:
    start = time.monotonic()
    lease = None
    workdir = None
    fds: list[int] = []
    server = launcher_pid = None
    notes: list[str] = []
    try:
        lease = _acquire_lease()
        lease.begin_run()
        # Owned by the caller, mode 0700: the program reaches it only through its private tmpfs, or, without
        # one, after the launcher hands the directory to the sandbox uid. A directory left by a killed
        # caller is then unreadable to other uids and removed before its uid runs again (`_Lease`).
        workdir = tempfile.mkdtemp(prefix=lease.workdir_prefix)
        program_path = os.path.join(workdir, _PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(program_path, 0o444)
        uid = lease.uid
        nproc = max_processes if uid >= 0 else _task_count_of_uid(os.getuid()) + max_processes
        cpu_limit = int(math.ceil(cpu_time_s if cpu_time_s is not None else math.ceil(timeout_s) + 1))

        stdin_fd = _stdin_file(stdin_bytes)
        fds.append(stdin_fd)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds += [status_r, status_w, out_r, out_w, err_r, err_w]
        config = {
            "workdir": workdir, "program_file": _PROGRAM_FILE, "uid": uid, "gid": uid,
            "namespaces": int(bool(namespaces)), "tmpfs_bytes": max_file_bytes, "tmpfs_inodes": _TMPFS_INODES,
            "cpu_s": cpu_limit, "as_bytes": memory_mb * 1024 * 1024, "fsize_bytes": max_file_bytes,
            "nofile": max_open_files, "nproc": nproc, "seccomp": int(_USE_SECCOMP),
        }
        env = {"PATH": _PROGRAM_PATH_ENV, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        items = [f"{key}={value}" for key, value in config.items()] + [f"env:{k}={v}" for k, v in env.items()]
        server, launcher_pid = _launch(python, items, [stdin_fd, out_w, err_w, status_w])
        for fd in (stdin_fd, status_w, out_w, err_w):  # the launcher has its own copies now
            os.close(fd)
            fds.remove(fd)

        def stop(status_bytes: bytes) -> None:
            _kill_group(launcher_pid)
            # Without a PID namespace, a process that left the process group (setsid) is still running
            # under the run's uid; with a dedicated uid (never the shared fallback), kill every one of them.
            if lease.dedicated_uid and "pid_namespace" not in _parse_status(status_bytes)["isolation"]:
                survivors = _kill_all_of_uid(lease.uid)
                if survivors:
                    notes.append(f"killed {survivors} leftover process(es) of the sandbox uid")

        stdout, stderr, status_bytes, verdict, ended = _collect(out_r, err_r, status_r, start, timeout_s,
                                                                max_output_bytes, stop)
        report = _parse_status(status_bytes)
        return _result(report, verdict, stdout, stderr, ended - start, cpu_limit, notes)
    finally:
        if launcher_pid is not None:
            _kill_group(launcher_pid)  # normally already done by _collect; the pid is still unreaped
            try:
                server.reap(launcher_pid)
            except OSError:
                pass
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if lease is not None:
            if workdir is None or not os.path.exists(workdir):
                lease.end_run()  # otherwise left marked: the next holder of the slot removes the directory
            lease.release()


def _kill_group(launcher_pid: int) -> None:
    # The launcher leads its own session and process group; the fork server does not reap it before we
    # say so, so the group id cannot have been recycled.
    try:
        os.killpg(launcher_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(out_r, err_r, status_r, start, timeout_s, max_output_bytes, stop):
    """Reads stdout, stderr and the status pipe until the supervisor is done, the deadline passes, or the
    output goes past its cap; then calls `stop(status_bytes)` (which kills whatever is left) and drains
    the pipes. Returns (stdout Capture, stderr Capture, status bytes, verdict, end time) with verdict in
    {None, "timeout", "output"}."""
    captures = {out_r: _Capture(max_output_bytes), err_r: _Capture(max_output_bytes)}
    status = bytearray()
    poller = select.poll()
    for fd in (out_r, err_r, status_r):
        poller.register(fd, select.POLLIN)
    open_fds = {out_r, err_r, status_r}
    deadline = start + timeout_s
    verdict = None

    def read_ready(timeout_ms: int) -> None:
        nonlocal verdict
        for fd, _ in poller.poll(timeout_ms):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == status_r:
                if len(status) < _STATUS_BYTES_CAP:
                    status.extend(data)
            else:
                captures[fd].add(data)
                if captures[fd].overflowed and verdict is None:
                    verdict = "output"

    while status_r in open_fds and verdict is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = "timeout"
            break
        read_ready(max(1, min(int(math.ceil(remaining * 1000)), 60_000)))  # poll() takes a C int
    ended = time.monotonic()
    # The supervisor is gone (so, with a PID namespace, is everything the program started), or we stop it.
    stop(bytes(status))
    drain_deadline = time.monotonic() + _DRAIN_GRACE_S
    while open_fds - {status_r} and time.monotonic() < drain_deadline:
        read_ready(50)
        if verdict is None and any(c.overflowed for c in captures.values()):
            verdict = "output"
    return captures[out_r], captures[err_r], bytes(status), verdict, ended


def _parse_status(data: bytes) -> dict:
    report = {"isolation": (), "warnings": [], "errors": [], "exit": None, "signal": None, "rusage": None}
    for line in data.decode("utf-8", errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "iso":
            report["isolation"] = tuple(name for name in rest.split(",") if name)
        elif kind == "warn":
            report["warnings"].append(rest)
        elif kind == "error":
            report["errors"].append(rest)
        elif kind == "exit" and rest.strip().lstrip("-").isdigit():
            report["exit"] = int(rest)
        elif kind == "signal" and rest.strip().isdigit():
            report["signal"] = int(rest)
        elif kind == "rusage":
            try:
                user_s, sys_s, rss = rest.split()
                report["rusage"] = (float(user_s) + float(sys_s), int(rss))
            except ValueError:
                pass
    return report


_MEMORY_ERROR_LINE = re.compile(r"^MemoryError\b")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _result(report, verdict, stdout, stderr, wall_time_s, cpu_limit, notes) -> SandboxResult:
    cpu_time_s, max_rss_kib = report["rusage"] if report["rusage"] else (None, None)
    exit_code, signum = report["exit"], report["signal"]
    messages = []
    if verdict == "output":
        status = SandboxStatus.OUTPUT_TOO_LARGE
        which = " and ".join(n for n, c in (("stdout", stdout), ("stderr", stderr)) if c.overflowed)
        messages.append(f"{which} went past {stdout.cap} bytes; the run was killed")
    elif verdict == "timeout":
        status = SandboxStatus.TIMED_OUT
        messages.append(f"wall-clock limit exceeded; the run was killed after {wall_time_s:.2f} s")
    elif report["errors"]:
        status = SandboxStatus.CRASHED
        messages.append("sandbox setup failed, the program did not run: " + "; ".join(report["errors"]))
    elif signum is not None:
        cpu_exhausted = signum == signal.SIGXCPU or (
            signum == signal.SIGKILL and cpu_time_s is not None and cpu_time_s >= cpu_limit
        )
        if cpu_exhausted:
            status = SandboxStatus.TIMED_OUT
            messages.append(f"CPU-time limit of {cpu_limit} s exceeded ({_signal_name(signum)})")
        else:
            status = SandboxStatus.CRASHED
            messages.append(f"killed by {_signal_name(signum)}")
    elif exit_code == 0:
        status = SandboxStatus.PASSED
    elif exit_code is not None:
        last_line = next((line for line in reversed(stderr.text().splitlines()) if line.strip()), "")
        if _MEMORY_ERROR_LINE.match(last_line):
            status = SandboxStatus.CRASHED
            messages.append(f"memory limit exceeded (MemoryError, exit status {exit_code})")
        else:
            status = SandboxStatus.FAILED
            messages.append(f"exit status {exit_code}")
    else:
        status = SandboxStatus.CRASHED
        messages.append("the sandbox supervisor ended without reporting the program's status")
    messages += [f"warning: {w}" for w in report["warnings"]] + notes
    return SandboxResult(
        status=status,
        stdout=stdout.text(),
        stderr=stderr.text(),
        exit_code=exit_code,
        signal=signum,
        wall_time_s=wall_time_s,
        cpu_time_s=cpu_time_s,
        max_rss_kib=max_rss_kib,
        stdout_truncated=stdout.overflowed,
        stderr_truncated=stderr.overflowed,
        message="; ".join(messages),
        isolation=report["isolation"],
    )

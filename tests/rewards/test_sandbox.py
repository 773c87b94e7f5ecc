"""Security and behaviour tests for `nemotron_jax.rewards.sandbox`.

Each hostile program must be contained and reported with a status, the test process must be unharmed, and
nothing may be left behind: no file outside the sandbox's temporary directory, no sandbox directory, no
process of a sandbox uid. An autouse fixture checks the last two after every test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid

import pytest

from nemotron_jax.rewards import sandbox
from nemotron_jax.rewards.sandbox import SandboxStatus, run_sandboxed, sandbox_capabilities

LIMITS = {"timeout_s": 5.0, "memory_mb": 256}


@pytest.fixture(scope="module")
def caps():
    capabilities = sandbox_capabilities()
    assert capabilities.python is not None, f"no interpreter runs in the sandbox: {capabilities.warnings}"
    return capabilities


def _sandbox_dirs() -> set[str]:
    root = tempfile.gettempdir()
    return {name for name in os.listdir(root) if name.startswith("nemotron-jax-sandbox-")}


def _sandbox_uid_processes(grace_s: float = 2.0) -> list[int]:
    """Thread groups of a sandbox uid with a live thread (a zombie main thread with running threads counts),
    polled for up to `grace_s` (processes killed a moment ago may still be exiting)."""
    first, last = sandbox._UID_BLOCK_START, sandbox._UID_BLOCK_START + sandbox._UID_BLOCK_SIZE
    deadline = time.monotonic() + grace_s
    while True:
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                uid = os.stat(f"/proc/{name}").st_uid
                if (first <= uid < last or uid == sandbox._NOBODY_UID) and _thread_group_alive(int(name)):
                    pids.append(int(name))
            except OSError:
                continue
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def _thread_group_alive(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def _processes_with_marker(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def _require(caps, namespaces: bool, *, any_of: tuple[str, ...]) -> None:
    """Skips when this OS gives the sandbox none of the mechanisms that stop the attack under test (a
    documented degradation, listed in `caps.degradations`), instead of letting the attack hit the runner."""
    available = set(caps.isolation) if namespaces else set(caps.isolation) & {"unprivileged_uid"}
    if not available & set(any_of):
        mode = "with" if namespaces else "without"
        pytest.skip(f"{mode} namespaces this OS provides none of {any_of}: {caps.degradations}")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    dirs_before = _sandbox_dirs()
    yield
    assert _sandbox_dirs() - dirs_before == set(), "a sandbox working directory was left behind"
    assert _sandbox_uid_processes() == [], "a process of a sandbox uid survived its run"


def test_stdin_stdout_exit_code_and_stderr(caps):
    result = run_sandboxed("import sys\nname = input()\nprint('hello', name)\nprint('warn', file=sys.stderr)",
                           stdin="world\n", **LIMITS)
    assert result.status is SandboxStatus.PASSED and result.passed
    assert result.stdout == "hello world\n" and result.stderr == "warn\n" and result.exit_code == 0
    assert set(result.isolation) == set(caps.isolation)

    failed = run_sandboxed("import sys\nprint('partial')\nsys.exit(3)", **LIMITS)
    assert failed.status is SandboxStatus.FAILED and failed.exit_code == 3 and failed.stdout == "partial\n"

    raised = run_sandboxed("def f():\n    raise ValueError('boom')\nf()", **LIMITS)
    assert raised.status is SandboxStatus.FAILED and raised.exit_code == 1
    assert "ValueError: boom" in raised.stderr and "main.py" in raised.stderr
    assert "_sandbox_child" not in raised.stderr  # the launcher's frames are not shown

    syntax = run_sandboxed("def f(:\n", **LIMITS)
    assert syntax.status is SandboxStatus.FAILED and "SyntaxError" in syntax.stderr


def test_program_runs_like_a_script(caps):
    program = (
        "import sys, os, threading, atexit, time\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "def worker():\n    time.sleep(0.2); print('thread joined')\n"
        "threading.Thread(target=worker).start()\n"
        "print(__name__, os.path.basename(__file__), sys.flags.isolated, sys.flags.no_site)\n"
        "print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))\n"
        "print(os.getcwd() == os.path.dirname(__file__), os.listdir('.'))\n"
        "print(sys.stdin.read() == 'α β\\n', 'é')\n"
    )
    result = run_sandboxed(program, stdin="α β\n", **LIMITS)
    assert result.passed, result
    lines = result.stdout.splitlines()
    assert lines[0] == "__main__ main.py 1 1"
    assert set(eval(lines[1])) <= {0, 1, 2, 3}  # stdin, stdout, stderr (+ the listdir handle): nothing else
    assert lines[2] == "True ['main.py']"  # an empty working directory besides the program
    assert lines[3] == "True é"
    assert lines[4:] == ["thread joined", "atexit ran"]


def test_infinite_loop_times_out(caps):
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass", timeout_s=1.0, memory_mb=256)
    elapsed = time.monotonic() - start
    assert result.status is SandboxStatus.TIMED_OUT and "wall-clock" in result.message
    assert 1.0 <= elapsed < 4.0

    # The per-process CPU limit also catches a loop (e.g. one started in a child the wall clock misses).
    cpu = run_sandboxed("while True:\n    pass", timeout_s=60.0, memory_mb=256, cpu_time_s=1)
    assert cpu.status is SandboxStatus.TIMED_OUT and "CPU-time" in cpu.message, cpu
    assert cpu.signal in (signal.SIGXCPU, signal.SIGKILL) and cpu.cpu_time_s is not None and cpu.cpu_time_s < 2.5


def test_fork_bomb_is_contained(caps):
    # A counting bomb: how many children can exist at once?
    counter = (
        "import os, time\n"
        "children = 0\n"
        "while children < 1000:\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    children += 1\n"
        "print(children)\n"
    )
    result = run_sandboxed(counter, max_processes=16, **LIMITS)
    assert result.passed, result
    if caps.unprivileged_uid:  # a dedicated uid: RLIMIT_NPROC counts this run's tasks only
        assert int(result.stdout) < 16  # the program itself counts too
    # The real thing: every process forks forever.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_sandboxed(bomb, timeout_s=2.0, memory_mb=256, max_processes=32)
    assert result.status in (SandboxStatus.TIMED_OUT, SandboxStatus.CRASHED), result
    assert time.monotonic() - start < 10.0
    # Afterwards the fixture checks that no process of the sandbox uid is left.


def test_memory_bomb_is_contained(caps):
    at_once = run_sandboxed("blob = bytearray(8 * 1024 ** 3)", timeout_s=5.0, memory_mb=256)
    assert at_once.status is SandboxStatus.CRASHED and "memory" in at_once.message, at_once
    gradual = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))",
                            timeout_s=5.0, memory_mb=256)
    assert gradual.status is SandboxStatus.CRASHED and "memory" in gradual.message, gradual
    assert gradual.max_rss_kib is not None and gradual.max_rss_kib < 300 * 1024


def test_one_gigabyte_write_is_stopped(caps, tmp_path):
    disk_before = shutil.disk_usage(tempfile.gettempdir()).used
    program = (
        "import os\n"
        "chunk = b'x' * (1 << 20)\n"
        "written = 0\n"
        "try:\n"
        "    with open('big.bin', 'wb') as f:\n"
        "        for _ in range(1024):\n"
        "            f.write(chunk)\n            written += len(chunk)\n"
        "finally:\n"
        "    print('written', written, flush=True)\n"
    )
    result = run_sandboxed(program, max_file_bytes=32 * 1024 * 1024, **LIMITS)
    assert result.status is SandboxStatus.FAILED, result
    assert "File too large" in result.stderr or "No space left" in result.stderr
    written = int(result.stdout.split()[1])
    assert written <= 32 * 1024 * 1024
    assert shutil.disk_usage(tempfile.gettempdir()).used - disk_before < 64 * 1024 * 1024
    # Writing the gigabyte somewhere else fails at once.
    target = tmp_path / "escape.bin"
    os.chmod(tmp_path, 0o777)
    result = run_sandboxed(f"open({str(target)!r}, 'wb').write(b'x' * (1 << 30))", memory_mb=2048, timeout_s=5.0)
    assert result.status in (SandboxStatus.FAILED, SandboxStatus.CRASHED)
    assert not target.exists()


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_cannot_write_or_delete_outside_its_directory(caps, tmp_path, namespaces):
    _require(caps, namespaces, any_of=("read_only_root", "unprivileged_uid"))
    private = tmp_path / "private"  # root-only, like pytest's own tmp_path
    private.mkdir(mode=0o700)
    # World-writable and reachable by anyone (not under pytest's 0700 directories): only the read-only
    # mount protects it.
    shared = tempfile.mkdtemp(prefix="nj-sandbox-shared-")
    os.chmod(shared, 0o777)
    canaries = {str(private / "canary.txt"): "private canary", os.path.join(shared, "canary.txt"): "shared canary"}
    for path, text in canaries.items():
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o666 if path.startswith(shared) else 0o600)
    escape = os.path.join(tempfile.gettempdir(), f"nj-escape-{uuid.uuid4().hex}")
    program = (
        "import os, shutil\n"
        f"targets = {list(canaries)!r}\n"
        "attempts = []\n"
        "for t in targets:\n"
        "    d = os.path.dirname(t)\n"
        "    attempts += [\n"
        "        lambda t=t: os.remove(t),\n"
        "        lambda t=t: open(t, 'a').write('owned'),\n"
        "        lambda t=t: open(t, 'w').write('owned'),\n"
        "        lambda t=t: os.rename(t, t + '.moved'),\n"
        "        lambda d=d: open(os.path.join(d, 'new.txt'), 'w').write('new'),\n"
        "        lambda d=d: shutil.rmtree(d),\n"
        "        lambda t=t: os.chmod(t, 0o777),\n"
        "    ]\n"
        f"attempts.append(lambda: open({escape!r}, 'w').write('escaped'))\n"
        "attempts.append(lambda: os.mkdir('/nj-escape-dir'))\n"
        "succeeded = []\n"
        "for index, attempt in enumerate(attempts):\n"
        "    try:\n        attempt()\n        succeeded.append(index)\n"
        "    except OSError:\n        pass\n"
        "print('succeeded', succeeded)\n"
    )
    try:
        result = run_sandboxed(program, namespaces=namespaces, **LIMITS)
        assert result.passed, result
        assert sorted(os.listdir(private)) == ["canary.txt"]
        assert (private / "canary.txt").read_text() == "private canary"
        assert not os.path.exists("/nj-escape-dir")
        if namespaces and caps.filesystem_read_only:
            assert result.stdout == "succeeded []\n"
            assert sorted(os.listdir(shared)) == ["canary.txt"] and not os.path.exists(escape)
            with open(os.path.join(shared, "canary.txt")) as f:
                assert f.read() == "shared canary"
        else:  # the documented degradation: world-writable places are writable
            assert result.stdout != "succeeded []\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        if os.path.exists(escape):
            os.remove(escape)


def test_caller_environment_is_not_visible(caps, monkeypatch):
    secret = f"nj-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("NJ_SANDBOX_SECRET", secret)
    program = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for path in ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ',\n"
        f"             '/proc/{os.getpid()}/environ']:\n"
        "    try:\n        print(open(path, 'rb').read())\n"
        "    except OSError as e:\n        print(path, e)\n"
    )
    result = run_sandboxed(program, **LIMITS)
    assert result.passed, result
    assert secret not in result.stdout and secret not in result.stderr
    assert "NJ_SANDBOX_SECRET" not in result.stdout
    env = eval(result.stdout.splitlines()[0])
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "LC_CTYPE"}


def test_network_connection_to_local_listener_fails(caps):
    _require(caps, True, any_of=("net_namespace",))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        program = (
            "import socket\n"
            "for host in ['127.0.0.1', 'localhost', '::1']:\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2).sendall(b'leak')\n"
            "        print('connected', host)\n"
            "    except OSError as e:\n"
            "        print('blocked', host, type(e).__name__)\n"
        )
        result = run_sandboxed(program, **LIMITS)
        assert result.passed, result
        assert "connected" not in result.stdout and result.stdout.count("blocked") == 3
        with pytest.raises(socket.timeout):
            listener.accept()


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_cannot_kill_parent_or_caller(caps, namespaces):
    _require(caps, namespaces, any_of=("pid_namespace", "unprivileged_uid"))
    me, my_group = os.getpid(), os.getpgrp()
    program = (
        "import os, signal\n"
        f"for name, call in [('parent', lambda: os.kill(os.getppid(), signal.SIGKILL)),\n"
        f"                   ('caller', lambda: os.kill({me}, signal.SIGKILL)),\n"
        f"                   ('caller group', lambda: os.killpg({my_group}, signal.SIGKILL)),\n"
        f"                   ('init', lambda: os.kill(1, signal.SIGKILL))]:\n"
        "    try:\n        call()\n        print(name, 'signalled')\n"
        "    except OSError as e:\n        print(name, type(e).__name__)\n"
        "print('still here', flush=True)\n"
        "try:\n    os.kill(-1, signal.SIGKILL)  # everything this uid may signal\n"
        "except OSError as e:\n    print('kill -1', type(e).__name__)\n"
    )
    result = run_sandboxed(program, namespaces=namespaces, **LIMITS)
    assert result.status in (SandboxStatus.PASSED, SandboxStatus.CRASHED), result
    assert "still here" in result.stdout
    assert "caller signalled" not in result.stdout and "caller group signalled" not in result.stdout
    # The test process (this one) is alive; so is the fork server, which still runs programs.
    assert run_sandboxed("print('ok')", namespaces=namespaces, **LIMITS).stdout == "ok\n"


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_background_process_does_not_outlive_the_run(caps, namespaces):
    _require(caps, namespaces, any_of=("pid_namespace", "unprivileged_uid"))
    marker = f"nj-background-{uuid.uuid4().hex}"
    program = (
        "import os, sys, time\n"
        "started_r, started_w = os.pipe()  # closed on exec: EOF once the background process runs\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for fd in (0, 1, 2):\n            os.close(fd)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])\n"
        "    os._exit(0)\n"
        "os.close(started_w)\n"
        "os.read(started_r, 1)\n"
        "time.sleep(1.0)  # time for the test to see the background process\n"
        "print('parent exits')\n"
    )
    seen_during_run = []

    def watch():
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not seen_during_run:
            seen_during_run.extend(_processes_with_marker(marker))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = run_sandboxed(program, namespaces=namespaces, **LIMITS)
    watcher.join()
    assert result.passed and result.stdout == "parent exits\n", result
    assert seen_during_run, "the background process never started, so this test proves nothing"
    assert _processes_with_marker(marker) == []


def test_printing_100_megabytes(caps):
    program = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n"
    cap = 4 * 1024 * 1024
    tracemalloc.start()
    try:
        result = run_sandboxed(program, max_output_bytes=cap, **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status is SandboxStatus.OUTPUT_TOO_LARGE and result.stdout_truncated
    assert len(result.stdout) == cap
    assert peak < 3 * cap  # the caller never buffered the whole output
    flood = run_sandboxed("import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", max_output_bytes=cap, **LIMITS)
    assert flood.status is SandboxStatus.OUTPUT_TOO_LARGE and flood.stderr_truncated and len(flood.stderr) == cap


def test_signals_and_broken_programs_are_reported(caps):
    segv = run_sandboxed("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", **LIMITS)
    assert segv.status is SandboxStatus.CRASHED and segv.signal == signal.SIGSEGV and "SIGSEGV" in segv.message
    closed = run_sandboxed("import os\nos.close(1)\nos.close(2)\nprint('lost')", **LIMITS)
    assert closed.status is SandboxStatus.FAILED
    binary = run_sandboxed("import sys\nsys.stdout.buffer.write(bytes(range(256)))", **LIMITS)
    assert binary.passed and "\ufffd" in binary.stdout


def test_failure_to_start_is_a_result_not_an_exception(caps):
    result = run_sandboxed("print(1)", python="/nonexistent/python3", **LIMITS)
    assert result.status is SandboxStatus.CRASHED and "sandbox" in result.message
    with pytest.raises(ValueError, match="timeout_s"):
        run_sandboxed("print(1)", timeout_s=0, memory_mb=256)
    with pytest.raises(ValueError, match="memory_mb"):
        run_sandboxed("print(1)", timeout_s=1, memory_mb=-5)
    with pytest.raises(TypeError, match="program"):
        run_sandboxed(b"print(1)", timeout_s=1, memory_mb=256)


def test_concurrent_runs_are_independent(caps):
    programs = [f"import os\nprint({i} * {i}, os.getuid())" for i in range(12)]
    results = [None] * len(programs)

    def run(index):
        results[index] = run_sandboxed(programs[index], **LIMITS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(programs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [int(r.stdout.split()[0]) for r in results] == [i * i for i in range(12)]
    if caps.unprivileged_uid and sandbox._uid_block_available():
        assert all(int(r.stdout.split()[1]) >= sandbox._UID_BLOCK_START for r in results)


def test_capabilities_are_reported(caps):
    # On this project's machines (root in a container) everything is available; elsewhere the
    # degradations must say what is missing rather than pass silently.
    expected = {"net_namespace", "pid_namespace", "read_only_root", "unprivileged_uid", "seccomp_filter"}
    assert caps.fully_isolated == expected.issubset(caps.isolation)
    for name, flag in [("pid_namespace", caps.pid_namespace), ("seccomp_filter", caps.seccomp_filter),
                       ("read_only_root", caps.filesystem_read_only), ("unprivileged_uid", caps.unprivileged_uid)]:
        assert flag == (name in caps.isolation)
    if os.geteuid() == 0:
        assert caps.unprivileged_uid
    assert caps.network_isolated == ("net_namespace" in caps.isolation or "inet_sockets_blocked" in caps.isolation)
    degraded = run_sandboxed("print(1)", namespaces=False, **LIMITS)
    assert "net_namespace" not in degraded.isolation and degraded.passed


def test_program_holds_no_capabilities(caps):
    program = (
        "import ctypes, os\n"
        "status = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')}\n"
        "print(status['CapEff'], status['CapPrm'], status['CapAmb'])\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(None, b'/', None, 32 | 4096, None))  # MS_REMOUNT | MS_BIND without MS_RDONLY\n"
    )
    result = run_sandboxed(program, **LIMITS)
    assert result.passed, result
    assert result.stdout.split() == ["0000000000000000"] * 3 + ["-1"]


_UNPRIVILEGED_CALLER = """
import os, sys
from nemotron_jax.rewards.sandbox import run_sandboxed, sandbox_capabilities
caps = sandbox_capabilities()
print("isolation", sorted(caps.isolation))
program = '''
import ctypes, os
status = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")}
libc = ctypes.CDLL(None, use_errno=True)
remount = libc.mount(None, b"/", None, 32 | 4096, None)
try:
    open(ESCAPE, "w").write("escaped")
    wrote = True
except OSError:
    wrote = False
print(os.getuid(), status["CapEff"], remount, wrote)
'''.replace("ESCAPE", repr(sys.argv[1]))
result = run_sandboxed(program, timeout_s=10, memory_mb=256)
print("result", result.status.value, result.stdout.strip(), result.message)
"""


def test_unprivileged_caller_gets_user_namespace_isolation(caps):
    """A non-root caller (CI as a normal user) gets the namespaces through a user namespace; the program
    there must hold no capability (it would otherwise undo the read-only mounts as the caller's uid)."""
    if os.geteuid() != 0:
        pytest.skip("the test process is already unprivileged: the other tests cover this mode")
    # A world-readable copy of just the sandbox modules, run by the probed interpreter as uid 1000.
    copy = tempfile.mkdtemp(prefix="nj-sandbox-copy-")
    escape_dir = tempfile.mkdtemp(prefix="nj-sandbox-userns-")
    try:
        package = os.path.join(copy, "nemotron_jax")
        os.makedirs(os.path.join(package, "rewards"))
        for name in ("__init__.py", os.path.join("rewards", "__init__.py")):
            open(os.path.join(package, name), "w").close()
        for name in ("sandbox.py", "_sandbox_child.py"):
            shutil.copy(os.path.join(os.path.dirname(sandbox.__file__), name), os.path.join(package, "rewards"))
        with open(os.path.join(copy, "caller.py"), "w") as f:
            f.write(_UNPRIVILEGED_CALLER)
        for root, dirs, files in os.walk(copy):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chmod(name, 0o755)
        os.chown(escape_dir, 1000, 1000)  # writable by the caller's uid: only the read-only mount protects it
        escape = os.path.join(escape_dir, "escape.txt")
        completed = subprocess.run(
            [caps.python, "caller.py", escape], cwd=copy, user=1000, group=1000, extra_groups=[],
            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
        if "user_namespace" not in lines["isolation"]:
            pytest.skip(f"user namespaces are not available to unprivileged users here: {lines['isolation']}")
        assert lines["result"].startswith("passed 1000 0000000000000000 -1 False"), lines
        assert not os.path.exists(escape)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(escape_dir, ignore_errors=True)


def test_probe_falls_back_when_namespace_setup_fails(caps, monkeypatch):
    """Where unshare succeeds but the rest of the set-up does not, runs must degrade (reported), not fail."""
    real_run = sandbox._run

    def run_where_namespaces_break(program, stdin, timeout_s, memory_mb, *rest):
        if rest[-1]:  # namespaces requested
            return sandbox.SandboxResult(SandboxStatus.CRASHED, message="sandbox setup failed, the program did "
                                         "not run: PermissionError: [Errno 1] uid_map")
        return real_run(program, stdin, timeout_s, memory_mb, *rest)

    monkeypatch.setattr(sandbox, "_run", run_where_namespaces_break)
    monkeypatch.setattr(sandbox, "_probe", None)
    monkeypatch.setattr(sandbox, "_capabilities_cache", None)
    degraded = sandbox_capabilities()
    assert degraded.python == caps.python and "net_namespace" not in degraded.isolation
    assert degraded.degradations[0].startswith("namespace set-up fails")
    result = run_sandboxed("print('still runs')", **LIMITS)
    assert result.passed and result.stdout == "still runs\n" and "net_namespace" not in result.isolation
    monkeypatch.undo()
    sandbox._probe = None
    sandbox._capabilities_cache = None
    assert sandbox_capabilities().isolation == caps.isolation


# ----------------------------------------------------------------------------------------------------------
# Attacks found in review (issue 11): each was open before the fix.


def _require_seccomp(caps) -> None:
    if not caps.seccomp_filter:
        pytest.skip(f"this machine gives the sandbox no seccomp filter (a reported degradation): {caps.degradations}")


_SOCKET_PROBE = """
import socket
for name, family, kind in [("unix", 1, socket.SOCK_STREAM), ("inet", 2, socket.SOCK_STREAM),
                           ("inet6", 10, socket.SOCK_STREAM), ("netlink", 16, socket.SOCK_RAW),
                           ("packet", 17, socket.SOCK_RAW), ("alg", 38, socket.SOCK_SEQPACKET),
                           ("vsock", 40, socket.SOCK_STREAM), ("vsock-high-bits", 40 | (1 << 32), socket.SOCK_STREAM)]:
    try:
        if family >> 32:  # the raw system call, with junk in the argument's upper half
            import ctypes, os, platform
            libc = ctypes.CDLL(None, use_errno=True)
            number = {"x86_64": 41, "aarch64": 198}[platform.machine()]
            libc.syscall.argtypes = (ctypes.c_long, ctypes.c_ulong, ctypes.c_long, ctypes.c_long)
            fd = libc.syscall(number, family, kind, 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            os.close(fd)
        else:
            socket.socket(family, kind).close()
        print(name, "open")
    except OSError as error:
        print(name, error.errno)
try:
    a, b = socket.socketpair(40, socket.SOCK_STREAM)
    print("vsock-pair open")
except OSError as error:
    print("vsock-pair", error.errno)
a, b = socket.socketpair()
print("unix-pair open")
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_only_unix_sockets_and_inet_inside_the_empty_network_namespace(caps, namespaces):
    """AF_VSOCK is not network-namespaced (it reaches the hypervisor): before the seccomp filter, a program
    could open and bind it. Only AF_UNIX (and inet inside the empty network namespace) may be opened."""
    _require_seccomp(caps)
    result = run_sandboxed(_SOCKET_PROBE, namespaces=namespaces, **LIMITS)
    assert result.passed, result
    outcome = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    inet_allowed = "net_namespace" in result.isolation
    expected_inet = "open" if inet_allowed else "97"
    assert outcome == {
        "unix": "open", "inet": expected_inet, "inet6": expected_inet, "netlink": "97", "packet": "97",
        "alg": "97", "vsock": "97", "vsock-high-bits": "97", "vsock-pair": "97", "unix-pair": "open",
    }, outcome
    assert "seccomp_filter" in result.isolation
    assert ("inet_sockets_blocked" in result.isolation) == (not inet_allowed)


def test_kernel_keyrings_are_refused(caps):
    """Keyrings persist per uid: before the filter, a key added in one run could be read in the next."""
    _require_seccomp(caps)
    keyring_call = (
        "import ctypes, os, platform\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "add_key, request_key, keyctl = {'x86_64': (248, 249, 250), 'aarch64': (217, 218, 219)}[platform.machine()]\n"
        "USER_KEYRING = -4\n"
    )
    marker = f"nj-key-{uuid.uuid4().hex[:12]}".encode()
    writer = keyring_call + (
        f"r = libc.syscall(add_key, b'user', {marker!r}, b'secret-from-run-1', 17, USER_KEYRING)\n"
        "print('add_key', r, ctypes.get_errno())\n"
    )
    reader = keyring_call + (
        f"r = libc.syscall(request_key, b'user', {marker!r}, None, 0)\n"
        "print('request_key', r, ctypes.get_errno())\n"
        "r = libc.syscall(keyctl, 0, USER_KEYRING, 0)  # KEYCTL_GET_KEYRING_ID\n"
        "print('keyctl', r, ctypes.get_errno())\n"
    )
    first = run_sandboxed(writer, **LIMITS)
    second = run_sandboxed(reader, **LIMITS)
    assert first.passed and second.passed, (first, second)
    assert first.stdout.split() == ["add_key", "-1", "1"]  # EPERM
    assert second.stdout.split() == ["request_key", "-1", "1", "keyctl", "-1", "1"]


def test_io_uring_and_other_abis_are_refused(caps):
    """io_uring can open sockets without the `socket` system call; x32 system call numbers would dodge a
    filter keyed on the x86_64 numbers: the first fails with EPERM, the second kills the process."""
    _require_seccomp(caps)
    io_uring = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "params = ctypes.create_string_buffer(120)\n"
        "print(libc.syscall(425, 4, params), ctypes.get_errno())\n"
    )
    result = run_sandboxed(io_uring, **LIMITS)
    assert result.passed and result.stdout.split() == ["-1", "1"], result
    if os.uname().machine != "x86_64":
        return
    x32_socket = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "print('before', flush=True)\n"
        "print(libc.syscall(0x40000000 + 41, 40, 1, 0), ctypes.get_errno())\n"
    )
    result = run_sandboxed(x32_socket, **LIMITS)
    assert result.status is SandboxStatus.CRASHED and result.signal == signal.SIGSYS, result
    assert result.stdout == "before\n"


def test_daemon_whose_main_thread_exited_is_swept(caps):
    """Without a PID namespace: a daemon whose main thread exits (a zombie leader, other threads running)
    used to survive the uid sweep, and could kill later runs of the same uid."""
    _require(caps, False, any_of=("unprivileged_uid",))
    if not sandbox._uid_block_available():
        pytest.skip("no dedicated sandbox uids: the uid sweep is off (a reported degradation)")
    program = (
        "import ctypes, os, platform, sys, threading, time\n"
        "ready_r, ready_w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    for fd in (0, 1, 2):\n        os.close(fd)\n"
        "    threading.Thread(target=lambda: time.sleep(120)).start()\n"
        "    os.write(ready_w, b'x')\n"
        "    exit_thread = {'x86_64': 60, 'aarch64': 93}[platform.machine()]\n"
        "    ctypes.CDLL(None).syscall(exit_thread, 0)  # exit(), not exit_group(): only the main thread ends\n"
        "os.read(ready_r, 1)\n"
        "for _ in range(200):  # until the daemon's main thread is a zombie\n"
        "    with open(f'/proc/{pid}/stat') as f:\n"
        "        if f.read().rsplit(')', 1)[1].split()[0] == 'Z':\n            break\n"
        "    time.sleep(0.01)\n"
        "print(pid)\n"
    )
    result = run_sandboxed(program, namespaces=False, **LIMITS)
    assert result.passed, result
    daemon = int(result.stdout)
    assert not os.path.exists(f"/proc/{daemon}") or not _thread_group_alive(daemon), "the daemon survived"
    assert "leftover process" in result.message


_KILLED_CALLER = """
import sys
from nemotron_jax.rewards.sandbox import run_sandboxed
print("starting", flush=True)
run_sandboxed("SECRET = %r\\nimport time\\ntime.sleep(60)\\n", timeout_s=60, memory_mb=256, namespaces=%r)
"""


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _process_tree(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(name))
    tree, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_caller_killed_mid_run_leaves_nothing_a_later_run_can_read(caps, namespaces, tmp_path):
    """A caller SIGKILLed mid-run used to leave its working directory, program inside, owned by the sandbox
    uid: the next run of that uid could read it."""
    _require(caps, namespaces, any_of=("unprivileged_uid",))
    secret = f"nj-secret-{uuid.uuid4().hex}"
    script = tmp_path / "caller.py"
    script.write_text(_KILLED_CALLER % (secret, namespaces))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dirs_before = _sandbox_dirs()
    caller = subprocess.Popen([sys.executable, str(script)], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout.readline() == "starting\n"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the program runs under the sandbox uid
            if any(_uid_of(pid) not in (None, 0) for pid in _process_tree(caller.pid)):
                break
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        caller.kill()
        caller.wait()
    left = _sandbox_dirs() - dirs_before
    assert left, "the killed caller left no working directory, so this test proves nothing"
    reader = (  # the secret is assembled at run time: this program's own file must not contain it
        "import glob\n"
        f"secret = {secret[:12]!r} + {secret[12:]!r}\n"
        "for path in glob.glob('/tmp/nemotron-jax-sandbox-*/*'):\n"
        "    try:\n"
        "        print('read', path) if secret in open(path).read() else None\n"
        "    except OSError:\n"
        "        pass\n"
        "print('done')\n"
    )
    for mode in (True, False):
        later = run_sandboxed(reader, namespaces=mode, **LIMITS)
        assert later.passed and later.stdout == "done\n", later
    sandbox._sweep_stale_slots()  # what the next process's first run does
    assert _sandbox_dirs() - dirs_before == set()


def test_without_seccomp_the_degradation_is_reported(caps, monkeypatch):
    """Where the filter cannot be installed (another architecture, a kernel without seccomp), runs go on
    without it and say so, in `sandbox_capabilities()` and in each result."""
    monkeypatch.setattr(sandbox, "_USE_SECCOMP", False)
    monkeypatch.setattr(sandbox, "_capabilities_cache", None)
    degraded = sandbox_capabilities()
    assert not degraded.seccomp_filter and not degraded.fully_isolated
    assert any(line.startswith("no seccomp filter") for line in degraded.degradations), degraded.degradations
    result = run_sandboxed("import socket\nsocket.socket(40, socket.SOCK_STREAM).close()\nprint('vsock open')",
                           **LIMITS)
    assert "seccomp_filter" not in result.isolation and "no seccomp filter" in result.message
    assert result.status in (SandboxStatus.PASSED, SandboxStatus.FAILED)  # FAILED where the host has no vsock
    monkeypatch.undo()
    sandbox._capabilities_cache = None
    assert sandbox_capabilities().isolation == caps.isolation

"""Fork server and launcher that run the sandbox's process tree; see `sandbox.py` for the design.

`sandbox.run_sandboxed` starts this file once per caller process and interpreter, as
`python -I -S -B -X utf8 _sandbox_child.py --serve FD` with an empty environment, and sends it one request
per run (`serve`). It is trusted code running with the caller's privileges, so it imports only `os`, `sys`,
`ctypes`, `resource`, `signal` and `socket`; every run is a fork of this small, idle interpreter, which then
runs the program as `__main__` (`_run_as_main`), so a run costs a few forks instead of an interpreter start.

Process tree of one run and what each process does:

    launcher (forked by the server; caller's pid namespace; its own session and process group)
      - unshares new network / mount / IPC / UTS / PID namespaces (as root, or inside a new user namespace
        when not root); each one that fails is reported, never silently dropped,
      - in the new mount namespace: makes every mount private, read-only and nosuid, then mounts a
        size-limited tmpfs on the working directory and copies the program into it;
      - forks the supervisor, waits for it, exits.
    supervisor (pid 1 of the new PID namespace when there is one; otherwise the launcher itself)
      - mounts a fresh /proc for the namespace, forks the program process, reaps orphans, reports the
        program's exit status and resource usage, and exits. When pid 1 of a PID namespace exits, the
        kernel kills every other process in it: nothing the program started survives it.
    program process
      - chdir to the working directory, resource limits, OOM-killer preference (oom_score_adj 1000),
        no_new_privs, drops to the sandbox uid/gid and drops every capability, restores default signal
        dispositions, closes every descriptor but 0, 1, 2, then runs the program as `__main__` (see
        `_run_as_main`).

Everything is reported to the caller on the status pipe, one line per fact:
`iso <mechanism,...>`, `warn <text>`, `error <text>` (setup failed; the program never ran),
`exit <code>` or `signal <number>`, and `rusage <user_s> <sys_s> <maxrss_kib>`.
"""

import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
SYS_MOUNT_SETATTR = 442  # same number on every architecture (syscalls >= 424 are unified)

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_NAMESPACES = (  # (flag, mechanism name reported to the caller)
    (CLONE_NEWNET, "net_namespace"),
    (CLONE_NEWNS, "mount_namespace"),
    (CLONE_NEWPID, "pid_namespace"),
    (CLONE_NEWIPC, "ipc_namespace"),
    (CLONE_NEWUTS, "uts_namespace"),
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class SetupError(Exception):
    """A sandbox mechanism that must work did not; the program is not run."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


class Status:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, line: str) -> None:
        data = (line.replace("\n", " ") + "\n").encode("utf-8", "replace")
        try:
            os.write(self.fd, data if len(data) < 4000 else data[:3999] + b"\n")  # < PIPE_BUF: atomic
        except OSError:
            pass


def _parse_args(argv):
    config, env = {}, {}
    for item in argv:
        key, _, value = item.partition("=")
        if key.startswith("env:"):
            env[key[4:]] = value
        else:
            config[key] = value
    return config, env


def _write_id_map(path: str, inside: int, outside: int) -> None:
    with open(path, "w") as f:
        f.write(f"{inside} {outside} 1\n")


def _unshare(status: Status) -> set:
    """Enters as many of the new namespaces as the OS allows; returns the mechanism names entered."""
    wanted = 0
    for flag, _ in _NAMESPACES:
        wanted |= flag
    uid, gid = os.getuid(), os.getgid()
    # Unprivileged callers need a user namespace to get the capabilities for the others.
    flags = wanted if uid == 0 else wanted | CLONE_NEWUSER
    if _libc.unshare(flags) == 0:
        entered = {name for flag, name in _NAMESPACES}
        if flags & CLONE_NEWUSER:
            _enter_user_namespace_maps(uid, gid)
            entered.add("user_namespace")
        return entered
    status.send(f"warn unshare of all namespaces failed: {os.strerror(ctypes.get_errno())}; trying one by one")
    entered = set()
    for flag, name in _NAMESPACES:
        if _libc.unshare(flag) == 0:
            entered.add(name)
        else:
            status.send(f"warn {name} unavailable: {os.strerror(ctypes.get_errno())}")
    return entered


def _enter_user_namespace_maps(uid: int, gid: int) -> None:
    # Identity map: inside, the program keeps the caller's (non-zero) uid, so the capabilities the user
    # namespace granted to this launcher are dropped when the program is exec'd.
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    _write_id_map("/proc/self/uid_map", uid, uid)
    _write_id_map("/proc/self/gid_map", gid, gid)


_MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


def _make_tree_read_only(status: Status) -> bool:
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    result = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    if result == 0:
        return True
    status.send(f"warn mount_setattr unavailable ({os.strerror(ctypes.get_errno())}); remounting each mount")
    # Older kernels: bind-remount every mount point read-only, keeping its other per-mount flags (which a
    # user namespace may not clear).
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    failed = []
    for fields in mounts:
        mount_point = fields[4].encode().decode("unicode_escape")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        for option in fields[5].split(","):
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            _mount(None, mount_point, None, flags)
        except OSError as error:
            failed.append(f"{mount_point} ({error.strerror})")
    if failed:
        status.send("warn could not make read-only: " + ", ".join(failed))
    return not failed


def _prepare_filesystem(config, status: Status) -> set:
    """Read-only mount tree and a private tmpfs working directory; returns the mechanisms achieved.

    A step that fails is reported and leaves the program with less protection (the caller sees it in
    the `iso` line); it does not stop the run.
    """
    workdir = config["workdir"]
    program_path = os.path.join(workdir, config["program_file"])
    with open(program_path, "rb") as f:
        program = f.read()
    achieved = set()
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the caller's mounts
    except OSError as error:
        status.send(f"warn mounts not private, file system left as it is: {error}")
        return achieved
    if _make_tree_read_only(status):
        achieved.add("read_only_root")
    owner = ""
    if int(config["uid"]) >= 0:
        owner = f",uid={config['uid']},gid={config['gid']}"
    try:
        _mount(
            "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
            f"size={config['tmpfs_bytes']},nr_inodes={config['tmpfs_inodes']},mode=0700{owner}",
        )
    except OSError as error:
        if "read_only_root" in achieved:  # the program could neither write nor read its directory
            raise SetupError(f"no private tmpfs working directory on a read-only tree: {error}") from error
        status.send(f"warn no private tmpfs working directory: {error}")
        return achieved
    fd = os.open(program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, program)
    finally:
        os.close(fd)
    achieved.add("private_tmpfs_workdir")
    return achieved


def _drop_capabilities() -> None:
    """Clears every capability of this process and checks that none is left.

    Needed because the program never goes through execve (which is where the kernel would drop them):
    as root the uid change already cleared them, but inside a user namespace the launcher's process holds
    all capabilities of that namespace, with which the program could undo the read-only mounts.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    no_capabilities = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), no_capabilities), "capset")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    with open("/proc/self/status") as f:
        held = {line.split(":")[0]: int(line.split()[1], 16) for line in f if line.startswith("Cap")}
    if held.get("CapEff") or held.get("CapPrm") or held.get("CapAmb"):
        raise SetupError(f"capabilities still held after dropping them: {held}")



# ----------------------------------------------------------------------------------------------------------
# seccomp filter
#
# Hand-written classic BPF rather than a library: the filter must be built and installed here, in this
# stdlib-only process started with `-I -S` (often a different interpreter than the caller's virtual
# environment), so a PyPI package cannot be imported at this point. Of the packages looked at, pyseccomp
# (last release 2021) needs the system's libseccomp.so, so it does not install from PyPI alone, and
# seccompy (0.2.0, beta) does not reject x32-ABI system call numbers, through which a program could reach
# `socket` under another number. The policy is small enough to read in full below.

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
_EPERM, _EAFNOSUPPORT = 1, 97

SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
_X32_SYSCALL_BIT = 0x40000000

_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = seccomp_data[k]
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_DATA_NR, _DATA_ARCH, _DATA_ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little-endian machines)

# Per machine: (AUDIT_ARCH_*, {system call: number}). io_uring's numbers are the same everywhere.
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "add_key": 248, "request_key": 249, "keyctl": 250}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "add_key": 217, "request_key": 218, "keyctl": 219}),
}
_IO_URING = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}
# Refused with EPERM, as Docker's default profile does: kernel keyrings outlive a run and are shared by every
# process of the uid (a program could leave data for a later run), and io_uring can create sockets
# (IORING_OP_SOCKET) without going through the `socket` system call that the filter checks.
_DENIED_CALLS = ("add_key", "request_key", "keyctl", *_IO_URING)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str, allow_inet: bool) -> list:
    """The filter as (code, jt, jf, k) tuples, or raises KeyError for a machine without a policy here.

    Allows every system call except: `socket`/`socketpair` of any family but AF_UNIX (plus AF_INET/AF_INET6
    when `allow_inet`, i.e. inside an empty network namespace) -> EAFNOSUPPORT; `_DENIED_CALLS` -> EPERM;
    another ABI (i386 `int 0x80`, x32 numbers) -> the process is killed.
    """
    arch, numbers = _SECCOMP_ARCHES[machine]
    numbers = {**numbers, **_IO_URING}
    # Assembled with symbolic jump targets; a jump field is the number of instructions to skip.
    code = [("ld", _DATA_ARCH), ("jeq", arch, None, "kill"), ("ld", _DATA_NR)]
    if machine == "x86_64":
        code.append(("jge", _X32_SYSCALL_BIT, "kill", None))
    code += [("jeq", numbers["socket"], "family", None), ("jeq", numbers["socketpair"], "family", None)]
    code += [("jeq", numbers[name], "eperm", None) for name in _DENIED_CALLS]
    code.append(("ret", SECCOMP_RET_ALLOW))
    # The family is an `int`: the kernel reads only the low 32 bits of the argument, and so does this.
    families = [AF_UNIX] + ([AF_INET, AF_INET6] if allow_inet else [])
    code += [("label", "family"), ("ld", _DATA_ARG0_LOW)]
    code += [("jeq", family, "allow", None) for family in families]
    code += [
        ("ret", SECCOMP_RET_ERRNO | _EAFNOSUPPORT),
        ("label", "allow"), ("ret", SECCOMP_RET_ALLOW),
        ("label", "eperm"), ("ret", SECCOMP_RET_ERRNO | _EPERM),
        ("label", "kill"), ("ret", SECCOMP_RET_KILL_PROCESS),
    ]
    labels, position = {}, 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = position
        else:
            position += 1
    program, position = [], 0
    for item in code:
        kind = item[0]
        if kind == "label":
            continue
        if kind == "ld":
            program.append((_BPF_LD_W_ABS, 0, 0, item[1]))
        elif kind == "ret":
            program.append((_BPF_RET_K, 0, 0, item[1]))
        else:
            _, value, if_true, if_false = item
            jump = lambda target: 0 if target is None else labels[target] - position - 1  # noqa: E731
            program.append((_BPF_JEQ_K if kind == "jeq" else _BPF_JGE_K, jump(if_true), jump(if_false), value))
        position += 1
    return program


def install_seccomp(allow_inet: bool) -> None:
    """Installs the filter on this process (inherited by its children; cannot be removed). Needs no_new_privs."""
    program = seccomp_program(os.uname().machine, allow_inet)
    instructions = (_SockFilter * len(program))(*[_SockFilter(*instruction) for instruction in program])
    fprog = _SockFprog(len(program), instructions)
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(SET_SECCOMP)")


def seccomp_works() -> str:
    """'' if the filter can be installed here and refuses AF_VSOCK, else why not (run once per fork server)."""
    if os.uname().machine not in _SECCOMP_ARCHES:
        return f"no seccomp policy for the {os.uname().machine} architecture"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"?"
        try:
            os.close(read_end)
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
            install_seccomp(allow_inet=False)
            import socket

            try:
                socket.socket(40, socket.SOCK_STREAM).close()  # AF_VSOCK
                outcome = b"the filter was installed but did not refuse a socket family"
            except OSError as error:
                outcome = b"" if error.errno == _EAFNOSUPPORT else str(error).encode()
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            outcome = f"{type(error).__name__}: {error}".encode()
        finally:
            os.write(write_end, outcome or b"ok")
            os._exit(0)
    os.close(write_end)
    try:
        reply = os.read(read_end, 4096).decode("utf-8", "replace")
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return "" if reply == "ok" else (reply or "the seccomp probe process died")


def _set_limits(config) -> None:
    def limit(kind, value):
        resource.setrlimit(kind, (value, value))

    cpu = int(config["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL 1 s later
    limit(resource.RLIMIT_AS, int(config["as_bytes"]))
    limit(resource.RLIMIT_FSIZE, int(config["fsize_bytes"]))
    limit(resource.RLIMIT_NOFILE, int(config["nofile"]))
    limit(resource.RLIMIT_NPROC, int(config["nproc"]))
    limit(resource.RLIMIT_CORE, 0)
    if hasattr(resource, "RLIMIT_MEMLOCK"):
        limit(resource.RLIMIT_MEMLOCK, 0)


def _exec_program(config, env, status: Status, mechanisms: set) -> None:
    """Runs in the forked program process; never returns."""
    pid_namespace = "pid_namespace" in mechanisms
    try:
        os.chdir(config["workdir"])
        program_path = os.path.join(config["workdir"], config["program_file"])
        _set_limits(config)
        # If memory runs out anyway (limits are per process), the kernel kills the sandbox, not its caller.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        uid, gid = int(config["uid"]), int(config["gid"])
        if uid >= 0:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _drop_capabilities()
        if os.geteuid() == 0:
            raise SetupError("refusing to run the program as root")
        if "seccomp_filter" in mechanisms:
            install_seccomp(allow_inet="net_namespace" in mechanisms)
        if not pid_namespace:
            # Set after the uid change, which clears it: the program dies with its supervisor.
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)  # as in a fresh interpreter's children (exec keeps SIG_IGN)
        os.environ.clear()
        os.environ.update(env)
    except BaseException as error:  # noqa: BLE001 - anything here means the program cannot run
        status.send(f"error {type(error).__name__}: {error}")
        os._exit(126)
    os.closerange(3, 1 << 20)  # the status pipe included: the program keeps only stdin, stdout, stderr
    os._exit(_run_as_main(program_path))


def _run_as_main(program_path: str) -> int:
    """Executes the program file the way `python -I -S program.py` would, in this (fresh, isolated) interpreter.

    This interpreter was started for this run only (`-I -S -B -X utf8`, empty environment) and has imported
    nothing but this launcher's few modules, so running the program here instead of exec'ing a second
    interpreter halves the cost of a run. The program gets a new `__main__` module, `sys.argv`, the normal
    exit-status rules for `SystemExit`, uncaught-exception tracebacks (without this launcher's frames), and
    the interpreter's shutdown steps: joining non-daemon threads, atexit handlers, flushing stdio.
    """
    import builtins

    main = type(sys)("__main__")
    main.__file__ = program_path
    main.__builtins__ = builtins
    main.__cached__ = None
    sys.modules["__main__"] = main
    sys.argv = [program_path]
    exit_code = 0
    try:
        with open(program_path, "rb") as f:
            source = f.read()
        exec(compile(source, program_path, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as exit_request:
        exit_code = _exit_code(exit_request)
    except BaseException as error:  # noqa: BLE001 - reported like the interpreter does
        exit_code = _report_uncaught(error)
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # noqa: SLF001 - what interpreter shutdown does first
        import atexit

        atexit._run_exitfuncs()  # noqa: SLF001
    except SystemExit as exit_request:
        exit_code = _exit_code(exit_request)
    except BaseException as error:  # noqa: BLE001
        exit_code = _report_uncaught(error)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream: nothing more to write
            if stream is sys.stdout:
                exit_code = exit_code or 120  # what CPython does when stdout cannot be flushed
    return exit_code


def _exit_code(exit_request: SystemExit) -> int:
    code = exit_request.code
    if code is None:
        return 0
    if isinstance(code, int):  # bool included, as in CPython
        return int(code) & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _report_uncaught(error: BaseException) -> int:
    traceback = error.__traceback__
    if traceback is not None and traceback.tb_frame.f_code is _run_as_main.__code__:
        traceback = traceback.tb_next  # hide this launcher's frame, as `python program.py` would
    try:
        # The default hook prints the exception's own __traceback__, so trim that one.
        sys.__excepthook__(type(error), error.with_traceback(traceback), traceback)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _supervise(config, env, status: Status, mechanisms: set) -> int:
    """Forks the program, waits for it (reaping orphans when pid 1), reports its status."""
    pid_namespace = "pid_namespace" in mechanisms
    program_pid = os.fork()
    if program_pid == 0:
        _exec_program(config, env, status, mechanisms)
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1 if pid_namespace else program_pid, 0)
        except ChildProcessError:
            status.send("error program process vanished")
            return 1
        except InterruptedError:
            continue
        if pid == program_pid:
            break
    if os.WIFSIGNALED(wait_status):
        status.send(f"signal {os.WTERMSIG(wait_status)}")
    else:
        status.send(f"exit {os.WEXITSTATUS(wait_status)}")
    status.send(f"rusage {usage.ru_utime:.4f} {usage.ru_stime:.4f} {usage.ru_maxrss}")
    return 0


def _launch(config, env, status: Status) -> int:
    """The launcher's part: namespaces and file system, then the supervisor (see the module docstring)."""
    try:
        mechanisms = set()
        if config["namespaces"] == "1":
            mechanisms = _unshare(status)
            if "mount_namespace" in mechanisms:
                mechanisms |= _prepare_filesystem(config, status)
        if int(config["uid"]) >= 0:
            mechanisms.add("unprivileged_uid")
            if "private_tmpfs_workdir" not in mechanisms:
                # The caller made the directory 0700 for itself; the program works in it on the host disk.
                os.chown(config["workdir"], int(config["uid"]), int(config["gid"]))
        mechanisms.add("no_new_privs")
        seccomp_problem = _seccomp_problem if config.get("seccomp", "1") == "1" else "turned off by the caller"
        if seccomp_problem:
            status.send(f"warn no seccomp filter: {seccomp_problem}")
        else:
            mechanisms.add("seccomp_filter")
            if "net_namespace" not in mechanisms:
                mechanisms.add("inet_sockets_blocked")  # the filter refuses AF_INET/AF_INET6 too
        status.send("iso " + ",".join(sorted(mechanisms)))
        if "pid_namespace" not in mechanisms:
            return _supervise(config, env, status, mechanisms)
        init_pid = os.fork()  # the first child in the new PID namespace is its pid 1
        if init_pid == 0:
            code = 1
            try:
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if "mount_namespace" in mechanisms:
                    try:  # a /proc that shows only this namespace's processes
                        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    except OSError as error:
                        status.send(f"warn private /proc not mounted: {error}")
                code = _supervise(config, env, status, mechanisms)
            except BaseException as error:  # noqa: BLE001
                status.send(f"error supervisor: {type(error).__name__}: {error}")
            os._exit(code)
        os.close(status.fd)
        while True:
            try:
                _, wait_status = os.waitpid(init_pid, 0)
                return os.waitstatus_to_exitcode(wait_status) & 0xFF
            except InterruptedError:
                continue
    except BaseException as error:  # noqa: BLE001 - report, never leave the caller guessing
        status.send(f"error {type(error).__name__}: {error}")
        return 1


def _start_launcher(payload: bytes, fds: list, server, server_pid: int) -> int:
    """Forks the launcher for one run; in the parent returns its pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        server.close()  # nothing in the sandbox may reach the fork server
        os.setsid()  # own session and process group: the caller kills the run with killpg(pid)
        # Die with the fork server (which exits when the caller does): no run outlives its caller.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:
            os._exit(1)
        stdin_fd, stdout_fd, stderr_fd, status_fd = fds
        for source, target in ((stdin_fd, 0), (stdout_fd, 1), (stderr_fd, 2)):
            os.dup2(source, target)
        for fd in (stdin_fd, stdout_fd, stderr_fd):
            os.close(fd)
        config, env = _parse_args(payload.decode("utf-8").split("\0"))
        code = _launch(config, env, Status(status_fd))
    finally:
        os._exit(code)


_seccomp_problem = "not probed"  # set by `serve`: '' when the seccomp filter works on this machine


def serve(sock_fd: int) -> int:
    """Fork server: one launcher per request, so a run costs a fork instead of an interpreter start.

    Requests on the SOCK_SEQPACKET socket: `run\\0key=value\\0...` with four file descriptors attached
    (stdin, stdout, stderr, status pipe), answered with the launcher's pid; `reap\\0<pid>`, sent by the
    caller once it no longer needs the launcher's pid (until then the pid stays a zombie, so the caller's
    killpg can never hit a recycled process group). EOF (the caller exited) ends the server, and every
    launcher dies with it (PR_SET_PDEATHSIG).
    """
    import socket

    global _seccomp_problem
    _seccomp_problem = seccomp_works()
    server = socket.socket(fileno=sock_fd)
    server_pid = os.getpid()
    unreaped = set()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(server, 1 << 20, 4)
        except InterruptedError:
            continue
        except OSError:
            return 1
        if not message:
            return 0
        kind, _, payload = message.partition(b"\0")
        try:
            if kind == b"run" and len(fds) == 4:
                try:
                    reply = str(_start_launcher(payload, fds, server, server_pid))
                except OSError as error:
                    reply = f"error fork failed: {error}"
                server.send(reply.encode())
            elif kind == b"reap":
                unreaped.add(int(payload))
            else:
                server.send(b"error malformed request")
        finally:
            for fd in fds:
                os.close(fd)
        for pid in list(unreaped):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    unreaped.discard(pid)
            except ChildProcessError:
                unreaped.discard(pid)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--serve"] or len(sys.argv) != 3:
        sys.exit("usage: _sandbox_child.py --serve SOCKET_FD (started by nemotron_jax.rewards.sandbox)")
    sys.exit(serve(int(sys.argv[2])))

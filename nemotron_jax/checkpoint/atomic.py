"""Write a checkpoint directory so that a crash never leaves a half-written one in its place.

The new directory is written under a staging name beside the destination (`.<name>.partial-<pid>@<host>-*`),
every file and directory in it is fsynced, and it is put in place with one rename:
- no destination yet: rename(staging, destination);
- replacing (`overwrite=True`): an atomic exchange of the two names (Linux `renameat2(RENAME_EXCHANGE)`), so
  the destination names the complete old directory until the instant it names the complete new one; the
  old one, now under the staging name, is deleted afterwards.
A process killed at any point leaves the destination complete (old or new) and at most one staging
directory, which the next save to the same destination deletes (staging directories of processes still
alive on this host are left alone). Where the file system cannot exchange names (not Linux, or a file
system without RENAME_EXCHANGE), replacement falls back to two renames, with a moment in between where the
destination is missing; the old directory is then kept as `.<name>.old-<pid>@<host>-*` until the new one is
in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from typing import Any, Callable, Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    return f"{os.getpid()}@{_host_tag()}"


def _staging_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove(path: str) -> None:
    """Deletes a directory tree, a file or a symbolic link (not what a link points to)."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(directory: str) -> list[str]:
    """Deletes the staging directories that interrupted saves to `directory` left beside it: those of
    processes that no longer run on this host, and those in the older unowned naming. Returns their paths.
    An old directory set aside by the two-rename fallback is put back if `directory` is missing."""
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return []
    owner = re.compile(r"(\d+)@(.+)-[^-]*$")
    removed = []
    for entry in entries:
        for kind in ("partial", "old"):
            prefix = _staging_prefix(name, kind)
            if not entry.startswith(prefix):
                continue
            match = owner.match(entry[len(prefix):])
            if match is not None:
                pid, host = int(match.group(1)), match.group(2)
                if host != _host_tag() or _process_alive(pid):
                    continue  # possibly a save in progress
            path = os.path.join(parent, entry)
            kept = os.path.join(path, name)
            if kind == "old" and not os.path.lexists(directory) and os.path.lexists(kept):
                # Killed between the two renames of the fallback: the old directory is the only copy.
                os.rename(kept, directory)
            _remove(path)
            removed.append(path)
    return removed


def _fsync_path(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory and sys.platform == "win32":
            return  # directories cannot be opened there
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsyncs every regular file and directory under `root` (and `root`), so that their contents are on disk
    before a rename makes them visible."""
    for current, _, files in os.walk(root):
        for file_name in files:
            path = os.path.join(current, file_name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _fsync_path(path, directory=False)
        _fsync_path(current, directory=True)


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc before 2.28, or another C library without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swaps the names `a` and `b` (both must exist). Returns False where the platform or the file
    system cannot (nothing is changed then); raises OSError for other failures."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


@contextlib.contextmanager
def atomic_directory(directory: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty staging directory beside `directory`; when the block finishes it becomes `directory`.

    If the block raises, the staging directory is removed and `directory` is untouched. With `overwrite`, an
    existing `directory` is replaced by one atomic exchange (see the module docstring). Staging directories
    left by killed earlier saves to the same `directory` are deleted first.
    """
    directory = os.path.abspath(directory)
    if os.path.lexists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(directory)
    staging = tempfile.mkdtemp(prefix=_staging_prefix(name, "partial") + _owner_tag() + "-", dir=parent)
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.lexists(directory):
        os.rename(staging, directory)
    elif not overwrite:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"{directory} appeared while it was being written; pass overwrite=True to replace it")
    elif exchange_paths(staging, directory):
        _fsync_path(parent, directory=True)  # the exchange is durable before the old copy goes
        _remove(staging)  # now the old directory
        return
    else:
        previous = tempfile.mkdtemp(prefix=_staging_prefix(name, "old") + _owner_tag() + "-", dir=parent)
        os.rename(directory, os.path.join(previous, name))
        os.rename(staging, directory)
        _fsync_path(parent, directory=True)
        _remove(previous)
        return
    _fsync_path(parent, directory=True)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Any], None], *, mode: str = "w") -> None:
    """Writes a file atomically: `write(stream)` into a temporary file in the same directory, fsync, then
    os.replace, so readers see the old file or the whole new one, never a half-written one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise

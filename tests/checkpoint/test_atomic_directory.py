"""Crash safety of `atomic_directory` (used by save_hf and save_params): a process killed at any point of a
save leaves the destination complete (old or new contents), and the next save deletes what the killed one
left behind. The killed saves run in a child process that loads only atomic.py (standard library), so each
costs a few tens of milliseconds."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nemotron_jax.checkpoint import atomic

ATOMIC_PY = atomic.__file__

# The child writes `old` with a plain save, then replaces it with `new` and is SIGKILLed at the named point.
CHILD = textwrap.dedent("""
    import importlib.util, os, shutil, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    destination, kill_at = sys.argv[2], sys.argv[3]

    def write(staging, tag):
        for i in range(3):
            with open(os.path.join(staging, f"shard{i}"), "w") as f:
                f.write(tag * 1000)

    if not os.path.exists(destination):
        with atomic.atomic_directory(destination) as staging:
            write(staging, "old")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def after(function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            die()
            return result
        return wrapped

    if kill_at == "after_first_rename":
        os.rename = after(os.rename)
        if hasattr(atomic, "exchange_paths"):
            atomic.exchange_paths = after(atomic.exchange_paths)
    elif kill_at == "before_removing_old":
        shutil.rmtree = die
        atomic._remove = die
    with atomic.atomic_directory(destination, overwrite=True) as staging:
        write(staging, "new")
        if kill_at == "while_writing":
            die()
""")


def _killed_save(destination, kill_at):
    result = subprocess.run([sys.executable, "-c", CHILD, ATOMIC_PY, str(destination), kill_at],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)


def _contents(directory):
    files = sorted(os.listdir(directory))
    texts = {open(os.path.join(directory, name)).read() for name in files}
    assert files == ["shard0", "shard1", "shard2"] and len(texts) == 1, (files, texts)
    return texts.pop()[:3]


def _leftovers(parent):
    return sorted(name for name in os.listdir(parent) if name != "out")


@pytest.mark.parametrize("kill_at,expected", [
    ("while_writing", "old"),
    # The old code renamed the destination away first; killed there, no checkpoint was left at all.
    ("after_first_rename", None),
    ("before_removing_old", "new"),
])
def test_a_killed_save_leaves_a_complete_destination_and_the_next_save_cleans_up(tmp_path, kill_at, expected):
    destination = tmp_path / "out"
    _killed_save(destination, kill_at)
    assert os.path.isdir(destination), f"killed at {kill_at}: the destination is missing"
    got = _contents(destination)
    assert got == expected or (expected is None and got in ("old", "new"))
    if kill_at != "after_first_rename":
        assert _leftovers(tmp_path), "the killed save should have left its staging directory"

    with atomic.atomic_directory(str(destination), overwrite=True) as staging:
        for i in range(3):
            (open(os.path.join(staging, f"shard{i}"), "w")).write("nxt" * 1000)
    assert _contents(destination) == "nxt"
    assert _leftovers(tmp_path) == []


def test_staging_of_a_live_save_is_left_alone(tmp_path):
    destination = tmp_path / "out"
    live = tmp_path / f".out.partial-{os.getpid()}@{atomic._host_tag()}-abc123"  # this (running) process
    other_host = tmp_path / ".out.partial-1@another-host-abc123"
    live.mkdir()
    other_host.mkdir()
    with atomic.atomic_directory(str(destination)) as staging:
        open(os.path.join(staging, "f"), "w").write("x")
    assert live.is_dir() and other_host.is_dir()


def test_fallback_recovers_the_old_directory_killed_between_two_renames(tmp_path, monkeypatch):
    """Where names cannot be exchanged, a kill between the two renames leaves the old directory under
    `.out.old-*`; the next save puts it back before anything else."""
    destination = tmp_path / "out"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    kept = tmp_path / f".out.old-{dead_pid}@{atomic._host_tag()}-xyz" / "out"
    kept.mkdir(parents=True)
    (kept / "f").write_text("old")
    atomic.remove_stale_staging(str(destination))
    assert (destination / "f").read_text() == "old" and _leftovers(tmp_path) == []

    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    with atomic.atomic_directory(str(destination), overwrite=True) as staging:
        open(os.path.join(staging, "f"), "w").write("new")
    assert (destination / "f").read_text() == "new" and _leftovers(tmp_path) == []


def test_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed_after = [], []
    real_fsync, real_exchange = os.fsync, atomic.exchange_paths

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: renamed_after.append(list(synced)) or
                        real_exchange(a, b))
    destination = tmp_path / "out"
    destination.mkdir()
    with atomic.atomic_directory(str(destination), overwrite=True) as staging:
        os.makedirs(os.path.join(staging, "sub"))
        for name in ("a", "sub/b"):
            open(os.path.join(staging, name), "w").write(name)
    before = renamed_after[0]
    assert {os.path.join(staging, "a"), os.path.join(staging, "sub", "b"), os.path.join(staging, "sub"),
            staging} <= set(before)
    assert str(tmp_path) in synced[len(before):]  # the parent, after the exchange
    assert sorted(os.listdir(destination)) == ["a", "sub"]

"""The reward pool as a process tree: it dies with its owner, and a script without a `__main__` guard is told
what to add. Each test runs a small script in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BUSY_OWNER = textwrap.dedent(
    """
    import sys
    from nemotron_jax.rewards import RewardPool

    if __name__ == "__main__":
        with RewardPool(num_workers=1) as pool:
            pool.wait_ready()
            print("ready", flush=True)
            response = "```python\\nwhile True:\\n    pass\\n```"
            spec = {"tests": [{"input": "", "output": "x"}], "timeout_s": 120}
            pool.score([response], [spec], ["code"], timeout_s=300)
    """
)


def _process_tree(pid: int) -> dict[int, tuple[int, bytes]]:
    """Descendants of `pid`: {pid: (uid, start time)} (the start time tells a recycled pid apart)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parents.setdefault(int(f.read().rsplit(b")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {}, [pid]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            identity = _identity(child)
            if identity is not None and child not in tree:
                tree[child] = identity
                frontier.append(child)
    return tree


def _identity(pid: int) -> tuple[int, bytes] | None:
    """(uid, start time) of a live (non-zombie) process, None if it is gone or a zombie."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else (uid, fields[19])


@pytest.mark.slow
def test_busy_workers_and_their_sandboxes_die_with_a_killed_owner(tmp_path):
    """SIGKILL of the pool's owner used to leave a busy worker (and the program in its sandbox) running with
    no time limit: the worker's parent is multiprocessing's fork server, which outlives the owner while any
    worker holds its liveness pipe."""
    script = tmp_path / "owner.py"
    script.write_text(_BUSY_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 60
        tree = {}
        while time.monotonic() < deadline:  # until the program runs under a sandbox uid
            tree = _process_tree(owner.pid)
            if any(uid != os.geteuid() for uid, _ in tree.values()) or (
                os.geteuid() != 0 and len(tree) >= 5  # no uid change: fork server, worker, sandbox server, launcher...
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the sandboxed program never started: {tree}")
        time.sleep(0.3)
        tree = _process_tree(owner.pid)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 15
    survivors = tree
    while time.monotonic() < deadline:
        survivors = {pid: ident for pid, ident in tree.items() if _identity(pid) == ident}
        if not survivors:
            break
        time.sleep(0.1)
    assert not survivors, f"{len(survivors)} of the owner's {len(tree)} descendants outlived it"


_UNGUARDED = textwrap.dedent(
    """
    from nemotron_jax.rewards import score_batch

    batch = score_batch(["The answer is $\\\\boxed{42}$"], [{"expected_answer": "42"}], ["math"], num_workers=1)
    print("rewards", batch.rewards.tolist())
    """
)


def test_score_batch_from_a_script_without_main_guard_says_what_to_add(tmp_path):
    """Without the guard, every forkserver worker re-ran the script and the owner raised only 'a reward worker
    exited during start-up'; now the call fails at once and names the guard to add."""
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    started = time.monotonic()
    completed = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0, completed.stdout
    assert "\nRuntimeError: score_batch / RewardPool was called at the top level of" in completed.stderr
    assert 'if __name__ == "__main__":' in completed.stderr and "(line 4)" in completed.stderr
    assert time.monotonic() - started < 60  # no worker was started


def test_score_batch_from_a_guarded_script_works(tmp_path):
    script = tmp_path / "guarded.py"
    body = textwrap.indent(_UNGUARDED.replace("from nemotron_jax.rewards import score_batch\n", ""), "    ")
    script.write_text('from nemotron_jax.rewards import score_batch\n\nif __name__ == "__main__":\n' + body)
    completed = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout == "rewards [1.0]\n"

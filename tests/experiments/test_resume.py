"""Resume: SIGKILL in the middle of an RL stage, re-run the same command, and the run ends exactly as an
uninterrupted one (final params bit for bit, the same eval table). A shortened demo pipeline, set by bindings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHORT_DEMO = [
    "nj.prepare_demo_workspace.sft_examples_per_domain = 40",
    "nj.prepare_demo_workspace.rl_prompts_per_domain = 40",
    "nj.prepare_demo_workspace.eval_prompts_per_domain = 4",
    "nj.model_config.hidden_size = 64",
    "nj.PipelineConfig.stages = [@sft/nj.StageConfig(), @if_rl/nj.StageConfig()]",
    "nj.PipelineConfig.checkpoint_every = 2",
    "nj.EvalConfig.batch_prompts = 4",
    "nj.EvalConfig.samples_per_prompt = 2",
    "nj.EvalConfig.max_new_tokens = 8",
    "nj.EvalConfig.spread_seeds = 1",
    "sft/nj.StageConfig.steps = 3",
    "sft/nj.SFTConfig.batch_size = 4",
    "sft/nj.SFTConfig.row_length = 128",
    "if_rl/nj.StageConfig.steps = 8",
    "nj.GRPOConfig.prompts_per_step = 2",
    "nj.GRPOConfig.samples_per_prompt = 4",
    "nj.GRPOConfig.max_new_tokens = 8",
    # Keep every group (with random rewards of a barely trained model most groups would be all-zero).
    "nj.GRPOConfig.dynamic_filtering = False",
]


def _command(run_dir: str, cache_dir: str) -> list[str]:
    args = [sys.executable, "-m", "experiments.train", f"--run_dir={run_dir}", f"--compilation_cache_dir={cache_dir}"]
    return args + [f"--gin_bindings={b}" for b in SHORT_DEMO]


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    return env


def _run(run_dir: str, cache_dir: str) -> None:
    result = subprocess.run(_command(run_dir, cache_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _rl_steps_logged(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return max((row["step"] for row in rows if row.get("stage") == "if_rl"), default=0)


def _final_params(run_dir: str, stage: str) -> dict[str, np.ndarray]:
    from nemotron_jax.checkpoint import restore_params
    import jax

    _, params = restore_params(os.path.join(run_dir, "stage_finals", stage))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _interrupt(run_dir: str, cache_dir: str, sig: int, at_step: int) -> subprocess.CompletedProcess:
    """Starts the run and sends `sig` once the RL stage has logged `at_step` steps."""
    process = subprocess.Popen(_command(run_dir, cache_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while _rl_steps_logged(run_dir) < at_step:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "no RL progress"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _checkpoint_steps(run_dir: str) -> list[int]:
    directory = os.path.join(run_dir, "checkpoints", "if_rl")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_rl_then_rerun_matches_an_uninterrupted_run(tmp_path):
    cache = str(tmp_path / "xla_cache")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    _run(straight, cache)

    # SIGTERM: the step in flight finishes, a checkpoint of it is written, the process exits 0.
    stopped = _interrupt(interrupted, cache, signal.SIGTERM, at_step=1)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "preempted" in stopped.stderr
    saved = _checkpoint_steps(interrupted)
    assert saved and saved[-1] == _rl_steps_logged(interrupted) < 8, (saved, _rl_steps_logged(interrupted))

    # SIGKILL past the next periodic checkpoint: whatever was in flight is lost, the rerun resumes from it.
    killed = _interrupt(interrupted, cache, signal.SIGKILL, at_step=saved[-1] + 3)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.isdir(os.path.join(interrupted, "stage_finals", "if_rl"))
    _run(interrupted, cache)

    a, b = _final_params(straight, "if_rl"), _final_params(interrupted, "if_rl")
    assert a.keys() == b.keys()
    different = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not different, f"params differ after resume: {different[:5]}"
    with open(os.path.join(straight, "eval_table.json")) as f1, open(os.path.join(interrupted, "eval_table.json")) as f2:
        assert json.load(f1) == json.load(f2)
    # The resumed stage's metrics log holds each step once, as the uninterrupted run's does.
    steps = [json.loads(line)["step"] for line in open(os.path.join(interrupted, "metrics.jsonl"))
             if json.loads(line)["stage"] == "if_rl"]
    assert steps == list(range(1, 9))

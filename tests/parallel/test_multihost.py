"""Two processes on localhost, four CPU devices each (gloo collectives), run one sharded SFT step of a tiny MoE
model (`experiments/sharded_sft_step.py`, data sharded by process); the loss and the updated params equal those
of one process with eight devices reading both data shards."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from nemotron_jax.data import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "apple orange umbrella island echo banana cherry grape kiwi mango lemon peach plum melon olive".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(tmp_path, out, *extra):
    return [sys.executable, "-m", "experiments.sharded_sft_step", "--mesh=data=2,expert=4",
            f"--data_file={tmp_path / 'sft.jsonl'}", f"--tokenizer={tmp_path / 'tok.model'}",
            "--config_override=layer_pattern=M*E", "--adam_eps=1e-4", f"--out={out}", *extra]


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def test_two_processes_equal_one(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 6)) + f" {i} + {i * 3} = {i * 4}" for i in range(200)]
    train_sentencepiece(texts, vocab_size=400).save(tmp_path / "tok.model")
    with open(tmp_path / "sft.jsonl", "w") as f:
        for _ in range(64):
            words = list(rng.choice(WORDS, 3))
            f.write(json.dumps({"messages": [{"role": "user", "content": "say " + words[0]},
                                             {"role": "assistant", "content": " ".join(words)}]}) + "\n")

    port = _free_port()
    multi = [subprocess.Popen(_command(tmp_path, tmp_path / "multi.npz", f"--coordinator_address=localhost:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                              cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run(_command(tmp_path, tmp_path / "single.npz", "--data_shards=2"), cwd=REPO, env=_env(8),
                            capture_output=True, text=True, timeout=600)
    logs = [p.communicate(timeout=600)[0] for p in multi]
    assert single.returncode == 0, single.stderr[-3000:]
    for p, log in zip(multi, logs):
        assert p.returncode == 0, log[-3000:]
    assert "process 1/2: step 1 loss" in logs[1]

    one, two = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert sorted(one.files) == sorted(two.files) and len(one.files) > 20
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6)
    for name in one.files:
        scale = max(float(np.max(np.abs(one[name]))), 1e-30)
        assert float(np.max(np.abs(two[name] - one[name]))) / scale <= 1e-5, name

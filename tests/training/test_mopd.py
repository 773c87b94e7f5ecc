"""MOPD toward a "vowel teacher": the student's sampled-token reverse KL to the teacher falls and its vowel
reward rises within a few dozen MOPD steps (MOPDTrainer on the tiny model)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nemotron_jax.training import MOPDConfig, OptimizerConfig, Scorer
from nemotron_jax.training.trainers import MOPDTrainer
from tests.training.conftest import VOWEL_DOMAIN, WORDS, fresh_copy, run_sft, stage_environment

MOPD_STEPS, WINDOW = 24, 4
VOWEL_WORDS = [w for w in WORDS if w[0] in "aeiou"]


def vowel_sft_records(count: int, seed: int = 0) -> list[dict]:
    """Conversations in `sft_records`' format whose answers start with a vowel."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(VOWEL_WORDS)] + list(rng.choice(WORDS, 2))
        out.append({"messages": [{"role": "user", "content": "say " + rng.choice(WORDS)},
                                 {"role": "assistant", "content": " ".join(words)}]})
    return out


@pytest.fixture(scope="module")
def vowel_teacher(tiny_cfg, format_params, task_tokenizer, tmp_path_factory):
    """The format-SFT-ed student, SFT-ed further on vowel-first answers (same compiled SFT step)."""
    params, _ = run_sft(tiny_cfg, task_tokenizer, format_params, vowel_sft_records(64),
                        str(tmp_path_factory.mktemp("vowel_teacher")), steps=20)
    return params


def test_mopd_moves_student_toward_teacher(tiny_cfg, format_params, vowel_teacher, task_tokenizer, vowel_files,
                                           tmp_path):
    config = MOPDConfig(prompts_per_step=8, samples_per_prompt=4, max_new_tokens=12, max_prompt_length=64,
                        score_rollouts=True)
    trainer = MOPDTrainer("mopd", MOPD_STEPS, OptimizerConfig(learning_rate=3e-3), [vowel_files["rl"]],
                          stage_environment(tiny_cfg, task_tokenizer, str(tmp_path)), seed=0, enable_thinking=False,
                          config=config, scorer=Scorer(0), teachers={VOWEL_DOMAIN: vowel_teacher})
    trainer.run(fresh_copy(format_params))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r["stage"] == "mopd"]
    assert [r["step"] for r in steps] == list(range(1, MOPD_STEPS + 1))
    kl = [r["reverse_kl_estimate"] for r in steps]
    reward = [r["reward"] for r in steps]
    print(f"reverse KL per step: {np.round(kl, 3).tolist()}\nvowel reward per step: {np.round(reward, 2).tolist()}")
    kl_first, kl_last = np.mean(kl[:WINDOW]), np.mean(kl[-WINDOW:])
    assert kl_first > 0.2  # the teacher differs measurably
    assert kl_last < 0.5 * kl_first, kl
    assert np.mean(reward[-WINDOW:]) >= np.mean(reward[:WINDOW]) + 0.25, reward

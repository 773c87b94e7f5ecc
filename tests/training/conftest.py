"""Fixtures for the training tests: a small SentencePiece tokenizer, the tiny model sized to it, and a
trivially learnable in-process reward ("vowel_task": 1 if the response starts with a vowel)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.data import render_chat, train_sentencepiece
from nemotron_jax.rewards import register_reward

WORDS = ("apple orange umbrella island echo banana cherry grape kiwi mango lemon peach plum melon olive "
         "onion tomato garlic pepper carrot").split()
VOWEL_DOMAIN = "vowel_task"


def starts_with_vowel(response: str, spec) -> float:
    del spec
    text = response.strip().lower()
    return 1.0 if text[:1] in tuple("aeiou") else 0.0


register_reward(VOWEL_DOMAIN, starts_with_vowel, timeout_s=5.0, overwrite=True)


@pytest.fixture(scope="session")
def task_tokenizer():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 6)) + f" {i} + {i * 3} = {i * 4}" for i in range(300)]
    return train_sentencepiece(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_cfg(task_tokenizer):
    return nj.ModelConfig.preset("tiny", vocab_size=task_tokenizer.vocab_size, pad_token_id=task_tokenizer.pad_id,
                                 eos_token_id=task_tokenizer.eos_id, bos_token_id=task_tokenizer.bos_id)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return nj.init_params(tiny_cfg, jax.random.PRNGKey(0))


def vowel_records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"responses_create_params": {"input": [{"role": "user", "content": "say " + " ".join(rng.choice(WORDS, 2))}]},
             "agent_ref": VOWEL_DOMAIN + "_simple_agent", "id": i} for i in range(count)]


def sft_records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, 3))
        out.append({"messages": [{"role": "user", "content": "say " + words[0]},
                                 {"role": "assistant", "content": " ".join(words)}]})
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def rl_prompt_tokens(tokenizer, text: str) -> np.ndarray:
    return np.asarray(render_chat([{"role": "user", "content": text}], tokenizer, enable_thinking=False,
                                  add_generation_prompt=True).token_ids, np.int32)


@pytest.fixture
def vowel_files(tmp_path):
    return {"rl": write_jsonl(os.path.join(tmp_path, "rl.jsonl"), vowel_records(64)),
            "eval": write_jsonl(os.path.join(tmp_path, "eval.jsonl"), vowel_records(16, seed=1)),
            "sft": write_jsonl(os.path.join(tmp_path, "sft.jsonl"), sft_records(64))}


def fresh_copy(params):
    """A copy of `params`: trainers donate their initial params' buffers to the first update."""
    return jax.tree.map(jax.numpy.copy, params)


def stage_environment(cfg, tokenizer, run_dir: str):
    """A `StageEnvironment` for driving trainers directly (no periodic checkpoints, no progress bar)."""
    from nemotron_jax.data import chat_stop_token_ids
    from nemotron_jax.training.trainers import StageEnvironment

    return StageEnvironment(cfg=cfg, tokenizer=tokenizer, stop_token_ids=tuple(chat_stop_token_ids(tokenizer)),
                            run_dir=run_dir, checkpoint_every=1000, keep_checkpoints=1, async_checkpoints=False,
                            progress=False)


# SFT settings shared by every warm start, so that they all reuse one compiled update step.
SFT_SETTINGS = dict(row_length=128, batch_size=4)


def run_sft(cfg, tokenizer, params, records: list[dict], run_dir: str, *, steps: int, learning_rate: float = 3e-3):
    """`steps` SFT steps of `SFTTrainer` on `records` from (a copy of) `params` -> (params, summary)."""
    from nemotron_jax.training import OptimizerConfig, SFTConfig
    from nemotron_jax.training.trainers import SFTTrainer

    os.makedirs(run_dir, exist_ok=True)
    data = write_jsonl(os.path.join(run_dir, "sft.jsonl"), records)
    trainer = SFTTrainer("sft", steps, OptimizerConfig(learning_rate=learning_rate), [data],
                         stage_environment(cfg, tokenizer, run_dir), seed=0, enable_thinking=False,
                         sft=SFTConfig(**SFT_SETTINGS))
    return trainer.run(fresh_copy(params))


@pytest.fixture(scope="session")
def format_params(tiny_cfg, tiny_params, task_tokenizer, tmp_path_factory):
    """Tiny params SFT-ed on `sft_records` (30 steps): they answer a few words and stop, so that RL rollouts
    finish within a few tokens (a random model rarely samples the stop token, and a cut response scores 0).
    About a third of the answers start with a vowel."""
    params, summary = run_sft(tiny_cfg, task_tokenizer, tiny_params, sft_records(64),
                              str(tmp_path_factory.mktemp("format_sft")), steps=30)
    assert summary["nll/last"] < 0.5 * summary["nll/first"], summary
    return params

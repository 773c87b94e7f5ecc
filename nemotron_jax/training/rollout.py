"""Rollouts for RL: `n` samples per prompt from the current params, laid out as fixed-shape training arrays.

Sampling runs the decode loop of `nj.generate` (the same `NemotronH` code as training) on fixed shapes. The training arrays are
right-padded to a fixed `[S, max_prompt_length + max_new_tokens]` so that one compiled step serves every batch:

    tokens       prompt ++ response ++ pad
    targets      tokens shifted left by one (pad after the last real token)
    segment_ids  1 on real tokens, 0 on padding
    mask         1 at positions t whose target tokens[t + 1] is a response token
    rollout_logprobs   the sampler's log-prob of targets[t] at those positions (0 elsewhere)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.generation.generate import generate_arrays
from nemotron_jax.model.config import ModelConfig


@dataclasses.dataclass
class Rollouts:
    """`S = len(prompts) * n` samples, prompt-major (sample j of prompt i is row i * n + j).

    response_tokens: generated ids per sample (ending with the stop token when one was produced).
    rollout_logprobs: the sampler's log-prob of each generated token (temperature-1 sampling: the model's own
      distribution).
    finished: whether a stop token ended the sample (False: cut by max_new_tokens, "overlong").
    """

    prompt_tokens: list[np.ndarray]
    response_tokens: list[list[int]]
    rollout_logprobs: list[list[float]]
    finished: np.ndarray
    group_size: int

    def __len__(self) -> int:
        return len(self.response_tokens)


def bucket_length(length: int, multiple: int = 64) -> int:
    """`length` rounded up to a multiple of `multiple`: prompt widths come in few sizes, so few compilations."""
    return -(-length // multiple) * multiple


def sample_rollouts(cfg: ModelConfig, params: Any, prompts: Sequence[np.ndarray], *, n: int, max_new_tokens: int,
                    temperature: float, top_p: float, stop_token_ids: Sequence[int], seed: int,
                    prompt_length: int | None = None, num_rows: int | None = None) -> Rollouts:
    """Samples `n` responses for each prompt (token id arrays) with `nj.generate_arrays` (the `n` samples of a
    prompt share one prefill).

    The decode loop is compiled per (rows, prompt width, max_new_tokens): prompts are left-padded to
    `prompt_length` (default: the longest prompt, rounded up to a multiple of 64) and the batch is padded to
    `num_rows` sample rows (a multiple of `n`; default len(prompts) * n) with copies of the first prompt whose
    samples are dropped, so that every step of a stage (and every evaluation) reuses one compiled loop.
    """
    if not prompts:
        raise ValueError("sample_rollouts: no prompts")
    prompts = [np.asarray(p, np.int32) for p in prompts]
    num_samples = len(prompts) * n
    num_rows = num_samples if num_rows is None else num_rows
    if num_rows < num_samples or num_rows % n:
        raise ValueError(f"sample_rollouts: num_rows={num_rows} must be a multiple of n={n} and at least "
                         f"{num_samples} (samples)")
    longest = max(len(p) for p in prompts)
    width = bucket_length(longest) if prompt_length is None else prompt_length
    if longest > width:
        raise ValueError(f"sample_rollouts: a prompt of {longest} tokens exceeds prompt_length={width}")
    padded = prompts + [prompts[0]] * (num_rows // n - len(prompts))
    tokens = np.full((len(padded), width), cfg.pad_token_id or 0, np.int32)
    for row, prompt in enumerate(padded):
        tokens[row, width - len(prompt):] = prompt
    out = jax.device_get(generate_arrays(
        cfg, params, tokens, prompt_lengths=np.asarray([len(p) for p in padded], np.int32), n=n,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
        stop_token_ids=list(stop_token_ids), seed=seed))
    lengths = out.lengths
    return Rollouts(
        prompt_tokens=[prompts[i // n] for i in range(num_samples)],
        response_tokens=[out.tokens[i, :lengths[i]].tolist() for i in range(num_samples)],
        rollout_logprobs=[out.sampling_logprobs[i, :lengths[i]].tolist() for i in range(num_samples)],
        finished=np.asarray(out.finished[:num_samples], bool),
        group_size=n,
    )


def training_arrays(prompt_tokens: Sequence[np.ndarray], response_tokens: Sequence[Sequence[int]],
                    rollout_logprobs: Sequence[Sequence[float]] | None, *, length: int,
                    pad_id: int, num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded `[num_rows, length]` arrays (see the module docstring); rows past the samples are empty
    (all padding, mask 0). Raises ValueError if a prompt + response does not fit in `length`."""
    num_samples = len(prompt_tokens)
    num_rows = num_samples if num_rows is None else num_rows
    if num_rows < num_samples:
        raise ValueError(f"num_rows={num_rows} < {num_samples} samples")
    tokens = np.full((num_rows, length), pad_id, np.int32)
    targets = np.full((num_rows, length), pad_id, np.int32)
    segment_ids = np.zeros((num_rows, length), np.int32)
    mask = np.zeros((num_rows, length), np.float32)
    logprobs = np.zeros((num_rows, length), np.float32)
    for row in range(num_samples):
        prompt, response = np.asarray(prompt_tokens[row]), np.asarray(response_tokens[row], np.int32)
        total = len(prompt) + len(response)
        if total > length:
            raise ValueError(f"sample {row}: prompt ({len(prompt)}) + response ({len(response)}) tokens exceed the "
                             f"training length {length}")
        sequence = np.concatenate([prompt, response])
        tokens[row, :total] = sequence
        targets[row, :total - 1] = sequence[1:]
        segment_ids[row, :total] = 1
        start = len(prompt) - 1  # position whose target is the first response token
        mask[row, start:total - 1] = 1.0
        if rollout_logprobs is not None:
            logprobs[row, start:total - 1] = np.asarray(rollout_logprobs[row], np.float32)
    return {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "mask": mask,
            "rollout_logprobs": logprobs}


def response_texts(tokenizer: Any, rollouts: Rollouts, stop_token_ids: Sequence[int]) -> list[str]:
    """Decoded responses without their final stop token."""
    stops = set(int(t) for t in stop_token_ids)
    texts = []
    for ids in rollouts.response_tokens:
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts

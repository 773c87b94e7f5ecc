"""Rollouts for RL: `n` samples per prompt from the current params, laid out as fixed-shape training arrays.

Sampling goes through `nj.generate` (the same `NemotronH` code as training). The training arrays are
right-padded to a fixed `[S, max_prompt_length + max_new_tokens]` so that one compiled step serves every batch:

    tokens       prompt ++ response ++ pad
    targets      tokens shifted left by one (pad after the last real token)
    segment_ids  1 on real tokens, 0 on padding
    mask         1 at positions t whose target tokens[t + 1] is a response token
    rollout_logprobs   the sampler's log-prob of targets[t] at those positions (0 elsewhere)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import numpy as np

from nemotron_jax.generation import generate
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


def _generate_supports_n() -> bool:
    return "n" in inspect.signature(generate).parameters


def sample_rollouts(cfg: ModelConfig, params: Any, prompts: Sequence[np.ndarray], *, n: int, max_new_tokens: int,
                    temperature: float, top_p: float, stop_token_ids: Sequence[int], seed: int) -> Rollouts:
    """Samples `n` responses for each prompt (token id arrays)."""
    prompt_lists = [list(map(int, p)) for p in prompts]
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   stop_token_ids=list(stop_token_ids))
    if n > 1 and _generate_supports_n():
        out = generate(cfg, params, prompt_lists, n=n, **options)  # one prefill per prompt
    else:
        out = generate(cfg, params, [p for p in prompt_lists for _ in range(n)], **options)
    return Rollouts(
        prompt_tokens=[np.asarray(p, np.int32) for p in prompts for _ in range(n)],
        response_tokens=[list(t) for t in out.tokens],
        rollout_logprobs=[list(lp) for lp in out.logprobs],
        finished=np.asarray(out.finished, bool),
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

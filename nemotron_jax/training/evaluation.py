"""Per-domain evaluation on held-out prompts: mean verifier reward (accuracy / pass@1), greedy or averaged
over sampled responses."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from nemotron_jax.model.config import ModelConfig
from nemotron_jax.training.rollout import bucket_length, response_texts, sample_rollouts
from nemotron_jax.training.scoring import Scorer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """samples_per_prompt: responses per prompt (pass@1 averaged over them); temperature 0: greedy, one sample.
    seed: the sampling seed (the same for every evaluation of a run, so scores after different stages are
    compared on the same draws); batch_prompts: prompts per generate call; spread_seeds: seeds used once to
    measure the seed-to-seed spread of the scores; enable_thinking: render eval prompts in thinking mode (as the
    Cascade RL stages train) or instruct mode (match the stages' `StageConfig.enable_thinking`)."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 1234
    batch_prompts: int = 64
    spread_seeds: int = 3
    enable_thinking: bool = True

    def validate(self) -> None:
        if self.samples_per_prompt < 1 or self.batch_prompts < 1 or self.max_new_tokens < 1:
            raise ValueError(f"EvalConfig: samples_per_prompt, batch_prompts and max_new_tokens must be >= 1, got "
                             f"{self.samples_per_prompt}, {self.batch_prompts}, {self.max_new_tokens}")
        if self.temperature == 0 and self.samples_per_prompt != 1:
            raise ValueError("EvalConfig.samples_per_prompt: greedy evaluation (temperature 0) takes one sample")


def evaluate(cfg: ModelConfig, params: Any, tokenizer: Any, eval_sets: Mapping[str, Sequence[Any]],
             config: EvalConfig, scorer: Scorer, stop_token_ids: Sequence[int], *,
             seed: int | None = None) -> dict[str, float]:
    """Mean reward per domain over `eval_sets[domain]` (lists of `data.RLPrompt`)."""
    seed = config.seed if seed is None else seed
    # Fixed shapes across domains, chunks and stages: one compiled decode loop for every evaluation.
    width = bucket_length(max(len(p.token_ids) for prompts in eval_sets.values() for p in prompts))
    num_rows = config.batch_prompts * config.samples_per_prompt
    scores = {}
    for domain_index, (domain, prompts) in enumerate(sorted(eval_sets.items())):
        rewards = []
        for start in range(0, len(prompts), config.batch_prompts):
            chunk = prompts[start:start + config.batch_prompts]
            rollouts = sample_rollouts(cfg, params, [p.token_ids for p in chunk], n=config.samples_per_prompt,
                                       max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p, stop_token_ids=stop_token_ids,
                                       seed=seed + 7919 * domain_index + start, prompt_length=width,
                                       num_rows=num_rows)
            texts = response_texts(tokenizer, rollouts, stop_token_ids)
            n = config.samples_per_prompt
            specs = [p.reward_spec for p in chunk for _ in range(n)]
            domains = [p.domain for p in chunk for _ in range(n)]
            values, _ = scorer.score(texts, specs, domains, ~rollouts.finished)
            rewards.append(values)
        scores[domain] = float(np.concatenate(rewards).mean())
    return scores

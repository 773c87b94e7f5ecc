"""Reward scoring for trainers: the rewards layer's pool (or in-process scoring), with duplicate responses
scored once (a converging policy repeats itself; a code response costs a sandboxed run per test)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from nemotron_jax.rewards import RewardPool, get_reward, score_in_process


def check_domains(domains: Sequence[str], where: str) -> None:
    """Raises ValueError naming `where` if a domain has no registered verifier."""
    for domain in sorted(set(domains)):
        try:
            get_reward(domain)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


class Scorer:
    """`score(texts, specs, domains, truncated) -> (rewards float32 [S], status counts)`.

    num_workers 0 scores in this process (verifiers without time limits, except the sandbox's own per-test
    limits for code); otherwise a persistent `RewardPool` of that many worker processes.
    """

    def __init__(self, num_workers: int = 0):
        if num_workers < 0:
            raise ValueError(f"reward num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._pool = RewardPool(num_workers) if num_workers else None

    def score(self, texts: Sequence[str], specs: Sequence[Mapping[str, Any]], domains: Sequence[str],
              truncated: Sequence[bool]) -> tuple[np.ndarray, dict[str, int]]:
        keys = [(domain, text, json.dumps(spec, sort_keys=True, default=str), bool(cut))
                for text, spec, domain, cut in zip(texts, specs, domains, truncated, strict=True)]
        unique: dict[tuple, int] = {}
        for key in keys:
            unique.setdefault(key, len(unique))
        firsts = {index: position for position, key in reversed(list(enumerate(keys)))
                  for index in [unique[key]]}
        order = [firsts[i] for i in range(len(unique))]
        args = ([texts[i] for i in order], [specs[i] for i in order], [domains[i] for i in order])
        flags = [bool(truncated[i]) for i in order]
        if self._pool is None:
            scored = score_in_process(*args, truncated=flags)
        else:
            scored = self._pool.score(*args, truncated=flags)
        rewards = np.asarray([scored.rewards[unique[key]] for key in keys], np.float32)
        counts: dict[str, int] = {}
        for status in scored.stats.statuses:
            counts[status] = counts.get(status, 0) + 1
        counts["unique"] = len(unique)
        return rewards, counts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

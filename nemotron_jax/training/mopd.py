"""MOPD: multi-domain on-policy distillation (Nemotron-Cascade 2 §4).

The student samples; each sample's tokens are scored by the teacher of its domain (a checkpoint of this
pipeline, loaded once); the loss is `losses.mopd_loss`, a policy gradient whose per-token advantage is
log pi_teacher - log pi_student, with the truncated importance weight between the sampler and the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from nemotron_jax.losses import mopd_loss
from nemotron_jax.losses.aggregation import masked_token_mean
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.training.forward import expert_counts, policy_forward
from nemotron_jax.training.update import LossAux


@dataclasses.dataclass(frozen=True)
class MOPDConfig:
    """Settings of a MOPD stage.

    Attributes:
      prompts_per_step, samples_per_prompt: Cascade-2 used 128 x 4 (or 512 x 1).
      max_new_tokens, max_prompt_length, temperature, top_p: sampling, as in `GRPOConfig`.
      is_low, is_high: the importance-weight band (Cascade-2: 0.5, 2.0).
      aggregation: `aggregate_loss` reduction; the paper's 1/|V(y)| per sample is "seq_mean_token_mean".
      num_microbatches: gradient accumulation.
      score_rollouts: also score the samples with the domain verifiers (a metric only; the loss uses no reward).
      reward_workers: as in `GRPOConfig` (used when `score_rollouts`).
    """

    prompts_per_step: int = 128
    samples_per_prompt: int = 4
    max_new_tokens: int = 1024
    max_prompt_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    is_low: float = 0.5
    is_high: float = 2.0
    aggregation: str = "seq_mean_token_mean"
    num_microbatches: int = 1
    score_rollouts: bool = False
    reward_workers: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def validate(self) -> None:
        for field in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_prompt_length",
                      "num_microbatches"):
            if getattr(self, field) < 1:
                raise ValueError(f"MOPDConfig.{field}: must be >= 1, got {getattr(self, field)}")
        if self.rows_per_step % self.num_microbatches:
            raise ValueError(f"MOPDConfig.num_microbatches: must divide the {self.rows_per_step} rows per step")
        if not 0 <= self.is_low <= self.is_high:
            raise ValueError(f"MOPDConfig.is_low/is_high: need 0 <= is_low <= is_high, got {self.is_low}, "
                             f"{self.is_high}")


def make_mopd_loss(cfg: ModelConfig, config: MOPDConfig) -> Callable:
    """loss_fn(params, batch, normalizers): batch as GRPO's plus teacher_logprobs float32 [B, T]."""

    def loss_fn(params: Any, batch: dict[str, jax.Array], normalizers: dict[str, jax.Array]):
        out = policy_forward(cfg, params, batch["tokens"], batch["targets"], batch["segment_ids"])
        mask = batch["mask"]
        loss, metrics = mopd_loss(out.logprobs, batch["teacher_logprobs"], batch["rollout_logprobs"], mask,
                                  is_low=config.is_low, is_high=config.is_high, aggregation=config.aggregation,
                                  num_tokens=normalizers["num_tokens"], num_sequences=normalizers["num_sequences"],
                                  max_tokens=config.max_new_tokens)
        metrics = dict(metrics)
        metrics["entropy"] = masked_token_mean(jax.lax.stop_gradient(out.entropy), mask, normalizers["num_tokens"])
        counts = expert_counts(out.expert_ids, max(cfg.n_routed_experts, 1), batch["segment_ids"] > 0)
        return loss, LossAux(metrics, counts)

    return loss_fn


def teacher_logprobs(logprob_fn: Callable[[Any, dict[str, np.ndarray]], np.ndarray], teachers: Mapping[str, Any],
                     domains: list[str], batch: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [B, T]: for each row, the log-probs of its tokens under the teacher of its domain.

    `logprob_fn(params, batch) -> [B, T]` is the (jitted) forward over the whole batch (fixed shapes: one
    compilation); it runs once per distinct teacher (domains sharing a checkpoint share the pass) and each row
    takes the values of its domain's teacher. Rows past `len(domains)` (padding) get 0.
    """
    missing = sorted(set(domains) - set(teachers))
    if missing:
        raise ValueError(f"MOPD: no teacher for domains {missing}; teachers cover {sorted(teachers)}")
    out = np.zeros(batch["mask"].shape, np.float32)
    by_teacher: dict[int, tuple[Any, set[str]]] = {}
    for domain, params in teachers.items():
        by_teacher.setdefault(id(params), (params, set()))[1].add(domain)
    for params, teacher_domains in by_teacher.values():
        rows = np.asarray([d in teacher_domains for d in domains] + [False] * (len(out) - len(domains)))
        if not rows.any():
            continue
        values = np.asarray(logprob_fn(params, batch))
        out[rows] = values[rows]
    return out

"""GRPO: sample `n` responses per prompt, score them, group advantages, dynamic filtering, then the update.

Cascade RL's default is strictly on-policy GRPO (one update per rollout batch, ratio = 1, no KL, token-level
loss); PPO-style minibatches/epochs, a KL penalty to the stage's initial policy, importance-sampling
correction and router replay are options of `GRPOConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.losses import aggregate_loss, group_advantages, kl_penalty, policy_gradient_loss
from nemotron_jax.losses.aggregation import masked_token_mean
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.training.forward import expert_counts, load_balancing_loss, moe_layer_names, policy_forward
from nemotron_jax.training.update import LossAux

ROUTER_REPLAY = ("none", "old_policy")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Settings of a GRPO stage (defaults: Cascade RL's strict on-policy GRPO).

    Attributes:
      prompts_per_step: groups per update batch (Cascade-2: 128).
      samples_per_prompt: responses per prompt, the group size (Cascade-2: 16).
      max_new_tokens: response length limit; a response cut by it is "overlong" and gets reward 0.
      max_prompt_length: prompts longer than this are an error (the data config's `max_prompt_length`).
      temperature, top_p: sampling.
      dynamic_filtering: drop groups whose rewards are all equal (they carry no gradient) and refill from the
        prompt stream, up to `max_refill_batches` extra prompt batches per step.
      ratio, clip_low, clip_high, dual_clip, is_correction, is_low, is_high, aggregation: `policy_gradient_loss`.
      normalize_std, leave_one_out: `group_advantages`.
      kl_coef, kl_kind: KL penalty to the stage's initial params (0: none; RLHF: 0.03).
      minibatches_per_step, epochs_per_step: PPO-style updates per rollout batch (1, 1: strict on-policy).
      router_replay: "old_policy" replays, in every minibatch update, the routing the policy chose when the
        old log-probs were computed; "none" routes afresh.
      num_microbatches: gradient accumulation inside each update.
      load_balance_coef: weight of the MoE load-balancing loss (0: off).
      expert_bias_update_rate: aux-loss-free expert-bias update rate (0: bias frozen).
      reward_workers: reward worker processes (0: score in this process).
    """

    prompts_per_step: int = 128
    samples_per_prompt: int = 16
    max_new_tokens: int = 1024
    max_prompt_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    dynamic_filtering: bool = True
    max_refill_batches: int = 4
    ratio: str = "on_policy"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    is_correction: str | None = None
    is_low: float = 0.5
    is_high: float = 2.0
    aggregation: str = "token_mean"
    normalize_std: bool = True
    leave_one_out: bool = False
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    minibatches_per_step: int = 1
    epochs_per_step: int = 1
    router_replay: str = "none"
    num_microbatches: int = 1
    load_balance_coef: float = 0.0
    expert_bias_update_rate: float = 0.0
    reward_workers: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def validate(self) -> None:
        def fail(field: str, message: str) -> None:
            raise ValueError(f"GRPOConfig.{field}: {message}")

        for field in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_prompt_length",
                      "minibatches_per_step", "epochs_per_step", "num_microbatches"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        if self.samples_per_prompt < 2:
            fail("samples_per_prompt", "group advantages need at least 2 samples per prompt")
        if self.max_refill_batches < 0:
            fail("max_refill_batches", f"must be >= 0, got {self.max_refill_batches}")
        if self.router_replay not in ROUTER_REPLAY:
            fail("router_replay", f"must be one of {ROUTER_REPLAY}, got {self.router_replay!r}")
        if self.rows_per_step % self.minibatches_per_step:
            fail("minibatches_per_step", f"{self.rows_per_step} rows per step do not split into "
                 f"{self.minibatches_per_step} minibatches")
        if (self.rows_per_step // self.minibatches_per_step) % self.num_microbatches:
            fail("num_microbatches", "must divide the rows of a minibatch")
        if self.ratio == "on_policy" and (self.minibatches_per_step > 1 or self.epochs_per_step > 1):
            fail("ratio", "'on_policy' (ratio = 1) is only exact with one update per rollout batch; use 'ppo' "
                 "with several minibatches or epochs")
        if self.kl_coef < 0:
            fail("kl_coef", f"must be >= 0, got {self.kl_coef}")

    @property
    def needs_old_logprobs(self) -> bool:
        return self.ratio != "on_policy"


def groups_with_signal(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """bool [G]: True for groups whose rewards are not all equal (float32 [G * group_size] in)."""
    grouped = np.asarray(rewards, np.float32).reshape(-1, group_size)
    return grouped.max(axis=1) != grouped.min(axis=1)


class SampledGroups(NamedTuple):
    """What one sampling round produced: `rollouts` (see `rollout.Rollouts`), per-sample rewards, the prompts."""

    prompts: list[Any]
    rollouts: Any
    rewards: np.ndarray


class CollectedBatch(NamedTuple):
    """Groups chosen for one update: prompts, their samples (prompt-major) and rewards, plus statistics of
    every group sampled this step (kept or not)."""

    prompts: list[Any]
    prompt_tokens: list[np.ndarray]
    response_tokens: list[list[int]]
    rollout_logprobs: list[list[float]]
    rewards: np.ndarray
    stats: dict[str, float]


def collect_groups(sample: Callable[[int], SampledGroups | None], config: GRPOConfig) -> CollectedBatch:
    """Samples prompt batches (`sample(attempt)`; None when the prompt stream is exhausted) until
    `prompts_per_step` groups with reward signal are collected (dynamic filtering) or the refills run out.

    With dynamic filtering, a group whose rewards are all equal is never kept. Without it, the first batch is
    kept whole.
    """
    n = config.samples_per_prompt
    kept_prompts, tokens, responses, logprobs, rewards = [], [], [], [], []
    all_rewards, lengths, finished, sampled_groups = [], [], [], 0
    for attempt in range(config.max_refill_batches + 1 if config.dynamic_filtering else 1):
        round_ = sample(attempt)
        if round_ is None:
            break
        rollouts = round_.rollouts
        sampled_groups += len(round_.prompts)
        all_rewards.append(round_.rewards)
        lengths.extend(len(r) for r in rollouts.response_tokens)
        finished.extend(rollouts.finished.tolist())
        keep = groups_with_signal(round_.rewards, n) if config.dynamic_filtering else np.ones(len(round_.prompts), bool)
        for group in np.flatnonzero(keep):
            if len(kept_prompts) == config.prompts_per_step:
                break
            rows = range(group * n, (group + 1) * n)
            kept_prompts.append(round_.prompts[group])
            tokens.extend(rollouts.prompt_tokens[r] for r in rows)
            responses.extend(rollouts.response_tokens[r] for r in rows)
            logprobs.extend(rollouts.rollout_logprobs[r] for r in rows)
            rewards.extend(round_.rewards[r] for r in rows)
        if len(kept_prompts) == config.prompts_per_step:
            break
    sampled = np.concatenate(all_rewards) if all_rewards else np.zeros((0,), np.float32)
    stats = {
        "reward": float(sampled.mean()) if sampled.size else float("nan"),
        "groups_sampled": float(sampled_groups),
        "groups_kept": float(len(kept_prompts)),
        "kept_fraction": len(kept_prompts) / max(sampled_groups, 1),
        "response_length": float(np.mean(lengths)) if lengths else 0.0,
        "max_response_length": float(np.max(lengths)) if lengths else 0.0,
        "truncated_fraction": float(1.0 - np.mean(finished)) if finished else 0.0,
    }
    return CollectedBatch(kept_prompts, tokens, responses, logprobs, np.asarray(rewards, np.float32), stats)


def advantages_for(rewards: np.ndarray, num_rows: int, config: GRPOConfig) -> np.ndarray:
    """float32 [num_rows]: group advantages of the kept samples, 0 on padding rows."""
    out = np.zeros((num_rows,), np.float32)
    if len(rewards):
        out[:len(rewards)] = np.asarray(group_advantages(
            jnp.asarray(rewards), config.samples_per_prompt, normalize_std=config.normalize_std,
            leave_one_out=config.leave_one_out))
    return out


def replay_keys(cfg: ModelConfig) -> list[str]:
    return [f"replay/{name}" for name in moe_layer_names(cfg)]


def make_grpo_loss(cfg: ModelConfig, config: GRPOConfig) -> Callable:
    """loss_fn(params, batch, normalizers) for `update.make_train_step`.

    batch: tokens, targets, segment_ids int32 [B, T]; mask, rollout_logprobs float32 [B, T]; advantages [B];
      optional old_logprobs / ref_logprobs [B, T], "replay/layers_i" int32 [B, T, k].
    normalizers: num_tokens, num_sequences (global over the update batch).
    """
    num_experts = cfg.n_routed_experts

    def loss_fn(params: Any, batch: dict[str, jax.Array], normalizers: dict[str, jax.Array]):
        replay = None
        if config.router_replay != "none":
            replay = {key.split("/", 1)[1]: value.reshape(-1, value.shape[-1])
                      for key, value in batch.items() if key.startswith("replay/")}
        out = policy_forward(cfg, params, batch["tokens"], batch["targets"], batch["segment_ids"], expert_ids=replay)
        mask = batch["mask"]
        loss, metrics = policy_gradient_loss(
            out.logprobs, batch.get("old_logprobs"), batch["advantages"], mask,
            rollout_logprobs=batch["rollout_logprobs"], ratio=config.ratio, clip_low=config.clip_low,
            clip_high=config.clip_high, dual_clip=config.dual_clip, is_correction=config.is_correction,
            is_low=config.is_low, is_high=config.is_high, aggregation=config.aggregation,
            num_tokens=normalizers["num_tokens"], num_sequences=normalizers["num_sequences"],
            max_tokens=config.max_new_tokens)
        metrics = dict(metrics)
        metrics["policy_loss"] = loss
        if config.kl_coef:
            kl = aggregate_loss(kl_penalty(out.logprobs, batch["ref_logprobs"], config.kl_kind, mask=mask), mask,
                                config.aggregation, num_tokens=normalizers["num_tokens"],
                                num_sequences=normalizers["num_sequences"], max_tokens=config.max_new_tokens)
            loss = loss + config.kl_coef * kl
            metrics["kl"] = kl
        token_mask = batch["segment_ids"] > 0
        if config.load_balance_coef and num_experts:
            balance = load_balancing_loss(out.router_logits, out.expert_ids, num_experts, token_mask,
                                          normalizers["num_input_tokens"])
            loss = loss + config.load_balance_coef * balance
            metrics["load_balance_loss"] = balance
        metrics["entropy"] = masked_token_mean(jax.lax.stop_gradient(out.entropy), mask, normalizers["num_tokens"])
        counts = expert_counts(out.expert_ids, max(num_experts, 1), token_mask)
        return loss, LossAux(metrics, counts)

    return loss_fn


def update_normalizers(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Global counts of an update batch: loss tokens, non-empty sequences, real input tokens."""
    mask = batch["mask"]
    return {
        "num_tokens": np.asarray(mask.sum(), np.float32),
        "num_sequences": np.asarray((mask.sum(axis=1) > 0).sum(), np.float32),
        "num_input_tokens": np.asarray((batch["segment_ids"] > 0).sum(), np.float32),
    }


def minibatch_slices(num_rows: int, config: GRPOConfig) -> Sequence[slice]:
    size = num_rows // config.minibatches_per_step
    return [slice(i * size, (i + 1) * size) for i in range(config.minibatches_per_step)]

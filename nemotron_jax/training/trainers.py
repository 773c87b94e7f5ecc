"""Stage trainers: the loop around one jitted update per step, for SFT, GRPO and MOPD.

Each trainer resumes from its stage's latest Orbax checkpoint (state, data iterator, step), saves every
`checkpoint_every` steps and at the end, stops cleanly on SIGTERM (final save, then `Preempted`), and stops on
a non-finite loss, gradient norm or update norm with `TrainingDivergedError` (the diverged state is not saved;
the last good checkpoint stays).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.data import RLDataConfig, SFTDataConfig, open_source, rl_prompt_dataset, sft_dataset
from nemotron_jax.losses import sft_loss
from nemotron_jax.losses.aggregation import masked_token_mean
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.params import abstract_params
from nemotron_jax.training import grpo as grpo_lib
from nemotron_jax.training import mopd as mopd_lib
from nemotron_jax.training.checkpointing import StageCheckpoints
from nemotron_jax.training.forward import expert_counts, load_balancing_loss, moe_layer_names, policy_forward
from nemotron_jax.training.metrics import MetricsLogger
from nemotron_jax.training.optimizer import (
    OptimizerConfig,
    learning_rate_schedule,
    make_optimizer,
    step_function_key,
)
from nemotron_jax.training.rollout import bucket_length, response_texts, sample_rollouts, training_arrays
from nemotron_jax.training.scoring import Scorer
from nemotron_jax.training.state import KEY_ROLLOUT, TrainState, host_seed
from nemotron_jax.training.update import LossAux, make_train_step


class Preempted(Exception):
    """SIGTERM arrived; the state was saved. Rerunning the same command resumes."""


class TrainingDivergedError(RuntimeError):
    """A non-finite loss; the stage stopped without saving the diverged state."""


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Packed SFT: `batch_size` rows of `row_length` tokens per step (loss on assistant tokens only)."""

    row_length: int = 4096
    batch_size: int = 8
    num_microbatches: int = 1
    packing_window: int = 512
    on_overlong: str = "raise"
    train_on: str = "final"
    load_balance_coef: float = 0.0
    expert_bias_update_rate: float = 0.0

    def validate(self) -> None:
        if self.row_length < 2 or self.batch_size < 1 or self.num_microbatches < 1:
            raise ValueError(f"SFTConfig: row_length >= 2, batch_size >= 1, num_microbatches >= 1 needed, got "
                             f"{self.row_length}, {self.batch_size}, {self.num_microbatches}")
        if self.batch_size % self.num_microbatches:
            raise ValueError(f"SFTConfig.num_microbatches={self.num_microbatches} must divide batch_size="
                             f"{self.batch_size}")


@dataclasses.dataclass
class StageEnvironment:
    """What a trainer needs from the pipeline."""

    cfg: ModelConfig
    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    run_dir: str
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool
    progress: bool = True


class _StopFlag:
    """Records SIGTERM (and SIGINT) while a stage runs, so the loop can save and exit between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM,):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_sft_loss(cfg: ModelConfig, config: SFTConfig) -> Callable:
    """loss_fn for packed batches (tokens, segment_ids, targets, loss_mask int32 [B, L])."""
    num_experts = cfg.n_routed_experts

    def loss_fn(params, batch, normalizers):
        out = policy_forward(cfg, params, batch["tokens"], batch["targets"], batch["segment_ids"])
        mask = batch["loss_mask"]
        loss = sft_loss(out.logprobs, mask, num_tokens=normalizers["num_tokens"])
        metrics = {"nll": loss,
                   "entropy": masked_token_mean(jax.lax.stop_gradient(out.entropy), mask, normalizers["num_tokens"])}
        token_mask = batch["segment_ids"] > 0
        if config.load_balance_coef and num_experts:
            balance = load_balancing_loss(out.router_logits, out.expert_ids, num_experts, token_mask,
                                          normalizers["num_input_tokens"])
            loss = loss + config.load_balance_coef * balance
            metrics["load_balance_loss"] = balance
        return loss, LossAux(metrics, expert_counts(out.expert_ids, max(num_experts, 1), token_mask))

    return loss_fn


def _committed(tree: Any) -> Any:
    """`tree` with every uncommitted array committed to the default device.

    A jitted step's outputs are committed when any input is, and jit compiles per committed-ness of its inputs:
    a state mixing committed leaves (restored params) with uncommitted ones (a fresh step counter, optimiser
    count) compiled the update twice (step 1, then the all-committed state of step 2), and a stage started from
    `init_params` did not share its compiled step with stages started from checkpoints.
    """
    device = jax.devices()[0]
    return jax.tree.map(lambda x: x if not isinstance(x, jax.Array) or x.committed else jax.device_put(x, device),
                        tree)


_STEP_CACHE: dict[tuple, Callable] = {}
_FORWARD_CACHE: dict[tuple, Callable] = {}


class StageTrainer:
    """Common loop; subclasses implement `make_data`, `make_update`, `train_step`."""

    algorithm = ""
    updates_per_step = 1

    def __init__(self, name: str, steps: int, optimizer: OptimizerConfig, data_files: Sequence[str],
                 env: StageEnvironment, *, seed: int, enable_thinking: bool):
        self.name = name
        self.steps = steps
        self.optimizer_config = optimizer
        self.data_files = list(data_files)
        self.env = env
        self.cfg = env.cfg
        self.seed = seed
        self.enable_thinking = enable_thinking
        self.timings: dict[str, float] = {}

    # -- to implement
    def make_data(self) -> Any:
        raise NotImplementedError

    def make_update(self, optimizer) -> None:
        raise NotImplementedError

    def compiled_step(self, optimizer, loss_key: Any, make_loss: Callable, *, num_microbatches: int,
                      expert_bias_update_rate: float = 0.0) -> Callable:
        """The jitted update step, shared by every stage with the same model, loss and optimiser settings (so
        a pipeline compiles it once, not once per stage)."""
        key = (self.algorithm, self.cfg, loss_key, step_function_key(self.optimizer_config), num_microbatches,
               expert_bias_update_rate)
        if key not in _STEP_CACHE:
            _STEP_CACHE[key] = make_train_step(make_loss(), optimizer, num_microbatches=num_microbatches,
                                               expert_bias_update_rate=expert_bias_update_rate,
                                               moe_layers=moe_layer_names(self.cfg))
        return _STEP_CACHE[key]

    def learning_rate(self, update_index: int) -> np.ndarray:
        return np.asarray(self.schedule(update_index), np.float32)

    def train_step(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        raise NotImplementedError

    def prepare(self, init_params: Any) -> None:
        """Called once before the loop with the stage's initial params (e.g. the KL reference)."""

    # -- the loop
    def run(self, init_params: Any | None) -> tuple[Any, dict[str, float]]:
        """Trains from `init_params` (or resumes from this stage's checkpoint) -> (final params, summary).

        The update step donates its state: the buffers of `init_params` are consumed by the first update (pass
        a copy to keep using them)."""
        checkpoints = StageCheckpoints(os.path.join(self.env.run_dir, "checkpoints", self.name),
                                       save_every=self.env.checkpoint_every, keep=self.env.keep_checkpoints,
                                       async_save=self.env.async_checkpoints)
        template = init_params if init_params is not None else abstract_params(self.cfg)
        # The optimiser's schedule counts optimiser updates; a GRPO step may make several.
        total_updates = self.steps * self.updates_per_step
        optimizer = make_optimizer(self.optimizer_config, template)
        self.schedule = learning_rate_schedule(self.optimizer_config, total_updates)
        self.iterator = iter(self.make_data())
        latest = checkpoints.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer, self.seed), template)
            state, extra = checkpoints.restore(latest, abstract)
            self.iterator.set_state(extra["data"])
        else:
            if init_params is None:
                raise ValueError(f"stage {self.name}: no checkpoint to resume and no initial params")
            state = TrainState.create(init_params, optimizer, self.seed)
        state = _committed(state)
        self.prepare(init_params)
        self.make_update(optimizer)
        start = int(state.step)
        logger = MetricsLogger(self.env.run_dir, self.name, self.steps, start, progress=self.env.progress)
        last_good = latest
        try:
            with _StopFlag() as stop:
                for step in range(start, self.steps):
                    began = time.perf_counter()
                    self.timings = {}
                    state, metrics = self.train_step(state)
                    metrics = jax.device_get(metrics)
                    # The loss is that of the params before this step's update: a non-finite gradient or
                    # update (finite loss) would otherwise save non-finite params as a "good" checkpoint.
                    checked = {name: float(np.asarray(metrics[name])) for name in ("loss", "grad_norm", "update_norm")
                               if name in metrics}
                    bad = {name: value for name, value in checked.items() if not math.isfinite(value)}
                    if bad:
                        checkpoints.wait()
                        where = (f"the last good checkpoint is step {last_good} in {checkpoints.directory}"
                                 if last_good is not None else "no checkpoint of this stage was written")
                        values = ", ".join(f"{name} {value}" for name, value in bad.items())
                        raise TrainingDivergedError(
                            f"stage {self.name!r}: non-finite loss or update ({values}) at step {step + 1}; stopped "
                            f"without saving it; {where}")
                    metrics.update({f"time/{k}": v for k, v in self.timings.items()})
                    metrics["time/step"] = time.perf_counter() - began
                    logger.log(step + 1, metrics)
                    done = step + 1
                    extra = {"data": self.iterator.get_state()}
                    final = done == self.steps
                    if checkpoints.save(done, state, extra, force=final or stop.signum is not None):
                        last_good = done
                    if stop.signum is not None and not final:
                        checkpoints.wait()
                        raise Preempted(f"stage {self.name!r}: signal {stop.signum} at step {done}; state saved")
            checkpoints.wait()
        finally:
            logger.close()
            checkpoints.close()
            self.close()
        return state.params, logger.summary()

    def close(self) -> None:
        pass


class SFTTrainer(StageTrainer):
    algorithm = "sft"

    def __init__(self, *args, sft: SFTConfig, **kwargs):
        super().__init__(*args, **kwargs)
        sft.validate()
        self.config = sft

    def make_data(self):
        config = SFTDataConfig(row_length=self.config.row_length, batch_size=self.config.batch_size,
                               packing_window=self.config.packing_window, on_overlong=self.config.on_overlong,
                               enable_thinking=self.enable_thinking, train_on=self.config.train_on,
                               drop_remainder=True, seed=self.seed, num_epochs=None, num_threads=1,
                               prefetch_buffer_size=8)
        return sft_dataset(open_source(self.data_files), self.env.tokenizer, config)

    def make_update(self, optimizer):
        self.update = self.compiled_step(optimizer, self.config, lambda: make_sft_loss(self.cfg, self.config),
                                         num_microbatches=self.config.num_microbatches,
                                         expert_bias_update_rate=self.config.expert_bias_update_rate)

    def train_step(self, state):
        batch = next(self.iterator)
        arrays = {k: np.asarray(batch[k]) for k in ("tokens", "targets", "segment_ids", "loss_mask")}
        normalizers = {"num_tokens": np.asarray(arrays["loss_mask"].sum(), np.float32),
                       "num_input_tokens": np.asarray((arrays["segment_ids"] > 0).sum(), np.float32)}
        return self.update(state, arrays, normalizers, self.learning_rate(int(state.step)))


def _logprob_fn(cfg: ModelConfig, with_routing: bool = False) -> Callable:
    """Jitted (params, batch) -> log-probs [B, T] (and the routing used, for replay), no gradient."""
    key = (cfg, with_routing)
    if key not in _FORWARD_CACHE:
        @jax.jit
        def forward(params, tokens, targets, segment_ids):
            out = policy_forward(cfg, params, tokens, targets, segment_ids)
            return (out.logprobs, out.expert_ids) if with_routing else out.logprobs

        # Only the three arrays enter the jit: the batch's other entries (which differ between GRPO and MOPD
        # batches) would otherwise be transferred, and change the cache key, compiling the forward again.
        _FORWARD_CACHE[key] = lambda params, batch: forward(params, batch["tokens"], batch["targets"],
                                                            batch["segment_ids"])
    return _FORWARD_CACHE[key]


class _RLTrainer(StageTrainer):
    """Shared by GRPO and MOPD: the prompt stream, sampling and scoring."""

    def __init__(self, *args, config: Any, scorer: Scorer | None, **kwargs):
        super().__init__(*args, **kwargs)
        config.validate()
        self.config = config
        self.scorer = scorer

    def make_data(self):
        config = RLDataConfig(batch_size=self.config.prompts_per_step, enable_thinking=self.enable_thinking,
                              max_prompt_length=self.config.max_prompt_length, seed=self.seed, num_epochs=None,
                              num_threads=1, prefetch_buffer_size=4)
        return rl_prompt_dataset(open_source(self.data_files), self.env.tokenizer, config)

    @property
    def prompt_width(self) -> int:
        return bucket_length(self.config.max_prompt_length)

    @property
    def sequence_length(self) -> int:
        return self.prompt_width + self.config.max_new_tokens

    def _timed(self, name: str, began: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began

    def sample(self, params: Any, prompts: list[Any], key: jax.Array):
        began = time.perf_counter()
        rollouts = sample_rollouts(self.cfg, params, [p.token_ids for p in prompts], n=self.config.samples_per_prompt,
                                   max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                                   top_p=self.config.top_p, stop_token_ids=self.env.stop_token_ids,
                                   seed=host_seed(key), prompt_length=self.prompt_width,
                                   num_rows=self.config.rows_per_step)
        self._timed("generation", began)
        return rollouts

    def score(self, prompts: list[Any], rollouts: Any) -> tuple[np.ndarray, dict[str, int]]:
        began = time.perf_counter()
        n = self.config.samples_per_prompt
        texts = response_texts(self.env.tokenizer, rollouts, self.env.stop_token_ids)
        rewards, counts = self.scorer.score(texts, [p.reward_spec for p in prompts for _ in range(n)],
                                            [p.domain for p in prompts for _ in range(n)], ~rollouts.finished)
        self._timed("scoring", began)
        return rewards, counts

    def per_domain_rewards(self, prompts: list[Any], rewards: np.ndarray) -> dict[str, float]:
        n = self.config.samples_per_prompt
        domains = np.asarray([p.domain for p in prompts for _ in range(n)])
        return {f"reward/{d}": float(rewards[domains == d].mean()) for d in sorted(set(domains.tolist()))}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


class GRPOTrainer(_RLTrainer):
    algorithm = "grpo"

    @property
    def updates_per_step(self) -> int:
        return self.config.minibatches_per_step * self.config.epochs_per_step

    def prepare(self, init_params):
        # A copy: `init_params` are also the initial state's params, whose buffers the first update donates
        # (the reference itself was deleted after step 1).
        self.reference_params = None
        if self.config.kl_coef and init_params is not None:
            self.reference_params = jax.tree.map(jnp.copy, init_params)
        needs = self.config.needs_old_logprobs or self.config.router_replay != "none"
        self.logprobs = _logprob_fn(self.cfg, with_routing=self.config.router_replay != "none") if needs else None
        self.reference_logprobs = _logprob_fn(self.cfg) if self.config.kl_coef else None
        if self.config.kl_coef and init_params is None:
            # Resuming: the reference is the stage's initial params, which the pipeline passes again.
            raise ValueError(f"stage {self.name}: the KL reference needs the stage's initial params")

    def make_update(self, optimizer):
        self.update = self.compiled_step(optimizer, self.config, lambda: grpo_lib.make_grpo_loss(self.cfg, self.config),
                                         num_microbatches=self.config.num_microbatches,
                                         expert_bias_update_rate=self.config.expert_bias_update_rate)

    def train_step(self, state):
        config = self.config
        base_key = state.step_key(KEY_ROLLOUT)
        status_counts: dict[str, int] = {}
        sampled_prompts: list[Any] = []
        sampled_rewards: list[np.ndarray] = []

        def sample(attempt: int):
            try:
                prompts = next(self.iterator).prompts
            except StopIteration:
                return None
            rollouts = self.sample(state.params, prompts, jax.random.fold_in(base_key, attempt))
            rewards, counts = self.score(prompts, rollouts)
            for status, count in counts.items():
                status_counts[status] = status_counts.get(status, 0) + count
            sampled_prompts.extend(prompts)
            sampled_rewards.append(rewards)
            return grpo_lib.SampledGroups(prompts, rollouts, rewards)

        collected = grpo_lib.collect_groups(sample, config)
        metrics: dict[str, Any] = dict(collected.stats)
        metrics.update(self.per_domain_rewards(sampled_prompts, np.concatenate(sampled_rewards)))
        metrics.update({f"scoring/{k}": float(v) for k, v in status_counts.items()})
        if not collected.prompts:  # nothing to learn from this step: no update, but the step counts
            metrics["skipped_update"] = 1.0
            return state.replace(step=state.step + 1), metrics
        began = time.perf_counter()
        rows = config.rows_per_step
        batch = training_arrays(collected.prompt_tokens, collected.response_tokens, collected.rollout_logprobs,
                                length=self.sequence_length, pad_id=self.env.tokenizer.pad_id, num_rows=rows)
        batch["advantages"] = grpo_lib.advantages_for(collected.rewards, rows, config)
        if self.logprobs is not None:
            result = self.logprobs(state.params, batch)
            if config.router_replay != "none":
                old, routing = result
                for name, ids in routing.items():
                    batch[f"replay/{name}"] = np.asarray(ids).reshape(rows, self.sequence_length, -1)
            else:
                old = result
            if config.needs_old_logprobs:
                batch["old_logprobs"] = np.asarray(old)
        if self.reference_logprobs is not None:
            batch["ref_logprobs"] = np.asarray(self.reference_logprobs(self.reference_params, batch))
        update_metrics = []
        first_update = int(state.step) * self.updates_per_step
        for _ in range(config.epochs_per_step):
            for part in grpo_lib.minibatch_slices(rows, config):
                minibatch = {k: v[part] for k, v in batch.items()}
                rate = self.learning_rate(first_update + len(update_metrics))
                state, m = self.update(state, minibatch, grpo_lib.update_normalizers(minibatch), rate)
                update_metrics.append(m)
        if len(update_metrics) > 1:  # `state.step` counts rollout steps (the optimiser counts its updates)
            state = state.replace(step=state.step - len(update_metrics) + 1)
        last = jax.device_get(update_metrics[-1])
        metrics.update({k: v for k, v in last.items()})
        self._timed("update", began)
        return state, metrics


class MOPDTrainer(_RLTrainer):
    algorithm = "mopd"

    def __init__(self, *args, teachers: Mapping[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers = dict(teachers)

    def prepare(self, init_params):
        self.teacher_forward = _logprob_fn(self.cfg)

    def make_update(self, optimizer):
        self.update = self.compiled_step(optimizer, self.config, lambda: mopd_lib.make_mopd_loss(self.cfg, self.config),
                                         num_microbatches=self.config.num_microbatches)

    def train_step(self, state):
        prompts = next(self.iterator).prompts
        rollouts = self.sample(state.params, prompts, state.step_key(KEY_ROLLOUT))
        metrics: dict[str, Any] = {}
        if self.config.score_rollouts and self.scorer is not None:
            rewards, _ = self.score(prompts, rollouts)
            metrics["reward"] = float(rewards.mean())
            metrics.update(self.per_domain_rewards(prompts, rewards))
        began = time.perf_counter()
        rows = self.config.rows_per_step
        batch = training_arrays(rollouts.prompt_tokens, rollouts.response_tokens, rollouts.rollout_logprobs,
                                length=self.sequence_length, pad_id=self.env.tokenizer.pad_id, num_rows=rows)
        domains = [p.domain for p in prompts for _ in range(self.config.samples_per_prompt)]
        batch["teacher_logprobs"] = mopd_lib.teacher_logprobs(self.teacher_forward, self.teachers, domains, batch)
        self._timed("teacher", began)
        began = time.perf_counter()
        state, update_metrics = self.update(state, batch, grpo_lib.update_normalizers(batch),
                                            self.learning_rate(int(state.step)))
        metrics.update(jax.device_get(update_metrics))
        metrics["response_length"] = float(np.mean([len(r) for r in rollouts.response_tokens]))
        metrics["truncated_fraction"] = float(1.0 - rollouts.finished.mean())
        self._timed("update", began)
        return state, metrics

"""The Cascade pipeline: an ordered list of stages (SFT, GRPO, MOPD), each starting from the previous stage's
final params, with per-domain evaluation after every stage and MOPD teachers taken from the pipeline's own
checkpoints.

Run directory:

    pipeline_state.json          stage index, eval history, best checkpoint per domain, spread (atomic writes)
    checkpoints/<stage>/         Orbax CheckpointManager of the stage's TrainState + data iterator state
    stage_finals/<stage>/        params + model config at the end of each stage (`checkpoint.save_params`);
                                 the next stage's start and the MOPD teachers
    metrics.jsonl, tensorboard/  per-step metrics
    eval_table.md / .json        per-domain scores after each stage

Rerunning the same pipeline on the same run directory resumes where it stopped: completed stages are skipped,
an interrupted stage resumes from its latest checkpoint, at the same step, with the same data order and RNG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from nemotron_jax.checkpoint import CheckpointError, load_hf, restore_params, save_params
from nemotron_jax.checkpoint.atomic import atomic_write_file
from nemotron_jax.data import (
    HFTokenizer,
    RLDataConfig,
    SentencePieceTokenizer,
    chat_stop_token_ids,
    open_source,
    rl_prompt_dataset,
)
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.params import init_params
from nemotron_jax.training.evaluation import EvalConfig, evaluate
from nemotron_jax.training.grpo import GRPOConfig
from nemotron_jax.training.metrics import markdown_table
from nemotron_jax.training.mopd import MOPDConfig
from nemotron_jax.training.optimizer import OptimizerConfig
from nemotron_jax.training.scoring import Scorer, check_domains
from nemotron_jax.training.trainers import (
    GRPOTrainer,
    MOPDTrainer,
    SFTConfig,
    SFTTrainer,
    StageEnvironment,
)

ALGORITHMS = ("sft", "grpo", "mopd")
STATE_FILE = "pipeline_state.json"
INITIAL = "initial"


class PipelineConfigError(ValueError):
    """The pipeline cannot start (missing data, unknown verifier, bad teacher, ...); raised before training."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the first stage's params come from: a Hugging Face checkpoint, a `save_params` directory, or a
    random init of `config` (with `vocab_from_tokenizer`, its vocabulary is sized to the tokenizer's)."""

    config: ModelConfig | None = None
    hf_checkpoint: str | None = None
    params_checkpoint: str | None = None
    vocab_from_tokenizer: bool = False
    init_seed: int = 0

    def validate(self) -> None:
        given = [x is not None for x in (self.config, self.hf_checkpoint, self.params_checkpoint)]
        if sum(given) != 1:
            raise PipelineConfigError("ModelSource: give exactly one of config, hf_checkpoint, params_checkpoint")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of the cascade.

    Attributes:
      name: unique; names the checkpoint directories and the eval-table row.
      algorithm: "sft", "grpo" or "mopd".
      steps: optimiser steps (GRPO/MOPD: rollout batches).
      data_files: SFT conversations or RL prompt records (JSONL / Parquet, globs; "{run_dir}" is replaced by
        the run directory).
      optimizer: `OptimizerConfig`.
      sft / grpo / mopd: the algorithm's settings (the one matching `algorithm` is used).
      teachers: MOPD only: domain -> "best" (the checkpoint with the best eval score on that domain so far),
        a stage name, or a `save_params` directory.
      enable_thinking: render prompts in thinking mode (Cascade RL) or instruct mode.
      seed: data order and sampling seed of the stage.
    """

    name: str
    algorithm: str
    steps: int
    data_files: tuple[str, ...]
    optimizer: OptimizerConfig = OptimizerConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    mopd: MOPDConfig = MOPDConfig()
    teachers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    enable_thinking: bool = True
    seed: int = 0

    @property
    def settings(self) -> Any:
        return {"sft": self.sft, "grpo": self.grpo, "mopd": self.mopd}[self.algorithm]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A whole cascade.

    Attributes:
      stages: in order.
      model: `ModelSource` of the first stage.
      tokenizer: a SentencePiece `.model` file or a directory with `tokenizer.json` ("{run_dir}" replaced).
      eval_files: domain -> held-out RL prompt file; every domain is evaluated after every stage.
      eval: `EvalConfig`.
      prepare: called with the run directory before anything else (the demo writes its data and tokenizer).
      checkpoint_every, keep_checkpoints, async_checkpoints: Orbax settings of the stage checkpoints.
      reward_workers: reward worker processes for evaluation and RL (0: in this process).
    """

    stages: tuple[StageConfig, ...]
    model: ModelSource
    tokenizer: str
    eval_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    eval: EvalConfig = EvalConfig()
    prepare: Callable[[str], Any] | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    reward_workers: int = 0
    progress: bool = True


def _expand(path: str, run_dir: str) -> str:
    return path.replace("{run_dir}", run_dir)


def load_tokenizer(path: str) -> Any:
    if os.path.isdir(path):
        return HFTokenizer.from_directory(path)
    if not os.path.isfile(path):
        raise PipelineConfigError(f"tokenizer {path!r} does not exist")
    return SentencePieceTokenizer(path)


def _atomic_json(path: str, value: Any) -> None:
    atomic_write_file(path, lambda f: json.dump(value, f, indent=2))


class CascadePipeline:
    def __init__(self, config: PipelineConfig, run_dir: str, *, log: Callable[[str], None] = print):
        self.config = config
        self.run_dir = os.path.abspath(run_dir)
        self.log = log
        names = [s.name for s in config.stages]
        if len(set(names)) != len(names):
            raise PipelineConfigError(f"stage names must be unique, got {names}")
        if INITIAL in names:
            raise PipelineConfigError(f"{INITIAL!r} is reserved for the untrained row of the eval table")

    # ------------------------------------------------------------------------------------------ set-up
    def _stage_dir(self, kind: str, name: str) -> str:
        return os.path.join(self.run_dir, kind, name)

    def setup(self) -> None:
        """Runs `prepare`, loads the tokenizer and model config, reads eval sets, validates every stage."""
        os.makedirs(self.run_dir, exist_ok=True)
        if self.config.prepare is not None:
            try:
                self.config.prepare(self.run_dir)
            except (ValueError, OSError) as error:
                raise PipelineConfigError(f"PipelineConfig.prepare failed: {error}") from error
        self.tokenizer = load_tokenizer(_expand(self.config.tokenizer, self.run_dir))
        self.stop_token_ids = tuple(chat_stop_token_ids(self.tokenizer))
        self.cfg = self._model_config()
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise PipelineConfigError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size is "
                                      f"{self.cfg.vocab_size}")
        self.eval_sets = {domain: self._read_prompts((_expand(path, self.run_dir),), f"eval_files[{domain!r}]",
                                                     max_prompt_length=None,
                                                     enable_thinking=self.config.eval.enable_thinking)
                          for domain, path in self.config.eval_files.items()}
        for domain, prompts in self.eval_sets.items():
            bad = sorted({p.domain for p in prompts} - {domain})
            if bad:
                raise PipelineConfigError(f"eval_files[{domain!r}] holds prompts of other domains {bad}")
        self.config.eval.validate()
        for index, stage in enumerate(self.config.stages):
            self._validate_stage(index, stage)

    def _model_config(self) -> ModelConfig:
        source = self.config.model
        source.validate()
        if source.config is not None:
            cfg = source.config
            if source.vocab_from_tokenizer:
                cfg = cfg.replace(vocab_size=self.tokenizer.vocab_size, pad_token_id=self.tokenizer.pad_id,
                                  eos_token_id=self.tokenizer.eos_id, bos_token_id=self.tokenizer.bos_id)
            return cfg
        if source.hf_checkpoint is not None:
            path = os.path.join(source.hf_checkpoint, "config.json")
            if not os.path.isfile(path):
                raise PipelineConfigError(f"model.hf_checkpoint: {path} does not exist")
            with open(path) as f:
                return ModelConfig.from_hf_config(json.load(f))
        from nemotron_jax.checkpoint.orbax_params import load_config

        return load_config(source.params_checkpoint)

    def _read_prompts(self, files: Sequence[str], where: str, *, max_prompt_length: int | None,
                      enable_thinking: bool) -> list[Any]:
        try:
            source = open_source(list(files))
        except (FileNotFoundError, ValueError) as error:
            raise PipelineConfigError(f"{where}: {error}") from None
        if len(source) == 0:
            raise PipelineConfigError(f"{where}: the prompt set {list(files)} is empty")
        config = RLDataConfig(batch_size=len(source), max_prompt_length=max_prompt_length, shuffle=False,
                              enable_thinking=enable_thinking, num_threads=1)
        try:
            prompts = next(iter(rl_prompt_dataset(source, self.tokenizer, config))).prompts
        except (ValueError, StopIteration) as error:
            raise PipelineConfigError(f"{where}: {error}") from None
        try:
            check_domains([p.domain for p in prompts], where)
        except ValueError as error:  # an unknown verifier is a configuration error too
            raise PipelineConfigError(str(error)) from None
        return prompts

    def _validate_stage(self, index: int, stage: StageConfig) -> None:
        where = f"stage {stage.name!r}"
        if stage.algorithm not in ALGORITHMS:
            raise PipelineConfigError(f"{where}: algorithm must be one of {ALGORITHMS}, got {stage.algorithm!r}")
        if stage.steps < 1:
            raise PipelineConfigError(f"{where}: steps must be >= 1, got {stage.steps}")
        if not stage.data_files:
            raise PipelineConfigError(f"{where}: no data_files")
        try:
            stage.optimizer.validate()
            stage.settings.validate()
        except ValueError as error:
            raise PipelineConfigError(f"{where}: {error}") from None
        files = [_expand(f, self.run_dir) for f in stage.data_files]
        if stage.algorithm == "sft":
            try:
                source = open_source(files)
            except (FileNotFoundError, ValueError) as error:
                raise PipelineConfigError(f"{where}: data_files: {error}") from None
            if len(source) == 0:
                raise PipelineConfigError(f"{where}: the SFT data {files} is empty")
            return
        prompts = self._read_prompts(files, f"{where}: data_files", max_prompt_length=stage.settings.max_prompt_length,
                                     enable_thinking=stage.enable_thinking)
        if stage.algorithm == "mopd":
            domains = sorted({p.domain for p in prompts})
            missing = [d for d in domains if d not in stage.teachers]
            if missing:
                raise PipelineConfigError(f"{where}: no teacher for domains {missing} (teachers: {dict(stage.teachers)})")
            earlier = [s.name for s in self.config.stages[:index]]
            for domain, teacher in stage.teachers.items():
                if teacher == "best":
                    if not earlier:
                        raise PipelineConfigError(f"{where}: teacher 'best' for {domain!r} needs an earlier stage")
                    if domain not in self.eval_sets:
                        raise PipelineConfigError(f"{where}: teacher 'best' for {domain!r} needs eval_files[{domain!r}]")
                elif teacher in [s.name for s in self.config.stages]:
                    if teacher not in earlier:
                        raise PipelineConfigError(f"{where}: teacher {teacher!r} for {domain!r} is not an earlier stage")
                else:
                    self._check_teacher_checkpoint(teacher, f"{where}: teacher for {domain!r}")

    def _check_teacher_checkpoint(self, path: str, where: str) -> None:
        from nemotron_jax.checkpoint.orbax_params import load_config

        if not os.path.isdir(path):
            raise PipelineConfigError(f"{where}: checkpoint {path!r} does not exist (give 'best', an earlier stage "
                                      "name, or a save_params directory)")
        try:
            teacher_cfg = load_config(path)
        except CheckpointError as error:
            raise PipelineConfigError(f"{where}: {error}") from None
        if teacher_cfg.vocab_size != self.cfg.vocab_size:
            raise PipelineConfigError(f"{where}: checkpoint {path!r} has vocab_size {teacher_cfg.vocab_size}, the "
                                      f"student {self.cfg.vocab_size}; MOPD needs a shared tokenizer")

    # ------------------------------------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any]:
        path = os.path.join(self.run_dir, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            names = [s.name for s in self.config.stages]
            if state.get("stages") != names:
                raise PipelineConfigError(f"{path} belongs to a pipeline with stages {state.get('stages')}, not "
                                          f"{names}; use another run_dir")
            return state
        return {"stages": [s.name for s in self.config.stages], "next_stage": 0, "evals": {}, "best": {},
                "spread": None, "stage_summaries": {}}

    def _save_state(self, state: dict[str, Any]) -> None:
        _atomic_json(os.path.join(self.run_dir, STATE_FILE), state)

    # ------------------------------------------------------------------------------------------ running
    def _initial_params(self) -> Any:
        source = self.config.model
        if source.hf_checkpoint is not None:
            return load_hf(source.hf_checkpoint)[1]
        if source.params_checkpoint is not None:
            return restore_params(source.params_checkpoint)[1]
        return init_params(self.cfg, jax.random.PRNGKey(source.init_seed))

    def _params_of(self, stage_name: str) -> Any:
        return restore_params(self._stage_dir("stage_finals", stage_name))[1]

    def _evaluate(self, params: Any, scorer: Scorer, seed: int | None = None) -> dict[str, float]:
        if not self.eval_sets:
            return {}
        return evaluate(self.cfg, params, self.tokenizer, self.eval_sets, self.config.eval, scorer,
                        self.stop_token_ids, seed=seed)

    def _teachers(self, stage: StageConfig, state: dict[str, Any]) -> dict[str, Any]:
        teachers, cache = {}, {}
        for domain, teacher in sorted(stage.teachers.items()):
            if teacher == "best":
                if domain not in state["best"]:
                    raise PipelineConfigError(f"stage {stage.name!r}: no evaluated checkpoint for {domain!r} yet")
                teacher = state["best"][domain]["stage"]
            if teacher not in cache:
                if teacher == INITIAL:
                    cache[teacher] = self._initial_params()
                elif teacher in state["stages"]:
                    cache[teacher] = self._params_of(teacher)
                else:
                    cache[teacher] = restore_params(teacher)[1]
                self.log(f"[{stage.name}] teacher for {domain}: {teacher}")
            teachers[domain] = cache[teacher]
        return teachers

    def _record_eval(self, state: dict[str, Any], row: str, scores: dict[str, float]) -> None:
        state["evals"][row] = scores
        for domain, score in scores.items():
            best = state["best"].get(domain)
            if row != INITIAL and (best is None or score > best["score"]):
                state["best"][domain] = {"stage": row, "score": score}

    def eval_table(self, state: dict[str, Any]) -> str:
        domains = sorted(self.eval_sets)
        rows = [[name] + [state["evals"][name].get(d, float("nan")) for d in domains]
                for name in [INITIAL, *state["stages"]] if name in state["evals"]]
        table = markdown_table(["after"] + domains, rows)
        if state.get("spread"):
            spread = ", ".join(f"{d} {v:.3f}" for d, v in sorted(state["spread"].items()))
            table += f"\n\nseed-to-seed spread of the eval (max - min over {self.config.eval.spread_seeds} seeds): {spread}"
        return table

    def summary_table(self, state: dict[str, Any]) -> str:
        """One row per trained stage: algorithm, steps, wall time and the first -> last tenth means of its main
        training metrics."""
        columns = ("reward", "loss", "entropy", "nll", "reverse_kl_estimate", "response_length", "kept_fraction",
                   "time/step")
        rows = []
        for stage in self.config.stages:
            summary = state["stage_summaries"].get(stage.name)
            if summary is None:
                continue
            cells = [stage.name, stage.algorithm, stage.steps, f"{summary.get('time/stage_seconds', float('nan')):.0f}"]
            for name in columns:
                first, last = summary.get(f"{name}/first"), summary.get(f"{name}/last")
                cells.append("" if first is None else f"{first:.3g} -> {last:.3g}")
            rows.append(cells)
        return markdown_table(["stage", "algorithm", "steps", "seconds", *columns], rows)

    def _write_eval_table(self, state: dict[str, Any]) -> None:
        table = self.eval_table(state) + "\n"
        atomic_write_file(os.path.join(self.run_dir, "eval_table.md"), lambda f: f.write(table))
        _atomic_json(os.path.join(self.run_dir, "eval_table.json"),
                     {"evals": state["evals"], "best": state["best"], "spread": state["spread"]})

    def _trainer(self, stage: StageConfig, state: dict[str, Any]) -> Any:
        env = StageEnvironment(cfg=self.cfg, tokenizer=self.tokenizer, stop_token_ids=self.stop_token_ids,
                               run_dir=self.run_dir, checkpoint_every=self.config.checkpoint_every,
                               keep_checkpoints=self.config.keep_checkpoints,
                               async_checkpoints=self.config.async_checkpoints, progress=self.config.progress)
        common = dict(name=stage.name, steps=stage.steps, optimizer=stage.optimizer,
                      data_files=[_expand(f, self.run_dir) for f in stage.data_files], env=env, seed=stage.seed,
                      enable_thinking=stage.enable_thinking)
        if stage.algorithm == "sft":
            return SFTTrainer(sft=stage.sft, **common)
        if stage.algorithm == "grpo":
            return GRPOTrainer(config=stage.grpo, scorer=Scorer(stage.grpo.reward_workers), **common)
        scorer = Scorer(stage.mopd.reward_workers) if stage.mopd.score_rollouts else None
        return MOPDTrainer(config=stage.mopd, scorer=scorer, teachers=self._teachers(stage, state), **common)

    def run(self, *, only_stage: str | None = None) -> dict[str, Any]:
        """Runs (or resumes) the pipeline; `only_stage` runs that one stage (its predecessor must be done)."""
        self.setup()
        state = self._load_state()
        names = state["stages"]
        if only_stage is not None and only_stage not in names:
            raise PipelineConfigError(f"--stage {only_stage!r} is not a stage of this pipeline: {names}")
        scorer = Scorer(self.config.reward_workers)
        try:
            if INITIAL not in state["evals"] and self.eval_sets:
                began = time.perf_counter()
                self._record_eval(state, INITIAL, self._evaluate(self._initial_params(), scorer))
                self._save_state(state)
                self.log(f"[initial] eval {state['evals'][INITIAL]} ({time.perf_counter() - began:.0f}s)")
            for index, stage in enumerate(self.config.stages):
                if index < state["next_stage"] or (only_stage is not None and stage.name != only_stage):
                    continue
                self._run_stage(index, stage, state, scorer)
        finally:
            scorer.close()
        self._write_eval_table(state)
        summaries = self.summary_table(state)
        atomic_write_file(os.path.join(self.run_dir, "stage_summary.md"), lambda f: f.write(summaries + "\n"))
        self.log("\nper-stage training summary (mean over the first -> last tenth of each stage's steps):\n" + summaries)
        self.log("\nheld-out eval after each stage:\n" + self.eval_table(state))
        return state

    def _run_stage(self, index: int, stage: StageConfig, state: dict[str, Any], scorer: Scorer) -> None:
        final_dir = self._stage_dir("stage_finals", stage.name)
        began = time.perf_counter()
        if os.path.isdir(final_dir):  # trained before an interruption of its evaluation
            params = self._params_of(stage.name)
        else:
            if index == 0:
                init = self._initial_params()
            else:
                previous = self.config.stages[index - 1].name
                if not os.path.isdir(self._stage_dir("stage_finals", previous)):
                    raise PipelineConfigError(f"stage {stage.name!r} starts from stage {previous!r}, which has not "
                                              "finished; run it first")
                init = self._params_of(previous)
            trainer = self._trainer(stage, state)
            self.log(f"[{stage.name}] {stage.algorithm}, {stage.steps} steps")
            params, summary = trainer.run(init)
            summary["time/stage_seconds"] = time.perf_counter() - began
            state["stage_summaries"][stage.name] = summary
            save_params(self.cfg, params, final_dir, overwrite=True)
        train_seconds = time.perf_counter() - began
        began = time.perf_counter()
        scores = self._evaluate(params, scorer)
        self._record_eval(state, stage.name, scores)
        if index == 0 and state["spread"] is None and self.eval_sets and self.config.eval.spread_seeds > 1:
            runs = [scores] + [self._evaluate(params, scorer, seed=self.config.eval.seed + 1000 * k)
                               for k in range(1, self.config.eval.spread_seeds)]
            state["spread"] = {d: float(max(r[d] for r in runs) - min(r[d] for r in runs)) for d in scores}
        state["next_stage"] = index + 1
        self._save_state(state)
        self._write_eval_table(state)
        summary = state["stage_summaries"].get(stage.name, {})
        shown = {k: round(v, 4) for k, v in summary.items() if k.split("/")[0] in ("reward", "loss", "nll",
                                                                                   "reverse_kl_estimate")}
        self.log(f"[{stage.name}] trained in {train_seconds:.0f}s; eval {scores} "
                 f"({time.perf_counter() - began:.0f}s); first/last-tenth means: {shown}")

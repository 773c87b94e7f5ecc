"""Bad pipeline input fails before any training with a `PipelineConfigError` naming the offending thing; a
non-finite loss stops a stage with `TrainingDivergedError` naming the step, keeping the last good checkpoint."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.checkpoint import save_params
from nemotron_jax.model.params import abstract_params
from nemotron_jax.training import (
    CascadePipeline,
    GRPOConfig,
    ModelSource,
    MOPDConfig,
    OptimizerConfig,
    PipelineConfig,
    PipelineConfigError,
    SFTConfig,
    StageConfig,
    TrainingDivergedError,
    TrainState,
    make_optimizer,
)
from nemotron_jax.training.checkpointing import StageCheckpoints
from nemotron_jax.training import trainers
from nemotron_jax.training.trainers import SFTTrainer
from tests.training.conftest import SFT_SETTINGS, VOWEL_DOMAIN, sft_records, vowel_records, write_jsonl

GRPO = GRPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, max_prompt_length=64)
MOPD = MOPDConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, max_prompt_length=64)


@pytest.fixture(scope="module")
def tokenizer_file(task_tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    task_tokenizer.save(path)
    return path


def pipeline(tiny_cfg, tokenizer_file, stages, model=None, **kwargs) -> PipelineConfig:
    return PipelineConfig(stages=tuple(stages), model=model or ModelSource(config=tiny_cfg), tokenizer=tokenizer_file,
                          progress=False, **kwargs)


def rl_stage(name, files, **kwargs):
    return StageConfig(name=name, algorithm="grpo", steps=2, data_files=tuple(files), grpo=GRPO, enable_thinking=False,
                       **kwargs)


def mopd_stage(files, teachers):
    return StageConfig(name="distill", algorithm="mopd", steps=2, data_files=tuple(files), mopd=MOPD,
                       teachers=teachers, enable_thinking=False)


def assert_fails_before_training(config: PipelineConfig, run_dir, *fragments: str) -> str:
    """`run()` raises PipelineConfigError whose message holds every fragment; nothing was trained or saved."""
    with pytest.raises(PipelineConfigError) as error:
        CascadePipeline(config, str(run_dir), log=lambda _: None).run()
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    for written in ("checkpoints", "stage_finals", "metrics.jsonl", "pipeline_state.json"):
        assert not os.path.exists(os.path.join(run_dir, written)), written
    return message


def test_empty_prompt_set(tiny_cfg, tokenizer_file, tmp_path):
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [])
    assert_fails_before_training(pipeline(tiny_cfg, tokenizer_file, [rl_stage("rl", [empty])]), tmp_path / "run",
                                 "'rl'", empty, "empty")


def test_empty_eval_set(tiny_cfg, tokenizer_file, vowel_files, tmp_path):
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [])
    config = pipeline(tiny_cfg, tokenizer_file, [rl_stage("rl", [vowel_files["rl"]])], eval_files={VOWEL_DOMAIN: empty})
    assert_fails_before_training(config, tmp_path / "run", f"eval_files[{VOWEL_DOMAIN!r}]", empty)


def test_unknown_verifier(tiny_cfg, tokenizer_file, tmp_path):
    records = vowel_records(4)
    records[2]["agent_ref"] = "no_such_verifier_simple_agent"
    path = write_jsonl(str(tmp_path / "rl.jsonl"), records)
    assert_fails_before_training(pipeline(tiny_cfg, tokenizer_file, [rl_stage("rl", [path])]), tmp_path / "run",
                                 "'rl'", "no_such_verifier")


def test_missing_teacher_checkpoint(tiny_cfg, tokenizer_file, vowel_files, tmp_path):
    missing = str(tmp_path / "no_teacher_here")
    config = pipeline(tiny_cfg, tokenizer_file, [mopd_stage([vowel_files["rl"]], {VOWEL_DOMAIN: missing})])
    assert_fails_before_training(config, tmp_path / "run", "'distill'", VOWEL_DOMAIN, missing, "does not exist")


def test_teacher_with_another_vocabulary(tiny_cfg, tiny_params, tokenizer_file, vowel_files, tmp_path):
    extra = 112
    other_cfg = tiny_cfg.replace(vocab_size=tiny_cfg.vocab_size + extra)
    # The tiny params with a larger vocabulary (padded embedding and head): no second init to compile.
    other = dict(tiny_params)
    other["embeddings"] = {"embedding": jnp.pad(tiny_params["embeddings"]["embedding"], ((0, extra), (0, 0)))}
    other["lm_head"] = {"kernel": jnp.pad(tiny_params["lm_head"]["kernel"], ((0, 0), (0, extra)))}
    teacher = str(tmp_path / "other_vocab_teacher")
    save_params(other_cfg, other, teacher)
    config = pipeline(tiny_cfg, tokenizer_file, [mopd_stage([vowel_files["rl"]], {VOWEL_DOMAIN: teacher})])
    assert_fails_before_training(config, tmp_path / "run", "'distill'", teacher, str(other_cfg.vocab_size),
                                 str(tiny_cfg.vocab_size))


def test_missing_teacher_domain_and_not_earlier_stage(tiny_cfg, tokenizer_file, vowel_files, tmp_path):
    config = pipeline(tiny_cfg, tokenizer_file, [mopd_stage([vowel_files["rl"]], {})])
    assert_fails_before_training(config, tmp_path / "run1", "'distill'", "no teacher", VOWEL_DOMAIN)
    later = rl_stage("later", [vowel_files["rl"]])
    config = pipeline(tiny_cfg, tokenizer_file, [mopd_stage([vowel_files["rl"]], {VOWEL_DOMAIN: "later"}), later])
    assert_fails_before_training(config, tmp_path / "run2", "'distill'", "'later'", "not an earlier stage")


# ------------------------------------------------------------------------------------ divergence


def sft_stage(files, learning_rate, steps=3):
    return StageConfig(name="sft", algorithm="sft", steps=steps, data_files=tuple(files),
                       optimizer=OptimizerConfig(learning_rate=learning_rate), sft=SFTConfig(**SFT_SETTINGS),
                       enable_thinking=False)


def stage_checkpoints(run_dir: str) -> StageCheckpoints:
    return StageCheckpoints(os.path.join(run_dir, "checkpoints", "sft"), save_every=1, keep=2, async_save=False)


def restore_state(run_dir: str, cfg, step: int):
    checkpoints = stage_checkpoints(run_dir)
    try:
        assert checkpoints.latest_step() == step
        template = abstract_params(cfg)
        optimizer = make_optimizer(OptimizerConfig(), template)
        abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer, 0), template)
        return checkpoints.restore(step, abstract)
    finally:
        checkpoints.close()


@pytest.fixture(scope="module")
def params_source(tiny_cfg, tiny_params, tmp_path_factory):
    """The tiny params as a `save_params` checkpoint (a run from `ModelSource(config=...)` compiles
    `init_params` again, for every run)."""
    path = str(tmp_path_factory.mktemp("params") / "tiny")
    save_params(tiny_cfg, tiny_params, path)
    return ModelSource(params_checkpoint=path)


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(str(tmp_path / "sft.jsonl"), sft_records(32))


def test_nan_mid_stage_keeps_last_good_checkpoint(tiny_cfg, tiny_params, tokenizer_file, params_source, sft_data,
                                                  tmp_path, monkeypatch):
    """NaN params before step 2 (as a bad batch would leave them): the stage stops naming step 2; step 1's
    checkpoint is still there, finite and loadable, and a rerun resumes from it and finishes."""
    original = SFTTrainer.train_step

    def poisoned(self, state):
        if int(state.step) == 1:
            kernel = state.params["lm_head"]["kernel"]
            state = state.replace(params={**state.params, "lm_head": {"kernel": kernel.at[0, 5].set(np.nan)}})
        return original(self, state)

    run_dir = str(tmp_path / "run")
    config = pipeline(tiny_cfg, tokenizer_file, [sft_stage([sft_data], 1e-3)], model=params_source,
                      checkpoint_every=1)
    monkeypatch.setattr(SFTTrainer, "train_step", poisoned)
    with pytest.raises(TrainingDivergedError) as error:
        CascadePipeline(config, run_dir, log=lambda _: None).run()
    message = str(error.value)
    assert "'sft'" in message and "at step 2" in message and "last good checkpoint is step 1" in message, message
    assert not os.path.exists(os.path.join(run_dir, "stage_finals", "sft"))

    state, extra = restore_state(run_dir, tiny_cfg, 1)
    assert int(state.step) == 1 and "data" in extra
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    assert not np.array_equal(np.asarray(state.params["lm_head"]["kernel"]), np.asarray(tiny_params["lm_head"]["kernel"]))

    monkeypatch.setattr(SFTTrainer, "train_step", original)
    result = CascadePipeline(config, run_dir, log=lambda _: None).run()
    assert result["next_stage"] == 1 and os.path.isdir(os.path.join(run_dir, "stage_finals", "sft"))
    # The fresh state (restored params, new step counter and optimiser state), the poisoned one and the resumed
    # one (restored from the stage checkpoint) all ran one compilation of the update step.
    steps = [step for key, step in trainers._STEP_CACHE.items() if key[0] == "sft" and key[1] == tiny_cfg]
    assert len(steps) == 1 and steps[0]._cache_size() == 1


def test_infinite_learning_rate_is_caught_at_the_step_that_diverges(tiny_cfg, tokenizer_file, sft_data, tmp_path):
    """lr = inf: step 1's loss (of the initial params) is finite but its update is not. The stage stops at
    step 1 without saving the non-finite params (not one step late, with them saved as a "good" checkpoint).
    Starts from a random init (`ModelSource(config=...)`)."""
    run_dir = str(tmp_path / "run")
    config = pipeline(tiny_cfg, tokenizer_file, [sft_stage([sft_data], math.inf)], checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as error:
        CascadePipeline(config, run_dir, log=lambda _: None).run()
    message = str(error.value)
    assert "'sft'" in message and "at step 1" in message and "no checkpoint of this stage" in message, message
    assert "update_norm" in message
    checkpoints = stage_checkpoints(run_dir)
    try:
        assert checkpoints.latest_step() is None
    finally:
        checkpoints.close()


def test_nan_initial_params_diverge_at_step_one(tiny_cfg, tiny_params, tokenizer_file, sft_data, tmp_path):
    """NaN in the initial params: step 1 fails, and the error says no checkpoint of the stage was written."""
    params = {**tiny_params, "lm_head": {"kernel": tiny_params["lm_head"]["kernel"].at[0, 5].set(np.nan)}}
    source = str(tmp_path / "nan_params")
    save_params(tiny_cfg, params, source)
    run_dir = str(tmp_path / "run")
    config = pipeline(tiny_cfg, tokenizer_file, [sft_stage([sft_data], 1e-3)], model=ModelSource(params_checkpoint=source),
                      checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as error:
        CascadePipeline(config, run_dir, log=lambda _: None).run()
    message = str(error.value)
    assert "'sft'" in message and "at step 1" in message and "no checkpoint of this stage" in message, message
    assert not os.path.exists(os.path.join(run_dir, "stage_finals", "sft"))

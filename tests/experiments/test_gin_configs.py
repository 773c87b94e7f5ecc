"""gin configs and the `experiments.train` entry point: the Nemotron-Cascade 2 pipeline builds every stage with
the published settings, and bad bindings fail at start-up naming the offending name."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_gin_setup():
    # By path: the repository root stays off sys.path in the tests (see pytest.ini).
    spec = importlib.util.spec_from_file_location("_nj_gin_setup", os.path.join(REPO, "experiments", "gin_setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gin_setup():
    return _load_gin_setup()


def _train(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cascade2_pipeline_builds_every_stage_with_published_settings(gin_setup):
    gin_setup.parse([os.path.join(REPO, "configs/pipelines/nemotron_cascade2.gin")])
    config = gin_setup.build_pipeline()
    stages = {s.name: s for s in config.stages}
    assert list(stages) == ["sft", "if_rl", "multi_domain_rl", "mopd", "rlhf", "long_context_rl", "code_rl"]
    for stage in config.stages:
        stage.settings.validate()
        stage.optimizer.validate()
        assert stage.data_files, stage.name
    assert config.model.hf_checkpoint and config.model.config is None
    assert stages["sft"].algorithm == "sft" and stages["sft"].optimizer.learning_rate == 5e-5
    assert stages["sft"].optimizer.schedule == "cosine" and stages["sft"].optimizer.warmup_steps == 200
    for name in ("if_rl", "multi_domain_rl", "rlhf", "long_context_rl", "code_rl"):
        stage = stages[name]
        assert stage.algorithm == "grpo"
        assert (stage.grpo.prompts_per_step, stage.grpo.samples_per_prompt) == (128, 16), name
        assert stage.optimizer.learning_rate == 3e-6, name
        assert stage.grpo.ratio == "on_policy" and stage.grpo.temperature == 1.0, name
        assert stage.grpo.kl_coef == (0.03 if name == "rlhf" else 0.0), name
    assert stages["if_rl"].grpo.max_new_tokens == 49152 and stages["if_rl"].grpo.dynamic_filtering
    assert stages["code_rl"].grpo.max_new_tokens == 120832 and stages["code_rl"].grpo.top_p == 0.95
    mopd = stages["mopd"]
    assert mopd.algorithm == "mopd" and mopd.optimizer.learning_rate == 2e-6
    assert (mopd.optimizer.warmup_steps, mopd.optimizer.warmup_init_lr) == (30, 2e-7)
    assert (mopd.mopd.is_low, mopd.mopd.is_high) == (0.5, 2.0)
    assert mopd.teachers["math"] == "sft"


def test_demo_pipeline_builds(gin_setup):
    gin_setup.parse([os.path.join(REPO, "configs/pipelines/demo.gin")])
    config = gin_setup.build_pipeline()
    assert [s.name for s in config.stages] == ["sft", "if_rl", "math_rl", "code_rl", "mopd"]
    assert config.model.config is not None and config.model.vocab_from_tokenizer
    assert set(config.eval_files) == {"math", "instruction_following", "code"}


@pytest.mark.parametrize("binding, named", [
    ("sft/nj.StageConfig.stpes = 3", "stpes"),
    ("nj.GRPOCofnig.kl_coef = 0.1", "nj.GRPOCofnig"),
])
def test_misspelled_binding_fails_at_start_up_naming_it(binding, named, tmp_path):
    result = _train(f"--gin_bindings={binding}", f"--run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "configuration error" in result.stderr and named in result.stderr
    assert binding in result.stderr
    assert not os.path.exists(tmp_path / "run"), "nothing may be written before the config parses"


def test_unknown_gin_file_fails_naming_it(tmp_path):
    result = _train("--gin_file=configs/pipelines/no_such_pipeline.gin", f"--run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "no_such_pipeline.gin" in result.stderr


def test_validate_only_prepares_and_validates_the_demo_without_training(tmp_path):
    run_dir = tmp_path / "run"
    result = _train("--validate_only", f"--run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline valid: 5 stages" in result.stdout
    assert (run_dir / "tokenizer.model").exists() and (run_dir / "operative_config.gin").exists()
    assert "sft/StageConfig.steps" in (run_dir / "operative_config.gin").read_text()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "stage_finals").exists()

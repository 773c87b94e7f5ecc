"""training layer of nemotron-jax: train state, optimisers, one jitted step per algorithm (SFT, GRPO, MOPD),
evaluation, checkpoints, metrics, and the Cascade pipeline that chains stages (see DESIGN.md).

    from nemotron_jax import training
    pipeline = training.CascadePipeline(training.PipelineConfig(...), run_dir)
    pipeline.run()

Building blocks for your own loop: `TrainState`, `OptimizerConfig` / `make_optimizer`, `make_train_step`
(gradient accumulation with global normalisers), `policy_forward`, `make_sft_loss`, `grpo.make_grpo_loss`,
`mopd.make_mopd_loss`, `sample_rollouts` / `training_arrays`, `evaluate`.
"""

from nemotron_jax.training.cascade import (
    CascadePipeline,
    ModelSource,
    PipelineConfig,
    PipelineConfigError,
    StageConfig,
)
from nemotron_jax.training.evaluation import EvalConfig, evaluate
from nemotron_jax.training.forward import ForwardOutput, expert_counts, load_balancing_loss, policy_forward
from nemotron_jax.training.grpo import GRPOConfig, collect_groups, groups_with_signal, make_grpo_loss
from nemotron_jax.training.mopd import MOPDConfig, make_mopd_loss
from nemotron_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from nemotron_jax.training.rollout import Rollouts, sample_rollouts, training_arrays
from nemotron_jax.training.scoring import Scorer
from nemotron_jax.training.state import TrainState
from nemotron_jax.training.trainers import (
    Preempted,
    SFTConfig,
    TrainingDivergedError,
    make_sft_loss,
)
from nemotron_jax.training.update import LossAux, make_train_step

__all__ = [
    "CascadePipeline", "EvalConfig", "ForwardOutput", "GRPOConfig", "LossAux", "MOPDConfig", "ModelSource",
    "OptimizerConfig", "PipelineConfig", "PipelineConfigError", "Preempted", "Rollouts", "SFTConfig", "Scorer",
    "StageConfig", "TrainState", "TrainingDivergedError", "collect_groups", "evaluate", "expert_counts",
    "groups_with_signal", "learning_rate_schedule", "load_balancing_loss", "make_grpo_loss", "make_mopd_loss",
    "make_optimizer", "make_sft_loss", "make_train_step", "policy_forward", "sample_rollouts", "training_arrays",
]

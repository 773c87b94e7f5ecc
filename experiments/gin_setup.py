"""gin wiring for the experiments: the library's config dataclasses and factories as gin configurables.

Library code never imports gin (DESIGN.md); this module registers, under the gin module `nj`, exactly what a
pipeline file binds:

    nj.model_config(preset, **overrides)   -> ModelConfig (a preset with field overrides)
    nj.ModelSource, nj.PipelineConfig, nj.StageConfig, nj.EvalConfig
    nj.OptimizerConfig, nj.SFTConfig, nj.GRPOConfig, nj.MOPDConfig
    nj.prepare_demo_workspace               (the demo's data + tokenizer, written into the run directory)
    nj.pipeline(config)                     -> the PipelineConfig a run uses (the one binding train.py reads)

Stages are scoped references, one scope per stage: `@sft/nj.StageConfig()` with `sft/nj.StageConfig.name =
'sft'`, `sft/nj.OptimizerConfig.learning_rate = ...` (a scope applies to every configurable called while the
scoped one is built). `parse` fails before any work on unknown configurables or parameters, naming them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import gin

from nemotron_jax.data import synthetic_tasks
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.training import (
    EvalConfig,
    GRPOConfig,
    MOPDConfig,
    ModelSource,
    OptimizerConfig,
    PipelineConfig,
    SFTConfig,
    StageConfig,
)

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
GIN_MODULE = "nj"


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` preset ("tiny", "nano_30b_a3b") with field overrides."""
    return ModelConfig.preset(preset, **overrides)


def pipeline(config: PipelineConfig) -> PipelineConfig:
    """The pipeline a run executes (`nj.pipeline.config = @nj.PipelineConfig()` in a pipeline file)."""
    return config


@functools.cache
def _register() -> Any:
    """Registers the configurables once per process; -> the `nj.pipeline` configurable."""
    for target in (ModelSource, PipelineConfig, StageConfig, EvalConfig, OptimizerConfig, SFTConfig, GRPOConfig,
                   MOPDConfig):
        gin.external_configurable(target, module=GIN_MODULE)
    gin.external_configurable(synthetic_tasks.prepare_demo_workspace, module=GIN_MODULE)
    gin.configurable(model_config, module=GIN_MODULE)
    return gin.configurable(pipeline, module=GIN_MODULE)


def parse(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses gin files (paths relative to the working directory or to `configs/`) and bindings.

    Raises ValueError naming the file or binding if a configurable or parameter is unknown (gin raises as it
    parses, so nothing has run yet).
    """
    _register()
    gin.clear_config()
    gin.add_config_file_search_path(CONFIG_ROOT)
    gin.add_config_file_search_path(os.path.dirname(CONFIG_ROOT))
    for path in gin_files:
        candidates = [path, os.path.join(CONFIG_ROOT, path), os.path.join(os.path.dirname(CONFIG_ROOT), path)]
        if not any(os.path.isfile(c) for c in candidates):
            raise ValueError(f"gin file {path!r} not found (looked in the working directory, configs/ and the "
                             "repository root)")
        try:
            gin.parse_config_file(path)
        except (ValueError, OSError) as error:
            raise ValueError(f"gin file {path!r}: {error}") from error
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except ValueError as error:
            raise ValueError(f"gin binding {binding!r}: {error}") from error


def build_pipeline() -> PipelineConfig:
    """The `PipelineConfig` bound to `nj.pipeline.config` (every stage built, nothing run)."""
    config = _register()()
    if not isinstance(config, PipelineConfig):
        raise ValueError(f"nj.pipeline.config must be a PipelineConfig, got {type(config).__name__}")
    return config

r"""Runs a Cascade pipeline (or one stage of it) from gin files.

    python -m experiments.train                                   # the embedded demo (configs/pipelines/demo.gin)
    python -m experiments.train --gin_file=configs/pipelines/nemotron_cascade2.gin --run_dir=/ckpt/run1
    python -m experiments.train --gin_bindings="if_rl/nj.StageConfig.steps = 5" --stage=if_rl
    python -m experiments.train --validate_only                  # build every stage, check data/teachers, stop

Re-running the same command resumes where the run stopped (stage, step, optimiser, RNG, data position). The
operative gin config is written to `<run_dir>/operative_config.gin`. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments import distributed

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", ["configs/pipelines/demo.gin"], "gin files, in order (relative to the "
                          "working directory or the repository).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings applied after the files, e.g. "
                          "\"sft/nj.StageConfig.steps = 10\".")
flags.DEFINE_string("run_dir", None, "Run directory: checkpoints, metrics, eval tables (default: "
                    "runs/<pipeline file name>).")
flags.DEFINE_string("stage", None, "Run only this stage (its predecessor must have finished).")
flags.DEFINE_bool("validate_only", False, "Build the pipeline, validate data, rewards and teachers, then stop.")
flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "nemotron_jax", "xla"),
                    "JAX persistent compilation cache ('' disables): a re-run or a resume skips recompiling.")


def _default_run_dir() -> str:
    name = os.path.splitext(os.path.basename(FLAGS.gin_file[-1]))[0]
    return os.path.join("runs", name)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        distributed.initialize()  # --coordinator_address/--num_processes/--process_id or --distributed=auto
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    import jax

    if jax.process_count() > 1:
        # The stage trainers keep their state on one device; sharded multi-process steps are
        # training.update.make_train_step(mesh=...), as run by experiments.sharded_sft_step.
        print("configuration error: the Cascade pipeline runs in one process (its trainers do not shard their state "
              f"over a mesh yet); got {jax.process_count()} processes", file=sys.stderr)
        return 2

    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    import gin

    from experiments import gin_setup
    from nemotron_jax.training import CascadePipeline, PipelineConfigError, Preempted

    try:
        gin_setup.parse(FLAGS.gin_file, FLAGS.gin_bindings)
        config = gin_setup.build_pipeline()
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    run_dir = FLAGS.run_dir or _default_run_dir()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    pipeline = CascadePipeline(config, run_dir)
    try:
        if FLAGS.validate_only:
            pipeline.setup()
            print(f"pipeline valid: {len(config.stages)} stages {[s.name for s in config.stages]}")
            return 0
        pipeline.run(only_stage=FLAGS.stage)
    except PipelineConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"preempted: {stop}; re-run the same command to resume", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    app.run(main)

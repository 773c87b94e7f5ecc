r"""SFT steps of a model on a device mesh, on one host or many: the multi-host smoke test.

    # one process, 8 devices
    python -m experiments.sharded_sft_step --mesh=data=2,expert=4 --data_file=sft.jsonl --tokenizer=tok.model
    # two processes on one machine (run both; 4 CPU devices each)
    python -m experiments.sharded_sft_step --mesh=data=2,expert=4 ... \
        --coordinator_address=localhost:12355 --num_processes=2 --process_id=0   # and --process_id=1

Each process reads its share of the records (the data pipeline shards by `jax.process_index()`), packs its
`--rows_per_shard` rows per data shard, and the rows of all processes form the global batch
(`parallel.global_batch`). A single process can stand in for several (`--data_shards=N` reads shards 0..N-1 and
stacks them in order), which gives the same global batch as N processes. Params are created directly sharded
(`parallel.init_sharded_params`), the step is `training.update.make_train_step(mesh=...)` (SFT loss, AdamW).
Process 0 writes the loss of every step and the final params to `--out` (.npz).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", "data=2,expert=4", "Mesh axes (see nemotron_jax.parallel.MeshConfig.from_string).")
flags.DEFINE_string("data_file", None, "SFT records (JSONL / Parquet with `messages`).", required=True)
flags.DEFINE_string("tokenizer", None, "SentencePiece .model file or directory with tokenizer.json.", required=True)
flags.DEFINE_string("preset", "tiny", "ModelConfig preset (vocabulary sized to the tokenizer).")
flags.DEFINE_multi_string("config_override", [], "ModelConfig field=value overrides (ints, floats or strings).")
flags.DEFINE_integer("rows_per_shard", 4, "Packed rows per data shard (process) and step.")
flags.DEFINE_integer("row_length", 64, "Tokens per packed row.")
flags.DEFINE_integer("data_shards", None, "Data shards this run stands for (default: the process count).")
flags.DEFINE_integer("steps", 1, "Optimizer steps.")
flags.DEFINE_float("learning_rate", 1e-2, "AdamW learning rate.")
flags.DEFINE_float("adam_eps", 1e-8, "AdamW epsilon (Adam's first step, g / (|g| + eps), turns float32 rounding "
                   "differences of gradients near eps into large update differences).")
flags.DEFINE_integer("seed", 0, "Init seed.")
flags.DEFINE_string("out", None, "Process 0 writes {'loss': [steps], 'params/<path>': array} here (.npz).")


def _override(cfg, items):
    changes = {}
    for item in items:
        name, _, text = item.partition("=")
        for cast in (int, float, str):
            try:
                changes[name] = cast(text)
                break
            except ValueError:
                continue
    return cfg.replace(**changes)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()
    import jax
    import numpy as np
    from flax import traverse_util
    from jax.experimental import multihost_utils

    from nemotron_jax import parallel
    from nemotron_jax.data import SFTDataConfig, open_source, sft_dataset
    from nemotron_jax.model.config import ModelConfig
    from nemotron_jax.training.cascade import load_tokenizer
    from nemotron_jax.training.forward import moe_layer_names
    from nemotron_jax.training.optimizer import OptimizerConfig, make_optimizer
    from nemotron_jax.training.state import TrainState
    from nemotron_jax.training.trainers import SFTConfig, make_sft_loss
    from nemotron_jax.training.update import make_train_step

    tokenizer = load_tokenizer(FLAGS.tokenizer)
    cfg = ModelConfig.preset(FLAGS.preset, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                             eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    try:
        cfg = _override(cfg, FLAGS.config_override)
        mesh = parallel.make_mesh(FLAGS.mesh)
        parallel.validate_mesh(cfg, mesh)
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2

    processes, process = jax.process_count(), jax.process_index()
    data_shards = FLAGS.data_shards or processes
    if data_shards % processes:
        print(f"configuration error: --data_shards={data_shards} is not a multiple of {processes} processes",
              file=sys.stderr)
        return 2
    per_process = data_shards // processes
    data_config = SFTDataConfig(row_length=FLAGS.row_length, batch_size=FLAGS.rows_per_shard, enable_thinking=False,
                                drop_remainder=True, seed=0, num_epochs=None, num_threads=1)
    source = open_source(FLAGS.data_file)
    iterators = [iter(sft_dataset(source, tokenizer, data_config, shard_index=process * per_process + i,
                                  shard_count=data_shards)) for i in range(per_process)]

    params = parallel.init_sharded_params(cfg, jax.random.key(FLAGS.seed), mesh)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=FLAGS.learning_rate, eps=FLAGS.adam_eps), params)
    create = lambda p: TrainState.create(p, optimizer, FLAGS.seed)  # noqa: E731
    state_shardings = parallel.tree_shardings(jax.eval_shape(create, params), params, mesh)
    state = jax.jit(create, out_shardings=state_shardings)(params)
    step = make_train_step(make_sft_loss(cfg, SFTConfig()), optimizer, moe_layers=moe_layer_names(cfg),
                           mesh=mesh, state_shardings=state_shardings)
    names = ("tokens", "targets", "segment_ids", "loss_mask")
    losses = []
    for _ in range(FLAGS.steps):
        batches = [next(iterator) for iterator in iterators]
        local = {name: np.concatenate([np.asarray(b[name]) for b in batches]) for name in names}
        # Global normalisers: the counts of every process's rows.
        counts = multihost_utils.process_allgather(
            np.asarray([local["loss_mask"].sum(), (local["segment_ids"] > 0).sum()], np.float32))
        counts = np.asarray(counts).reshape(-1, 2).sum(0)
        normalizers = {"num_tokens": np.float32(counts[0]), "num_input_tokens": np.float32(counts[1])}
        state, metrics = step(state, parallel.global_batch(local, mesh), normalizers,
                              np.float32(FLAGS.learning_rate))
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))  # replicated
        print(f"process {process}/{processes}: step {int(np.asarray(state.step.addressable_data(0)))} "
              f"loss {losses[-1]:.7f}", flush=True)
    gathered = multihost_utils.process_allgather(state.params, tiled=True)
    if FLAGS.out and process == 0:
        flat = {"params/" + "/".join(path): np.asarray(value)
                for path, value in traverse_util.flatten_dict(gathered).items()}
        np.savez(FLAGS.out, loss=np.asarray(losses), **flat)
    return 0


if __name__ == "__main__":
    app.run(main)

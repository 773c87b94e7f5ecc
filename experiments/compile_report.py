r"""Ahead-of-time memory and communication report of a training step and a decode step on a device mesh.

    python -m experiments.compile_report --gin_file=configs/models/nano_30b_a3b.gin --mesh=fsdp=8,expert=8

Nothing is allocated: the params, optimizer state, batch and decode cache are `jax.ShapeDtypeStruct`s
(`jax.eval_shape`), the steps are lowered and compiled for the mesh (on a CPU, on as many fake CPU devices as
the mesh has: `--xla_force_host_platform_device_count`), and the report reads the compiled executables:

- per-device bytes of the params and the optimizer state (their shards under the sharding rules);
- `compiled.memory_analysis()`: arguments, outputs, aliased (donated) bytes, and temporaries (activations
  kept for the backward pass plus scratch); peak = arguments + outputs - aliased + temporaries;
- the collective ops of the partitioned HLO (all-gather, all-reduce, reduce-scatter, all-to-all,
  ragged-all-to-all, collective-permute): count and bytes of their results per device, as written in the
  program (an op inside a loop, e.g. the micro-batch or Mamba-chunk scans, is counted once).

The training step is the SFT step of `training/update.py` (forward, backward through the chunked
vocabulary log-probs, AdamW update with gradient clipping), with Adam moments in `--optimizer_state_dtype`.
The decode step is one token of `NemotronH.forward_cached` against a `--decode_cache_length` cache.
A model gin file that points at a Hugging Face checkpoint not on this machine uses `--preset` instead (for
`nano_30b_a3b.gin`: the `nano_30b_a3b` preset, the released checkpoint's config).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import app, flags

from experiments import distributed

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", ["configs/models/nano_30b_a3b.gin"], "gin files with the model "
                          "(nj.ModelSource bindings).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings applied after the files.")
flags.DEFINE_string("preset", "nano_30b_a3b", "ModelConfig preset used when the gin file's HF checkpoint is not "
                    "on disk.")
flags.DEFINE_string("mesh", "fsdp=8,expert=8", "Mesh axes, e.g. 'fsdp=8,expert=8' or 'data=2,expert=4,tensor=2'.")
flags.DEFINE_integer("batch_per_device", 1, "Training rows per device (rows are split over data x fsdp x expert).")
flags.DEFINE_integer("seq_len", 8192, "Training tokens per row.")
flags.DEFINE_integer("decode_batch_per_device", 1, "Decode rows per device.")
flags.DEFINE_integer("decode_cache_length", 8192, "Positions in the decode cache.")
flags.DEFINE_string("optimizer_state_dtype", "float32", "dtype of the Adam moments ('param' = the params' dtype).")
flags.DEFINE_string("remat_policy", "nothing_saveable", "ModelConfig.remat_policy for the training step, if the "
                    "model has that field ('none' keeps every activation).")
flags.DEFINE_enum("transport", "auto", ["auto", "ragged_all_to_all", "all_to_all"], "Expert-parallel transport "
                  "(auto: all_to_all on CPU, where ragged_all_to_all does not compile).")
flags.DEFINE_multi_string("config_override", [], "ModelConfig field=value changes (ints, floats, bools or "
                          "strings), e.g. --config_override=attention_backend=blockwise.")
flags.DEFINE_list("steps", ["train", "decode"], "Which steps to compile.")
flags.DEFINE_string("json_out", None, "Also write the report as JSON here.")
flags.DEFINE_string("hlo_dir", None, "Write each compiled (partitioned, per-device) HLO module here.")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES) +
                     r")(?P<suffix>-start|-done)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} over the HLO module text (bytes of each op's result; async pairs once)."""
    stats: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        match = _HLO_OP.match(line)
        if not match or match.group("suffix") == "-done":
            continue
        shapes = [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _SHAPE.findall(match["type"])]
        if match.group("suffix") == "-start" and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2:]  # (operands, results) of an async start: count the results
        size = sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes)
        entry = stats.setdefault(match["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return stats


def _parse_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def model_config():
    import gin

    from experiments import gin_setup
    from nemotron_jax.checkpoint.hf import config_from_hf
    from nemotron_jax.model.config import ModelConfig

    gin_setup.parse(FLAGS.gin_file, FLAGS.gin_bindings)
    source = gin.get_configurable(f"{gin_setup.GIN_MODULE}.ModelSource")()
    if source.config is not None:
        return source.config, "gin ModelSource.config"
    if source.hf_checkpoint is not None:
        if os.path.isfile(os.path.join(source.hf_checkpoint, "config.json")):
            return config_from_hf(source.hf_checkpoint), f"{source.hf_checkpoint}/config.json"
        return ModelConfig.preset(FLAGS.preset), (f"preset {FLAGS.preset!r} ({source.hf_checkpoint} is not on "
                                                  "this machine)")
    raise ValueError("compile_report: ModelSource.params_checkpoint is not supported; bind config or hf_checkpoint")


def shard_bytes(tree, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _dump(compiled, name: str) -> None:
    if FLAGS.hlo_dir:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with open(os.path.join(FLAGS.hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())


def memory_report(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compile_train(cfg, mesh, report):
    import jax
    import jax.numpy as jnp

    from nemotron_jax import parallel
    from nemotron_jax.model.params import abstract_params
    from nemotron_jax.training.forward import moe_layer_names
    from nemotron_jax.training.optimizer import OptimizerConfig, make_optimizer
    from nemotron_jax.training.state import TrainState
    from nemotron_jax.training.trainers import SFTConfig, make_sft_loss
    from nemotron_jax.training.update import make_train_step

    params = abstract_params(cfg)
    param_shardings = parallel.validate_mesh(cfg, mesh)
    optimizer = make_optimizer(OptimizerConfig(), params)
    state_dtype = FLAGS.optimizer_state_dtype
    moments_like = params if state_dtype == "param" else jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, jnp.dtype(state_dtype)), params)
    state = jax.eval_shape(lambda p, m: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=optimizer.init(m), rng=jax.random.PRNGKey(0)),
                           params, moments_like)
    shardings = parallel.tree_shardings(state, params, mesh)
    rows = FLAGS.batch_per_device * math.prod(parallel.mesh_axis_size(mesh, a) for a in parallel.batch_axes(mesh))
    batch = {name: jax.ShapeDtypeStruct((rows, FLAGS.seq_len), jnp.int32)
             for name in ("tokens", "targets", "segment_ids", "loss_mask")}
    parallel.check_batch((rows, FLAGS.seq_len), mesh)
    normalizers = {name: jax.ShapeDtypeStruct((), jnp.float32) for name in ("num_tokens", "num_input_tokens")}
    step = make_train_step(make_sft_loss(cfg, SFTConfig()), optimizer, moe_layers=moe_layer_names(cfg),
                           mesh=mesh, state_shardings=shardings)
    began = time.perf_counter()
    lowered = step.lower(state, batch, normalizers, jax.ShapeDtypeStruct((), jnp.float32))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    _dump(compiled, "train")
    report["train"] = {
        "global_batch": [rows, FLAGS.seq_len],
        "params_bytes_per_device": shard_bytes(state.params, param_shardings),
        "optimizer_bytes_per_device": shard_bytes(state.opt_state, shardings.opt_state),
        "batch_bytes_per_device": 4 * 4 * FLAGS.batch_per_device * FLAGS.seq_len,
        "memory": memory_report(compiled),
        "collectives": collective_stats(compiled.as_text()),
        "lower_s": round(lowered_at - began, 1),
        "compile_s": round(done - lowered_at, 1),
    }


def compile_decode(cfg, mesh, report):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nemotron_jax import parallel
    from nemotron_jax.model.nemotron_h import NemotronH, init_cache
    from nemotron_jax.model.params import abstract_params

    params = abstract_params(cfg)
    param_shardings = parallel.validate_mesh(cfg, mesh)
    rows = FLAGS.decode_batch_per_device * math.prod(parallel.mesh_axis_size(mesh, a)
                                                     for a in parallel.batch_axes(mesh))
    cache = jax.eval_shape(lambda: init_cache(cfg, rows, FLAGS.decode_cache_length))
    row_split = parallel.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    cache_shardings = jax.tree.map(lambda leaf: row_split if leaf.ndim and leaf.shape[0] == rows else replicated,
                                   cache)
    tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32)

    def decode(params, cache, tokens):
        return NemotronH(cfg).apply({"params": params}, tokens, cache, method=NemotronH.forward_cached)

    step = parallel.MeshJit(decode, mesh, in_shardings=(param_shardings, cache_shardings, row_split),
                            out_shardings=(row_split, cache_shardings), donate_argnums=(1,))
    began = time.perf_counter()
    lowered = step.lower(params, cache, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    _dump(compiled, "decode")
    report["decode"] = {
        "batch": rows,
        "cache_length": FLAGS.decode_cache_length,
        "params_bytes_per_device": shard_bytes(params, param_shardings),
        "cache_bytes_per_device": shard_bytes(cache, cache_shardings),
        "memory": memory_report(compiled),
        "collectives": collective_stats(compiled.as_text()),
        "lower_s": round(lowered_at - began, 1),
        "compile_s": round(done - lowered_at, 1),
    }


def print_report(report) -> None:
    print(f"model: {report['model']}  ({report['params']:,} params)")
    print(f"mesh: {report['mesh']}   expert transport: {report['transport']}   remat: {report['remat_policy']}")
    for name in ("train", "decode"):
        if name not in report:
            continue
        part = report[name]
        memory = part["memory"]
        print(f"\n== {name} step  (lower {part['lower_s']} s, compile {part['compile_s']} s)")
        if name == "train":
            print(f"  global batch {part['global_batch'][0]} x {part['global_batch'][1]} tokens")
            print(f"  params (per device)           {_gib(part['params_bytes_per_device'])}")
            print(f"  optimizer state (per device)  {_gib(part['optimizer_bytes_per_device'])}")
        else:
            print(f"  batch {part['batch']}, cache {part['cache_length']} positions")
            print(f"  params (per device)           {_gib(part['params_bytes_per_device'])}")
            print(f"  decode cache (per device)     {_gib(part['cache_bytes_per_device'])}")
        print(f"  arguments                     {_gib(memory['argument'])}")
        print(f"  outputs                       {_gib(memory['output'])}   (aliased with arguments "
              f"{_gib(memory['alias']).strip()})")
        print(f"  temporaries (activations)     {_gib(memory['temp'])}")
        print(f"  peak per device               {_gib(memory['peak'])}")
        print("  collectives (per device, as written in the program):")
        for op, entry in sorted(part["collectives"].items()):
            print(f"    {op:20s} {entry['count']:6d} ops  {_gib(entry['bytes'])}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nemotron_jax.parallel.mesh import MeshConfig

    mesh_config = MeshConfig.from_string(FLAGS.mesh)
    devices = math.prod(size for _, size in mesh_config.axes)
    if FLAGS.coordinator_address is None and FLAGS.distributed == "off":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    distributed.initialize()
    import dataclasses

    import jax

    from nemotron_jax import parallel
    from nemotron_jax.model.params import count_params

    try:
        cfg, origin = model_config()
        changes = {"moe_ep_transport": FLAGS.transport}
        if any(f.name == "remat_policy" for f in dataclasses.fields(cfg)):
            changes["remat_policy"] = FLAGS.remat_policy
        for item in FLAGS.config_override:
            name, _, text = item.partition("=")
            changes[name] = _parse_value(text)
        cfg = cfg.replace(**changes)
        mesh = parallel.make_mesh(mesh_config)
        parallel.validate_mesh(cfg, mesh)
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    report = {
        "config_overrides": list(FLAGS.config_override),
        "model": origin, "params": count_params(cfg), "mesh": parallel.describe(mesh),
        "devices": len(jax.devices()), "platform": jax.default_backend(),
        "transport": parallel.resolve_transport(FLAGS.transport),
        "remat_policy": getattr(cfg, "remat_policy", "none (ModelConfig has no remat_policy)"),
        "optimizer_state_dtype": FLAGS.optimizer_state_dtype, "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
    }
    began = time.perf_counter()
    if "train" in FLAGS.steps:
        compile_train(cfg, mesh, report)
    if "decode" in FLAGS.steps:
        compile_decode(cfg, mesh, report)
    report["total_s"] = round(time.perf_counter() - began, 1)
    print_report(report)
    print(f"\ntotal {report['total_s']} s")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(main)

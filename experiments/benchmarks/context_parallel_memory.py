"""Per-device memory of a forward+backward pass with context parallelism, compiled ahead of time.

    python -m experiments.benchmarks.context_parallel_memory --out=/tmp/cp_memory.json \
        --config=nano_30b_a3b --tokens=262144 --mesh=expert=8,context=8 \
        --override=scan_layers=true --override=remat_policy=nothing_saveable

Lowers and compiles (abstract shapes: nothing is allocated) the gradient of the mean token log-prob of one
packed row of `--tokens` tokens per data shard, w.r.t. all parameters, on a mesh of fake CPU devices whose
`context` axis splits each row (`nemotron_jax.parallel.context.context_parallel`). Parameters are bfloat16 as
in the preset, placed by the project's sharding rules (`parallel.param_shardings`: FSDP, experts over `expert`,
tensor); the step is traced under `parallel.activate(mesh)`, so MoE layers dispatch per token shard
(expert-parallel with an `expert` axis); the
log-probs stream the vocabulary (`losses.token_logprobs_and_entropy`), so the [T, V] logits never exist.
Reports `compiled.memory_analysis()` per device: arguments (parameter shard, tokens), outputs (gradient
shard), temporaries (activations kept for the backward pass and scratch), their sum, and the compile time.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # fake CPU devices for the mesh; must precede the first jax import
    # all-reduce-promotion: XLA:CPU aborts ("Invalid binary instruction opcode copy") promoting the bfloat16
    # gradient all-reduce of a partially manual shard_map, whose reducer ends in a copy; compiling only, the
    # all-reduce can stay bfloat16 as it does on GPU / TPU.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64 "
                                       "--xla_disable_hlo_passes=all-reduce-promotion")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import math
import time

from absl import app, flags

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from nemotron_jax.losses import token_logprobs_and_entropy
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.nemotron_h import NemotronH
from nemotron_jax import parallel
from nemotron_jax.model.params import abstract_params
from nemotron_jax.parallel.context import CONTEXT_AXIS, context_parallel

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the JSON report.", required=True)
flags.DEFINE_string("config", "nano_30b_a3b", "ModelConfig preset.")
flags.DEFINE_string("layer_pattern", None, "Override the preset's layer pattern (e.g. fewer layers).")
flags.DEFINE_integer("tokens", 262144, "Tokens per row.")
flags.DEFINE_integer("rows", 1, "Rows per data shard.")
flags.DEFINE_string("mesh", "expert=8,context=8", "Mesh axes name=size; needs a 'context' axis.")
flags.DEFINE_multi_string("override", [], "ModelConfig field=value overrides (value parsed as JSON if it can).")

GIB = 2**30


def main(argv):
    del argv
    mesh_config = parallel.MeshConfig.from_string(FLAGS.mesh)
    devices = math.prod(size for _, size in mesh_config.axes)
    if devices > jax.device_count():
        raise app.UsageError(f"--mesh needs {devices} devices; XLA_FLAGS gives {jax.device_count()}")
    mesh = parallel.make_mesh(mesh_config, devices=jax.devices()[:devices])
    if CONTEXT_AXIS not in mesh.axis_names:
        raise app.UsageError(f"--mesh={FLAGS.mesh!r} has no {CONTEXT_AXIS!r} axis")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    overrides = {}
    for item in FLAGS.override:
        name, _, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    if FLAGS.layer_pattern:
        overrides["layer_pattern"] = FLAGS.layer_pattern
    cfg = ModelConfig.preset(FLAGS.config, **overrides)

    # The project's sharding rules (FSDP on dense weights, experts over `expert`, heads / width over `tensor`).
    params = abstract_params(cfg)
    param_shardings = parallel.param_shardings(params, mesh)
    params = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          params, param_shardings)
    batch_axes = parallel.batch_axes(mesh)
    rows = FLAGS.rows * math.prod(sizes[name] for name in batch_axes)
    token_sharding = NamedSharding(mesh, P(batch_axes, CONTEXT_AXIS))
    tokens = jax.ShapeDtypeStruct((rows, FLAGS.tokens), jnp.int32, sharding=token_sharding)

    def token_logprobs(p, tok, targets, segment_ids):
        hidden = NemotronH(cfg).apply({"params": p}, tok, segment_ids, method=NemotronH.hidden_states)
        logprobs, _ = token_logprobs_and_entropy(hidden, p["lm_head"]["kernel"], targets)
        return logprobs

    split = context_parallel(token_logprobs, mesh)

    def loss(p, tok, targets, segment_ids):
        return -jnp.mean(split(p, tok, targets, segment_ids))

    step = jax.jit(jax.value_and_grad(loss), out_shardings=(NamedSharding(mesh, P()), param_shardings))
    start = time.perf_counter()
    with parallel.activate(mesh):
        lowered = step.lower(params, tokens, tokens, tokens)
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    param_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    report = {
        "config": FLAGS.config,
        "layer_pattern": cfg.layer_pattern,
        "overrides": overrides,
        "tokens_per_row": FLAGS.tokens,
        "rows": rows,
        "mesh": sizes,
        "tokens_per_device": FLAGS.tokens // sizes[CONTEXT_AXIS],
        "what": f"value_and_grad of the mean token log-prob (forward + backward), {cfg.param_dtype} params",
        "params_total_gib": param_bytes / GIB,
        "per_device_gib": {
            "arguments": stats.argument_size_in_bytes / GIB,
            "outputs": stats.output_size_in_bytes / GIB,
            "temporaries": stats.temp_size_in_bytes / GIB,
            "aliased": stats.alias_size_in_bytes / GIB,
            "total": (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                      - stats.alias_size_in_bytes) / GIB,
        },
        "lower_s": lowered_s,
        "compile_s": compile_s,
        "jax": jax.__version__,
    }
    print(json.dumps(report, indent=2))
    with open(FLAGS.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)

"""Compile time of a model's forward+backward, unrolled layers against scan over layers (`scan_layers`).

    nice -n 10 python -m experiments.benchmarks.compile_time --out=/tmp/compile_time.json

Ahead of time on abstract shapes: the params are `jax.ShapeDtypeStruct`s from `jax.eval_shape` (nothing is
allocated), and `jax.jit(value_and_grad(loss)).lower(...).compile()` is timed for the training objective
(`policy_forward` log-probs of T tokens, summed) with respect to every parameter. Each mode runs in a fresh
subprocess (no shared tracing or compilation caches; the persistent compilation cache is switched off), on
the default backend (a single CPU device is fine: compile time is what is measured). Writes per mode the
trace+lower and the XLA compile seconds, the layer plan, and the ratio scan / unrolled of the total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the JSON report.", required=True)
flags.DEFINE_string("preset", "nano_30b_a3b", "ModelConfig preset.")
flags.DEFINE_integer("tokens", 8192, "Tokens per step (one row of T tokens).")
flags.DEFINE_string("remat_policy", "none", "ModelConfig.remat_policy for both modes.")
flags.DEFINE_string("layer_pattern", None, "Override the preset's layer pattern (e.g. to cost single layers).")
flags.DEFINE_list("modes", ["scan", "unrolled"], "Modes to measure.")
flags.DEFINE_string("child_mode", None, "Internal: measure this one mode in this process and print JSON.")


def measure(mode: str) -> dict:
    """Lower and compile the forward+backward of one mode; returns seconds and the plan."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    from nemotron_jax.model.config import ModelConfig
    from nemotron_jax.model.layer_stack import model_plan
    from nemotron_jax.model.params import abstract_params
    from nemotron_jax.training.forward import policy_forward

    overrides = {"layer_pattern": FLAGS.layer_pattern} if FLAGS.layer_pattern else {}
    cfg = ModelConfig.preset(FLAGS.preset, scan_layers=mode == "scan", remat_policy=FLAGS.remat_policy,
                             **overrides)
    params = abstract_params(cfg)
    rows = jax.ShapeDtypeStruct((1, FLAGS.tokens), jnp.int32)

    def loss(params, tokens, targets, segment_ids):
        return jnp.sum(policy_forward(cfg, params, tokens, targets, segment_ids).logprobs)

    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, rows, rows, rows)
    lowered_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    plan = model_plan(cfg)
    return {
        "mode": mode,
        "trace_lower_s": round(lowered_s, 2),
        "compile_s": round(compile_s, 2),
        "total_s": round(lowered_s + compile_s, 2),
        "layers": cfg.num_layers,
        "layers_compiled": sum(len(segment.unit) for segment in plan),
        "plan": [f"{segment.name}: {segment.unit!r} x {segment.repeats}" for segment in plan],
        "temp_gib": round(memory.temp_size_in_bytes / 2**30, 2) if memory is not None else None,
        "backend": jax.default_backend(),
    }


def main(argv):
    del argv
    if FLAGS.child_mode:
        print("RESULT " + json.dumps(measure(FLAGS.child_mode)), flush=True)
        return
    results = {"preset": FLAGS.preset, "tokens": FLAGS.tokens, "remat_policy": FLAGS.remat_policy,
               "layer_pattern": FLAGS.layer_pattern, "modes": {}}
    for mode in FLAGS.modes:
        command = [sys.executable, "-m", "experiments.benchmarks.compile_time", f"--out={FLAGS.out}",
                   f"--preset={FLAGS.preset}", f"--tokens={FLAGS.tokens}", f"--remat_policy={FLAGS.remat_policy}",
                   f"--child_mode={mode}"] + ([f"--layer_pattern={FLAGS.layer_pattern}"] if FLAGS.layer_pattern else [])
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(f"mode {mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["process_s"] = round(time.perf_counter() - start, 2)
        results["modes"][mode] = result
        print(json.dumps(result), flush=True)
    if {"scan", "unrolled"} <= set(results["modes"]):
        scan, unrolled = results["modes"]["scan"], results["modes"]["unrolled"]
        results["ratio_total"] = round(scan["total_s"] / unrolled["total_s"], 3)
        results["ratio_compile"] = round(scan["compile_s"] / unrolled["compile_s"], 3)
        results["meets_one_third"] = results["ratio_total"] <= 1 / 3
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "modes"}))


if __name__ == "__main__":
    app.run(main)

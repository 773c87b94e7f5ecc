"""MoE layer (router + dropless routed experts + shared expert) against a dense matmul chain of the same
active FLOPs, for every grouped-matmul backend, in one run.

    nice -n 5 python -m experiments.benchmarks.moe_layer                     # -> results/moe_layer_<platform>.json
    nice -n 5 python -m experiments.benchmarks.moe_layer --out=/tmp/moe.json --backends=blocks,ragged_dot

The layer is `nemotron_jax.model.moe.MoE` built from a `ModelConfig` whose `moe_backend` names the backend.
Timed: the jitted forward, and the jitted forward+backward (gradients w.r.t. the input and every
parameter, router included), each warmed up, the median of `--repeats` runs (all samples are stored).
The practical limit is the dense chain `x [N, D] @ W1 [D, k*F + S] -> relu^2 -> @ W2 [k*F + S, D]`: the same
matmul FLOPs as the k routed experts plus the shared expert, with no routing, sorting or gathers. Each
backend runs in a fresh process that times its layer and the dense chain alternately (a shared machine's
load hits both alike); the ratio is of those two medians. Reported per backend: ms, achieved FLOP/s (of the
active matmul FLOPs), ratio to the dense chain and speed-up over "ragged_dot".

On CPU the Pallas backends ("pallas", "megablox") run only in interpret mode (a correctness check; minutes
per call at this size), so they are skipped there and the JSON says so; their correctness is tested in
tests/kernels and tests/model.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON report path (default results/moe_layer_<platform>.json).")
flags.DEFINE_list("backends", None, "Backends to time (default: every backend that runs natively here).")
flags.DEFINE_integer("tokens", None, "Tokens (default 4096 on CPU, 16384 on GPU/TPU).")
flags.DEFINE_integer("hidden", None, "Hidden size D (default 512 / 2688).")
flags.DEFINE_integer("experts", None, "Routed experts E (default 64 / 128).")
flags.DEFINE_integer("top_k", 6, "Experts per token k.")
flags.DEFINE_integer("width", None, "Routed expert width F (default 384 / 1856).")
flags.DEFINE_integer("shared", None, "Shared expert width S (default 768 / 3712).")
flags.DEFINE_string("dtype", None, "float32 or bfloat16 (default float32 on CPU, bfloat16 elsewhere).")
flags.DEFINE_integer("tile_rows", None, "ModelConfig.moe_tile_rows (default: ModelConfig's default).")
flags.DEFINE_integer("visit_tiles", None, "ModelConfig.moe_visit_tiles (default: ModelConfig's default).")
flags.DEFINE_integer("repeats", 7, "Timed runs per measurement (median reported).")
flags.DEFINE_string("child", None, "Internal: measure this one backend here and print JSON.")

CPU_DEFAULTS = dict(tokens=4096, hidden=512, experts=64, width=384, shared=768, dtype="float32")
ACCEL_DEFAULTS = dict(tokens=16384, hidden=2688, experts=128, width=1856, shared=3712, dtype="bfloat16")
ALL_BACKENDS = ("scan", "blocks", "ragged_dot", "tokamax", "pallas", "megablox")
INTERPRET_ONLY_ON_CPU = ("pallas", "megablox")


SLOW_S = 5.0  # a warm call slower than this is timed once (ragged_dot on CPU: minutes per fwd+bwd)


def _time_pair(layer_fn, layer_args, dense_fn, dense_args, repeats):
    """Compile and warm both, then alternate timed calls of the layer and of the dense chain, so that both
    see the same load on a shared machine. -> dict of medians (s), all samples and compile times. A layer
    whose warm call takes over SLOW_S seconds gets that call as its only sample."""
    import jax

    def call(fn, args):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    compile_s = [call(layer_fn, layer_args), call(dense_fn, dense_args)]
    layer_times, dense_times = [call(layer_fn, layer_args)], [call(dense_fn, dense_args)]  # warm
    if layer_times[0] <= SLOW_S:
        layer_times, dense_times = [], []
        for _ in range(repeats):
            layer_times.append(call(layer_fn, layer_args))
            dense_times.append(call(dense_fn, dense_args))
    return {"layer_s": statistics.median(layer_times), "dense_s": statistics.median(dense_times),
            "min_ratio": min(layer_times) / min(dense_times),
            "layer_all_ms": [t * 1e3 for t in layer_times], "dense_all_ms": [t * 1e3 for t in dense_times],
            "compile_and_first_call_s": compile_s}


def _shape():
    import jax

    platform = jax.default_backend()
    defaults = CPU_DEFAULTS if platform == "cpu" else ACCEL_DEFAULTS
    shape = {key: getattr(FLAGS, key) if getattr(FLAGS, key) is not None else value
             for key, value in defaults.items()}
    return platform, dict(shape, top_k=FLAGS.top_k)


def _dispatch_overrides() -> dict:
    """The dispatch settings: the flags, else ModelConfig's defaults (not the "tiny" preset's test-sized tile)."""
    from nemotron_jax.model.config import ModelConfig

    return {"moe_tile_rows": FLAGS.tile_rows or ModelConfig.moe_tile_rows,
            "moe_visit_tiles": FLAGS.visit_tiles or ModelConfig.moe_visit_tiles}


def measure(name: str) -> dict:
    """Time one backend's MoE layer and, alternating with it, the dense chain of equal FLOPs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemotron_jax.model.activations import relu2
    from nemotron_jax.model.config import ModelConfig
    from nemotron_jax.model.moe import MoE

    _, shape = _shape()
    n, d, e, k, f, s = (shape[key] for key in ("tokens", "hidden", "experts", "top_k", "width", "shared"))
    dtype = shape["dtype"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, n, d)), dtype)
    probe = jnp.asarray(rng.normal(size=(1, n, d)), dtype)
    active = k * f + s
    w1 = jnp.asarray(rng.normal(size=(d, active)) * d ** -0.5, dtype)
    w2 = jnp.asarray(rng.normal(size=(active, d)) * active ** -0.5, dtype)
    dense = lambda x, w1, w2: relu2(x @ w1) @ w2  # noqa: E731
    dense_fwd = jax.jit(dense)
    dense_bwd = jax.jit(jax.grad(lambda x, w1, w2: jnp.sum((dense(x, w1, w2) * probe[0]).astype(jnp.float32)),
                                 argnums=(0, 1, 2)))
    dense_args = (x[0], w1, w2)
    cfg = ModelConfig.preset("tiny", hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, n_group=1,
                             topk_group=1, moe_intermediate_size=f, moe_shared_expert_intermediate_size=s,
                             moe_backend=name, param_dtype=dtype, **_dispatch_overrides(),
                             compute_dtype=dtype, initializer_range=d ** -0.5)
    layer = MoE(cfg)
    params = layer.init(jax.random.key(0), x)["params"]
    fwd = jax.jit(lambda params, x: layer.apply({"params": params}, x))
    bwd = jax.jit(jax.grad(lambda params, x: jnp.sum((layer.apply({"params": params}, x) * probe).astype(
        jnp.float32)), argnums=(0, 1)))
    forward = _time_pair(fwd, (params, x), dense_fwd, dense_args, FLAGS.repeats)
    backward = _time_pair(bwd, (params, x), dense_bwd, dense_args, FLAGS.repeats)
    matmul_flops = 2 * n * d * active * 2
    return {
        "fwd_ms": forward["layer_s"] * 1e3, "fwd_bwd_ms": backward["layer_s"] * 1e3,
        "dense_fwd_ms": forward["dense_s"] * 1e3, "dense_fwd_bwd_ms": backward["dense_s"] * 1e3,
        "fwd_ratio_to_dense": forward["layer_s"] / forward["dense_s"],
        "fwd_bwd_ratio_to_dense": backward["layer_s"] / backward["dense_s"],
        # Fastest sample over fastest sample: the least disturbed estimate on a time-shared machine.
        "fwd_min_ratio_to_dense": forward["min_ratio"], "fwd_bwd_min_ratio_to_dense": backward["min_ratio"],
        "fwd_tflops": matmul_flops / forward["layer_s"] / 1e12,
        "fwd_bwd_tflops": 3 * matmul_flops / backward["layer_s"] / 1e12,
        "dense_fwd_bwd_tflops": 3 * matmul_flops / backward["dense_s"] / 1e12,
        "samples": {"fwd": forward, "fwd_bwd": backward},
    }


def main(argv):
    del argv
    if FLAGS.child:
        print("RESULT " + json.dumps(measure(FLAGS.child)), flush=True)
        return
    import jax

    platform, shape = _shape()
    skipped = {}
    if FLAGS.backends:
        backends = list(FLAGS.backends)
    else:
        backends = []
        for name in ALL_BACKENDS:
            if platform == "cpu" and name in INTERPRET_ONLY_ON_CPU:
                skipped[name] = "Pallas interpret mode only on CPU (minutes per call): correctness-tested, not timed"
            elif platform != "cpu" and name == "scan":
                skipped[name] = "plain-JAX reference; not a GPU/TPU path"
            else:
                backends.append(name)
    n, d, e, k, f, s = (shape[key] for key in ("tokens", "hidden", "experts", "top_k", "width", "shared"))
    results = {
        "platform": platform, "device": str(jax.devices()[0].device_kind), "shape": shape,
        **_dispatch_overrides(), "repeats": FLAGS.repeats, "slow_call_s": SLOW_S,
        "active_matmul_flops_fwd": 2 * n * d * (k * f + s) * 2, "router_flops_fwd": 2 * n * d * e,
        "dense_chain": f"x [{n}, {d}] @ [{d}, {k * f + s}] -> relu^2 -> @ [{k * f + s}, {d}]",
        "skipped": skipped, "backends": {},
    }
    # Each measurement in a fresh process: no shared caches, and a backend that runs out of memory (ragged_dot
    # on CPU builds [experts, rows, hidden]) is recorded instead of ending the run.
    passthrough = [arg for arg in sys.argv[1:] if not arg.startswith(("--out", "--backends", "--child"))]
    for name in backends:
        child = subprocess.run([sys.executable, "-m", "experiments.benchmarks.moe_layer", f"--child={name}",
                                *passthrough], capture_output=True, text=True, check=False)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            entry = {"error": f"exit code {child.returncode}: {child.stderr.strip()[-400:]}"}
        else:
            entry = json.loads(lines[-1][len("RESULT "):])
        results["backends"][name] = entry
        summary = ("fwd_ms", "fwd_bwd_ms", "dense_fwd_ms", "dense_fwd_bwd_ms", "fwd_ratio_to_dense",
                   "fwd_bwd_ratio_to_dense", "fwd_bwd_min_ratio_to_dense")
        print(name, entry["error"] if "error" in entry else {key: round(entry[key], 2) for key in summary
                                                             if key in entry}, flush=True)

    reference = results["backends"].get("ragged_dot", {})
    for entry in results["backends"].values():
        if "fwd_ms" in entry and "fwd_ms" in reference:
            entry["fwd_speedup_vs_ragged_dot"] = reference["fwd_ms"] / entry["fwd_ms"]
            entry["fwd_bwd_speedup_vs_ragged_dot"] = reference["fwd_bwd_ms"] / entry["fwd_bwd_ms"]
    timed = {name: entry for name, entry in results["backends"].items() if "fwd_bwd_ms" in entry}
    if timed:
        best = min(timed, key=lambda name: timed[name]["fwd_bwd_ms"])
        results["fastest"] = {"backend": best, "fwd_bwd_ratio_to_dense": timed[best]["fwd_bwd_ratio_to_dense"],
                              "fwd_bwd_speedup_vs_ragged_dot": timed[best].get("fwd_bwd_speedup_vs_ragged_dot")}
    out = FLAGS.out or os.path.join("results", f"moe_layer_{platform}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results.get("fastest")), "->", out)


if __name__ == "__main__":
    app.run(main)

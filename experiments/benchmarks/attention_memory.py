"""Memory of a forward+backward pass per attention backend, against row length, compiled ahead of time.

    python -m experiments.benchmarks.attention_memory --out=results/attention_memory_cpu.json

For the `--config` preset (default `tiny`), one row of T tokens (packed: `--segment` tokens per segment),
lowers and compiles (abstract shapes: nothing is allocated) the gradient of the mean token log-prob w.r.t. all
parameters with each `--backends` attention backend, and reports `compiled.memory_analysis()`: the
temporaries (activations kept for the backward pass, and scratch) and the compile time. For T up to
`--time_max_tokens` it also runs the step (random parameters) and reports the median of `--repeats` runs.
`--xla_max_tokens` bounds the quadratic backend. Side by side: the attention function alone (`attend`, the
config's head layout, value and gradient), and the Mamba-2 SSD scan alone (`ssd_chunked_scan` with the Mamba
sizes of `--ssd_config`, default the 30B-A3B's chunk 128 x 64 heads) as before this change (all chunks at once,
no remat), with the within-chunk remat, and with remat over groups of 4,096 tokens (the default): compiled
temporaries and the bytes the forward keeps for the backward (the residuals of `jax.vjp`, which add
up over layers in a model without layer remat).

Summary: the least-squares slope of temporaries against T (bytes per token) per backend, and the ratio of each
backend's temporaries at the largest T to one attention layer's [H, T, T] float32 scores.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import math
import statistics
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.losses import token_logprobs_and_entropy
from nemotron_jax.model.attention_backends import attend
from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.mamba2 import ssd_chunked_scan
from nemotron_jax.model.nemotron_h import NemotronH
from nemotron_jax.model.params import abstract_params

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/attention_memory_cpu.json", "Where to write the JSON report.")
flags.DEFINE_string("config", "tiny", "ModelConfig preset.")
flags.DEFINE_list("tokens", ["4096", "8192", "16384", "32768", "65536"], "Row lengths.")
flags.DEFINE_list("backends", ["xla", "blockwise", "splash"], "Attention backends to compare.")
flags.DEFINE_integer("xla_max_tokens", 65536, "Longest row compiled with the quadratic xla backend.")
flags.DEFINE_integer("splash_max_tokens", 16384, "Longest row compiled with splash (interpreted off TPU).")
flags.DEFINE_integer("time_max_tokens", 8192, "Rows up to this length are also run and timed.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
flags.DEFINE_integer("segment", 1024, "Tokens per packed segment (0: one sequence per row).")
flags.DEFINE_integer("block_q", 512, "Query tile of blockwise.")
flags.DEFINE_integer("block_kv", 512, "Key tile of blockwise.")
flags.DEFINE_string("ssd_config", "nano_30b_a3b", "Preset whose Mamba sizes the SSD rows use.")

MIB = 2**20


def _segments(length: int) -> jax.Array:
    if FLAGS.segment <= 0:
        return jnp.ones((1, length), jnp.int32)
    return jnp.asarray(np.arange(length)[None] // FLAGS.segment + 1, jnp.int32)


def _measure(step, abstract_args, concrete_args) -> dict:
    """Compiles `step` for `abstract_args`; runs it on `concrete_args()` when given."""
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*abstract_args).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    row = {"temp_mib": stats.temp_size_in_bytes / MIB, "argument_mib": stats.argument_size_in_bytes / MIB,
           "output_mib": stats.output_size_in_bytes / MIB, "compile_s": round(compile_s, 2)}
    if concrete_args is not None:
        args = concrete_args()
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        row["step_s"] = round(statistics.median(times), 3)
    return row


def _model_step(cfg: ModelConfig):
    def loss(params, tokens, segment_ids):
        hidden = NemotronH(cfg).apply({"params": params}, tokens, segment_ids, method=NemotronH.hidden_states)
        logprobs, _ = token_logprobs_and_entropy(hidden[:, :-1], params["lm_head"]["kernel"], tokens[:, 1:])
        return -jnp.mean(logprobs)

    return jax.value_and_grad(loss)


def _attention_step(cfg: ModelConfig):
    def loss(query, key, value, runs):
        out = attend(query, key, value, runs, runs, backend=cfg.attention_backend, block_q=cfg.attention_block_q,
                     block_kv=cfg.attention_block_kv)
        return jnp.sum(out)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


# SSD variants: (name, remat, chunk groups of `group_tokens` tokens or None for all chunks at once).
SSD_VARIANTS = (("plain", False, None), ("remat", True, None), ("remat+groups", True, 4096))


def _ssd_forward(cfg: ModelConfig, remat: bool, group_tokens: int | None, length: int):
    def forward(x, dt, B, C, runs):
        A = -jnp.arange(1.0, cfg.mamba_num_heads + 1)
        return ssd_chunked_scan(x, dt, A, B, C, runs, cfg.chunk_size, remat=remat,
                                group_tokens=group_tokens or length)[0]

    return forward


def _residual_bytes(forward, args) -> int:
    """Bytes `jax.vjp` of `forward` keeps for the backward (all arguments but the last are differentiated)."""
    residuals = jax.eval_shape(lambda *a: jax.vjp(lambda *d: forward(*d, a[-1]), *a[:-1])[1], *args)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))


def _slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares bytes per token of (tokens, MiB) points."""
    if len(points) < 2:
        return None
    t, m = np.array(points, np.float64).T
    return float(np.polyfit(t, m * MIB, 1)[0])


def main(argv):
    del argv
    lengths = [int(t) for t in FLAGS.tokens]
    base = ModelConfig.preset(FLAGS.config, attention_block_q=FLAGS.block_q, attention_block_kv=FLAGS.block_kv)
    n_attention = base.layer_pattern.count("*")
    report = {"config": FLAGS.config, "layer_pattern": base.layer_pattern, "platform": jax.default_backend(),
              "what": "value_and_grad of the mean token log-prob (forward + backward), one row, "
                      f"{base.param_dtype} params, segments of {FLAGS.segment or 'the whole row'} tokens",
              "block_q": FLAGS.block_q, "block_kv": FLAGS.block_kv, "jax": jax.__version__,
              "attention_layers": n_attention, "rows": []}
    params = abstract_params(base)
    concrete_params = None
    for length in lengths:
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        scores_mib = base.num_attention_heads * length * length * 4 / MIB
        for backend in FLAGS.backends:
            if (backend == "xla" and length > FLAGS.xla_max_tokens) or (
                    backend == "splash" and length > FLAGS.splash_max_tokens):
                continue
            cfg = base.replace(attention_backend=backend)
            timed = length <= FLAGS.time_max_tokens
            if timed and concrete_params is None:
                import nemotron_jax as nj
                concrete_params = nj.init_params(base, jax.random.key(0))

            def concrete(length=length):
                rng = np.random.default_rng(0)
                return concrete_params, jnp.asarray(rng.integers(3, base.vocab_size, (1, length)), jnp.int32), \
                    _segments(length)

            row = {"kind": "model", "backend": backend, "tokens": length, "scores_one_layer_mib": scores_mib,
                   **_measure(_model_step(cfg), (params, tokens, tokens), concrete if timed else None)}
            row["temp_over_scores"] = row["temp_mib"] / scores_mib
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
        f32 = jnp.float32
        kv_heads, repeats = base.num_key_value_heads, base.num_attention_heads // base.num_key_value_heads
        attention_args = (jax.ShapeDtypeStruct((1, length, kv_heads, repeats, base.head_dim), f32),
                          jax.ShapeDtypeStruct((1, length, kv_heads, base.head_dim), f32),
                          jax.ShapeDtypeStruct((1, length, kv_heads, base.head_dim), f32),
                          jax.ShapeDtypeStruct((1, length), jnp.int32))
        for backend in FLAGS.backends:
            if (backend == "xla" and length > FLAGS.xla_max_tokens) or (
                    backend == "splash" and length > FLAGS.splash_max_tokens):
                continue
            row = {"kind": "attention", "backend": backend, "tokens": length, "scores_one_layer_mib": scores_mib,
                   **_measure(_attention_step(base.replace(attention_backend=backend)), attention_args, None)}
            row["temp_over_scores"] = row["temp_mib"] / scores_mib
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
        ssd_cfg = ModelConfig.preset(FLAGS.ssd_config)
        heads, head_dim, groups, state = (ssd_cfg.mamba_num_heads, ssd_cfg.mamba_head_dim, ssd_cfg.n_groups,
                                          ssd_cfg.ssm_state_size)
        ssd_args = (jax.ShapeDtypeStruct((1, length, heads, head_dim), f32),
                    jax.ShapeDtypeStruct((1, length, heads), f32),
                    jax.ShapeDtypeStruct((1, length, groups, state), f32),
                    jax.ShapeDtypeStruct((1, length, groups, state), f32),
                    jax.ShapeDtypeStruct((1, length), jnp.int32))
        for variant, remat, group_tokens in SSD_VARIANTS:
            forward = _ssd_forward(ssd_cfg, remat, group_tokens, length)
            step = jax.value_and_grad(lambda *a, forward=forward: jnp.sum(forward(*a)), argnums=(0, 1, 2, 3))
            row = {"kind": "ssd_scan", "variant": variant, "tokens": length, "ssd_config": FLAGS.ssd_config,
                   "residual_mib": _residual_bytes(forward, ssd_args) / MIB, **_measure(step, ssd_args, None)}
            print(json.dumps(row), flush=True)
            report["rows"].append(row)

    summary = {}
    for kind in ("model", "attention"):
        for backend in FLAGS.backends:
            rows = [r for r in report["rows"] if r["kind"] == kind and r["backend"] == backend]
            if rows:
                summary[f"{kind}/{backend}"] = {
                    "slope_bytes_per_token": _slope([(r["tokens"], r["temp_mib"]) for r in rows]),
                    "largest_tokens": rows[-1]["tokens"], "temp_over_scores_at_largest": rows[-1]["temp_over_scores"]}
    for variant, _, _ in SSD_VARIANTS:
        rows = [r for r in report["rows"] if r["kind"] == "ssd_scan" and r["variant"] == variant]
        summary[f"ssd_scan/{variant}"] = {
            "temp_slope_bytes_per_token": _slope([(r["tokens"], r["temp_mib"]) for r in rows]),
            "residual_slope_bytes_per_token": _slope([(r["tokens"], r["residual_mib"]) for r in rows])}
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)

"""Prefill and decode throughput of `nj.generate` against transformers' `generate` (torch, CPU), greedy.

    python -m experiments.benchmarks.generate --out=/tmp/generate.json
    python -m experiments.benchmarks.generate --out=/tmp/g.json --configs=tiny --batches=8 --new_tokens=32

Both engines run the same random weights: a transformers `NemotronHForCausalLM` is built from the config
(seeded, its trivially initialised tensors perturbed as in the parity tests), written with
`save_pretrained`, and loaded with `nj.load_hf`. For each config and batch size, prompts of `prompt_len`
random tokens (all of one length, so neither side pads) are continued greedily:

    prefill tokens/s = batch * prompt_len / t(max_new_tokens = 1)
    decode tokens/s  = batch * (new_tokens - 1) / (t(max_new_tokens = new_tokens) - t(max_new_tokens = 1))

Each t is the best of `--repeats` rounds after a warm-up call (which, for `nj.generate`, compiles); the
engines alternate within every round, so a change of machine load between rounds hits both. transformers
runs at every torch thread count of `--torch_threads` and its best one is the reference: on a loaded
2-core machine, torch's two threads can wait on each other for 10x longer than one thread computes. The
greedy tokens of both engines are compared on the first batch of each config (`tokens_equal`).

`weights_read_s` is how long XLA takes to read every parameter once (a jitted sum over them): a decode
step that touches all weights (every expert, at larger batches) cannot be faster, whichever engine runs it.

Configs: `tiny` (the preset, all four layer kinds) and `medium` (55M parameters, 25M active, 16 experts top-4).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import time

from absl import app, flags

import jax
import numpy as np

import nemotron_jax as nj

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the JSON report.", required=True)
flags.DEFINE_list("configs", ["tiny", "medium"], "Configs to run (tiny, medium).")
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per measurement (the best is kept).")
flags.DEFINE_list("torch_threads", ["1", "2"], "torch.set_num_threads values to run transformers at (the best "
                  "is the reference); 0 means torch's default.")

# 55M parameters (25M active per token): 16 routed experts (top-4), every layer kind.
_MEDIUM = dict(
    vocab_size=8192, hidden_size=512, layer_pattern="MEM*EMEM-E", num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=2, conv_kernel=4,
    chunk_size=64, intermediate_size=1024, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=512,
    moe_shared_expert_intermediate_size=1024, routed_scaling_factor=2.5, max_position_embeddings=4096,
)


def model_config(name: str) -> nj.ModelConfig:
    if name == "tiny":
        return nj.ModelConfig.preset("tiny", eos_token_id=None)
    if name == "medium":
        return nj.ModelConfig(**_MEDIUM, eos_token_id=None)
    raise ValueError(f"unknown config {name!r}; one of tiny, medium")


def build_hf(cfg: nj.ModelConfig, directory: str):
    """A random transformers model for `cfg`, written to `directory`; -> (model, attention/experts impl)."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    hf_config = NemotronHConfig(**cfg.to_hf_config())
    model = NemotronHForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("A_log", ".D", "dt_bias", "norm")):
                param.add_(0.2 * torch.randn_like(param))
            if "gate.weight" in name:
                param.mul_(10.0)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.copy_(0.05 * torch.randn_like(buffer))
    model.save_pretrained(directory)
    implementation = {"attention": getattr(model.config, "_attn_implementation", None),
                      "experts": getattr(model.config, "_experts_implementation", None)}
    return model, implementation


def _elapsed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def weights_read_seconds(params, repeats: int = 5) -> float:
    """Best time of a jitted sum over every parameter: one read of all weights."""
    total = jax.jit(lambda tree: sum(leaf.astype(np.float32).sum() for leaf in jax.tree.leaves(tree)))
    jax.block_until_ready(total(params))
    return min(_elapsed(lambda: jax.block_until_ready(total(params))) for _ in range(repeats))


def run_config(name: str) -> dict:
    import torch

    cfg = model_config(name)
    with tempfile.TemporaryDirectory() as directory:
        hf_model, implementation = build_hf(cfg, directory)
        cfg, params = nj.load_hf(directory)
    params = jax.block_until_ready(params)
    report = {"config": name, "params": nj.count_params(cfg), "active_params": nj.count_active_params(cfg),
              "layer_pattern": cfg.layer_pattern, "n_routed_experts": cfg.n_routed_experts,
              "num_experts_per_tok": cfg.num_experts_per_tok, "transformers_implementation": implementation,
              "weights_read_s": weights_read_seconds(params), "batches": []}
    thread_counts = [int(t) for t in FLAGS.torch_threads]
    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    for batch in map(int, FLAGS.batches):
        prompts = rng.integers(3, cfg.vocab_size, (batch, FLAGS.prompt_len))
        prompt_lists = prompts.tolist()
        torch_prompts = torch.tensor(prompts, dtype=torch.long)

        def ours(new_tokens):
            return nj.generate(cfg, params, prompt_lists, max_new_tokens=new_tokens, temperature=0.0,
                               stop_token_ids=[])

        def theirs(new_tokens, threads):
            torch.set_num_threads(threads or default_threads)
            with torch.no_grad():
                return hf_model.generate(torch_prompts, attention_mask=torch.ones_like(torch_prompts),
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)

        engines = {"nemotron_jax": ours}
        engines.update({f"transformers_threads_{t}": functools.partial(theirs, threads=t) for t in thread_counts})
        best = {engine: {"first": math.inf, "full": math.inf} for engine in engines}
        start = time.perf_counter()
        for engine, function in engines.items():  # warm-up (compilation for JAX)
            function(1)
            function(FLAGS.new_tokens)
        warmup_s = time.perf_counter() - start
        for _ in range(FLAGS.repeats):
            for engine, function in engines.items():
                best[engine]["first"] = min(best[engine]["first"], _elapsed(lambda: function(1)))
                best[engine]["full"] = min(best[engine]["full"], _elapsed(lambda: function(FLAGS.new_tokens)))
        row = {"batch": batch, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
               "warmup_s": warmup_s}
        for engine, times in best.items():
            decode_s = times["full"] - times["first"]
            if decode_s <= 0:
                print(f"WARNING: {name} batch {batch} {engine}: timing noise exceeds the decode time; raise "
                      "--new_tokens or --repeats", flush=True)
            row[engine] = {
                "prefill_s": times["first"], "total_s": times["full"],
                "prefill_tokens_per_s": batch * FLAGS.prompt_len / times["first"],
                "decode_tokens_per_s": batch * (FLAGS.new_tokens - 1) / decode_s if decode_s > 0 else math.nan,
            }
            print(f"{name} batch {batch} {engine}: {row[engine]}", flush=True)
        reference = max((e for e in engines if e.startswith("transformers")),
                        key=lambda e: row[e]["decode_tokens_per_s"])
        row["transformers"] = dict(row[reference], threads=int(reference.rsplit("_", 1)[1]) or default_threads)
        if not report["batches"]:
            ours_tokens = ours(FLAGS.new_tokens).tokens
            theirs_tokens = theirs(FLAGS.new_tokens, thread_counts[0])[:, FLAGS.prompt_len:].tolist()
            report["tokens_equal"] = ours_tokens == theirs_tokens
            report["tokens_equal_fraction"] = float(np.mean(np.asarray(ours_tokens) == np.asarray(theirs_tokens)))
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            row[f"{key}_ratio"] = row["nemotron_jax"][key] / row["transformers"][key]
        row["decode_step_s"] = batch / row["nemotron_jax"]["decode_tokens_per_s"]
        report["batches"].append(row)
    return report


def main(argv):
    del argv
    import torch
    import transformers

    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_default_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg()},
        "settings": {"prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats,
                     "torch_threads": FLAGS.torch_threads, "greedy": True},
        "configs": [run_config(name) for name in FLAGS.configs],
    }
    with open(FLAGS.out, "w") as handle:
        json.dump(results, handle, indent=2)
    for config in results["configs"]:
        print(f"{config['config']}: all weights read once in {config['weights_read_s'] * 1e3:.1f} ms")
        for row in config["batches"]:
            print(f"{config['config']:>6} batch {row['batch']:>2}: decode {row['nemotron_jax']['decode_tokens_per_s']:9.1f} "
                  f"vs {row['transformers']['decode_tokens_per_s']:8.1f} tok/s ({row['decode_tokens_per_s_ratio']:.1f}x, "
                  f"torch threads {row['transformers']['threads']}, step {row['decode_step_s'] * 1e3:.1f} ms), "
                  f"prefill {row['nemotron_jax']['prefill_tokens_per_s']:9.1f} vs "
                  f"{row['transformers']['prefill_tokens_per_s']:8.1f} tok/s ({row['prefill_tokens_per_s_ratio']:.1f}x)")


if __name__ == "__main__":
    app.run(main)

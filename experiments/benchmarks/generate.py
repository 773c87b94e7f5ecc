"""Prefill and decode throughput of `nj.generate` against transformers' `generate` (torch, CPU), greedy.

    python -m experiments.benchmarks.generate --out=/tmp/generate.json
    python -m experiments.benchmarks.generate --out=/tmp/g.json --configs=tiny --batches=8 --new_tokens=32

Both engines run the same random weights: a transformers `NemotronHForCausalLM` is built from the config
(seeded, its trivially initialised tensors perturbed as in the parity tests), written with
`save_pretrained`, and loaded with `nj.load_hf`. For each config and batch size, prompts of `prompt_len`
random tokens (all of one length, so neither side pads) are continued greedily:

    prefill tokens/s = batch * prompt_len / t(max_new_tokens = 1)
    decode tokens/s  = batch * (new_tokens - 1) / (t(max_new_tokens = new_tokens) - t(max_new_tokens = 1))

Times are the best of `--repeats` calls after a warm-up call (which, for `nj.generate`, compiles). The
greedy tokens of both engines are compared on the first batch of each config (`tokens_equal`).

Configs: `tiny` (the preset, all four layer kinds) and `medium` (55M parameters, 25M active, 16 experts top-4).
"""

from __future__ import annotations

import json
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
flags.DEFINE_integer("repeats", 2, "Timed calls per measurement (the best is kept).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")

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


def best_time(function, repeats: int) -> float:
    function()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


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
              "batches": []}
    rng = np.random.default_rng(0)
    for batch in map(int, FLAGS.batches):
        prompts = rng.integers(3, cfg.vocab_size, (batch, FLAGS.prompt_len))
        prompt_lists = prompts.tolist()
        torch_prompts = torch.tensor(prompts, dtype=torch.long)

        def ours(new_tokens):
            return nj.generate(cfg, params, prompt_lists, max_new_tokens=new_tokens, temperature=0.0,
                               stop_token_ids=[])

        def theirs(new_tokens):
            with torch.no_grad():
                return hf_model.generate(torch_prompts, attention_mask=torch.ones_like(torch_prompts),
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)

        row = {"batch": batch, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens}
        for engine, function in (("nemotron_jax", ours), ("transformers", theirs)):
            compile_start = time.perf_counter()
            first = best_time(lambda: function(1), FLAGS.repeats)
            full = best_time(lambda: function(FLAGS.new_tokens), FLAGS.repeats)
            row[engine] = {
                "prefill_s": first, "total_s": full,
                "prefill_tokens_per_s": batch * FLAGS.prompt_len / first,
                "decode_tokens_per_s": batch * (FLAGS.new_tokens - 1) / max(full - first, 1e-9),
                "wall_incl_warmup_s": time.perf_counter() - compile_start,
            }
            print(f"{name} batch {batch} {engine}: {row[engine]}", flush=True)
        if not report["batches"]:
            ours_tokens = ours(FLAGS.new_tokens).tokens
            theirs_tokens = theirs(FLAGS.new_tokens)[:, FLAGS.prompt_len:].tolist()
            report["tokens_equal"] = ours_tokens == theirs_tokens
            report["tokens_equal_fraction"] = float(np.mean(np.asarray(ours_tokens) == np.asarray(theirs_tokens)))
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            row[f"{key}_ratio"] = row["nemotron_jax"][key] / row["transformers"][key]
        report["batches"].append(row)
    return report


def main(argv):
    del argv
    import torch
    import transformers

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": {"prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats,
                     "greedy": True},
        "configs": [run_config(name) for name in FLAGS.configs],
    }
    with open(FLAGS.out, "w") as handle:
        json.dump(results, handle, indent=2)
    for config in results["configs"]:
        for row in config["batches"]:
            print(f"{config['config']:>6} batch {row['batch']:>2}: decode {row['nemotron_jax']['decode_tokens_per_s']:9.1f} "
                  f"vs {row['transformers']['decode_tokens_per_s']:8.1f} tok/s ({row['decode_tokens_per_s_ratio']:.1f}x), "
                  f"prefill {row['nemotron_jax']['prefill_tokens_per_s']:9.1f} vs "
                  f"{row['transformers']['prefill_tokens_per_s']:8.1f} tok/s ({row['prefill_tokens_per_s_ratio']:.1f}x)")


if __name__ == "__main__":
    app.run(main)

"""Test-wide set-up: eight fake CPU devices for multi-device tests (set before JAX is imported), and random
tiny transformers `NemotronHForCausalLM` models: the independent reference for parity tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import numpy as np
import pytest

# Configurations chosen to cover every layer kind, a pattern starting with attention, Mamba n_groups > 1,
# group-limited routing (n_group > 1), top-k > 1, and sizes that are not powers of two.
HF_CONFIGS = {
    "base": dict(
        vocab_size=256, hidden_size=64, hybrid_override_pattern="M*EM-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, n_group=1, topk_group=1,
        routed_scaling_factor=2.5),
    "attention_first_grouped_routing": dict(
        vocab_size=300, hidden_size=72, hybrid_override_pattern="*MEM-E*M", num_attention_heads=6,
        num_key_value_heads=3, head_dim=12, intermediate_size=90, mamba_num_heads=6, mamba_head_dim=10,
        ssm_state_size=12, n_groups=3, conv_kernel=4, chunk_size=32, n_routed_experts=12, num_experts_per_tok=3,
        moe_intermediate_size=20, moe_shared_expert_intermediate_size=36, n_group=4, topk_group=2,
        routed_scaling_factor=1.7, norm_topk_prob=True),
    "deep_small_chunks": dict(
        vocab_size=97, hidden_size=40, hybrid_override_pattern="MEM*EMEM-ME", num_attention_heads=5,
        num_key_value_heads=1, head_dim=8, intermediate_size=56, mamba_num_heads=10, mamba_head_dim=6,
        ssm_state_size=7, n_groups=5, conv_kernel=3, chunk_size=8, n_routed_experts=6, num_experts_per_tok=4,
        moe_intermediate_size=14, moe_shared_expert_intermediate_size=22, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, use_conv_bias=False),
    # Latent MoE (Nemotron-3-Super style), biases everywhere transformers allows them, another activation,
    # a tie flag and MTP count that transformers ignores, a pattern starting with MoE.
    "latent_moe_biases": dict(
        vocab_size=130, hidden_size=48, hybrid_override_pattern="EM*-ME", num_attention_heads=4,
        num_key_value_heads=4, head_dim=10, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=12,
        ssm_state_size=6, n_groups=1, conv_kernel=2, chunk_size=16, n_routed_experts=10, num_experts_per_tok=3,
        moe_intermediate_size=18, moe_shared_expert_intermediate_size=30, moe_latent_size=20, n_group=2,
        topk_group=1, routed_scaling_factor=2.0, use_bias=True, mlp_bias=True, mlp_hidden_act="silu",
        tie_word_embeddings=True, num_nextn_predict_layers=1, time_step_min=0.01),
}


def build_hf_model(config_kwargs, seed=0):
    """A random transformers NemotronH model whose trivially initialised tensors are perturbed too
    (A_log, D, dt_bias, norm weights, expert-bias), so that a mapping mistake cannot hide behind ones/zeros."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    config = NemotronHConfig(**config_kwargs)
    # The plain loops: SDPA and torch._grouped_mm reject some of these odd sizes on CPU.
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("A_log", ".D", "dt_bias", "norm")):
                param.add_(0.2 * torch.randn_like(param))
            if "gate.weight" in name:  # spread router logits so top-k choices are well separated
                param.mul_(10.0)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.copy_(0.05 * torch.randn_like(buffer))
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{name: (transformers model, checkpoint dir written by save_pretrained)} for every HF_CONFIGS entry."""
    out = {}
    for name, kwargs in HF_CONFIGS.items():
        model = build_hf_model(kwargs, seed=len(out))
        directory = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(str(directory))
        out[name] = (model, str(directory))
    return out


class _Reference:
    configs = HF_CONFIGS
    build = staticmethod(build_hf_model)
    logits = staticmethod(hf_logits)


@pytest.fixture(scope="session")
def reference():
    """Access to the transformers reference helpers from test modules (conftest is not importable)."""
    return _Reference


@pytest.fixture(scope="session")
def jit_apply():
    """`jit_apply(cfg)` -> a jitted `NemotronH(cfg).apply`, compiled once per config for the whole session."""
    import functools

    import jax

    import nemotron_jax as nj

    @functools.lru_cache(maxsize=None)
    def make(cfg):
        return jax.jit(nj.NemotronH(cfg).apply)

    return make

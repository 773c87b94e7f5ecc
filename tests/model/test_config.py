"""`ModelConfig`: presets, parameter counts of the released model, and errors that name the field."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import nemotron_jax as nj
from nemotron_jax.model.config import ModelConfig


def test_nano_30b_a3b_parameter_counts():
    cfg = ModelConfig.preset("nano_30b_a3b")
    assert cfg.num_layers == 52 and cfg.layer_pattern.count("M") == 23 and cfg.layer_pattern.count("*") == 6
    total = nj.count_params(cfg)  # jax.eval_shape of init: nothing allocated
    assert abs(total - 31.58e9) <= 0.001 * 31.58e9, total
    active = nj.count_active_params(cfg)  # 6 routed + shared expert per token, input embedding excluded
    assert abs(active - 3.2e9) <= 0.015 * 3.2e9, active
    # Independent count from the config (reference §1.6): the same number, term by term.
    d, v = cfg.hidden_size, cfg.vocab_size
    mamba = (d * cfg.mamba_in_proj_dim + cfg.mamba_conv_dim * (cfg.conv_kernel + 1) + 3 * cfg.mamba_num_heads
             + cfg.mamba_d_inner + cfg.mamba_d_inner * d + d)
    attention = d * (32 + 2 + 2) * 128 + 32 * 128 * d + d
    moe_active = 6 * 2 * d * 1856 + 2 * d * 3712 + d * 128 + 128 + d
    assert active == 23 * mamba + 6 * attention + 23 * moe_active + d + v * d
    assert nj.count_active_params(cfg, include_input_embedding=True) == active + v * d


def test_tiny_preset_runs():
    cfg = ModelConfig.preset("tiny")
    model = nj.NemotronH(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    logits = jax.jit(model.apply)({"params": params}, jnp.ones((2, 8), jnp.int32))
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert set(cfg.layer_pattern) == set("M*E-")


def test_bfloat16_policy_keeps_router_float32():
    cfg = ModelConfig.preset("tiny", param_dtype="bfloat16", compute_dtype="bfloat16")
    params = nj.init_params(cfg, jax.random.key(0))
    moe_layer = params["layers_2"]["mixer"]
    assert moe_layer["router_kernel"].dtype == jnp.float32
    assert moe_layer["e_score_correction_bias"].dtype == jnp.float32
    assert moe_layer["experts_up_proj"].dtype == jnp.bfloat16
    assert params["layers_0"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
    logits = jax.jit(nj.NemotronH(cfg).apply)({"params": params}, jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("field,value,message", [
    ("layer_pattern", "M*X", "layer_pattern"),
    ("layer_pattern", "", "layer_pattern"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("n_groups", 3, "n_groups"),
    ("n_group", 3, "n_group"),
    ("topk_group", 2, "topk_group"),
    ("param_dtype", "float8", "param_dtype"),
    ("moe_backend", "dense", "moe_backend"),
    ("attention_backend", "flash", "attention_backend"),
    ("attention_block_q", 0, "attention_block_q"),
    ("hidden_size", 0, "hidden_size"),
    ("mlp_hidden_act", "tanh", "mlp_hidden_act"),
    ("moe_latent_size", 0, "moe_latent_size"),
])
def test_bad_config_names_the_field(field, value, message):
    base = dataclasses.asdict(ModelConfig.preset("tiny"))
    base[field] = value
    with pytest.raises(ValueError, match=f"ModelConfig.{message}"):
        ModelConfig(**base)


def test_bad_hf_config_names_the_field():
    hf = ModelConfig.preset("tiny").to_hf_config()
    with pytest.raises(ValueError, match="layers_block_type"):
        ModelConfig.from_hf_config({**hf, "layers_block_type": ["mamba", "convolution"]})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf_config({**hf, "num_hidden_layers": 7})
    with pytest.raises(ValueError, match="mlp_hidden_act"):
        ModelConfig.from_hf_config({**hf, "mlp_hidden_act": "sparsemax"})
    legacy = {k: v for k, v in hf.items() if k != "layers_block_type"}
    with pytest.raises(ValueError, match="layer_pattern"):
        ModelConfig.from_hf_config({**legacy, "hybrid_override_pattern": "M*Q", "num_hidden_layers": 3})


def test_hf_config_round_trip_and_legacy_keys():
    cfg = ModelConfig.preset("tiny")
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg.replace(moe_tile_rows=ModelConfig.moe_tile_rows)
    hf = cfg.to_hf_config()
    hf["mamba_n_groups"] = hf.pop("n_groups")
    hf["mamba_chunk_size"] = hf.pop("chunk_size")
    assert ModelConfig.from_hf_config(hf, moe_tile_rows=16) == cfg

"""Logits of `NemotronH` against transformers' `NemotronHForCausalLM`, float32 on CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.model.config import ModelConfig


@pytest.mark.parametrize("name", ["base", "attention_first_grouped_routing", "deep_small_chunks",
                                  "latent_moe_biases"])
def test_logits_match_transformers(hf_checkpoints, reference, jit_apply, name):
    length = 77  # >= 64 and not a multiple of any chunk size used (8, 16, 32)
    hf_model, directory = hf_checkpoints[name]
    cfg, params = nj.load_hf(directory)
    assert cfg.layer_pattern == reference.configs[name]["hybrid_override_pattern"]
    tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, (2, length))
    expected = reference.logits(hf_model, tokens)
    got = np.asarray(jit_apply(cfg)({"params": params}, jnp.asarray(tokens, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == expected.shape
    error = np.abs(got - expected).max()
    assert error <= 1e-4 * np.abs(expected).max(), (error, np.abs(expected).max())


def test_config_read_from_both_layer_spellings(hf_checkpoints):
    import json
    import os

    _, directory = hf_checkpoints["base"]
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    assert hf.get("layers_block_type")  # transformers 5 writes the list form
    from_list = ModelConfig.from_hf_config(hf)
    legacy = {k: v for k, v in hf.items() if k != "layers_block_type"}
    legacy["hybrid_override_pattern"] = "M*EM-E"
    assert ModelConfig.from_hf_config(legacy) == from_list
    old_names = dict(legacy)
    old_names["layers_block_type"] = ["mamba", "attention", "moe", "mamba", "mlp", "moe"]
    assert ModelConfig.from_hf_config(old_names) == from_list

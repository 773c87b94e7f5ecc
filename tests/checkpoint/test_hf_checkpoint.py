"""Hugging Face checkpoint import/export: round trips through transformers, both naming schemes, sharding,
atomic writes, and errors that name the offending tensor."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import nemotron_jax as nj
from nemotron_jax.checkpoint import safetensors_io
from nemotron_jax.checkpoint.safetensors_io import CheckpointError


def _assert_params_bit_equal(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(flat_a) == set(flat_b)
    for path in flat_a:
        x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


def _load_with_transformers(directory):
    from transformers import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model.config._experts_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    model, directory = hf_checkpoints["attention_first_grouped_routing"]
    cfg, params = nj.load_hf(directory)
    return model, directory, cfg, params


@pytest.mark.parametrize("scheme,max_shard_bytes", [("backbone", 5 * 2**30), ("model", 40_000)])
def test_save_hf_round_trip(loaded, reference, jit_apply, tmp_path, scheme, max_shard_bytes):
    hf_model, _, cfg, params = loaded
    out = str(tmp_path / "exported")
    nj.save_hf(cfg, params, out, scheme=scheme, max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(out))
    if max_shard_bytes < 2**20:  # sharded: several files and an index that names each
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        assert len(set(weight_map.values())) > 1 and set(weight_map.values()) <= set(files)
        for path in safetensors_io.checkpoint_files(out):
            assert os.path.getsize(path) <= max_shard_bytes + 4096 or len(safetensors_io.read_header(path)) == 1
    # load_hf(save_hf(x)) == x, bit for bit.
    cfg_again, params_again = nj.load_hf(out)
    assert cfg_again == cfg
    _assert_params_bit_equal(params, params_again)
    # transformers loads the export and computes the same logits.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64))
    reloaded = _load_with_transformers(out)
    want = reference.logits(hf_model, tokens)
    np.testing.assert_allclose(reference.logits(reloaded, tokens), want, rtol=0, atol=1e-6 * np.abs(want).max())
    got = np.asarray(jit_apply(cfg)({"params": params_again}, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_bfloat16_round_trip_is_bit_exact(loaded, tmp_path):
    _, directory, _, _ = loaded
    cfg, params = nj.load_hf(directory, param_dtype="bfloat16")
    assert params["layers_1"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
    assert params["layers_2"]["mixer"]["router_kernel"].dtype == jnp.float32
    nj.save_hf(cfg, params, str(tmp_path / "bf16"))
    _, again = nj.load_hf(str(tmp_path / "bf16"))
    _assert_params_bit_equal(params, again)


def test_load_places_arrays_with_the_given_sharding(loaded):
    _, directory, _, _ = loaded
    devices = np.array(jax.devices()[:2])
    mesh = jax.sharding.Mesh(devices, ("model",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split_experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))

    def choose(path, shape):
        return split_experts if path[-1].startswith("experts_") else replicated

    _, params = nj.load_hf(directory, shardings=choose)
    up = params["layers_2"]["mixer"]["experts_up_proj"]
    assert up.sharding == split_experts and len(up.addressable_shards) == 2
    assert up.addressable_shards[0].data.shape[0] == up.shape[0] // 2
    assert params["lm_head"]["kernel"].sharding == replicated


def _rewrite_checkpoint(source, target, edit):
    """Copies a single-file checkpoint with its tensors passed through `edit(dict) -> dict`."""
    os.makedirs(target)
    with open(os.path.join(source, "config.json")) as f:
        config = f.read()
    with open(os.path.join(target, "config.json"), "w") as f:
        f.write(config)
    tensors = {info.name: array for info, array in safetensors_io.iterate_tensors(
        safetensors_io.checkpoint_files(source))}
    safetensors_io.write_shard(os.path.join(target, "model.safetensors"), edit(tensors))


def test_missing_extra_and_misshaped_tensors_are_named(loaded, tmp_path):
    _, directory, _, _ = loaded
    name = "backbone.layers.2.mixer.experts.3.up_proj.weight"

    _rewrite_checkpoint(directory, str(tmp_path / "missing"), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match="missing tensors.*experts.3.up_proj"):
        nj.load_hf(str(tmp_path / "missing"))

    _rewrite_checkpoint(directory, str(tmp_path / "extra"),
                        lambda t: {**t, "backbone.layers.0.mixer.rotary.inv_freq": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*rotary.inv_freq"):
        nj.load_hf(str(tmp_path / "extra"))

    # Multi-token-prediction heads (not part of the model, as in transformers) are skipped, and said so.
    _rewrite_checkpoint(directory, str(tmp_path / "mtp"),
                        lambda t: {**t, "mtp.layers.0.mixer.q_proj.weight": np.ones((4, 4), np.float32)})
    _, params = nj.load_hf(str(tmp_path / "mtp"))
    assert "mtp" not in params

    def misshape(tensors):
        tensors["backbone.layers.1.mixer.in_proj.weight"] = tensors["backbone.layers.1.mixer.in_proj.weight"][:-1]
        return tensors

    _rewrite_checkpoint(directory, str(tmp_path / "shape"), misshape)
    with pytest.raises(CheckpointError, match=r"in_proj.weight has shape \(197, 72\), expected \(198, 72\)"):
        nj.load_hf(str(tmp_path / "shape"))


def test_save_is_atomic_when_interrupted(loaded, tmp_path, monkeypatch):
    _, _, cfg, params = loaded
    calls = []

    def failing_write(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        safetensors_io.write_shard(path, tensors)

    from nemotron_jax.checkpoint import hf

    monkeypatch.setattr(hf, "write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        nj.save_hf(cfg, params, str(tmp_path / "out"), max_shard_bytes=40_000)
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor its staging directory is left
    monkeypatch.undo()

    nj.save_hf(cfg, params, str(tmp_path / "out"))
    with pytest.raises(FileExistsError):
        nj.save_hf(cfg, params, str(tmp_path / "out"))
    nj.save_hf(cfg, params, str(tmp_path / "out"), overwrite=True, max_shard_bytes=40_000)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "out")


def test_save_rejects_params_that_do_not_fit_the_config(loaded, tmp_path):
    _, _, cfg, params = loaded
    bad = jax.tree.map(lambda x: x, params)
    bad["norm_f"]["weight"] = jnp.ones(cfg.hidden_size + 1)
    with pytest.raises(CheckpointError, match=r"norm_f/weight has shape \(73,\), expected \(72,\)"):
        nj.save_hf(cfg, bad, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")

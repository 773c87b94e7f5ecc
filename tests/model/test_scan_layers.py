"""Scan over layers (`ModelConfig.scan_layers`) and remat policies: the layer plan, equality with the unrolled
model (logits, gradients, routing, decode, generation), per-layer names on checkpoint import/export."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.checkpoint import restore_params, save_params
from nemotron_jax.model import abstract_params, init_cache
from nemotron_jax.model.config import ModelConfig, parse_remat_policy
from nemotron_jax.model.layer_stack import (layer_location, layer_plan, map_layers, model_plan, stack_layers,
                                            unstack_layers)
from nemotron_jax.training.forward import policy_forward

# Two scanned segments ("ME*" x 2, "M-" x 2) covering all four kinds, then one unrolled MoE layer.
PATTERN = "ME*ME*M-M-E"
NANO = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


SMALL = dict(vocab_size=128, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, intermediate_size=32,
             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             moe_shared_expert_intermediate_size=16, moe_tile_rows=8, eos_token_id=None)
# One spec that uses every remat policy (one per layer kind).
ALL_POLICIES = ("mamba=nothing_saveable,moe=dots_saveable,attention=everything_saveable,"
                "mlp=dots_with_no_batch_dims_saveable")


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.preset("tiny", layer_pattern=PATTERN, **SMALL)
    scan_cfg = cfg.replace(scan_layers=True)
    params = nj.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    # Packed rows: runs crossing the 8-token Mamba chunks, and 1-token runs.
    segment_ids = jnp.asarray([[1] * 9 + [2] * 11, [1] * 18 + [2, 3]], jnp.int32)
    return cfg, scan_cfg, params, tokens, segment_ids


def _step(cfg):
    """params, tokens, segment_ids -> ((loss, fresh ForwardOutput), grads, log-probs with every recorded
    expert choice shifted by one and replayed)."""

    def loss(params, tokens, segment_ids):
        out = policy_forward(cfg, params, tokens, jnp.roll(tokens, -1, axis=1), segment_ids)
        return -jnp.mean(out.logprobs), out

    def step(params, tokens, segment_ids):
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params, tokens, segment_ids)
        shifted = {name: (ids + 1) % cfg.n_routed_experts for name, ids in out.expert_ids.items()}
        replayed = policy_forward(cfg, params, tokens, tokens, segment_ids, expert_ids=shifted).logprobs
        return (value, out), grads, replayed

    return step


@functools.lru_cache(maxsize=None)
def _jitted_step(cfg):
    return jax.jit(_step(cfg))


def _assert_trees_close(actual, expected, rtol):
    flat_a, flat_e = jax.tree.leaves_with_path(actual), jax.tree.leaves_with_path(expected)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e):
        scale = float(jnp.max(jnp.abs(e))) or 1.0
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - e.astype(jnp.float32)))) / scale
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rtol}"


def test_layer_plan_covers_the_pattern_and_bounds_nano():
    plan = layer_plan(NANO, allow_optional=False)  # with optional positions: one segment, see below
    assert [(s.name, s.unit, s.repeats) for s in plan] == [
        ("scan_0_35", "MEMEM*E", 5), ("scan_35_41", "ME", 3), ("layers_41", "M", 1), ("layers_42", "*", 1),
        ("scan_43_51", "EM", 4), ("layers_51", "E", 1)]
    assert sum(len(s.unit) for s in plan) == 14  # layers XLA compiles, of 52
    rng = random.Random(0)
    for _ in range(200):
        pattern = "".join(rng.choice("ME*-") for _ in range(rng.randint(1, 30)))
        plan = layer_plan(pattern)
        assert "".join(s.pattern for s in plan) == pattern
        assert plan[0].start == 0 and all(a.stop == b.start for a, b in zip(plan, plan[1:]))
        assert sum(len(s.unit) + (s.repeats > 1) for s in plan) <= len(pattern)
    cfg = ModelConfig.preset("tiny", layer_pattern=PATTERN, scan_layers=True)
    assert layer_location(cfg, 4) == (("scan_0_6", "block_1"), 1)
    assert layer_location(cfg, 10) == (("layers_10",), None)


def test_config_validation_and_policy_parsing():
    assert parse_remat_policy("dots_saveable")["mamba"] == "dots_saveable"
    assert parse_remat_policy("mamba=nothing_saveable, moe=dots_saveable") == {
        "mamba": "nothing_saveable", "attention": "none", "moe": "dots_saveable", "mlp": "none"}
    for bad, needle in [("sometimes", "unknown policy"), ("moe=often", "unknown policy"),
                        ("experts=nothing_saveable", "unknown layer kind"),
                        ("moe=dots_saveable,moe=none", "given twice")]:
        with pytest.raises(ValueError, match=f"ModelConfig.remat_policy: .*{needle}"):
            ModelConfig.preset("tiny", remat_policy=bad)
    with pytest.raises(ValueError, match="ModelConfig.scan_layers"):
        ModelConfig.preset("tiny", scan_layers="yes")
    assert "scan_layers" not in ModelConfig.preset("tiny").to_hf_config()


def test_scan_equals_unrolled_logits_grads_and_routing(setup):
    cfg, scan_cfg, params, tokens, segment_ids = setup
    scan_params = stack_layers(scan_cfg, params)
    # A scanned init has the same tree as the stacked per-layer one.
    abstract = abstract_params(scan_cfg)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                  scan_params)
    assert abstract["scan_0_6"]["block_2"]["mixer"]["q_proj"]["kernel"].shape[0] == 2

    (loss, out), grads, replayed = _jitted_step(cfg)(params, tokens, segment_ids)
    (scan_loss, scan_out), scan_grads, scan_replayed = _jitted_step(scan_cfg)(scan_params, tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(scan_out.logprobs), np.asarray(out.logprobs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-6)
    _assert_trees_close(unstack_layers(scan_cfg, scan_grads), grads, 1e-5)
    # The recorded routing comes back under per-layer names, equal to the unrolled model's.
    assert sorted(scan_out.expert_ids) == sorted(out.expert_ids) == ["layers_1", "layers_10", "layers_4"]
    for name in out.expert_ids:
        np.testing.assert_array_equal(np.asarray(scan_out.expert_ids[name]), np.asarray(out.expert_ids[name]))
    # Router replay through the scan: forcing other experts changes the result exactly as unrolled.
    np.testing.assert_allclose(np.asarray(scan_replayed), np.asarray(replayed), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(scan_replayed), np.asarray(scan_out.logprobs), atol=1e-3)
    with pytest.raises(ValueError, match="all or none"):
        jax.eval_shape(lambda p: policy_forward(scan_cfg, p, tokens, tokens, segment_ids,
                                                expert_ids={"layers_1": out.expert_ids["layers_1"]}), scan_params)


def test_every_remat_policy_gives_the_same_grads(setup):
    cfg, scan_cfg, params, tokens, segment_ids = setup
    scan_params = stack_layers(scan_cfg, params)
    _, expected, _ = _jitted_step(scan_cfg)(scan_params, tokens, segment_ids)
    remat_cfg = scan_cfg.replace(remat_policy=ALL_POLICIES)
    _, grads, _ = _jitted_step(remat_cfg)(scan_params, tokens, segment_ids)
    _assert_trees_close(grads, expected, 1e-5)
    # The policies are really applied, scanned and unrolled: the backward recomputes (more remat in the jaxpr
    # than without a policy, where only the SSD scan's within-chunk remat is).
    def remats(config, tree):
        return str(jax.make_jaxpr(_step(config))(tree, tokens, segment_ids)).count("remat")

    for base, tree in ((scan_cfg, scan_params), (cfg, params)):
        config = remat_cfg if base.scan_layers else cfg.replace(remat_policy="nothing_saveable")
        assert remats(config, tree) > remats(base, tree)


def test_param_names_round_trip_through_hf_and_orbax(setup, tmp_path):
    cfg, scan_cfg, params, _, _ = setup
    scan_params = stack_layers(scan_cfg, params)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scan_cfg, scan_params), params)
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(scan_cfg, scan_params)

    # HF export of scanned params has the per-layer names; importing it with either setting gives the same.
    nj.save_hf(scan_cfg, scan_params, str(tmp_path / "hf"), max_shard_bytes=200_000)
    nj.save_hf(cfg, params, str(tmp_path / "hf_unrolled"))
    from nemotron_jax.checkpoint.safetensors_io import checkpoint_tensors
    assert sorted(checkpoint_tensors(str(tmp_path / "hf"))[1]) == sorted(
        checkpoint_tensors(str(tmp_path / "hf_unrolled"))[1])
    assert "backbone.layers.4.mixer.q_proj.weight" not in checkpoint_tensors(str(tmp_path / "hf"))[1]
    assert "backbone.layers.5.mixer.q_proj.weight" in checkpoint_tensors(str(tmp_path / "hf"))[1]
    _, loaded = nj.load_hf(str(tmp_path / "hf"), config=cfg)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, loaded_scan = nj.load_hf(str(tmp_path / "hf"), config=scan_cfg, shardings=sharding)
    jax.tree.map(np.testing.assert_array_equal, loaded_scan, scan_params)
    assert loaded_scan["scan_0_6"]["block_0"]["norm"]["weight"].sharding == sharding

    # Orbax keeps the layout the config says.
    save_params(scan_cfg, scan_params, str(tmp_path / "orbax"))
    restored_cfg, restored = restore_params(str(tmp_path / "orbax"))
    assert restored_cfg == scan_cfg
    jax.tree.map(np.testing.assert_array_equal, restored, scan_params)


def test_generation_with_scan_layers(setup):
    cfg, scan_cfg, params, _, _ = setup
    scan_params = stack_layers(scan_cfg, params)
    cache = init_cache(scan_cfg, 2, 8)
    assert cache["layers"]["scan_0_6"]["block_0"]["ssm"].shape[:2] == (2, 2)  # [repeats, batch, ...]
    assert "block_1" not in cache["layers"]["scan_0_6"]  # MoE layers have no cache
    repeated = map_layers(scan_cfg, lambda x: jnp.repeat(x, 3, axis=0), cache["layers"])
    assert repeated["scan_0_6"]["block_2"]["key"].shape[:2] == (2, 6)

    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    args = dict(max_new_tokens=4, n=2, seed=1, return_routing=True, temperature=0.7)
    expected = nj.generate(cfg, params, prompts, **args)
    result = nj.generate(scan_cfg, scan_params, prompts, **args)
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(expected.tokens))
    assert len(result.routing) == len(expected.routing) == 4
    for got, want in zip(result.routing, expected.routing):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(result.logprobs), np.asarray(expected.logprobs), rtol=1e-5, atol=1e-5)


# "M*E" x 5 with the attention present in repeats 1 and 3 only: one scanned segment whose body runs the
# attention layer of its repeat by index, or none (Nano's plan, "M*E" x 23 with 6 attention layers, in small).
OPTIONAL_PATTERN = "MEM*EMEM*EME"


def test_optional_layer_plan_for_nano_and_edge_patterns():
    (nano,) = layer_plan(NANO)
    assert (nano.name, nano.unit, nano.repeats, nano.optional_positions) == ("scan_0_52", "M*E", 23, (1,))
    assert nano.optional_layers(1) == [5, 12, 19, 26, 33, 42] and nano.pattern == NANO
    (segment,) = layer_plan(OPTIONAL_PATTERN)
    assert (segment.unit, segment.repeats, segment.absent) == ("M*E", 5, ((0, 1), (2, 1), (4, 1)))
    assert [segment.layer_index(r, p) for r, p in [(1, 0), (1, 1), (1, 2), (2, 0)]] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="absent"):
        segment.layer_index(0, 1)
    # Not one shape: two attention layers in one repeat, attention at varying places, MoE as the odd kind
    # ("M" x 6 with one "E": MoE layers sow routing and replay it, so they are never optional). A Mamba layer
    # can be: "ME ME E ME".
    assert layer_plan("MEMEEME")[0].absent == ((2, 0),)
    for pattern in ["M**EMEME", "M*EME*ME", "MMEMMMM"]:
        assert all(not s.absent for s in layer_plan(pattern)), pattern
    cfg = ModelConfig.preset("tiny", layer_pattern=OPTIONAL_PATTERN, scan_layers=True)
    assert [s.name for s in model_plan(cfg.replace(scan_optional_layers=False))] == [
        "scan_0_10", "layers_10", "layers_11"]  # "MEM*E" x 2, then two unrolled
    assert layer_location(cfg, 3) == (("layers_3",), None)
    assert layer_location(cfg, 5) == (("scan_0_12", "block_0"), 2)
    assert layer_location(cfg, 11) == (("scan_0_12", "block_2"), 4)


@pytest.fixture(scope="module")
def optional_setup():
    cfg = ModelConfig.preset("tiny", layer_pattern=OPTIONAL_PATTERN, **SMALL)
    params = nj.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 9 + [2] * 11, [1] * 18 + [2, 3]], jnp.int32)
    return cfg, cfg.replace(scan_layers=True), params, tokens, segment_ids


def test_optional_layers_scan_equals_unrolled_and_keeps_names(optional_setup, tmp_path):
    cfg, scan_cfg, params, tokens, segment_ids = optional_setup
    scan_params = stack_layers(scan_cfg, params)
    assert sorted(k for k in scan_params if k.startswith(("layers_", "scan_"))) == ["layers_3", "layers_8",
                                                                                    "scan_0_12"]
    assert sorted(scan_params["scan_0_12"]) == ["block_0", "block_2"]
    abstract = abstract_params(scan_cfg)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                  scan_params)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scan_cfg, scan_params), params)

    (loss, out), grads, replayed = _jitted_step(cfg)(params, tokens, segment_ids)
    (scan_loss, scan_out), scan_grads, scan_replayed = _jitted_step(scan_cfg)(scan_params, tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(scan_out.logprobs), np.asarray(out.logprobs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-6)
    _assert_trees_close(unstack_layers(scan_cfg, scan_grads), grads, 1e-5)
    np.testing.assert_allclose(np.asarray(scan_replayed), np.asarray(replayed), rtol=1e-5, atol=1e-6)
    # Every attention layer matters (a scan that skipped or mixed them up would not match): zeroing the
    # second one's output projection changes the result.
    broken = jax.tree.map(lambda x: x, scan_params)
    broken["layers_8"]["mixer"]["o_proj"]["kernel"] = jnp.zeros_like(broken["layers_8"]["mixer"]["o_proj"]["kernel"])
    assert not np.allclose(np.asarray(_jitted_step(scan_cfg)(broken, tokens, segment_ids)[0][0]), float(loss))

    nj.save_hf(scan_cfg, scan_params, str(tmp_path / "hf"))
    _, loaded = nj.load_hf(str(tmp_path / "hf"), config=scan_cfg)
    jax.tree.map(np.testing.assert_array_equal, loaded, scan_params)

    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    args = dict(max_new_tokens=4, n=2, seed=1, temperature=0.7)
    expected = nj.generate(cfg, params, prompts, **args)
    result = nj.generate(scan_cfg, scan_params, prompts, **args)
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(result.logprobs), np.asarray(expected.logprobs), rtol=1e-5, atol=1e-5)

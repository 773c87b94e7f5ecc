"""Sharded runs equal the single-device run: expert parallelism (both transports where they run), the sharding
rules for the whole model, params created and loaded directly sharded, and start-up errors for meshes that
cannot split the model. Eight fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import nemotron_jax as nj
from nemotron_jax import parallel
from nemotron_jax.model.moe import dispatch_experts
from nemotron_jax.model.params import abstract_params

MESHES = ["expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"]
# CPU runs the dense capacity-padded transport; ragged_all_to_all does not compile on XLA:CPU (lowered below).
CPU_TRANSPORTS = ["all_to_all"]


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.fixture(scope="module")
def small():
    """A tiny MoE model with all three mixers the mesh splits (Mamba, attention, MoE + shared expert)."""
    cfg = nj.ModelConfig.preset("tiny", layer_pattern="M*E", moe_ep_transport="all_to_all")
    params = nj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    return cfg, params, tokens


def _loss_and_logits(cfg):
    model = nj.NemotronH(cfg)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        logprobs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], -1)), logits

    return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope="module")
def single_device(small):
    cfg, params, tokens = small
    (loss, logits), grads = jax.jit(_loss_and_logits(cfg))(params, tokens)
    return loss, logits, grads


@pytest.mark.parametrize("transport", CPU_TRANSPORTS)
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_model_equals_single_device(small, single_device, mesh_spec, transport):
    cfg, params, tokens = small
    cfg = cfg.replace(moe_ep_transport=transport)
    mesh = parallel.make_mesh(mesh_spec)
    sharded = parallel.init_sharded_params(cfg, jax.random.key(0), mesh)  # created in place
    # Created straight into the rules' shardings, with the single-device values.
    want = parallel.param_shardings(params, mesh)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), sharded, want)))
    split = sum(any(s.spec) for s in jax.tree.leaves(want))
    assert split == (2 if mesh_spec != MESHES[-1] else 19)  # expert weights only, or every split leaf
    # (to float32 rounding: XLA may evaluate an initializer such as A_log = log(1..H) per shard)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), sharded, params)

    step = parallel.MeshJit(_loss_and_logits(cfg), mesh, in_shardings=(want, parallel.batch_sharding(mesh)))
    (loss, logits), grads = step(sharded, tokens)
    ref_loss, ref_logits, ref_grads = single_device
    assert _rel_err(loss, ref_loss) <= 1e-5
    assert _rel_err(logits, ref_logits) <= 1e-5
    flat, ref_flat = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)
    errors = {jax.tree_util.keystr(path): _rel_err(g, r) for (path, g), r in zip(flat, ref_flat)}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    # The program exchanged tokens between expert shards (expert parallelism ran) on meshes that have them.
    if parallel.mesh_axis_size(mesh, "expert") > 1:
        hlo = step.lower(sharded, tokens).compile().as_text()
        assert " all-to-all(" in hlo


def _dispatch_problem(num_tokens=32, dim=8, width=6, experts=8, top_k=2, adversarial=False, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(num_tokens, dim)), jnp.float32)
    if adversarial:  # every copy of every token to expert 0 and expert 5
        ids = np.tile(np.asarray([[0, 5]], np.int32), (num_tokens, 1))
    else:
        ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    weights = jnp.asarray(rng.random((num_tokens, top_k)), jnp.float32)
    up = jnp.asarray(rng.normal(size=(experts, dim, width)) / 3, jnp.float32)
    down = jnp.asarray(rng.normal(size=(experts, width, dim)) / 3, jnp.float32)
    return hidden, jnp.asarray(ids), weights, up, down


@pytest.mark.parametrize("mesh_spec,adversarial,tokens_per_exchange", [
    ("expert=8", False, 1024), ("expert=8", True, 1024),
    ("fsdp=2,expert=2,tensor=2", False, 1024), ("fsdp=2,expert=2,tensor=2", True, 1024),
    ("expert=4,data=2", True, 3),  # 4 local tokens in 2 exchanges of 3 (the last padded)
])
def test_dispatch_drops_nothing_and_differentiates(mesh_spec, adversarial, tokens_per_exchange):
    """Every token's copies come back, whatever the routing (adversarial: all tokens to the same two experts,
    both on one device), and gradients w.r.t. tokens, routing weights and expert weights match
    `dispatch_experts`; also when each device's tokens go through the exchange in several chunks."""
    hidden, ids, weights, up, down = _dispatch_problem(adversarial=adversarial)
    mesh = parallel.make_mesh(mesh_spec)

    def objective(dispatch):
        def f(hidden, weights, up, down):
            out = dispatch(hidden, ids, weights, up, down)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    (ref_value, ref_out), ref_grads = jax.jit(objective(lambda *a: dispatch_experts(*a, tile_rows=8)))(
        hidden, weights, up, down)
    ep = objective(lambda *a: parallel.expert_parallel_dispatch(*a, mesh=mesh, transport="all_to_all",
                                                                tile_rows=8, tokens_per_exchange=tokens_per_exchange))
    (value, out), grads = jax.jit(ep)(hidden, weights, up, down)
    assert _rel_err(out, ref_out) <= 1e-5
    assert np.all(np.abs(np.asarray(out)).sum(-1) > 0)  # no token lost its experts' output
    assert _rel_err(value, ref_value) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert _rel_err(got, want) <= 1e-5


def test_ragged_all_to_all_transport_lowers_with_its_gradient():
    """XLA:CPU cannot compile ragged_all_to_all, so here it is only lowered (forward and backward) for a
    mesh whose devices it would run on; the exchange sizes it is given are the ones the dense transport
    checks above."""
    hidden, ids, weights, up, down = _dispatch_problem()
    mesh = parallel.make_mesh("expert=4,data=2")

    def loss(hidden, up, down):
        out = parallel.expert_parallel_dispatch(hidden, ids, weights, up, down, mesh=mesh,
                                                transport="ragged_all_to_all", tile_rows=8)
        return jnp.sum(out ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(hidden, up, down).as_text()
    assert text.count("ragged_all_to_all") >= 4  # 2 forward exchanges, 2 in their transpose
    assert parallel.resolve_transport("auto", "gpu") == "ragged_all_to_all"
    assert parallel.resolve_transport("auto", "tpu") == "ragged_all_to_all"
    assert parallel.resolve_transport("auto", "cpu") == "all_to_all"
    with pytest.raises(ValueError, match="transport 'nccl'"):
        parallel.resolve_transport("nccl")


def test_mesh_that_does_not_divide_the_model_fails_at_start_up():
    cfg = nj.ModelConfig.preset("tiny", n_routed_experts=128)
    mesh = parallel.make_mesh("expert=3", devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"experts_(up|down)_proj: mesh axis expert=3 does not divide dimension 0 "
                                         r"\('expert', size 128\)"):
        parallel.validate_mesh(cfg, mesh)
    with pytest.raises(ValueError, match=r"axes .* need 16 devices, 8 are available"):
        parallel.make_mesh("fsdp=4,expert=4")
    # -1 takes the remaining devices; every logical axis of every parameter has a rule.
    mesh = parallel.make_mesh("data=-1,expert=2")
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    assert all(axis_type == jax.sharding.AxisType.Auto for axis_type in mesh.axis_types)
    names = parallel.param_logical_axes(abstract_params(
        nj.ModelConfig.preset("tiny", moe_latent_size=16, use_bias=True, mlp_bias=True)))
    rules = dict(parallel.logical_rules(mesh))
    assert all(name in rules for leaf in jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
               for name in leaf)
    with pytest.raises(ValueError, match="parameter layers_0/mixer/new_thing: no logical axis names"):
        parallel.logical_axes_of(("layers_0", "mixer", "new_thing"), 2)


def test_load_hf_places_each_tensor_in_its_sharding(small, tmp_path):
    cfg, params, _ = small
    nj.save_hf(cfg, params, str(tmp_path / "hf"))
    mesh = parallel.make_mesh("fsdp=2,expert=2,tensor=2")
    _, loaded = nj.load_hf(str(tmp_path / "hf"), shardings=parallel.param_sharding_fn(mesh))
    want = parallel.param_shardings(params, mesh)
    assert jax.tree.map(lambda x: x.sharding.spec, loaded) == jax.tree.map(lambda s: s.spec, want)
    expert_weights = loaded["layers_2"]["mixer"]["experts_up_proj"]
    assert expert_weights.sharding.spec == P("expert", "fsdp", "tensor")
    assert expert_weights.addressable_shards[0].data.shape == (4, 32, 16)  # 8 experts / 2, 64 / 2, 32 / 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)

"""The MoE layer (`ModelConfig.moe_backend`) for every grouped-matmul backend against a plain per-expert
reference: output and gradients w.r.t. the input, the expert weights, the shared expert and the router, in
float32 and bfloat16; and a jaxpr walk showing that no backend builds a [tokens, experts, hidden/width]
intermediate.

Shapes are fixed per (backend, dtype) and the routing enters as replayed `expert_ids` (traced), so each
backend compiles once while the cases (empty experts, every token on one expert, random draws) vary. The
Pallas backends run in interpret mode ("pallas_tpu", "pallas_gpu", "megablox"); tokamax runs "xla"."""

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemotron_jax.model import moe
from nemotron_jax.model.activations import relu2
from nemotron_jax.model.config import ModelConfig

BACKENDS = ["scan", "blocks", "ragged_dot", "tokamax", "pallas_tpu", "pallas_gpu", "megablox"]
# Distinct sizes so that every dimension of an intermediate can be named: rows (tokens, token copies and
# their padded/aligned forms) are all >= TOKENS, every weight dimension is smaller.
BATCH, LENGTH, HIDDEN, WIDTH, SHARED, EXPERTS, TOP_K, TILE = 2, 23, 12, 20, 28, 7, 2, 8
TOKENS = BATCH * LENGTH
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}  # relative Frobenius error; bfloat16: 8 mantissa bits


def _config(backend, dtype="float32"):
    return ModelConfig.preset("tiny", hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
                              n_group=1, topk_group=1, moe_intermediate_size=WIDTH,
                              moe_shared_expert_intermediate_size=SHARED, moe_backend=backend, moe_tile_rows=TILE,
                              param_dtype=dtype, compute_dtype=dtype, initializer_range=0.3)


def _reference(cfg, params, x, expert_ids):
    """Every token through every expert in float32, masked by the routing: the obvious form."""
    tokens = x.reshape(-1, HIDDEN).astype(jnp.float32)
    routing = moe.route(tokens, params["router_kernel"], jax.lax.stop_gradient(params["e_score_correction_bias"]),
                        top_k=TOP_K, routed_scaling_factor=cfg.routed_scaling_factor, expert_ids=expert_ids)
    up, down = (params[name].astype(jnp.float32) for name in ("experts_up_proj", "experts_down_proj"))
    out = jnp.zeros_like(tokens)
    for e in range(EXPERTS):
        weight = jnp.sum(jnp.where(routing.expert_ids == e, routing.expert_weights, 0.0), axis=1)
        out = out + weight[:, None] * (relu2(tokens @ up[e]) @ down[e])
    shared = params["shared_experts"]
    out = out + relu2(tokens @ shared["up_proj"]["kernel"].astype(jnp.float32)) @ shared["down_proj"]["kernel"].astype(
        jnp.float32)
    return out.reshape(x.shape)


@functools.cache
def _setup(dtype):
    rng = np.random.default_rng(0)
    # Drawn directly (the layer's init runs a forward: seconds of CI time); the tree is checked against it
    # in `test_params_tree_matches_the_layer`.
    normal = lambda *shape: jnp.asarray(0.3 * rng.normal(size=shape), dtype)  # noqa: E731
    params = {"router_kernel": jnp.asarray(0.3 * rng.normal(size=(HIDDEN, EXPERTS)), jnp.float32),
              "e_score_correction_bias": jnp.asarray(0.1 * rng.normal(size=EXPERTS), jnp.float32),
              "experts_up_proj": normal(EXPERTS, HIDDEN, WIDTH), "experts_down_proj": normal(EXPERTS, WIDTH, HIDDEN),
              "shared_experts": {"up_proj": {"kernel": normal(HIDDEN, SHARED)},
                                 "down_proj": {"kernel": normal(SHARED, HIDDEN)}}}
    x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, HIDDEN)), dtype)
    probe = jnp.asarray(rng.normal(size=(BATCH, LENGTH, HIDDEN)), jnp.float32)
    return params, x, probe


def test_params_tree_matches_the_layer():
    params, x, _ = _setup("bfloat16")
    abstract = jax.eval_shape(moe.MoE(_config("scan", "bfloat16")).init, jax.random.key(0), x)["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)


@functools.cache
def _compiled(backend, dtype):
    """jit((params, x, probe, expert_ids) -> (out, (d params, d x))) for the layer or the reference."""
    cfg = _config("scan" if backend == "reference" else backend, dtype)
    if backend == "reference":
        apply = functools.partial(_reference, cfg)
    else:
        layer = moe.MoE(cfg)
        apply = lambda params, x, ids: layer.apply({"params": params}, x, expert_ids=ids)  # noqa: E731

    def run(params, x, probe, ids):
        out = apply(params, x, ids)
        loss = lambda params, x: jnp.sum(apply(params, x, ids).astype(jnp.float32) * probe)  # noqa: E731
        return out, jax.grad(loss, argnums=(0, 1))(params, x)

    return jax.jit(run)


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _check(backend, dtype, ids):
    params, x, probe = _setup(dtype)
    ids = jnp.asarray(ids, jnp.int32)
    got = _compiled(backend, dtype)(params, x, probe, ids)
    # The reference runs in float32 on the same (possibly bfloat16) values.
    params32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    want = _compiled("reference", "float32")(params32, x32, probe, ids)
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, value), expected in zip(flat_got, flat_want):
        name = jax.tree_util.keystr(path)
        if "e_score_correction_bias" in name:  # selection only: no gradient
            assert not np.any(np.asarray(value, np.float32)), name
            continue
        error = _relative_error(value, expected)
        assert error < TOLERANCE[dtype], f"{backend} {dtype} {name}: relative error {error:.2e}"


def _distinct_ids(rng, choose):
    """[TOKENS, TOP_K] distinct experts per token, drawn by `choose(token) -> expert probabilities`."""
    return np.stack([rng.choice(EXPERTS, TOP_K, replace=False, p=choose(t)) for t in range(TOKENS)])


def _edge_routings():
    rng = np.random.default_rng(3)
    uniform = lambda t: None  # noqa: E731
    skewed = np.array([0.0, 0.5, 0.0, 0.3, 0.0, 0.2, 0.0])  # experts 0, 2, 4, 6 empty; sizes not tile multiples
    one = np.full((TOKENS, TOP_K), 0)
    one[:, 0] = 4  # every token on expert 4 (46 rows: 5 full tiles and a partial one)
    one[:, 1] = rng.integers(0, 4, TOKENS)
    return {"uniform": _distinct_ids(rng, uniform), "empty_experts": _distinct_ids(rng, lambda t: skewed),
            "all_tokens_on_one_expert": one}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_per_expert_reference(backend, dtype):
    for ids in _edge_routings().values():
        _check(backend, dtype, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_layer_random_routing_property(backend, data):
    """Random expert loads: a random subset of experts gets all the traffic, with random skew."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    live = data.draw(st.lists(st.booleans(), min_size=EXPERTS, max_size=EXPERTS).filter(lambda m: sum(m) >= TOP_K))
    probabilities = np.asarray(live, float) * rng.random(EXPERTS) + 1e-9 * np.asarray(live)
    probabilities /= probabilities.sum()
    _check(backend, "float32", _distinct_ids(rng, lambda t: probabilities))


def test_layer_routes_one_token_itself():
    """A single token with the router's own choice (no replay), through "auto" ("blocks" on CPU)."""
    params, x, probe = _setup("float32")
    layer = moe.MoE(_config("auto"))
    out, state = jax.jit(lambda params, x: layer.apply({"params": params}, x, mutable=["intermediates"]))(
        params, x[:1, :1])
    ids = state["intermediates"]["expert_ids"][0]
    assert ids.shape == (1, TOP_K)
    want = jax.jit(functools.partial(_reference, _config("auto")))(params, x[:1, :1], ids)
    assert _relative_error(out, want) < 1e-5


# -------------------------------------------------------------------------------------- no [N, E, D]
def _avals(jaxpr):
    """Every variable's abstract value in `jaxpr` and all sub-jaxprs (scan/cond/custom_vjp/pallas bodies)."""
    for eqn in jaxpr.eqns:
        for var in list(eqn.invars) + list(eqn.outvars):
            if hasattr(var, "aval"):
                yield eqn.primitive.name, var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _avals(sub)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_by_experts_by_features_intermediate(backend):
    params, x, probe = _setup("float32")
    ids = jnp.asarray(_edge_routings()["uniform"], jnp.int32)
    layer = moe.MoE(_config(backend))

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x, expert_ids=ids) * probe)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(params, x).jaxpr
    seen, offending = 0, []
    for primitive, aval in _avals(jaxpr):
        shape = getattr(aval, "shape", ())
        seen += 1
        has_rows = any(d >= TOKENS for d in shape)
        if has_rows and EXPERTS in shape and (HIDDEN in shape or WIDTH in shape):
            offending.append((primitive, shape))
    assert seen > 50  # the walk reached the layer's equations
    assert not offending, f"{backend}: {offending[:5]}"


def test_jaxpr_walk_catches_a_dense_dispatch():
    """The check above fails on the obvious all-experts form (so it can fail)."""
    params, x, probe = _setup("float32")

    def dense(x):  # [N, E, F]: every token through every expert at once
        tokens = x.reshape(-1, HIDDEN)
        return jnp.einsum("nd,edf->nef", tokens, params["experts_up_proj"]).sum()

    shapes = [aval.shape for _, aval in _avals(jax.make_jaxpr(dense)(x).jaxpr)]
    assert (TOKENS, EXPERTS, WIDTH) in shapes


def _compiled_shapes(backend):
    """Every array shape in the optimised XLA:CPU program of the layer's forward+backward."""
    params, x, probe = _setup("float32")
    ids = jnp.asarray(_edge_routings()["uniform"], jnp.int32)
    text = _compiled(backend, "float32").lower(params, x, probe, ids).compile().as_text()
    return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\b[a-z]+[0-9]*\[([0-9,]+)\]", text)}


def _tokens_by_experts_by_features(shapes):
    return [s for s in shapes if any(d >= TOKENS for d in s) and EXPERTS in s and (HIDDEN in s or WIDTH in s)]


def test_cpu_default_compiles_without_tokens_by_experts_buffers():
    """Below the jaxpr: XLA:CPU's program for "blocks" (the CPU default) has no such buffer either."""
    shapes = _compiled_shapes("blocks")
    assert len(shapes) > 10
    assert not _tokens_by_experts_by_features(shapes)


def test_xla_cpu_ragged_dot_builds_the_dense_buffer():
    """Why "ragged_dot" (and tokamax's "xla" implementation, which calls it) is slow on CPU: XLA:CPU lowers
    `lax.ragged_dot` to a masked dense product over all experts. Documents the README's claim; if XLA stops
    doing this, update the README's MoE figures."""
    assert _tokens_by_experts_by_features(_compiled_shapes("ragged_dot"))

"""MoE routing capture (sown expert ids) and replay (forcing recorded ids in a later forward)."""

import jax
import jax.numpy as jnp
import numpy as np

import nemotron_jax as nj


def test_capture_and_replay_routing():
    cfg = nj.ModelConfig.preset("tiny")
    params = nj.init_params(cfg, jax.random.key(0))
    model = nj.NemotronH(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    logits, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(params, tokens)
    recorded = {name: value["mixer"]["expert_ids"][0] for name, value in state["intermediates"].items()
                if "mixer" in value}
    assert sorted(recorded) == ["layers_2", "layers_5"]  # the two 'E' layers of "M*EM-E"
    assert recorded["layers_2"].shape == (2 * 20, cfg.num_experts_per_tok)

    replay = jax.jit(lambda p, t, ids: model.apply({"params": p}, t, expert_ids=ids))
    np.testing.assert_allclose(np.asarray(replay(params, tokens, recorded)), np.asarray(logits), rtol=1e-6)
    shifted = {name: (ids + 1) % cfg.n_routed_experts for name, ids in recorded.items()}
    assert not np.allclose(np.asarray(replay(params, tokens, shifted)), np.asarray(logits), atol=1e-4)

    # Replayed routing still sends gradients to the router through the recomputed weights.
    grads = jax.grad(lambda p: replay(p, tokens, recorded).sum())(params)
    assert float(jnp.abs(grads["layers_2"]["mixer"]["router_kernel"]).max()) > 0

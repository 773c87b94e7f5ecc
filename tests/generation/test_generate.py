"""Generation: the cached prefill/decode path agrees with the full-sequence forward and with transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.generation import sampling_logprobs


@pytest.fixture(scope="module")
def tiny():
    cfg = nj.ModelConfig.preset("tiny", eos_token_id=None)
    params = nj.init_params(cfg, jax.random.key(3))
    return cfg, params


def test_sampled_logprobs_match_full_forward(tiny, jit_apply):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 19, 1)]  # left padding of 14, 0, 18
    out = nj.generate(cfg, params, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        assert len(tokens) == 12
        sequence = jnp.asarray([prompt + tokens], jnp.int32)
        full = jit_apply(cfg)({"params": params}, sequence)[0]
        want = jax.nn.log_softmax(full[len(prompt) - 1:-1], axis=-1)
        want = np.take_along_axis(np.asarray(want), np.asarray(tokens)[:, None], axis=1)[:, 0]
        np.testing.assert_allclose(logprobs, want, atol=2e-4)


def test_stop_tokens_end_sequences_and_seed_is_deterministic(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [9]]
    first = nj.generate(cfg, params, prompts, max_new_tokens=10, temperature=1.0, seed=1)
    again = nj.generate(cfg, params, prompts, max_new_tokens=10, temperature=1.0, seed=1)
    assert first.tokens == again.tokens
    stop = first.tokens[0][3]
    stopped = nj.generate(cfg, params, prompts, max_new_tokens=10, temperature=1.0, seed=1, stop_token_ids=[stop])
    assert stopped.tokens[0] == first.tokens[0][:first.tokens[0].index(stop) + 1]
    assert stopped.finished[0]


def test_top_p_and_greedy_logprobs():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = np.exp(np.asarray(sampling_logprobs(logits, 1.0, top_p=0.7)))[0]
    np.testing.assert_allclose(nucleus, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sampling_logprobs(logits, 0.0))[0], np.log([0.5, 0.3, 0.15, 0.05]),
                               atol=1e-6)


def test_greedy_generation_matches_transformers(hf_checkpoints):
    import torch

    hf_model, directory = hf_checkpoints["base"]
    cfg, params = nj.load_hf(directory)
    prompt = [17, 3, 99, 250, 4, 8, 41]
    out = nj.generate(cfg, params, [prompt], max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    assert out.tokens[0] == want[0, len(prompt):].tolist()


def test_bad_prompts_are_rejected(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nj.generate(cfg, params, [[1, cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        nj.generate(cfg, params, [[]], max_new_tokens=2)

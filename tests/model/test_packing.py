"""Packed rows: sequences packed with `segment_ids` give the logits they give alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig.preset("tiny")  # chunk 16: the boundaries below fall inside and on chunk edges
    params = nj.init_params(cfg, jax.random.key(1))
    # A non-zero expert bias and spread-out routing make a routing mistake visible.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "e_score_correction_bias" in jax.tree_util.keystr(path) else x, params)
    return cfg, params


@pytest.mark.parametrize("lengths", [(37, 50), (16, 16, 9), (1, 30)])
def test_packed_logits_equal_separate_runs(tiny_model, jit_apply, lengths):
    cfg, params = tiny_model
    rng = np.random.default_rng(sum(lengths))
    sequences = [rng.integers(3, cfg.vocab_size, n) for n in lengths]
    row_length = 96
    tokens = np.zeros((1, row_length), np.int32)
    segment_ids = np.zeros((1, row_length), np.int32)  # 0 = padding
    start = 0
    for index, sequence in enumerate(sequences, start=1):
        tokens[0, start:start + len(sequence)] = sequence
        segment_ids[0, start:start + len(sequence)] = index
        start += len(sequence)
    apply = jit_apply(cfg)
    packed = np.asarray(apply({"params": params}, jnp.asarray(tokens), jnp.asarray(segment_ids)))
    start = 0
    for sequence in sequences:
        alone = np.asarray(apply({"params": params}, jnp.asarray(sequence[None].astype(np.int32))))[0]
        np.testing.assert_allclose(packed[0, start:start + len(sequence)], alone, rtol=1e-5,
                                   atol=1e-5 * np.abs(alone).max())
        start += len(sequence)


def test_packed_batches_from_the_data_pipeline(tmp_path, jit_apply):
    """The model-level packing check on batches produced by the SFT Grain pipeline."""
    import json

    from nemotron_jax.data import JsonlSource, SFTDataConfig, sft_dataset, train_sentencepiece

    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "expert", "token", "route", "reward", "policy", "answer", "solve"]
    conversations = []
    for _ in range(12):
        question = " ".join(rng.choice(words, rng.integers(2, 12)))
        answer = " ".join(rng.choice(words, rng.integers(1, 15)))
        conversations.append({"messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]})
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    tokenizer = train_sentencepiece([m["content"] for c in conversations for m in c["messages"]], vocab_size=300)
    batches = iter(sft_dataset(JsonlSource([str(path)]), tokenizer,
                               SFTDataConfig(row_length=256, batch_size=2, shuffle=False), shard_index=0,
                               shard_count=1))
    batch = next(batches)
    assert batch["segment_ids"].max() >= 2  # rows really are packed

    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    params = nj.init_params(cfg, jax.random.key(2))
    apply = jit_apply(cfg)
    packed = np.asarray(apply({"params": params}, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                              jnp.asarray(batch["positions"])))
    checked = 0
    for row in range(batch["tokens"].shape[0]):
        for segment in range(1, int(batch["segment_ids"][row].max()) + 1):
            where = np.flatnonzero(batch["segment_ids"][row] == segment)
            assert (batch["positions"][row, where] == np.arange(len(where))).all()
            alone = np.asarray(apply({"params": params}, jnp.asarray(batch["tokens"][row, where][None])))[0]
            np.testing.assert_allclose(packed[row, where], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
            checked += 1
    assert checked >= 3

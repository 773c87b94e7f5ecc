"""Grain pipelines: packed SFT batches and RL prompt batches -- resume from state, process sharding, bad records."""

import json

import numpy as np
import pytest

from nemotron_jax.data import (
    JsonlSource,
    OverlongExampleError,
    ParquetSource,
    RecordError,
    RLDataConfig,
    SFTDataConfig,
    render_chat,
    resolve_shard,
    rl_prompt_dataset,
    sft_dataset,
)


def _sft(path, tokenizer, shard=(0, 1), **overrides):
    """An iterator of the packed SFT pipeline over the JSONL file `path`."""
    settings = dict(row_length=160, batch_size=3, packing_window=16, seed=3, num_threads=2, prefetch_buffer_size=8)
    config = SFTDataConfig(**{**settings, **overrides})
    return iter(sft_dataset(JsonlSource(path), tokenizer, config, shard_index=shard[0], shard_count=shard[1]))


def _rl(source, tokenizer, shard=(0, 1), **overrides):
    """An iterator of the RL prompt pipeline over `source` (a JSONL path or a source object)."""
    settings = dict(batch_size=4, seed=1, num_threads=2, prefetch_buffer_size=8)
    config = RLDataConfig(**{**settings, **overrides})
    source = JsonlSource(source) if not hasattr(source, "__getitem__") else source
    return iter(rl_prompt_dataset(source, tokenizer, config, shard_index=shard[0], shard_count=shard[1]))


def _rendered_ids(records, tokenizer):
    """Rendered token ids of each record -> its position."""
    return {
        tuple(render_chat(record["messages"], tokenizer).token_ids.tolist()): index
        for index, record in enumerate(records)
    }


def _segments_to_records(batches, rendered, checker, pad_id):
    found = []
    for batch in batches:
        for tokens, _ in checker(batch, pad_id):
            found.append(rendered[tuple(tokens.tolist())])
    return found


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _ids(batches):
    return [[prompt.metadata["id"] for prompt in batch.prompts] for batch in batches]


# --------------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_sft_pipeline_packs_every_record_once(sft_jsonl, sft_records, tokenizer, strategy, packed_batch_checker):
    iterator = _sft(sft_jsonl, tokenizer, strategy=strategy)
    batches = list(iterator)
    for batch in batches:
        assert batch["tokens"].shape == (3, 160)
    found = _segments_to_records(batches, _rendered_ids(sft_records, tokenizer), packed_batch_checker, tokenizer.pad_id)
    assert sorted(found) == list(range(len(sft_records)))
    assert found != sorted(found)  # shuffled
    stats = iterator.stats
    assert stats.examples == len(sft_records) and stats.batches == len(batches)
    slots = len(batches) * 3 * 160
    padding = sum(int((b["segment_ids"] == 0).sum()) for b in batches)
    assert iterator.padding_fraction == pytest.approx(padding / slots)
    assert stats.as_dict()["padding_fraction"] == pytest.approx(padding / slots)
    assert stats.trained_tokens == sum(int(b["loss_mask"].sum()) for b in batches) > 0
    assert 0 < iterator.padding_fraction < 0.5


@pytest.mark.parametrize("stop_after", [0, 1, 2, 5, 9])
def test_sft_resume_from_state_yields_the_same_batches(sft_jsonl, sp_tokenizer, stop_after):
    iterator = _sft(sft_jsonl, sp_tokenizer, num_epochs=2)
    for _ in range(stop_after):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # a checkpoint is JSON
    expected = list(iterator)
    resumed = _sft(sft_jsonl, sp_tokenizer, num_epochs=2)
    resumed.set_state(state)
    _assert_same_batches(list(resumed), expected)
    assert resumed.stats.as_dict() == iterator.stats.as_dict()
    assert len(expected) > 0


def test_sft_resume_at_every_kind_of_step(sft_jsonl, sp_tokenizer):
    settings = dict(packing_window=7, batch_size=2)
    reference = list(_sft(sft_jsonl, sp_tokenizer, **settings))
    iterator = _sft(sft_jsonl, sp_tokenizer, **settings)
    states = []
    for _ in reference:
        states.append(iterator.get_state())
        next(iterator)
    # Both kinds of state occur: between windows, and part-way through a packed window.
    assert {state["rows_emitted"] > 0 for state in states} == {True, False}
    for step in (1, 2, 3, len(reference) // 2, len(reference) - 1):
        resumed = _sft(sft_jsonl, sp_tokenizer, **settings)
        resumed.set_state(states[step])
        _assert_same_batches(list(resumed), reference[step:])


def test_same_seed_same_batches_other_seed_other_order(sft_jsonl, sp_tokenizer):
    _assert_same_batches(list(_sft(sft_jsonl, sp_tokenizer, seed=5)), list(_sft(sft_jsonl, sp_tokenizer, seed=5)))
    assert not np.array_equal(next(_sft(sft_jsonl, sp_tokenizer, seed=5))["tokens"],
                              next(_sft(sft_jsonl, sp_tokenizer, seed=6))["tokens"])


def test_sft_process_sharding_is_disjoint_and_covers_all(sft_jsonl, sft_records, sp_tokenizer, packed_batch_checker):
    rendered = _rendered_ids(sft_records, sp_tokenizer)
    seen = [
        _segments_to_records(_sft(sft_jsonl, sp_tokenizer, shard=(shard, 2)), rendered, packed_batch_checker, 0)
        for shard in range(2)
    ]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(sft_records)))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_default_shard_is_the_jax_process():
    import jax

    assert resolve_shard(None, None) == (jax.process_index(), jax.process_count())
    with pytest.raises(ValueError, match="invalid shard 2 of 2"):
        resolve_shard(2, 2)


def test_sft_overlong_policy(tmp_path, sft_records, sp_tokenizer, jsonl_writer):
    records = sft_records[:20]
    records[7] = {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    jsonl_writer(path, records)
    with pytest.raises(OverlongExampleError, match=f"{path} line 8: [0-9]+ tokens do not fit a packed row of 160"):
        list(_sft(path, sp_tokenizer))
    for policy, counter in (("truncate", "truncated_examples"), ("skip", "skipped_overlong_examples")):
        iterator = _sft(path, sp_tokenizer, on_overlong=policy)
        list(iterator)
        assert getattr(iterator.stats, counter) == 1
        assert iterator.stats.examples == (20 if policy == "truncate" else 19)


def test_orbax_checkpoint_of_the_packed_iterator(tmp_path, sft_jsonl, sp_tokenizer):
    import grain
    import orbax.checkpoint as ocp

    iterator = _sft(sft_jsonl, sp_tokenizer)
    for _ in range(3):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = list(iterator)
        resumed = _sft(sft_jsonl, sp_tokenizer)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same_batches(list(resumed), expected)
    assert resumed.stats.as_dict() == iterator.stats.as_dict()


# -------------------------------------------------------------------------------------------- bad records


def _bad_sft_file(tmp_path, sft_records, jsonl_writer, malformed=True, missing=True):
    raw = {}
    if malformed:
        raw[4] = '{"messages": [{"role": "user", "content": "unterminated'  # line 5
    if missing:
        raw[8] = json.dumps({"conversation": []})  # line 9: no "messages"
    path = tmp_path / "bad_sft.jsonl"
    jsonl_writer(path, sft_records[:30], raw)
    return path


def test_malformed_json_line_fails_with_file_and_line(tmp_path, sft_records, sp_tokenizer, jsonl_writer):
    path = _bad_sft_file(tmp_path, sft_records, jsonl_writer, missing=False)
    with pytest.raises(RecordError) as caught:
        list(_sft(path, sp_tokenizer))
    assert (caught.value.path, caught.value.line) == (str(path), 5)
    assert f"{path} line 5" in str(caught.value) and "malformed JSON" in str(caught.value)


def test_missing_field_fails_with_file_line_and_field(tmp_path, sft_records, sp_tokenizer, jsonl_writer):
    path = _bad_sft_file(tmp_path, sft_records, jsonl_writer, malformed=False)
    with pytest.raises(RecordError) as caught:
        list(_sft(path, sp_tokenizer))
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 9, "messages")
    assert f"{path} line 9: field 'messages': missing" in str(caught.value)


def test_skip_bad_records_counts_them(tmp_path, sft_records, sp_tokenizer, jsonl_writer, packed_batch_checker):
    path = _bad_sft_file(tmp_path, sft_records, jsonl_writer)
    iterator = _sft(path, sp_tokenizer, on_bad_record="skip")
    batches = list(iterator)
    assert iterator.stats.bad_records_skipped == 2
    assert iterator.stats.examples == 28
    good = [record for position, record in enumerate(sft_records[:30]) if position not in (4, 8)]
    found = _segments_to_records(batches, _rendered_ids(good, sp_tokenizer), packed_batch_checker, 0)
    assert sorted(found) == list(range(28))


def test_skip_count_survives_resume(tmp_path, sft_records, sp_tokenizer, jsonl_writer):
    path = _bad_sft_file(tmp_path, sft_records, jsonl_writer)
    iterator = _sft(path, sp_tokenizer, on_bad_record="skip", packing_window=5)
    next(iterator)
    state = iterator.get_state()
    list(iterator)
    resumed = _sft(path, sp_tokenizer, on_bad_record="skip", packing_window=5)
    resumed.set_state(state)
    list(resumed)
    assert resumed.stats.bad_records_skipped == iterator.stats.bad_records_skipped == 2


# ---------------------------------------------------------------------------------------------------- RL


def test_rl_batches_carry_tokens_domain_reward_spec_and_metadata(tmp_path, rl_records, tokenizer, jsonl_writer):
    path = tmp_path / "rl.jsonl"
    jsonl_writer(path, rl_records)
    iterator = _rl(path, tokenizer)
    batches = list(iterator)
    prompts = [prompt for batch in batches for prompt in batch.prompts]
    assert sorted(p.metadata["id"] for p in prompts) == list(range(60))
    assert iterator.stats.prompts == 60 and iterator.stats.batches == 15
    by_id = {p.metadata["id"]: p for p in prompts}
    math, mcqa, instruction = by_id[0], by_id[1], by_id[2]
    assert (math.domain, math.reward_spec) == ("math", {"expected_answer": "0"})
    assert (mcqa.domain, mcqa.reward_spec["output_regex"]) == ("mcqa", r"Answer: ([A-D])")
    assert instruction.domain == "instruction_following"
    assert instruction.reward_spec["kwargs"] == [{}, {"relation": "at least", "num_words": 10}]
    assert tokenizer.decode(math.token_ids) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nproblem 0<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert math.source == f"{path} line 1"
    tokens, lengths = batches[0].padded_tokens(pad_id=tokenizer.pad_id)
    assert tokens.shape == (4, int(lengths.max())) and tokens.dtype == np.int32
    for row, prompt in enumerate(batches[0].prompts):
        np.testing.assert_array_equal(tokens[row, tokens.shape[1] - lengths[row] :], prompt.token_ids)
        assert (tokens[row, : tokens.shape[1] - lengths[row]] == tokenizer.pad_id).all()


def test_rl_instruct_mode_prompt(tmp_path, rl_records, sp_tokenizer, jsonl_writer):
    path = tmp_path / "rl.jsonl"
    jsonl_writer(path, rl_records[:4])
    batch = next(_rl(path, sp_tokenizer, enable_thinking=False))
    assert sp_tokenizer.decode(batch.prompts[0].token_ids).endswith("<|im_start|>assistant\n<think></think>")


@pytest.mark.parametrize("stop_after", [0, 2, 7])
def test_rl_resume_from_state(tmp_path, rl_records, sp_tokenizer, jsonl_writer, stop_after):
    path = tmp_path / "rl.jsonl"
    jsonl_writer(path, rl_records)
    iterator = _rl(path, sp_tokenizer, num_epochs=2, batch_size=7)
    for _ in range(stop_after):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _ids(iterator)
    resumed = _rl(path, sp_tokenizer, num_epochs=2, batch_size=7)
    resumed.set_state(state)
    assert _ids(resumed) == expected
    assert resumed.stats.as_dict() == iterator.stats.as_dict()


def test_rl_process_sharding_is_disjoint_and_covers_all(tmp_path, rl_records, sp_tokenizer, jsonl_writer):
    path = tmp_path / "rl.jsonl"
    jsonl_writer(path, rl_records[:59])  # odd count: shards differ by one
    seen = [sum(_ids(_rl(path, sp_tokenizer, shard=(shard, 2))), []) for shard in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(59))
    assert sorted(len(s) for s in seen) == [29, 30]


def test_rl_bad_records_raise_or_skip(tmp_path, rl_records, sp_tokenizer, jsonl_writer):
    records = rl_records[:12]
    raw = {3: "{not json", 6: json.dumps({"responses_create_params": {"input": "q"}})}  # line 7: no agent_ref
    path = tmp_path / "rl_bad.jsonl"
    jsonl_writer(path, records, raw)
    with pytest.raises(RecordError) as caught:
        list(_rl(path, sp_tokenizer, shuffle=False))
    assert (caught.value.line, caught.value.field) == (4, None)
    jsonl_writer(path, records, {6: raw[6]})
    with pytest.raises(RecordError, match=r"line 7: field 'agent_ref': missing"):
        list(_rl(path, sp_tokenizer))
    jsonl_writer(path, records, raw)
    iterator = _rl(path, sp_tokenizer, on_bad_record="skip")
    assert sorted(sum(_ids(iterator), [])) == [i for i in range(12) if i not in (3, 6)]
    assert iterator.stats.bad_records_skipped == 2


def test_rl_overlong_prompts(tmp_path, rl_records, sp_tokenizer, jsonl_writer):
    records = rl_records[:8]
    records[2] = {**records[2], "responses_create_params": {"input": "word " * 300}}
    path = tmp_path / "rl_long.jsonl"
    jsonl_writer(path, records)
    with pytest.raises(ValueError, match=r"line 3: prompt of (at least )?[0-9]+ tokens.* exceeds max_prompt_length=64"):
        list(_rl(path, sp_tokenizer, max_prompt_length=64))
    iterator = _rl(path, sp_tokenizer, max_prompt_length=64, on_overlong="skip")
    assert sum(len(batch) for batch in iterator) == 7
    assert iterator.stats.skipped_overlong_prompts == 1


def test_rl_drop_remainder(tmp_path, rl_records, sp_tokenizer, jsonl_writer):
    path = tmp_path / "rl.jsonl"
    jsonl_writer(path, rl_records[:10])
    assert [len(batch) for batch in _rl(path, sp_tokenizer, drop_remainder=True)] == [4, 4]
    assert [len(batch) for batch in _rl(path, sp_tokenizer)] == [4, 4, 2]


def test_rl_pipeline_over_parquet_with_union_schema(tmp_path, rl_records, sp_tokenizer, rl_parquet_writer):
    path = tmp_path / "rl.parquet"
    rl_parquet_writer(path, rl_records[:30], row_group_size=8)
    prompts = {p.metadata["id"]: p for batch in _rl(ParquetSource(path), sp_tokenizer) for p in batch.prompts}
    assert sorted(prompts) == list(range(30))
    assert prompts[2].reward_spec["kwargs"] == [{}, {"relation": "at least", "num_words": 10}]
    assert prompts[1].domain == "mcqa" and prompts[1].reward_spec["expected_answer"] == "B"
    assert prompts[0].source == f"{path} row 0"

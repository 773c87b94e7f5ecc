"""Shared fixtures for the data-layer tests: small tokenizers trained in the test session, record writers."""

from __future__ import annotations

import json
import random

import pytest

from nemotron_jax.data import CHAT_SPECIAL_TOKENS, HFTokenizer, train_sentencepiece

_WORDS = (
    "the answer is a number we add multiply divide think step first second final result so then "
    "question user assistant weather city paris london tool call value because therefore check"
).split()


def corpus(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 25))]
        lines.append(" ".join(words) + f" {rng.randint(0, 999)}.\n" + "Q: " + rng.choice(_WORDS).title() + "?")
    lines.append("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<think>\n</think>\n")
    return lines


@pytest.fixture(scope="session")
def sp_tokenizer():
    return train_sentencepiece(corpus(), vocab_size=420)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}})
    )
    return HFTokenizer.from_directory(directory)


@pytest.fixture(params=["sentencepiece", "huggingface"])
def tokenizer(request, sp_tokenizer, hf_tokenizer):
    return sp_tokenizer if request.param == "sentencepiece" else hf_tokenizer


def sft_record(index: int, rng: random.Random) -> dict:
    question = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 30)))
    record = {
        "messages": [
            {"role": "user", "content": f"q{index}: {question}"},
            {"role": "assistant", "content": f"answer {index}"},
        ]
    }
    if rng.random() < 0.7:
        record["messages"][1]["reasoning_content"] = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 40)))
    if rng.random() < 0.3:
        record["messages"].insert(0, {"role": "system", "content": "Be brief."})
    return record


def write_jsonl(path, records, raw_lines=None) -> None:
    """Writes records (dicts) as JSONL; `raw_lines` maps a 0-based record position to a raw line instead."""
    raw_lines = raw_lines or {}
    with open(path, "w", encoding="utf-8") as handle:
        for position, record in enumerate(records):
            handle.write(raw_lines.get(position, json.dumps(record)) + "\n")


@pytest.fixture
def sft_records():
    rng = random.Random(1)
    return [sft_record(index, rng) for index in range(120)]


@pytest.fixture
def sft_jsonl(tmp_path, sft_records):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, sft_records)
    return path


def rl_record(index: int, kind: str) -> dict:
    base = {"responses_create_params": {"input": [{"role": "user", "content": f"problem {index}"}]}, "id": index}
    if kind == "math":
        base.update(agent_ref={"type": "responses_api_agents", "name": "math_with_judge_simple_agent"},
                    expected_answer=str(index))
    elif kind == "mcqa":
        base.update(agent_ref="mcqa_simple_agent", expected_answer="B", output_regex=r"Answer: ([A-D])")
    else:
        base.update(
            agent_ref={"name": "instruction_following_simple_agent"},
            instruction_id_list=["punctuation:no_comma", "length_constraints:number_words"],
            kwargs=[{}, {"relation": "at least", "num_words": 10}],
        )
    return base


@pytest.fixture
def rl_records():
    kinds = ["math", "mcqa", "if"]
    return [rl_record(index, kinds[index % 3]) for index in range(60)]


@pytest.fixture
def jsonl_writer():
    return write_jsonl


def write_rl_parquet(path, records, row_group_size: int) -> None:
    """RL records as Parquet. Parquet needs one type per column: agent_ref as structs throughout. Arrow unifies
    the kwargs structs, so keys absent from a record come back as None (the parser drops them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        record = dict(record)
        if isinstance(record["agent_ref"], str):
            record["agent_ref"] = {"type": "responses_api_agents", "name": record["agent_ref"]}
        rows.append(record)
    columns = sorted({key for record in rows for key in record})
    table = pa.Table.from_pydict({key: [record.get(key) for record in rows] for key in columns})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def rl_parquet_writer():
    return write_rl_parquet


@pytest.fixture
def make_rl_record():
    return rl_record


@pytest.fixture
def make_sft_record():
    return sft_record


def check_packed_batch(batch, pad_id, examples_by_tokens=None):
    """Asserts the packed-batch invariants, independently of the library; returns the segments found.

    - every key is int32 [B, L];
    - segment ids are 1..n in order within a row, then only padding (0);
    - positions restart at 0 for each segment and count up by one;
    - targets[i] == tokens[i + 1] inside a segment; the last token of a segment and padding have target pad_id
      and loss_mask 0, so no target crosses a segment boundary;
    - loss_mask is 0 on padding.
    Returns a list of (tokens, shifted_loss_mask) per segment.
    """
    import numpy as np

    keys = ("tokens", "segment_ids", "positions", "targets", "loss_mask")
    assert set(batch) == set(keys)
    shape = batch["tokens"].shape
    for key in keys:
        assert batch[key].dtype == np.int32 and batch[key].shape == shape, key
    segments = []
    for row in range(shape[0]):
        seg = batch["segment_ids"][row]
        tokens, positions = batch["tokens"][row], batch["positions"][row]
        targets, mask = batch["targets"][row], batch["loss_mask"][row]
        used = int((seg != 0).sum())
        assert (seg[used:] == 0).all(), "padding only at the end of a row"
        assert (tokens[used:] == pad_id).all() and (targets[used:] == pad_id).all()
        assert (mask[used:] == 0).all() and (positions[used:] == 0).all()
        if used:
            assert seg[0] == 1 and (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        for segment_id in range(1, int(seg.max(initial=0)) + 1):
            where = np.flatnonzero(seg == segment_id)
            start, end = int(where[0]), int(where[-1]) + 1
            assert end - start == len(where), "segments are contiguous"
            assert (positions[start:end] == np.arange(end - start)).all()
            assert (targets[start : end - 1] == tokens[start + 1 : end]).all()
            assert targets[end - 1] == pad_id and mask[end - 1] == 0, "no target crosses a segment boundary"
            segments.append((tokens[start:end].copy(), mask[start:end].copy()))
    return segments


@pytest.fixture(scope="session")
def packed_batch_checker():
    return check_packed_batch

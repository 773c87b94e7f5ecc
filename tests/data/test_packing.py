"""Packing: first-fit / best-fit assignment, packed-row invariants, padding fraction, over-long policy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemotron_jax.data import (
    OverlongExampleError,
    RecordRef,
    TokenizedExample,
    assign_rows,
    build_packed_rows,
    pack_examples,
    padding_fraction,
)


def _example(length, seed, ref=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 1000, size=length).astype(np.int32)
    mask = (rng.random(length) < 0.5).astype(np.int32)
    return TokenizedExample(tokens, mask, ref)


def test_first_fit_and_best_fit_differ_as_defined():
    lengths = [5, 6, 4]
    assert assign_rows(lengths, 10, strategy="first_fit", sort_by_length=False) == [[0, 2], [1]]
    assert assign_rows(lengths, 10, strategy="best_fit", sort_by_length=False) == [[0], [1, 2]]
    # Decreasing order: 6, 5, 4 -> the 4 joins the 6.
    assert assign_rows(lengths, 10, strategy="first_fit") == [[1, 2], [0]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 32), min_size=0, max_size=40),
    strategy=st.sampled_from(["first_fit", "best_fit"]),
    sort_by_length=st.booleans(),
)
def test_assignment_places_every_item_once_within_capacity(lengths, strategy, sort_by_length):
    rows = assign_rows(lengths, 32, strategy=strategy, sort_by_length=sort_by_length)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert all(row for row in rows)
    # Any-fit property: at most one row is at most half full (else the later one's first item would have fit).
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert sum(load <= 16 for load in loads) <= 1


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=30),
    strategy=st.sampled_from(["first_fit", "best_fit"]),
)
def test_packed_rows_keep_segments_apart(lengths, strategy, packed_batch_checker):
    examples = [_example(length, seed) for seed, length in enumerate(lengths)]
    result = pack_examples(examples, 24, strategy=strategy, pad_id=0)
    segments = packed_batch_checker(result.batch, pad_id=0)
    # Each example appears exactly once, intact, with its loss mask shifted onto the targets.
    expected = sorted((tuple(e.token_ids), tuple(e.loss_mask[1:]) + (0,)) for e in examples)
    assert sorted((tuple(t), tuple(m)) for t, m in segments) == expected
    total = sum(lengths)
    assert result.padding_fraction == pytest.approx(1 - total / (len(result.rows) * 24))
    assert result.padding_fraction == pytest.approx(padding_fraction(result.batch))


def test_golden_packed_row():
    first = TokenizedExample(np.array([11, 12, 13], np.int32), np.array([0, 1, 1], np.int32))
    second = TokenizedExample(np.array([21, 22], np.int32), np.array([0, 1], np.int32))
    batch = build_packed_rows([first, second], [[0, 1]], 7, pad_id=9)
    np.testing.assert_array_equal(batch["tokens"], [[11, 12, 13, 21, 22, 9, 9]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[12, 13, 9, 22, 9, 9, 9]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 0, 1, 0, 0, 0]])


def test_padding_fraction_of_a_known_packing():
    examples = [_example(length, i) for i, length in enumerate([8, 8, 4, 4, 2])]
    result = pack_examples(examples, 10, strategy="best_fit")
    assert len(result.rows) == 3  # [8, 2], [8], [4, 4]
    assert result.padding_fraction == pytest.approx(4 / 30)


def test_overlong_policy():
    ref = RecordRef("train.jsonl", 42)
    examples = [_example(5, 0), _example(30, 1, ref), _example(7, 2)]
    with pytest.raises(OverlongExampleError, match="train.jsonl line 42: 30 tokens do not fit a packed row of 10"):
        pack_examples(examples, 10)
    truncated = pack_examples(examples, 10, on_overlong="truncate")
    assert truncated.num_truncated == 1 and truncated.num_skipped == 0
    assert sorted(sum(truncated.batch["segment_ids"][r] != 0) for r in range(len(truncated.rows))) == [5, 7, 10]
    skipped = pack_examples(examples, 10, on_overlong="skip")
    assert skipped.num_skipped == 1 and sorted(i for row in skipped.rows for i in row) == [0, 2]

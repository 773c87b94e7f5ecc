"""Packing of tokenized SFT examples into fixed-length rows.

A packed batch is a plain dict of numpy int32 arrays, all `[B, L]`:

  tokens       input token ids; `pad_id` in padding.
  segment_ids  1, 2, ..., n for the examples of a row, in order; 0 for padding.
  positions    position of each token inside its own example (restarts at 0 for each segment); 0 in padding.
  targets      next-token targets: `targets[b, i] = tokens[b, i + 1]` when token i+1 belongs to the same
               segment; `pad_id` at the last token of every segment and in padding, so no target ever crosses
               into the next example.
  loss_mask    1 where `targets[b, i]` is a trained token (an assistant token, per the chat template's mask),
               0 elsewhere; aligned with `targets`, i.e. already shifted by one relative to the tokens.

The loss of a batch is `sum(loss_mask * -log p(targets | tokens))`; attention must stay within a segment
(`segment_ids[q] == segment_ids[k] != 0`, causal), and `positions` feed the position encoding.

Bin packing: `first_fit` puts each example into the first row with room, `best_fit` into the row whose free
space is smallest but sufficient; with `sort_by_length=True` examples are taken longest first (first-fit /
best-fit decreasing), which packs tighter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from nemotron_jax.data.records import RecordRef

PACKED_BATCH_KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask")
PackingStrategy = Literal["first_fit", "best_fit"]


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One tokenized conversation: int32 [T] `token_ids` and int32 [T] `loss_mask` (per token, unshifted)."""

    token_ids: np.ndarray
    loss_mask: np.ndarray
    ref: RecordRef | None = None

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


class OverlongExampleError(ValueError):
    """An example longer than a packed row, with `on_overlong="raise"`."""

    def __init__(self, ref: RecordRef | None, length: int, row_length: int, at_least: bool = False):
        """`at_least`: `length` is a lower bound, from the text's length (the example was not tokenized)."""
        self.ref, self.length, self.row_length, self.at_least = ref, length, row_length, at_least
        where = str(ref) if ref is not None else "an example"
        count = f"{length} tokens"
        if at_least:
            count = f"at least {length} tokens (judged from its characters; not tokenized)"
        super().__init__(
            f"{where}: {count} do not fit a packed row of {row_length} tokens "
            "(raise row_length, or pass on_overlong='truncate' or 'skip' to truncate or drop and count such examples)"
        )

    def __reduce__(self):
        return (OverlongExampleError, (self.ref, self.length, self.row_length, self.at_least))


def assign_rows(
    lengths: Sequence[int],
    row_length: int,
    *,
    strategy: PackingStrategy = "best_fit",
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Assigns items to rows of capacity `row_length`.

    Args:
      lengths: item lengths, each in [1, row_length].
      row_length: row capacity.
      strategy: "first_fit" or "best_fit".
      sort_by_length: place items longest first (stable for equal lengths).

    Returns:
      rows, each a list of item indices in the order they were placed; rows in order of creation.
    """
    if strategy not in ("first_fit", "best_fit"):
        raise ValueError(f"strategy must be 'first_fit' or 'best_fit', got {strategy!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > row_length):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > row_length))[0])
        raise ValueError(f"item {bad} has length {int(lengths[bad])}, outside [1, {row_length}]")
    order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(lengths.size)
    free = np.zeros((max(1, lengths.size),), np.int64)  # free space per row, rows grow as needed
    rows: list[list[int]] = []
    for item in order:
        need = lengths[item]
        open_free = free[: len(rows)]
        fits = open_free >= need
        if fits.any():
            if strategy == "first_fit":
                row = int(np.argmax(fits))
            else:
                row = int(np.argmin(np.where(fits, open_free, np.iinfo(np.int64).max)))
        else:
            row = len(rows)
            rows.append([])
            free[row] = row_length
        rows[row].append(int(item))
        free[row] -= need
    return rows


def build_packed_rows(
    examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]], row_length: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Lays out `examples` in rows (`rows[r]` = example indices of row r, in order). Returns int32 [R, L] arrays
    under `PACKED_BATCH_KEYS` (see the module docstring)."""
    num_rows = len(rows)
    batch = {
        "tokens": np.full((num_rows, row_length), pad_id, np.int32),
        "segment_ids": np.zeros((num_rows, row_length), np.int32),
        "positions": np.zeros((num_rows, row_length), np.int32),
        "targets": np.full((num_rows, row_length), pad_id, np.int32),
        "loss_mask": np.zeros((num_rows, row_length), np.int32),
    }
    for row_index, members in enumerate(rows):
        cursor = 0
        for segment, example_index in enumerate(members, start=1):
            example = examples[example_index]
            length = len(example)
            end = cursor + length
            if end > row_length:
                raise ValueError(f"row {row_index} overflows: examples {list(members)} exceed {row_length} tokens")
            batch["tokens"][row_index, cursor:end] = example.token_ids
            batch["segment_ids"][row_index, cursor:end] = segment
            batch["positions"][row_index, cursor:end] = np.arange(length, dtype=np.int32)
            # Targets and their mask stop one token short of the segment's end: the last token predicts nothing.
            batch["targets"][row_index, cursor : end - 1] = example.token_ids[1:]
            batch["loss_mask"][row_index, cursor : end - 1] = example.loss_mask[1:]
            cursor = end
    return batch


def empty_packed_rows(num_rows: int, row_length: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """All-padding rows (segment_ids 0, loss_mask 0), int32 [num_rows, row_length]."""
    return build_packed_rows([], [[] for _ in range(num_rows)], row_length, pad_id=pad_id)


def fit_to_row(example: TokenizedExample, row_length: int, on_overlong: str) -> TokenizedExample | None:
    """Applies the over-long policy: the example itself if it fits; else raise / truncate / None (skip)."""
    if len(example) <= row_length:
        return example
    if on_overlong == "truncate":
        return TokenizedExample(example.token_ids[:row_length], example.loss_mask[:row_length], example.ref)
    if on_overlong == "skip":
        return None
    if on_overlong == "raise":
        raise OverlongExampleError(example.ref, len(example), row_length)
    raise ValueError(f"on_overlong must be 'raise', 'truncate' or 'skip', got {on_overlong!r}")


@dataclasses.dataclass(frozen=True)
class PackResult:
    """Result of `pack_examples`.

    Attributes:
      batch: int32 [R, L] arrays under `PACKED_BATCH_KEYS`.
      rows: example indices (into the input sequence) of each row.
      padding_fraction: padding tokens / (R * L).
      num_truncated: examples cut to `row_length` (on_overlong="truncate").
      num_skipped: examples dropped for being too long (on_overlong="skip").
    """

    batch: dict[str, np.ndarray]
    rows: list[list[int]]
    padding_fraction: float
    num_truncated: int
    num_skipped: int


def pack_examples(
    examples: Sequence[TokenizedExample],
    row_length: int,
    *,
    strategy: PackingStrategy = "best_fit",
    sort_by_length: bool = True,
    on_overlong: Literal["raise", "truncate", "skip"] = "raise",
    pad_id: int = 0,
) -> PackResult:
    """Packs examples into as few rows of `row_length` tokens as the strategy finds.

    Over-long examples (more than `row_length` tokens): "raise" (default) raises `OverlongExampleError` naming
    the record; "truncate" keeps the first `row_length` tokens; "skip" drops the example. Both are counted.
    Empty examples are dropped (they hold nothing to train on).
    """
    fitted: list[TokenizedExample] = []
    kept_indices: list[int] = []
    num_truncated = num_skipped = 0
    for index, example in enumerate(examples):
        result = fit_to_row(example, row_length, on_overlong)
        if result is None:
            num_skipped += 1
            continue
        if len(result) < len(example):
            num_truncated += 1
        if len(result) == 0:
            continue
        fitted.append(result)
        kept_indices.append(index)
    local_rows = assign_rows([len(e) for e in fitted], row_length, strategy=strategy, sort_by_length=sort_by_length)
    batch = build_packed_rows(fitted, local_rows, row_length, pad_id=pad_id)
    return PackResult(
        batch=batch,
        rows=[[kept_indices[i] for i in row] for row in local_rows],
        padding_fraction=padding_fraction(batch),
        num_truncated=num_truncated,
        num_skipped=num_skipped,
    )


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Fraction of the token slots of a packed batch that are padding (`segment_ids == 0`)."""
    segment_ids = batch["segment_ids"]
    return float((segment_ids == 0).sum() / segment_ids.size) if segment_ids.size else 0.0

"""Grain pipelines: packed SFT batches and RL prompt batches, shuffled, sharded by JAX process, resumable.

Both pipelines have the same front:

    grain.MapDataset.range(len(source))      record indices
      .shuffle(seed)                         a fresh permutation per epoch (seed combined with the epoch)
      .repeat(num_epochs)                    None: forever
      [shard_index::shard_count]             this process's share (default: jax.process_index()/process_count())
      .map(read + parse + chat template)     per-example work, run by Grain's reader threads (num_threads)
      .to_iter_dataset(ReadOptions)
      [.mp_prefetch(worker_count)]           optional worker processes for the per-example work

then `PackedSFTBatches` (packing into `[B, L]` rows) or `RLPromptBatches` (lists of prompts). The final
iterators have `get_state()` / `set_state()` (JSON-serialisable dicts) and resuming from a saved state yields
exactly the batches that would have followed; they also keep counters (`stats`), restored with the state.

Bad records: with `on_bad_record="raise"` (default) a malformed JSON line or a record missing a required
field raises `RecordError` naming the file, line and field. With `"skip"` it is dropped and counted in
`stats.bad_records_skipped` (the first few are logged).

Sharding strides over the shuffled, repeated index stream, so the shards of one epoch are disjoint and
together cover every record; shard sizes differ by at most one record per epoch. Multi-host training should
run a fixed number of steps over `num_epochs=None`, since packing gives each host a different row count.

Grain's multiprocessing (`worker_count > 0`) reads absl flags: the entry point must have parsed them
(`absl.app.run`, or `absl.flags.FLAGS.mark_as_parsed()`) and run under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import grain
import numpy as np

from nemotron_jax.data.chat_template import (
    CHAT_SPECIAL_TOKENS,
    ChatFormatError,
    ChatSegment,
    encode_segments,
    literal_control_strings,
    render_chat_segments,
)
from nemotron_jax.data.packing import (
    OverlongExampleError,
    PackingStrategy,
    TokenizedExample,
    assign_rows,
    build_packed_rows,
    empty_packed_rows,
    fit_to_row,
)
from nemotron_jax.data.records import (
    BadRecord,
    RecordError,
    RecordRef,
    SourceRecord,
    messages_as_dicts,
    parse_rl_prompt_record,
    parse_sft_record,
)
from nemotron_jax.data.tokenizer import Tokenizer

_LOG = logging.getLogger(__name__)
_LOGGED_BAD_RECORDS = 10  # per iterator

BadRecordPolicy = Literal["raise", "skip"]


class RecordSource(Protocol):
    """What the pipelines read from: `JsonlSource`, `ParquetSource`, `TfdsSource`, or any random-access
    sequence of `SourceRecord`s."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SourceRecord: ...


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """`(shard_index, shard_count)`, defaulting to this JAX process's index and the process count."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"invalid shard {shard_index} of {shard_count}")
    return shard_index, shard_count


def record_indices(
    num_records: int,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> grain.MapDataset:
    """The index stream of one shard: shuffled per epoch, repeated, then strided across shards."""
    if num_records == 0:
        raise ValueError("the source has no records")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    indices = grain.MapDataset.range(num_records)
    if shuffle:
        indices = indices.shuffle(seed=seed)
    indices = indices.repeat(num_epochs)
    return indices[shard_index::shard_count]


def _render_segments(messages, tools, tokenizer: Tokenizer, *, literal_content: bool, **options) -> list[ChatSegment]:
    return render_chat_segments(
        messages,
        tools=tools,
        literal_content=literal_content,
        control_strings=literal_control_strings(tokenizer) if literal_content else CHAT_SPECIAL_TOKENS,
        **options,
    )


def _min_tokens(segments: Sequence[ChatSegment], tokenizer: Tokenizer) -> int:
    """A lower bound on the token count of `segments`, from their length alone (0 if the tokenizer gives no
    bound): each token stands for at most `tokenizer.max_token_chars` characters."""
    per_token = tokenizer.max_token_chars
    return sum(len(segment.text) for segment in segments) // per_token if per_token else 0


def _cut_segments(segments: Sequence[ChatSegment], max_chars: int) -> list[ChatSegment]:
    """The first `max_chars` characters of the segments (for truncating a huge example before tokenizing)."""
    kept: list[ChatSegment] = []
    for segment in segments:
        if max_chars <= 0:
            break
        text = segment.text[:max_chars]
        kept.append(ChatSegment(text, segment.trained, tuple(b for b in segment.breaks if b < len(text))))
        max_chars -= len(text)
    return kept


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")


class _ReadAndConvert:
    """Grain map transform: record index -> converted record, or `BadRecord` under the skip policy.

    A picklable class (not a closure) so that Grain worker processes can run it.
    """

    def __init__(self, source: RecordSource, on_bad_record: BadRecordPolicy):
        self._source = source
        self._on_bad_record = on_bad_record

    def convert(self, record: SourceRecord) -> Any:
        raise NotImplementedError

    def __call__(self, index: int) -> Any:
        ref = None
        try:
            record = self._source[int(index)]
            ref = record.ref
            return self.convert(record)
        except ChatFormatError as error:
            error = RecordError(ref, error.field, error.reason)
            if self._on_bad_record == "raise":
                raise error from None
            return BadRecord(ref, str(error))
        except RecordError as error:
            if self._on_bad_record == "raise":
                raise
            return BadRecord(error.ref, str(error))


def _converted_records(
    source: RecordSource,
    convert: _ReadAndConvert,
    config: SFTDataConfig | RLDataConfig,
    shard_index: int | None,
    shard_count: int | None,
) -> grain.IterDataset:
    """The front both pipelines share: this shard's record indices, mapped through `convert` on Grain's reader
    threads (and worker processes when `config.worker_count > 0`)."""
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    indices = record_indices(
        len(source),
        seed=config.seed,
        shuffle=config.shuffle,
        num_epochs=config.num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    converted = indices.map(convert).to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    )
    if config.worker_count > 0:
        converted = converted.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return converted


class _CountingIterator(grain.DatasetIterator):
    """What the two batch iterators share: `stats`, a dataclass of int counters saved and restored with the
    state, and the counting (and logging of the first few) of skipped bad records."""

    def __init__(self, parent: grain.DatasetIterator, stats: PackingStats | RLPromptStats):
        super().__init__(parent)
        self.stats = stats
        self._bad_logged = 0

    def _skip_bad_record(self, record: BadRecord) -> None:
        self.stats.bad_records_skipped += 1
        if self._bad_logged < _LOGGED_BAD_RECORDS:
            self._bad_logged += 1
            _LOG.warning("skipping bad record: %s", record.error)

    def _restore_stats(self, saved: dict[str, Any]) -> None:
        names = [field.name for field in dataclasses.fields(self.stats)]
        self.stats = type(self.stats)(**{name: int(saved[name]) for name in names})


# ------------------------------------------------------------------------------------------------------ SFT


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """Settings of the packed SFT pipeline.

    Attributes:
      row_length: L, tokens per packed row.
      batch_size: B, rows per batch (per process).
      strategy: "best_fit" or "first_fit".
      sort_by_length: pack each window longest first (first-fit / best-fit decreasing).
      packing_window: examples packed together; the rows of a window are emitted in a seeded random order.
      on_overlong: examples longer than `row_length`: "raise" (names the record), "truncate" or "skip"
        (both counted in `stats`). An example whose rendered text is longer than `row_length` tokens can
        possibly hold (`row_length * tokenizer.max_token_chars` characters) is judged before tokenizing:
        raised or skipped untokenized, and for "truncate" only its first `2 * row_length * max_token_chars`
        characters are tokenized (tokens that far from the cut come out as in a full tokenization).
      on_bad_record: "raise" or "skip" (counted in `stats.bad_records_skipped`).
      enable_thinking: chat template mode. True keeps each sample's reasoning (samples without reasoning render
        as `<think></think>answer`); False renders every sample in instruct mode.
      train_on: "final" (assistant turns after the last user message) or "all" assistant turns.
      literal_content: False (default, as the released template): control strings such as `<|im_end|>` or
        `<think>` inside message content become control tokens. True: they are encoded as plain text, so
        content cannot inject template structure (see `chat_template`); clean content tokenizes the same.
      drop_remainder: drop a last incomplete batch; otherwise it is filled with all-padding rows.
      seed, shuffle, num_epochs: record order; `num_epochs=None` repeats forever.
      pad_id: None uses `tokenizer.pad_id`.
      num_threads, prefetch_buffer_size, worker_count: Grain reader threads / buffer / worker processes.
    """

    row_length: int
    batch_size: int
    strategy: PackingStrategy = "best_fit"
    sort_by_length: bool = True
    packing_window: int = 512
    on_overlong: Literal["raise", "truncate", "skip"] = "raise"
    on_bad_record: BadRecordPolicy = "raise"
    enable_thinking: bool = True
    train_on: Literal["final", "all"] = "final"
    literal_content: bool = False
    drop_remainder: bool = False
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    pad_id: int | None = None
    num_threads: int = 4
    prefetch_buffer_size: int = 256
    worker_count: int = 0


class TokenizeSFTRecord(_ReadAndConvert):
    """Record index -> `TokenizedExample` (chat template applied), or `BadRecord` under the skip policy."""

    def __init__(
        self,
        source: RecordSource,
        tokenizer: Tokenizer,
        *,
        enable_thinking: bool,
        train_on: str,
        on_bad_record: BadRecordPolicy,
        row_length: int | None = None,
        on_overlong: str = "raise",
        literal_content: bool = False,
    ):
        super().__init__(source, on_bad_record)
        self._tokenizer = tokenizer
        self._enable_thinking = enable_thinking
        self._train_on = train_on
        self._row_length = row_length
        self._on_overlong = on_overlong
        self._literal_content = literal_content

    def convert(self, record: SourceRecord) -> TokenizedExample | _OverlongExample:
        conversation = parse_sft_record(record.fields, record.ref)
        segments = _render_segments(
            conversation.messages,
            conversation.tools,
            self._tokenizer,
            literal_content=self._literal_content,
            enable_thinking=self._enable_thinking,
            train_on=self._train_on,
        )
        if self._row_length is not None and (at_least := _min_tokens(segments, self._tokenizer)) > self._row_length:
            if self._on_overlong == "raise":
                raise OverlongExampleError(record.ref, at_least, self._row_length, at_least=True)
            if self._on_overlong == "skip":
                return _OverlongExample(record.ref, at_least)
            segments = _cut_segments(segments, 2 * self._row_length * self._tokenizer.max_token_chars)
        rendered = encode_segments(segments, self._tokenizer)
        return TokenizedExample(rendered.token_ids, rendered.loss_mask, record.ref)


@dataclasses.dataclass(frozen=True)
class _OverlongExample:
    """An SFT example skipped as over-long from its text length alone (never tokenized)."""

    ref: RecordRef | None
    min_tokens: int


@dataclasses.dataclass
class PackingStats:
    """Counters of a packed SFT iterator (restored with its state).

    `real_tokens + padding_tokens` = token slots emitted; `trained_tokens` = `loss_mask` ones emitted.
    """

    examples: int = 0
    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0
    trained_tokens: int = 0
    truncated_examples: int = 0
    skipped_overlong_examples: int = 0
    bad_records_skipped: int = 0

    @property
    def padding_fraction(self) -> float:
        slots = self.real_tokens + self.padding_tokens
        return self.padding_tokens / slots if slots else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "padding_fraction": self.padding_fraction}


class PackedSFTBatches(grain.IterDataset):
    """Packs a stream of `TokenizedExample`s (or `BadRecord`s, counted and dropped) into batches.

    Each batch is a dict of int32 `[batch_size, row_length]` numpy arrays (see `packing` for the keys).
    Examples are packed `packing_window` at a time; a window's rows are emitted in a random order drawn from
    `(seed, window number)`, so the state needed to resume is the parent's state at the window's start plus
    the number of rows already emitted from it.
    """

    def __init__(self, parent: grain.IterDataset, config: SFTDataConfig, pad_id: int):
        super().__init__(parent)
        self._config = config
        self._pad_id = pad_id

    def __iter__(self) -> PackedSFTBatchIterator:
        return PackedSFTBatchIterator(self._parent.__iter__(), self._config, self._pad_id)

    def __str__(self) -> str:
        return f"PackedSFTBatches(row_length={self._config.row_length}, batch_size={self._config.batch_size})"


class PackedSFTBatchIterator(_CountingIterator):
    """Iterator of `PackedSFTBatches`. `stats` (a `PackingStats`) has the padding fraction and counters."""

    def __init__(self, parent: grain.DatasetIterator, config: SFTDataConfig, pad_id: int):
        super().__init__(parent, PackingStats())
        self._config = config
        self._pad_id = pad_id
        self._rows: list[dict[str, np.ndarray]] = []  # rows of the current window, in emission order
        self._next_row = 0
        self._window_index = 0  # number of the next window to pack
        self._window_parent_state: Any = None
        self._exhausted = False

    @property
    def padding_fraction(self) -> float:
        return self.stats.padding_fraction

    def _fill_window(self, count: bool) -> None:
        """Pulls up to `packing_window` examples and packs them into `self._rows`."""
        config = self._config
        self._window_parent_state = copy.deepcopy(self._parent.get_state())
        examples: list[TokenizedExample] = []
        pulled = 0
        while pulled < config.packing_window:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            pulled += 1
            if isinstance(item, BadRecord):
                if count:
                    self._skip_bad_record(item)
                continue
            if isinstance(item, _OverlongExample):
                if count:
                    self.stats.skipped_overlong_examples += 1
                continue
            fitted = fit_to_row(item, config.row_length, config.on_overlong)
            if fitted is None:
                if count:
                    self.stats.skipped_overlong_examples += 1
                continue
            if len(fitted) < len(item) and count:
                self.stats.truncated_examples += 1
            if len(fitted):
                examples.append(fitted)
        rows = assign_rows(
            [len(example) for example in examples],
            config.row_length,
            strategy=config.strategy,
            sort_by_length=config.sort_by_length,
        )
        # Spread long and short rows over the window's batches.
        order = np.random.default_rng([config.seed, self._window_index]).permutation(len(rows))
        packed = build_packed_rows(examples, [rows[i] for i in order], config.row_length, pad_id=self._pad_id)
        self._rows = [{key: value[i] for key, value in packed.items()} for i in range(len(rows))]
        self._next_row = 0
        self._window_index += 1

    def _take_row(self) -> dict[str, np.ndarray] | None:
        while self._next_row >= len(self._rows):
            if self._exhausted:
                return None
            self._fill_window(count=True)
        row = self._rows[self._next_row]
        self._next_row += 1
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        config = self._config
        rows = []
        while len(rows) < config.batch_size:
            row = self._take_row()
            if row is None:
                break
            rows.append(row)
        if not rows or (len(rows) < config.batch_size and config.drop_remainder):
            raise StopIteration
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        missing = config.batch_size - len(rows)
        if missing:
            filler = empty_packed_rows(missing, config.row_length, pad_id=self._pad_id)
            batch = {key: np.concatenate([batch[key], filler[key]]) for key in batch}
        stats = self.stats
        segment_ids = batch["segment_ids"]
        stats.batches += 1
        stats.rows += len(rows)
        stats.examples += int(segment_ids.max(axis=1).sum())
        real = int((segment_ids != 0).sum())
        stats.real_tokens += real
        stats.padding_tokens += segment_ids.size - real
        stats.trained_tokens += int(batch["loss_mask"].sum())
        return batch

    def get_state(self) -> dict[str, Any]:
        pending = self._next_row < len(self._rows)
        return {
            "parent": copy.deepcopy(self._window_parent_state if pending else self._parent.get_state()),
            "window_index": self._window_index - 1 if pending else self._window_index,
            "rows_emitted": self._next_row if pending else 0,
            "exhausted": self._exhausted and not pending,
            "stats": dataclasses.asdict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._window_index = int(state["window_index"])
        self._exhausted = bool(state["exhausted"])
        self._rows, self._next_row = [], 0
        if state["rows_emitted"]:
            self._exhausted = False
            self._fill_window(count=False)  # re-pack the same window; its counters are already in the state
            if state["rows_emitted"] > len(self._rows):
                raise ValueError("state does not match this pipeline: fewer rows in the window than emitted")
            self._next_row = int(state["rows_emitted"])
        self._restore_stats(state["stats"])

    def __str__(self) -> str:
        return "PackedSFTBatchIterator"


def sft_dataset(
    source: RecordSource,
    tokenizer: Tokenizer,
    config: SFTDataConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> PackedSFTBatches:
    """The packed SFT pipeline over `source` (OpenAI-style `messages` records).

    `iter(dataset)` gives a `PackedSFTBatchIterator`: batches are dicts of int32 `[B, L]` numpy arrays
    `tokens, segment_ids, positions, targets, loss_mask` (see `nemotron_jax.data.packing`), `get_state()` /
    `set_state()` resume exactly, and `.stats` has the padding fraction and the bad / over-long counts.

    Args:
      source: a random-access record source.
      tokenizer: used through the chat template.
      config: see `SFTDataConfig`.
      shard_index, shard_count: default `jax.process_index()`, `jax.process_count()`.
    """
    _check_policy(config.on_bad_record)
    if config.row_length < 2 or config.batch_size < 1 or config.packing_window < 1:
        raise ValueError(f"need row_length >= 2, batch_size >= 1, packing_window >= 1; got {config}")
    if config.on_overlong not in ("raise", "truncate", "skip"):
        raise ValueError(f"on_overlong must be 'raise', 'truncate' or 'skip', got {config.on_overlong!r}")
    if config.train_on not in ("final", "all"):
        raise ValueError(f"train_on must be 'final' or 'all', got {config.train_on!r}")
    tokenize = TokenizeSFTRecord(
        source,
        tokenizer,
        enable_thinking=config.enable_thinking,
        train_on=config.train_on,
        on_bad_record=config.on_bad_record,
        row_length=config.row_length,
        on_overlong=config.on_overlong,
        literal_content=config.literal_content,
    )
    examples = _converted_records(source, tokenize, config, shard_index, shard_count)
    pad_id = tokenizer.pad_id if config.pad_id is None else config.pad_id
    return PackedSFTBatches(examples, config, pad_id)


# ------------------------------------------------------------------------------------------------------- RL


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    """One RL prompt, ready for rollouts.

    Attributes:
      token_ids: int32 [T], the rendered conversation ending with the assistant generation prompt.
      messages: the prompt as OpenAI-style dicts.
      tools: tools offered to the model, or None.
      agent_ref: the NeMo Gym agent name.
      domain: derived from `agent_ref` ("math", "mcqa", "instruction_following", ...).
      reward_spec: the per-environment fields (expected_answer, instruction_id_list, kwargs, ...).
      metadata: the record's other fields.
      source: "file line N" of the record.
    """

    token_ids: np.ndarray
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    agent_ref: str
    domain: str
    reward_spec: dict[str, Any]
    metadata: dict[str, Any]
    source: str


@dataclasses.dataclass(frozen=True)
class RLPromptBatch:
    """A batch of `RLPrompt`s, with per-field views."""

    prompts: list[RLPrompt]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def token_ids(self) -> list[np.ndarray]:
        return [prompt.token_ids for prompt in self.prompts]

    @property
    def domains(self) -> list[str]:
        return [prompt.domain for prompt in self.prompts]

    @property
    def reward_specs(self) -> list[dict[str, Any]]:
        return [prompt.reward_spec for prompt in self.prompts]

    @property
    def metadata(self) -> list[dict[str, Any]]:
        return [prompt.metadata for prompt in self.prompts]

    def padded_tokens(self, pad_id: int, *, side: Literal["left", "right"] = "left") -> tuple[np.ndarray, np.ndarray]:
        """`(tokens int32 [B, T_max], lengths int32 [B])`, padded with `pad_id` on `side`."""
        lengths = np.asarray([len(ids) for ids in self.token_ids], np.int32)
        width = int(lengths.max()) if len(lengths) else 0
        tokens = np.full((len(self.prompts), width), pad_id, np.int32)
        for row, ids in enumerate(self.token_ids):
            if side == "left":
                tokens[row, width - len(ids) :] = ids
            else:
                tokens[row, : len(ids)] = ids
        return tokens, lengths


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
    """Settings of the RL prompt pipeline.

    Attributes:
      batch_size: prompts per batch (per process); rollouts per prompt are the trainer's business.
      enable_thinking: generation prompt mode (Cascade RL rolls out in thinking mode).
      max_prompt_length: prompts longer than this many tokens are handled by `on_overlong`; None: no limit.
        A prompt longer than `max_prompt_length * tokenizer.max_token_chars` characters is judged so from its
        text, without tokenizing it.
      on_overlong: "raise" (names the record) or "skip" (counted).
      literal_content: encode control strings inside message content as plain text (see `SFTDataConfig`).
      on_bad_record: "raise" or "skip" (counted).
      default_agent_ref: for records without `agent_ref`; None makes a missing `agent_ref` an error.
      drop_remainder: drop a last incomplete batch.
      seed, shuffle, num_epochs, num_threads, prefetch_buffer_size, worker_count: as in `SFTDataConfig`.
    """

    batch_size: int
    enable_thinking: bool = True
    max_prompt_length: int | None = None
    on_overlong: Literal["raise", "skip"] = "raise"
    on_bad_record: BadRecordPolicy = "raise"
    literal_content: bool = False
    default_agent_ref: str | None = None
    drop_remainder: bool = False
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    num_threads: int = 4
    prefetch_buffer_size: int = 256
    worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class _OverlongPrompt:
    ref: RecordRef | None
    length: int


class PrepareRLPrompt(_ReadAndConvert):
    """Record index -> `RLPrompt` (generation prompt rendered and tokenized), or a skip marker."""

    def __init__(self, source: RecordSource, tokenizer: Tokenizer, config: RLDataConfig):
        super().__init__(source, config.on_bad_record)
        self._tokenizer = tokenizer
        self._config = config

    def convert(self, record: SourceRecord) -> RLPrompt | _OverlongPrompt:
        config = self._config
        parsed = parse_rl_prompt_record(record.fields, record.ref, default_agent_ref=config.default_agent_ref)
        segments = _render_segments(
            parsed.messages,
            parsed.tools,
            self._tokenizer,
            literal_content=config.literal_content,
            enable_thinking=config.enable_thinking,
            add_generation_prompt=True,
        )
        limit = config.max_prompt_length
        at_least = _min_tokens(segments, self._tokenizer) if limit is not None else 0
        rendered = encode_segments(segments, self._tokenizer) if limit is None or at_least <= limit else None
        length = at_least if rendered is None else int(rendered.token_ids.shape[0])
        if limit is not None and length > limit:
            if config.on_overlong == "raise":
                where = str(record.ref) if record.ref is not None else "a prompt"
                count = f"{length} tokens"
                if rendered is None:
                    count = f"at least {length} tokens (judged from its characters)"
                raise ValueError(
                    f"{where}: prompt of {count} exceeds max_prompt_length={limit} "
                    "(pass on_overlong='skip' to drop and count such prompts)"
                )
            return _OverlongPrompt(record.ref, length)
        return RLPrompt(
            token_ids=rendered.token_ids,
            messages=messages_as_dicts(parsed.messages),
            tools=parsed.tools,
            agent_ref=parsed.agent_ref,
            domain=parsed.domain,
            reward_spec=parsed.reward_spec,
            metadata=parsed.metadata,
            source=str(record.ref) if record.ref is not None else "",
        )


@dataclasses.dataclass
class RLPromptStats:
    """Counters of an RL prompt iterator (restored with its state)."""

    prompts: int = 0
    batches: int = 0
    bad_records_skipped: int = 0
    skipped_overlong_prompts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class RLPromptBatches(grain.IterDataset):
    """Groups `RLPrompt`s into `RLPromptBatch`es, dropping and counting bad / over-long records."""

    def __init__(self, parent: grain.IterDataset, config: RLDataConfig):
        super().__init__(parent)
        self._config = config

    def __iter__(self) -> RLPromptBatchIterator:
        return RLPromptBatchIterator(self._parent.__iter__(), self._config)

    def __str__(self) -> str:
        return f"RLPromptBatches(batch_size={self._config.batch_size})"


class RLPromptBatchIterator(_CountingIterator):
    """Iterator of `RLPromptBatches`; `stats` is an `RLPromptStats`."""

    def __init__(self, parent: grain.DatasetIterator, config: RLDataConfig):
        super().__init__(parent, RLPromptStats())
        self._config = config

    def __next__(self) -> RLPromptBatch:
        prompts: list[RLPrompt] = []
        while len(prompts) < self._config.batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                break
            if isinstance(item, BadRecord):
                self._skip_bad_record(item)
            elif isinstance(item, _OverlongPrompt):
                self.stats.skipped_overlong_prompts += 1
            else:
                prompts.append(item)
        if not prompts or (len(prompts) < self._config.batch_size and self._config.drop_remainder):
            raise StopIteration
        self.stats.prompts += len(prompts)
        self.stats.batches += 1
        return RLPromptBatch(prompts)

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._parent.get_state()), "stats": self.stats.as_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._restore_stats(state["stats"])

    def __str__(self) -> str:
        return "RLPromptBatchIterator"


def rl_prompt_dataset(
    source: RecordSource,
    tokenizer: Tokenizer,
    config: RLDataConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> RLPromptBatches:
    """The RL prompt pipeline over `source` (NeMo Gym JSONL / Parquet records).

    `iter(dataset)` gives an `RLPromptBatchIterator` of `RLPromptBatch`es; each prompt carries its token ids
    (ending with the generation prompt), domain, reward spec and metadata. `get_state()` / `set_state()` resume
    exactly; `.stats` counts prompts and skipped records.
    """
    _check_policy(config.on_bad_record)
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.on_overlong not in ("raise", "skip"):
        raise ValueError(f"on_overlong must be 'raise' or 'skip', got {config.on_overlong!r}")
    prompts = _converted_records(source, PrepareRLPrompt(source, tokenizer, config), config, shard_index, shard_count)
    return RLPromptBatches(prompts, config)

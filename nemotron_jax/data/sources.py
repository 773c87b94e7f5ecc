"""Random-access record sources for Grain: JSONL, Parquet and locally prepared TFDS data sets.

Each source has `__len__` and `__getitem__(index) -> SourceRecord` (the decoded record plus its file and line),
so `grain.MapDataset.source(source)` can shuffle and shard it without reading it in order. Sources only decode;
validating a record against a format is `records.parse_*`'s job. A record that cannot be decoded (invalid JSON,
not an object) raises `RecordError` naming the file and line.
"""

from __future__ import annotations

import bisect
import collections
import glob
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nemotron_jax.data.records import RecordError, RecordRef, SourceRecord, decode_json

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def expand_paths(paths: PathOrPaths) -> list[str]:
    """Paths and glob patterns -> a sorted list of existing files; raises `FileNotFoundError` naming misses."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.fspath(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"no such file: {pattern!r}")
    if not files:
        raise FileNotFoundError("no input files given")
    return files


# -------------------------------------------------------------------------------------------------- JSONL

_INDEX_CHUNK_BYTES = 64 << 20
_BLANK_CHECK_BYTES = 64  # lines this short are checked for being whitespace only


def index_jsonl_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets, byte lengths and 1-based line numbers of the non-blank lines of a JSONL file.

    Scans the file once for newlines (numpy over a memory map, in chunks, so memory stays bounded).
    Blank (empty or whitespace-only) lines are not records and are left out.

    Returns:
      (offsets int64 [N], lengths int64 [N], line_numbers int64 [N]).
    """
    size = os.path.getsize(path)
    if size == 0:
        empty = np.zeros((0,), np.int64)
        return empty, empty.copy(), empty.copy()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        data = np.frombuffer(mapped, dtype=np.uint8)
        newline_chunks = [
            np.flatnonzero(data[start : start + _INDEX_CHUNK_BYTES] == ord("\n")) + start
            for start in range(0, size, _INDEX_CHUNK_BYTES)
        ]
        newlines = np.concatenate(newline_chunks).astype(np.int64)
        starts = np.concatenate([np.zeros((1,), np.int64), newlines + 1])
        ends = np.concatenate([newlines, np.asarray([size], np.int64)])
        if starts[-1] == size:  # file ends with a newline: no final partial line
            starts, ends = starts[:-1], ends[:-1]
        lengths = ends - starts
        keep = lengths > 0
        short = np.flatnonzero(keep & (lengths <= _BLANK_CHECK_BYTES))
        for line in short:
            if not bytes(data[starts[line] : ends[line]]).strip():
                keep[line] = False
        del data  # release the buffer before the map closes
    line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
    return starts[keep], lengths[keep], line_numbers


class JsonlSource:
    """Random access to the records of one or more JSONL files (one JSON object per line).

    Building the source indexes every file once (a newline scan, about as fast as reading the file); records
    are then read with one `pread` each, so Grain can shuffle and shard without reading in order.

    Args:
      paths: file paths and/or glob patterns (files are taken in sorted order per pattern).

    `source[i]` returns a `SourceRecord`; a line that is not valid JSON, or not a JSON object, raises
    `RecordError` with the file name and line number.
    """

    def __init__(self, paths: PathOrPaths):
        self._paths = expand_paths(paths)
        offsets, lengths, line_numbers, file_ids = [], [], [], []
        for file_id, path in enumerate(self._paths):
            file_offsets, file_lengths, file_lines = index_jsonl_lines(path)
            offsets.append(file_offsets)
            lengths.append(file_lengths)
            line_numbers.append(file_lines)
            file_ids.append(np.full(file_offsets.shape, file_id, np.int32))
        self._offsets = np.concatenate(offsets)
        self._lengths = np.concatenate(lengths)
        self._line_numbers = np.concatenate(line_numbers)
        self._file_ids = np.concatenate(file_ids)
        self._fds: dict[int, int] = {}
        self._fds_pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    def ref(self, index: int) -> RecordRef:
        return RecordRef(self._paths[self._file_ids[index]], int(self._line_numbers[index]), "line")

    def _fd(self, file_id: int) -> int:
        if self._fds_pid != os.getpid():  # forked worker: descriptors are not ours to share
            self._fds, self._fds_pid = {}, os.getpid()
        fd = self._fds.get(file_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_id)
                if fd is None:
                    fd = os.open(self._paths[file_id], os.O_RDONLY)
                    self._fds[file_id] = fd
        return fd

    def read_line(self, index: int) -> bytes:
        """The raw bytes of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for a source of {len(self)} records")
        file_id = int(self._file_ids[index])
        return os.pread(self._fd(file_id), int(self._lengths[index]), int(self._offsets[index]))

    def __getitem__(self, index: int) -> SourceRecord:
        index = int(index)
        raw = self.read_line(index)  # raises IndexError out of range
        ref = self.ref(index)
        fields = decode_json(raw, ref)  # RecordError naming file and line for anything unusable
        if not isinstance(fields, dict):
            raise RecordError(ref, None, f"expected a JSON object, got {type(fields).__name__}")
        return SourceRecord(fields, ref)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        try:
            if self._fds_pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
        except Exception:  # interpreter shutdown, or a half-built object
            pass

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._paths)} files, {len(self)} records)"


# ------------------------------------------------------------------------------------------------ Parquet


class _UndecodableGroup:
    def __init__(self, reason: str):
        self.reason = reason


def _parquet_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    # OSError: corrupt pages and headers ("Couldn't deserialize thrift"); ArrowInvalid (a ValueError) and
    # UnicodeDecodeError: invalid values; every pyarrow error derives from ArrowException.
    return (OSError, ValueError, pa.ArrowException)


def _open_parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    # Verifies page checksums where the writer stored them (pyarrow: write_table(..., write_page_checksum=True)),
    # so a flipped bit in a data page is caught instead of decoded into wrong values.
    return pq.ParquetFile(path, page_checksum_verification=True)


class ParquetSource:
    """Random access to the rows of one or more Parquet files, each row as a `SourceRecord` of Python values.

    Only the footers are read up front. A row is served from its row group, decoded whole (Parquet's unit of
    decoding) and kept in a small per-process cache, so reading in order costs one decode per row group.
    Shuffled access over large row groups decodes a group per row; write such files with small row groups
    (e.g. `pyarrow.parquet.write_table(..., row_group_size=1000)`) or convert them to JSONL.

    A row group that cannot be decoded (a corrupt page; a page whose CRC does not match, when the writer
    stored page checksums) makes each of its rows raise `RecordError` naming the file, the row and the
    group, so the pipeline's `on_bad_record` policy applies to it; a file whose footer cannot be read raises
    `ValueError` naming the file when the source is built.

    Args:
      paths: file paths and/or glob patterns.
      columns: the columns to read (default: all).
      cached_row_groups: decoded row groups kept per process.
    """

    def __init__(self, paths: PathOrPaths, *, columns: Sequence[str] | None = None, cached_row_groups: int = 4):
        self._paths = expand_paths(paths)
        self._columns = list(columns) if columns is not None else None
        self._cached_row_groups = max(1, cached_row_groups)
        # Flat list of (file_id, row_group, first_row_of_group_in_file) and the global first row of each group.
        self._groups: list[tuple[int, int, int]] = []
        group_starts = []
        total = 0
        for file_id, path in enumerate(self._paths):
            try:
                metadata = _open_parquet(path).metadata
            except _parquet_errors() as error:
                raise ValueError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
            row_in_file = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows == 0:
                    continue
                self._groups.append((file_id, group, row_in_file))
                group_starts.append(total)
                total += rows
                row_in_file += rows
        self._group_starts = group_starts
        self._length = total
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._files: dict[int, Any] = {}
        self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"row index {index} out of range for a source of {self._length} rows")
        group_index = bisect.bisect_right(self._group_starts, index) - 1
        return group_index, index - self._group_starts[group_index]

    def ref(self, index: int) -> RecordRef:
        group_index, offset = self._locate(index)
        file_id, _, first_row = self._groups[group_index]
        return RecordRef(self._paths[file_id], first_row + offset, "row")

    def _row_group(self, group_index: int) -> Any:
        """The decoded row group, or the `_UndecodableGroup` that says why it cannot be decoded."""
        if self._pid != os.getpid():
            self._reset_caches()
        with self._lock:
            table = self._cache.get(group_index)
            if table is not None:
                self._cache.move_to_end(group_index)
                return table
            file_id, group, _ = self._groups[group_index]
            try:
                parquet_file = self._files.get(file_id)
                if parquet_file is None:
                    parquet_file = self._files[file_id] = _open_parquet(self._paths[file_id])
                table = parquet_file.read_row_group(group, columns=self._columns)
            except _parquet_errors() as error:  # cached too: each row of the group fails without re-reading it
                table = _UndecodableGroup(f"row group {group} cannot be decoded ({type(error).__name__}: {error})")
            self._cache[group_index] = table
            while len(self._cache) > self._cached_row_groups:
                self._cache.popitem(last=False)
            return table

    def __getitem__(self, index: int) -> SourceRecord:
        index = int(index)
        group_index, offset = self._locate(index)
        table = self._row_group(group_index)
        if isinstance(table, _UndecodableGroup):
            raise RecordError(self.ref(index), None, table.reason)
        try:
            fields = table.slice(offset, 1).to_pylist()[0]
        except _parquet_errors() as error:  # e.g. a string column holding invalid UTF-8
            reason = f"cannot decode the row ({type(error).__name__}: {error})"
            raise RecordError(self.ref(index), None, reason) from None
        return SourceRecord(fields, self.ref(index))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_files", "_cache", "_lock", "_pid"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def __repr__(self) -> str:
        return f"ParquetSource({len(self._paths)} files, {len(self)} rows)"


# --------------------------------------------------------------------------------------------------- TFDS


def _to_python(value: Any) -> Any:
    """TFDS numpy values -> plain Python: bytes -> str (UTF-8), arrays -> lists, numpy scalars -> Python scalars."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O", "U"):
            return [_to_python(item) for item in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(item) for item in value]
    return value


class TfdsSource:
    """Adapter for a TensorFlow Datasets data set that a user has prepared locally (ArrayRecord format).

    `tensorflow_datasets` is an optional dependency, imported only here (it does not need TensorFlow for
    ArrayRecord data sources). Give exactly one of:
      * `name` (+ `data_dir`): a registered builder, e.g. `TfdsSource("my_chat", split="train", data_dir=...)`;
      * `builder`: a `tfds.core.DatasetBuilder` instance (already `download_and_prepare`d);
      * `directory`: the prepared version directory (`.../my_chat/1.0.0`), read without the builder's code.

    Examples are converted to plain Python (bytes -> str, arrays -> lists) and passed through `record_fn`
    if given, to map a custom feature layout onto the SFT / RL record fields. A `Sequence({...})` feature comes
    back as a dict of lists; the record parsers accept that for `messages` / `responses_create_params.input`.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        split: str,
        data_dir: str | os.PathLike | None = None,
        builder: Any = None,
        directory: str | os.PathLike | None = None,
        record_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise ImportError(
                "TfdsSource needs the optional package tensorflow-datasets (pip install tensorflow-datasets)"
            ) from error
        if sum(x is not None for x in (name, builder, directory)) != 1:
            raise ValueError("give exactly one of name=, builder= or directory=")
        if directory is not None:
            builder = tfds.builder_from_directory(os.fspath(directory))
        elif name is not None:
            builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS data set {builder.name!r} is not prepared in {builder.data_dir!r}; "
                "run builder.download_and_prepare() first"
            )
        self._data_source = builder.as_data_source(split=split)
        self._label = f"tfds:{builder.name}[{split}]"
        self._record_fn = record_fn

    def __len__(self) -> int:
        return len(self._data_source)

    def ref(self, index: int) -> RecordRef:
        return RecordRef(self._label, int(index), "index")

    def __getitem__(self, index: int) -> SourceRecord:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"example index {index} out of range for {self._label} of {len(self)} examples")
        fields = _to_python(self._data_source[index])
        if self._record_fn is not None:
            fields = self._record_fn(fields)
        if not isinstance(fields, dict):
            raise RecordError(self.ref(index), None, f"expected a dict of features, got {type(fields).__name__}")
        return SourceRecord(fields, self.ref(index))

    def __repr__(self) -> str:
        return f"TfdsSource({self._label}, {len(self)} examples)"


def open_source(paths: PathOrPaths, **kwargs: Any) -> JsonlSource | ParquetSource:
    """A `JsonlSource` or `ParquetSource` chosen by file extension (.jsonl / .json / .parquet)."""
    files = expand_paths(paths)
    extensions = {os.path.splitext(path)[1].lower() for path in files}
    if extensions <= {".jsonl", ".json", ".ndjson"}:
        return JsonlSource(files, **kwargs)
    if extensions <= {".parquet"}:
        return ParquetSource(files, **kwargs)
    raise ValueError(
        f"cannot choose a source for extensions {sorted(extensions)}: use .jsonl/.json or .parquet "
        "(compressed JSONL has no random access; decompress it first)"
    )

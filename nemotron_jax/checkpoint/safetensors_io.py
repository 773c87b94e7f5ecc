"""Reading and writing `.safetensors` files tensor by tensor.

Reading parses the header and memory-maps the file, so a tensor is paged in only when it is copied out;
this also covers bfloat16, which `safetensors.numpy` cannot return. Writing uses the `safetensors`
library one shard at a time.

Format: 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape", "data_offsets"}}`
(offsets relative to the end of the header), then the raw little-endian bytes.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import stat
import struct
from typing import Any, Collection, Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import TensorSpec, serialize_file

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors format's own limit on the JSON header (`MAX_HEADER_SIZE` of the reference implementation).
MAX_HEADER_BYTES = 100_000_000
# config.json and the shard index are small; anything larger than this is not one.
MAX_JSON_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model expects, or is malformed; the message names the
    file and, where there is one, the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def open_regular_file(path: str):
    """Opens `path` for binary reading, refusing anything that is not a regular file (a FIFO would block the
    reader forever, a device or directory is not a checkpoint). Raises CheckpointError naming the file."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise CheckpointError(f"{path}: cannot open ({getattr(error, 'strerror', None) or error})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                    "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise CheckpointError(f"{path}: is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(Exception):
    pass


def parse_json(raw: bytes, path: str, what: str, *, unique_keys: bool = True) -> Any:
    """Decodes UTF-8 JSON, turning every way it can fail (bad UTF-8, bad syntax, nesting deep enough to
    exhaust the recursion limit, integers too long to convert, duplicate keys) into CheckpointError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: {what} is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys if unique_keys else None)
    except _DuplicateKey as duplicate:
        raise CheckpointError(f"{path}: {what} has the key {duplicate.args[0]!r} twice") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply") from None
    except ValueError as error:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise CheckpointError(f"{path}: {what} is not usable JSON ({error})") from None


def read_json(path: str, what: str, *, unique_keys: bool = True, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Reads a JSON file of at most `max_bytes` (see `parse_json`)."""
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {what} is larger than {max_bytes} bytes")
        raw = f.read(size)  # (read(n) allocates n bytes up front: never pass the cap itself)
    return parse_json(raw, path, what, unique_keys=unique_keys)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: str, name: str, entry: Any, data_start: int, data_length: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is {type(entry).__name__}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise CheckpointError(f"{where}: header entry has no {', '.join(missing)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {dtype_name!r}; supported: {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] is not a range (negative or reversed)")
    if end > data_length:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] run past the end of the data "
                              f"({data_length} bytes)")
    dtype = _DTYPES[dtype_name]
    count = 1
    for dim in shape:
        count *= dim
    if end - begin != count * dtype.itemsize:
        raise CheckpointError(f"{where}: byte range [{begin}, {end}) ({end - begin} bytes) does not match shape "
                              f"{tuple(shape)} {dtype_name} ({count * dtype.itemsize} bytes)")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _parse_header(f, path: str) -> list[TensorInfo]:
    """Validates the header of the open file `f` against its size. Returns the tensors in storage order."""
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {header_length} exceeds the safetensors limit of "
                              f"{MAX_HEADER_BYTES} bytes")
    if header_length > file_size - 8:
        raise CheckpointError(f"{path}: header length {header_length} runs past the end of the file")
    raw = f.read(header_length)
    if len(raw) != header_length:
        raise CheckpointError(f"{path}: file shrank while its header was read")
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_length
    data_length = file_size - data_start
    infos = [_parse_entry(path, name, entry, data_start, data_length) for name, entry in header.items()]
    infos.sort(key=lambda info: (info.start, info.end))
    # The byte ranges must tile the data exactly, as the safetensors format requires: no gap, no overlap
    # (two tensors sharing bytes), no trailing bytes.
    expected, previous = data_start, None
    for info in infos:
        if info.start != expected:
            relative = (info.start - data_start, info.end - data_start)
            if info.start < expected:
                raise CheckpointError(f"{path}: tensor {info.name!r} (data_offsets {list(relative)}) overlaps "
                                      f"tensor {previous.name!r}")
            raise CheckpointError(f"{path}: tensor {info.name!r} (data_offsets {list(relative)}) does not start "
                                  f"where the previous tensor ends ({expected - data_start}); the data has a gap")
        expected, previous = info.end, info
    if expected != file_size:
        raise CheckpointError(f"{path}: tensor data ends at byte {expected - data_start} but the file holds "
                              f"{data_length} bytes of data")
    return infos


def read_header(path: str) -> list[TensorInfo]:
    """Tensor descriptions of one file, in storage order, after checking that the header is well formed and
    its byte ranges tile the data exactly (raises CheckpointError naming the file and tensor otherwise)."""
    with open_regular_file(path) as f:
        return _parse_header(f, path)


def _check_relative_name(index_path: str, tensor: str, file_name: Any) -> str:
    if not isinstance(file_name, str) or not file_name:
        raise CheckpointError(f"{index_path}: weight_map entry for tensor {tensor!r} is {file_name!r}, "
                              "not a file name")
    parts = file_name.replace("\\", "/").split("/")
    if (os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or ".." in parts or "\x00" in file_name
            or (len(file_name) > 1 and file_name[1] == ":")):
        raise CheckpointError(f"{index_path}: weight_map entry for tensor {tensor!r} is {file_name!r}, which "
                              "points outside the checkpoint directory")
    return os.path.normpath(file_name)


def read_index(directory: str) -> dict[str, str] | None:
    """The `weight_map` of `model.safetensors.index.json` ({tensor: file name relative to `directory`}), or
    None without an index. File names must stay inside `directory` (no absolute paths, no `..`)."""
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.lexists(index_path):
        return None
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map object")
    return {tensor: _check_relative_name(index_path, tensor, file_name) for tensor, file_name in weight_map.items()}


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory: those named by the index, else the single file,
    else every `*.safetensors` in the directory."""
    weight_map = read_index(directory)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"{os.path.join(directory, INDEX_FILE)}: names files that do not exist: {missing}")
        return [os.path.join(directory, name) for name in files]
    if os.path.lexists(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)]
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise CheckpointError(f"{directory}: cannot list ({error.strerror})") from None
    files = sorted(name for name in names if name.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    return [os.path.join(directory, name) for name in files]


def checkpoint_tensors(directory: str) -> tuple[list[str], dict[str, TensorInfo]]:
    """`(files, {tensor name: info})` of a checkpoint directory, checked across files: a tensor stored in two
    files, a tensor whose index entry names another file, or an index entry whose file lacks the tensor
    raises CheckpointError naming the tensor and the files."""
    files = checkpoint_files(directory)
    weight_map = read_index(directory)
    stored: dict[str, TensorInfo] = {}
    for path in files:
        for info in read_header(path):
            if info.name in stored:
                raise CheckpointError(f"{directory}: tensor {info.name!r} is stored twice, in "
                                      f"{stored[info.name].file} and {path}")
            stored[info.name] = info
    if weight_map is not None:
        index_path = os.path.join(directory, INDEX_FILE)
        for name, info in stored.items():
            listed = weight_map.get(name)
            if listed is not None and os.path.join(directory, listed) != info.file:
                raise CheckpointError(f"{index_path}: maps tensor {name!r} to {listed}, but it is stored in "
                                      f"{info.file}")
        absent = sorted(name for name in weight_map if name not in stored)
        if absent:
            raise CheckpointError(f"{index_path}: maps tensors that its files do not hold: {absent[:10]}"
                                  f"{' ...' if len(absent) > 10 else ''} (e.g. {absent[0]!r} in "
                                  f"{weight_map[absent[0]]})")
    return files, stored


def iterate_tensors(files: Iterable[str], skip: Collection[str] = ()) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yields (info, array) one tensor at a time, file by file in storage order, leaving out the names in
    `skip`. Each array is a fresh copy (the memory map is closed after each file), so at most one tensor is
    held here at a time. The header is validated on the same open file that is mapped."""
    for path in files:
        with open_regular_file(path) as f:
            infos = [info for info in _parse_header(f, path) if info.name not in skip]
            if not any(info.end > info.start for info in infos):
                for info in infos:
                    yield info, np.empty(info.shape, info.dtype)
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                for info in infos:
                    count = int(np.prod(info.shape, dtype=np.int64))
                    if count == 0:
                        array = np.empty(info.shape, info.dtype)
                    else:
                        array = np.frombuffer(mapped, info.dtype, count=count,
                                              offset=info.start).reshape(info.shape).copy()
                    yield info, array


def count_non_finite(array: np.ndarray, chunk_elements: int = 1 << 22) -> int:
    """Number of NaN/inf entries of a floating-point array (0 for other dtypes), checked in chunks so that
    the temporary mask stays small."""
    if array.dtype.kind not in "fc" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        return 0
    flat = array.reshape(-1)
    bad = 0
    for begin in range(0, flat.size, chunk_elements):
        bad += int(flat.size and np.count_nonzero(~np.isfinite(flat[begin:begin + chunk_elements])))
    return bad


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_shard(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes one safetensors file (metadata `{"format": "pt"}`, as transformers writes)."""
    contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    specs = {
        name: TensorSpec(dtype=array.dtype.name, shape=list(array.shape), data_ptr=array.ctypes.data,
                         data_len=array.nbytes)
        for name, array in contiguous.items()
    }
    serialize_file(specs, path, metadata={"format": "pt"})

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
import struct
from typing import Collection, Iterable, Iterator

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


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model expects; the message names the tensor or file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> list[TensorInfo]:
    """Tensor descriptions of one file, in storage order."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > os.path.getsize(path) - 8:
            raise CheckpointError(f"{path}: header length {header_length} runs past the end of the file")
        try:
            header = json.loads(f.read(header_length))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: unreadable safetensors header ({error})") from None
    data_start = 8 + header_length
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} byte range does not match shape {shape} {entry['dtype']}")
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end))
    return sorted(infos, key=lambda info: info.start)


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory: those named by the index, else the single file,
    else every `*.safetensors` in the directory."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"{index_path}: names files that do not exist: {missing}")
        return [os.path.join(directory, name) for name in files]
    if os.path.exists(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)]
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    return [os.path.join(directory, name) for name in files]


def iterate_tensors(files: Iterable[str], skip: Collection[str] = ()) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yields (info, array) one tensor at a time, file by file in storage order, leaving out the names in
    `skip`. Each array is a fresh copy (the memory map is closed after each file), so at most one tensor is
    held here at a time."""
    for path in files:
        infos = [info for info in read_header(path) if info.name not in skip]
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for info in infos:
                array = np.frombuffer(mapped, info.dtype, count=int(np.prod(info.shape, dtype=np.int64)),
                                      offset=info.start).reshape(info.shape).copy()
                yield info, array


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

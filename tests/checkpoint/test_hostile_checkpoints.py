"""Checkpoint loading never accepts garbage (issue 11 section 5): crafted safetensors headers, shard indexes and
configs are rejected with a CheckpointError naming the file and tensor, never loaded and never a raw
KeyError/TypeError/JSONDecodeError/UnicodeDecodeError/RecursionError; a FIFO shard does not hang the loader;
non-finite weights are rejected unless asked for."""

import dataclasses
import json
import os
import shutil
import struct
import threading
import tracemalloc

import numpy as np
import pytest
from flax import traverse_util

import nemotron_jax as nj
from nemotron_jax.checkpoint import orbax_params, safetensors_io
from nemotron_jax.checkpoint.safetensors_io import CheckpointError
from nemotron_jax.model.params import abstract_params


def _write_raw(path, header, data=b"", header_length=None):
    """A safetensors file from a header (dict, str or bytes) and raw data bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if header_length is None else header_length))
        f.write(header)
        f.write(data)
    return str(path)


def _f32(offsets, shape=(4,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------------------------ safetensors headers


def test_a_well_formed_file_still_reads(tmp_path):
    values = np.arange(8, dtype=np.float32)
    path = _write_raw(tmp_path / "ok.safetensors", {"a": _f32([0, 16]), "b": _f32([16, 32]),
                                                   "empty": _f32([32, 32], shape=(0, 3))}, values.tobytes())
    got = {info.name: array for info, array in safetensors_io.iterate_tensors([path])}
    np.testing.assert_array_equal(got["a"], values[:4])
    np.testing.assert_array_equal(got["b"], values[4:])
    assert got["empty"].shape == (0, 3)


@pytest.mark.parametrize("header,data_bytes,message", [
    # Two tensors sharing bytes 8..16: the old reader returned both, silently aliased.
    ({"a": _f32([0, 16]), "b": _f32([8, 24])}, 24, r"tensor 'b' \(data_offsets \[8, 24\]\) overlaps tensor 'a'"),
    # A negative offset pointed back into the header.
    ({"a": _f32([-16, 0])}, 0, r"tensor 'a': data_offsets \[-16, 0\] is not a range"),
    ({"a": _f32([16, 0], shape=(0,))}, 16, r"tensor 'a': data_offsets \[16, 0\] is not a range"),
    # Past the end of the file.
    ({"a": _f32([0, 16])}, 8, r"tensor 'a': data_offsets \[0, 16\] run past the end of the data \(8 bytes\)"),
    # A gap between tensors, and bytes after the last one.
    ({"a": _f32([0, 16]), "b": _f32([20, 36])}, 36, r"tensor 'b' .*does not start where the previous"),
    ({"a": _f32([0, 16])}, 20, r"tensor data ends at byte 16 but the file holds 20 bytes"),
    # Malformed entries: each used to escape as KeyError / TypeError / AttributeError.
    ({"a": {"dtype": "F32", "shape": [4]}}, 16, r"tensor 'a': header entry has no data_offsets"),
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, 16, r"tensor 'a' has unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, 16, r"tensor 'a': shape \['4'\] is not"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, r"tensor 'a': shape \[-4\] is not"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, 16, r"tensor 'a': data_offsets \[0\] is not a"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, 16, r"data_offsets \[0.0, 16.0\]"),
    ({"a": 7}, 0, r"tensor 'a': header entry is int, not an object"),
    ({"__metadata__": {"format": 1}}, 0, r"__metadata__ must map strings to strings"),
    ("[]", 0, r"safetensors header is list, not an object"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", 0, r"safetensors header is nested too deeply"),
    ('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 0]}}', 0,
     r"safetensors header is not usable JSON"),
    ('{"a": ' + json.dumps(_f32([0, 16])) + ', "a": ' + json.dumps(_f32([0, 16])) + "}", 16,
     r"safetensors header has the key 'a' twice"),
    (b'{"a\xff": 1}', 0, r"safetensors header is not UTF-8"),
    ('{"a": ', 0, r"safetensors header is not valid JSON"),
])
def test_malformed_headers_are_rejected_naming_file_and_tensor(tmp_path, header, data_bytes, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, b"\0" * data_bytes)
    for read in (safetensors_io.read_header, lambda p: list(safetensors_io.iterate_tensors([p]))):
        with pytest.raises(CheckpointError, match=message) as error:
            read(path)
        assert path in str(error.value)


def test_header_length_is_capped_at_100_mb_without_reading_it(tmp_path):
    path = str(tmp_path / "huge.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001)  # sparse: no 100 MB written
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="exceeds the safetensors limit of 100000000 bytes"):
            safetensors_io.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # the header was not read into memory


def test_a_fifo_shard_does_not_hang(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    fifo = str(directory / "model.safetensors")
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            safetensors_io.read_header(fifo)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome.append(error)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        thread.join(timeout=10)
        pytest.fail("reading a FIFO shard blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointError)
    assert "is a FIFO, not a regular file" in str(outcome[0]) and fifo in str(outcome[0])


# ------------------------------------------------------------------------------- whole checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A sharded (index + 4 files) checkpoint of a small config, with random float32 weights."""
    cfg = nj.ModelConfig.preset("tiny", vocab_size=64, layer_pattern="M*E")
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({
        path: rng.standard_normal(leaf.shape).astype(np.float32)
        for path, leaf in traverse_util.flatten_dict(abstract_params(cfg)).items()})
    directory = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    nj.save_hf(cfg, params, directory, max_shard_bytes=60_000)
    assert len(set(_index(directory)["weight_map"].values())) >= 3
    return cfg, params, directory


def _copy(source, target):
    shutil.copytree(source, target)
    return str(target)


def _rewrite_shard(path, edit):
    tensors = {info.name: array for info, array in safetensors_io.iterate_tensors([path])}
    safetensors_io.write_shard(path, edit(tensors))


def _index(directory):
    with open(os.path.join(directory, safetensors_io.INDEX_FILE)) as f:
        return json.load(f)


def _write_index(directory, index):
    with open(os.path.join(directory, safetensors_io.INDEX_FILE), "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))


def test_the_tiny_checkpoint_loads(tiny_checkpoint):
    cfg, params, directory = tiny_checkpoint
    cfg_again, loaded = nj.load_hf(directory)
    assert dataclasses.replace(cfg_again, moe_tile_rows=cfg.moe_tile_rows) == cfg  # not an HF field
    np.testing.assert_array_equal(np.asarray(loaded["norm_f"]["weight"]), params["norm_f"]["weight"])


def test_a_tensor_stored_in_two_shards_is_rejected(tiny_checkpoint, tmp_path):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "dup")
    weight_map = _index(directory)["weight_map"]
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    name = next(n for n, f in weight_map.items() if f == last)  # lives in the last shard...
    shape = _shape_of(directory, last, name)
    # ...and now also, with other values, in the first: the old loader let the later file win silently.
    _rewrite_shard(os.path.join(directory, first), lambda t: {**t, name: np.full(shape, 7.0, np.float32)})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is stored twice, in .*{first} and .*{last}"):
        nj.load_hf(directory)


def _shape_of(directory, file_name, tensor):
    return next(info.shape for info in safetensors_io.read_header(os.path.join(directory, file_name))
                if info.name == tensor)


@pytest.mark.parametrize("where", ["parent", "absolute", "backslash"])
def test_index_paths_outside_the_directory_are_rejected(tiny_checkpoint, tmp_path, where):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "ckpt")
    index = _index(directory)
    name, file_name = sorted(index["weight_map"].items())[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(directory, file_name), outside)
    index["weight_map"][name] = {"parent": "../outside.safetensors", "absolute": str(outside),
                                 "backslash": "..\\outside.safetensors"}[where]
    _write_index(directory, index)
    with pytest.raises(CheckpointError, match=f"entry for tensor '{name}' is .*outside the checkpoint directory"):
        nj.load_hf(directory)


@pytest.mark.parametrize("index,message", [
    ("{", r"shard index is not valid JSON"),
    ("[1, 2]", r"no weight_map object"),
    ('{"weight_map": ["model.safetensors"]}', r"no weight_map object"),
    ('{"weight_map": {"lm_head.weight": 3}}', r"weight_map entry for tensor 'lm_head.weight' is 3, not a file"),
    ('{"weight_map": {"lm_head.weight": ""}}', r"weight_map entry for tensor 'lm_head.weight' is '', not a file"),
    ("[" * 100_000, r"shard index is nested too deeply"),
    (b"{\"weight_map\": {\"\xfe\": 1}}", r"shard index is not UTF-8"),
])
def test_malformed_indexes_are_rejected(tiny_checkpoint, tmp_path, index, message):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "ckpt")
    with open(os.path.join(directory, safetensors_io.INDEX_FILE), "wb") as f:
        f.write(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(CheckpointError, match=message) as error:
        nj.load_hf(directory)
    assert safetensors_io.INDEX_FILE in str(error.value)


def test_index_that_disagrees_with_the_shards_is_rejected(tiny_checkpoint, tmp_path):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "moved")
    index = _index(directory)
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]  # the index says shard 2, the tensor is in shard 1
    _write_index(directory, index)
    with pytest.raises(CheckpointError, match=f"maps tensor '{name}' to {files[1]}, but it is stored in"):
        nj.load_hf(directory)

    directory = _copy(source, tmp_path / "phantom")
    index = _index(directory)
    index["weight_map"]["backbone.layers.0.mixer.not_there"] = files[0]
    _write_index(directory, index)
    with pytest.raises(CheckpointError, match=r"maps tensors that its files do not hold.*not_there"):
        nj.load_hf(directory)


@pytest.mark.parametrize("config,message", [
    (b"{", r"config is not valid JSON"),
    (b"\xff\xfe{}", r"config is not UTF-8"),
    (b"[]", r"is a JSON list, not an object"),
    (b"[" * 100_000, r"config is nested too deeply"),
    ("drop:hidden_size", r"unusable config \(KeyError: missing field 'hidden_size'\)"),
    ("set:num_attention_heads=0", r"unusable config \(ZeroDivisionError"),
    ("set:hybrid_override_pattern=7", r"unusable config \(ValueError: .*hybrid_override_pattern"),
    ("set:layers_block_type={}", r"unusable config \(ValueError: .*layers_block_type"),
    ("set:vocab_size=\"many\"", r"unusable config"),
])
def test_malformed_configs_are_rejected(tiny_checkpoint, tmp_path, config, message):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "ckpt")
    path = os.path.join(directory, "config.json")
    if isinstance(config, str):
        with open(path) as f:
            fields = json.load(f)
        fields.pop("head_dim", None)
        action, _, rest = config.partition(":")
        if action == "drop":
            fields.pop(rest)
        else:
            key, _, value = rest.partition("=")
            fields[key] = json.loads(value)
        config = json.dumps(fields).encode()
    with open(path, "wb") as f:
        f.write(config)
    with pytest.raises(CheckpointError, match=message) as error:
        nj.load_hf(directory)
    assert path in str(error.value)


def test_non_finite_weights_are_rejected_unless_allowed(tiny_checkpoint, tmp_path):
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "nan")
    file_name = sorted(set(_index(directory)["weight_map"].values()))[1]
    path = os.path.join(directory, file_name)
    name = safetensors_io.read_header(path)[0].name

    def poison(tensors):
        value = tensors[name].copy()
        value.reshape(-1)[[0, -1]] = [np.nan, -np.inf]
        return {**tensors, name: value}

    _rewrite_shard(path, poison)
    with pytest.raises(CheckpointError, match=f"{file_name}: tensor '{name}': 2 of .* values are NaN or infinite"):
        nj.load_hf(directory)
    nj.load_hf(directory, check_finite=False)  # the escape hatch

    # Finite in the file but infinite once cast to the requested dtype.
    directory = _copy(source, tmp_path / "overflow")
    path = os.path.join(directory, file_name)
    _rewrite_shard(path, lambda t: {**t, name: np.full(t[name].shape, 1e6, np.float32)})
    with pytest.raises(CheckpointError, match=f"tensor '{name}': .*overflow to infinity when cast to float16"):
        nj.load_hf(directory, param_dtype="float16")


def test_malformed_orbax_model_config_is_rejected(tmp_path):
    directory = tmp_path / "params"
    directory.mkdir()
    path = directory / orbax_params.CONFIG_FILE
    for content, message in [(b"{", "model config is not valid JSON"), (b"[]", "is a JSON list"),
                             (b'{"vocab_size": 1}', r"unusable config \(TypeError")]:
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as error:
            orbax_params.load_config(str(directory))
        assert str(path) in str(error.value)


def test_shards_are_read_through_the_checks(tiny_checkpoint, tmp_path):
    """A shard whose header is corrupted after the index was written fails in load_hf with the file named."""
    _, _, source = tiny_checkpoint
    directory = _copy(source, tmp_path / "ckpt")
    file_name = sorted(set(_index(directory)["weight_map"].values()))[0]
    path = os.path.join(directory, file_name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)  # the last tensor now runs past the end
    with pytest.raises(CheckpointError, match=f"{file_name}: tensor .* run past the end of the data"):
        nj.load_hf(directory)


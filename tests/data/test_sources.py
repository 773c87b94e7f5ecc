"""Record sources: JSONL line index, Parquet row groups, a real locally prepared TFDS data set."""

import json
import pickle

import numpy as np
import pytest

from nemotron_jax.data import JsonlSource, ParquetSource, RecordError, TfdsSource, open_source, parse_sft_record


def test_jsonl_index_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"i": 0}\n\n   \n{"i": 1}\r\n{"i": 2}')  # blank, whitespace-only, CRLF, no final newline
    source = JsonlSource(path)
    assert len(source) == 3
    assert [source[i].fields["i"] for i in range(3)] == [0, 1, 2]
    assert [source[i].ref.position for i in range(3)] == [1, 4, 5]
    assert source[2].ref.source == str(path)


def test_jsonl_multiple_files_glob_and_random_access(tmp_path):
    for part in range(3):
        with open(tmp_path / f"part-{part}.jsonl", "w") as handle:
            for row in range(5):
                handle.write(json.dumps({"part": part, "row": row, "text": "ü" * row}) + "\n")
    source = JsonlSource(str(tmp_path / "part-*.jsonl"))
    assert len(source) == 15
    order = np.random.default_rng(0).permutation(15)
    for index in order:
        record = source[int(index)]
        assert (record.fields["part"], record.fields["row"]) == divmod(int(index), 5)
        assert record.ref.position == record.fields["row"] + 1
    restored = pickle.loads(pickle.dumps(source))
    assert restored[7].fields == source[7].fields


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n{"broken": \n[1, 2]\n')
    source = JsonlSource(path)
    with pytest.raises(RecordError) as caught:
        source[1]
    assert (caught.value.path, caught.value.line) == (str(path), 2)
    assert f"{path} line 2" in str(caught.value) and "malformed JSON" in str(caught.value)
    with pytest.raises(RecordError, match="line 3: record: expected a JSON object, got list"):
        source[2]
    with pytest.raises(IndexError):
        source[3]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl"):
        JsonlSource(str(tmp_path / "*.jsonl"))


def test_parquet_nested_records_and_row_refs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}", "reasoning_content": None},
                {"role": "assistant", "content": f"a{i}", "reasoning_content": f"r{i}" if i % 2 else None},
            ],
            "id": i,
        }
        for i in range(23)
    ]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    source = ParquetSource(path, cached_row_groups=2)
    assert len(source) == 23
    for index in np.random.default_rng(1).permutation(23):
        record = source[int(index)]
        assert record.fields["id"] == index and record.ref.position == index and record.ref.unit == "row"
        conversation = parse_sft_record(record.fields, record.ref)
        assert conversation.messages[1].reasoning == (f"r{index}" if index % 2 else None)
    assert pickle.loads(pickle.dumps(source))[22].fields["id"] == 22
    assert isinstance(open_source(str(path)), ParquetSource)


def test_open_source_rejects_unknown_extensions(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="random access"):
        open_source(str(tmp_path / "x.jsonl.gz"))


def _tiny_chat_builder(data_dir):
    import tensorflow_datasets as tfds

    class TinyChat(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "messages": tfds.features.Sequence(
                            {"role": tfds.features.Text(), "content": tfds.features.Text()}
                        ),
                        "id": np.int64,
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {
                    "messages": [{"role": "user", "content": f"q{i} ü"}, {"role": "assistant", "content": f"a{i}"}],
                    "id": i,
                }

    builder = TinyChat(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_tfds_source_reads_a_locally_prepared_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")  # optional dependency; installed by the `test` extra
    builder = _tiny_chat_builder(tmp_path)
    for source in (
        TfdsSource(builder=builder, split="train"),
        TfdsSource(directory=builder.data_dir, split="train"),
    ):
        assert len(source) == 12
        ids = sorted(source[i].fields["id"] for i in range(12))
        assert ids == list(range(12))
        record = source[3]
        conversation = parse_sft_record(record.fields, record.ref)
        assert conversation.messages[0].content == f"q{record.fields['id']} ü"  # bytes decoded to str
        assert str(record.ref) == "tfds:tiny_chat[train] index 3"
    with pytest.raises(ValueError, match="exactly one"):
        TfdsSource(split="train")
    mapped = TfdsSource(builder=builder, split="train", record_fn=lambda ex: {"messages": ex["messages"], "n": 1})
    assert mapped[0].fields["n"] == 1

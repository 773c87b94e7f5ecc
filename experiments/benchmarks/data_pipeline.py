"""Benchmark of the data layer: SFT packing pipeline throughput and padding, side by side, written as JSON.

    python -m experiments.benchmarks.data_pipeline --out /tmp/data_pipeline.json

Synthetic SFT conversations (log-normal reasoning / answer lengths, some multi-turn, some tool calls) are
written to a JSONL file; SentencePiece and BPE (`tokenizer.json`) tokenizers are trained on a sample. Measured:
  * `render_chat` alone, one thread (the per-example work, no pipeline);
  * the packed SFT pipeline end to end, for each tokenizer, reader threads and worker processes;
  * padding fraction of first-fit / best-fit, sorted or not, for several packing windows;
  * that a multiprocess pipeline resumes exactly from a saved state and yields the in-process batches.
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "data_pipeline.json", "where to write the JSON results")
_RECORDS = flags.DEFINE_integer("records", 3000, "synthetic SFT conversations")
_ROW_LENGTH = flags.DEFINE_integer("row_length", 4096, "packed row length")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "rows per batch")
_VOCAB = flags.DEFINE_integer("vocab_size", 4000, "tokenizer vocabulary size")

_WORDS = (
    "we need to find the value of x such that the equation holds for all integers n so let us first consider "
    "small cases then generalise the pattern because each step adds one more term and therefore the sum grows "
    "quadratically which means the answer is bounded above by a constant times n squared check weather city"
).split()


def _text(rng: random.Random, mean_words: float) -> str:
    count = max(1, int(rng.lognormvariate(0, 0.9) * mean_words))
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _conversation(rng: random.Random, index: int) -> dict:
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for _ in range(1 if rng.random() < 0.8 else 2):
        messages.append({"role": "user", "content": f"Problem {index}: " + _text(rng, 40)})
        assistant = {"role": "assistant", "content": _text(rng, 60)}
        if rng.random() < 0.8:
            assistant["reasoning_content"] = _text(rng, 300)
        messages.append(assistant)
    record = {"messages": messages}
    if rng.random() < 0.1:
        record["tools"] = [{"type": "function", "function": {"name": "search", "description": "Search.",
                                                             "parameters": {"type": "object", "properties": {
                                                                 "query": {"type": "string"}}}}}]
        messages[-1] = {"role": "assistant", "content": "", "reasoning_content": _text(rng, 50),
                        "tool_calls": [{"function": {"name": "search", "arguments": {"query": _text(rng, 5)}}}]}
        messages.append({"role": "tool", "content": _text(rng, 80)})
        messages.append({"role": "assistant", "content": _text(rng, 60)})
    return record


def _hf_tokenizer(texts, vocab_size, directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemotron_jax.data import CHAT_SPECIAL_TOKENS, HFTokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    return HFTokenizer.from_file(path, pad_token="<|endoftext|>")


def _run_pipeline(source, tokenizer, config, max_batches=None):
    from nemotron_jax.data import sft_dataset

    start = time.perf_counter()
    iterator = iter(sft_dataset(source, tokenizer, config, shard_index=0, shard_count=1))
    first = None
    batches = []
    for batch in iterator:
        if first is None:
            first = time.perf_counter() - start
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    seconds = time.perf_counter() - start
    stats = iterator.stats
    iterator.close()
    return {
        "seconds": round(seconds, 3),
        "first_batch_seconds": round(first or 0.0, 3),
        "examples_per_second": round(stats.examples / seconds, 1),
        "real_tokens_per_second": round(stats.real_tokens / seconds, 1),
        "batches": stats.batches,
        "padding_fraction": round(stats.padding_fraction, 4),
    }, batches


def main(argv):
    del argv
    import numpy as np

    from nemotron_jax.data import (
        JsonlSource,
        SFTDataConfig,
        parse_sft_record,
        render_chat,
        sft_dataset,
        train_sentencepiece,
    )

    flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
    results: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": {"records": _RECORDS.value, "row_length": _ROW_LENGTH.value, "batch_size": _BATCH_SIZE.value,
                     "vocab_size": _VOCAB.value},
    }
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "sft.jsonl")
        records = [_conversation(rng, index) for index in range(_RECORDS.value)]
        with open(path, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        start = time.perf_counter()
        source = JsonlSource(path)
        results["jsonl_index"] = {"bytes": os.path.getsize(path), "seconds": round(time.perf_counter() - start, 4)}

        sample = [json.dumps(record) for record in records[:500]]
        start = time.perf_counter()
        tokenizers = {"sentencepiece": train_sentencepiece(sample, _VOCAB.value)}
        results["sentencepiece_train_seconds"] = round(time.perf_counter() - start, 2)
        tokenizers["hf_bpe"] = _hf_tokenizer(sample, _VOCAB.value, directory)

        # Per-example work alone (parse + chat template + tokenize), one thread.
        results["render_chat_only"] = {}
        for name, tokenizer in tokenizers.items():
            start = time.perf_counter()
            lengths = []
            for index in range(min(1000, len(source))):
                record = source[index]
                conversation = parse_sft_record(record.fields, record.ref)
                lengths.append(len(render_chat(conversation.messages, tokenizer, tools=conversation.tools).token_ids))
            seconds = time.perf_counter() - start
            results["render_chat_only"][name] = {
                "examples_per_second": round(len(lengths) / seconds, 1),
                "tokens_per_second": round(sum(lengths) / seconds, 1),
                "mean_tokens_per_example": round(float(np.mean(lengths)), 1),
                "max_tokens_per_example": int(np.max(lengths)),
            }

        base = dict(row_length=_ROW_LENGTH.value, batch_size=_BATCH_SIZE.value, on_overlong="truncate", seed=0)
        results["pipeline"] = []
        for name, tokenizer in tokenizers.items():
            for threads, workers in ((1, 0), (4, 0), (16, 0), (4, 2)):
                config = SFTDataConfig(**base, num_threads=threads, worker_count=workers)
                measured, _ = _run_pipeline(source, tokenizer, config)
                results["pipeline"].append({"tokenizer": name, "threads": threads, "workers": workers, **measured})
                print(results["pipeline"][-1], flush=True)

        results["padding"] = []
        tokenizer = tokenizers["hf_bpe"]
        for strategy in ("first_fit", "best_fit"):
            for sort_by_length in (False, True):
                for window in (16, 128, 1024):
                    config = SFTDataConfig(**base, strategy=strategy, sort_by_length=sort_by_length,
                                           packing_window=window, num_threads=4, drop_remainder=True)
                    measured, _ = _run_pipeline(source, tokenizer, config)
                    results["padding"].append({"strategy": strategy, "sort_by_length": sort_by_length,
                                               "packing_window": window, "padding_fraction":
                                                   measured["padding_fraction"], "seconds": measured["seconds"]})
                    print(results["padding"][-1], flush=True)

        # Multiprocess resume: save after 5 batches, restore in a fresh pipeline, compare with the rest.
        config = SFTDataConfig(**base, num_threads=2, worker_count=2, packing_window=64)
        reference = list(iter(sft_dataset(source, tokenizer, SFTDataConfig(**base, num_threads=2, packing_window=64),
                                           shard_index=0, shard_count=1)))
        iterator = iter(sft_dataset(source, tokenizer, config, shard_index=0, shard_count=1))
        for _ in range(5):
            next(iterator)
        state = json.loads(json.dumps(iterator.get_state()))
        rest = list(iterator)
        iterator.close()
        resumed = iter(sft_dataset(source, tokenizer, config, shard_index=0, shard_count=1))
        resumed.set_state(state)
        resumed_rest = list(resumed)
        resumed.close()

        def same(first, second):
            return len(first) == len(second) and all(
                np.array_equal(a[key], b[key]) for a, b in zip(first, second) for key in a
            )

        results["multiprocess_resume"] = {
            "batches_after_state": len(rest),
            "resumed_equals_continued": same(rest, resumed_rest),
            "equals_in_process_pipeline": same(rest, reference[5:]),
        }
        print(results["multiprocess_resume"], flush=True)

    with open(_OUT.value, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

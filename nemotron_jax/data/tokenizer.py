"""Tokenizers: one small interface, a SentencePiece implementation and a Hugging Face `tokenizer.json` one.

`Tokenizer.encode` never adds BOS/EOS: the chat template (`chat_template.render_chat`) decides every special
token itself, so that the rendered token ids are exactly the concatenation of the rendered segments.
`Tokenizer.decode` keeps special tokens such as `<think>` and `<|im_end|>` in the text (they carry structure
that `split_reasoning` and the reward functions need).
"""

from __future__ import annotations

import abc
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

# Tokens the Nemotron-Cascade 2 chat template relies on. Tokenizers trained by this project register them as
# user-defined symbols so that each one encodes to a single id.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    IM_START,
    IM_END,
    THINK_OPEN,
    THINK_CLOSE,
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)


class Tokenizer(abc.ABC):
    """Text <-> token ids.

    Implementations: `SentencePieceTokenizer`, `HFTokenizer`.
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS. Special tokens written in the text map to their single ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(text) for text in texts]`; implementations batch it in native code where they can."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (including added / user-defined tokens): ids lie in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the tokenizer has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the tokenizer has none."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id used for padding (never trained on). Falls back to the EOS id, then 0, if the tokenizer has none."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of a single token (e.g. `<|im_start|>`); raises `KeyError` naming the token if it is not one."""

    @property
    def max_token_chars(self) -> int | None:
        """Most characters of text that one token can stand for (the longest vocabulary entry); None if unknown.

        A text of N characters then needs at least N / max_token_chars tokens, so the pipelines reject a
        record that cannot fit its length limit without tokenizing it (a 200 MB line costs ~45x its size
        to tokenize). The bound holds for normalizers that never delete characters (this project's
        SentencePiece models, byte-level BPE); with one that collapses whitespace runs, or an unknown token
        that swallows a run of unknown characters, a record of mostly such text could be judged longer than
        it is.
        """
        return None

    def literal_token_strings(self) -> tuple[str, ...]:
        """Strings that `encode` turns into a single token wherever they appear in the text (special and
        added tokens such as `<|im_end|>`); `chat_template.render_chat(literal_content=True)` keeps them from
        being formed out of message content. Default: the chat template's tokens that this vocabulary has."""
        found = []
        for token in CHAT_SPECIAL_TOKENS:
            try:
                self.token_to_id(token)
            except KeyError:
                continue
            found.append(token)
        return tuple(found)

    def id_of_each(self, tokens: Iterable[str]) -> dict[str, int]:
        """`{token: token_to_id(token)}` for several tokens; raises `KeyError` naming every missing one."""
        found: dict[str, int] = {}
        missing: list[str] = []
        for token in tokens:
            try:
                found[token] = self.token_to_id(token)
            except KeyError:
                missing.append(token)
        if missing:
            raise KeyError(f"tokens not in the vocabulary as single tokens: {missing}")
        return found


# --------------------------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`.model` file or its serialized bytes).

    Args:
      model: path to a `.model` file, or the serialized `ModelProto` bytes.
      add_dummy_prefix: None keeps the model's setting. False removes the leading "▁" SentencePiece inserts at
        the start of every `encode` call; the chat template encodes a conversation segment by segment, so a model
        with a dummy prefix would get one extra "▁" per segment. Models from `train_sentencepiece` have none.
    """

    def __init__(self, model: str | os.PathLike | bytes, *, add_dummy_prefix: bool | None = None):
        import sentencepiece as spm

        if isinstance(model, (str, os.PathLike)):
            with open(model, "rb") as handle:
                model_bytes = handle.read()
        elif isinstance(model, bytes):
            model_bytes = model
        else:
            raise TypeError(f"model must be a path or the serialized model bytes, got {type(model).__name__}")
        if add_dummy_prefix is not None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(model_bytes)
            proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
            model_bytes = proto.SerializeToString()
        self._model_bytes = model_bytes
        self._processor = spm.SentencePieceProcessor(model_proto=model_bytes)

    @property
    def model_bytes(self) -> bytes:
        """The serialized model (write it to a `.model` file to save the tokenizer)."""
        return self._model_bytes

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as handle:
            handle.write(self._model_bytes)

    def encode(self, text: str) -> list[int]:
        return list(self._processor.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._processor.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self._processor.get_piece_size())

    @property
    def bos_id(self) -> int | None:
        value = self._processor.bos_id()
        return None if value < 0 else int(value)

    @property
    def eos_id(self) -> int | None:
        value = self._processor.eos_id()
        return None if value < 0 else int(value)

    @property
    def pad_id(self) -> int:
        value = self._processor.pad_id()
        if value >= 0:
            return int(value)
        return self.eos_id if self.eos_id is not None else 0

    @property
    def max_token_chars(self) -> int | None:
        if getattr(self, "_max_token_chars", None) is None:
            processor = self._processor
            # "▁" stands for one space; a byte piece ("<0x41>") for one byte, at most one character.
            self._max_token_chars = max(
                1 if processor.is_byte(i) else len(processor.id_to_piece(i)) for i in range(processor.get_piece_size())
            )
        return self._max_token_chars

    def literal_token_strings(self) -> tuple[str, ...]:
        if getattr(self, "_literal_tokens", None) is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._model_bytes)
            user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
            # Only user-defined symbols are matched inside text; control symbols (<s>, </s>) never are.
            self._literal_tokens = tuple(piece.piece for piece in proto.pieces if piece.type == user_defined)
        return self._literal_tokens

    def token_to_id(self, token: str) -> int:
        token_id = int(self._processor.piece_to_id(token))
        # piece_to_id answers unk_id for unknown pieces.
        if token_id == self._processor.unk_id() and token != self._processor.id_to_piece(token_id):
            raise KeyError(f"token {token!r} is not a single piece of this SentencePiece model")
        return token_id

    # The C++ processor does not pickle; Grain worker processes need the tokenizer, so pickle the bytes.
    def __getstate__(self) -> dict[str, Any]:
        return {"model_bytes": self._model_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        self._model_bytes = state["model_bytes"]
        self._processor = spm.SentencePieceProcessor(model_proto=self._model_bytes)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    user_defined_symbols: Sequence[str] = CHAT_SPECIAL_TOKENS,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_length: int = 1 << 16,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model in memory and returns it.

    The model is set up for exact round trips of chat text: identity normalisation, whitespace kept as is, no
    dummy prefix, byte fallback for characters never seen in training. Ids: pad 0, unk 1, bos 2, eos 3, then
    `user_defined_symbols` (each encodes to a single id wherever it appears in a text).

    Args:
      texts: training texts (each is one "sentence" for SentencePiece; newlines inside are fine).
      vocab_size: an upper bound (`hard_vocab_limit=False`). With `byte_fallback`, it must be at least
        256 byte pieces + the distinct characters of the texts + the symbols + 4.
      user_defined_symbols: tokens that must stay single pieces (default: the chat template's tokens).
      model_type: "bpe" or "unigram".
      byte_fallback: encode unseen characters as UTF-8 byte pieces instead of unk.
      max_sentence_length: longest text (bytes) used for training; longer ones are skipped by SentencePiece.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            user_defined_symbols=list(user_defined_symbols),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_length,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        hint = ""
        if "required_chars" in str(error) or "smaller than" in str(error):
            hint = (
                " With byte_fallback=True the vocabulary must hold 256 byte pieces plus every distinct character "
                "of the training texts plus the user-defined symbols; raise vocab_size."
            )
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {error}.{hint}") from error
    return SentencePieceTokenizer(buffer.getvalue())


# --------------------------------------------------------------------------------------------- Hugging Face


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict with "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from tokenizer_config.json entry {value!r}")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`), through the `tokenizers` package.

    `tokenizer.json` does not say which tokens are BOS/EOS/pad; pass them, or use `from_directory`, which reads
    `tokenizer_config.json` next to it. EOS defaults to `<|im_end|>` when the vocabulary has it (the chat stop
    token of the Nemotron ChatML template).

    Args:
      tokenizer: a `tokenizers.Tokenizer`.
      bos_token, eos_token, pad_token: token strings; each must be a single token of the vocabulary.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self._tokenizer = tokenizer
        if eos_token is None and tokenizer.token_to_id(IM_END) is not None:
            eos_token = IM_END
        self._bos_id = None if bos_token is None else self.token_to_id(bos_token)
        self._eos_id = None if eos_token is None else self.token_to_id(eos_token)
        self._pad_id = None if pad_token is None else self.token_to_id(pad_token)
        self._special_tokens = (bos_token, eos_token, pad_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **special_tokens: str | None) -> HFTokenizer:
        """Loads a `tokenizer.json` file."""
        from tokenizers import Tokenizer as _HFRustTokenizer

        return cls(_HFRustTokenizer.from_file(os.fspath(path)), **special_tokens)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Loads `tokenizer.json` and reads BOS/EOS/pad from `tokenizer_config.json` when it exists."""
        directory = os.fspath(directory)
        special: dict[str, str | None] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
            for key in ("bos_token", "eos_token", "pad_token"):
                special[key] = _token_content(config.get(key))
        return cls.from_file(os.path.join(directory, "tokenizer.json"), **special)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Rust-side parallel encoding; the `_fast` variant skips computing character offsets.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [list(encoding.ids) for encoding in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        if self._pad_id is not None:
            return self._pad_id
        return self._eos_id if self._eos_id is not None else 0

    @property
    def max_token_chars(self) -> int | None:
        if getattr(self, "_max_token_chars", None) is None:
            # A byte-level vocabulary spells each byte as one character, so an entry's length bounds the
            # characters of text it covers; other models' entries (sub-words, "##" continuations) do too.
            self._max_token_chars = max(len(token) for token in self._tokenizer.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    def literal_token_strings(self) -> tuple[str, ...]:
        return tuple(token.content for token in self._tokenizer.get_added_tokens_decoder().values())

    def token_to_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not a single token of this tokenizer.json vocabulary")
        return int(token_id)

    def __getstate__(self) -> dict[str, Any]:
        bos, eos, pad = self._special_tokens
        return {"json": self._tokenizer.to_str(), "bos": bos, "eos": eos, "pad": pad}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as _HFRustTokenizer

        self.__init__(
            _HFRustTokenizer.from_str(state["json"]),
            bos_token=state["bos"],
            eos_token=state["eos"],
            pad_token=state["pad"],
        )

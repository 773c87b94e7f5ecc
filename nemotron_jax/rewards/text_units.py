"""Offline text units for instruction checks: words, sentences, paragraphs, language.

No NLTK data downloads: the word and sentence rules are written here and documented, so counts are
reproducible on any machine.
"""

from __future__ import annotations

import re
import threading

_WORD = re.compile(r"\w+")
_WORD_WITH_APOSTROPHES = re.compile(r"\w+(?:['’]\w+)*")


def words(text: str) -> list[str]:
    """Maximal runs of word characters (``\\w+``): ``"don't stop-now"`` -> ``['don', 't', 'stop', 'now']``.

    This is the rule IFEval's word counts use (a ``\\w+`` regexp tokenizer).
    """
    return _WORD.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


def word_tokens(text: str) -> list[str]:
    """Words with inner apostrophes kept together (``"DON'T"`` is one token); used for case checks."""
    return _WORD_WITH_APOSTROPHES.findall(text)


# Abbreviations after which a full stop does not end a sentence (lower case, without the final dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al inc ltd co corp no nos fig figs eq eqs approx dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k u.s.a ph.d vol pp ed op".split()
)
# Sentence-final punctuation, optional closing quotes/brackets, then whitespace or the end; CJK full-width
# marks end a sentence without a following space. A match starts only at the beginning of a punctuation run and
# the quantifiers are possessive, so that a long run of dots costs linear time, not quadratic.
_SENTENCE_END = re.compile(r"(?<![.!?])([.!?]++)[\"'”’)\]]*+(?=\s|$)|([。！？]++)[\"'”’」』)\]]*+")
_TOKEN_BEFORE_PERIOD = re.compile(r"(\S+)\.$")
_NEXT_VISIBLE_CHARACTER = re.compile(r"\s*+(\S)")
_LONGEST_ABBREVIATION = 16


def split_sentences(text: str) -> list[str]:
    """Splits ``text`` into sentences.

    A sentence ends at ``.``, ``!``, ``?``, possibly repeated (``?!``, ``...``) and followed by closing quotes or
    brackets, when whitespace or the end of the text follows; or at the full-width ``。！？`` (no space needed).
    A full stop does not end a sentence after a known abbreviation (``Dr.``, ``e.g.``), after a single-letter
    initial (``J. Smith``), or when the next word starts with a lower-case letter (``approx. ten``). Decimal
    numbers never split (no whitespace after their point). Line breaks alone do not end a sentence, as in NLTK's
    Punkt, which IFEval uses. Empty pieces are dropped. Linear in the length of ``text``.
    """
    sentences = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.group(1) == ".":  # (group 1 is None for CJK marks)
            window = text[max(start, match.start(1) - _LONGEST_ABBREVIATION) : match.start(1) + 1]
            preceding = _TOKEN_BEFORE_PERIOD.search(window)
            token = preceding.group(1).lower().lstrip("(\"'“‘") if preceding else ""
            if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                continue
            following = _NEXT_VISIBLE_CHARACTER.match(text, match.end())
            if following and following.group(1).islower():
                continue
        piece = text[start : match.end()].strip()
        if piece:
            sentences.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


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

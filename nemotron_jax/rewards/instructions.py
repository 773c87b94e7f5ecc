"""Checkers for verifiable instructions (the IFEval family), keyed by IFEval instruction id.

Each checker is ``check(answer: str, **kwargs) -> bool``, where ``answer`` is the answer part of a response and
the keyword arguments are the instruction's parameters under the names the IFEval data uses (``relation``,
``num_words``, ``keywords``, ...). All of a checker's keyword arguments are required.

The 25 IFEval ids check exactly what Google's reference implementation (``instruction_following_eval``,
strict mode; the copy in ``lm_eval.tasks.ifeval``) checks, with its tokenizers (``text_units``), except where
the reference is plainly buggy: those deviations are listed in ``REFERENCE_DEVIATIONS`` and in each checker's
docstring, and ``tests/rewards/test_ifeval_reference.py`` compares every id with the reference on a generated
corpus. The reference's regular expressions that backtrack on degenerate text (``[`` * n, newlines * n,
``<`` * n) are replaced by linear scans that find the same matches. Comparisons named by ``relation`` are
``"less than"`` (count < N) and ``"at least"`` (count >= N).

``register_instruction`` adds a checker for a new id (IFBench-style instructions, your own).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from nemotron_jax.rewards import text_units


@dataclasses.dataclass(frozen=True)
class InstructionChecker:
    """A checker function and the names of the keyword arguments it takes."""

    instruction_id: str
    check: Callable[..., bool]
    kwarg_names: tuple[str, ...]


INSTRUCTION_CHECKERS: dict[str, InstructionChecker] = {}


def register_instruction(instruction_id: str, *, overwrite: bool = False):
    """Decorator registering ``check(answer, *, kwarg...) -> bool`` under ``instruction_id``."""

    def decorator(check: Callable[..., bool]) -> Callable[..., bool]:
        if instruction_id in INSTRUCTION_CHECKERS and not overwrite:
            raise ValueError(f"instruction id {instruction_id!r} is already registered")
        parameters = list(inspect.signature(check).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if not parameters or parameters[0].kind not in positional:
            raise TypeError(f"checker for {instruction_id!r} must take the answer text as its first argument")
        names = tuple(parameter.name for parameter in parameters[1:] if parameter.kind == parameter.KEYWORD_ONLY)
        INSTRUCTION_CHECKERS[instruction_id] = InstructionChecker(instruction_id, check, names)
        return check

    return decorator


# ----------------------------------------------------------------------------------------------------------------
# Keyword-argument normalisation. The released data stores numbers as ints or floats (Parquet), and pads each
# kwargs dict with every other instruction's keys set to None.

_INTEGER_KWARGS = frozenset(
    "num_words num_sentences num_paragraphs nth_paragraph num_placeholders num_bullets num_highlights "
    "num_sections frequency let_frequency capital_frequency small_n n_start n_end N n_sent n_words n m".split()
)
_RELATION_KWARGS = frozenset({"relation", "let_relation", "capital_relation"})
_LIST_KWARGS = frozenset({"keywords", "forbidden_words"})
_RELATIONS = ("less than", "at least")


def _normalize_kwarg(instruction_id: str, name: str, value: Any) -> Any:
    where = f"instruction {instruction_id!r}, kwarg {name!r}"
    if name in _INTEGER_KWARGS:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
        if not number.is_integer() or number < 0:
            raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
        return int(number)
    if name in _RELATION_KWARGS:
        relation = str(value).strip().lower().replace("_", " ")
        if relation not in _RELATIONS:
            raise ValueError(f"{where}: expected one of {_RELATIONS}, got {value!r}")
        return relation
    if name in _LIST_KWARGS:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list of strings, got {value!r}")
        items = [str(item) for item in value]
        if not items or any(not item.strip() for item in items):
            raise ValueError(f"{where}: expected a non-empty list of non-empty strings, got {value!r}")
        return items
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def resolve_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checker's keyword arguments for one instruction, validated and normalised.

    ``None`` and ``{}`` mean "no arguments"; keys whose value is ``None`` are dropped (the released data pads every
    dict with all keys). A missing required argument, or an unexpected one with a value, raises ValueError.
    """
    checker = get_checker(instruction_id)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"instruction {instruction_id!r}: kwargs must be a mapping or None, got {kwargs!r}")
    given = {name: value for name, value in kwargs.items() if value is not None}
    unexpected = sorted(set(given) - set(checker.kwarg_names))
    if unexpected:
        raise ValueError(
            f"instruction {instruction_id!r}: unexpected kwargs {unexpected} (it takes {list(checker.kwarg_names)})"
        )
    missing = [name for name in checker.kwarg_names if name not in given]
    if missing:
        raise ValueError(f"instruction {instruction_id!r}: missing kwargs {missing}")
    return {name: _normalize_kwarg(instruction_id, name, value) for name, value in given.items()}


def get_checker(instruction_id: str) -> InstructionChecker:
    try:
        return INSTRUCTION_CHECKERS[instruction_id]
    except KeyError:
        raise ValueError(
            f"unknown instruction id {instruction_id!r}; known ids: {sorted(INSTRUCTION_CHECKERS)}"
        ) from None


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# Where these checkers knowingly differ from the reference (Google's IFEval, strict mode). Each is a reference
# bug; the differential test recognises the affected inputs and keeps them out of the agreement figure.
REFERENCE_DEVIATIONS: dict[str, str] = {
    "regex_kwargs": "keywords, forbidden words, the keyword of keywords:frequency, the section splitter and the "
    "postscript marker are matched as literal text; the reference pastes them into a regular expression unescaped "
    "(a keyword 'C++' or 'a.b' is a broken or different pattern there).",
    "nth_paragraph_index": "length_constraints:nth_paragraph_first_word takes the nth non-empty paragraph; the "
    "reference counts only non-empty paragraphs but indexes the raw split, so 'A\\n\\n\\n\\nB' has two paragraphs "
    "of which the second is empty.",
    "spaceless_first_word": "length_constraints:nth_paragraph_first_word: a paragraph starting in Chinese or "
    "Japanese (no spaces between words) need only begin with first_word; the reference compares its whole first "
    "whitespace-separated run, so no such paragraph can ever match a word.",
    "json_recursion": "detectable_format:json_format says 'not followed' for JSON nested too deeply for Python's "
    "parser ('[' * 100000); the reference raises RecursionError.",
    "language_code": "language:response_language takes any langdetect code, case-insensitively, and 'zh' accepts "
    "langdetect's 'zh-cn'/'zh-tw'; the reference raises KeyError for a code outside its 30 lower-case ones.",
}


def _literal_search(pattern_text: str, text: str, *, word_boundaries: bool = False) -> re.Match | None:
    pattern = re.escape(pattern_text)
    if word_boundaries:
        pattern = r"\b" + pattern + r"\b"
    return re.search(pattern, text, re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# keywords


@register_instruction("keywords:existence")
def check_keywords_existence(answer: str, *, keywords: list[str]) -> bool:
    """Every keyword occurs, case-insensitively, anywhere ("apple" is found in "apples"). Reference:
    ``re.search(keyword, answer, re.IGNORECASE)``; here the keyword is literal text (``REFERENCE_DEVIATIONS``)."""
    return all(_literal_search(keyword, answer) for keyword in keywords)


@register_instruction("keywords:frequency")
def check_keyword_frequency(answer: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """Non-overlapping case-insensitive occurrences of the (stripped) keyword, compared with ``frequency``."""
    count = len(re.findall(re.escape(keyword.strip()), answer, re.IGNORECASE))
    return _compare(count, relation, frequency)


@register_instruction("keywords:forbidden_words")
def check_forbidden_words(answer: str, *, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs between word boundaries (``\\b``), case-insensitively ("cat" does not forbid
    "category")."""
    return not any(_literal_search(word, answer, word_boundaries=True) for word in forbidden_words)


@register_instruction("keywords:letter_frequency")
def check_letter_frequency(answer: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of ``letter`` in the lower-cased answer compared with ``let_frequency``. The reference
    silently replaces an invalid letter by a random one; here it is an error."""
    letter = letter.strip().lower()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"keywords:letter_frequency: letter must be a single letter, got {letter!r}")
    return _compare(answer.lower().count(letter), let_relation, let_frequency)


# ----------------------------------------------------------------------------------------------------------------
# language and case


@register_instruction("language:response_language")
def check_response_language(answer: str, *, language: str) -> bool:
    """langdetect (seeded, deterministic) finds ``language`` (ISO 639-1). Text in which langdetect finds no
    features (no letters) counts as followed, as in the reference. See ``REFERENCE_DEVIATIONS`` for ``zh``."""
    detected = text_units.detect_language(answer)
    return detected is None or text_units.same_language(detected, language)


def _english_in_case(answer: str, in_case: bool) -> bool:
    if not in_case:
        return False
    detected = text_units.detect_language(answer)
    return detected is None or detected == "en"


@register_instruction("change_case:english_capital")
def check_english_capital(answer: str) -> bool:
    """``answer.isupper()`` and langdetect finds English (or no language at all, as in the reference)."""
    return _english_in_case(answer, answer.isupper())


@register_instruction("change_case:english_lowercase")
def check_english_lowercase(answer: str) -> bool:
    """``answer.islower()`` and langdetect finds English (or no language at all, as in the reference)."""
    return _english_in_case(answer, answer.islower())


@register_instruction("change_case:capital_word_frequency")
def check_capital_word_frequency(answer: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Tokens of ``nltk.word_tokenize`` written in capitals (``NASA``, ``I``; ``DON'T`` is ``DO`` + ``N'T``),
    counted and compared with ``capital_frequency``."""
    count = text_units.count_upper_case_tokens(answer, limit=capital_frequency)
    return _compare(count, capital_relation, capital_frequency)


# ----------------------------------------------------------------------------------------------------------------
# length constraints


@register_instruction("length_constraints:number_words")
def check_number_words(answer: str, *, num_words: int, relation: str) -> bool:
    """Word count (runs of ``\\w``; see ``text_units.words``) compared with ``num_words``."""
    return _compare(text_units.count_words(answer), relation, num_words)


@register_instruction("length_constraints:number_sentences")
def check_number_sentences(answer: str, *, num_sentences: int, relation: str) -> bool:
    """Punkt sentence count (``text_units.count_sentences``) compared with ``num_sentences``."""
    return _compare(text_units.count_sentences(answer, limit=num_sentences), relation, num_sentences)


@register_instruction("length_constraints:number_paragraphs")
def check_number_paragraphs(answer: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***`` (the reference splits on
    ``\\s?\\*\\*\\*\\s?``, so ``****`` separates too); an empty paragraph other than the first or last fails."""
    return count_divided_pieces(re.split(r"\s?\*\*\*\s?", answer)) == num_paragraphs


def count_divided_pieces(pieces: list[str]) -> int | None:
    """Non-blank pieces of a split, or None if a piece other than the first or last is blank (the reference's
    paragraph rule: a divider at either end is allowed, two dividers in a row are not)."""
    last = len(pieces) - 1
    if any(not piece.strip() for piece in pieces[1:last]):
        return None
    return len(pieces) - sum(1 for index in {0, last} if not pieces[index].strip())


_FIRST_WORD_STOP = frozenset(".,?!'\"")
# Kana and CJK ideographs: scripts written without spaces between words.
_SPACELESS_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@register_instruction("length_constraints:nth_paragraph_first_word")
def check_nth_paragraph_first_word(answer: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` non-empty paragraphs separated by ``\\n\\n``, and the first word of paragraph
    ``nth_paragraph`` (1-based) is ``first_word`` (case-insensitive). As in the reference, the first word is the
    first whitespace-separated token, with leading ``'`` and ``"`` removed, cut at the first of ``.,?!'"``
    (so ``**Hello**`` is not ``hello``). Chinese and Japanese put no spaces between words: a paragraph in them
    need only begin with ``first_word``. See ``REFERENCE_DEVIATIONS`` for both departures from the reference."""
    paragraphs = [paragraph.strip() for paragraph in answer.split("\n\n") if paragraph.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    wanted = first_word.strip().lower()
    token = paragraphs[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    if _SPACELESS_SCRIPT.match(token):
        return token.lower().startswith(wanted)
    word = "".join(itertools.takewhile(lambda char: char not in _FIRST_WORD_STOP, token)).lower()
    return word == wanted


# ----------------------------------------------------------------------------------------------------------------
# detectable content


def _count_bracket_spans(text: str) -> int:
    """``len(re.findall(r"\\[.*?\\]", text))`` in linear time: ``[`` then the nearest ``]`` on the same line
    (``[]`` counts). The regex rescans the rest of the line from every unmatched ``[``: quadratic on ``[ * n``."""
    count = 0
    position = 0
    while True:
        opening = text.find("[", position)
        if opening < 0:
            return count
        line_end = text.find("\n", opening)
        if line_end < 0:
            line_end = len(text)
        closing = text.find("]", opening + 1, line_end)
        if closing < 0:
            position = line_end  # no "[" before this line's end can be closed either
        else:
            count += 1
            position = closing + 1


@register_instruction("detectable_content:number_placeholders")
def check_number_placeholders(answer: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket spans on one line, like ``[address]`` (``[]`` counts too)."""
    return _count_bracket_spans(answer) >= num_placeholders


@register_instruction("detectable_content:postscript")
def check_postscript(answer: str, *, postscript_marker: str) -> bool:
    """The marker occurs anywhere (case-insensitive): ``P.S.`` as ``p.s.``/``p. s.``, ``P.P.S`` as ``p.p.s``
    with an optional space after each dot, any other marker literally. The reference's ``\\s*marker.*$`` matches
    wherever the marker does; its leading ``\\s*`` only made it quadratic on whitespace."""
    marker = postscript_marker.strip()
    if not marker:
        raise ValueError("detectable_content:postscript: postscript_marker is empty")
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, answer.lower()) is not None


# ----------------------------------------------------------------------------------------------------------------
# detectable format

_NON_SPACE = re.compile(r"\S")


def _count_line_items(text: str, bullet: str) -> int:
    """``len(re.findall(r"^\\s*\\*[^\\*].*$", text, re.MULTILINE))`` (``bullet="*"``) or the same with ``-``
    and no ``[^\\*]`` (``bullet="-"``), in linear time.

    From each line start, ``\\s*`` can only succeed by taking the whole whitespace run (which may cross blank
    lines); the regex re-scans that run from every line start inside it, quadratic on ``"\\n" * n``. Here the
    run's end is remembered while the line starts stay inside it.
    """
    count = 0
    length = len(text)
    position = 0  # a line start
    run_start = run_end = -1
    while position < length:
        if not run_start <= position < run_end:
            non_space = _NON_SPACE.search(text, position)
            run_start, run_end = position, (non_space.start() if non_space else length)
        head = run_end
        if bullet == "*":
            matched = head + 1 < length and text[head] == "*" and text[head + 1] != "*"
            rest = head + 2  # `[^\*]` may be the newline; `.*` then runs over the next line
        else:
            matched = head < length and text[head] == "-"
            rest = head + 1
        if matched:
            count += 1
            end = text.find("\n", rest)
            if end < 0:
                return count
            position = end if text[end - 1] == "\n" else end + 1  # `^` matches at `end` only after a newline
        else:
            newline = text.find("\n", position)
            if newline < 0:
                return count
            position = newline + 1
    return count


@register_instruction("detectable_format:number_bullet_lists")
def check_number_bullet_lists(answer: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` bullet lines. As in the reference: a line whose first non-space character is
    ``*`` not followed by another ``*`` (``*item`` and ``*italic*`` count, ``**bold**`` does not), or ``-``
    (``---`` counts); ``+`` does not."""
    return _count_line_items(answer, "*") + _count_line_items(answer, "-") == num_bullets


_CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@register_instruction("detectable_format:constrained_response")
def check_constrained_response(answer: str) -> bool:
    """The answer contains one of "My answer is yes." / "My answer is no." / "My answer is maybe."."""
    return any(option in answer for option in _CONSTRAINED_RESPONSES)


@register_instruction("detectable_format:number_highlighted_sections")
def check_number_highlighted_sections(answer: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` highlights: matches of ``\\*[^\\n\\*]*\\*`` with non-blank text, plus matches
    of ``\\*\\*[^\\n\\*]*\\*\\*`` with non-blank text (the reference counts ``**bold**`` in both passes)."""
    single = sum(1 for span in re.findall(r"\*[^\n\*]*\*", answer) if span.strip("*").strip())
    double = sum(
        1 for span in re.findall(r"\*\*[^\n\*]*\*\*", answer) if span.removeprefix("**").removesuffix("**").strip()
    )
    return single + double >= num_highlights


@register_instruction("detectable_format:multiple_sections")
def check_multiple_sections(answer: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` section markers ``<section_spliter> <number>`` (matched as ``\\s?`` + the
    splitter, case-sensitive and literal, + ``\\s?\\d+\\s?``; ``SECTION 2`` and ``SUBSECTION2`` both count)."""
    splitter = section_spliter.strip()
    if not splitter:
        raise ValueError("detectable_format:multiple_sections: section_spliter is empty")
    return len(re.findall(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", answer)) >= num_sections


@register_instruction("detectable_format:json_format")
def check_json_format(answer: str) -> bool:
    """The answer, stripped, with one leading ```` ```json ````/```` ```Json ````/```` ```JSON ```` and one
    leading and one trailing ```` ``` ```` removed, parses as JSON. Other fence languages are not JSON. JSON too
    deeply nested to parse is not followed (``REFERENCE_DEVIATIONS``)."""
    text = (
        answer.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@register_instruction("detectable_format:title")
def check_title(answer: str) -> bool:
    """A title in double angular brackets, ``<<title>>``, on one line, with non-blank text.

    Per line the reference's greedy ``<<[^\\n]+>>`` spans from the first ``<<`` to the last ``>>`` (at least
    one character apart); that span, with ``<`` and ``>`` stripped from its ends, must not be blank. Found
    here with ``find``/``rfind`` per line: the regex is quadratic on ``"<" * n``."""
    for line in answer.split("\n"):
        start = line.find("<<")
        end = line.rfind(">>")
        if start >= 0 and end >= start + 3 and line[start : end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# combination, start/end, punctuation


@register_instruction("combination:two_responses")
def check_two_responses(answer: str) -> bool:
    """Exactly two different non-empty responses separated by six asterisks ``******`` (an empty piece is
    allowed only at either end)."""
    responses = answer.split("******")
    valid = []
    for index, response in enumerate(responses):
        if response.strip():
            valid.append(response)
        elif index not in (0, len(responses) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


@register_instruction("combination:repeat_prompt")
def check_repeat_prompt(answer: str, *, prompt_to_repeat: str) -> bool:
    """The answer starts with the prompt repeated verbatim (case-insensitive, surrounding whitespace ignored)."""
    return answer.strip().lower().startswith(prompt_to_repeat.strip().lower())


@register_instruction("startend:end_checker")
def check_end_phrase(answer: str, *, end_phrase: str) -> bool:
    """The answer ends with ``end_phrase`` (case-insensitive; surrounding whitespace, then straight double
    quotes ``"`` ignored, as in the reference) and nothing follows it."""
    return answer.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@register_instruction("startend:quotation")
def check_quotation(answer: str) -> bool:
    """The whole answer (stripped) is wrapped in straight double quotes ``"..."`` (curly quotes do not count)."""
    text = answer.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@register_instruction("punctuation:no_comma")
def check_no_comma(answer: str) -> bool:
    """No ASCII comma ``,`` (the full-width ``，`` is allowed, as in the reference)."""
    return "," not in answer


IFEVAL_INSTRUCTION_IDS: tuple[str, ...] = tuple(INSTRUCTION_CHECKERS)

# open-instruct's IF-RL ids register themselves on import (they build on the checkers above).
from nemotron_jax.rewards import instructions_open_instruct  # noqa: E402, F401

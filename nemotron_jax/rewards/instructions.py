"""Checkers for verifiable instructions (the IFEval family), keyed by IFEval instruction id.

Each checker is ``check(answer: str, **kwargs) -> bool``, where ``answer`` is the answer part of a response and
the keyword arguments are the instruction's parameters under the names the IFEval data uses (``relation``,
``num_words``, ``keywords``, ...). All of a checker's keyword arguments are required.

Semantics follow IFEval's published definitions; where a rule had to be chosen it is stated in the checker's
docstring. Comparisons named by ``relation`` are ``"less than"`` (count < N) and ``"at least"`` (count >= N).

``register_instruction`` adds a checker for a new id (IFBench-style instructions, your own).
"""

from __future__ import annotations

import dataclasses
import inspect
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
    "num_sections frequency let_frequency capital_frequency".split()
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


def _contains_word(text: str, word: str) -> bool:
    """Case-insensitive whole-word (or whole-phrase) occurrence."""
    return re.search(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", text, re.IGNORECASE) is not None


# ----------------------------------------------------------------------------------------------------------------
# keywords


@register_instruction("keywords:existence")
def check_keywords_existence(answer: str, *, keywords: list[str]) -> bool:
    """Every keyword occurs (case-insensitive substring, as in IFEval: "apple" is found in "apples")."""
    lowered = answer.lower()
    return all(keyword.strip().lower() in lowered for keyword in keywords)


@register_instruction("keywords:frequency")
def check_keyword_frequency(answer: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword's case-insensitive (substring) occurrence count compared with ``frequency``."""
    count = len(re.findall(re.escape(keyword.strip()), answer, re.IGNORECASE))
    return _compare(count, relation, frequency)


@register_instruction("keywords:forbidden_words")
def check_forbidden_words(answer: str, *, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word (case-insensitive; "cat" does not forbid "category")."""
    return not any(_contains_word(answer, word) for word in forbidden_words)


@register_instruction("keywords:letter_frequency")
def check_letter_frequency(answer: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of ``letter`` (case-insensitive) compared with ``let_frequency``."""
    letter = letter.strip()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"keywords:letter_frequency: letter must be a single letter, got {letter!r}")
    return _compare(answer.lower().count(letter.lower()), let_relation, let_frequency)


# ----------------------------------------------------------------------------------------------------------------
# language and case


@register_instruction("language:response_language")
def check_response_language(answer: str, *, language: str) -> bool:
    """langdetect (seeded, deterministic) finds ``language`` (ISO 639-1; ``zh`` accepts ``zh-cn``/``zh-tw``).

    Text without letters has no language and fails.
    """
    return text_units.same_language(text_units.detect_language(answer), language)


@register_instruction("change_case:english_capital")
def check_english_capital(answer: str) -> bool:
    """The answer is in English and has no lower-case letters (and at least one cased letter)."""
    return answer.isupper() and text_units.same_language(text_units.detect_language(answer), "en")


@register_instruction("change_case:english_lowercase")
def check_english_lowercase(answer: str) -> bool:
    """The answer is in English and has no upper-case letters (and at least one cased letter)."""
    return answer.islower() and text_units.same_language(text_units.detect_language(answer), "en")


@register_instruction("change_case:capital_word_frequency")
def check_capital_word_frequency(answer: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Words written entirely in capitals (``NASA``, ``DON'T``, and also ``I`` and ``A``) counted and compared."""
    count = sum(1 for token in text_units.word_tokens(answer) if token.isupper())
    return _compare(count, capital_relation, capital_frequency)


# ----------------------------------------------------------------------------------------------------------------
# length constraints


@register_instruction("length_constraints:number_words")
def check_number_words(answer: str, *, num_words: int, relation: str) -> bool:
    """Word count (runs of ``\\w``; see ``text_units.words``) compared with ``num_words``."""
    return _compare(text_units.count_words(answer), relation, num_words)


@register_instruction("length_constraints:number_sentences")
def check_number_sentences(answer: str, *, num_sentences: int, relation: str) -> bool:
    """Sentence count (see ``text_units.split_sentences``) compared with ``num_sentences``."""
    return _compare(text_units.count_sentences(answer), relation, num_sentences)


def _stripped_pieces(pieces: list[str]) -> list[str]:
    """Each piece stripped; an empty first and an empty last piece (a separator at either end) dropped."""
    pieces = [piece.strip() for piece in pieces]
    if pieces and not pieces[0]:
        pieces = pieces[1:]
    if pieces and not pieces[-1]:
        pieces = pieces[:-1]
    return pieces


def _divided_paragraphs(answer: str) -> list[str] | None:
    """Paragraphs separated by the markdown divider ``***``; None if an inner paragraph is empty."""
    pieces = _stripped_pieces(re.split(r"(?<!\*)\*\*\*(?!\*)", answer))
    if any(not piece for piece in pieces):
        return None
    return pieces


@register_instruction("length_constraints:number_paragraphs")
def check_number_paragraphs(answer: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` non-empty paragraphs separated by ``***`` (an empty one in between fails)."""
    paragraphs = _divided_paragraphs(answer)
    return paragraphs is not None and len(paragraphs) == num_paragraphs


# Kana and CJK ideographs: scripts written without spaces between words.
_SPACELESS_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@register_instruction("length_constraints:nth_paragraph_first_word")
def check_nth_paragraph_first_word(answer: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by blank lines, and paragraph ``nth_paragraph`` (1-based)
    starts with ``first_word`` (case-insensitive; leading quotes, markdown markers and punctuation ignored).
    Chinese and Japanese text has no spaces between words: there the paragraph need only begin with it."""
    paragraphs = [piece.strip() for piece in re.split(r"\n[ \t]*\n", answer) if piece.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    wanted = first_word.strip().lower()
    start = re.search(r"\w", paragraphs[nth_paragraph - 1])
    if start is None:
        return False
    text = paragraphs[nth_paragraph - 1][start.start() :].lower()
    if _SPACELESS_SCRIPT.match(text):
        return text.startswith(wanted)
    first = re.match(r"\w+(?:['’]\w+)*", text)
    return first is not None and first.group(0) == wanted


# ----------------------------------------------------------------------------------------------------------------
# detectable content


@register_instruction("detectable_content:number_placeholders")
def check_number_placeholders(answer: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders like ``[address]`` (non-empty, one line)."""
    placeholders = re.findall(r"\[([^\[\]\n]+)\]", answer)
    return sum(1 for placeholder in placeholders if placeholder.strip()) >= num_placeholders


@register_instruction("detectable_content:postscript")
def check_postscript(answer: str, *, postscript_marker: str) -> bool:
    """A line starts with the marker (``P.S.``, ``P.P.S``; case-insensitive, optional space after each dot,
    optionally in markdown bold)."""
    marker = postscript_marker.strip()
    if not marker:
        raise ValueError("detectable_content:postscript: postscript_marker is empty")
    pattern = "".join(re.escape(char) + (r"\s?" if char == "." else "") for char in marker)
    return re.search(r"^[ \t>*_]*" + pattern, answer, re.IGNORECASE | re.MULTILINE) is not None


# ----------------------------------------------------------------------------------------------------------------
# detectable format


@register_instruction("detectable_format:number_bullet_lists")
def check_number_bullet_lists(answer: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines (``* item``, ``- item``, ``+ item``; a ``---`` rule or a
    ``**bold**`` line is not a bullet)."""
    return len(re.findall(r"^[ \t]*[*+-][ \t]+\S", answer, re.MULTILINE)) == num_bullets


_CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@register_instruction("detectable_format:constrained_response")
def check_constrained_response(answer: str) -> bool:
    """The answer contains one of "My answer is yes." / "My answer is no." / "My answer is maybe."."""
    return any(option in answer for option in _CONSTRAINED_RESPONSES)


@register_instruction("detectable_format:number_highlighted_sections")
def check_number_highlighted_sections(answer: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` markdown highlights ``*text*`` or ``**text**`` on one line, text non-empty."""
    spans = re.findall(r"(?<!\*)\*\*([^\n*]+)\*\*(?!\*)|(?<!\*)\*([^\n*]+)\*(?!\*)", answer)
    return sum(1 for double, single in spans if (double or single).strip()) >= num_highlights


@register_instruction("detectable_format:multiple_sections")
def check_multiple_sections(answer: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` section headers ``<section_spliter> <number>`` (e.g. ``SECTION 2``; the
    splitter is matched case-sensitively, as written in the instruction)."""
    splitter = section_spliter.strip()
    if not splitter:
        raise ValueError("detectable_format:multiple_sections: section_spliter is empty")
    return len(re.findall(r"(?<!\w)" + re.escape(splitter) + r"\s*\d+", answer)) >= num_sections


@register_instruction("detectable_format:json_format")
def check_json_format(answer: str) -> bool:
    """The whole answer is one JSON value, optionally inside a ```json fenced block."""
    text = answer.strip()
    fenced = re.fullmatch(r"```[A-Za-z]*[ \t]*\n?(.*?)\n?[ \t]*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@register_instruction("detectable_format:title")
def check_title(answer: str) -> bool:
    """A title in double angular brackets, ``<<title>>``, with non-empty text on one line."""
    return any(title.strip() for title in re.findall(r"<<([^\n<>]+)>>", answer))


# ----------------------------------------------------------------------------------------------------------------
# combination, start/end, punctuation


@register_instruction("combination:two_responses")
def check_two_responses(answer: str) -> bool:
    """Exactly two different non-empty responses separated by six asterisks ``******``."""
    pieces = _stripped_pieces(answer.split("******"))
    return len(pieces) == 2 and all(pieces) and pieces[0] != pieces[1]


@register_instruction("combination:repeat_prompt")
def check_repeat_prompt(answer: str, *, prompt_to_repeat: str) -> bool:
    """The answer starts with the prompt repeated verbatim (case-insensitive, surrounding whitespace ignored)."""
    return answer.strip().lower().startswith(prompt_to_repeat.strip().lower())


@register_instruction("startend:end_checker")
def check_end_phrase(answer: str, *, end_phrase: str) -> bool:
    """The answer ends with ``end_phrase`` (case-insensitive; surrounding whitespace and double quotation marks
    ignored, so that it combines with ``startend:quotation``) and nothing follows it."""
    text = answer.strip().strip('"“”').strip()
    return text.lower().endswith(end_phrase.strip().lower())


@register_instruction("startend:quotation")
def check_quotation(answer: str) -> bool:
    """The whole answer is wrapped in double quotation marks (``"..."`` or ``“...”``)."""
    text = answer.strip()
    return len(text) > 1 and text[0] in "\"“" and text[-1] in "\"”"


@register_instruction("punctuation:no_comma")
def check_no_comma(answer: str) -> bool:
    """No comma: neither ``,`` nor the full-width ``，``."""
    return "," not in answer and "，" not in answer


IFEVAL_INSTRUCTION_IDS: tuple[str, ...] = tuple(INSTRUCTION_CHECKERS)

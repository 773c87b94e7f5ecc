"""The 29 instruction ids that open-instruct's IF-RL set (``open_instruct/IFEvalG``) adds to IFEval's 25.

NeMo Gym's ``instruction_following`` environment, whose reward Cascade RL's IF-RL stage trains against, checks
these 54 ids (through ``verifiable_instructions``, a packaging of open-instruct's ``IFEvalG`` checks). Each
checker here follows the corresponding open-instruct ``check_following``; where that code is plainly buggy the
sane behaviour is kept and the deviation is listed in ``OPEN_INSTRUCT_DEVIATIONS`` and in the docstring.
Like open-instruct, these checks use IFEval's rule-based sentence splitter
(``text_units.split_sentences_by_rules``) and ``nltk.word_tokenize`` (``text_units.word_tokenize``).

Keyword arguments keep open-instruct's names (``N``, ``n``, ``m``, ``small_n``, ...). Keywords and phrases are
matched as literal text (open-instruct pastes them into regular expressions unescaped).
"""

from __future__ import annotations

import itertools
import re

from nemotron_jax.rewards import text_units
from nemotron_jax.rewards.instructions import (
    IFEVAL_INSTRUCTION_IDS,
    INSTRUCTION_CHECKERS,
    _compare,
    check_letter_frequency,
    check_number_paragraphs,
    count_divided_pieces,
    register_instruction,
)

OPEN_INSTRUCT_DEVIATIONS: dict[str, str] = {
    "regex_kwargs": "keywords and phrases are literal text; open-instruct pastes them into regular expressions.",
    "repeat_phrase": "copy:repeat_phrase requires every repetition to differ from the phrase in exactly one word; "
    "open-instruct tests only the last repetition (a loop variable read after the loop) and returns None, not "
    "False, otherwise.",
    "zero_is_a_value": "a 0 in copy_span_idx n_start, lowercase_counting / letter_counting N or "
    "keyword_specific_position n, m is used as given (n=0 or m=0 is never followed); open-instruct treats 0 as "
    "missing and draws a random value.",
    "empty_answer": "first_word_answer / last_word_answer / start_end on a blank answer are not followed; "
    "open-instruct raises IndexError on some of them (the reward never checks a blank answer anyway).",
}

_PUNCTUATION = re.compile(r"[^\w\s]")


def _literal_count(keyword: str, answer: str) -> int:
    return len(re.findall(re.escape(keyword.strip()), answer, re.IGNORECASE))


def _phrase_spans(answer: str, first_word: str, last_word: str) -> list[str]:
    """``re.findall(rf"{first} .*? {last}", answer)`` (words literal) in linear time.

    From each start ``first + " "`` the lazy ``.*?`` reaches the nearest ``" " + last`` on the same line; the
    regex rescans the line from every start that finds none (quadratic on a line of repeated first words), but
    no later start on that line can find one either, so the scan moves on to the next line.
    """
    head, tail = first_word + " ", " " + last_word
    spans = []
    position = 0
    while True:
        start = answer.find(head, position)
        if start < 0:
            return spans
        line_end = answer.find("\n", start)
        line_end = len(answer) if line_end < 0 else line_end
        end = answer.find(tail, start + len(head), line_end)
        if end < 0 or end + len(tail) > line_end:
            position = line_end  # the line has no closing word after any later start either
            continue
        spans.append(answer[start : end + len(tail)])
        position = end + len(tail)


@register_instruction("copy:repeat_phrase")
def check_repeat_phrase(answer: str, *, phrase: str, small_n: int) -> bool:
    """The phrase appears exactly ``small_n`` times (spans from its first to its last word on one line), each
    with the same number of words and exactly one word changed (``OPEN_INSTRUCT_DEVIATIONS``)."""
    reference = phrase.strip().split()
    if not reference:
        raise ValueError("copy:repeat_phrase: phrase is empty")
    spans = _phrase_spans(answer, reference[0], reference[-1])
    if len(spans) != small_n:
        return False
    for span in spans:
        words = span.split()
        if len(words) != len(reference) or sum(a != b for a, b in zip(words, reference)) != 1:
            return False
    return small_n > 0


def _same_text(answer: str, text: str) -> bool:
    return answer.strip().lower() == text.strip().lower()


@register_instruction("copy:copy")
def check_copy(answer: str, *, prompt_to_repeat: str) -> bool:
    """The answer is the prompt, verbatim (case-insensitive, surrounding whitespace ignored), and nothing else."""
    return _same_text(answer, prompt_to_repeat)


@register_instruction("copy:copying_simple")
def check_copying_simple(answer: str, *, prompt_to_repeat: str) -> bool:
    """The answer is the request repeated without change (as ``copy:copy``)."""
    return _same_text(answer, prompt_to_repeat)


@register_instruction("copy:copying_multiple")
def check_copying_multiple(answer: str, *, prompt_to_repeat: str, N: int) -> bool:  # noqa: N803 (data's name)
    """Exactly ``N`` pieces separated by ``******``, each the request (case-insensitive, stripped)."""
    pieces = answer.split("******")
    return len(pieces) == N and all(_same_text(piece, prompt_to_repeat) for piece in pieces)


@register_instruction("new:copy_span_idx")
def check_copy_span_idx(answer: str, *, prompt_to_repeat: str, n_start: int, n_end: int) -> bool:
    """The answer is ``prompt_to_repeat[n_start:n_end]`` (character indices, Python slice; case-insensitive,
    stripped)."""
    return _same_text(answer, prompt_to_repeat[n_start:n_end])


@register_instruction("detectable_format:sentence_hyphens")
def check_sentence_hyphens(answer: str) -> bool:
    """Sentences joined by hyphens without spaces: the pieces between hyphens have no surrounding whitespace
    and are the rule-based sentences of the answer with hyphens read as spaces (pairwise, as far as both go)."""
    gold = text_units.split_sentences_by_rules(answer.replace("-", " "))
    return all(piece.strip() == piece and piece == sentence for piece, sentence in zip(answer.split("-"), gold))


@register_instruction("keywords:no_adjacent_consecutive")
def check_no_adjacent_consecutive(answer: str) -> bool:
    """No two adjacent (whitespace-separated) words start with consecutive letters of the alphabet (``a b``,
    ``Cat dog``), compared on lower-cased code points."""
    words = answer.split()
    for first, second in zip(words, words[1:]):
        first_letter, second_letter = first[0].lower(), second[0].lower()
        if len(first_letter) != 1 or len(second_letter) != 1:
            return False
        if ord(second_letter) - ord(first_letter) == 1:
            return False
    return True


@register_instruction("detectable_format:square_brackets")
def check_square_brackets(answer: str) -> bool:
    """Every whitespace-separated word starts with ``[`` and ends with ``]``."""
    return all(word.startswith("[") and word.endswith("]") for word in answer.split())


@register_instruction("keywords:word_once")
def check_word_once(answer: str, *, keyword: str) -> bool:
    """The keyword occurs exactly once (case-insensitive, non-overlapping, anywhere, as in ``keywords:frequency``)."""
    return _literal_count(keyword, answer) == 1


@register_instruction("keywords:word_count_different_numbers")
def check_word_count_different_numbers(answer: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """As ``keywords:frequency``: the keyword's case-insensitive occurrences compared with ``frequency``."""
    return _compare(_literal_count(keyword, answer), relation, frequency)


@register_instruction("keywords:exclude_word_harder")
def check_exclude_word_harder(answer: str, *, keyword: str) -> bool:
    """The keyword never appears between two spaces (``" keyword "``; case-sensitive, as in open-instruct)."""
    return " " + keyword.strip() + " " not in answer


@register_instruction("paragraphs:paragraphs")
def check_two_paragraphs_divided(answer: str) -> bool:
    """Two paragraphs separated by the markdown divider ``***`` (as ``length_constraints:number_paragraphs``)."""
    return check_number_paragraphs(answer, num_paragraphs=2)


@register_instruction("paragraphs:paragraphs2")
def check_two_paragraphs_blank_line(answer: str) -> bool:
    """Two paragraphs separated by ``\\n\\n``; an empty piece other than the first or last fails."""
    return count_divided_pieces(answer.split("\n\n")) == 2


@register_instruction("first_word:first_word_sent")
def check_first_word_sent(answer: str, *, first_word: str) -> bool:
    """Every rule-based sentence starts with ``first_word`` (first whitespace token, case-insensitive); an
    empty sentence (``..``) fails."""
    wanted = first_word.strip().lower()
    for sentence in text_units.split_sentences_by_rules(answer):
        if not sentence.strip() or sentence.split()[0].lower() != wanted:
            return False
    return True


@register_instruction("first_word:first_word_answer")
def check_first_word_answer(answer: str, *, first_word: str) -> bool:
    """The answer's first whitespace token is ``first_word`` (case-insensitive; punctuation counts)."""
    words = answer.split()
    return bool(words) and words[0].lower() == first_word.strip().lower()


def _last_word(text: str) -> str:
    return _PUNCTUATION.sub("", text.split()[-1]).lower()


@register_instruction("last_word:last_word_sent")
def check_last_word_sent(answer: str, *, last_word: str) -> bool:
    """Every rule-based sentence ends with ``last_word``: its last whitespace token, punctuation (``[^\\w\\s]``)
    removed, case-insensitive."""
    wanted = last_word.strip().lower()
    return all(sentence.strip() and _last_word(sentence) == wanted
               for sentence in text_units.split_sentences_by_rules(answer))


@register_instruction("last_word:last_word_answer")
def check_last_word_answer(answer: str, *, last_word: str) -> bool:
    """The answer's last whitespace token, punctuation removed, is ``last_word`` (case-insensitive)."""
    return bool(answer.split()) and _last_word(answer) == last_word.strip().lower()


@register_instruction("detectable_format:bigram_wrapping")
def check_bigram_wrapping(answer: str) -> bool:
    """Words taken in pairs (whitespace-separated): each pair's first word starts with ``<<`` and its second
    ends with ``>>`` (an odd last word is not checked)."""
    words = answer.split()
    return all(words[i].startswith("<<") and words[i + 1].endswith(">>") for i in range(0, len(words) - 1, 2))


@register_instruction("punctuation:punctuation_dot")
def check_no_dot(answer: str) -> bool:
    """No ``.`` anywhere."""
    return "." not in answer


@register_instruction("punctuation:punctuation_exclamation")
def check_no_exclamation(answer: str) -> bool:
    """No ``!`` anywhere."""
    return "!" not in answer


@register_instruction("count:lowercase_counting")
def check_lowercase_counting(answer: str, *, N: int) -> bool:  # noqa: N803
    """At most ``N`` all-lowercase ASCII words (``\\b[a-z]+\\b``)."""
    return len(re.findall(r"\b[a-z]+\b", answer)) <= N


@register_instruction("letters:letter_counting")
def check_letter_counting(answer: str, *, N: int, relation: str) -> bool:  # noqa: N803
    """The number of ASCII letters compared with ``N`` (``less than`` / ``at least``)."""
    return _compare(len(re.findall(r"[a-zA-Z]", answer)), relation, N)


@register_instruction("letters:letter_counting2")
def check_letter_counting2(answer: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """As ``keywords:letter_frequency`` (open-instruct registers the same checker under this id)."""
    return check_letter_frequency(answer, letter=letter, let_frequency=let_frequency, let_relation=let_relation)


@register_instruction("count:counting_composition")
def check_counting_composition(answer: str, *, n_sent: int, n_words: int) -> bool:
    """Three paragraphs split on ``***`` (``\\s?\\*\\*\\*\\s?``), each with exactly ``n_sent`` rule-based
    sentences of exactly ``n_words`` ``nltk.word_tokenize`` tokens (punctuation tokens count). As in
    open-instruct, an empty first or last piece (a leading or trailing divider) has no sentences and so fails
    unless ``n_sent`` is 0, and an empty inner piece fails."""
    pieces = re.split(r"\s?\*\*\*\s?", answer)
    for index, piece in enumerate(pieces):
        if not piece.strip() and index not in (0, len(pieces) - 1):
            return False
        sentences = text_units.split_sentences_by_rules(piece)
        if len(sentences) != n_sent:
            return False
        if any(len(text_units.word_tokenize(sentence)) != n_words for sentence in sentences):
            return False
    return sum(1 for index, piece in enumerate(pieces) if piece.strip() or index not in (0, len(pieces) - 1)) == 3


@register_instruction("count:count_unique")
def check_count_unique(answer: str) -> bool:
    """No ``nltk.word_tokenize`` token repeats (case-sensitive; punctuation tokens count). Stops at the first
    repeat."""
    seen = set()
    for sentence in text_units.split_sentences(answer):
        for token in text_units.sentence_word_tokens(sentence):
            if token in seen:
                return False
            seen.add(token)
    return True


@register_instruction("count:count_increment_word")
def check_count_increment_word(answer: str, *, keyword1: str, keyword2: str) -> bool:
    """``keyword1`` occurs exactly once and ``keyword2`` exactly twice (case-insensitive, anywhere)."""
    return _literal_count(keyword1, answer) == 1 and _literal_count(keyword2, answer) == 2


@register_instruction("keywords:palindrome")
def check_palindrome(answer: str) -> bool:
    """Some whitespace-separated word reads the same backwards (case-sensitive; one character counts)."""
    return any(word == word[::-1] for word in answer.split())


@register_instruction("keywords:keyword_specific_position")
def check_keyword_specific_position(answer: str, *, keyword: str, n: int, m: int) -> bool:
    """Rule-based sentence ``n`` (1-based) has ``keyword`` as its ``m``-th ``nltk.word_tokenize`` token
    (case-sensitive)."""
    sentences = text_units.split_sentences_by_rules(answer)
    if not 1 <= n <= len(sentences):
        return False
    words = text_units.word_tokenize(sentences[n - 1])
    return 1 <= m <= len(words) and words[m - 1] == keyword.strip()


@register_instruction("keywords:start_end")
def check_start_end(answer: str) -> bool:
    """The first and last ``nltk.word_tokenize`` tokens are the same word (case-insensitive) and there are at
    least two tokens; a final full stop is a token of its own, so it breaks the match. Only the first and last
    sentences are word-tokenized."""
    sentences = text_units.split_sentences(answer)
    tokens = lambda order: (t for s in order for t in text_units.sentence_word_tokens(s))  # noqa: E731
    first_two = list(itertools.islice(tokens(sentences), 2))
    if len(first_two) < 2:
        return False
    last = next(t for s in reversed(sentences) for t in reversed(text_units.sentence_word_tokens(s)))
    return first_two[0].lower() == last.lower()


# The 29 ids above; with IFEval's 25, the 54 ids of NeMo Gym's instruction_following environment.
OPEN_INSTRUCT_INSTRUCTION_IDS: tuple[str, ...] = tuple(
    instruction_id for instruction_id in INSTRUCTION_CHECKERS if instruction_id not in IFEVAL_INSTRUCTION_IDS
)

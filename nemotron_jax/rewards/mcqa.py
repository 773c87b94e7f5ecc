"""Multiple-choice reward: exact match of the chosen option letter against ``expected_answer``.

The released MCQA records (NeMo Gym ``mcqa``) carry ``expected_answer`` (a letter such as ``"C"``), the option
list ``options`` (``[{"A": "text"}, {"B": "text"}, ...]``) and, per prompt template,
``template_metadata.output_regex``: the format the prompt asked for, with the letter in group 1, for example
``Answer\\s*:\\s*([A-Za-z])`` or ``\\\\boxed\\{\\s*([A-Za-z])\\s*\\}``.

Extraction, always on the answer part of the response (after the last ``</think>``; none if thinking never
closed):

* With ``output_regex``: the LAST match of the regex (group 1, or the whole match if it has no group). If it does
  not match the text as written, it is tried once more with markdown bold markers (``**``) removed, so that
  ``**Answer:** C`` satisfies ``Answer\\s*:\\s*([A-Za-z])``. A response that ignores the requested format gets
  no answer: the prompt asked for that format and the reward enforces it.
* Without ``output_regex`` (the default extraction), in this order, the first rule that finds a letter wins:
    1. the last ``\\boxed{X}`` whose content is a single option letter (``\\boxed{\\text{C}}``, ``\\boxed{(C)}``);
    2. the last explicit statement ``answer is X`` / ``answer: X`` / ``final choice: X`` /
       ``option selected: X`` / ``correct option is X`` (the words in any case, the letter an upper-case
       letter, optionally in parentheses, bold or ``\\text{}``; "the answer is a bit tricky" is no choice);
    3. an answer part that consists of the letter alone (``C``, ``(C)``, ``**C.**``), or of one line that starts
       with an upper-case option label (``(C) Paris``, ``C) Paris``, ``C. Paris``).
  A letter that merely appears somewhere in prose is not taken (``A`` and ``I`` are also English words).

The extracted letter counts only if it is one of the allowed letters: the keys of ``options`` when given, else
``A``-``Z``. Comparison is case-insensitive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nemotron_jax.rewards.answer import extract_final_answer, find_boxed_contents

# Possessive quantifiers (``*+``) keep these linear on long whitespace runs.
_LETTER_IN_BOX = re.compile(r"^\s*+(?:\\text(?:bf)?\{\s*+)?\(?\s*+([A-Za-z])\s*+\)?\s*+\}?\s*+[.:]?\s*+$")
# Every whitespace run is possessive (``\s*+``): what follows each one cannot start with whitespace, so this
# matches exactly what the plain quantifiers would, without their O(n^4) backtracking on "answer is" + spaces.
_ANSWER_STATEMENT = re.compile(
    r"\b(?:answer\s*+(?:is\s*+:?|:)|final\s++choice\s*+(?:is\s*+:?|:)|option\s++selected\s*+(?:is\s*+:?|:)"
    r"|(?:correct|best)\s++(?:option|choice)\s++is\s*+:?)"
    r"\s*+(?:option\s++)?\(?\s*+\$?\s*+(?:\\boxed\{\s*+)?(?:\\text\{\s*+)?((?-i:[A-Z]))\b(?!['’]\w)",
    re.IGNORECASE,
)
_LETTER_ALONE = re.compile(r"^\W*+(?:option\s++)?\(?([A-Za-z])\)?\W*+$", re.IGNORECASE)
# A one-line answer that starts with an option label: "(C) Paris", "C) Paris", "C. Paris", "C: Paris".
_LABELLED_LINE = re.compile(r"^\s*+(?:\(([A-Z])\)|([A-Z])[).:])[ \t]++\S[^\n]*+$")


def _allowed_letters(options: Sequence[Mapping[str, str]] | Mapping[str, str] | None) -> frozenset[str]:
    if not options:
        return frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    keys: list[str] = []
    if isinstance(options, Mapping):
        keys = list(options)
    else:
        for entry in options:
            if not isinstance(entry, Mapping):
                raise ValueError(f"options entries must be mappings like {{'A': 'text'}}, got {entry!r}")
            keys.extend(entry)
    letters = frozenset(str(key).strip().upper() for key in keys)
    bad = sorted(key for key in letters if len(key) != 1 or not key.isalpha())
    if bad:
        raise ValueError(f"options keys must be single letters, got {bad}")
    return letters


def normalize_choice(expected_answer: str) -> str:
    """``"C"``, ``" c "``, ``"(C)"``, ``"C."`` -> ``"C"``; anything else raises ValueError."""
    match = _LETTER_ALONE.match(str(expected_answer))
    if not match:
        raise ValueError(f"expected_answer must be a single option letter, got {expected_answer!r}")
    return match.group(1).upper()


def _regex_choice(answer: str, output_regex: str) -> str | None:
    try:
        pattern = re.compile(output_regex)
    except re.error as error:
        raise ValueError(f"output_regex {output_regex!r} is not a valid regular expression: {error}") from error
    for text in (answer, answer.replace("**", "")):
        matches = list(pattern.finditer(text))
        if matches:
            last = matches[-1]
            return (last.group(1) if pattern.groups else last.group(0)).strip()
    return None


def _default_choice(answer: str, allowed: frozenset[str]) -> str | None:
    for content in reversed(find_boxed_contents(answer)):
        match = _LETTER_IN_BOX.match(content)
        if match and match.group(1).upper() in allowed:
            return match.group(1)
    unbolded = answer.replace("**", "")
    for match in reversed(list(_ANSWER_STATEMENT.finditer(unbolded))):
        if match.group(1).upper() in allowed:
            return match.group(1)
    alone = _LETTER_ALONE.match(unbolded)
    if alone and alone.group(1).upper() in allowed:
        return alone.group(1)
    labelled = _LABELLED_LINE.match(unbolded.strip())
    if labelled:
        letter = labelled.group(1) or labelled.group(2)
        if letter in allowed:
            return letter
    return None


def extract_choice(
    response: str,
    output_regex: str | None = None,
    options: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None,
) -> str | None:
    """The option letter (upper case) chosen in ``response``, or ``None``; see the module docstring."""
    answer = extract_final_answer(response)
    if not answer:
        return None
    allowed = _allowed_letters(options)
    if output_regex:
        choice = _regex_choice(answer, output_regex)
        # A regex may capture more than a letter ("Answer: (C)"): read the letter out of what it captured.
        if choice is not None:
            match = _LETTER_ALONE.match(choice) or _LETTER_IN_BOX.match(choice)
            choice = match.group(1) if match else None
    else:
        choice = _default_choice(answer, allowed)
    if choice is None or choice.upper() not in allowed:
        return None
    return choice.upper()


def mcqa_reward(
    response: str,
    expected_answer: str,
    output_regex: str | None = None,
    *,
    options: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None,
) -> float:
    """1.0 if the option chosen in ``response`` is ``expected_answer``, else 0.0.

    Args:
      response: the generated text.
      expected_answer: the correct option letter (``"C"``; ``"(C)"`` and lower case are accepted).
      output_regex: the record's answer-format regex (``template_metadata.output_regex``), letter in group 1;
        ``None`` uses the default extraction (module docstring).
      options: the record's options, used to restrict which letters count as a choice.

    Raises:
      ValueError: if ``expected_answer`` is not a single letter (or not one of ``options``), ``output_regex`` does
        not compile, or ``options`` is malformed.
    """
    expected = normalize_choice(expected_answer)
    if expected not in _allowed_letters(options):
        raise ValueError(f"expected_answer {expected_answer!r} is not one of the options {options!r}")
    choice = extract_choice(response, output_regex, options)
    return 1.0 if choice == expected else 0.0

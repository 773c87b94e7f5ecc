"""Math reward: the final answer of a response against a ground truth, by mathematical equivalence.

Answer extraction is ours (so that "the last ``\\boxed{}`` wins" holds, and nothing else in the text is
graded); equivalence is decided by ``math-verify`` (Hugging Face), which parses LaTeX into SymPy and compares
numbers (to 6 decimals after rounding), fractions, symbolic expressions, intervals, sets, tuples, matrices,
equations (``x = 3`` vs ``3``), percentages (``50\\%`` matches both ``50`` and ``0.5``) and strips units given
as ``\\text{cm}`` or common unit words.

Timeouts: math-verify bounds each parse and each comparison with ``signal.alarm``, which only works in the main
thread of a process. ``math_reward`` uses those timeouts when it runs in a main thread (the scoring pool's
workers do) and runs without them elsewhere (math-verify would raise in a thread); the scoring pool adds a
hard per-item wall-clock limit in either case. A comparison that times out raises ``MathVerifyTimeout`` instead
of silently returning 0, so that the scoring layer counts it.
"""

from __future__ import annotations

import functools
import re
import threading

from nemotron_jax.rewards.answer import BOX_COMMAND, extract_final_answer, find_boxed_contents, last_boxed_content


# math-verify's LaTeX parser is super-linear: a 16 KB candidate exhausts the 5 s limit (and, outside a main
# thread, where there is no limit, runs on). A final answer longer than this (or twice the ground truth, if longer)
# is not an answer to a math problem: it gets reward 0 without being parsed.
MAX_ANSWER_CHARS = 1000


class MathVerifyTimeout(TimeoutError):
    """math-verify gave up on a parse or a comparison within its time limit."""


# "The answer is 5", "Final answer: 5", "answer = 5" (case-insensitive, last occurrence wins).
_ANSWER_STATEMENT = re.compile(r"\banswer\s*+(?:is\s*+:?|:|=)\s*+(?P<answer>[^\n]*+)", re.IGNORECASE)
_PLAIN_WORD = re.compile(r"[A-Za-z]{2,}")


def _drop_trailing_words(text: str) -> str:
    """Drops plain words after a number or a closing brace: units or prose ("12 dollars", "5 apples")."""
    tokens = text.split()
    kept = len(tokens)
    while kept > 1 and _PLAIN_WORD.fullmatch(tokens[kept - 1]):
        kept -= 1
    if kept == len(tokens) or tokens[kept - 1][-1:] not in tuple("0123456789}"):
        return text
    return " ".join(tokens[:kept])


_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean_candidate(candidate: str) -> str:
    """Strips markdown emphasis, a final full stop, math delimiters and trailing unit words.

    An answer that opens with a math delimiter keeps its first math span only: ``$\\frac12$ cm`` gives
    ``\\frac12`` and ``$42$ and the remainder is $3$`` gives ``42`` (not ``42$ and the remainder is $3``).
    """
    text = candidate.strip().replace("**", "").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    for opening, closing in _MATH_DELIMITERS:
        if text.startswith(opening):
            end = text.find(closing, len(opening))
            if end > len(opening):
                text = text[len(opening) : end].strip()
            break
    return _drop_trailing_words(text).strip()


def extract_math_answer(response: str) -> str | None:
    """The final answer string of a math response, or ``None`` if it gives none.

    Looks only at the answer part (after the last ``</think>``; ``None`` if thinking never closed), then takes
    the content of the LAST ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` (nested braces matched); if there is
    no box, the text after the last "answer is" / "answer:" (to the end of that line). Nothing else counts: a
    response that never states its answer in one of these forms gets no answer (reward 0), not its last number.
    """
    answer = extract_final_answer(response)
    if answer is None:
        return None
    boxed = last_boxed_content(answer)
    if boxed is not None:
        return _clean_candidate(boxed)
    statements = list(_ANSWER_STATEMENT.finditer(answer.replace("**", "")))
    for statement in reversed(statements):
        candidate = _clean_candidate(statement.group("answer"))
        # A box that never closes, or unbalanced braces, is a cut-off answer, not an answer.
        if candidate and not BOX_COMMAND.search(candidate) and _braces_balanced(candidate):
            return candidate
    return None


def _braces_balanced(text: str) -> bool:
    depth = 0
    unescaped = re.sub(r"\\.", "", text)
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _signal_timeouts_usable() -> bool:
    return threading.current_thread() is threading.main_thread()


# GRPO scores G rollouts per prompt: the ground truth, and often the answers, repeat within a batch. Parsing
# (an ANTLR LaTeX grammar) is most of the cost, and math-verify's own cache holds only 20 entries.
@functools.lru_cache(maxsize=4096)
def _parse(latex: str, timeout_s: int | None) -> tuple:
    """math-verify parse of one answer wrapped in ``\\boxed{}``; raises MathVerifyTimeout on timeout."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return tuple(parse("\\boxed{" + latex + "}", parsing_timeout=timeout_s, raise_on_error=True))
    except TimeoutException as error:
        raise MathVerifyTimeout(f"math-verify parsing timed out after {timeout_s} s") from error


def normalize_ground_truth(ground_truth: str) -> str:
    """The answer string of a ground truth given bare (``\\frac12``), in ``$...$``, or as ``\\boxed{...}``."""
    if not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)  # integers and floats in the data
    boxed = find_boxed_contents(ground_truth)
    text = boxed[-1] if boxed else ground_truth
    return _clean_candidate(text)


def math_reward(response: str, ground_truth: str | int | float, *, timeout_s: int = 5) -> float:
    """1.0 if the response's final answer is mathematically equivalent to ``ground_truth``, else 0.0.

    An answer longer than ``MAX_ANSWER_CHARS`` (or twice the ground truth) is 0.0 without being parsed.

    Args:
      response: the generated text (reasoning and answer; see ``extract_math_answer`` for what is graded).
      ground_truth: the reference answer, bare, in ``$...$`` or in ``\\boxed{}``; numbers are accepted.
      timeout_s: math-verify's limit (whole seconds) for each parse and each comparison, used when running in a
        main thread (see the module docstring).

    Raises:
      ValueError: if ``ground_truth`` is empty or math-verify cannot read it at all (a data error).
      MathVerifyTimeout: if no comparison succeeded and at least one timed out.
    """
    gold_text = normalize_ground_truth(ground_truth)
    if not gold_text:
        raise ValueError(f"ground_truth is empty: {ground_truth!r}")
    timeout = timeout_s if _signal_timeouts_usable() else None
    try:
        gold = _parse(gold_text, timeout)
    except MathVerifyTimeout:
        raise
    except Exception as error:  # math-verify raises assorted parser errors
        raise ValueError(f"ground_truth {ground_truth!r} cannot be parsed: {error}") from error
    if not gold:
        raise ValueError(f"ground_truth {ground_truth!r} cannot be parsed by math-verify")

    predicted_text = extract_math_answer(response)
    if not predicted_text or len(predicted_text) > max(MAX_ANSWER_CHARS, 2 * len(gold_text)):
        return 0.0
    if predicted_text == gold_text:  # the same string is the same answer; no comparison needed
        return 1.0
    try:
        predicted = _parse(predicted_text, timeout)
    except MathVerifyTimeout:
        raise
    except Exception:  # an unparseable answer is a wrong answer
        return 0.0
    if not predicted:
        return 0.0
    return 1.0 if _any_equivalent(gold, predicted, timeout) else 0.0


def _any_equivalent(gold: tuple, predicted: tuple, timeout: int | None) -> bool:
    """math-verify's ``verify`` pair by pair, so that a timeout is told apart from "not equal"."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for gold_item in gold:
        for predicted_item in predicted:
            try:
                if verify(gold_item, predicted_item, timeout_seconds=timeout, raise_on_error=True):
                    return True
            except TimeoutException:
                timed_out = True
            except Exception:  # incomparable types (a set against a matrix, ...) are simply not equal
                continue
    if timed_out:
        raise MathVerifyTimeout(f"math-verify comparison timed out after {timeout} s")
    return False

"""Degenerate model outputs (long runs of one character, thousands of unclosed boxes) are verified in bounded time.

RL policies do produce such text. A verifier with a regex or a scan that is quadratic in the response length
would stall the reward step (the pool would time it out, but every such item would cost its full time limit).
CPU time of this process is measured, so that other load on the machine does not matter.
"""

import time

import pytest

from nemotron_jax.rewards import (
    IFEVAL_INSTRUCTION_IDS,
    OPEN_INSTRUCT_INSTRUCTION_IDS,
    instruction_following_reward,
    math_reward,
    mcqa_reward,
)

LENGTH = 50_000
DEGENERATE = {
    "dots": "." * LENGTH + "a",
    "spaces": "A" + " " * LENGTH + "x",
    "unclosed_boxes": "\\boxed{" * (LENGTH // 7),
    "unclosed_brackets": "[" + "a " * (LENGTH // 2),
    "answer_then_spaces": "Answer" + " " * LENGTH + "x",
    "asterisks": "*" * LENGTH + "x",
    "numbers_and_words": "1 ab " * (LENGTH // 5) + ".",
    "abbreviations": "e.g. " * (LENGTH // 5),
    "fences": "```python\n" * (LENGTH // 10),
    "parentheses": "(" * LENGTH,
}
KWARGS = {
    "keywords:existence": {"keywords": ["x"]},
    "keywords:frequency": {"keyword": "a", "frequency": 1, "relation": "at least"},
    "keywords:forbidden_words": {"forbidden_words": ["ab"]},
    "keywords:letter_frequency": {"letter": "a", "let_frequency": 1, "let_relation": "at least"},
    "language:response_language": {"language": "en"},
    "length_constraints:number_sentences": {"num_sentences": 1, "relation": "at least"},
    "length_constraints:number_paragraphs": {"num_paragraphs": 1},
    "length_constraints:number_words": {"num_words": 1, "relation": "at least"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "a"},
    "detectable_content:number_placeholders": {"num_placeholders": 1},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "detectable_format:number_bullet_lists": {"num_bullets": 1},
    "detectable_format:number_highlighted_sections": {"num_highlights": 1},
    "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": 1},
    "combination:repeat_prompt": {"prompt_to_repeat": "a"},
    "startend:end_checker": {"end_phrase": "a"},
    "change_case:capital_word_frequency": {"capital_frequency": 1, "capital_relation": "at least"},
}


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    # Imports, language profiles and the Punkt model are loaded once, outside the measured time.
    math_reward(r"\boxed{1}", "1")
    warm_up_ids = ["language:response_language", "change_case:capital_word_frequency"]
    warm_up_kwargs = [{"language": "en"}, {"capital_frequency": 1, "capital_relation": "at least"}]
    instruction_following_reward("Warm up. NOW.", warm_up_ids, warm_up_kwargs)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_responses_are_verified_quickly(name):
    text = DEGENERATE[name]
    started = time.process_time()
    math_reward(text, "1")
    mcqa_reward(text, "A")
    mcqa_reward(text, "A", r"Answer\s*:\s*(?!Answer)\s*([A-Za-z])\s*")
    kwargs = [KWARGS.get(instruction_id) for instruction_id in IFEVAL_INSTRUCTION_IDS]
    instruction_following_reward(text, list(IFEVAL_INSTRUCTION_IDS), kwargs)
    assert time.process_time() - started < 2.0  # about 0.3 s; a quadratic scan would take minutes


# ------------------------------------------------------------------------------------------------------------
# The pathological cases of issue 11 §4, each of which stalled or crashed a verifier before its fix.


def _cpu_seconds(function, *args, **kwargs):
    started = time.process_time()
    result = function(*args, **kwargs)
    return result, time.process_time() - started


def test_mcqa_answer_statement_followed_by_spaces_is_linear():
    # ~100 s before (O(n^4) backtracking between the optional parts of the "answer is" pattern).
    reward, seconds = _cpu_seconds(mcqa_reward, "the answer is" + " " * 400 + "!", "A")
    assert reward == 0.0 and seconds < 0.5
    assert mcqa_reward("the answer is" + " " * 400 + "(A)", "A") == 1.0
    _, seconds = _cpu_seconds(mcqa_reward, "the answer is" + " " * 1_000_000 + "!", "A")
    assert seconds < 2.0


def test_json_check_on_an_open_fence_and_spaces_is_linear():
    # ~5 s before (the fence regex backtracked); the reference's prefix/suffix stripping is linear.
    text = "```" + " " * 2000 + "x"
    result, seconds = _cpu_seconds(instruction_following_reward, text, ["detectable_format:json_format"], None)
    assert result.followed == (False,) and seconds < 0.5


def test_deeply_nested_json_is_not_followed_instead_of_an_error():
    # RecursionError before, which the scoring layer turned into an `error` item.
    result = instruction_following_reward("[" * 100_000, ["detectable_format:json_format"], None)
    assert result.followed == (False,)


def test_math_answer_takes_the_first_math_span():
    from nemotron_jax.rewards.math_verifier import extract_math_answer

    # "42$ and the remainder is $3" before.
    assert extract_math_answer("The answer is $42$ and the remainder is $3$.") == "42"
    assert extract_math_answer(r"The answer is $$\frac{1}{2}$$ and that is all.") == r"\frac{1}{2}"
    assert extract_math_answer(r"The answer is \(x+1\) because \(y\).") == "x+1"
    assert math_reward("The answer is $42$ and the remainder is $3$.", "42") == 1.0


def test_overlong_math_answer_is_not_parsed():
    # math-verify exhausted its 5 s limit on this before (MathVerifyTimeout; unbounded outside a main thread).
    response = r"\boxed{" + "1+" * 5000 + "1}"
    reward, seconds = _cpu_seconds(math_reward, response, "1")
    assert reward == 0.0 and seconds < 1.0


def test_huge_integer_return_value_fails_the_test_instead_of_the_batch():
    from nemotron_jax.rewards.code import code_reward, values_equal

    assert values_equal(10**400, 1.5) is False and values_equal(1.5, 10**400) is False  # OverflowError before
    assert values_equal(10**400, 10**400) is True
    program = "def f():\n    return 10 ** 400\n"
    tests = [{"fn_name": "f", "args": [], "expected": 1.5}]
    assert code_reward(program, tests, timeout_s=10.0, memory_mb=256) == 0.0


# ------------------------------------------------------------------------------------------------------------
# Property test: random and adversarial text up to 1 MB, through every verifier, in bounded time.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nemotron_jax.rewards.answer import find_boxed_contents, last_code_block  # noqa: E402

ADVERSARIAL_UNITS = (
    " ", "\n", "\t", "`", "```", "```json\n", "[", "]", "{", "}", "(", "\\boxed{", "\\fbox", "$", "$$", "*", "**",
    "-", "<", "<<", ">>", "P.S.", "p. s.", "A.", "a. ", "Dr. ", "...", "?!", "Section 1", "******", '"', "“",
    "answer is", "Answer:", "the answer is ", "option ", "\\text{", ",", "，", "e.g.", "DON'T", "NASA ", "é", "中",
)
MAX_BYTES = 1_000_000
OPEN_INSTRUCT_KWARGS = {
    "copy:repeat_phrase": {"phrase": "the answer is here", "small_n": 2},
    "copy:copy": {"prompt_to_repeat": "a"},
    "copy:copying_simple": {"prompt_to_repeat": "a"},
    "copy:copying_multiple": {"prompt_to_repeat": "a", "N": 2},
    "new:copy_span_idx": {"prompt_to_repeat": "abc", "n_start": 0, "n_end": 2},
    "keywords:word_once": {"keyword": "a"},
    "keywords:word_count_different_numbers": {"keyword": "a", "frequency": 3, "relation": "at least"},
    "keywords:exclude_word_harder": {"keyword": "a"},
    "first_word:first_word_sent": {"first_word": "a"},
    "first_word:first_word_answer": {"first_word": "a"},
    "last_word:last_word_sent": {"last_word": "a"},
    "last_word:last_word_answer": {"last_word": "a"},
    "count:lowercase_counting": {"N": 3},
    "letters:letter_counting": {"N": 3, "relation": "at least"},
    "letters:letter_counting2": {"letter": "a", "let_frequency": 1, "let_relation": "at least"},
    "count:counting_composition": {"n_sent": 2, "n_words": 3},
    "count:count_increment_word": {"keyword1": "a", "keyword2": "b"},
    "keywords:keyword_specific_position": {"keyword": "a", "n": 2, "m": 3},
}
ALL_IF_IDS = list(IFEVAL_INSTRUCTION_IDS) + list(OPEN_INSTRUCT_INSTRUCTION_IDS)
IF_KWARGS = [KWARGS.get(instruction_id) or OPEN_INSTRUCT_KWARGS.get(instruction_id) for instruction_id in ALL_IF_IDS]


@st.composite
def degenerate_text(draw):
    """A unit (adversarial pieces and/or random characters) repeated up to about 1 MB, then a random tail."""
    pieces = draw(st.lists(st.sampled_from(ADVERSARIAL_UNITS) | st.text(min_size=1, max_size=4), min_size=1,
                           max_size=4))
    unit = "".join(pieces)
    size = draw(st.sampled_from([1_000, 100_000, MAX_BYTES]))
    return unit * max(1, size // len(unit.encode())) + draw(st.text(max_size=16))


@pytest.mark.slow  # ~15 s of CPU on a quiet 2-core machine: 30 texts, a third of them a megabyte
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.data_too_large])
@given(degenerate_text())
def test_every_verifier_is_bounded_on_degenerate_text(text):
    started = time.process_time()
    math_reward(text, "1")
    mcqa_reward(text, "A")
    mcqa_reward(text, "A", r"Answer\s*:\s*([A-Za-z])")
    instruction_following_reward(text, ALL_IF_IDS, IF_KWARGS)
    last_code_block(text)
    find_boxed_contents(text)
    # A megabyte through all 54 IF checks (two NLTK tokenizers, langdetect) and the other verifiers:
    # a few seconds at most; a quadratic scan would take hours.
    assert time.process_time() - started < 15.0

"""Degenerate model outputs (long runs of one character, thousands of unclosed boxes) are verified in bounded time.

RL policies do produce such text. A verifier with a regex or a scan that is quadratic in the response length
would stall the reward step (the pool would time it out, but every such item would cost its full time limit).
CPU time of this process is measured, so that other load on the machine does not matter.
"""

import time

import pytest

from nemotron_jax.rewards import IFEVAL_INSTRUCTION_IDS, instruction_following_reward, math_reward, mcqa_reward

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
    # Imports and language profiles are loaded once, outside the measured time.
    math_reward(r"\boxed{1}", "1")
    instruction_following_reward("warm up", ["language:response_language"], [{"language": "en"}])


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

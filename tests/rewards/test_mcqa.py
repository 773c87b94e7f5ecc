"""mcqa_reward: default extraction, output_regex from the released data, allowed letters."""

import pytest

from nemotron_jax.rewards import extract_choice, mcqa_reward

# Regexes as they appear in the released MCQA records (template_metadata.output_regex).
BOXED = r"\\boxed\{\s*([A-Za-z])\s*\}"
ANSWER_COLON = r"Answer\s*:\s*(?!Answer)\s*([A-Za-z])\s*"
ANSWER_IS = r"ANSWER IS\s*([A-Za-z])\s*"
FINAL_CHOICE = r"Final Choice:\s*([A-Za-z])\s*"


@pytest.mark.parametrize(
    ("response", "choice"),
    [
        ("Reasoning...\nAnswer: C", "C"),
        ("So the answer is (B).", "B"),
        ("The correct option is D.", "D"),
        ("Final choice: E", "E"),
        (r"Therefore \boxed{A}.", "A"),
        (r"Therefore \boxed{\text{(B)}}.", "B"),
        ("**Answer:** C", "C"),
        ("(C)", "C"),
        ("**D.**", "D"),
        ("(C) Paris", "C"),
        ("B. Because of gravity.", "B"),
        ("A. first\nB. second", None),  # a list of options is not a choice
        ("Answer: A, wait no. Answer: B", "B"),  # the last statement wins
        (r"\boxed{A} ... on reflection \boxed{C}", "C"),
        ("<think>Answer: A</think>Answer: D", "D"),  # only the answer part counts
        ("<think>Answer: A", None),  # thinking never closed
        ("The answer is a bit tricky to find.", None),  # "a" is a word, not a choice
        ("I think B is plausible but C too.", None),  # letters in prose are not a choice
        ("", None),
    ],
)
def test_default_extraction(response, choice):
    assert extract_choice(response) == choice


@pytest.mark.parametrize(
    ("response", "regex", "choice"),
    [
        (r"... Answer: \boxed{D}", BOXED, "D"),
        ("Answer: d", ANSWER_COLON, "D"),
        ("**Answer:** B", ANSWER_COLON, "B"),
        ("ANSWER IS E", ANSWER_IS, "E"),
        ("answer is E", ANSWER_IS, None),  # the regex is case-sensitive, as written in the data
        ("Final Choice: A ... Final Choice: J", FINAL_CHOICE, "J"),
        ("Answer: C", BOXED, None),  # the requested format was not followed
    ],
)
def test_output_regex_extraction(response, regex, choice):
    assert extract_choice(response, regex) == choice


def test_reward_matches_expected_answer():
    assert mcqa_reward("Answer: C", "C") == 1.0
    assert mcqa_reward("Answer: c", "C", ANSWER_COLON) == 1.0
    assert mcqa_reward("Answer: B", "C") == 0.0
    assert mcqa_reward("I do not know", "C") == 0.0
    assert mcqa_reward("Answer: C", "(c)") == 1.0


def test_options_restrict_allowed_letters():
    options = [{"A": "one"}, {"B": "two"}, {"C": "three"}, {"D": "four"}]
    assert extract_choice("Answer: E", options=options) is None
    assert extract_choice("Answer: D", options=options) == "D"
    with pytest.raises(ValueError, match="not one of the options"):
        mcqa_reward("Answer: E", "E", options=options)


@pytest.mark.parametrize(
    ("expected", "regex", "options", "message"),
    [
        ("CD", None, None, "expected_answer"),
        ("C", "Answer: ([A-Z]", None, "output_regex"),
        ("C", None, [{"AB": "x"}], "single letters"),
    ],
)
def test_bad_specs_raise(expected, regex, options, message):
    with pytest.raises(ValueError, match=message):
        mcqa_reward("Answer: C", expected, regex, options=options)

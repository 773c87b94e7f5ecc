"""Answer-part extraction, boxed contents, code blocks, and the offline text units."""

import time

import pytest

from nemotron_jax.rewards import extract_final_answer, find_boxed_contents, last_code_block
from nemotron_jax.rewards.text_units import count_sentences, count_words, detect_language, split_sentences


@pytest.mark.parametrize(
    ("response", "thinking", "answer"),
    [
        ("reasoning</think>\n\nThe answer.", None, "The answer."),
        ("<think>a</think>b</think> final", None, "final"),  # the last closing tag counts
        ("<think>never closed", None, None),
        ("plain instruct answer", None, "plain instruct answer"),
        ("reasoning without a closing tag", True, None),  # thinking mode: <think> was in the prompt
        ("plain instruct answer", False, "plain instruct answer"),
        ("<think></think>answer", False, "answer"),
        ("reasoning</think>", None, ""),
    ],
)
def test_extract_final_answer(response, thinking, answer):
    assert extract_final_answer(response, thinking=thinking) == answer


def test_find_boxed_contents():
    text = r"\boxed{1} \boxed {\frac{a}{b}} \fbox{x} \boxed 7$ \boxed{} \boxedsymbol{z} \boxed{\{1,2\}} \boxed{open"
    assert find_boxed_contents(text) == ["1", r"\frac{a}{b}", "x", "7", r"\{1,2\}"]


def test_last_code_block_is_linear_on_backtick_runs():
    # The former regex took 15 s on this (quadratic backtracking); the scan takes microseconds.
    started = time.process_time()
    assert last_code_block("`" * 100_000) is None
    assert last_code_block("```\n" + "`" * 100_000) == ""  # the first three backticks close it
    assert time.process_time() - started < 0.5


def test_last_code_block():
    text = "```python\nprint(1)\n```\ntext\n```cpp\nint main(){}\n```\n```py\nprint(2)\n```\n```python\nunclosed"
    assert last_code_block(text) == "print(2)"
    assert last_code_block("no code") is None
    assert last_code_block("```\nx = 1\n```") == "x = 1"


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("One. Two! Three?", 3),
        ("Dr. Smith met Mr. Jones at 3.30 p.m. today. Then they left.", 2),
        ("It costs approx. ten dollars, e.g. for lunch. Fine.", 4),  # Punkt's English model lacks these
        ("He said \"Stop.\" Then he left.", 2),
        ("Wait... What?! Really.", 3),
        ("J. R. R. Tolkien wrote books. Many books.", 2),
        ("No final punctuation", 1),
        ("", 0),
        ("第一句。第二句！", 1),  # Punkt splits after . ! ? only, as the IFEval reference counts
    ],
)
def test_sentence_counts(text, sentences):
    assert count_sentences(text) == sentences, split_sentences(text)


def test_word_count_uses_word_character_runs():
    assert count_words("Don't stop-now, 3.5 km!") == 7  # don, t, stop, now, 3, 5, km
    assert count_words("") == 0


def test_language_detection():
    assert detect_language("This is clearly an English sentence about the weather.") == "en"
    assert detect_language("Ceci est clairement une phrase en français sur la météo.") == "fr"
    assert detect_language("12345 !!!") is None

"""open-instruct's 29 IF-RL instruction ids: one followed and one not-followed response per id, the linear phrase
scan against the regex it replaces, and the rule-based sentence splitter against IFEval's reference copy."""

from __future__ import annotations

import random
import re
import time

import pytest

from nemotron_jax.rewards import OPEN_INSTRUCT_INSTRUCTION_IDS, instruction_following_reward
from nemotron_jax.rewards.instructions_open_instruct import _phrase_spans
from nemotron_jax.rewards.text_units import split_sentences_by_rules

PROMPT = "Write a haiku about autumn leaves."
CASES = [
    ("copy:repeat_phrase", {"phrase": "The early bird catches the worm", "small_n": 2},
     "The early bird eats the worm. Then: The early cat catches the worm.",
     "The early bird catches the worm. The early cat catches the worm."),  # an unchanged repetition
    ("copy:copy", {"prompt_to_repeat": PROMPT}, "  write a haiku about autumn leaves. ", PROMPT + " Leaves fall."),
    ("copy:copying_simple", {"prompt_to_repeat": PROMPT}, PROMPT, "Sure! " + PROMPT),
    ("copy:copying_multiple", {"prompt_to_repeat": PROMPT, "N": 3},
     f"{PROMPT}\n******\n{PROMPT}\n******\n{PROMPT}", f"{PROMPT}\n******\n{PROMPT}"),
    ("new:copy_span_idx", {"prompt_to_repeat": PROMPT, "n_start": 0, "n_end": 7}, "Write a", "Write a haiku"),
    ("detectable_format:sentence_hyphens", {}, "I came.-I saw.-I left.", "I came. - I saw."),
    ("keywords:no_adjacent_consecutive", {}, "Apples can ripen", "A big cat"),
    ("detectable_format:square_brackets", {}, "[Every] [word] [here.]", "[Every] word [here]"),
    ("keywords:word_once", {"keyword": "river"}, "The River flows.", "A river and a river."),
    ("keywords:word_count_different_numbers", {"keyword": "sun", "frequency": 2, "relation": "at least"},
     "Sun, sunny, SUN.", "One sun."),
    ("keywords:exclude_word_harder", {"keyword": "moon"}, "The moon. Moonlight.", "The moon rises."),
    ("paragraphs:paragraphs", {}, "First part.\n***\nSecond part.", "Only one part."),
    ("paragraphs:paragraphs2", {}, "First part.\n\nSecond part.", "First.\n\n\n\nSecond."),
    ("first_word:first_word_sent", {"first_word": "Yes"}, "Yes it is. yes indeed! YES sir?", "Yes it is. No it isn't."),
    ("first_word:first_word_answer", {"first_word": "Hello"}, "hello there, friend", "Hi, hello there"),
    ("last_word:last_word_sent", {"last_word": "now"}, "Do it now. Go now!", "Do it now. Go later."),
    ("last_word:last_word_answer", {"last_word": "end"}, "This is the END!", "The end is near."),
    ("detectable_format:bigram_wrapping", {}, "<<I am>> <<at home>> alone", "<<I am>> at home"),
    ("punctuation:punctuation_dot", {}, "No dots here!", "One dot."),
    ("punctuation:punctuation_exclamation", {}, "Calm text.", "Wow!"),
    ("count:lowercase_counting", {"N": 2}, "Two lowercase WORDS", "three lowercase words"),
    ("letters:letter_counting", {"N": 5, "relation": "less than"}, "Abcd 123 é", "Abcde"),
    ("letters:letter_counting2", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag", "Zig"),
    ("count:counting_composition", {"n_sent": 1, "n_words": 4},  # the full stop is a token
     "I am here.\n***\nYou are there.\n***\nWe go now.", "I am here.\n***\nYou are there."),
    ("count:count_unique", {}, "The cat saw the dog.", "The cat saw the cat."),  # "The" != "the"
    ("count:count_increment_word", {"keyword1": "red", "keyword2": "blue"}, "Red, blue and BLUE.", "Red and blue."),
    ("keywords:palindrome", {}, "We saw a racecar today", "No such words here"),
    ("keywords:keyword_specific_position", {"keyword": "cats", "n": 2, "m": 3},
     "Hello there. I like cats a lot.", "Hello there. I cats like."),
    ("keywords:start_end", {}, "Stop right there, stop", "Stop right there, stop."),
]  # fmt: skip


def test_every_open_instruct_id_has_a_case():
    assert len(OPEN_INSTRUCT_INSTRUCTION_IDS) == 29
    assert sorted(case[0] for case in CASES) == sorted(OPEN_INSTRUCT_INSTRUCTION_IDS)


@pytest.mark.parametrize(("instruction_id", "kwargs", "passing", "failing"), CASES)
def test_open_instruct_pass_and_fail(instruction_id, kwargs, passing, failing):
    assert instruction_following_reward(passing, [instruction_id], [kwargs]).followed == (True,)
    assert instruction_following_reward(failing, [instruction_id], [kwargs]).followed == (False,)


def test_open_instruct_ids_work_with_the_released_kwargs_padding():
    # The released data pads every kwargs dict with the other instructions' keys set to None.
    padded = {"N": 3, "prompt_to_repeat": PROMPT, "keyword": None, "num_words": None}
    result = instruction_following_reward(f"{PROMPT}******{PROMPT}******{PROMPT}", ["copy:copying_multiple"], [padded])
    assert result.followed == (True,)
    with pytest.raises(ValueError, match="missing kwargs"):
        instruction_following_reward("x", ["keywords:keyword_specific_position"], [{"keyword": "x", "n": 1}])


def test_phrase_scan_matches_the_regex_it_replaces():
    rng = random.Random(0)
    alphabet = ["bird ", "worm", " worm", "\n", " ", "x ", "bird", "birdbird "]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        assert _phrase_spans(text, "bird", "worm") == re.findall(r"bird .*? worm", text), repr(text)
    started = time.process_time()
    _phrase_spans("bird " * 200_000, "bird", "worm")  # the regex rescans the line from every "bird "
    assert time.process_time() - started < 1.0


def test_rule_based_sentences_match_the_reference_splitter():
    from lm_eval.tasks.ifeval.instructions_util import split_into_sentences

    rng = random.Random(1)
    pieces = ["Mr.", "Dr. ", "St", ".", " ", "\n", "3.5", "a.b.c.", "U.S. ", "He ", "Inc. ", "Ph.D.", "...", "!",
              "?", '"', "”", ".com", "x", "Yes. ", "Co. This", "A. B. ", "word", "Jr. But"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert split_sentences_by_rules(text) == split_into_sentences(text), repr(text)

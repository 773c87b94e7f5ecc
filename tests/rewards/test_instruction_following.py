"""Instruction following: every IFEval instruction id with a passing and a failing response, kwargs handling."""

import pytest

from nemotron_jax.rewards import (
    IFEVAL_INSTRUCTION_IDS,
    instruction_following_reward,
    instruction_following_score,
)

ENGLISH = "The weather today is sunny and warm, so we will walk to the park after lunch."
FRENCH = "Le temps est ensoleillé aujourd'hui et nous irons au parc après le déjeuner avec nos amis."

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["river", "Bridge"]}, "The bridge crosses the river.", "The bridge is old."),
    (
        "keywords:frequency",
        {"keyword": "data", "frequency": 3, "relation": "at least"},
        "Data beats opinions; data is cheap; more data helps.",
        "Data beats opinions; data is cheap.",
    ),
    (
        "keywords:frequency",
        {"keyword": "data", "frequency": 2, "relation": "less than"},
        "Data beats opinions.",
        "Data beats opinions; data is cheap.",
    ),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "A category of animals.", "My Dog barks."),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zebras zigzag lazily.",
        "Zebras run.",
    ),
    ("language:response_language", {"language": "fr"}, FRENCH, ENGLISH),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith arrived at 3.30 p.m. today. He left soon after.",
        "One. Two! Three? Four.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "at least"},
        "One. Two! Three?",
        "One. Two!",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 3},
        "First part.\n***\nSecond part.\n***\nThird part.",
        "First part.\n***\n\n***\nThird part.\n***\nFourth.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Four words right here.",
        "These are five words here.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "These are five words here.",
        "Four words right here.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Cats are great.\n\n\"However,\" said the dog, \"we are better.\"",
        "Cats are great.\n\nBut dogs disagree.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "周末"},
        "周末我们去公园散步吧。\n\n天气很好。",
        "我们周末去公园散步吧。\n\n天气很好。",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Send it to [name] at [address].",
        "Send it to [name] at the office.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Hope you are well.\n\nP.S. Bring snacks.",
        "Hope you are well. Bring snacks.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        "Hi.\nP.S. one\nP.P.S two",
        "Hi.\nP.S. one",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},  # as in the reference: a `---` line counts, `**bold**` and `+ item` do not
        "Items:\n* apples\n- pears\n---\n**Done**\n+ plums",
        "Items:\n* apples\n* pears\n+ plums",
    ),
    (
        "detectable_format:constrained_response",
        {},
        "After thinking about it: My answer is maybe.",
        "Maybe, I am not sure.",
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "This is *important* and **critical**.",
        "This is *important* only.",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nIntro.\nSECTION 2\nBody.",
        "SECTION 1\nIntro and body.",
    ),
    (
        "detectable_format:json_format",
        {},
        '```json\n{"name": "Ada", "age": 36}\n```',
        'Here is the JSON: {"name": "Ada"}',
    ),
    ("detectable_format:title", {}, "<<A Poem of Joy>>\nRoses are red.", "A Poem of Joy\nRoses are red."),
    (
        "combination:two_responses",
        {},
        "Paris is the capital.\n******\nThe capital is Paris.",
        "Paris is the capital.\n******\nParis is the capital.",
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a haiku about rain."},
        "Write a haiku about rain. Soft rain on the roof...",
        "Soft rain on the roof. Write a haiku about rain.",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Is there anything else I can help with?"},
        "Here you go. Is there anything else I can help with?",
        "Is there anything else I can help with? Here you go.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "We met NASA and ESA engineers.",
        "We met NASA engineers yesterday.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "We met NASA engineers yesterday.",
        "We met NASA and ESA engineers.",
    ),
    ("change_case:english_capital", {}, ENGLISH.upper(), ENGLISH),
    ("change_case:english_capital", {}, ENGLISH.upper(), FRENCH.upper()),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), ENGLISH),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), FRENCH.lower()),
    ("punctuation:no_comma", {}, "No commas here at all.", "Well, there is one."),
    ("startend:quotation", {}, '"Wrapped in quotes."', 'Not wrapped "in quotes".'),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "passing", "failing"), CASES)
def test_instruction_pass_and_fail(instruction_id, kwargs, passing, failing):
    assert instruction_following_reward(passing, [instruction_id], [kwargs]).followed == (True,)
    assert instruction_following_reward(failing, [instruction_id], [kwargs]).followed == (False,)


def test_every_ifeval_id_is_covered():
    ifeval_ids = {
        "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
        "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
        "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
        "detectable_content:number_placeholders", "detectable_content:postscript",
        "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
        "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
        "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
        "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
        "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation",
    }  # fmt: skip
    assert len(ifeval_ids) == 25
    assert ifeval_ids <= set(IFEVAL_INSTRUCTION_IDS)
    assert ifeval_ids <= {case[0] for case in CASES}


def test_fraction_and_all_followed():
    ids = ["punctuation:no_comma", "keywords:existence", "detectable_format:title"]
    kwargs = [None, {"keywords": ["moon"]}, {}]
    result = instruction_following_reward("<<Night>> The moon, bright.", ids, kwargs)
    assert result.followed == (False, True, True)
    assert result.fraction == pytest.approx(2 / 3)
    assert not result.all_followed
    assert result.reward("all") == 0.0
    fraction = instruction_following_score("<<Night>> The moon, bright.", ids, kwargs, mode="fraction")
    assert fraction == pytest.approx(2 / 3)
    assert instruction_following_score("<<Night>> The moon is bright.", ids, kwargs) == 1.0


def test_released_data_kwargs_padding_with_none_values_is_accepted():
    # The released data pads every kwargs dict with all other instructions' keys set to None.
    padded = {"num_words": 3, "relation": "at least", "keywords": None, "language": None, "end_phrase": None}
    result = instruction_following_reward("one two three", ["length_constraints:number_words"], [padded])
    assert result.followed == (True,)
    # Numbers stored as floats (Parquet) are accepted when integral.
    padded["num_words"] = 3.0
    assert instruction_following_reward("one two three", ["length_constraints:number_words"], [padded]).all_followed


def test_only_the_answer_after_think_is_checked():
    response = "<think>Let me use a comma, then drop it</think>No comma in this answer."
    assert instruction_following_reward(response, ["punctuation:no_comma"], [None]).all_followed
    unfinished = "<think>still thinking and no comma"
    assert instruction_following_reward(unfinished, ["punctuation:no_comma"], [None]).followed == (False,)


def test_unknown_instruction_id_raises_naming_it():
    with pytest.raises(ValueError, match="detectable_format:haiku"):
        instruction_following_reward("x", ["detectable_format:haiku"], [None])


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (["length_constraints:number_words"], [{"num_words": 3}], "missing kwargs \\['relation'\\]"),
        (["length_constraints:number_words"], [{"num_words": 3, "relation": "more than"}], "relation"),
        (["length_constraints:number_words"], [{"num_words": "many", "relation": "at least"}], "num_words"),
        (["punctuation:no_comma"], [{"keywords": ["x"]}], "unexpected kwargs"),
        (["punctuation:no_comma", "detectable_format:title"], [None], "aligned"),
        (["keywords:existence"], [{"keywords": "river"}], "list of strings"),
        ([], [], "empty"),
    ],
)
def test_bad_kwargs_raise(ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        instruction_following_reward("some text", ids, kwargs)


def test_language_detection_is_deterministic():
    mixed = "Hola amigo. Hello friend. Bonjour ami. Ciao amico."
    spanish = {"language": "es"}
    first = instruction_following_reward(mixed, ["language:response_language"], [spanish]).followed
    for _ in range(5):
        assert instruction_following_reward(mixed, ["language:response_language"], [spanish]).followed == first

"""Chat template: golden strings (thinking, instruct, multi-turn, tools) and the exact loss mask."""

import numpy as np
import pytest

from nemotron_jax.data import (
    ChatFormatError,
    chat_stop_token_ids,
    render_chat,
    render_chat_segments,
    render_chat_text,
    split_reasoning,
)

SINGLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "2 plus 2 is 4.", "content": "4"},
]

MULTI = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "reasoning_content": "R2", "content": "A2"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "assistant", "reasoning_content": "Have it.", "content": "21 °C in Paris."},
]

TOOLS_SYSTEM_PROMPT = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following functions:\n\n"
    "<tools>\n<function>\n<name>get_weather</name>\n<description>Current weather.</description>\n"
    "<parameters>\n<parameter>\n<name>city</name>\n<type>string</type>\n<description>City name</description>\n"
    '</parameter>\n<required>["city"]</required>\n</parameters>\n</function>\n</tools>\n\n'
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT><|im_end|>\n"
)


# ------------------------------------------------------------------------------------------------ golden


def test_golden_thinking_single_turn():
    assert render_chat_text(SINGLE) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 plus 2 is 4.\n</think>\n4<|im_end|>\n"
    )


def test_golden_thinking_generation_prompt_without_system_message():
    assert render_chat_text([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_golden_instruct_mode():
    assert render_chat_text(SINGLE, enable_thinking=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>4<|im_end|>\n"
    )
    assert render_chat_text(SINGLE[:2], enable_thinking=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think></think>"
    )


def test_golden_answer_without_reasoning_in_thinking_mode():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render_chat_text(messages) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Hello!<|im_end|>\n"
    )


def test_golden_multi_turn_drops_earlier_reasoning():
    assert render_chat_text(MULTI) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\nA2<|im_end|>\n"
    )
    # Inline reasoning in `content` is treated the same way.
    inline = [MULTI[0], {"role": "assistant", "content": "<think>\nR1\n</think>\nA1"}, *MULTI[2:3]]
    assert render_chat_text(inline, add_generation_prompt=True) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_golden_multi_turn_instruct():
    # Instruct mode renders every turn as if it had no reasoning.
    assert render_chat_text(MULTI, enable_thinking=False) == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>A1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>A2<|im_end|>\n"
    )


def test_golden_tools():
    assert render_chat_text(TOOL_CONVERSATION, tools=[WEATHER_TOOL]) == (
        TOOLS_SYSTEM_PROMPT + "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n<|im_end|>\n'
        "<|im_start|>assistant\n<think>\nHave it.\n</think>\n21 °C in Paris.<|im_end|>\n"
    )


def test_golden_tool_calls_in_history_and_grouped_tool_results():
    messages = [
        {"role": "user", "content": "Compare."},
        {
            "role": "assistant",
            "reasoning_content": "Two calls.",
            "content": "Checking both.",
            "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "Paris"}},
                {"function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2, "opts": {"a": [1]}}}},
            ],
        },
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "Rome is warmer."},
        {"role": "user", "content": "Thanks"},
    ]
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    text = render_chat_text(messages, tools=tools, add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n<function>\n"
        "<name>get_weather</name>\n<parameters>\n</parameters>\n</function>\n</tools>\n\nIf you choose"
    )
    assert text.split("</IMPORTANT><|im_end|>\n", 1)[1] == (
        "<|im_start|>user\nCompare.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Checking both.\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n2\n"
        '</parameter>\n<parameter=opts>\n{"a": [1]}\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response>\n"
        "<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Rome is warmer.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


# ------------------------------------------------------------------------------------------------ loss mask


def _runs(mask: np.ndarray, value: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for position, flag in enumerate(list(mask) + [1 - value]):
        if flag == value and start is None:
            start = position
        elif flag != value and start is not None:
            runs.append((start, position))
            start = None
    return runs


@pytest.mark.parametrize(
    "messages, tools, train_on, expected_trained",
    [
        (SINGLE, None, "final", ["<think>\n2 plus 2 is 4.\n</think>\n4<|im_end|>"]),
        (MULTI, None, "final", ["<think>\nR2\n</think>\nA2<|im_end|>"]),
        (MULTI, None, "all", ["<think></think>\nA1<|im_end|>", "<think>\nR2\n</think>\nA2<|im_end|>"]),
        (
            TOOL_CONVERSATION,
            [WEATHER_TOOL],
            "final",
            [
                "<think>\nNeed the tool.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                "</parameter>\n</function>\n</tool_call>\n<|im_end|>",
                "<think>\nHave it.\n</think>\n21 °C in Paris.<|im_end|>",
            ],
        ),
    ],
)
def test_loss_mask_covers_exactly_the_assistant_content(tokenizer, messages, tools, train_on, expected_trained):
    rendered = render_chat(messages, tokenizer, tools=tools, train_on=train_on)
    ids, mask = rendered.token_ids, rendered.loss_mask
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    # Segment-wise tokenization equals tokenizing the whole text, and round-trips.
    assert ids.tolist() == tokenizer.encode(rendered.text)
    assert tokenizer.decode(ids) == rendered.text
    trained = [tokenizer.decode(ids[start:end]) for start, end in _runs(mask, 1)]
    assert trained == expected_trained
    # Everything else -- headers, system, user and tool turns, the newline after <|im_end|> -- is untrained.
    untrained = "".join(tokenizer.decode(ids[start:end]) for start, end in _runs(mask, 0))
    remaining = rendered.text
    for piece in expected_trained:
        remaining = remaining.replace(piece, "", 1)
    assert untrained == remaining
    for start, _ in _runs(mask, 1):
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_generation_prompt_has_no_trained_tokens(tokenizer):
    rendered = render_chat(SINGLE[:2], tokenizer, add_generation_prompt=True)
    assert rendered.loss_mask.sum() == 0
    assert rendered.token_ids[-2:].tolist() == tokenizer.encode("<think>\n")


def test_segments_concatenate_to_text():
    segments = render_chat_segments(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert "".join(segment.text for segment in segments) == render_chat_text(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert [segment.trained for segment in segments] == [False, True, False, True, False]


def test_chat_stop_token_ids(tokenizer):
    assert tokenizer.token_to_id("<|im_end|>") in chat_stop_token_ids(tokenizer)


# ------------------------------------------------------------------------------------------ split_reasoning


@pytest.mark.parametrize(
    "response, opened, expected",
    [
        ("<think>\nstep 1\n</think>\n\nThe answer is 4.", False, ("step 1", "The answer is 4.")),
        ("step 1\n</think>\nFour", True, ("step 1", "Four")),  # the prompt opened <think>
        ("<think></think>Just the answer", False, ("", "Just the answer")),
        ("No tags at all", False, ("", "No tags at all")),
        ("No tags at all", True, ("No tags at all", "")),  # thinking mode, truncated before </think>
        ("<think>\nunfinished reasoning", False, ("unfinished reasoning", "")),
        ("a</think>b</think>c", False, ("a", "b</think>c")),
    ],
)
def test_split_reasoning(response, opened, expected):
    assert split_reasoning(response, prompt_opened_think=opened) == expected


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], r"messages\[0\]\.content: missing"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\]"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
            r"messages\[0\]\.tool_calls\[0\]\.function\.arguments",
        ),
    ],
)
def test_bad_messages_name_the_field(messages, match):
    with pytest.raises(ChatFormatError, match=match):
        render_chat_text(messages)


def test_content_parts_and_developer_role():
    messages = [
        {"role": "developer", "content": "Sys"},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ]
    assert render_chat_text(messages) == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"

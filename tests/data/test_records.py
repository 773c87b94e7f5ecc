"""Record parsing: the SFT and NeMo Gym RL formats, domains from agent_ref, errors naming the field."""

import pytest

from nemotron_jax.data import (
    RecordError,
    RecordRef,
    agent_ref_name,
    domain_from_agent_ref,
    parse_rl_prompt_record,
    parse_sft_record,
)

REF = RecordRef("data/train.jsonl", 17, "line")


def test_sft_record_parses_messages_and_tools():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    conversation = parse_sft_record(record, REF)
    assert [m.role for m in conversation.messages] == ["user", "assistant"]
    assert conversation.messages[1].reasoning == "greet"
    assert conversation.tools == record["tools"] and conversation.ref == REF


@pytest.mark.parametrize(
    "record, field",
    [
        ({"conversation": []}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "not json"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "nope"},
         "tools"),
        # Roles out of order (issue 11): no user turn, a tool result without an assistant turn before it.
        ({"messages": [{"role": "assistant", "content": "y"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}, "messages[1].role"),
        ({"messages": [{"role": "system", "content": "s"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                       {"role": "assistant", "content": "y"}]}, "messages[1].role"),
    ],
)
def test_sft_record_errors_name_file_line_and_field(record, field):
    with pytest.raises(RecordError) as caught:
        parse_sft_record(record, REF)
    error = caught.value
    assert (error.path, error.line, error.field) == ("data/train.jsonl", 17, field)
    assert "data/train.jsonl line 17" in str(error) and f"'{field}'" in str(error)


def test_sft_messages_as_json_string_and_column_layout():
    as_string = {"messages": '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'}
    assert parse_sft_record(as_string).messages[1].content == "b"
    # TFDS Sequence({...}) features come back as a dict of lists.
    columns = {"messages": {"role": ["user", "assistant"], "content": ["a", "b"]}}
    assert [m.content for m in parse_sft_record(columns).messages] == ["a", "b"]


def test_rl_record_fields():
    record = {
        "responses_create_params": {
            "input": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "tools": [{"type": "function", "name": "search"}],
            "temperature": 1.0,
        },
        "agent_ref": {"type": "responses_api_agents", "name": "instruction_following_simple_agent"},
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{"num_words": None, "relation": None}],
        "pass_rate": 0.25,
        "id": "abc",
        "dataset": "if-rl",
    }
    parsed = parse_rl_prompt_record(record, REF)
    assert parsed.domain == "instruction_following"
    assert parsed.agent_ref == "instruction_following_simple_agent"
    # None-valued kwargs keys (Arrow's union schema) are dropped.
    assert parsed.reward_spec == {
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
        "pass_rate": 0.25,
    }
    assert parsed.metadata == {"id": "abc", "dataset": "if-rl", "responses_create_params": {"temperature": 1.0}}
    assert parsed.tools == [{"type": "function", "name": "search"}]
    assert [m.role for m in parsed.messages] == ["system", "user"]


def test_rl_record_string_agent_ref_and_string_input():
    parsed = parse_rl_prompt_record(
        {"responses_create_params": {"input": "What is 1+1?"}, "agent_ref": "mcqa_simple_agent", "expected_answer": "C"}
    )
    assert parsed.domain == "mcqa" and parsed.agent_ref == "mcqa_simple_agent"
    assert parsed.messages[0].role == "user" and parsed.messages[0].content == "What is 1+1?"
    assert parsed.reward_spec == {"expected_answer": "C"}


@pytest.mark.parametrize(
    "record, field",
    [
        ({"agent_ref": "math_agent"}, "responses_create_params"),
        ({"responses_create_params": {}, "agent_ref": "math_agent"}, "responses_create_params.input"),
        ({"responses_create_params": {"input": [{"role": "x", "content": ""}]}, "agent_ref": "a"},
         "responses_create_params.input[0].role"),
        ({"responses_create_params": {"input": "q"}}, "agent_ref"),
        ({"responses_create_params": {"input": "q"}, "agent_ref": {"type": "x"}}, "agent_ref"),
        ({"responses_create_params": {"input": "q"}, "agent_ref": "mcqa_simple_agent"}, "expected_answer"),
        ({"responses_create_params": {"input": "q"}, "agent_ref": "instruction_following_simple_agent",
          "instruction_id_list": ["a", "b"], "kwargs": [{}]}, "kwargs"),
        ({"responses_create_params": {"input": "q"}, "agent_ref": "ifeval_agent",
          "instruction_id_list": "punctuation:no_comma", "kwargs": [{}]}, "instruction_id_list"),
        # Roles out of order (issue 11): a prompt that opens with an assistant turn.
        ({"responses_create_params": {"input": [{"role": "assistant", "content": "a"},
                                                {"role": "user", "content": "q"}]}, "agent_ref": "math_agent"},
         "responses_create_params.input[0].role"),
    ],
)
def test_rl_record_errors_name_the_field(record, field):
    with pytest.raises(RecordError) as caught:
        parse_rl_prompt_record(record, REF)
    assert caught.value.field == field and caught.value.line == 17


def test_rl_default_agent_ref():
    parsed = parse_rl_prompt_record({"responses_create_params": {"input": "q"}}, default_agent_ref="math_simple_agent")
    assert parsed.domain == "math"


@pytest.mark.parametrize(
    "agent_ref, domain",
    [
        ({"type": "responses_api_agents", "name": "math_with_judge_simple_agent"}, "math"),
        ("mcqa_simple_agent", "mcqa"),
        ("instruction_following_simple_agent", "instruction_following"),
        ("workplace_assistant_simple_agent", "workplace_assistant"),
        ("structured_outputs_simple_agent", "structured_outputs"),
        ("comp_coding_simple_agent", "code"),
        ("short_answer_simple_agent", "short_answer"),  # whole words: "swe" is not in "answer"
        ("my_custom_env_agent", "my_custom_env"),
    ],
)
def test_domain_from_agent_ref(agent_ref, domain):
    assert domain_from_agent_ref(agent_ref) == domain


def test_agent_ref_name_accepts_json_string():
    assert agent_ref_name('{"type": "responses_api_agents", "name": "x_agent"}') == "x_agent"


def test_tools_lose_union_schema_nulls():
    record = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": None, "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "enum": None}, "query": None}}}}],
    }
    assert parse_sft_record(record).tools == [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}
    ]

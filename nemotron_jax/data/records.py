"""The two released record formats, parsed and validated.

* SFT conversations (Nemotron-Cascade-2-SFT-Data): OpenAI-style
  `{"messages": [{"role", "content", "reasoning_content"?, "tool_calls"?}, ...], "tools"?: [...]}`.
* RL prompts (Nemotron-Cascade-2-RL-data, NeMo Gym JSONL):
  `{"responses_create_params": {"input": [messages] | str, "tools"?: [...], ...}, "agent_ref": {"name": ...} | str,
  <per-environment fields: expected_answer, output_regex, instruction_id_list, kwargs, ground_truth, pass_rate>, ...}`.

Every problem raises `RecordError`, which names the file, the line (or row / index) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nemotron_jax.data.chat_template import ChatFormatError, Message, normalize_messages


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """Where a record comes from. `unit` is "line" (JSONL, 1-based), "row" (Parquet, 0-based) or "index"."""

    source: str
    position: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.position}"


class RecordError(ValueError):
    """A malformed or incomplete record.

    Attributes:
      ref: the record's `RecordRef` (file and line/row), or None when parsing a record on its own.
      field: the offending field as a path (e.g. `messages[2].role`), or None for a whole-line problem
        such as invalid JSON.
      reason: what is wrong.
    """

    def __init__(self, ref: RecordRef | None, field: str | None, reason: str):
        self.ref = ref
        self.field = field
        self.reason = reason
        where = str(ref) if ref is not None else "record"
        what = f"field '{field}'" if field else "record"
        super().__init__(f"{where}: {what}: {reason}")

    @property
    def path(self) -> str | None:
        return None if self.ref is None else self.ref.source

    @property
    def line(self) -> int | None:
        return None if self.ref is None else self.ref.position

    def __reduce__(self):  # keep the attributes across process boundaries (Grain workers)
        return (RecordError, (self.ref, self.field, self.reason))


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """A decoded record (a JSON object / Parquet row / TFDS example as plain Python) and where it came from."""

    fields: dict[str, Any]
    ref: RecordRef


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """Stands in for a record that failed, when the pipeline is told to skip bad records (and count them)."""

    ref: RecordRef | None
    error: str


# Deepest nesting of arrays/objects a record may have. The released formats nest about 10 deep (a tool's JSON
# schema being the deepest part); far deeper nesting is garbage, and every recursive step downstream (Arrow,
# pickling to Grain workers, json.dumps in the chat template) would hit Python's recursion limit on it.
MAX_JSON_DEPTH = 64
# A JSON string escape of a UTF-16 surrogate (\ud800-\udfff): only then can a lone surrogate appear.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_json(raw: bytes | str, ref: RecordRef | None, field: str | None = None) -> Any:
    """Decodes one JSON document, or raises `RecordError` naming `ref` and `field` for anything that is not a
    usable record: invalid JSON or UTF-8, nesting deeper than `MAX_JSON_DEPTH` (Python's parser would raise
    RecursionError), an integer longer than Python's conversion limit (4,300 digits by default), or a string
    holding a lone UTF-16 surrogate such as `"\\ud800"` (valid JSON, but not encodable as UTF-8: the tokenizer
    would fail on it)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise RecordError(ref, field, f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(ref, field, f"malformed JSON ({error})") from None
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise RecordError(ref, field, f"unusable JSON value ({error})") from None
    encoded = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    _check_json_value(value, ref, field, check_surrogates=_SURROGATE_ESCAPE.search(encoded) is not None)
    return value


def _check_json_value(value: Any, ref: RecordRef | None, field: str | None, *, check_surrogates: bool) -> None:
    """Depth limit, and (when the text had surrogate escapes) no lone surrogates, without recursion."""
    stack = [(value, field or "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                where = path if len(path) <= 60 else path[:60] + "..."
                raise RecordError(ref, where or field, f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if check_surrogates and isinstance(key, str):
                    _check_text(key, ref, path or field)
                child_path = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
                stack.append((child, child_path.lstrip("."), depth + 1))
        elif check_surrogates and isinstance(item, str):
            _check_text(item, ref, path or field)


def _check_text(text: str, ref: RecordRef | None, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start : error.end]
        raise RecordError(
            ref, field, f"a lone UTF-16 surrogate {bad.encode('unicode_escape').decode()} (not valid Unicode text)"
        ) from None


def _require(fields: Mapping[str, Any], name: str, ref: RecordRef | None) -> Any:
    if name not in fields or fields[name] is None:
        raise RecordError(ref, name, "missing")
    return fields[name]


def _maybe_json(value: Any, field: str, ref: RecordRef | None) -> Any:
    """Some exports (Parquet, TFDS Text features) store nested fields as JSON strings."""
    if isinstance(value, (str, bytes)):
        try:
            return decode_json(value, ref, field)
        except RecordError as error:
            raise RecordError(ref, field, f"a string that is not valid JSON: {error.reason}") from None
    return value


def _rows_from_columns(value: Any) -> Any:
    """A TFDS `Sequence({...})` feature comes back as a dict of equal-length lists; turn it into a list of dicts."""
    if isinstance(value, Mapping) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            length = lengths.pop()
            return [{key: column[i] for key, column in value.items()} for i in range(length)]
    return value


def _messages(value: Any, field: str, ref: RecordRef | None) -> list[Message]:
    value = _rows_from_columns(_maybe_json(value, field, ref))
    if not isinstance(value, (list, tuple)):
        raise RecordError(ref, field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordError(ref, field, "empty list of messages")
    # Parquet/Arrow structs carry every key of the union schema; absent ones come back as None.
    cleaned = [
        {key: item for key, item in message.items() if item is not None or key == "content"}
        if isinstance(message, Mapping)
        else message
        for message in value
    ]
    try:
        messages = normalize_messages(cleaned)
    except ChatFormatError as error:
        # normalize_messages names fields from "messages"; re-anchor them under this record's field.
        raise RecordError(ref, field + error.field.removeprefix("messages"), error.reason) from error
    _check_turn_order(messages, field, ref)
    return messages


def _check_turn_order(messages: Sequence[Message], field: str, ref: RecordRef | None) -> None:
    """The conversation opens (after system messages) with a user turn, and tool results follow an assistant
    turn (or another tool result). Anything else trains or prompts on a malformed chat: `RecordError`."""
    first = next((i for i, message in enumerate(messages) if message.role != "system"), None)
    if first is None:
        raise RecordError(ref, field, "no user message (only system messages)")
    if messages[first].role != "user":
        raise RecordError(
            ref, f"{field}[{first}].role", f"roles out of order: the first turn after the system prompt must be "
            f"the user's, got {messages[first].role!r}"
        )
    for index in range(first + 1, len(messages)):
        if messages[index].role == "tool" and messages[index - 1].role not in ("assistant", "tool"):
            raise RecordError(
                ref, f"{field}[{index}].role", f"roles out of order: a tool result must follow an assistant turn "
                f"(or another tool result), not a {messages[index - 1].role!r} message"
            )


def _without_nulls(value: Any) -> Any:
    """Drops None-valued keys at every depth (Arrow fills a struct's absent keys with None)."""
    if isinstance(value, Mapping):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(item) for item in value]
    return value


def _tools(value: Any, field: str, ref: RecordRef | None) -> list[dict[str, Any]] | None:
    """Tool definitions; None-valued keys are dropped, since Parquet exports add them for every absent key (a
    tool schema's own `null`s, e.g. a null default, are rare and carry nothing the template renders)."""
    if value is None:
        return None
    value = _maybe_json(value, field, ref)
    if not isinstance(value, (list, tuple)):
        raise RecordError(ref, field, f"expected a list of tools, got {type(value).__name__}")
    for index, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise RecordError(ref, f"{field}[{index}]", f"expected an object, got {tool!r}")
    return [_without_nulls(tool) for tool in value] or None


# --------------------------------------------------------------------------------------------------- SFT


@dataclasses.dataclass(frozen=True)
class SFTConversation:
    """A validated SFT record: messages ending with an assistant turn, optional tools."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    ref: RecordRef | None


def parse_sft_record(fields: Mapping[str, Any], ref: RecordRef | None = None) -> SFTConversation:
    """Validates an OpenAI-style `{"messages": [...], "tools"?: [...]}` record.

    Raises `RecordError` (naming `ref` and the field) if `messages` is missing or malformed, or if the last
    message is not an assistant turn (there would be nothing to train on).
    """
    if not isinstance(fields, Mapping):
        raise RecordError(ref, None, f"expected a JSON object, got {type(fields).__name__}")
    messages = _messages(_require(fields, "messages", ref), "messages", ref)
    if messages[-1].role != "assistant":
        last = len(messages) - 1
        raise RecordError(
            ref, f"messages[{last}].role", f"the last message must be the assistant's, got {messages[-1].role!r}"
        )
    return SFTConversation(messages=messages, tools=_tools(fields.get("tools"), "tools", ref), ref=ref)


# ---------------------------------------------------------------------------------------------------- RL

# Per-environment fields that verify a response (reference §3.4, dataset card).
REWARD_SPEC_FIELDS: tuple[str, ...] = (
    "expected_answer",
    "output_regex",
    "instruction_id_list",
    "kwargs",
    "ground_truth",
    "pass_rate",
    "tests",  # code: stdin/stdout or function-call test cases (see `rewards.code`)
    "timeout_s",  # code: per-test time limit
    "memory_mb",  # code: per-test memory limit
)

# Fields a domain's verifier cannot do without.
REQUIRED_REWARD_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction_following": ("instruction_id_list", "kwargs"),
    "mcqa": ("expected_answer",),
    "workplace_assistant": ("ground_truth",),
    "code": ("tests",),
}

# agent_ref name words -> domain, checked in order (NeMo Gym names its agents `<environment>_simple_agent`).
_DOMAIN_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("instruction_following", "instruction_following"),
    ("ifeval", "instruction_following"),
    ("ifbench", "instruction_following"),
    ("mcqa", "mcqa"),
    ("multichoice", "mcqa"),
    ("workplace", "workplace_assistant"),
    ("workbench", "workplace_assistant"),
    ("structured_outputs", "structured_outputs"),
    ("structured_output", "structured_outputs"),
    ("math", "math"),
    ("code", "code"),
    ("coding", "code"),
    ("swe", "swe"),
)


def agent_ref_name(agent_ref: Any, ref: RecordRef | None = None) -> str:
    """The agent name of an `agent_ref`, given as `{"name": ...}` (NeMo Gym) or as a plain string."""
    if isinstance(agent_ref, str) and agent_ref.startswith("{"):  # a JSON-encoded object (Parquet / TFDS exports)
        agent_ref = _maybe_json(agent_ref, "agent_ref", ref)
    if isinstance(agent_ref, str) and agent_ref:
        return agent_ref
    if isinstance(agent_ref, Mapping) and isinstance(agent_ref.get("name"), str) and agent_ref["name"]:
        return agent_ref["name"]
    raise RecordError(ref, "agent_ref", f"expected a non-empty name or an object with 'name', got {agent_ref!r}")


def domain_from_agent_ref(agent_ref: Any) -> str:
    """Domain of an RL prompt from its `agent_ref` (dict or string).

    Known environments map to "instruction_following", "mcqa", "workplace_assistant", "structured_outputs",
    "math", "code", "swe"; any other name maps to itself without a trailing `_simple_agent` / `_agent`.
    """
    name = agent_ref_name(agent_ref).lower()
    # Match whole words only ("swe" must not match "short_answer").
    words = "_" + "_".join(word for word in re.split(r"[^a-z0-9]+", name) if word) + "_"
    for keyword, domain in _DOMAIN_KEYWORDS:
        if f"_{keyword}_" in words:
            return domain
    for suffix in ("_simple_agent", "_agent"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclasses.dataclass(frozen=True)
class RLPromptRecord:
    """A validated RL prompt.

    Attributes:
      messages: the prompt conversation (`responses_create_params.input`).
      tools: tools offered to the model (`responses_create_params.tools`), or None.
      agent_ref: the agent name.
      domain: derived from `agent_ref` (see `domain_from_agent_ref`).
      reward_spec: the per-environment fields present in the record (`REWARD_SPEC_FIELDS`).
      metadata: every other top-level field (e.g. `id`), plus the other `responses_create_params` entries
        under "responses_create_params".
      ref: where the record came from.
    """

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    agent_ref: str
    domain: str
    reward_spec: dict[str, Any]
    metadata: dict[str, Any]
    ref: RecordRef | None


def _reward_spec(fields: Mapping[str, Any], domain: str, ref: RecordRef | None) -> dict[str, Any]:
    spec = {name: fields[name] for name in REWARD_SPEC_FIELDS if name in fields and fields[name] is not None}
    for name in REQUIRED_REWARD_FIELDS.get(domain, ()):
        if name not in spec:
            raise RecordError(ref, name, f"missing (required by the {domain} verifier)")
    if "instruction_id_list" in spec:
        ids = _maybe_json(spec["instruction_id_list"], "instruction_id_list", ref)
        if not isinstance(ids, (list, tuple)) or not all(isinstance(item, str) for item in ids):
            raise RecordError(ref, "instruction_id_list", f"expected a list of strings, got {ids!r}")
        spec["instruction_id_list"] = list(ids)
    if "kwargs" in spec:
        kwargs = _maybe_json(spec["kwargs"], "kwargs", ref)
        if not isinstance(kwargs, (list, tuple)):
            raise RecordError(ref, "kwargs", f"expected a list of objects, got {type(kwargs).__name__}")
        cleaned = []
        for index, entry in enumerate(kwargs):
            if entry is None:
                entry = {}
            if not isinstance(entry, Mapping):
                raise RecordError(ref, f"kwargs[{index}]", f"expected an object, got {entry!r}")
            # Arrow structs carry every key of the union schema; absent ones come back as None.
            cleaned.append({key: value for key, value in entry.items() if value is not None})
        spec["kwargs"] = cleaned
        ids = spec.get("instruction_id_list")
        if ids is not None and len(ids) != len(cleaned):
            raise RecordError(
                ref, "kwargs", f"has {len(cleaned)} entries but instruction_id_list has {len(ids)}"
            )
    if "pass_rate" in spec and not isinstance(spec["pass_rate"], (int, float)):
        raise RecordError(ref, "pass_rate", f"expected a number, got {spec['pass_rate']!r}")
    return spec


def parse_rl_prompt_record(
    fields: Mapping[str, Any], ref: RecordRef | None = None, *, default_agent_ref: str | None = None
) -> RLPromptRecord:
    """Validates a NeMo Gym RL prompt record.

    Args:
      fields: the decoded record.
      ref: where it came from (for error messages).
      default_agent_ref: used when the record has no `agent_ref` (some exports set it per file); without it a
        missing `agent_ref` is an error, as in NeMo Gym.

    Raises:
      RecordError naming the field: missing `responses_create_params` / `.input`, malformed messages, missing
      `agent_ref`, or a domain's required reward field (e.g. `instruction_id_list` for instruction following).
    """
    if not isinstance(fields, Mapping):
        raise RecordError(ref, None, f"expected a JSON object, got {type(fields).__name__}")
    params = _maybe_json(_require(fields, "responses_create_params", ref), "responses_create_params", ref)
    if not isinstance(params, Mapping):
        raise RecordError(ref, "responses_create_params", f"expected an object, got {type(params).__name__}")
    if "input" not in params or params["input"] is None:
        raise RecordError(ref, "responses_create_params.input", "missing")
    prompt = params["input"]
    if isinstance(prompt, str) and not prompt.lstrip().startswith("["):
        prompt = [{"role": "user", "content": prompt}]  # the Responses API accepts a bare string
    messages = _messages(prompt, "responses_create_params.input", ref)
    tools = _tools(params.get("tools"), "responses_create_params.tools", ref)

    raw_agent_ref = fields.get("agent_ref")
    if raw_agent_ref is None:
        if default_agent_ref is None:
            raise RecordError(ref, "agent_ref", "missing (and no default_agent_ref was given)")
        raw_agent_ref = default_agent_ref
    name = agent_ref_name(raw_agent_ref, ref)
    domain = domain_from_agent_ref(name)
    reward_spec = _reward_spec(fields, domain, ref)

    metadata = {
        key: value
        for key, value in fields.items()
        if key not in REWARD_SPEC_FIELDS and key not in ("responses_create_params", "agent_ref")
    }
    other_params = {key: value for key, value in params.items() if key not in ("input", "tools")}
    if other_params:
        metadata["responses_create_params"] = other_params
    return RLPromptRecord(
        messages=messages,
        tools=tools,
        agent_ref=name,
        domain=domain,
        reward_spec=reward_spec,
        metadata=metadata,
        ref=ref,
    )


def messages_as_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """`Message`s back to OpenAI-style dicts (for logging and metadata)."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.reasoning is not None:
            item["reasoning_content"] = message.reasoning
        if message.tool_calls:
            item["tool_calls"] = [
                {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ]
        out.append(item)
    return out

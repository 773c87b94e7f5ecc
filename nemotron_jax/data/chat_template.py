"""The ChatML chat template of Nemotron-Cascade 2 (and Nemotron-3-Nano), with thinking and instruct modes.

Rendered form (reference §5.3; the strings follow the template released with the checkpoints):

    <|im_start|>system\\n{system prompt}[\\n\\n{tools block}]<|im_end|>\\n      (always present, possibly empty)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{body}<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response>\\n<|im_end|>\\n   (tool results; no tool role)
    <|im_start|>assistant\\n<think>\\n                                          (generation prompt, thinking)
    <|im_start|>assistant\\n<think></think>                                     (generation prompt, instruct)

Assistant bodies:
  * an assistant turn after the last user message keeps its reasoning: `<think>\\n{reasoning}\\n</think>\\n{answer}`,
    or `<think></think>{answer}` when it has none;
  * an earlier assistant turn keeps only its final answer: `<think></think>` + the text after its `</think>`;
  * instruct mode (`enable_thinking=False`) drops the reasoning of every assistant turn;
  * tool calls follow the body, each as Qwen3-coder XML:
    `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>\\n`.

Loss mask: for each trained assistant turn, the body through its closing `<|im_end|>` (not the
`<|im_start|>assistant\\n` header, not the newline after `<|im_end|>`, nothing from system/user/tool turns).
`train_on="final"` (default) trains the assistant turns after the last user message -- the ones rendered with
their reasoning, which includes every step of a final tool-calling episode. Earlier turns have had their
reasoning stripped; training on them would teach the model to answer without thinking, so they are context
only. `train_on="all"` trains every assistant turn as rendered.

Token ids are produced segment by segment (each segment encoded on its own, then concatenated), so the mask is exact
by construction; segment boundaries always sit next to a special token (`<think>`, `<|im_end|>`), where
tokenizers split anyway, so the ids equal `tokenizer.encode(text)` for the tokenizers of this package.

Control strings inside content (`literal_content`): by default (False, the behaviour of the released template
and of `tokenizer.encode`) a message that contains `<|im_end|>`, `<think>`, `<tool_call>`, ... gets those
strings as the control tokens themselves, and an assistant content holding `<think>...</think>` is read as
inline reasoning. With `literal_content=True`, the content of every message (and reasoning, tool calls,
tool definitions) is plain text: such strings are encoded as ordinary text tokens (the token ids never
contain a control token that the template did not put there), and only `reasoning_content` carries
reasoning. The rendered text is the same; for content without control strings so are the token ids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from nemotron_jax.data.tokenizer import CHAT_SPECIAL_TOKENS, IM_END, IM_START, THINK_CLOSE, THINK_OPEN, Tokenizer

EMPTY_THINK = THINK_OPEN + THINK_CLOSE
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# The tool-use instructions that follow the <tools> block, as worded by the released template, so that a
# fine-tuned checkpoint sees the system prompt it was trained with.
TOOL_USE_INSTRUCTIONS = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and "
    "do not tell the user about function calls\n</IMPORTANT>"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered.

    Attributes:
      field: the offending field as a path, e.g. `messages[2].tool_calls[0].function.arguments`.
      reason: what is wrong.
    """

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self):
        return (ChatFormatError, (self.field, self.reason))


# ----------------------------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Message:
    """One normalised chat message. `role` is one of `MESSAGE_ROLES`."""

    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, None (empty), or a list of OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces = []
        for part_index, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise ChatFormatError(f"{where}.content[{part_index}]", f"only text parts are supported, got {part!r}")
        return "".join(pieces)
    raise ChatFormatError(f"{where}.content", f"expected a string, a list of text parts or null, got {content!r}")


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, Mapping):
        raise ChatFormatError(where, f"expected an object, got {raw!r}")
    function = raw.get("function", raw)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatFormatError(f"{where}.function.name", "missing or not a string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ChatFormatError(f"{where}.function.arguments", f"not valid JSON ({error})") from error
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise ChatFormatError(f"{where}.function.arguments", f"expected an object, got {arguments!r}")
    return ToolCall(name=function["name"], arguments=dict(arguments))


def normalize_messages(messages: Sequence[Mapping[str, Any] | Message]) -> list[Message]:
    """OpenAI-style message dicts -> `Message`s.

    Accepts `role` system/developer/user/assistant/tool (developer is treated as system), `content` as a string,
    null or a list of text parts, and on assistant messages `reasoning_content` and `tool_calls` (OpenAI
    `{"function": {"name", "arguments"}}` or flat `{"name", "arguments"}`; arguments an object or a JSON string).
    Raises `ChatFormatError` naming `messages[i].field` on anything else.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError("messages", f"expected a list of messages, got {type(messages).__name__}")
    normalized: list[Message] = []
    for index, raw in enumerate(messages):
        where = f"messages[{index}]"
        if isinstance(raw, Message):
            normalized.append(raw)
            continue
        if not isinstance(raw, Mapping):
            raise ChatFormatError(where, f"expected an object, got {raw!r}")
        role = raw.get("role")
        if role == "developer":
            role = "system"
        if role not in MESSAGE_ROLES:
            raise ChatFormatError(f"{where}.role", f"expected one of {MESSAGE_ROLES} (or developer), got {role!r}")
        content = _content_text(raw.get("content"), where)
        reasoning = None
        tool_calls: tuple[ToolCall, ...] = ()
        if role == "assistant":
            reasoning = raw.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError(f"{where}.reasoning_content", f"expected a string, got {reasoning!r}")
            raw_calls = raw.get("tool_calls") or []
            if not isinstance(raw_calls, (list, tuple)):
                raise ChatFormatError(f"{where}.tool_calls", f"expected a list, got {raw_calls!r}")
            tool_calls = tuple(_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(raw_calls))
        elif "content" not in raw:
            raise ChatFormatError(f"{where}.content", "missing")
        normalized.append(Message(role=role, content=content, reasoning=reasoning, tool_calls=tool_calls))
    return normalized


# ----------------------------------------------------------------------------------------------- rendering


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _as_text(value: Any) -> str:
    """Objects and lists as JSON, everything else as Python's str (as the released template renders them)."""
    if isinstance(value, (Mapping, list, tuple)):
        return _to_json(value)
    return str(value)


def _extra_keys(fields: Any, handled: Sequence[str]) -> str:
    if not isinstance(fields, Mapping):
        return ""
    return "".join(f"\n<{key}>{_as_text(value)}</{key}>" for key, value in fields.items() if key not in handled)


def format_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools block of the system prompt: `# Tools ... <tools><function>...</function></tools>` + instructions.

    Each tool is an OpenAI function tool, nested (`{"type": "function", "function": {...}}`) or flat
    (`{"name", "description", "parameters"}`, as in NeMo Gym's Responses API rows).
    """
    parts = ["# Tools\n\nYou have access to the following functions:\n\n<tools>"]
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatFormatError(f"tools[{index}]", f"expected an object, got {tool!r}")
        function = tool["function"] if isinstance(tool.get("function"), Mapping) else tool
        if not isinstance(function.get("name"), str):
            raise ChatFormatError(f"tools[{index}].name", "missing or not a string")
        parts.append(f"\n<function>\n<name>{function['name']}</name>")
        if function.get("description") is not None:
            parts.append(f"\n<description>{str(function['description']).strip()}</description>")
        parts.append("\n<parameters>")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(properties, Mapping):
            for name, fields in properties.items():
                parts.append(f"\n<parameter>\n<name>{name}</name>")
                fields = fields if isinstance(fields, Mapping) else {}
                if "type" in fields:
                    # str(), not JSON, even for a list of types: the released template renders it that way.
                    parts.append(f"\n<type>{fields['type']}</type>")
                if fields.get("description") is not None:
                    parts.append(f"\n<description>{str(fields['description']).strip()}</description>")
                if "enum" in fields:
                    parts.append(f"\n<enum>{_to_json(fields['enum'])}</enum>")
                parts.append(_extra_keys(fields, ("name", "type", "description", "enum")))
                parts.append("\n</parameter>")
        parts.append(_extra_keys(parameters, ("type", "properties", "required")))
        if isinstance(parameters, Mapping) and "required" in parameters:
            parts.append(f"\n<required>{_to_json(parameters['required'])}</required>")
        parts.append("\n</parameters>")
        parts.append(_extra_keys(function, ("type", "name", "description", "parameters")))
        parts.append("\n</function>")
    parts.append("\n</tools>")
    parts.append(TOOL_USE_INSTRUCTIONS)
    return "".join(parts)


def format_tool_call(call: ToolCall) -> str:
    """One call in Qwen3-coder XML, ending with a newline."""
    parts = [f"<tool_call>\n<function={call.name}>\n"]
    for name, value in call.arguments.items():
        parts.append(f"<parameter={name}>\n{_as_text(value)}\n</parameter>\n")
    parts.append("</function>\n</tool_call>\n")
    return "".join(parts)


def split_reasoning(response: str, *, prompt_opened_think: bool = False) -> tuple[str, str]:
    """Splits a response into `(reasoning, answer)`, both stripped of surrounding whitespace.

    The reasoning ends at the first `</think>`; a leading `<think>` is dropped. Without `</think>`:
    a response that opened `<think>` (or, with `prompt_opened_think=True`, any response -- the thinking-mode
    generation prompt already opened it) is unfinished reasoning with an empty answer; otherwise the whole
    response is the answer.
    """
    head, closed, tail = response.partition(THINK_CLOSE)
    if closed:
        reasoning = head.strip()
        if reasoning.startswith(THINK_OPEN):
            reasoning = reasoning[len(THINK_OPEN) :].strip()
        return reasoning, tail.strip()
    stripped = response.strip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN) :].strip(), ""
    if prompt_opened_think:
        return stripped, ""
    return "", stripped


def _full_body(message: Message) -> str:
    """Assistant content with its reasoning inlined, as the released template composes it."""
    if message.reasoning is not None and message.reasoning.strip():
        return f"{THINK_OPEN}\n{message.reasoning}\n{THINK_CLOSE}\n{message.content}"
    if THINK_OPEN not in message.content and THINK_CLOSE not in message.content:
        return EMPTY_THINK + message.content
    return message.content


def _assistant_body(message: Message, *, keep_reasoning: bool, instruct: bool) -> str:
    """The text between `<|im_start|>assistant\\n` and `<|im_end|>`."""
    full = _full_body(message)
    if instruct:
        body = EMPTY_THINK + split_reasoning(full)[1]
    elif keep_reasoning:
        body = full.strip()
    else:
        # History turn: only the final answer, after an empty think block. (The released template keeps the
        # answer's leading newline on plain turns and strips it on tool-call turns; so does this.)
        if THINK_CLOSE in full:
            answer = full.split(THINK_CLOSE)[-1]
        elif THINK_OPEN in full:  # reasoning opened but never closed: keep only what came before it
            answer = full.split(THINK_OPEN)[0]
        else:
            answer = None
        if answer is None:
            body = full.strip()
        elif message.tool_calls:
            body = EMPTY_THINK + answer.strip()
        else:
            body = (EMPTY_THINK + answer).strip()
    if message.tool_calls:
        body = body + "\n" + "".join(format_tool_call(call) for call in message.tool_calls)
    return body


@dataclasses.dataclass(frozen=True)
class ChatSegment:
    """A piece of rendered text and whether its tokens are trained (loss mask 1).

    `breaks`: positions in `text` where encoding must split the text (`literal_content`): each one falls
    inside a control string that came from content, so the tokenizer cannot turn it into a control token.
    """

    text: str
    trained: bool
    breaks: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------ literal content
#
# Content is made inert before rendering: in every content string, the first character of each control string
# found there (and of a control string cut off at the end of the string, which template text might complete)
# is swapped for a private-use character that occurs nowhere in the conversation. The template then renders
# as usual (it sees no control strings in content), and `_restore` swaps the characters back, recording a
# break after each one.


def _control_starts(text: str, controls: Sequence[str]) -> list[int]:
    starts = set()
    for control in controls:
        position = text.find(control)
        while position >= 0:
            starts.add(position)
            position = text.find(control, position + 1)
        for cut in range(1, len(control)):  # a proper prefix of a control string at the end of the text
            if text.endswith(control[:cut]):
                starts.add(len(text) - cut)
    return sorted(starts)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`fn` applied to every string (keys included) of a JSON-like value."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {fn(key) if isinstance(key, str) else key: _map_strings(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, fn) for item in value]
    return value


def _neutralize(
    turns: list[Message], tools: Sequence[Mapping[str, Any]] | None, controls: Sequence[str]
) -> tuple[list[Message], Any, dict[str, str]]:
    """Turns and tools with control strings in content made inert; returns them and {placeholder: character}."""
    controls = [control for control in controls if control]
    seen: set[str] = set()

    def collect(text: str) -> str:
        seen.update(text)
        return text

    for turn in turns:
        _map_strings([turn.content, turn.reasoning or "", [[c.name, c.arguments] for c in turn.tool_calls]], collect)
    _map_strings(tools or [], collect)
    placeholders: dict[str, str] = {}  # original first character -> placeholder
    candidate = 0xE000
    for first in sorted({control[0] for control in controls}):
        while chr(candidate) in seen:
            candidate += 1
        placeholders[first] = chr(candidate)
        candidate += 1

    def inert(text: str) -> str:
        starts = _control_starts(text, controls)
        if not starts:
            return text
        chars = list(text)
        for start in starts:
            chars[start] = placeholders[chars[start]]
        return "".join(chars)

    neutral_turns = [
        dataclasses.replace(
            turn,
            content=inert(turn.content),
            reasoning=None if turn.reasoning is None else inert(turn.reasoning),
            tool_calls=tuple(ToolCall(inert(c.name), _map_strings(c.arguments, inert)) for c in turn.tool_calls),
        )
        for turn in turns
    ]
    neutral_tools = None if tools is None else _map_strings(tools, inert)
    return neutral_turns, neutral_tools, {placeholder: first for first, placeholder in placeholders.items()}


def _restore(segment: ChatSegment, originals: dict[str, str]) -> ChatSegment:
    if not any(placeholder in segment.text for placeholder in originals):
        return segment
    chars, breaks = list(segment.text), []
    for index, char in enumerate(chars):
        if char in originals:
            chars[index] = originals[char]
            breaks.append(index + 1)
    return ChatSegment("".join(chars), segment.trained, tuple(breaks))


def render_chat_segments(
    messages: Sequence[Mapping[str, Any] | Message],
    *,
    enable_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: Literal["final", "all"] = "final",
    literal_content: bool = False,
    control_strings: Sequence[str] = CHAT_SPECIAL_TOKENS,
) -> list[ChatSegment]:
    """The conversation as text segments with their loss flags (see the module docstring for the format).

    A leading system message becomes the system prompt; the system turn is always rendered, empty if there is
    neither a system message nor tools. Consecutive `tool` messages share one user turn. With
    `literal_content`, the `control_strings` found in content are marked to be encoded as plain text (the
    segments' `breaks`) and play no part in the template's structure (module docstring).
    """
    if train_on not in ("final", "all"):
        raise ValueError(f"train_on must be 'final' or 'all', got {train_on!r}")
    turns = normalize_messages(messages)
    originals: dict[str, str] = {}
    if literal_content:
        turns, tools, originals = _neutralize(turns, tools, control_strings)
    system_prompt = ""
    if turns and turns[0].role == "system":
        system_prompt = turns[0].content
        turns = turns[1:]
    last_user = max((i for i, turn in enumerate(turns) if turn.role == "user"), default=-1)

    segments: list[ChatSegment] = []

    def emit(text: str) -> None:
        """Appends context (untrained) text, merged into a preceding context segment."""
        if segments and not segments[-1].trained:
            segments[-1] = ChatSegment(segments[-1].text + text, False)
        else:
            segments.append(ChatSegment(text, False))

    system_text = system_prompt
    if tools:
        system_text += ("\n\n" if system_prompt else "") + format_tools(tools)
    emit(f"{IM_START}system\n{system_text}{IM_END}\n")

    for index, turn in enumerate(turns):
        if turn.role == "assistant":
            keep_reasoning = index > last_user
            body = _assistant_body(turn, keep_reasoning=keep_reasoning, instruct=not enable_thinking)
            trained = train_on == "all" or keep_reasoning
            emit(f"{IM_START}assistant\n")
            if trained:
                segments.append(ChatSegment(body + IM_END, True))
                emit("\n")
            else:
                emit(body + IM_END + "\n")
        elif turn.role == "tool":
            opens = index == 0 or turns[index - 1].role != "tool"
            closes = index == len(turns) - 1 or turns[index + 1].role != "tool"
            emit(
                (f"{IM_START}user\n" if opens else "")
                + f"<tool_response>\n{turn.content}\n</tool_response>\n"
                + (f"{IM_END}\n" if closes else "")
            )
        else:  # user, or a later system message
            emit(f"{IM_START}{turn.role}\n{turn.content}{IM_END}\n")

    if add_generation_prompt:
        emit(f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if enable_thinking else EMPTY_THINK))
    if originals:
        segments = [_restore(segment, originals) for segment in segments]
    return segments


def render_chat_text(
    messages: Sequence[Mapping[str, Any] | Message],
    *,
    enable_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    literal_content: bool = False,
) -> str:
    """The rendered conversation as one string (no tokenizer needed)."""
    segments = render_chat_segments(
        messages, enable_thinking=enable_thinking, tools=tools, add_generation_prompt=add_generation_prompt,
        literal_content=literal_content,
    )
    return "".join(segment.text for segment in segments)


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A tokenized conversation.

    Attributes:
      token_ids: int32 [T].
      loss_mask: int32 [T], 1 where `token_ids[t]` is an assistant token to train on (aligned with the tokens
        themselves, not shifted; `packing` shifts it onto next-token targets).
      text: the rendered text, `decode(token_ids)` for round-tripping tokenizers.
    """

    token_ids: np.ndarray
    loss_mask: np.ndarray
    text: str


def render_chat(
    messages: Sequence[Mapping[str, Any] | Message],
    tokenizer: Tokenizer,
    *,
    enable_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: Literal["final", "all"] = "final",
    literal_content: bool = False,
) -> RenderedChat:
    """Renders and tokenizes a conversation; see the module docstring for the format and the loss mask.

    Args:
      messages: OpenAI-style message dicts (or `Message`s).
      tokenizer: any `Tokenizer`.
      enable_thinking: thinking mode (True) or instruct mode (False, reasoning dropped, empty think blocks).
      tools: OpenAI function tools, rendered into the system prompt.
      add_generation_prompt: append the assistant header that starts a generation (for prompts).
      train_on: "final" (assistant turns after the last user message) or "all".
      literal_content: encode control strings found in content (`<|im_end|>`, `<think>`, and every other
        string `tokenizer.literal_token_strings()` names) as plain text; see the module docstring.

    Returns:
      `RenderedChat` with int32 [T] `token_ids` and `loss_mask`.
    """
    segments = render_chat_segments(
        messages,
        enable_thinking=enable_thinking,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        train_on=train_on,
        literal_content=literal_content,
        control_strings=literal_control_strings(tokenizer) if literal_content else CHAT_SPECIAL_TOKENS,
    )
    return encode_segments(segments, tokenizer)


def literal_control_strings(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The chat template's tokens plus every string the tokenizer matches as one token inside text."""
    return tuple(dict.fromkeys((*CHAT_SPECIAL_TOKENS, *tokenizer.literal_token_strings())))


def encode_segments(segments: Sequence[ChatSegment], tokenizer: Tokenizer) -> RenderedChat:
    """Tokenizes rendered segments (each on its own, split at its `breaks`) into a `RenderedChat`."""
    pieces: list[str] = []
    owners: list[int] = []
    for index, segment in enumerate(segments):
        bounds = (0, *segment.breaks, len(segment.text))
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                pieces.append(segment.text[start:end])
                owners.append(index)
    ids: list[int] = []
    mask: list[int] = []
    for owner, piece_ids in zip(owners, tokenizer.encode_batch(pieces)):
        ids.extend(piece_ids)
        mask.extend([int(segments[owner].trained)] * len(piece_ids))
    return RenderedChat(
        token_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=np.asarray(mask, dtype=np.int32),
        text="".join(segment.text for segment in segments),
    )


def chat_stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn in generation: `<|im_end|>`, plus the tokenizer's EOS if different."""
    stop = [tokenizer.token_to_id(IM_END)]
    if tokenizer.eos_id is not None and tokenizer.eos_id not in stop:
        stop.append(tokenizer.eos_id)
    return stop

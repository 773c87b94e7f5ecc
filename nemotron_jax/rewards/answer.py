"""Locating the part of a response that a verifier should grade.

A Nemotron-Cascade 2 response in thinking mode is ``reasoning </think> answer``; the chat template puts
``<think>\\n`` in the generation prompt, so the generated text usually holds only the closing tag. In instruct
mode the prompt ends with an empty ``<think></think>`` and the response has no tags at all. Verifiers grade the
answer only: a ``\\boxed{}`` or a forbidden word inside the reasoning must not count.

These helpers are plain string functions so that every reward can call them and users can reuse them.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def extract_final_answer(response: str, *, thinking: bool | None = None) -> str | None:
    """Returns the answer part of ``response``, or ``None`` when the response has no answer.

    Rules (``thinking=None``, the default, infers the mode from the tags present):
      * if ``</think>`` occurs, the answer is everything after its LAST occurrence;
      * otherwise, if ``<think>`` occurs, the reasoning was opened but never closed: no answer (``None``);
      * otherwise the whole response is the answer (instruct mode, or a caller that already stripped it).

    ``thinking=True`` states that the response was generated in thinking mode, where the opening tag is part of
    the prompt: without a ``</think>`` there is no answer. ``thinking=False`` states instruct mode: the answer is
    everything after a ``</think>`` if the model wrote one anyway, else the whole response.

    The answer is returned with surrounding whitespace stripped; it may be the empty string.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    close_at = response.rfind(THINK_CLOSE)
    if close_at >= 0:
        return response[close_at + len(THINK_CLOSE) :].strip()
    if thinking or (thinking is None and THINK_OPEN in response):
        return None
    return response.strip()


# `\boxed` / `\fbox` not followed by another letter (`\boxedsymbol` is a different macro).
BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# Escaped characters (a backslash and the character after it) and grouping braces: all that brace matching reads.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BARE_TOKEN = re.compile(r"[^\s$]+")


def _brace_partners(text: str) -> dict[int, int]:
    r"""Maps the index of each grouping ``{`` to the index of its matching ``}`` (one linear pass).

    Escaped braces (``\{``, ``\}``, as in a LaTeX set) are not grouping braces. Unmatched braces are left out.
    """
    partners: dict[int, int] = {}
    open_at: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        if token.group(0) == "{":
            open_at.append(token.start())
        elif token.group(0) == "}" and open_at:
            partners[open_at.pop()] = token.start()
    return partners


def find_boxed_contents(text: str) -> list[str]:
    r"""Returns the contents of every ``\boxed{...}`` / ``\fbox{...}`` / ``\boxed x`` in ``text``, in order.

    Nested braces are matched (``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``). The brace-less form
    ``\boxed 5`` takes the next whitespace-delimited token (up to a ``$``). An unclosed box (a truncated
    response) is skipped. Empty boxes are skipped. Linear in the length of ``text``.
    """
    commands = list(BOX_COMMAND.finditer(text))
    if not commands:
        return []
    partners = _brace_partners(text)
    contents = []
    for command in commands:
        position = command.end()
        while position < len(text) and text[position] in " \t":
            position += 1
        if position >= len(text):
            continue
        if text[position] == "{":
            close_at = partners.get(position)
            if close_at is None:
                continue
            content = text[position + 1 : close_at].strip()
        else:
            token = _BARE_TOKEN.match(text, position)
            content = token.group(0) if token else ""
        if content:
            contents.append(content)
    return contents


def last_boxed_content(text: str) -> str | None:
    """The content of the last non-empty ``\\boxed``/``\\fbox`` in ``text`` (see ``find_boxed_contents``)."""
    contents = find_boxed_contents(text)
    return contents[-1] if contents else None


_FENCE = "```"
_FENCE_LANGUAGE = re.compile(r"[ \t]*([A-Za-z0-9_+#.-]*)")


def fenced_code_blocks(text: str) -> list[tuple[str, str]]:
    r"""Every fenced code block of ``text`` as ``(language tag, body)``, in order. Linear in ``len(text)``.

    A block opens with ```` ``` ```` (anywhere), an optional language tag and the rest of that line; its body
    runs to the next ```` ``` ```` (a newline and indentation right before the closing fence are not part of
    the body). A fence with no newline after it, or no closing fence, opens no block. This is what the regex
    `````[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|```)`` (DOTALL) finds, written as a scan because the
    regex backtracks quadratically on a long run of backticks (``'`' * 100000`` took 15 s).
    """
    blocks = []
    position = 0
    while True:
        opening = text.find(_FENCE, position)
        if opening < 0:
            return blocks
        line_end = text.find("\n", opening + len(_FENCE))
        if line_end < 0:
            return blocks  # no later fence can have a newline after it either
        closing = text.find(_FENCE, line_end + 1)
        if closing < 0:
            return blocks  # no later fence can be closed either
        body = text[line_end + 1 : closing]
        indented = body.rstrip(" \t")
        if indented.endswith("\n"):
            body = indented[:-1]
        language = _FENCE_LANGUAGE.match(text, opening + len(_FENCE), line_end).group(1)
        blocks.append((language, body))
        position = closing + len(_FENCE)


def last_code_block(text: str, *, languages: tuple[str, ...] = ("python", "py", "python3", "")) -> str | None:
    """The body of the last fenced code block (```lang ... ```) whose language tag is in ``languages``.

    The empty tag ``""`` accepts untagged blocks. Returns ``None`` when there is no such (closed) block.
    Linear in the length of ``text`` (see ``fenced_code_blocks``).
    """
    wanted = {language.lower() for language in languages}
    blocks = [body for language, body in fenced_code_blocks(text) if language.lower() in wanted]
    return blocks[-1] if blocks else None

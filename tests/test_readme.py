"""The README's Python snippets run as written: every ```python block, in order, in one namespace, in a
temporary working directory (as a researcher would paste them into one Colab session)."""

from __future__ import annotations

import os
import re
import traceback

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def test_python_blocks_are_found():
    blocks = python_blocks("intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n")
    assert blocks == ["a = 1\n", "b = a + 1\n"]


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 5, "README.md should hold the 'Using it' snippets"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for number, source in enumerate(blocks, 1):
        first_line = source.strip().splitlines()[0]
        try:
            exec(compile(source, f"README.md python block {number}", "exec"), namespace)
        except Exception:  # noqa: BLE001 - any failure of a snippet fails the test, naming the snippet
            pytest.fail(f"README python block {number} (starting {first_line!r}) raised:\n{traceback.format_exc()}")
    # What the snippets claim in their comments.
    assert namespace["logits"].shape == (1, namespace["tokens"].shape[1], namespace["cfg"].vocab_size)
    assert len(namespace["out"].tokens) == 4
    assert namespace["rewards"].compute_reward(namespace["task"].domain, namespace["task"].answer,
                                               namespace["task"].reward_spec) == 1.0
    assert namespace["pipeline"].cfg.vocab_size == namespace["pipeline"].tokenizer.vocab_size

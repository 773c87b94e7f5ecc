"""Instruction-following reward over a list of verifiable instructions (IFEval family).

``instruction_following_reward`` checks every instruction and returns which were followed, the fraction and
whether all were. The float reward used for RL is ``instruction_following_score``; its ``mode`` chooses between

* ``"all"`` (default): 1.0 only if every instruction is followed. This is the reward of NeMo Gym's
  ``instruction_following`` environment (``reward = float(follow_all_instructions)``), which Cascade RL's IF-RL
  stage trains against;
* ``"fraction"``: the fraction of instructions followed (partial credit, an ablation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from nemotron_jax.rewards.answer import extract_final_answer
from nemotron_jax.rewards.instructions import get_checker, resolve_kwargs

IFRewardMode = Literal["all", "fraction"]


@dataclasses.dataclass(frozen=True)
class InstructionFollowingResult:
    """Per-instruction outcome, in the order of ``instruction_id_list``."""

    instruction_ids: tuple[str, ...]
    followed: tuple[bool, ...]

    @property
    def fraction(self) -> float:
        return sum(self.followed) / len(self.followed)

    @property
    def all_followed(self) -> bool:
        return all(self.followed)

    def reward(self, mode: IFRewardMode = "all") -> float:
        if mode == "all":
            return 1.0 if self.all_followed else 0.0
        if mode == "fraction":
            return self.fraction
        raise ValueError(f"mode must be 'all' or 'fraction', got {mode!r}")


def instruction_following_reward(
    response: str,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None] | None,
) -> InstructionFollowingResult:
    """Checks each instruction on the answer part of ``response``.

    Args:
      response: the generated text; only the answer (after the last ``</think>``) is checked. A response with no
        answer (thinking never closed) or an empty answer follows no instruction.
      instruction_id_list: IFEval instruction ids, e.g. ``["punctuation:no_comma", "keywords:existence"]``.
      kwargs: one dict (or ``None``/``{}``) per id, aligned with ``instruction_id_list``; ``None``-valued keys are
        ignored. ``None`` for the whole list means no instruction takes arguments.

    Returns:
      An ``InstructionFollowingResult`` (``.followed``, ``.fraction``, ``.all_followed``, ``.reward(mode)``).

    Raises:
      ValueError: an unknown instruction id (named in the message), kwargs not aligned with the ids, missing or
        malformed kwargs, or an empty instruction list.
    """
    if isinstance(instruction_id_list, str):
        raise ValueError(f"instruction_id_list must be a list of ids, got the string {instruction_id_list!r}")
    instruction_ids = tuple(instruction_id_list)
    if not instruction_ids:
        raise ValueError("instruction_id_list is empty")
    kwargs_list = [None] * len(instruction_ids) if kwargs is None else list(kwargs)
    if len(kwargs_list) != len(instruction_ids):
        raise ValueError(
            f"kwargs has {len(kwargs_list)} entries but instruction_id_list has {len(instruction_ids)}; "
            "they must be aligned"
        )
    # Resolve every instruction before checking any, so that bad data fails the same way for every response.
    resolved = [(get_checker(iid), resolve_kwargs(iid, args)) for iid, args in zip(instruction_ids, kwargs_list)]
    answer = extract_final_answer(response)
    if not answer:
        return InstructionFollowingResult(instruction_ids, (False,) * len(instruction_ids))
    followed = tuple(bool(checker.check(answer, **arguments)) for checker, arguments in resolved)
    return InstructionFollowingResult(instruction_ids, followed)


def instruction_following_score(
    response: str,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None] | None,
    *,
    mode: IFRewardMode = "all",
) -> float:
    """The float reward: ``mode="all"`` (default, strict, as NeMo Gym) or ``"fraction"``; see the module doc."""
    return instruction_following_reward(response, instruction_id_list, kwargs).reward(mode)

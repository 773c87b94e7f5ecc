"""Reward registry: domain / NeMo Gym agent name -> ``reward(response, spec) -> float in [0, 1]``.

``spec`` is the per-environment field dict of an RL record: the record's fields other than the prompt
(``responses_create_params``) and ``agent_ref``. The built-in entries read these fields:

============================  =====================================================================  =========
name (aliases)                spec fields                                                            timeout
============================  =====================================================================  =========
``math``                      ``expected_answer`` or ``ground_truth``                                  30 s
(``math_with_judge``, ``math_with_judge_simple_agent``)
``mcqa``                      ``expected_answer``; optional ``output_regex`` (top level or in        5 s
(``mcqa_simple_agent``)       ``template_metadata``), ``options``
``instruction_following``     ``instruction_id_list``, ``kwargs``; reward = all followed             15 s
(``instruction_following_simple_agent``)
``instruction_following_fraction``  same fields; reward = fraction followed                          15 s
``code`` (``code_gen``,       ``tests``; optional ``timeout_s`` (per test), ``memory_mb``. The        30 s + tests x
``code_gen_simple_agent``)    program is the last ```python block of the answer.                     per-test limit
============================  =====================================================================  =========

The timeout is the scoring pool's per-item wall-clock limit (``nemotron_jax.rewards.reward_pool``).

The ``code`` entry runs ``nemotron_jax.rewards.code.code_reward`` (the sandbox). Unknown names raise ``ValueError`` naming the name and listing the known ones.
``register_reward`` adds your own entries; for the process-pool scorer a reward function must be picklable,
that is, defined at the top level of an importable module (``functools.partial`` of one is fine).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nemotron_jax.rewards.answer import extract_final_answer, last_code_block
from nemotron_jax.rewards.code import code_reward
from nemotron_jax.rewards.instruction_following import instruction_following_score
from nemotron_jax.rewards.math_verifier import math_reward
from nemotron_jax.rewards.mcqa import mcqa_reward

RewardFn = Callable[[str, Mapping[str, Any]], float]
TimeoutSpec = float | Callable[[Mapping[str, Any]], float]


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """A registered reward: the function, its per-item time limit (seconds, or a function of the spec)."""

    name: str
    fn: RewardFn
    timeout_s: TimeoutSpec

    def timeout_for(self, spec: Mapping[str, Any]) -> float:
        timeout = self.timeout_s(spec) if callable(self.timeout_s) else self.timeout_s
        timeout = float(timeout)
        if not timeout > 0:
            raise ValueError(f"reward {self.name!r}: timeout must be positive, got {timeout}")
        return timeout


_ENTRIES: dict[str, RewardEntry] = {}
_ALIASES: dict[str, str] = {}


def register_reward(
    name: str,
    fn: RewardFn,
    *,
    timeout_s: TimeoutSpec = 30.0,
    aliases: Sequence[str] = (),
    overwrite: bool = False,
) -> RewardEntry:
    """Registers ``fn(response, spec) -> float in [0, 1]`` under ``name`` and ``aliases``.

    With ``overwrite=True`` an existing entry is replaced; aliases registered earlier for ``name`` keep pointing
    at it, so overriding ``"math"`` also changes what ``"math_with_judge_simple_agent"`` scores with.

    Raises ValueError if a name is taken (unless ``overwrite``), TypeError if ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"reward {name!r}: fn must be callable, got {fn!r}")
    names = [name, *aliases]
    for each in names:
        if not isinstance(each, str) or not each:
            raise ValueError(f"reward names must be non-empty strings, got {each!r}")
        if not overwrite and (each in _ENTRIES or each in _ALIASES):
            raise ValueError(f"reward name {each!r} is already registered (pass overwrite=True to replace it)")
    entry = RewardEntry(name, fn, timeout_s)
    for each in names:
        _ALIASES.pop(each, None)
        _ENTRIES.pop(each, None)
    _ENTRIES[name] = entry
    for alias in aliases:
        _ALIASES[alias] = name
    return entry


def unregister_reward(name: str) -> None:
    """Removes an entry (by its main name) and its aliases; ValueError if there is none."""
    if name not in _ENTRIES:
        raise ValueError(f"no reward registered under the main name {name!r}; registered: {reward_names()}")
    del _ENTRIES[name]
    for alias in [alias for alias, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def _domain_name(domain: str | Mapping[str, Any]) -> str:
    if isinstance(domain, Mapping):  # a NeMo Gym agent_ref: {"type": "responses_api_agents", "name": ...}
        if "name" not in domain:
            raise ValueError(f"agent_ref {dict(domain)!r} has no 'name'")
        return str(domain["name"])
    if not isinstance(domain, str):
        raise ValueError(f"domain must be a name or an agent_ref mapping, got {domain!r}")
    return domain


def get_reward(domain: str | Mapping[str, Any]) -> RewardEntry:
    """The entry for a domain name, an alias, or a NeMo Gym ``agent_ref`` mapping (its ``name``)."""
    name = _domain_name(domain)
    name = _ALIASES.get(name, name)
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown reward domain {name!r}; registered: {reward_names()}") from None


def reward_names() -> list[str]:
    """All registered names and aliases, sorted."""
    return sorted([*_ENTRIES, *_ALIASES])


def check_reward_value(value: Any, name: str) -> float:
    """``value`` as a float, or ValueError if it is not a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"reward {name!r} returned {value!r} ({type(value).__name__}), not a number")
    reward = float(value)
    if not math.isfinite(reward) or not 0.0 <= reward <= 1.0:
        raise ValueError(f"reward {name!r} returned {reward}, outside [0, 1]")
    return reward


def compute_reward(domain: str | Mapping[str, Any], response: str, spec: Mapping[str, Any]) -> float:
    """Scores one response in this process (no time limit, exceptions propagate)."""
    entry = get_reward(domain)
    return check_reward_value(entry.fn(response, spec), entry.name)


# ----------------------------------------------------------------------------------------------------------------
# Built-in adapters from a record's fields to the reward functions. Top-level functions, so they pickle.


def _require(spec: Mapping[str, Any], domain: str, *fields: str) -> Any:
    for field in fields:
        if field in spec and spec[field] is not None:
            return spec[field]
    raise ValueError(f"{domain} spec has none of the fields {list(fields)}; it has {sorted(spec)}")


def math_spec_reward(response: str, spec: Mapping[str, Any]) -> float:
    return math_reward(response, _require(spec, "math", "expected_answer", "ground_truth"))


def mcqa_spec_reward(response: str, spec: Mapping[str, Any]) -> float:
    output_regex = spec.get("output_regex")
    template_metadata = spec.get("template_metadata")
    if output_regex is None and isinstance(template_metadata, Mapping):
        output_regex = template_metadata.get("output_regex")
    return mcqa_reward(
        response, _require(spec, "mcqa", "expected_answer"), output_regex or None, options=spec.get("options")
    )


def instruction_following_spec_reward(response: str, spec: Mapping[str, Any]) -> float:
    ids = _require(spec, "instruction_following", "instruction_id_list")
    return instruction_following_score(response, ids, spec.get("kwargs"), mode="all")


def instruction_following_fraction_spec_reward(response: str, spec: Mapping[str, Any]) -> float:
    ids = _require(spec, "instruction_following", "instruction_id_list")
    return instruction_following_score(response, ids, spec.get("kwargs"), mode="fraction")


DEFAULT_CODE_TIMEOUT_S = 10.0  # per test, when the spec does not say
DEFAULT_CODE_MEMORY_MB = 1024


def code_spec_reward(response: str, spec: Mapping[str, Any]) -> float:
    """Runs the last ```python block of the answer against ``spec['tests']`` in the sandbox (all must pass)."""
    tests = _require(spec, "code", "tests")
    answer = extract_final_answer(response)
    program = last_code_block(answer) if answer else None
    if program is None:
        return 0.0
    return code_reward(
        program,
        tests,
        timeout_s=float(spec.get("timeout_s") or DEFAULT_CODE_TIMEOUT_S),
        memory_mb=int(spec.get("memory_mb") or DEFAULT_CODE_MEMORY_MB),
    )


def code_item_timeout(spec: Mapping[str, Any]) -> float:
    """Wall-clock budget for one code item: every test may use its full limit, plus start-up slack."""
    tests = spec.get("tests") or ()
    per_test = float(spec.get("timeout_s") or DEFAULT_CODE_TIMEOUT_S)
    return 30.0 + len(tests) * per_test


def _register_builtins() -> None:
    register_reward(
        "math", math_spec_reward, timeout_s=30.0, aliases=("math_with_judge", "math_with_judge_simple_agent")
    )
    register_reward("mcqa", mcqa_spec_reward, timeout_s=5.0, aliases=("mcqa_simple_agent",))
    register_reward(
        "instruction_following",
        instruction_following_spec_reward,
        timeout_s=15.0,
        aliases=("instruction_following_simple_agent",),
    )
    register_reward("instruction_following_fraction", instruction_following_fraction_spec_reward, timeout_s=15.0)
    register_reward(
        "code", code_spec_reward, timeout_s=code_item_timeout, aliases=("code_gen", "code_gen_simple_agent")
    )


_register_builtins()

"""Small, learnable, verifiable tasks generated in code: the data of the embedded CPU demo.

Three domains, each scored by the project's own verifiers through the reward registry
(``nemotron_jax.rewards.compute_reward(task.domain, response, task.reward_spec)``):

* ``"math"``: add / subtract word problems with numbers below 100 (``math_max_operand`` makes them smaller) ("Tom has 23 apples and gets 45 more. How many
  apples does Tom have now?"); answer ``The answer is \\boxed{68}.``; spec ``{"expected_answer": "68"}``.
* ``"instruction_following"``: a one-line writing prompt plus ONE IFEval-style verifiable constraint from
  ``IF_INSTRUCTION_IDS`` (phrased as IFEval phrases it); the answer is a short sentence that follows it; spec
  ``{"instruction_id_list": [id], "kwargs": [{...}]}``.
* ``"code"``: one-line Python functions ("Write a Python function f(x) that returns x plus 3."); the answer is a
  fenced ```python block; spec ``{"tests": [3 function-call tests], "timeout_s": 5}``.

Prompts are short (at most ~35 tokens with a 1000-piece SentencePiece vocabulary trained on this data, plus the
chat template's ~13) and answers too (at most ~25 tokens), so a model of about a million parameters can learn them
on a CPU in minutes. Every task is drawn from a finite space of distinct prompts per domain (``prompt_space_size``);
``generate_tasks`` samples without replacement, deterministically in its seed, and can exclude prompts (so that
held-out eval sets stay disjoint from training sets). ``error_rate`` makes that fraction of the answers wrong in a
plausible way (the reward spec stays right), so that a model fine-tuned on them is imperfect and RL has headroom.

``prepare_demo_workspace`` writes the demo's whole data directory (SFT, per-domain and mixed RL prompts, held-out
eval prompts, a trained tokenizer), idempotently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from nemotron_jax.checkpoint.atomic import atomic_write_file

DOMAINS: tuple[str, ...] = ("math", "instruction_following", "code")

# The NeMo Gym agent each domain's RL records name; `records.domain_from_agent_ref` maps them back to the domain
# and the reward registry has them as aliases of the domain's verifier.
AGENT_NAMES: dict[str, str] = {
    "math": "math_with_judge_simple_agent",
    "instruction_following": "instruction_following_simple_agent",
    "code": "code_gen_simple_agent",
}

# Bump when the generated data changes for the same settings: `prepare_demo_workspace` then refuses to reuse an
# old workspace instead of silently mixing generator versions.
GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One generated task: a user prompt, the assistant answer to train on, and the verifier's reward spec.

    ``answer`` may be deliberately wrong (``generate_tasks(error_rate=...)``); ``reward_spec`` is always right.
    """

    domain: str
    prompt: str
    answer: str
    reward_spec: dict

    def sft_record(self) -> dict:
        """An SFT record (``{"messages": [user, assistant]}``), as `nemotron_jax.data.parse_sft_record` reads."""
        return {
            "messages": [
                {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.answer},
            ]
        }

    def rl_record(self) -> dict:
        """A NeMo Gym RL prompt record, as `nemotron_jax.data.parse_rl_prompt_record` reads: the prompt, the
        agent of the domain, and the reward spec's fields at the top level."""
        return {
            "responses_create_params": {"input": [{"role": "user", "content": self.prompt}]},
            "agent_ref": {"type": "responses_api_agents", "name": AGENT_NAMES[self.domain]},
            **json.loads(json.dumps(self.reward_spec)),  # a deep copy: records must not share the task's lists
        }


# ------------------------------------------------------------------------------------------------------------
# Prompt spaces. Each domain is a finite product of choices; `_TaskSpace.build(index, rng, wrong)` maps a choice
# index to a task. Distinct indices give distinct prompts (tested over the whole space); `rng` picks only what the
# prompt does not show (which sentence answers an IF prompt, the code tests' arguments).


@dataclasses.dataclass(frozen=True)
class _TaskSpace:
    size: int
    prompt: Callable[[int], str]
    build: Callable[[int, random.Random, bool], SyntheticTask]


def _unrank(index: int, radices: Sequence[int]) -> list[int]:
    """Mixed-radix digits of ``index`` (first radix most significant)."""
    digits = []
    for radix in reversed(radices):
        index, digit = divmod(index, radix)
        digits.append(digit)
    return digits[::-1]


# ---------------------------------------------------------------------------------------------------- math

_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma")
_OBJECTS = ("apples", "books", "coins", "pens", "cards", "eggs", "stamps", "marbles")
MATH_MAX_OPERAND = 49  # operands a, b in [1, MATH_MAX_OPERAND]; sums and starting amounts stay below 100
# (template, operation): "add" asks for a + b; "sub" starts from a + b, takes b away, and asks for a.
_MATH_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {x} {o} and gets {y} more. How many {o} does {n} have now?", "add"),
    ("{n} buys {x} {o} and then {y} more. How many {o} did {n} buy?", "add"),
    ("There are {x} {o} in a box. {n} puts in {y} more. How many {o} are in the box?", "add"),
    ("{n} has {x} {o} and gives away {y}. How many {o} does {n} have left?", "sub"),
    ("{n} had {x} {o} and lost {y}. How many {o} are left?", "sub"),
)
_MATH_ERRORS = (1, 2, 10)  # a wrong answer is off by one of these


def _math_radices(max_operand: int) -> tuple[int, ...]:
    return (len(_MATH_TEMPLATES), len(_NAMES), len(_OBJECTS), max_operand, max_operand)


def _math_parts(index: int, max_operand: int = MATH_MAX_OPERAND) -> tuple[str, int]:
    template, name, obj, a, b = _unrank(index, _math_radices(max_operand))
    a, b = a + 1, b + 1
    text, operation = _MATH_TEMPLATES[template]
    x, y = (a, b) if operation == "add" else (a + b, b)
    answer = a + b if operation == "add" else a
    return text.format(n=_NAMES[name], o=_OBJECTS[obj], x=x, y=y), answer


def math_answer_text(value: int | str) -> str:
    """The SFT answer format of the math domain."""
    return f"The answer is \\boxed{{{value}}}."


def _build_math(index: int, rng: random.Random, wrong: bool, max_operand: int = MATH_MAX_OPERAND) -> SyntheticTask:
    prompt, value = _math_parts(index, max_operand)
    shown = value
    if wrong:
        delta = rng.choice(_MATH_ERRORS)
        shown = value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta
    return SyntheticTask("math", prompt, math_answer_text(shown), {"expected_answer": str(value)})


# ------------------------------------------------------------------------------------------- instruction following

_IF_TEMPLATES = (
    "Write a short note about {t}.",
    "Describe {t} briefly.",
    "Tell me about {t}.",
    "Say something about {t}.",
    "Write a line about {t}.",
    "Give me a sentence about {t}.",
)
# topic -> answer sentences: at most 7 words, no commas, quotes or "P.S.", none of the keywords, a capital first
# letter, a final period, and detected as English by langdetect in lower and in upper case (many short sentences
# are not: "SUMMER DAYS ARE LONG AND WARM." is German to it), so the case constraints are satisfiable.
_IF_TOPICS: dict[str, tuple[str, ...]] = {
    "the sea": ("The sea is calm and blue today.", "Waves roll gently onto the sand."),
    "the moon": ("The moon glows softly at night.", "The full moon lights the road."),
    "a rainy day": ("I like to read on rainy days.", "I like the sound of the rain."),
    "your cat": ("My cat naps in the sun.", "My cat loves to chase string."),
    "the forest": ("Tall trees fill the forest.", "Birds sing high in the forest."),
    "winter": ("Winter is cold and full of snow.", "The winter nights are long and cold."),
    "a good book": ("A good book can take you anywhere.", "I read a good book every week."),
    "the city": ("The city is busy and loud.", "Lights fill the city at night."),
    "the garden": ("I love to work in the garden.", "We pick tomatoes from the garden."),
    "a train ride": ("The train moves past green fields.", "A train ride is calm and slow."),
    "your best friend": ("My best friend tells the best jokes.", "My friend and I play chess."),
    "a cup of tea": ("A warm cup of tea feels nice.", "I like my tea with honey."),
    "the mountains": ("The mountains stand tall and white.", "We hiked up the mountain trail."),
    "summer": ("We go to the beach in summer.", "Summer is the best time to swim."),
    "a birthday party": ("The party had cake and music.", "We ate cake at the birthday party."),
    "the night sky": ("The night sky is full of stars.", "I can see many stars tonight."),
}
_IF_TOPIC_NAMES = tuple(_IF_TOPICS)
_END_PHRASES = ("Any other questions?", "That is all.", "Thank you.")
_KEYWORDS = ("bright", "happy", "simple", "lovely", "peaceful", "special", "pleasant", "wonderful")
_WORD_LIMITS = (8, 10, 12)  # length_constraints:number_words, relation "less than"; answers have at most 7 words
_POSTSCRIPTS = ("See you soon.", "Write back soon.", "Have a nice day.")

# The instruction ids used here (all checked by `nemotron_jax.rewards.instructions`).
IF_INSTRUCTION_IDS: tuple[str, ...] = (
    "change_case:english_lowercase",
    "change_case:english_capital",
    "punctuation:no_comma",
    "startend:end_checker",
    "detectable_content:postscript",
    "keywords:existence",
    "startend:quotation",
    "length_constraints:number_words",
)


@dataclasses.dataclass(frozen=True)
class _Constraint:
    instruction_id: str
    kwargs: dict
    phrase: str  # appended to the prompt, as IFEval phrases it
    follow: Callable[[str, random.Random], str]  # base sentence -> answer that follows the constraint
    violate: Callable[[str, str], str]  # (base sentence, topic) -> plausible answer that does not


def _too_long(base: str, topic: str, limit: int) -> str:
    """``base`` followed by the topic's other sentences (cycling) until it has at least ``limit`` words."""
    others = [sentence for sentence in _IF_TOPICS[topic] if sentence != base] or [base]
    sentences = [base]
    while sum(len(sentence.split()) for sentence in sentences) < limit:
        sentences.append(others[(len(sentences) - 1) % len(others)])
    return " ".join(sentences)


def _if_constraints() -> tuple[_Constraint, ...]:
    constraints = [
        _Constraint(
            "change_case:english_lowercase", {},
            "Your entire response should be in English, and in all lowercase letters.",
            lambda base, rng: base.lower(), lambda base, topic: base,
        ),
        _Constraint(
            "change_case:english_capital", {},
            "Your entire response should be in English, and in all capital letters.",
            lambda base, rng: base.upper(), lambda base, topic: base,
        ),
        _Constraint(
            "punctuation:no_comma", {},
            "In your entire response, refrain from the use of any commas.",
            lambda base, rng: base, lambda base, topic: "Well, " + base[0].lower() + base[1:],
        ),
    ]
    for phrase in _END_PHRASES:
        constraints.append(_Constraint(
            "startend:end_checker", {"end_phrase": phrase},
            f"Finish your response with this exact phrase: {phrase}",
            lambda base, rng, phrase=phrase: f"{base} {phrase}", lambda base, topic: base,
        ))
    constraints.append(_Constraint(
        "detectable_content:postscript", {"postscript_marker": "P.S."},
        "At the end of your response, please add a postscript starting with P.S.",
        lambda base, rng: f"{base}\nP.S. {rng.choice(_POSTSCRIPTS)}", lambda base, topic: base,
    ))
    for keyword in _KEYWORDS:
        constraints.append(_Constraint(
            "keywords:existence", {"keywords": [keyword]},
            f"Include the keyword {keyword} in the response.",
            lambda base, rng, keyword=keyword: f"{base} It feels {keyword}.", lambda base, topic: base,
        ))
    constraints.append(_Constraint(
        "startend:quotation", {},
        "Wrap your entire response with double quotation marks.",
        lambda base, rng: f'"{base}"', lambda base, topic: base,
    ))
    for limit in _WORD_LIMITS:
        constraints.append(_Constraint(
            "length_constraints:number_words", {"relation": "less than", "num_words": limit},
            f"Answer with less than {limit} words.",
            lambda base, rng: base, lambda base, topic, limit=limit: _too_long(base, topic, limit),
        ))
    return tuple(constraints)


_IF_CONSTRAINTS = _if_constraints()
_IF_RADICES = (len(_IF_TEMPLATES), len(_IF_TOPIC_NAMES), len(_IF_CONSTRAINTS))


def _if_parts(index: int) -> tuple[str, str, _Constraint]:
    template, topic, constraint = _unrank(index, _IF_RADICES)
    topic_name = _IF_TOPIC_NAMES[topic]
    prompt = f"{_IF_TEMPLATES[template].format(t=topic_name)} {_IF_CONSTRAINTS[constraint].phrase}"
    return prompt, topic_name, _IF_CONSTRAINTS[constraint]


def _build_if(index: int, rng: random.Random, wrong: bool) -> SyntheticTask:
    prompt, topic, constraint = _if_parts(index)
    base = rng.choice(_IF_TOPICS[topic])
    answer = constraint.violate(base, topic) if wrong else constraint.follow(base, rng)
    spec = {"instruction_id_list": [constraint.instruction_id], "kwargs": [dict(constraint.kwargs)]}
    return SyntheticTask("instruction_following", prompt, answer, spec)


# ---------------------------------------------------------------------------------------------------------- code

_FN_NAMES = ("f", "g", "h", "fn", "calc", "solve")
_STRINGS = ("cat", "moon", "tree", "jax", "hello", "green", "code", "apple", "lamp", "stone")


@dataclasses.dataclass(frozen=True)
class _CodeOp:
    """A one-line function: ``phrasings`` (with ``{k}`` if it has a constant), the body (``{k}`` too), how to
    compute it, a wrong body and how to compute that, and the test arguments."""

    params: str
    phrasings: tuple[str, ...]
    constants: tuple[int, ...]  # () when the body has no constant
    body: str
    value: Callable[..., Any]  # (k, *args) -> expected
    wrong_body: str  # may use {k} (the right constant) and {w} (a wrong one)
    wrong_value: Callable[..., Any]  # (k, w, *args)
    arguments: Callable[[random.Random], list]  # -> one test's args


def _ints(low: int, high: int) -> Callable[[random.Random], list]:
    return lambda rng: [rng.randint(low, high)]


def _pair(rng: random.Random) -> list:
    a, b = rng.sample(range(1, 30), 2)
    return [a, b]


def _word(rng: random.Random) -> list:
    return [rng.choice(_STRINGS)]


_CODE_OPS: tuple[_CodeOp, ...] = (
    _CodeOp("x", ("returns x plus {k}", "adds {k} to x"), tuple(range(1, 51)), "x + {k}",
            lambda k, x: x + k, "x + {w}", lambda k, w, x: x + w, _ints(0, 40)),
    _CodeOp("x", ("returns x minus {k}", "subtracts {k} from x"), tuple(range(1, 51)), "x - {k}",
            lambda k, x: x - k, "x - {w}", lambda k, w, x: x - w, _ints(0, 40)),
    _CodeOp("x", ("returns x times {k}", "multiplies x by {k}"), tuple(range(2, 13)), "x * {k}",
            lambda k, x: x * k, "x * {w}", lambda k, w, x: x * w, _ints(1, 20)),
    _CodeOp("x", ("returns the remainder of x divided by {k}",), tuple(range(2, 10)), "x % {k}",
            lambda k, x: x % k, "x % {w}", lambda k, w, x: x % w, _ints(10, 60)),
    _CodeOp("s", ("returns the string s repeated {k} times",), (2, 3, 4), "s * {k}",
            lambda k, s: s * k, "s * {w}", lambda k, w, s: s * w, _word),
    _CodeOp("x", ("returns the square of x",), (), "x * x", lambda k, x: x * x, "x * 2", lambda k, w, x: x * 2,
            _ints(3, 15)),
    _CodeOp("x", ("returns True if x is even",), (), "x % 2 == 0", lambda k, x: x % 2 == 0, "x % 2 == 1",
            lambda k, w, x: x % 2 == 1, _ints(1, 50)),
    _CodeOp("a, b", ("returns the larger of a and b",), (), "max(a, b)", lambda k, a, b: max(a, b), "min(a, b)",
            lambda k, w, a, b: min(a, b), _pair),
    _CodeOp("a, b", ("returns the smaller of a and b",), (), "min(a, b)", lambda k, a, b: min(a, b), "max(a, b)",
            lambda k, w, a, b: max(a, b), _pair),
    _CodeOp("a, b", ("returns the sum of a and b",), (), "a + b", lambda k, a, b: a + b, "a - b",
            lambda k, w, a, b: a - b, _pair),
    _CodeOp("x", ("returns the absolute value of x",), (), "abs(x)", lambda k, x: abs(x), "x",
            lambda k, w, x: x, _ints(-30, 30)),
    _CodeOp("s", ("returns the string s reversed",), (), "s[::-1]", lambda k, s: s[::-1], "s",
            lambda k, w, s: s, _word),
    _CodeOp("s", ("returns the string s in upper case",), (), "s.upper()", lambda k, s: s.upper(), "s.lower()",
            lambda k, w, s: s.lower(), _word),
    _CodeOp("s", ("returns the length of the string s",), (), "len(s)", lambda k, s: len(s), "len(s) + 1",
            lambda k, w, s: len(s) + 1, _word),
    _CodeOp("s", ("returns the first character of s",), (), "s[0]", lambda k, s: s[0], "s[-1]",
            lambda k, w, s: s[-1], _word),
)
# Every (op, phrasing, constant) variant, then x function names.
_CODE_VARIANTS: tuple[tuple[_CodeOp, str, int | None], ...] = tuple(
    (op, phrasing, constant)
    for op in _CODE_OPS
    for phrasing in op.phrasings
    for constant in (op.constants or (None,))
)
_CODE_RADICES = (len(_CODE_VARIANTS), len(_FN_NAMES))
CODE_TESTS_PER_TASK = 3
CODE_TIMEOUT_S = 5


def _code_parts(index: int) -> tuple[str, str, _CodeOp, int | None]:
    variant, fn = _unrank(index, _CODE_RADICES)
    op, phrasing, constant = _CODE_VARIANTS[variant]
    fn_name = _FN_NAMES[fn]
    prompt = f"Write a Python function {fn_name}({op.params}) that {phrasing.format(k=constant)}."
    return prompt, fn_name, op, constant


def code_answer_text(fn_name: str, params: str, body: str) -> str:
    """The SFT answer format of the code domain: a fenced one-line function."""
    return f"```python\ndef {fn_name}({params}):\n    return {body}\n```"


def _build_code(index: int, rng: random.Random, wrong: bool) -> SyntheticTask:
    prompt, fn_name, op, k = _code_parts(index)
    w = None
    if op.constants:
        w = k + 1 if k == op.constants[0] or (k != op.constants[-1] and rng.random() < 0.5) else k - 1
    # Three distinct argument lists on which the wrong body gives a different result at least once, so the tests
    # tell the right answer from the wrong one.
    for _ in range(100):
        args_list: list[list] = []
        while len(args_list) < CODE_TESTS_PER_TASK:
            args = op.arguments(rng)
            if args not in args_list:
                args_list.append(args)
        if any(op.value(k, *args) != op.wrong_value(k, w, *args) for args in args_list):
            break
    else:  # pragma: no cover - every op has arguments that separate it from its wrong body
        raise AssertionError(f"no discriminating tests for {prompt!r}")
    tests = [{"fn_name": fn_name, "args": args, "expected": op.value(k, *args)} for args in args_list]
    body = op.wrong_body.format(k=k, w=w) if wrong else op.body.format(k=k)
    answer = code_answer_text(fn_name, op.params, body)
    return SyntheticTask("code", prompt, answer, {"tests": tests, "timeout_s": CODE_TIMEOUT_S})


_SPACES: dict[str, _TaskSpace] = {
    "instruction_following": _TaskSpace(
        size=_IF_RADICES[0] * _IF_RADICES[1] * _IF_RADICES[2],
        prompt=lambda index: _if_parts(index)[0],
        build=_build_if,
    ),
    "code": _TaskSpace(
        size=_CODE_RADICES[0] * _CODE_RADICES[1],
        prompt=lambda index: _code_parts(index)[0],
        build=_build_code,
    ),
}

_ENUMERATE_LIMIT = 2_000_000  # spaces up to this size are enumerated when random draws run out


def _math_space(max_operand: int) -> _TaskSpace:
    """Math problems with operands in [1, max_operand] (the demo uses small ones: a model of a million parameters
    learns single-digit facts from a thousand examples, not two-digit arithmetic)."""
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or not 1 <= max_operand <= MATH_MAX_OPERAND:
        raise ValueError(f"math_max_operand must be an int in [1, {MATH_MAX_OPERAND}], got {max_operand!r}")
    return _TaskSpace(
        size=math.prod(_math_radices(max_operand)),
        prompt=lambda index: _math_parts(index, max_operand)[0],
        build=lambda index, rng, wrong: _build_math(index, rng, wrong, max_operand),
    )


_SPACES["math"] = _math_space(MATH_MAX_OPERAND)


def _check_domain(domain: str, math_max_operand: int = MATH_MAX_OPERAND) -> _TaskSpace:
    if domain not in _SPACES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if domain == "math" and math_max_operand != MATH_MAX_OPERAND:
        return _math_space(math_max_operand)
    return _SPACES[domain]


def prompt_space_size(domain: str, *, math_max_operand: int = MATH_MAX_OPERAND) -> int:
    """How many distinct prompts ``domain`` has (the most ``generate_tasks`` can return)."""
    return _check_domain(domain, math_max_operand).size


def all_prompts(domain: str, *, math_max_operand: int = MATH_MAX_OPERAND) -> list[str]:
    """Every prompt of ``domain``, in index order (for tests and inspection; math has ~770k)."""
    space = _check_domain(domain, math_max_operand)
    return [space.prompt(index) for index in range(space.size)]


def generate_tasks(
    domain: str,
    count: int,
    *,
    seed: int | str,
    error_rate: float = 0.0,
    exclude_prompts: Iterable[str] = (),
    math_max_operand: int = MATH_MAX_OPERAND,
) -> list[SyntheticTask]:
    """``count`` tasks of ``domain`` with distinct prompts, none of them in ``exclude_prompts``.

    Deterministic in (domain, count, seed, error_rate, exclude_prompts). Exactly ``round(error_rate * count)`` of
    the tasks (chosen at random) have a deliberately wrong answer: math off by 1, 2 or 10; instruction following
    breaking the constraint; code with a wrong constant or operation that the tests catch. Their reward spec is
    right, so the verifier scores them 0.

    ``math_max_operand`` bounds the math operands (default: sums below 100).

    Raises:
      ValueError naming ``domain`` (unknown), ``math_max_operand``, ``count`` (negative, not an int, or more than the domain has prompts
      outside ``exclude_prompts``) or ``error_rate`` (outside [0, 1]).
    """
    space = _check_domain(domain, math_max_operand)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if not (isinstance(error_rate, (int, float)) and 0.0 <= error_rate <= 1.0):
        raise ValueError(f"error_rate must be a number in [0, 1], got {error_rate!r}")
    excluded = {exclude_prompts} if isinstance(exclude_prompts, str) else set(exclude_prompts)
    if count > space.size:
        raise ValueError(f"count={count} is more than the {space.size} distinct {domain} prompts")
    rng = random.Random(f"nemotron_jax.synthetic_tasks/{domain}/{seed}")
    indices = _sample_indices(space, count, rng, excluded, domain)
    wrong = set(rng.sample(range(count), round(error_rate * count)))
    return [space.build(index, rng, position in wrong) for position, index in enumerate(indices)]


def _sample_indices(
    space: _TaskSpace, count: int, rng: random.Random, excluded: set[str], domain: str
) -> list[int]:
    chosen: list[int] = []
    seen: set[int] = set()
    draws = 0
    while len(chosen) < count and draws < 4 * count + 100 and len(seen) < space.size:
        index = rng.randrange(space.size)
        draws += 1
        if index in seen:
            continue
        seen.add(index)
        if space.prompt(index) not in excluded:
            chosen.append(index)
    if len(chosen) < count and space.size <= _ENUMERATE_LIMIT:  # crowded: walk the rest in a random order
        rest = [index for index in range(space.size) if index not in seen]
        rng.shuffle(rest)
        for index in rest:
            if len(chosen) == count:
                break
            if space.prompt(index) not in excluded:
                chosen.append(index)
    if len(chosen) < count:
        raise ValueError(
            f"count={count} is more than the {len(chosen)} distinct {domain} prompts left outside exclude_prompts "
            f"(the domain has {space.size})"
        )
    return chosen


# ------------------------------------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(seed: int | str, count_per_domain: int, *, math_max_operand: int = MATH_MAX_OPERAND) -> list[str]:
    """Texts to train the demo's SentencePiece tokenizer on: ``count_per_domain`` tasks of every domain (at most
    the domain's ``prompt_space_size``) rendered as instruct-mode chats (prompt, answer and the template's role
    words), and one text holding every ASCII letter, digit and punctuation mark (so none needs byte fallback)."""
    from nemotron_jax.data.chat_template import render_chat_text

    texts = []
    for domain in DOMAINS:
        count = min(count_per_domain, prompt_space_size(domain, math_max_operand=math_max_operand))
        for task in generate_tasks(domain, count, seed=seed, math_max_operand=math_max_operand):
            texts.append(render_chat_text(task.sft_record()["messages"], enable_thinking=False))
    texts.append(string.ascii_letters + " " + string.digits + " " + string.punctuation + " \n    ")
    return texts


# ------------------------------------------------------------------------------------------------------- workspace


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Writes one JSON object per line, atomically (a temporary file in the same directory, then os.replace)."""
    atomic_write_file(path, lambda handle: handle.writelines(
        json.dumps(record, ensure_ascii=False) + "\n" for record in records
    ), mode="w")


WORKSPACE_MARKER = "WORKSPACE.json"


def workspace_paths(directory: str | os.PathLike) -> dict[str, str]:
    """Names -> paths of the files ``prepare_demo_workspace`` writes (without the WORKSPACE.json marker)."""
    directory = os.fspath(directory)
    data = os.path.join(directory, "data")
    paths = {"sft": os.path.join(data, "sft.jsonl")}
    for domain in DOMAINS:
        paths[f"rl_{domain}"] = os.path.join(data, f"rl_{domain}.jsonl")
    paths["rl_mixed"] = os.path.join(data, "rl_mixed.jsonl")
    for domain in DOMAINS:
        paths[f"eval_{domain}"] = os.path.join(data, f"eval_{domain}.jsonl")
    paths["tokenizer"] = os.path.join(directory, "tokenizer.model")
    return paths


def prepare_demo_workspace(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    sft_examples_per_domain: int,
    rl_prompts_per_domain: int,
    eval_prompts_per_domain: int,
    sft_error_rates: Mapping[str, float] | None = None,
    tokenizer_vocab_size: int = 1000,
    math_max_operand: int = MATH_MAX_OPERAND,
) -> dict[str, str]:
    """Writes the demo's data directory and returns names -> paths (see ``workspace_paths``).

    Files: ``data/sft.jsonl`` (SFT records of all domains, shuffled; ``sft_error_rates[domain]`` of each domain's
    answers wrong), ``data/rl_<domain>.jsonl`` and ``data/rl_mixed.jsonl`` (all domains, shuffled, for MOPD),
    ``data/eval_<domain>.jsonl`` (RL-format records whose prompts occur in no SFT or RL file), ``tokenizer.model``
    (SentencePiece, trained on ``tokenizer_corpus`` with the SFT seed), and last ``WORKSPACE.json`` with the
    settings, the completion marker. SFT and RL prompts are drawn independently and may overlap; eval prompts never overlap them.

    Idempotent: if ``WORKSPACE.json`` holds the same settings (and the files exist), nothing is written. Different
    settings raise ValueError naming them (delete the directory, or use another one, to regenerate).
    """
    for name, value in (
        ("sft_examples_per_domain", sft_examples_per_domain),
        ("rl_prompts_per_domain", rl_prompts_per_domain),
        ("eval_prompts_per_domain", eval_prompts_per_domain),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(tokenizer_vocab_size, bool) or not isinstance(tokenizer_vocab_size, int):
        raise ValueError(f"tokenizer_vocab_size must be an int, got {tokenizer_vocab_size!r}")
    rates = dict(sft_error_rates or {})
    unknown = sorted(set(rates) - set(DOMAINS))
    if unknown:
        raise ValueError(f"sft_error_rates has unknown domains {unknown}; domains are {DOMAINS}")
    for domain, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"sft_error_rates[{domain!r}] must be a number in [0, 1], got {rate!r}")
    settings = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sft_examples_per_domain": sft_examples_per_domain,
        "rl_prompts_per_domain": rl_prompts_per_domain,
        "eval_prompts_per_domain": eval_prompts_per_domain,
        "sft_error_rates": {domain: float(rates.get(domain, 0.0)) for domain in DOMAINS},
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "math_max_operand": math_max_operand,
    }
    directory = os.fspath(directory)
    paths = workspace_paths(directory)
    marker = os.path.join(directory, WORKSPACE_MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            try:
                existing = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{marker} is not valid JSON ({error}); delete the directory to regenerate") from None
        if existing != settings:
            keys = sorted(
                key for key in set(existing) | set(settings) if existing.get(key, None) != settings.get(key, None)
            )
            differences = ", ".join(f"{key}: {existing.get(key)!r} there, {settings.get(key)!r} asked" for key in keys)
            raise ValueError(
                f"{directory} holds a demo workspace with other settings ({differences}); delete it or use another "
                "directory"
            )
        if all(os.path.exists(path) for path in paths.values()):
            return paths
        # The marker is written last, so this means files were deleted afterwards: regenerate (deterministic).

    from nemotron_jax.data.tokenizer import train_sentencepiece

    eval_sets = {
        domain: generate_tasks(domain, eval_prompts_per_domain, seed=f"{seed}/eval", math_max_operand=math_max_operand)
        for domain in DOMAINS
    }
    held_out = {domain: {task.prompt for task in tasks} for domain, tasks in eval_sets.items()}
    sft_tasks: list[SyntheticTask] = []
    rl_sets: dict[str, list[SyntheticTask]] = {}
    for domain in DOMAINS:
        sft_tasks.extend(generate_tasks(
            domain, sft_examples_per_domain, seed=f"{seed}/sft", error_rate=settings["sft_error_rates"][domain],
            exclude_prompts=held_out[domain], math_max_operand=math_max_operand,
        ))
        rl_sets[domain] = generate_tasks(
            domain, rl_prompts_per_domain, seed=f"{seed}/rl", exclude_prompts=held_out[domain],
            math_max_operand=math_max_operand,
        )
    rng = random.Random(f"nemotron_jax.synthetic_tasks/workspace/{seed}")
    rng.shuffle(sft_tasks)
    mixed = [task for domain in DOMAINS for task in rl_sets[domain]]
    rng.shuffle(mixed)

    write_jsonl(paths["sft"], (task.sft_record() for task in sft_tasks))
    for domain in DOMAINS:
        write_jsonl(paths[f"rl_{domain}"], (task.rl_record() for task in rl_sets[domain]))
        write_jsonl(paths[f"eval_{domain}"], (task.rl_record() for task in eval_sets[domain]))
    write_jsonl(paths["rl_mixed"], (task.rl_record() for task in mixed))
    tokenizer = train_sentencepiece(
        tokenizer_corpus(f"{seed}/sft", sft_examples_per_domain, math_max_operand=math_max_operand),
        tokenizer_vocab_size,
    )
    atomic_write_file(paths["tokenizer"], lambda handle: handle.write(tokenizer.model_bytes), mode="wb")
    atomic_write_file(marker, lambda handle: json.dump(settings, handle, indent=2, sort_keys=True), mode="w")
    return paths

"""rewards layer of nemotron-jax: verifiers per domain, the reward registry and batched scoring.

Every reward is a pure function from a response's text and a spec to a float in [0, 1]:

* ``math_reward(response, ground_truth)``: last ``\\boxed{}`` (or "answer is") vs the ground truth, by
  mathematical equivalence (math-verify).
* ``mcqa_reward(response, expected_answer, output_regex=None)``: the chosen option letter.
* ``instruction_following_reward(response, instruction_id_list, kwargs)``: IFEval-family checks; returns an
  ``InstructionFollowingResult`` (``.fraction``, ``.all_followed``); ``instruction_following_score`` is the float.
* ``code_reward(program, tests, *, timeout_s, memory_mb)``: sandboxed execution against stdin/stdout and
  function-call tests (``run_sandboxed`` is the sandbox itself; ``sandbox_capabilities`` says what isolation
  this machine allows).

Verifiers grade the answer part of a response only (after the last ``</think>``; see ``extract_final_answer``).
The overlong rule (a truncated response gets 0) is applied by the scoring layer: ``score_batch`` /
``RewardPool.score`` take ``truncated``. Domains map to rewards through the registry (``get_reward``,
``register_reward``).
"""

from nemotron_jax.rewards.answer import extract_final_answer, find_boxed_contents, last_boxed_content, last_code_block
from nemotron_jax.rewards.code import (
    CodeTestReport,
    code_reward,
    code_reward_batch,
    extract_code_block,
    run_code_tests,
)
from nemotron_jax.rewards.instruction_following import (
    InstructionFollowingResult,
    instruction_following_reward,
    instruction_following_score,
)
from nemotron_jax.rewards.instructions import IFEVAL_INSTRUCTION_IDS, register_instruction
from nemotron_jax.rewards.instructions_open_instruct import OPEN_INSTRUCT_INSTRUCTION_IDS
from nemotron_jax.rewards.math_verifier import MathVerifyTimeout, extract_math_answer, math_reward
from nemotron_jax.rewards.mcqa import extract_choice, mcqa_reward
from nemotron_jax.rewards.registry import (
    RewardEntry,
    compute_reward,
    get_reward,
    register_reward,
    reward_names,
    unregister_reward,
)
from nemotron_jax.rewards.reward_pool import RewardPool, score_batch
from nemotron_jax.rewards.sandbox import SandboxResult, SandboxStatus, run_sandboxed, sandbox_capabilities
from nemotron_jax.rewards.scoring import ScoredBatch, ScoreStats, available_cpus, score_in_process

__all__ = [
    "CodeTestReport",
    "SandboxResult",
    "SandboxStatus",
    "code_reward",
    "code_reward_batch",
    "extract_code_block",
    "run_code_tests",
    "run_sandboxed",
    "sandbox_capabilities",
    "IFEVAL_INSTRUCTION_IDS",
    "OPEN_INSTRUCT_INSTRUCTION_IDS",
    "InstructionFollowingResult",
    "MathVerifyTimeout",
    "RewardEntry",
    "RewardPool",
    "ScoreStats",
    "ScoredBatch",
    "available_cpus",
    "compute_reward",
    "extract_choice",
    "extract_final_answer",
    "extract_math_answer",
    "find_boxed_contents",
    "get_reward",
    "instruction_following_reward",
    "instruction_following_score",
    "last_boxed_content",
    "last_code_block",
    "math_reward",
    "mcqa_reward",
    "register_instruction",
    "register_reward",
    "reward_names",
    "score_batch",
    "score_in_process",
    "unregister_reward",
]

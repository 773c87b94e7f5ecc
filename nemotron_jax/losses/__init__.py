"""losses layer of nemotron-jax: pure, jittable functions over arrays (see DESIGN.md).

Per-token arrays are `[B, T]` (B sequences, response tokens selected by a mask), per-sequence arrays `[B]`.
Losses take their normalisers (`num_tokens`, `num_sequences`, `max_tokens`) as inputs so that micro-batch
losses add up to the full-batch loss; see `aggregation.aggregate_loss`.
"""

from nemotron_jax.losses.advantages import group_advantages
from nemotron_jax.losses.aggregation import AGGREGATIONS, aggregate_loss, token_and_sequence_counts
from nemotron_jax.losses.distillation import LMHeadInputs, TopKLogits, distillation_kl, distillation_loss
from nemotron_jax.losses.kl import kl_penalty
from nemotron_jax.losses.logprobs import (
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    token_logprobs_reference,
)
from nemotron_jax.losses.mopd import mopd_loss
from nemotron_jax.losses.policy_gradient import importance_weights, policy_gradient_loss
from nemotron_jax.losses.sft import sft_loss

__all__ = [
    "AGGREGATIONS",
    "LMHeadInputs",
    "TopKLogits",
    "aggregate_loss",
    "distillation_kl",
    "distillation_loss",
    "group_advantages",
    "importance_weights",
    "kl_penalty",
    "mopd_loss",
    "policy_gradient_loss",
    "sft_loss",
    "token_and_sequence_counts",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_logprobs_reference",
]

"""Logit-level distillation: forward / reverse / mixed KL over the full vocabulary or the teacher's top-k.

Inputs for each model are either logits `[B, T, V]` (small cases), or the final hidden states with the output
projection, `LMHeadInputs(hidden [B, T, D], lm_head [D, V])`, in which case the work is chunked like
`token_logprobs` and the `[B, T, V]` logits are never built. The teacher can also arrive as its precomputed
top-k, `TopKLogits(logits [B, T, K], indices [B, T, K])` (what a separate teacher worker sends).

Per token, with p_S and p_T the student and teacher next-token distributions:
  forward = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
  reverse = KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
  mixed   = w * forward + (1 - w) * reverse     (w = mixed_forward_weight, default 0.5)
With top-k (NeMo-RL's default semantics, without its optional `zero_outside_topk` tail term), the sums run
over the teacher's k most likely tokens only, and both distributions are renormalised over that support:
p_T = softmax(teacher logits at the k ids), p_S = softmax(student logits at the same ids).

The teacher is a constant: no gradient flows into any teacher input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nemotron_jax.losses import _checks
from nemotron_jax.losses._chunked_kl import chunked_kl, chunked_top_k, gather_student_logits
from nemotron_jax.losses._chunking import sequence_rows
from nemotron_jax.losses.aggregation import aggregate_loss, check_aggregation
from nemotron_jax.losses.logprobs import DEFAULT_CHUNK_SIZE, DEFAULT_TOKEN_CHUNK_SIZE

KL_DIRECTIONS = ("forward", "reverse", "mixed")


class LMHeadInputs(NamedTuple):
    """A model's final hidden states and output projection, standing for its logits `hidden @ lm_head`."""

    hidden: jax.Array  # [B, T, D] float32 or bf16
    lm_head: jax.Array  # [D, V]


class TopKLogits(NamedTuple):
    """A teacher's k largest logits per position and their vocabulary ids."""

    logits: jax.Array  # [B, T, K] float
    indices: jax.Array  # [B, T, K] int, in [0, V)


def _as_arrays(model: Any) -> Any:
    if isinstance(model, (TopKLogits, LMHeadInputs)):
        return type(model)(*(jnp.asarray(field) for field in model))
    if isinstance(model, tuple):
        return model  # rejected with a clear message by _describe
    return jnp.asarray(model)


def _describe(name: str, model: Any) -> tuple[str, tuple[int, ...], int | None]:
    """Validates one model input; returns (kind, leading shape, vocabulary size or None)."""
    if isinstance(model, TopKLogits):
        _checks.check_floating(f"{name}.logits", model.logits)
        _checks.check_integer(f"{name}.indices", model.indices)
        _checks.check_same_shape(f"{name}.indices", model.indices, f"{name}.logits", model.logits)
        if jnp.ndim(model.logits) < 2:
            raise ValueError(f"{name}.logits must be [..., K], got shape {jnp.shape(model.logits)}")
        return "top_k", tuple(jnp.shape(model.logits)[:-1]), None
    if isinstance(model, LMHeadInputs):
        _checks.check_floating(f"{name}.hidden", model.hidden)
        _checks.check_floating(f"{name}.lm_head", model.lm_head)
        _checks.check_rank(f"{name}.lm_head", model.lm_head, 2)
        if jnp.ndim(model.hidden) < 2 or jnp.shape(model.hidden)[-1] != jnp.shape(model.lm_head)[0]:
            raise ValueError(
                f"{name}.hidden must be [..., D] with D = {name}.lm_head.shape[0] = "
                f"{jnp.shape(model.lm_head)[0]}, got {jnp.shape(model.hidden)}"
            )
        return "hidden", tuple(jnp.shape(model.hidden)[:-1]), int(jnp.shape(model.lm_head)[1])
    if isinstance(model, tuple):
        raise ValueError(f"{name} is a plain tuple; wrap (hidden, lm_head) in LMHeadInputs or "
                         "(logits, indices) in TopKLogits")
    _checks.check_floating(f"{name} logits", model)
    if jnp.ndim(model) < 2:
        raise ValueError(f"{name} logits must be [..., V], got shape {jnp.shape(model)}")
    return "logits", tuple(jnp.shape(model)[:-1]), int(jnp.shape(model)[-1])


def _kl_from_log_probs(student_log_p, teacher_log_p, forward_weight):
    """Per-position KL over the last axis of two normalised log-distributions."""
    forward = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    reverse = jnp.sum(jnp.exp(student_log_p) * (student_log_p - teacher_log_p), axis=-1)
    return forward_weight * forward + (1.0 - forward_weight) * reverse


def distillation_kl(
    student: jax.Array | LMHeadInputs,
    teacher: jax.Array | LMHeadInputs | TopKLogits,
    *,
    kind: str = "reverse",
    mixed_forward_weight: float | None = None,
    top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = DEFAULT_TOKEN_CHUNK_SIZE,
    precision: Any = None,
) -> jax.Array:
    """Per-position KL between student and teacher next-token distributions (see the module docstring).

    Args:
      student: logits `[B, T, V]` or `LMHeadInputs(hidden [B, T, D], lm_head [D, V])`.
      teacher: logits `[B, T, V]`, `LMHeadInputs`, or `TopKLogits` (implies top-k KL over its K ids).
      kind: "forward", "reverse" or "mixed".
      mixed_forward_weight: weight of the forward KL in "mixed" (default 0.5); only allowed with "mixed".
      top_k: None for the full vocabulary (student and teacher must then both be logits or both
        LMHeadInputs), or k: KL over the teacher's k largest logits, computed from the teacher's logits or,
        chunked, from its LMHeadInputs. With a `TopKLogits` teacher, top_k must be None or equal to its K.
      chunk_size, token_chunk_size, precision: tiling and matmul precision for LMHeadInputs (see
        `token_logprobs_and_entropy`).

    Returns:
      `[B, T]` float32 (the leading shape of the inputs). Gradients reach only the student.

    Raises:
      ValueError: unknown kind, bad weight, mismatched shapes or vocabularies, unsupported input combination.
    """
    _checks.check_choice("kind", kind, KL_DIRECTIONS)
    if kind == "mixed":
        forward_weight = 0.5 if mixed_forward_weight is None else mixed_forward_weight
        if not _checks.is_concrete_number(forward_weight):
            raise ValueError(f"mixed_forward_weight must be a Python float, got {forward_weight!r}")
        _checks.check_number("mixed_forward_weight", forward_weight, minimum=0.0, maximum=1.0)
        forward_weight = float(forward_weight)
    elif mixed_forward_weight is not None:
        raise ValueError(f"mixed_forward_weight is only used with kind='mixed', got kind={kind!r}")
    else:
        forward_weight = 1.0 if kind == "forward" else 0.0
    _checks.check_chunk_sizes(chunk_size, token_chunk_size)

    student, teacher = _as_arrays(student), _as_arrays(teacher)
    student_kind, student_shape, vocab_size = _describe("student", student)
    if student_kind == "top_k":
        raise ValueError("student must be logits or LMHeadInputs, not TopKLogits")
    teacher_kind, teacher_shape, teacher_vocab = _describe("teacher", teacher)
    if teacher_shape != student_shape:
        raise ValueError(f"teacher positions {teacher_shape} do not match student positions {student_shape}")
    if teacher_vocab is not None and teacher_vocab != vocab_size:
        raise ValueError(f"teacher vocabulary size {teacher_vocab} != student vocabulary size {vocab_size}")
    if teacher_kind == "top_k":
        num_ids = jnp.shape(teacher.logits)[-1]
        if top_k is not None and top_k != num_ids:
            raise ValueError(f"top_k={top_k} but the TopKLogits teacher carries K={num_ids} ids")
        top_k = num_ids
    if top_k is not None:
        _checks.check_positive_int("top_k", top_k)
        if top_k > vocab_size:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}")

    # Token blocks of the chunked paths cut across the rows of [B, T]: a sharded batch axis stays sharded.
    rows = sequence_rows(student_shape)
    if top_k is None:
        if student_kind != teacher_kind:
            raise ValueError(
                "full-vocabulary KL needs student and teacher both as logits or both as LMHeadInputs, got "
                f"{student_kind} and {teacher_kind}; pass top_k, or convert one of them"
            )
        if student_kind == "logits":
            dtype = _checks.compute_dtype(student, teacher)
            student_log_p = jax.nn.log_softmax(jnp.asarray(student, dtype), axis=-1)
            teacher_log_p = jax.nn.log_softmax(lax.stop_gradient(jnp.asarray(teacher, dtype)), axis=-1)
            return _kl_from_log_probs(student_log_p, teacher_log_p, forward_weight)
        student_hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
        teacher_hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        if student_hidden.shape[0] == 0:
            return jnp.zeros(student_shape, _checks.compute_dtype(student_hidden, student.lm_head))
        kl = chunked_kl(
            student_hidden, student.lm_head, lax.stop_gradient(teacher_hidden),
            lax.stop_gradient(teacher.lm_head), forward_weight, chunk_size, token_chunk_size, precision, rows,
        )
        return kl.reshape(student_shape)

    # Teacher top-k support.
    if teacher_kind == "top_k":
        teacher_logits, teacher_ids = teacher.logits, teacher.indices
    elif teacher_kind == "logits":
        teacher_logits, teacher_ids = lax.top_k(lax.stop_gradient(teacher), top_k)
    else:
        hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        teacher_logits, teacher_ids = chunked_top_k(hidden, teacher.lm_head, top_k, chunk_size, token_chunk_size,
                                                    precision, rows)
        teacher_logits = teacher_logits.reshape(student_shape + (top_k,))
        teacher_ids = teacher_ids.reshape(student_shape + (top_k,))
    teacher_ids = teacher_ids.astype(jnp.int32)
    if student_kind == "logits":
        student_logits = jnp.take_along_axis(student, teacher_ids, axis=-1)
    else:
        hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
        student_logits = gather_student_logits(hidden, student.lm_head, teacher_ids.reshape(-1, top_k), precision,
                                               rows)
        student_logits = student_logits.reshape(student_shape + (top_k,))
    dtype = _checks.compute_dtype(student_logits, teacher_logits)
    student_log_p = jax.nn.log_softmax(student_logits.astype(dtype), axis=-1)
    teacher_log_p = jax.nn.log_softmax(lax.stop_gradient(teacher_logits).astype(dtype), axis=-1)
    return _kl_from_log_probs(student_log_p, teacher_log_p, forward_weight)


def distillation_loss(
    student: jax.Array | LMHeadInputs,
    teacher: jax.Array | LMHeadInputs | TopKLogits,
    mask: jax.Array,
    *,
    kind: str = "reverse",
    mixed_forward_weight: float | None = None,
    top_k: int | None = None,
    aggregation: str = "token_mean",
    num_tokens: Any = None,
    num_sequences: Any = None,
    max_tokens: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = DEFAULT_TOKEN_CHUNK_SIZE,
    precision: Any = None,
) -> jax.Array:
    """Logit-level distillation loss: `distillation_kl` aggregated over the valid tokens of `mask`.

    Args:
      student, teacher, kind, mixed_forward_weight, top_k, chunk_size, token_chunk_size, precision: see
        `distillation_kl`.
      mask: `[B, T]` bool/numeric, the positions distilled.
      aggregation, num_tokens, num_sequences, max_tokens: see `aggregate_loss` (default: global token mean,
        as NeMo-RL's DistillationLossFn).

    Returns:
      float32 scalar loss; its gradient reaches only the student.
    """
    check_aggregation(aggregation)
    kl = distillation_kl(
        student, teacher, kind=kind, mixed_forward_weight=mixed_forward_weight, top_k=top_k,
        chunk_size=chunk_size, token_chunk_size=token_chunk_size, precision=precision,
    )
    mask = _checks.as_array(mask)
    _checks.check_same_shape("mask", mask, "the student's [B, T] positions", kl)
    return aggregate_loss(kl, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
                          max_tokens=max_tokens)

"""Memory and accuracy of the chunked token log-probs against the naive full-logits version.

    python -m experiments.benchmarks.token_logprobs_memory --out=/tmp/token_logprobs_memory.json

Reports, from `jax.jit(...).lower(...).compile().memory_analysis()` at T tokens x V vocabulary x D hidden
(default 8192 x 131072 x 1024, float32): the temporary, argument and output bytes of forward-only and of
forward+gradient (w.r.t. hidden and lm_head), chunked and naive, plus the chunked logit-distillation KL. Then
it runs the chunked forward+gradient once at that size (wall time, peak RSS), and compares chunked against
naive values and gradients at a smaller size where the naive version fits comfortably.
"""

from __future__ import annotations

import json
import resource
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.losses import LMHeadInputs, distillation_kl, token_logprobs_and_entropy, token_logprobs_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the JSON report.", required=True)
flags.DEFINE_integer("tokens", 8192, "T (one sequence of T tokens).")
flags.DEFINE_integer("vocab", 131072, "V.")
flags.DEFINE_integer("hidden", 1024, "D.")
flags.DEFINE_integer("chunk_size", 4096, "Vocabulary columns per tile.")
flags.DEFINE_integer("token_chunk_size", 8192, "Tokens per tile.")
flags.DEFINE_bool("run_full", True, "Also run the chunked forward+gradient once at the full size.")
flags.DEFINE_integer("compare_tokens", 1024, "T for the chunked-vs-naive accuracy comparison.")
flags.DEFINE_integer("compare_vocab", 16384, "V for the accuracy comparison.")
flags.DEFINE_integer("compare_chunk_size", 3000, "Vocabulary chunk for the comparison (a tail on purpose).")

MIB = 2**20


def memory_report(function, *shapes) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*shapes).compile()
    stats = compiled.memory_analysis()
    return {
        "temp_mib": stats.temp_size_in_bytes / MIB,
        "argument_mib": stats.argument_size_in_bytes / MIB,
        "output_mib": stats.output_size_in_bytes / MIB,
        "alias_mib": stats.alias_size_in_bytes / MIB,
        "compile_s": time.perf_counter() - start,
    }


def objective_chunked(hidden, lm_head, targets):
    logprobs, entropy = token_logprobs_and_entropy(
        hidden, lm_head, targets, chunk_size=FLAGS.chunk_size, token_chunk_size=FLAGS.token_chunk_size
    )
    return jnp.sum(logprobs) + 0.1 * jnp.sum(entropy)


def objective_naive(hidden, lm_head, targets):
    logprobs, entropy = token_logprobs_reference(hidden, lm_head, targets)
    return jnp.sum(logprobs) + 0.1 * jnp.sum(entropy)


def main(argv):
    del argv
    tokens, vocab, hidden_size = FLAGS.tokens, FLAGS.vocab, FLAGS.hidden
    shapes = (
        jax.ShapeDtypeStruct((1, tokens, hidden_size), jnp.float32),
        jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32),
        jax.ShapeDtypeStruct((1, tokens), jnp.int32),
    )
    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    report = {
        "device": str(jax.devices()[0]),
        "size": {"tokens": tokens, "vocab": vocab, "hidden": hidden_size, "dtype": "float32",
                 "chunk_size": FLAGS.chunk_size, "token_chunk_size": FLAGS.token_chunk_size},
        "logits_mib": tokens * vocab * 4 / MIB,
        "lm_head_grad_mib": hidden_size * vocab * 4 / MIB,
        "compiled": {
            "chunked_forward": memory_report(objective_chunked, *shapes),
            "chunked_forward_and_grad": memory_report(grad(objective_chunked), *shapes),
            "naive_forward": memory_report(objective_naive, *shapes),
            "naive_forward_and_grad": memory_report(grad(objective_naive), *shapes),
        },
    }
    # Logit-level distillation, full vocabulary, student and teacher of the same size.
    student_and_teacher = shapes[:2] + shapes[:2]

    def distill(hidden, lm_head, teacher_hidden, teacher_head):
        kl = distillation_kl(LMHeadInputs(hidden, lm_head), LMHeadInputs(teacher_hidden, teacher_head),
                             kind="mixed", chunk_size=FLAGS.chunk_size, token_chunk_size=FLAGS.token_chunk_size)
        return jnp.sum(kl)

    report["compiled"]["chunked_distillation_kl_forward_and_grad"] = memory_report(grad(distill),
                                                                                   *student_and_teacher)
    print(json.dumps(report["compiled"], indent=1), flush=True)

    if FLAGS.run_full:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        hidden = jax.random.normal(keys[0], shapes[0].shape, jnp.float32)
        lm_head = jax.random.normal(keys[1], shapes[1].shape, jnp.float32) / np.sqrt(hidden_size)
        targets = jax.random.randint(keys[2], shapes[2].shape, 0, vocab)
        step = jax.jit(grad(objective_chunked))
        start = time.perf_counter()
        compiled = step.lower(hidden, lm_head, targets).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        value, (hidden_grad, lm_head_grad) = jax.block_until_ready(compiled(hidden, lm_head, targets))
        report["full_run"] = {
            "compile_s": compile_s,
            "forward_and_grad_wall_s": time.perf_counter() - start,
            "value": float(value),
            "all_finite": bool(jnp.isfinite(value) & jnp.all(jnp.isfinite(hidden_grad))
                               & jnp.all(jnp.isfinite(lm_head_grad))),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        del hidden, lm_head, hidden_grad, lm_head_grad
        print(json.dumps(report["full_run"], indent=1), flush=True)

    # Accuracy against the naive version at a size where it is cheap.
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    small_tokens, small_vocab = FLAGS.compare_tokens, FLAGS.compare_vocab
    hidden = jax.random.normal(keys[0], (2, small_tokens // 2, hidden_size), jnp.float32)
    lm_head = 3.0 * jax.random.normal(keys[1], (hidden_size, small_vocab), jnp.float32) / np.sqrt(hidden_size)
    targets = jax.random.randint(keys[2], (2, small_tokens // 2), 0, small_vocab)

    def outputs(values_fn):
        def objective(h, w):
            logprobs, entropy = values_fn(h, w)
            return jnp.sum(logprobs) + 0.1 * jnp.sum(entropy), (logprobs, entropy)

        (_, (logprobs, entropy)), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
            hidden, lm_head
        )
        return {"logprobs": logprobs, "entropy": entropy, "hidden_grad": grads[0], "lm_head_grad": grads[1]}

    chunked = outputs(lambda h, w: token_logprobs_and_entropy(h, w, targets, chunk_size=FLAGS.compare_chunk_size,
                                                              token_chunk_size=small_tokens // 3))
    naive = outputs(lambda h, w: token_logprobs_reference(h, w, targets))
    report["accuracy_vs_naive"] = {
        "size": {"tokens": small_tokens, "vocab": small_vocab, "hidden": hidden_size,
                 "chunk_size": FLAGS.compare_chunk_size, "token_chunk_size": small_tokens // 3},
        "max_abs_diff": {name: float(jnp.max(jnp.abs(chunked[name] - naive[name]))) for name in chunked},
        "max_abs_naive": {name: float(jnp.max(jnp.abs(naive[name]))) for name in naive},
    }
    print(json.dumps(report["accuracy_vs_naive"], indent=1), flush=True)
    with open(FLAGS.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    app.run(main)

r"""A five-minute tour on a laptop CPU: tokenizer, chat template, a checkpoint written by transformers loaded
into `NemotronH`, logit parity, and generation with per-token log-probs.

    python -m experiments.demo [--workdir=/tmp/nemotron_demo] [--max_new_tokens=16]

The model is a random tiny `nemotron_h` (all four layer kinds), so the generated text is noise; the point
is that every piece of the real pipeline runs and agrees with the reference implementation.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags, logging

import nemotron_jax as nj
from nemotron_jax.data import render_chat, train_sentencepiece

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where to write the demo checkpoint (default: a temporary directory).")
flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")

_CORPUS = [
    "Solve for x: 2x + 3 = 11. The answer is \\boxed{4}.",
    "Write a haiku about state space models and attention.",
    "Mixture-of-experts layers route each token to a few experts.",
    "Reinforcement learning with verifiable rewards improves reasoning.",
    "def add(a, b):\n    return a + b",
] * 20


def _write_transformers_checkpoint(directory: str, vocab_size: int) -> None:
    """A random tiny NemotronHForCausalLM (the `tiny` preset) saved by transformers itself, in the released
    on-disk format."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = nj.ModelConfig.preset("tiny", vocab_size=vocab_size, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    NemotronHForCausalLM(NemotronHConfig(**cfg.to_hf_config())).save_pretrained(directory)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="nemotron_demo_")
    checkpoint = os.path.join(workdir, "hf_checkpoint")

    tokenizer = train_sentencepiece(_CORPUS, vocab_size=384)
    print(f"1. trained a SentencePiece tokenizer: {tokenizer.vocab_size} pieces")

    if not os.path.exists(checkpoint):
        _write_transformers_checkpoint(checkpoint, tokenizer.vocab_size)
    print(f"2. transformers wrote {checkpoint}: {sorted(os.listdir(checkpoint))}")

    cfg, params = nj.load_hf(checkpoint)
    print(f"3. loaded into NemotronH: pattern {cfg.layer_pattern!r}, {nj.count_params(cfg):,} parameters")

    prompt = render_chat([{"role": "user", "content": "Solve for x: 2x + 3 = 11."}], tokenizer,
                         enable_thinking=True, add_generation_prompt=True)
    print(f"4. chat prompt ({len(prompt.token_ids)} tokens): {prompt.text!r}")

    try:
        import torch
        from transformers import NemotronHForCausalLM

        reference = NemotronHForCausalLM.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            want = reference(torch.from_numpy(np.asarray([prompt.token_ids], np.int64))).logits.numpy()
        got = np.asarray(nj.NemotronH(cfg).apply({"params": params}, np.asarray([prompt.token_ids], np.int32)))
        print(f"5. logits vs transformers: max |diff| = {np.abs(got - want).max():.2e} "
              f"(max |logit| {np.abs(want).max():.2f})")
    except ImportError:
        print("5. (transformers not installed: parity check skipped)")

    start = time.time()
    out = nj.generate(cfg, params, [list(prompt.token_ids)], max_new_tokens=FLAGS.max_new_tokens,
                      temperature=FLAGS.temperature, seed=FLAGS.seed, stop_token_ids=[tokenizer.eos_id])
    print(f"6. generated {len(out.tokens[0])} tokens in {time.time() - start:.1f}s (incl. compilation): "
          f"{tokenizer.decode(out.tokens[0])!r}")
    print(f"   log-probs: {np.round(out.logprobs[0], 2).tolist()}")


if __name__ == "__main__":
    app.run(main)

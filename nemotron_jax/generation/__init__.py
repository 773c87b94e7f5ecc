"""Generation layer: caches, prefill, the jitted decode loop, sampling and per-token log-probs."""

from nemotron_jax.generation.generate import GenerationOutput, generate, left_pad
from nemotron_jax.generation.sampling import sample_tokens, sampling_logprobs

__all__ = ["GenerationOutput", "generate", "left_pad", "sample_tokens", "sampling_logprobs"]

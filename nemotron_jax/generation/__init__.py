"""Generation layer: caches, prefill, the jitted decode loop, sampling, per-token log-probs, routing capture.

    out = nj.generate(cfg, params, prompts, max_new_tokens=..., temperature=1.0, top_p=1.0, top_k=0,
                      stop_token_ids=None, n=1, seed=0, return_routing=False)   # -> GenerationOutput (lists)
    arrays = generate_arrays(cfg, params, prompts, max_new_tokens=..., ...)      # -> GenerationArrays
        # padded jax arrays for trainers: tokens / logprobs / sampling_logprobs [B*n, N], lengths [B*n],
        # finished [B*n], prompt_tokens [B, P] (left-padded), prompt_lengths [B], routing
        # [B*n, num_moe_layers, P + N, k] or None; row i*n + j is sample j of prompt i.
    expert_ids = replay_expert_ids(cfg, routing [B, num_moe_layers, T, k])      # for NemotronH.apply(expert_ids=)

See `generate.py` for how the prefill is shared by the n samples and what each log-prob means.
"""

from nemotron_jax.generation.generate import (
    GenerationArrays,
    GenerationOutput,
    generate,
    generate_arrays,
    left_pad,
    moe_layer_names,
    replay_expert_ids,
)
from nemotron_jax.generation.sampling import MIN_TEMPERATURE, check_sampling_args, sample_tokens, sampling_logprobs

__all__ = [
    "GenerationArrays",
    "GenerationOutput",
    "MIN_TEMPERATURE",
    "check_sampling_args",
    "generate",
    "generate_arrays",
    "left_pad",
    "moe_layer_names",
    "replay_expert_ids",
    "sample_tokens",
    "sampling_logprobs",
]

"""nemotron-jax: post-training the Nemotron-H hybrid Mamba-2 / attention / MoE model in JAX.

    import nemotron_jax as nj
    cfg = nj.ModelConfig.preset("tiny")
    model = nj.NemotronH(cfg)
    cfg, params = nj.load_hf("path/to/hf_checkpoint_dir")
    out = nj.generate(cfg, params, [[1, 2, 3]], max_new_tokens=8, temperature=0.0)
"""

from nemotron_jax.checkpoint import CheckpointError, load_hf, save_hf
from nemotron_jax.generation import GenerationOutput, generate
from nemotron_jax.model import ModelConfig, NemotronH, count_active_params, count_params, init_params

__all__ = ["ModelConfig", "NemotronH", "load_hf", "save_hf", "CheckpointError", "count_params",
           "count_active_params", "init_params", "generate", "GenerationOutput"]

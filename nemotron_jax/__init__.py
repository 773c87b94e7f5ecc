"""nemotron-jax: post-training the Nemotron-H hybrid Mamba-2 / attention / MoE model in JAX.

    import nemotron_jax as nj
    cfg = nj.ModelConfig.preset("tiny")
    model = nj.NemotronH(cfg)
    cfg, params = nj.load_hf("path/to/hf_checkpoint_dir")
    out = nj.generate(cfg, params, [[1, 2, 3]], max_new_tokens=8, temperature=0.0)

The top-level names are imported on first use, so that `import nemotron_jax.rewards` (e.g. in every reward
worker process) does not pay for JAX, Flax and the model.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "nemotron_jax.model",
    "NemotronH": "nemotron_jax.model",
    "count_params": "nemotron_jax.model",
    "count_active_params": "nemotron_jax.model",
    "init_params": "nemotron_jax.model",
    "load_hf": "nemotron_jax.checkpoint",
    "save_hf": "nemotron_jax.checkpoint",
    "CheckpointError": "nemotron_jax.checkpoint",
    "generate": "nemotron_jax.generation",
    "GenerationOutput": "nemotron_jax.generation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nemotron_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""Model layer: `ModelConfig` and the `NemotronH` hybrid Mamba-2 / attention / MoE stack (Flax Linen)."""

from nemotron_jax.model.config import ModelConfig
from nemotron_jax.model.nemotron_h import NemotronH, init_cache
from nemotron_jax.model.layer_stack import layer_plan, stack_layers, unstack_layers
from nemotron_jax.model.params import abstract_params, count_active_params, count_params, init_params

__all__ = ["ModelConfig", "NemotronH", "init_cache", "abstract_params", "count_params", "count_active_params", "init_params",
           "layer_plan", "stack_layers", "unstack_layers"]

"""Checkpoint layer: Hugging Face safetensors import/export and Orbax save/restore of params."""

from nemotron_jax.checkpoint.hf import load_hf, save_hf, tensor_mappings
from nemotron_jax.checkpoint.orbax_params import restore_params, save_params
from nemotron_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["load_hf", "save_hf", "tensor_mappings", "save_params", "restore_params", "CheckpointError"]

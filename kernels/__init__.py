"""Kernel layer (installed as `nemotron_jax.kernels`): grouped matmuls for MoE dispatch.

No Flax and no model knowledge here. Every kernel has a plain-JAX reference that tests compare against.
"""

"""Multi-host initialisation and global batches assembled from per-process shards.

JAX's multi-controller runtime: every process runs the same program; `jax.distributed.initialize` connects
them (through process 0's coordinator), after which `jax.devices()` lists every process's devices and a mesh
spans them all. Each process feeds only its own rows (the data pipeline shards by `jax.process_index()`), and
`global_batch` stitches the per-process rows into one array sharded over the mesh.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from nemotron_jax.parallel.sharding import batch_sharding


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize`, with CPU collectives between processes switched on (gloo by default).

    With no arguments JAX reads the cluster's environment (SLURM, Open MPI, Cloud TPU, Kubernetes ...).
    Must run before any JAX computation.
    """
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process rows `[B_local, ...]` -> global arrays `[B_local * process_count, ...]` with rows split over
    (data, fsdp, expert); process p's rows are global rows `[p * B_local, (p + 1) * B_local)` when the mesh
    orders devices by process (as `make_mesh` does)."""
    out: dict[str, Any] = {}
    for name, array in local.items():
        array = np.asarray(array)
        sharding = batch_sharding(mesh, array.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, array)
    return out

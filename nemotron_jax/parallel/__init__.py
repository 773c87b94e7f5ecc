"""parallel layer of nemotron-jax (see DESIGN.md): meshes, logical-axis sharding rules, `shard_map` expert
parallelism, multi-host initialisation.

    mesh = parallel.make_mesh("fsdp=2,expert=2,tensor=2")         # Auto axes data, fsdp, expert, tensor
    params = parallel.init_sharded_params(cfg, jax.random.key(0), mesh)   # created in place, never gathered
    with parallel.activate(mesh):                                   # trace under the mesh and the rules
        logits = jax.jit(model.apply)({"params": params}, tokens)   # MoE layers: expert parallel
"""

from nemotron_jax.parallel import expert_parallel
from nemotron_jax.parallel.distributed import global_batch, initialize
from nemotron_jax.parallel.expert_parallel import TRANSPORTS, expert_parallel_dispatch, resolve_transport
from nemotron_jax.parallel.mesh import (
    BASE_AXES,
    DATA,
    EXPERT,
    FSDP,
    TENSOR,
    MeshConfig,
    batch_axes,
    describe,
    make_mesh,
    mesh_axis_size,
)
from nemotron_jax.parallel.sharding import (
    PARAM_LOGICAL_AXES,
    MeshJit,
    activate,
    batch_sharding,
    batch_spec,
    check_batch,
    logical_axes_of,
    logical_rules,
    logical_to_spec,
    param_logical_axes,
    param_sharding,
    param_sharding_fn,
    param_shardings,
    tree_shardings,
)
from nemotron_jax.parallel.placement import init_sharded_params, validate_mesh

expert_parallel.register()

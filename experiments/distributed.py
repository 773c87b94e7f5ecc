"""Multi-host flags shared by the entry points, and the call to `jax.distributed.initialize`.

    --coordinator_address=host:port --num_processes=N --process_id=i    explicit (e.g. on localhost)
    --distributed=auto                                                 the cluster's environment (SLURM, Open MPI,
                                                                       Cloud TPU, ...): JAX detects it

Import this module before `app.run` so that its flags are defined; call `initialize()` first thing in `main`,
before any JAX computation.
"""

from __future__ import annotations

from absl import flags

flags.DEFINE_string("coordinator_address", None, "Multi-host: address (host:port) of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
flags.DEFINE_enum("distributed", "off", ["off", "auto"], "Multi-host: 'auto' initialises from the cluster's "
                  "environment (jax.distributed.initialize() with no arguments); implied by --coordinator_address.")
flags.DEFINE_string("cpu_collectives", "gloo", "Collectives between processes on CPU (jax_cpu_collectives_"
                    "implementation): 'gloo' (bundled with jaxlib) or 'mpi'.")

FLAGS = flags.FLAGS


def initialize() -> bool:
    """Calls `jax.distributed.initialize` if the flags ask for it; returns whether it did."""
    explicit = FLAGS.coordinator_address is not None
    if not explicit and FLAGS.distributed == "off":
        if FLAGS.num_processes not in (None, 1) or FLAGS.process_id not in (None, 0):
            raise ValueError("--num_processes / --process_id need --coordinator_address (or --distributed=auto)")
        return False
    from nemotron_jax.parallel.distributed import initialize as initialize_jax

    initialize_jax(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                   cpu_collectives=FLAGS.cpu_collectives)
    return True

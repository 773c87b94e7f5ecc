"""Orbax checkpoints of a stage: the whole `TrainState` plus JSON (data iterator state, counters).

`StageCheckpoints` wraps `ocp.CheckpointManager` (asynchronous saves every `save_every` steps, the last `keep`
kept). Stage finals and teachers are separate, permanent `checkpoint.save_params` directories (see cascade).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp


class StageCheckpoints:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoints: save_every and keep must be >= 1, got {save_every}, {keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "extra"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Starts a save of `state` (a pytree of arrays) and `extra` (JSON) at `step`; returns whether it saves
        (`save_every` decides unless `force`)."""
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                extra=ocp.args.JsonSave(extra)), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, extra) saved at `step`; `abstract_state` gives the tree, shapes, dtypes (and shardings)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       extra=ocp.args.JsonRestore()))
        return restored["state"], restored["extra"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

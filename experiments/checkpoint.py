"""Orbax checkpoints of a training run: the full ``nnx.State`` (model and
optimizer, including the step counter), a small JSON of run metadata and, when
given, the Grain data iterator's state (one JSON file per process)."""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves every ``every`` steps (and when forced), keeps the latest ``keep``."""

    def __init__(self, directory: str | Path, every: int, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, data=None, *, force: bool = False):
        """Saves ``state`` (an ``nnx.State``), ``meta`` (JSON-able) and the state of
        ``data`` (a `grain.DatasetIterator`, or None) if ``step`` is due."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def meta(self, step: int) -> dict:
        """The run metadata saved with ``step`` (without reading the state)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like, data=None):
        """``(state, meta)`` of ``step``; ``like`` gives the state's structure and
        shapes. ``data`` (a `grain.DatasetIterator`, or None) is set to its saved
        state in place."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def close(self):
        """Waits for pending (asynchronous) saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

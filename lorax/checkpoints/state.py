"""Adapter-only training checkpoints with Orbax: the trainable tree, optimizer state and step."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``{"step", "trainable", "opt_state"}`` under ``<workdir>/checkpoints``.

    The frozen base is never written: a checkpoint of LoRA on MiniLM is ~0.2 MB, not 90 MB.
    Orbax writes each step into a temporary directory and renames it when complete, so a
    killed run leaves at worst an unfinished temporary that is ignored on restore.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(os.fspath(workdir), "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Starts an asynchronous save of ``state`` at ``step`` (returns before it is on disk)."""
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, state_like: dict[str, Any] | None, step: int | None = None) -> dict[str, Any]:
        """Restores step ``step`` (default: the latest).

        Args:
          state_like: a tree of arrays or shape/dtype/sharding specs to restore into; None
            restores the saved tree as it was written (for inspecting a run).
          step: which checkpoint; None means the latest.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        logging.info("restoring checkpoint step %d from %s", step, self.directory)
        if state_like is None:
            return self.manager.restore(step, args=ocp.args.StandardRestore())
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

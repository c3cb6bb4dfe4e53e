"""Adapter-only training checkpoints with Orbax: the trainable tree, optimizer state and step.

Each checkpoint holds two items: ``state`` (the tree, through Orbax's StandardSave) and
``integrity`` (a JSON record of the tree's structure, shapes, dtypes and a sha256 of its bytes,
taken on the host at save time). Restoring recomputes the digest, so a checkpoint whose files
were truncated, bit-flipped or partly deleted after Orbax committed it is detected instead of
silently resuming from wrong numbers; :meth:`Checkpointer.restore_latest_good` then moves it
aside and falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorax import paths

log = logging.getLogger(__name__)

STATE, INTEGRITY = "state", "integrity"


def _drop_closed_loop_noise() -> None:
    """Installs (once) an unraisable-exception hook that drops ``RuntimeError('Event loop is
    closed')``: when a restore fails on a damaged OCDBT node, TensorStore's outstanding reads
    complete later into Orbax's already-closed event loop, and each prints such a traceback
    (~160 for one run), burying the one line that says which checkpoint was set aside. Every
    other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_lorax_drops_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._lorax_drops_closed_loop = True
    sys.unraisablehook = hook


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files cannot be read, or do not hash to what was saved."""


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint whose tree does not fit the state it is restored into."""


def _leaves_like(tree: Any) -> dict[str, Any]:
    """Leaves (arrays or shape/dtype specs) by path (:func:`lorax.paths.key_str`: the same
    whether the containers are dicts, tuples or named tuples, as a checkpoint restored without
    a target comes back as dicts), in path order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return dict(sorted(((paths.key_str(path), x) for path, x in flat), key=lambda kv: kv[0]))


def _dtype_name(x) -> str:
    """The dtype of an array, a shape/dtype spec, or a Python scalar (as NumPy stores it)."""
    return np.dtype(x.dtype).name if hasattr(x, "dtype") else np.asarray(x).dtype.name


def fingerprint(tree: Any) -> dict[str, Any]:
    """Structure, shapes, dtypes and a sha256 over the bytes of every leaf of ``tree``.

    The digest is None when a leaf is not fully addressable from this process (a multi-host
    run): no process sees all the bytes, so such checkpoints are checked for layout only.
    """
    leaves = _leaves_like(tree)
    layout = {k: [list(np.shape(x)), _dtype_name(x)] for k, x in leaves.items()}
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves.values()):
        return {"sha256": None, "leaves": layout}
    h = hashlib.sha256()
    for key, x in leaves.items():
        x = np.asarray(jax.device_get(x))
        h.update(f"{key}:{x.dtype.name}:{x.shape};".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return {"sha256": h.hexdigest(), "leaves": layout}


class Checkpointer:
    """Saves and restores ``{"step", "trainable", "opt_state"}`` under ``<workdir>/checkpoints``.

    The frozen base is never written: a checkpoint of LoRA on MiniLM is ~0.2 MB, not 90 MB.
    Orbax writes each step into a temporary directory and renames it when complete, so a
    killed run leaves at worst an unfinished temporary that is ignored on restore.
    Checkpoints found corrupt are moved to ``<workdir>/checkpoints-corrupt/`` (never deleted).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 2,
        writable: bool = True,
        name: str = "checkpoints",
    ):
        """``writable``: check at once that checkpoints can be written (a training run), not
        at the first save; False for reading a finished run (which may be read-only).
        ``name``: the folder under ``workdir`` (``best`` for ``train.keep_best``'s one)."""
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.name = name
        self.directory = os.path.join(self.workdir, name)
        _drop_closed_loop_noise()
        if writable:
            _check_writable(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Starts an asynchronous save of ``state`` at ``step`` (returns before it is on disk).

        The fingerprint is taken here, synchronously, so the caller may donate ``state`` to
        its next step as soon as this returns.
        """
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                INTEGRITY: ocp.args.JsonSave(fingerprint(state)),
            }
        )
        self.manager.save(step, args=args)

    def restore(self, state_like: dict[str, Any] | None, step: int | None = None) -> dict[str, Any]:
        """Restores step ``step`` (default: the latest) and checks it against its fingerprint.

        Args:
          state_like: a tree of arrays or shape/dtype/sharding specs to restore into; None
            restores the saved tree as it was written (for inspecting a run).
          step: which checkpoint; None means the latest.

        Raises:
          FileNotFoundError: no checkpoint at all.
          CorruptCheckpointError: unreadable, or the bytes differ from what was saved.
          IncompatibleCheckpointError: readable, but its tree does not fit ``state_like``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = os.path.join(self.directory, str(step))
        try:
            saved = self.manager.restore(
                step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore())
            )
            saved = dict(saved[INTEGRITY])
        except Exception as e:  # noqa: BLE001 -- any read failure means the files are bad
            raise CorruptCheckpointError(
                f"{where}: its integrity record is unreadable ({_first_line(e)})"
            ) from e
        if state_like is not None:
            self._check_fits(state_like, saved["leaves"], where)
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)
            restore = ocp.args.StandardRestore(abstract)
        else:
            restore = ocp.args.StandardRestore()
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**{STATE: restore}))[STATE]
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"{where}: its arrays cannot be read ({_first_line(e)})"
            ) from e
        got = fingerprint(state)["sha256"] if saved["sha256"] else None
        if got != saved["sha256"]:
            raise CorruptCheckpointError(
                f"{where}: its arrays hash to {got[:12]}..., but {saved['sha256'][:12]}... "
                "was saved (files changed or damaged after the save)"
            )
        return state

    @staticmethod
    def _check_fits(state_like, saved_leaves: dict[str, list], where: str) -> None:
        # A leaf as "float32[4, 3]", the same string from an array, a spec or a saved layout.
        want = {
            k: f"{_dtype_name(x)}{list(np.shape(x))}" for k, x in _leaves_like(state_like).items()
        }
        got = {k: f"{dtype}{list(shape)}" for k, (shape, dtype) in saved_leaves.items()}
        paths.check_tree(
            got,
            want,
            where=where,
            missing="{where} has no leaf {path}, which the run needs",
            unexpected="{where} has a leaf {path} the run does not",
            mismatch="{where}: leaf {path} is {got}; the run needs {want}",
            error=IncompatibleCheckpointError,
        )

    def restore_latest_good(self, state_like: dict[str, Any]) -> tuple[dict | None, list[str]]:
        """Restores the newest checkpoint that is intact; corrupt ones are moved aside.

        Returns:
          ``(state, notes)``: the restored state (None when no good checkpoint is left) and
          one line per checkpoint set aside, for the caller to print.

        Raises:
          IncompatibleCheckpointError: the newest readable checkpoint does not fit
            ``state_like`` (a different config); nothing is moved in that case.
        """
        notes = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(state_like, step), notes
            except CorruptCheckpointError as e:
                moved = self._set_aside(step)
                notes.append(f"checkpoint at step {step} is corrupt ({e}); moved to {moved}")
                log.warning(notes[-1])
        return None, notes

    def _set_aside(self, step: int) -> str:
        aside = os.path.join(self.workdir, f"{self.name}-corrupt")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager."""
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_writable(directory: str) -> None:
    """Raises PermissionError naming ``directory`` unless a file can be created in it."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory; checkpoints go there")
    probe = os.path.join(directory, f".write-check-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"{directory} is not writable ({e.strerror}); the run could not save a checkpoint. "
            "Make it writable, or give the run another workdir"
        ) from None


def _first_line(e: Exception, limit: int = 200) -> str:
    """The head of an exception's message (TensorStore's run to pages of spec)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."

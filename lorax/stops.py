"""What a run that stops early tells its user, in one line: a NaN/Inf loss (which of its kept
checkpoints is *good*, saved before the loss had climbed: :func:`nonfinite_advice`) or Ctrl-C
(which checkpoint a rerun resumes from: :func:`interrupted`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from lorax import cli


class NonFiniteLossError(cli.UserError):
    """The loss became NaN or Inf and the config says to stop (a user error: the command
    lines print it as one line)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says which checkpoint a rerun of the same command
    resumes from."""


def interrupted(ckpt) -> Interrupted:
    """The :class:`Interrupted` to raise for a run cut off by Ctrl-C, naming the latest step
    of ``ckpt`` (a :class:`lorax.checkpoints.state.Checkpointer` whose pending save has
    landed)."""
    last = ckpt.latest_step()
    if last is None:
        return Interrupted(
            "interrupted before the first checkpoint; rerun the same command to start again"
        )
    return Interrupted(
        f"interrupted; last checkpoint step {last} in {ckpt.directory}: rerun the same command "
        "to resume from it"
    )


def good_checkpoint(steps: Sequence[int], losses: Sequence[tuple[int, float | None]]):
    """The newest of the checkpoint ``steps`` that is *good*, or None.

    Good means the training loss last logged at or before it (``losses``: the run's
    ``(step, mean training loss)`` rows in order) is finite and at most twice the first one
    the run logged. A diverging run's loss climbs before it turns NaN (weights of 1e29 still
    give a finite loss), so the newest checkpoint of a run stopped by a NaN is often already
    ruined; one whose loss is still near where the run started (twice: room for the noise of
    a short log window; a classifier at twice its starting loss is worse than guessing) was
    learning, not diverging. A checkpoint saved before any logged loss cannot be judged, so
    is not good.
    """
    if not losses or losses[0][1] is None or not np.isfinite(losses[0][1]):
        return None
    limit = 2 * losses[0][1]
    for step in sorted(steps, reverse=True):
        before = [loss for at, loss in losses if at <= step]
        if before and before[-1] is not None and np.isfinite(before[-1]) and before[-1] <= limit:
            return step
    return None


def nonfinite_advice(ckpt, losses=None) -> str:
    """The end of a NaN/Inf message: the last good checkpoint of ``ckpt`` (a
    :class:`lorax.checkpoints.state.Checkpointer`: its ``all_steps()`` and ``directory``) by
    :func:`good_checkpoint` over ``losses`` (None: the newest one), and what to do."""
    steps = ckpt.all_steps()
    todo = (
        "Lower train.learning_rate (or check the data) and start afresh (a new --workdir), or "
        "set train.skip_nonfinite=True to skip such batches."
    )
    if not steps:
        return f"Last good checkpoint: none in {ckpt.directory}. {todo}"
    good = steps[-1] if losses is None else good_checkpoint(steps, losses)
    bad = [s for s in steps if good is None or s > good]
    why = ""
    if bad and not (losses and losses[0][1] is not None):
        why = f" (no training loss was logged before the kept step(s) {bad}: none can be judged)"
    elif bad:
        why = (
            f" (kept checkpoint(s) at step(s) {bad} were saved after the training loss had "
            f"climbed past twice where it started, {losses[0][1]:.4g}: diverged, not good)"
        )
    where = "none" if good is None else f"step {good}"
    return f"Last good checkpoint: {where} in {ckpt.directory}{why}. {todo}"


def logged_losses(log) -> list[tuple[int, float | None]]:
    """``(step, loss)`` of the training rows already in ``log`` (a
    :class:`lorax.runfiles.MetricsLog` or None), e.g. a resumed run's."""
    rows = []
    if log is not None and os.path.exists(log.path):
        with open(log.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("split") == "train" and "loss" in row:
                    rows.append((row["step"], row["loss"]))
    return rows

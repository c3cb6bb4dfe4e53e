"""``train.keep_best``: the best checkpoint so far by a validation metric, in ``<workdir>/best``.

Each periodic validation evaluation (and the final state's) is offered; one that beats the
kept value is saved as an Orbax checkpoint of ``{"trainable", "value", "step"}`` (one kept),
the value stored with the arrays, so a killed run resumes knowing its best, and
``lorax.export`` / ``lorax.predict`` read it (:func:`lorax.runs.restore_trainable`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lorax.checkpoints.state import Checkpointer, CorruptCheckpointError

# train.keep_best name -> (the evaluation's key, +1 when higher is better, the evaluations
# that report it: "classify", "lm" (tokens), "choice" for an LM task scored by its choices'
# likelihoods (no token perplexity, but a confusion matrix, hence macro-F1), "pairs" for
# preference pairs (a reward model's or a DPO run's: preference accuracy and loss)
METRICS = {
    "validation_accuracy": ("accuracy", 1, ("classify", "lm", "choice", "pairs")),
    "validation_loss": ("loss", -1, ("classify", "lm", "choice", "pairs")),
    "validation_macro_f1": ("macro_f1", 1, ("classify", "choice")),
    "validation_perplexity": ("perplexity", -1, ("lm",)),
}


def check(name: str, kind: str, eval_every: int, task: str = "") -> None:
    """Raises naming ``train.keep_best`` unless it is empty or a metric of :data:`METRICS`
    that the validation of a ``kind`` run on task ``task`` reports, with periodic evaluations
    to choose among."""
    if not name:
        return
    from lorax.data.causal import CAUSAL_TASKS, ChoiceTask

    scored_by_choices = kind == "lm" and isinstance(CAUSAL_TASKS.get(task), ChoiceTask)
    pairs = kind == "reward" or task == "preferences"
    evaluated = "choice" if scored_by_choices else "pairs" if pairs else kind
    valid = sorted(m for m, (_, _, kinds) in METRICS.items() if evaluated in kinds)
    if name not in valid:
        what = f"the validation of task {task!r}" if task else "this run's validation"
        if scored_by_choices:
            what += " (scored by its choices' likelihoods: no token perplexity)"
        if pairs:
            what += " (preference pairs: accuracy and loss)"
        raise ValueError(
            f"train.keep_best = {name!r} is not valid: {what} does not report it; choose one "
            f"of {valid} (or '' to keep the last checkpoint)"
        )
    if not eval_every:
        raise ValueError(
            f"train.keep_best = {name!r} chooses among the periodic validation evaluations; "
            "set eval_every > 0"
        )


class Best:
    """The kept best of one run: :meth:`offer` each evaluation, :meth:`trainable` at the end."""

    def __init__(self, workdir: str, name: str):
        self.metric = name
        self.key, self.sign, _ = METRICS[name]
        self.ckpt = Checkpointer(workdir, keep=1, name="best")
        self.value: float | None = None
        self.step: int | None = None
        self.notes: list[str] = []
        if self.ckpt.latest_step() is not None:
            try:
                saved = self.ckpt.restore(None)
                self.value, self.step = float(saved["value"]), int(saved["step"])
            except CorruptCheckpointError as e:
                moved = self.ckpt._set_aside(self.ckpt.latest_step())
                self.notes.append(f"the best checkpoint is corrupt ({e}); moved to {moved}")

    def offer(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> bool:
        """Saves ``state``'s trainable tree as the best if ``metrics`` beat the kept value
        (strictly: a tie keeps the earlier step); returns whether it did. A NaN or infinite
        value is kept only while nothing else is (any finite one then beats it), so a run
        whose every evaluation was non-finite still ends with a kept checkpoint to report."""
        value = float(metrics[self.key])
        if not np.isfinite(value):
            if self.value is not None:
                return False
        elif self.value is not None and np.isfinite(self.value):
            if self.sign * value <= self.sign * self.value:
                return False
        tree = {
            "trainable": state["trainable"],
            "value": np.asarray(value, np.float64),
            "step": np.asarray(step, np.int64),
        }
        self.ckpt.save(step, tree)
        self.value, self.step = value, step
        return True

    def trainable(self) -> dict[str, Any]:
        """The best checkpoint's trainable tree (numpy), once its save is on disk."""
        self.ckpt.wait()
        return self.ckpt.restore(None, self.step)["trainable"]

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step, "value": self.value,
                "directory": os.path.relpath(self.ckpt.directory, self.ckpt.workdir)}  # fmt: skip

    def close(self) -> None:
        """Waits for a save in flight, then releases the checkpoint manager."""
        self.ckpt.close()

    def __enter__(self) -> Best:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_for(workdir: str, train_config):
    """A :class:`Best` for a run with ``train.keep_best``, else a context holding None."""
    import contextlib

    name = train_config.get("keep_best") or ""
    return Best(workdir, name) if name else contextlib.nullcontext()

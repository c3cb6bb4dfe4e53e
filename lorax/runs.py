"""A finished (or checkpointed) run, read back from its workdir alone: its config, its model
and its trained trees, for export, generation and analysis."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from lorax import lora, methods, paths
from lorax import setup as setup_lib
from lorax.checkpoints.state import Checkpointer, CorruptCheckpointError


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run's ``config.json``; FileNotFoundError when ``workdir`` is no lorax.train run."""
    path = os.path.join(os.fspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no config.json: is it a lorax.train workdir?")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); it records the run's config") from None


def kept_best(workdir: str | os.PathLike) -> bool:
    """Whether the run kept a best checkpoint (``train.keep_best``), which it is read from."""
    best = os.path.join(os.fspath(workdir), "best")
    return os.path.isdir(best) and any(name.isdigit() for name in os.listdir(best))


def restore_trainable(workdir: str | os.PathLike) -> dict[str, Any]:
    """The newest intact checkpoint's ``{"delta", "head"}`` as numpy arrays (either may be
    empty); for a run with ``train.keep_best``, its best checkpoint's. See
    :func:`restore_latest`."""
    return restore_latest(workdir)[1]


def restore_latest(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """``(step, {"delta", "head"})`` of the newest intact checkpoint of a run (numpy arrays;
    of its best checkpoints for a run with ``train.keep_best``).

    A corrupt newer checkpoint is skipped with a warning naming it (nothing is moved: the
    run may be read-only; its next training session sets it aside).

    Raises:
      FileNotFoundError: the run holds no checkpoint.
      ValueError: every checkpoint it holds is corrupt (each named).
    """
    name = "best" if kept_best(workdir) else "checkpoints"
    ckpt = Checkpointer(os.fspath(workdir), writable=False, name=name)
    try:
        steps, damaged = ckpt.all_steps(), []
        if not steps:
            raise FileNotFoundError(f"{workdir} holds no checkpoint ({ckpt.directory})")
        for step in reversed(steps):
            try:
                trainable = ckpt.restore(None, step)["trainable"]
                break
            except CorruptCheckpointError as e:
                damaged.append(str(e))
        else:
            raise ValueError(
                f"{workdir}: no intact checkpoint to read ({'; '.join(damaged)}); rerun the "
                "training command on this workdir to train it again"
            )
    finally:
        ckpt.close()
    for note in damaged:
        warn(f"skipped a damaged checkpoint: {note}; using step {step}")
    trainable = {"delta": trainable.get("delta") or {}, "head": trainable.get("head") or {}}
    return step, jax.tree_util.tree_map(np.asarray, trainable)


def warn(message: str) -> None:
    """A warning to the user of a command line, on stderr (beside progress bars)."""
    tqdm.tqdm.write(f"warning: {message}", file=sys.stderr)


def load_run(workdir: str | os.PathLike):
    """``(config, setup, trainable)`` of a run: its saved config, model and latest state.

    The run's mesh was for the machine it trained on; reading it back needs no particular
    one, so the setup is built on every local device as data parallel.

    Raises:
      FileNotFoundError: the workdir has no ``config.json`` or no checkpoint.
    """
    config = read_config(workdir)
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    step, trainable = restore_latest(workdir)  # before the model: a bad run fails fast
    setup = setup_lib.build(config, with_task=False)
    total = config.train.num_steps
    if step < total and not os.path.exists(os.path.join(os.fspath(workdir), "summary.json")):
        warn(
            f"{workdir} is unfinished: its latest checkpoint is step {step} of {total} "
            f"(train.num_steps); this uses that partly trained model. Rerun its training "
            "command to finish it"
        )
    return config, setup, trainable


def load_adapter(workdir: str, base: dict) -> tuple[dict, lora.LoraSpec]:
    """``(delta, spec)`` of a LoRA run's latest checkpoint, laid out like ``base``.

    The spec comes from the run's own ``config.json``, so adapters with other targets and
    ranks than the current config load as they were trained; a delta trained with
    ``model.scan`` on is unstacked for a base with it off, and the other way round.

    Raises:
      FileNotFoundError: no config.json or no checkpoint in ``workdir``.
      ValueError: the run was not a LoRA run, or its delta does not fit ``base``.
    """
    run_config = read_config(workdir)
    if run_config.method != "lora":
        raise ValueError(
            f"--adapter={workdir} is a method = {run_config.method!r} run; generation takes "
            "LoRA adapters (export a full or partial fine-tuning run with --merged instead)"
        )
    if run_config.train.get("objective") == "reward":
        raise ValueError(
            f"--adapter={workdir} is a reward model (train.objective = 'reward'): its adapter "
            "was trained to score texts through its score head, not to write them; score with "
            f"python -m lorax.predict --workdir={workdir}"
        )
    spec = methods.lora_spec(run_config.lora)
    delta = jax.tree_util.tree_map(jax.numpy.asarray, restore_trainable(workdir)["delta"])
    scanned = any(paths.is_stacked(p) for p in paths.flatten(base))
    delta = paths.stack_layers(delta) if scanned else paths.unstack_layers(delta)
    try:
        lora.wrap(base, delta, spec)
    except ValueError as e:
        raise ValueError(f"--adapter={workdir} does not fit this model: {e}") from None
    return delta, spec

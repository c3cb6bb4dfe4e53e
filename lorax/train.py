"""Fine-tunes a pretrained model: ``python -m lorax.train --config=configs/FILE.py``.

The core is :func:`train_and_evaluate`, which tests and notebooks call directly; ``main`` only
parses flags (and joins a multi-host run when ``mesh.distributed``). What a run is made of is
built by :mod:`lorax.setup`, its step by :mod:`lorax.step`, and it is driven by the host loop
every run shares (:mod:`lorax.loop`, also behind the multi-adapter jobs of :mod:`lorax.multi`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import tqdm
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lorax import cli, configdoc, dpo, loop, lora, paths, runfiles, runlock, sharding, stops
from lorax import data as data_lib
from lorax import setup as setup_lib
from lorax.checkpoints import best as best_lib
from lorax.checkpoints.state import Checkpointer
from lorax.runfiles import MetricsLog


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config``, evaluates on validation and test, and returns the summary.

    Writes ``metrics.jsonl``, ``summary.json``, ``config.json`` and adapter-only checkpoints
    into ``workdir``; rerunning on the same workdir resumes from its last checkpoint, and a
    finished run (alone or from a multi-adapter job) just returns its summary. A workdir that
    holds no checkpoint and no summary (a run stopped by a NaN loss, an error or Ctrl-C before
    its first checkpoint) may be rerun with a changed config: :func:`restart_unsaved`.
    """
    start = time.time()
    primary = jax.process_index() == 0  # on several hosts, one writes the run's files
    new = not os.path.exists(workdir)
    # One writer per workdir (lorax.runlock); its config is written once and a rerun with a
    # config that would change the result is refused before anything else happens.
    with runlock.hold(workdir) if primary else contextlib.nullcontext():
        os.makedirs(workdir, exist_ok=True)
        try:
            data_lib.resolve_labels(config)  # config.json names the classes
            if primary:
                restart_unsaved(workdir, config)
                runfiles.write_config_once(workdir, config)
            tqdm.tqdm.write(f"loading {config.model.name} and the {config.task.name} data "
                            "(tokenizing every split) ...")  # fmt: skip
            setup = setup_lib.build(config)
        except Exception:
            if new and primary:  # a run that never started leaves no workdir behind
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return _train(config, setup, workdir, primary, start)


def restart_unsaved(workdir: str, config) -> str | None:
    """Lets a rerun with a changed config start afresh in a workdir where nothing was saved.

    A workdir whose ``config.json`` differs from ``config`` but that holds no checkpoint and
    no ``summary.json`` has nothing trained to mislabel, so its ``config.json`` and
    ``metrics.jsonl`` are moved into ``<workdir>/unsaved-<time>/`` (kept for reference) and
    the run starts at step 0 with the new config. Returns that directory, or None when
    nothing moved (a new workdir, the same config, or a run with a checkpoint: that one keeps
    its config, :func:`lorax.runfiles.write_config_once`).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or os.path.exists(os.path.join(workdir, "summary.json")):
        return None
    # a single run's checkpoints, its kept best (train.keep_best), a multi-adapter job's
    for sub in ("checkpoints", "best", "job"):
        d = os.path.join(workdir, sub)
        if os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d)):
            return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None  # write_config_once names the damaged file
    if not runfiles.config_changes(old, json.loads(config.to_json_best_effort())):
        return None
    aside = os.path.join(workdir, f"unsaved-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "timing.json"):
        if os.path.exists(os.path.join(workdir, name)):
            shutil.move(os.path.join(workdir, name), os.path.join(aside, name))
    tqdm.tqdm.write(
        f"{workdir} held no checkpoint (its run stopped before the first one); starting it "
        f"afresh with this config; its old config.json and metrics.jsonl are in {aside}"
    )
    return aside


def _train(config, setup: setup_lib.Setup, workdir: str, primary: bool, start: float) -> dict:
    done = loop.finished(workdir)
    if done is not None:
        return done
    # Closed on every way out, a Ctrl-C included: close() waits for the save in flight.
    with (
        Checkpointer(workdir, keep=config.keep_checkpoints) as ckpt,
        best_lib.open_for(workdir, config.train) as best,
    ):
        stepper = loop.Stepper(setup, config, workdir)
        frozen = setup.frozen
        tqdm.tqdm.write(
            f"trainable parameters: {config.method} {lora.count(setup.delta):,}, "
            f"head {lora.count(setup.head):,} "
            f"(frozen base {setup.base_params:,}); {setup.mesh.devices.size} "
            f"{jax.devices()[0].platform} device(s), mesh {sharding.describe(setup.mesh)}, "
            f"frozen base {sharding.bytes_per_device(frozen) / 2**20:.1f} MiB per device of "
            f"{paths.nbytes(frozen) / 2**20:.1f} MiB"
        )
        cut = {s: setup.task.counts.get(f"{s}/truncated", 0) for s in setup.task.splits}
        if any(cut.values()):
            tqdm.tqdm.write(
                f"examples cut to task.max_length = {config.task.max_length} tokens: "
                + ", ".join(f"{s} {n:,} of {len(setup.task.splits[s]):,}" for s, n in cut.items())
            )
        log = None
        if primary:
            log = MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                             runfiles.tensorboard_dir(workdir, config))  # fmt: skip
        try:
            result = loop.run(stepper, stepper.init_state(), ckpt, [log], best)
        except KeyboardInterrupt:
            ckpt.wait()  # the save in flight lands: the message names it
            raise stops.interrupted(ckpt) from None
        summary = loop.make_summary(
            config, setup, stepper.adapter(result.state, 0), result, 0, start
        )
        if setup.objective == "dpo":  # its step against an SFT step's on the same rows
            sft = setup_lib.make_forward(dataclasses.replace(setup, objective="lm"))
            summary.update(dpo.memory_compared(setup, stepper, result.state, result.first_step,
                                               summary["step_memory_bytes"], sft))  # fmt: skip
        if primary:
            loop.write_summary(workdir, summary)
            log.close()
        return summary


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Defines --config and --workdir; only when run as a program, so importing this module
    (e.g. from lorax.generate) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_string(
        "workdir", None, "Run directory (default: runs/<config file name without .py>)."
    )
    flags.DEFINE_bool(
        "print_config", False, "Print every config field, its value and its comment, and exit."
    )
    flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    if flags.FLAGS.print_config:
        print(configdoc.describe(flags.FLAGS.config))
        return
    if flags.FLAGS.config.mesh.distributed:  # before anything touches a device
        sharding.initialize_distributed(flags.FLAGS.config.mesh)
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = flags.FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_path))[0]
    )
    summary = train_and_evaluate(flags.FLAGS.config, workdir)
    print(f"\nworkdir: {workdir}")
    for k in (
        "validation_accuracy",
        "test_accuracy",
        "validation_perplexity",  # LM token splits only
        "test_perplexity",
        "validation_margin",  # reward models: mean r_chosen - r_rejected
        "test_margin",
        "lora_params",
        "head_params",
        "base_params",
        "wall_seconds",
        "tokens_per_second",
    ):
        if k not in summary:
            continue
        v = summary[k]
        print(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.train")

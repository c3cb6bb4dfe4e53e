"""Times fine-tuning methods' train steps side by side on a real model and task:
``python -m benchmarks.methods --model=minilm-l6 --task=snli --methods=lora,dora,adalora``.

Each method is set up as ``experiments.methods`` trains it (its row of ``METHOD_RUNS`` over the
study's base config), with the trainer's own jitted step (``lorax.loop.Stepper``). The steps
are timed in rounds, each method's ``--steps`` in turn per round, so that whatever else the
machine does falls on every method alike; the figure is the median over all rounds of one
step's wall time (the update finished, ``block_until_ready``), beside XLA's memory accounting
of the compiled step. The record (device, versions, date, command) is appended to
``benchmarks/results/<date>-methods-<model>-<task>.jsonl``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import jax
from absl import app, flags

from benchmarks import records
from experiments import methods as methods_study
from experiments import sweep


def build(label: str, model: str, task: str, overrides: dict[str, Any]):
    """A method's Stepper, state and first batch, set up as ``experiments.methods`` trains it."""
    from lorax import loop
    from lorax import setup as setup_lib

    config = sweep.base_config(model, task)
    run = {**methods_study.SHARED, **methods_study.METHOD_RUNS[label], **overrides}
    config = sweep.apply_overrides(config, run)
    stepper = loop.Stepper(setup_lib.build(config), config, label)
    state = stepper.init_state()
    stepper.jit(state)
    batch, _ = stepper.batch(0)
    return stepper, state, batch


def measure(labels, model: str, task: str, steps: int, rounds: int, overrides) -> dict:
    """``{label: {"step_ms", "step_memory_mib", "compile_s"}}`` from interleaved rounds."""
    runs, times, out = {}, {label: [] for label in labels}, {}
    for label in labels:
        stepper, state, batch = build(label, model, task, overrides)
        start = time.perf_counter()
        state, _ = stepper.step(state, batch)  # compile + first step
        jax.block_until_ready(state)
        out[label] = {"compile_s": time.perf_counter() - start,
                      "step_memory_mib": stepper.memory_bytes(state, batch) / 2**20}  # fmt: skip
        runs[label] = [stepper, state, batch]
    for _ in range(rounds):
        for label in labels:
            stepper, state, batch = runs[label]
            for _ in range(steps):
                start = time.perf_counter()
                state, _ = stepper.step(state, batch)
                jax.block_until_ready(state)
                times[label].append(time.perf_counter() - start)
            runs[label][1] = state
    for label in labels:
        out[label]["step_ms"] = 1e3 * statistics.median(times[label])
        out[label]["steps_timed"] = len(times[label])
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    labels = [m for m in f.methods.split(",") if m]
    unknown = sorted(set(labels) - set(methods_study.METHOD_RUNS))
    if unknown:
        raise app.UsageError(
            f"--methods {unknown} unknown; valid: {list(methods_study.METHOD_RUNS)}"
        )
    overrides = {"train.batch_size": f.batch} if f.batch else {}
    figures = measure(labels, f.model, f.task, f.steps, f.rounds, overrides)
    base = figures[labels[0]]["step_ms"]
    lines = [f"| method | step ms (median) | × {labels[0]} | step memory MiB | compile s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, x in figures.items():
        lines.append(f"| {label} | {x['step_ms']:.0f} | {x['step_ms'] / base:.2f} | "
                     f"{x['step_memory_mib']:.0f} | {x['compile_s']:.1f} |")  # fmt: skip
    record = {
        "kind": "methods", "date": records.now().isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "command": " ".join(["python -m benchmarks.methods", *sys.argv[1:]]),
        "versions": records.versions("jax", "flax", "optax"), "methods": figures,
        # records.append names the file after args.model
        "args": {"model": f"methods-{f.model}-{f.task}", "steps": f.steps, "rounds": f.rounds},
    }  # fmt: skip
    path = records.append(record, f.results_dir)
    print("\n".join(lines))
    print(f"record appended to {path}")


if __name__ == "__main__":
    flags.DEFINE_string("model", "minilm-l6", "Model asset name.")
    flags.DEFINE_string("task", "snli", "Task name.")
    flags.DEFINE_string(
        "methods", "lora,dora,adalora", "Labels of experiments.methods.METHOD_RUNS."
    )
    flags.DEFINE_integer("steps", 10, "Steps of one method per round.")
    flags.DEFINE_integer("rounds", 5, "Rounds over the methods.")
    flags.DEFINE_integer("batch", 0, "Override train.batch_size (0 = the study's).")
    flags.DEFINE_string("results_dir", records.RESULTS_DIR, "Where the JSONL record goes.")
    app.run(main)

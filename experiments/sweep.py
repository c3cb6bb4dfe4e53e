"""Sweep machinery: expand a grid of runs, train them as multi-adapter jobs, resume, collect.

A study is a list of :class:`Run` (a name and config overrides) over a base config, cut into
jobs of at most ``max_adapters`` consecutive runs, each trained in one process over one copy of
the base (:func:`lorax.multi.train_many`). Runs whose ``summary.json`` exists are not trained
again and a job whose runs are all done is skipped, so an interrupted sweep resumes where it
stopped (a job cut off mid-way resumes from its own checkpoint). Everything lands under
``runs/sweeps/<study>/``: ``<run name>/`` per run (the single-run layout) and ``results.json``
(one row per finished run, rewritten atomically).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (model, task) -> the config file a study starts from: the demo-sized configs (the method
# comparison) and the CPU budget of the paper's Table 5 / 6 studies (configs/study_*.py).
BASE_CONFIGS = {
    ("minilm-l6", "snli"): "wq_wv_r4",
    ("minilm-l6", "rotten_tomatoes"): "rotten_tomatoes_wq_wv_r4",
    ("smollm2-135m", "snli_text"): "smollm2_snli_wq_wv_r4",
}
STUDY_CONFIGS = {
    **BASE_CONFIGS,
    ("minilm-l6", "snli"): "study_snli",
    ("minilm-l6", "rotten_tomatoes"): "study_rotten_tomatoes",
}


def alpha_overrides(rank: int, per_rank: bool) -> dict[str, float]:
    """LoRA's alpha in the paper's studies. The convention (Hu et al. 2021, §4.1): alpha is set
    once, to the first rank tried, and not retuned when r changes, so the scale alpha/r falls
    as r grows. lorax's studies keep the base config's ``lora.alpha`` (8, configs/base.py) at
    every rank, as the Table 5 configs (configs/wq_r8.py, ...) do: no override. ``per_rank``
    is the ablation alpha = 2r (scale 2 at every rank)."""
    return {"lora.alpha": 2.0 * rank} if per_rank else {}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a study: a name (its directory) and dotted config overrides."""

    name: str
    overrides: Mapping[str, Any]


def base_config(model: str, task: str, table=BASE_CONFIGS) -> ml_collections.ConfigDict:
    """The config a (model, task) study starts from (``table`` maps the pairs to config
    files); an error lists the pairs that exist."""
    if (model, task) not in table:
        raise ValueError(
            f"no base config for --model={model} --task={task}; available pairs: {sorted(table)}"
        )
    sys.path.insert(0, REPO)
    module = __import__(f"configs.{table[model, task]}", fromlist=["get_config"])
    return module.get_config()


def study_base(study: str, config: str, model: str, task: str, table) -> tuple[str, Any]:
    """``(study name, base config)``: from ``--config=FILE`` (named after the file) when given,
    else from the (model, task) pair's config in ``table``."""
    if config:
        from lorax import configdoc

        name = f"{study}_{os.path.splitext(os.path.basename(config))[0]}"
        return name, configdoc.load_file(config)
    return f"{study}_{model}_{task}", base_config(model, task, table)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
    """A copy of ``config`` with dotted overrides; an unknown key is a ValueError naming it."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        node, *parents, leaf = [config, *key.split(".")]
        for p in parents:
            if p not in node:
                raise ValueError(f"override {key}: {p!r} is not a config section")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"override {key}: {leaf!r} is not a field of its section")
        node[leaf] = value
    return config


def adapters_per_job(config: ml_collections.ConfigDict, requested: int) -> int:
    """How many adapters one job trains at once: ``requested`` if > 0, else an estimate from
    the device's memory (activations of one adapter's batch dominate; the base is shared)."""
    if requested > 0:
        return requested
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:  # CPU: no reported limit; a job of 8 keeps a 2-core machine busy enough
        return 8
    # ~34 bytes per token per width unit per layer of saved activations (fp32, no remat),
    # a rough upper bound for these models, with half the memory kept for the base and XLA.
    width, layers = 1024, 32
    per_adapter = 34 * config.train.batch_size * config.task.max_length * width * layers
    return max(1, int(0.5 * limit // per_adapter))


def run_study(
    study: str,
    runs: Sequence[Run],
    base: ml_collections.ConfigDict,
    *,
    root: str = "runs/sweeps",
    max_adapters: int = 0,
) -> list[dict[str, Any]]:
    """Trains every unfinished run of ``study`` and writes ``results.json``; returns its rows."""
    from lorax import multi, runlock

    out, configs, done = open_study(study, runs, base, root)
    with runlock.hold(out):  # one process per study (and each job locks its runs' workdirs)
        # Jobs are fixed slices of the whole grid, not of what is left: a job cut off after
        # some of its adapters were written resumes as the same job from its own checkpoint,
        # and train_many leaves the finished ones as they are.
        per_job = adapters_per_job(base, max_adapters)
        for start in range(0, len(runs), per_job):
            group = runs[start : start + per_job]
            if all(r.name in done for r in group):
                continue
            print(f"job of {len(group)} adapters: {', '.join(r.name for r in group)}")
            multi.train_many(
                [configs[r.name] for r in group], [os.path.join(out, r.name) for r in group]
            )
        return write_results(study, out, runs)


def open_study(
    study: str, runs: Sequence[Run], base: ml_collections.ConfigDict, root: str
) -> tuple[str, dict[str, ml_collections.ConfigDict], set[str]]:
    """``(out, configs, done)`` of a study about to train, whatever trains its runs: its
    directory ``<root>/<study>`` (made), each run's config by name (``base`` with the run's
    overrides, so a bad override fails before anything trains) and the names of the runs
    already finished; prints where the study stands."""
    out = os.path.join(root, study)
    os.makedirs(out, exist_ok=True)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study {study}: run names repeat: {names}")
    configs = {r.name: apply_overrides(base, r.overrides) for r in runs}
    done = {r.name for r in runs if finished(out, r)}
    print(f"{study}: {len(runs)} runs, {len(done)} done, {len(runs) - len(done)} to train")
    return out, configs, done


def finished(out: str, run: Run) -> bool:
    """Whether ``run`` of the study in ``out`` is done (its ``summary.json`` exists)."""
    return os.path.exists(os.path.join(out, run.name, "summary.json"))


def write_results(study: str, out: str, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Writes ``<out>/results.json`` (atomically): a row per finished run of ``runs``, in
    their order (:func:`collect`); returns the rows."""
    from lorax import runfiles

    rows = collect(out, runs)
    runfiles.write_json_atomic(os.path.join(out, "results.json"), {"study": study, "runs": rows})
    return rows


def collect(out: str, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per finished run: its name, overrides and the summary's headline numbers."""
    from lorax import loop

    rows = []
    for run in runs:
        if not finished(out, run):
            continue
        s = loop.finished(os.path.join(out, run.name))  # a damaged one is an error naming it
        rows.append({
            "name": run.name,
            "overrides": dict(run.overrides),
            **{k: s[k] for k in (
                "validation_accuracy", "test_accuracy", "lora_params", "head_params",
                "wall_seconds", "train_seconds", "platform",
            )},
            # newer summaries only (the method comparison's columns)
            **{k: s.get(k) for k in (
                "method", "delta_params", "base_bytes", "step_memory_bytes", "step_seconds_median",
                "adalora_kept_params", "adalora_ranks",
            )},
        })  # fmt: skip
    return rows


def main_for(study: str, grid, *, per_job: int = 0, target_sets: Sequence[str] = ()) -> None:
    """The command line of a study module: ``--model --task --seeds --steps --max_adapters
    --alpha_per_rank`` (and ``--targets`` where ``target_sets`` are given).

    ``grid(seeds, alpha_per_rank[, target_sets]) -> list[Run]`` builds the study's runs;
    ``per_job`` is the study's own job size (its grid is ordered so that jobs of that size
    stay the same jobs when a study is extended), 0 = sized to the device.
    """
    from absl import app, flags

    from lorax import cli

    flags.DEFINE_string("model", "minilm-l6", "Model asset name.")
    flags.DEFINE_string("task", "snli", "Task name.")
    flags.DEFINE_string("config", "", "A config file to study instead (e.g. your own task).")
    flags.DEFINE_integer("seeds", 3, "Seeds per grid point (0, 1, ...).")
    flags.DEFINE_integer("steps", 0, "Override train.num_steps (0 = the base config's).")
    flags.DEFINE_integer("max_adapters", per_job, "Adapters per job (0 = sized to the device).")
    flags.DEFINE_bool("alpha_per_rank", False, "Ablation: alpha = 2r instead of a fixed alpha.")
    flags.DEFINE_string("root", "runs/sweeps", "Where studies are written.")
    if target_sets:
        short = [t.replace(",", "") for t in target_sets]
        flags.DEFINE_list("targets", short, f"Target sets to run, of {short}.")

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        f = flags.FLAGS
        check_counts(f.seeds, f.steps)
        name, base = study_base(study, f.config, f.model, f.task, STUDY_CONFIGS)
        if f.steps and f.steps != base.train.num_steps:
            # a longer or shorter budget is a different study, never a resume of this one
            base.train.num_steps = f.steps
            name += f"_steps{f.steps}"
        name += "_alpha2r" if f.alpha_per_rank else ""
        if target_sets:
            by_short = {t.replace(",", ""): t for t in target_sets}
            unknown = sorted(set(f.targets) - set(by_short))
            if unknown:
                raise app.UsageError(f"--targets {unknown} unknown; valid: {sorted(by_short)}")
            runs = grid(f.seeds, f.alpha_per_rank, [by_short[t] for t in f.targets])
        else:
            runs = grid(f.seeds, f.alpha_per_rank)
        rows = run_study(name, runs, base, root=f.root, max_adapters=f.max_adapters)
        print(f"{len(rows)} results in {os.path.join(f.root, name, 'results.json')}")

    cli.run(run, f"experiments.{study}")  # a user error as one line, as lorax's commands


def check_counts(seeds: int, steps: int) -> None:
    """Refuses ``--seeds`` below 1 (a study of no runs) and ``--steps`` below 0 (0 = the base
    config's), before anything is made."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}: a study needs at least one seed (--seeds=1 or more)")
    if steps < 0:
        raise ValueError(f"--steps={steps} is not valid: a number of steps >= 1, or 0 for the "
                         "base config's train.num_steps")  # fmt: skip

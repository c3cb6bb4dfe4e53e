"""The paper's Table 2 question on our machines: every fine-tuning method, one config switch apart.

Run: python -m experiments.methods --model=minilm-l6 --task=snli --seeds=3 [--steps=N]
     python -m experiments.report        # renders the table into runs/sweeps/report.md

Each method trains from the same base config (``configs/wq_wv_r4.py`` for MiniLM/SNLI): the
same data order, seeds, steps, batch, head and head learning rate; only ``method`` (and that
method's own learning rate, the one knob each family is known to need) differs. QLoRA is LoRA
over a 4-bit NF4 base. Runs are single processes one after another (the methods' deltas have
different shapes, so they cannot share a multi-adapter job); a finished run (its
``summary.json`` exists) is not trained again, so an interrupted study resumes where it stopped.
Results land in ``runs/sweeps/methods_<model>_<task>/``: a directory per run and
``results.json`` with one row per finished run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from experiments import sweep

# method label -> overrides. Learning rates: LoRA's is the demo's; full and partial
# fine-tuning want a smaller step (the paper's RoBERTa/DeBERTa recipes, Hu et al. 2021 App. D);
# prompt-style methods a much larger one (Lester et al. 2021 use 0.3 with Adafactor).
METHOD_RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "lora_bf16": {"method": "lora", "model.base_dtype": "bfloat16"},  # QLoRA's usual reference
    "qlora": {"method": "lora", "model.quantize": "nf4"},
    # NF4 kernels with everything else (embeddings, norms) in bf16: against lora_bf16
    "qlora_bf16": {"method": "lora", "model.quantize": "nf4", "model.base_dtype": "bfloat16"},
    "dora": {"method": "lora", "lora.dora": True},  # LoRA's targets, rank and rate, + magnitudes
    "lora_plus": {"method": "lora", "lora.lr_ratio_b": 16.0},  # Hayou et al. 2024's suggestion
    # AdaLoRA at LoRA's final budget: initial rank 6, pruned to an average of 4 per kernel
    # (LoRA's r) over steps 20..160 of 200, every 10; orthogonality weight 0.1 (PEFT: 0.5)
    "adalora": {
        "method": "adalora",
        "lora.rank": 6,
        "adalora.target_r": 4,
        "adalora.tinit": 20,
        "adalora.tfinal": 40,
        "adalora.delta_t": 10,
        "adalora.orth_reg_weight": 0.1,
    },
    "full": {"method": "full", "train.learning_rate": 5e-5},
    "top_k_layers": {"method": "top_k_layers", "top_k_layers.k": 2, "train.learning_rate": 1e-4},
    "bitfit": {"method": "bitfit", "train.learning_rate": 1e-3},
    "adapter_houlsby": {"method": "adapter_houlsby", "adapter.size": 8},
    "adapter_lin": {"method": "adapter_lin", "adapter.size": 16},
    "prefix": {"method": "prefix", "prefix.length": 10, "train.learning_rate": 5e-3},
    "prompt": {"method": "prompt", "prompt.length": 20, "train.learning_rate": 3e-2},
    "ptuning": {"method": "ptuning", "ptuning.length": 20, "train.learning_rate": 1e-2},
}
# What every method shares beyond the base config: the head's own rate (so all heads learn
# alike) and a final evaluation only.
SHARED = {"train.head_learning_rate": 1e-3, "eval_every": 0}


def runs(methods: Sequence[str], seeds: int) -> list[sweep.Run]:
    """One run per (method, seed), named ``<method>_s<seed>``, seed by seed: a study cut
    short has every method at its first seeds rather than some methods at all of them."""
    unknown = sorted(set(methods) - set(METHOD_RUNS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {list(METHOD_RUNS)}")
    return [
        sweep.Run(f"{m}_s{s}", {**SHARED, **METHOD_RUNS[m], "seed": s})
        for s in range(seeds)
        for m in methods
    ]


def run_study(name: str, grid: Sequence[sweep.Run], base, root: str) -> list[dict[str, Any]]:
    """Trains each run that has not finished, one process after another, then writes and
    returns ``results.json`` rows (:mod:`experiments.sweep`'s study directory and rows)."""
    from lorax import train

    out, configs, done = sweep.open_study(name, grid, base, root)

    def write_results():  # after every run, so a long study can be reported while it runs
        every = [*grid, *_other_finished_runs(out, grid)]
        order = list(METHOD_RUNS)  # rows by method, then seed, whatever order they ran in
        every.sort(key=lambda r: (order.index(r.name.rsplit("_s", 1)[0]), r.overrides["seed"]))
        return sweep.write_results(name, out, every)

    for i, run in enumerate(grid):
        if run.name in done:
            continue
        print(f"[{i + 1}/{len(grid)}] {run.name}", flush=True)
        train.train_and_evaluate(configs[run.name], os.path.join(out, run.name))
        write_results()
    return write_results()


def _other_finished_runs(out: str, grid: Sequence[sweep.Run]) -> list[sweep.Run]:
    """Finished runs of the study that ``grid`` does not name (an earlier command's, e.g. more
    seeds of some methods), so results.json always holds every finished run."""
    names = {r.name for r in grid}
    found = []
    for entry in sorted(os.listdir(out)):
        m = re.match(r"^(?P<method>.+)_s(?P<seed>\d+)$", entry)
        if m and entry not in names and m["method"] in METHOD_RUNS:
            run = runs([m["method"]], int(m["seed"]) + 1)[-1]
            if sweep.finished(out, run):
                found.append(run)
    return found


def main() -> None:
    from absl import app, flags

    flags.DEFINE_string("model", "minilm-l6", "Model asset name.")
    flags.DEFINE_string("task", "snli", "Task name.")
    flags.DEFINE_string("config", "", "A config file to study instead (e.g. your own task).")
    flags.DEFINE_integer("seeds", 3, "Seeds per method (0, 1, ...).")
    flags.DEFINE_integer("steps", 0, "Override train.num_steps (0 = the base config's).")
    flags.DEFINE_list("methods", list(METHOD_RUNS), "Methods to run (labels of METHOD_RUNS).")
    flags.DEFINE_list(
        "set", [], "More overrides for every run, KEY=VALUE (e.g. task.max_test_examples=2000)."
    )
    flags.DEFINE_string("root", "runs/sweeps", "Where studies are written.")

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        f = flags.FLAGS
        sweep.check_counts(f.seeds, f.steps)
        name, base = sweep.study_base("methods", f.config, f.model, f.task, sweep.BASE_CONFIGS)
        if f.steps:
            base.train.num_steps = f.steps
        bad = [item for item in f.set if "=" not in item]
        if bad:
            raise ValueError(f"--set {bad}: give each override as KEY=VALUE")
        extra = dict(item.split("=", 1) for item in f.set)
        base = sweep.apply_overrides(base, {k: _literal(v) for k, v in extra.items()})
        rows = run_study(name, runs(f.methods, f.seeds), base, f.root)
        print(f"{len(rows)} results in {os.path.join(f.root, name, 'results.json')}")

    from lorax import cli

    cli.run(run, "experiments.methods")  # a user error as one line, as lorax's commands


def _literal(text: str) -> Any:
    """``"2000"`` -> 2000, ``"0.5"`` -> 0.5, ``"True"`` -> True, anything else as text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    main()

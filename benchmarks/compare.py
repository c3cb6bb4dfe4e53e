"""lorax beside PyTorch + PEFT, one model after another, in one table: what a GPU session runs.

``python -m benchmarks.compare [--models=gpt2-124m,llama-1b] [--multi=8] [--steps=20]``

Each model runs ``benchmarks.step`` (lora, multi xK, merged, full) and then
``benchmarks.peer_torch`` (eager, compile) as separate processes, so each framework has the
device to itself; both append their records to ``benchmarks/results/`` as usual and write
them alone to ``--out`` (default ``<results dir>/compare-<date>/``). Then this prints, as
Markdown, the tokens/s and peak memory of every mode, the ratios the issue's goals are stated
in, and whether each goal is met. ``--from=DIR`` renders the tables from the records in DIR,
running nothing: run one model per command where a command's time is limited, with the same
``--out``, then render both at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import records

Record = Mapping[str, Any]

# (model, goal, value, at least / at most, target): issue 5's goals on one GPU.
GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("gpt2-124m", "1. LoRA tokens/s vs PEFT + torch.compile", "lora/peft_compile", ">=", 1.5),
    ("gpt2-124m", "1. LoRA tokens/s vs PEFT eager", "lora/peft_eager", ">=", 3.0),
    ("llama-1b", "2. LoRA tokens/s vs PEFT + torch.compile", "lora/peft_compile", ">=", 1.2),
    ("gpt2-124m", "3. LoRA MFU (measured matmul peak)", "mfu_lora", ">=", 0.50),
    ("llama-1b", "3. LoRA MFU (measured matmul peak)", "mfu_lora", ">=", 0.65),
    ("gpt2-124m", "4. LoRA tokens/s vs full fine-tuning", "lora/full", ">=", 1.35),
    ("gpt2-124m", "4. LoRA peak memory vs full fine-tuning", "mem lora/full", "<=", 0.8),
    ("gpt2-124m", "5. K adapters at once vs one (tokens/s)", "multi/lora", ">=", 0.9),
    ("llama-1b", "5. K adapters at once vs one (tokens/s)", "multi/lora", ">=", 0.9),
)


def _mode(record: Record | None, prefix: str) -> Mapping[str, Any] | None:
    """The figures of the first mode whose name starts with ``prefix`` ("multi" is "multi xK")."""
    if record is None:
        return None
    for name, figures in record["modes"].items():
        if name.startswith(prefix):
            return figures
    return None


def _ratio(a: Mapping | None, b: Mapping | None, key: str) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def _memory(figures: Mapping | None) -> int | None:
    """Measured peak bytes; XLA's planned bytes where the device reports no peak (CPU)."""
    if figures is None:
        return None
    return figures.get("peak_bytes") or figures.get("xla_bytes")


def ratios(lorax: Record | None, peer: Record | None) -> dict[str, float | None]:
    """The goal figures of one model from its two records (None where a side is missing)."""
    lora = _mode(lorax, "lora")
    mem_lora, mem_full = _memory(lora), _memory(_mode(lorax, "full"))
    mem_peer = _memory(_mode(peer, "compile"))
    return {
        "lora/peft_compile": _ratio(lora, _mode(peer, "compile"), "tokens_per_s"),
        "lora/peft_eager": _ratio(lora, _mode(peer, "eager"), "tokens_per_s"),
        "lora/full": _ratio(lora, _mode(lorax, "full"), "tokens_per_s"),
        "lora/merged": _ratio(lora, _mode(lorax, "merged"), "tokens_per_s"),
        "multi/lora": _ratio(_mode(lorax, "multi"), lora, "tokens_per_s"),
        "mem lora/full": mem_lora / mem_full if mem_lora and mem_full else None,
        "mem lora/peft_compile": mem_lora / mem_peer if mem_lora and mem_peer else None,
        "mfu_lora": lora and lora.get("mfu_measured"),
        "mfu_lora_datasheet": lora and lora.get("mfu_datasheet"),
    }


def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _gib(n) -> str:
    return _f(None if n is None else n / 2**30, ".2f")


def markdown(
    results: Mapping[str, tuple[Record | None, Record | None]],
    roles: Mapping[str, str] | None = None,
) -> str:
    """The report: throughput and memory per mode, the ratios, the goals.

    ``roles`` maps a goal's model (:data:`GOALS`) to the model in ``results`` that stands in
    for it (the run-book's smoke profile: "gpt2-124m" -> "tiny-gpt2"); default: itself.
    """
    rows = ["| model | framework | mode | tokens/s | step ms | MFU (measured peak) | "
            "MFU (datasheet) | peak GiB | compile s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, pair in results.items():
        for record in pair:
            if record is None:
                continue
            for mode, f in record["modes"].items():
                rows.append(
                    f"| {model} | {record['framework']} | {mode} | {_f(f['tokens_per_s'], ',.0f')}"
                    f" | {_f(f['step_s'] * 1e3, '.1f')} | {_f(f['mfu_measured'], '.1%')} | "
                    f"{_f(f['mfu_datasheet'], '.1%')} | {_gib(_memory(f))} | "
                    f"{_f(f['compile_s'], '.1f')} |"
                )
    names = ("lora/peft_compile", "lora/peft_eager", "lora/full", "lora/merged", "multi/lora",
             "mem lora/full", "mem lora/peft_compile")  # fmt: skip
    table = {model: ratios(*pair) for model, pair in results.items()}
    ratio_rows = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for model, r in table.items():
        ratio_rows.append(f"| {model} | " + " | ".join(_f(r[n], ".2f") for n in names) + " |")
    goal_rows = ["| goal | model | value | target | met |", "|---|---|---:|---:|---|"]
    for goal_model, goal, key, op, target in GOALS:
        model = (roles or {}).get(goal_model, goal_model)
        if model not in table:
            continue
        value = table[model][key]
        met = "n/a" if value is None else ("yes" if _meets(value, op, target) else "**no**")
        goal_rows.append(f"| {goal} | {model} | {_f(value, '.2f')} | {op} {target} | {met} |")
    return "\n".join(["\n".join(rows), "", "\n".join(ratio_rows), "", "\n".join(goal_rows)])


def _meets(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def environment(results: Mapping[str, tuple[Record | None, Record | None]]) -> str:
    """Device, date and versions of the records, one line each side."""
    lines = []
    for lorax, peer in results.values():
        for record in (lorax, peer):
            if record is not None:
                versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
                lines.append(
                    f"- {record['framework']}: {record['device']['kind']}, {record['date']}, "
                    f"{versions}; peak {_f(record['peaks']['measured_tflops'], '.3g')} TFLOP/s "
                    f"measured, {_f(record['peaks']['datasheet_tflops'], '.0f')} datasheet"
                )
        break  # the same device and versions for every model
    return "\n".join(lines)


def _run(module: str, argv: Sequence[str], record_path: str) -> Record | None:
    cmd = [sys.executable, "-m", module, *argv, f"--record={record_path}"]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc or not os.path.exists(record_path):
        print(f"{module} failed (exit {rc}); its figures are n/a", flush=True)
        return None
    with open(record_path) as f:
        return json.load(f)


def _load(path: str) -> Record | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(args: argparse.Namespace) -> str:
    """Runs (or, with ``--from``, reads back) both sides for every model; returns the report."""
    results_dir = args.results_dir or records.RESULTS_DIR
    out_dir = (
        args.from_dir
        or args.out
        or os.path.join(results_dir, f"compare-{records.now().date().isoformat()}")
    )
    results = {}
    for model in args.models.split(","):
        paths = [os.path.join(out_dir, f"{side}-{model}.json") for side in ("lorax", "peer")]
        if args.from_dir:
            results[model] = (_load(paths[0]), _load(paths[1]))
            continue
        common = [f"--model={model}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                  f"--results-dir={results_dir}"]  # fmt: skip
        lorax = _run("benchmarks.step", [*common, f"--multi={args.multi}"], paths[0])
        peer = None if args.no_peer else _run("benchmarks.peer_torch", common, paths[1])
        results[model] = (lorax, peer)
    if not any(side for pair in results.values() for side in pair):
        raise SystemExit(f"no records for {args.models} in {out_dir}")
    report = environment(results) + "\n\n" + markdown(results)
    print(f"\nrecords in {out_dir}\n\n{report}")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", default="gpt2-124m,llama-1b", help="comma-separated model names")
    p.add_argument("--multi", type=int, default=8, help="K of the multi-adapter mode")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="lorax only")
    p.add_argument("--results-dir", default="", help="passed on (default: benchmarks/results)")
    p.add_argument("--out", default="", help="where each run's record goes (see above)")
    p.add_argument("--from", dest="from_dir", default="", help="render from the records here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

"""Turns sweep results into markdown tables and PNG plots: ``python -m experiments.report``.

Reads ``runs/sweeps/<study>/results.json`` for every Table 5, Table 6 and method-comparison
(``experiments.methods``) study present and writes ``report.md`` plus, per Table 5/6 study,
a PNG of test accuracy by target set (Table 5) or against rank (Table 6) and a PNG of every
run's training-loss curve (from its ``metrics.jsonl``). ``--out=experiments/results`` writes
them there with a copy of each study's ``results.json``: the results kept in the repository.
Each cell is the median over seeds with the min–max spread, next to the paper's MultiNLI number on
GPT-3 175B (Hu et al. 2021, Tables 5 and 6), or its RoBERTa-base MNLI one (Table 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
from collections import defaultdict

from absl import flags

# The paper's MultiNLI validation accuracy (%), GPT-3 175B.
PAPER_TABLE5 = {"q": 91.0, "k": 90.8, "v": 91.0, "o": 91.3, "qk": 91.3, "qv": 91.3, "qkvo": 91.7}
PAPER_TABLE6 = {
    ("q", 1): 90.7, ("q", 2): 90.9, ("q", 4): 91.1, ("q", 8): 90.7, ("q", 64): 90.7,
    ("qv", 1): 91.3, ("qv", 2): 91.4, ("qv", 4): 91.3, ("qv", 8): 91.6, ("qv", 64): 91.4,
    ("qkvo", 1): 91.2, ("qkvo", 2): 91.7, ("qkvo", 4): 91.7, ("qkvo", 8): 91.5, ("qkvo", 64): 91.4,
}  # fmt: skip
# The paper's Table 2, RoBERTa-base on MNLI (matched accuracy, %), for the methods it shares.
PAPER_TABLE2 = {"full": 87.6, "bitfit": 84.7, "lora": 87.5}
_NAME = re.compile(r"^(?P<targets>[qkvo]+)_r(?P<rank>\d+)_s(?P<seed>\d+)$")


def group(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Results by (target set, rank), seeds together."""
    out = defaultdict(list)
    for row in rows:
        m = _NAME.match(row["name"])
        if m:
            out[m["targets"], int(m["rank"])].append(row)
    return out


def cell(rows: list[dict], key: str = "test_accuracy") -> str:
    values = sorted(100 * r[key] for r in rows)
    median = statistics.median(values)
    spread = f" ({values[0]:.1f}–{values[-1]:.1f})" if len(values) > 1 else ""
    return f"{median:.1f}{spread}"


def table5(rows: list[dict]) -> str:
    groups = group(rows)
    order = [k for k in PAPER_TABLE5 if any(t == k for t, _ in groups)]
    lines = [
        "| adapted | rank | trainable params | test acc. (median, min–max) | paper MNLI |",
        "|---|---|---|---|---|",
    ]
    for targets in order:
        (rank, runs), *_ = [(r, v) for (t, r), v in groups.items() if t == targets]
        label = ",".join(f"W{c}" for c in targets)
        lines.append(
            f"| {label} | {rank} | {runs[0]['lora_params']:,} | {cell(runs)} (n={len(runs)}) "
            f"| {PAPER_TABLE5[targets]} |"
        )
    return "\n".join(lines)


def table6(rows: list[dict]) -> str:
    groups = group(rows)
    ranks = sorted({r for _, r in groups})
    lines = [
        "| adapted | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|" + "---|" * len(ranks),
    ]
    for targets in ("q", "qv", "qkvo"):
        cells = []
        for r in ranks:
            runs = groups.get((targets, r))
            paper = PAPER_TABLE6.get((targets, r))
            ours = cell(runs) if runs else "–"
            cells.append(f"{ours} [{paper}]" if paper else ours)
        lines.append(f"| {','.join('W' + c for c in targets)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def methods_table(rows: list[dict]) -> str:
    """One row per method: trainable parameters, test accuracy over seeds, base and step
    memory, median step time; beside the paper's Table 2 where it has the method."""
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["name"].rsplit("_s", 1)[0]].append(row)
    lines = [
        "| method | trainable params (+ head) | test acc. % (median, min–max) | frozen base MiB "
        "| step memory MiB | step ms (median) | paper, RoBERTa-base MNLI |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_method.items():
        r0 = runs[0]

        def median(key, scale=1.0, runs=runs):
            values = [r[key] for r in runs if r.get(key) is not None]
            return f"{scale * statistics.median(values):.0f}" if values else "–"

        kept = r0.get("adalora_kept_params")  # AdaLoRA: what its final ranks keep
        params = f"{r0['delta_params']:,}" + (f" → {kept:,} kept" if kept else "")
        lines.append(
            f"| {name} | {params} (+ {r0['head_params']:,}) | {cell(runs)} "
            f"(n={len(runs)}) | {r0['base_bytes'] / 2**20:.0f} | "
            f"{median('step_memory_bytes', 2**-20)} | {median('step_seconds_median', 1e3)} | "
            f"{PAPER_TABLE2.get(name, '–')} |"
        )
    return "\n".join(lines)


def plot(study: str, rows: list[dict], path: str) -> None:
    """Accuracy by target set (table5) or against rank (table6), seeds as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if study.startswith("table5"):
        keys = [k for k in PAPER_TABLE5 if any(t == k for t, _ in groups)]
        for x, targets in enumerate(keys):
            runs = next(v for (t, _), v in groups.items() if t == targets)
            ys = [100 * r["test_accuracy"] for r in runs]
            ax.scatter([x] * len(ys), ys, color="tab:blue")
            ax.plot([x - 0.2, x + 0.2], [statistics.median(ys)] * 2, color="black")
        labels = ["+".join("W" + c for c in k) for k in keys]
        ax.set_xticks(range(len(keys)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("adapted matrices (budget-matched)")
    else:
        for targets in ("q", "qv", "qkvo"):
            points = sorted((r, v) for (t, r), v in groups.items() if t == targets)
            if points:
                xs = [r for r, _ in points]
                ys = [statistics.median(100 * x["test_accuracy"] for x in v) for _, v in points]
                ax.plot(xs, ys, marker="o", label=",".join("W" + c for c in targets))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.legend()
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(study)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(study_dir: str, rows: list[dict], path: str) -> bool:
    """Every run's training loss (each log row: the mean over its window) against the step,
    one colour per target set; False (nothing drawn) when no run kept its metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours, drawn = {}, False
    for row in rows:
        log = os.path.join(study_dir, row["name"], "metrics.jsonl")
        if not os.path.exists(log):
            continue
        with open(log) as f:
            points = [json.loads(x) for x in f if x.strip()]
        points = [
            (r["step"], r["loss"]) for r in points if r.get("split") == "train" and "loss" in r
        ]
        if not points:
            continue
        label = row["name"].rsplit("_s", 1)[0]
        if label not in colours:
            colours[label] = f"C{len(colours) % 10}"
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=colours[label], alpha=0.6, lw=1,
                label=label if row["name"].endswith("_s0") else None)  # fmt: skip
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (window mean)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(os.path.basename(study_dir))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def adalora_ranks(study: str, rows: list[dict], out: str) -> list[str]:
    """Where AdaLoRA's runs put their budget: each seed's final rank summed by kernel (q, v,
    ...) and, for the first seed, the rank of every kernel as a PNG (layers × kernels)."""
    from lorax import adalora

    runs = [r for r in rows if r.get("adalora_ranks")]
    if not runs:
        return []
    lines = ["AdaLoRA's final ranks, summed over layers:", ""]
    for r in runs:
        kernels, _, grid = adalora.rank_grid(r["adalora_ranks"])
        sums = ", ".join(f"{k} {int(g[g >= 0].sum())}" for k, g in zip(kernels, grid, strict=True))
        lines.append(f"- {r['name']}: {sums}")
    png = os.path.join(out, f"{study}_adalora_ranks.png")
    title = f"{study}, {runs[0]['name']}: final AdaLoRA rank per kernel"
    adalora.plot_ranks(runs[0]["adalora_ranks"], png, title)
    return [*lines, "", f"![{study} AdaLoRA ranks]({os.path.basename(png)})", ""]


def report(root: str, out: str | None = None) -> str:
    """Writes report.md and the plots into ``out`` (default ``root``) for the studies under
    ``root``, copying each study's results.json there when ``out`` is another directory;
    returns the markdown, or "" (and writes nothing) when no study has results."""
    out = root if out is None else out
    parts = ["# Sweep results", ""]
    for study in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, study, "results.json")
        if not (study.startswith(("table5", "table6", "methods")) and os.path.exists(path)):
            continue
        with open(path) as f:
            rows = json.load(f)["runs"]
        if not rows:
            continue
        platform = sorted({r["platform"] for r in rows})
        parts += [f"## {study}", "", f"{len(rows)} runs on {', '.join(platform)}.", ""]
        os.makedirs(out, exist_ok=True)
        if os.path.abspath(out) != os.path.abspath(root):
            os.makedirs(os.path.join(out, study), exist_ok=True)
            shutil.copy(path, os.path.join(out, study, "results.json"))
        if study.startswith("methods"):
            parts += [methods_table(rows), "", *adalora_ranks(study, rows, out)]
            continue
        parts.append(table5(rows) if study.startswith("table5") else table6(rows))
        png = os.path.join(out, f"{study}.png")
        plot(study, rows, png)
        parts += ["", f"![{study}]({os.path.basename(png)})", ""]
        curve_png = os.path.join(out, f"{study}_curves.png")
        if curves(os.path.join(root, study), rows, curve_png):
            parts += [f"![{study} training loss]({os.path.basename(curve_png)})", ""]
    if len(parts) == 2:
        return ""
    text = "\n".join(parts) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv):
    del argv
    f = flags.FLAGS
    text = report(f.root, f.out or None)
    if not text:
        raise FileNotFoundError(
            f"no finished study under {f.root} (no <study>/results.json with rows); run "
            "python -m experiments.table5 / table6 / methods first, or pass --root"
        )
    print(text)


if __name__ == "__main__":
    flags.DEFINE_string("root", "runs/sweeps", "Directory holding the studies.")
    flags.DEFINE_string("out", "", "Where report.md and the PNGs go (default: --root).")
    from lorax import cli

    cli.run(main, "experiments.report")

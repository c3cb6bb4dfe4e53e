"""Turns the summary.json of finished runs into one markdown table.

Run: python -m experiments.collect runs/wq_r8 runs/wq_wv_r4 ...   (default: every runs/*/)
"""

from __future__ import annotations

import glob
import os

COLUMNS = (
    ("run", "{}"),
    ("targets", "{}"),
    ("rank", "{}"),
    ("lora_params", "{:,}"),
    ("validation_accuracy", "{:.4f}"),
    ("test_accuracy", "{:.4f}"),
    ("steps", "{}"),
    ("wall_seconds", "{:.0f}"),
    ("platform", "{}"),
)


def row(workdir: str) -> dict | None:
    """One table row from ``workdir/summary.json``; None if the run has not finished."""
    from lorax import loop

    s = loop.finished(workdir)  # a damaged summary.json is an error naming it
    if s is None:
        return None
    cfg = s.get("config", {})
    lora = cfg.get("lora", {})
    full = cfg.get("method") == "full"
    return {
        **s,
        "run": os.path.basename(os.path.normpath(workdir)),
        "targets": "all (full fine-tuning)" if full else lora.get("targets", "?"),
        "rank": "-" if full else lora.get("rank", "?"),
    }


def table(workdirs: list[str]) -> str:
    """Markdown table of the finished runs among ``workdirs``."""
    rows = [r for r in map(row, workdirs) if r is not None]
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = [
        "| " + " | ".join(fmt.format(r.get(name, "")) for name, fmt in COLUMNS) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def main(argv):
    print(table(argv[1:] or sorted(glob.glob("runs/*/"))))


if __name__ == "__main__":
    from lorax import cli

    cli.run(main, "experiments.collect")  # a user error as one line, as lorax's commands

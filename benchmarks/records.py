"""What both benchmark scripts report: per-mode figures, datasheet peaks, the table, the JSONL.

A run appends one JSON record (one line) to ``<results_dir>/<date>-<model>.jsonl``: lorax's
records have ``"peer": false``, the PyTorch + PEFT script's ``"peer": true``, so one file holds
both sides of a comparison. Every figure that could not be measured is ``null``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched as a
# substring of the device name in order: the first match wins ("H100 PCIe" before "H100").
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def datasheet_tflops(device_kind: str) -> float | None:
    """The datasheet's dense bf16 peak for a device name, or None when it is not in the table."""
    for needle, tflops in DATASHEET_BF16_TFLOPS:
        if needle.lower() in device_kind.lower():
            return tflops
    return None


def mode_figures(
    step_seconds: Sequence[float],
    *,
    tokens_per_step: int,
    flops_per_token: float,
    peaks: Mapping[str, float | None],
    compile_seconds: float | None,
    peak_bytes: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """One mode's figures from its timed steps.

    Args:
      step_seconds: wall time of each timed (post-warm-up, device-synchronised) step.
      tokens_per_step: tokens a step trains on (every token is real: no padding).
      flops_per_token: model FLOPs per token by the formula (benchmarks.models).
      peaks: ``{"datasheet_tflops", "measured_tflops"}``, either may be None.
      compile_seconds: time to compile the step (None where it does not apply).
      peak_bytes: peak device memory (None where the device does not say).
      extra: further figures stored as they are (e.g. XLA's own FLOP count).

    Returns:
      A JSON-ready dict: median step time, tokens/s, model TFLOP/s, MFU against each peak.
    """
    step_s = statistics.median(step_seconds)
    tokens_per_s = tokens_per_step / step_s
    tflops = tokens_per_s * flops_per_token / 1e12

    def mfu(peak):
        return None if not peak else tflops / peak

    return {
        "compile_s": compile_seconds,
        "step_s": step_s,
        "step_s_all": list(step_seconds),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "model_tflops": tflops,
        "mfu_datasheet": mfu(peaks.get("datasheet_tflops")),
        "mfu_measured": mfu(peaks.get("measured_tflops")),
        "peak_bytes": peak_bytes,
        **extra,
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


COLUMNS = (
    ("mode", 14, lambda name, f: name),
    ("compile s", 9, lambda name, f: _fmt(f["compile_s"], ".1f")),
    ("step ms", 9, lambda name, f: _fmt(f["step_s"] * 1e3, ".2f")),
    ("tokens/s", 11, lambda name, f: _fmt(f["tokens_per_s"], ",.0f")),
    ("TFLOP/s", 8, lambda name, f: _fmt(f["model_tflops"], ".2f")),
    ("MFU sheet", 9, lambda name, f: _fmt(f["mfu_datasheet"], ".1%")),
    ("MFU meas.", 9, lambda name, f: _fmt(f["mfu_measured"], ".1%")),
    ("peak GiB", 8, lambda name, f: _fmt(_gib(f["peak_bytes"]), ".2f")),
    ("XLA GiB", 8, lambda name, f: _fmt(_gib(f.get("xla_bytes")), ".2f")),
)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def table(modes: Mapping[str, Mapping[str, Any]]) -> str:
    """The per-mode figures as a fixed-width text table, one row per mode."""
    lines = ["  ".join(f"{title:>{width}}" for title, width, _ in COLUMNS)]
    for name, figures in modes.items():
        lines.append("  ".join(f"{get(name, figures):>{w}}" for _, w, get in COLUMNS))
    return "\n".join(lines)


def header(record: Mapping[str, Any]) -> str:
    """One line saying what a record measured: who, which model, shape, device, peaks."""
    a, p = record["args"], record["peaks"]
    return (
        f"{record['framework']} | {a['model']} batch {a['batch']} x seq {a['seq']} | "
        f"{record['device']['kind']} | datasheet peak {_fmt(p['datasheet_tflops'], '.0f')} "
        f"TFLOP/s, measured {_fmt(p['measured_tflops'], '.3g')} TFLOP/s "
        f"({_fmt(p.get('measured_size'), 'd')}³ {p.get('measured_dtype', '')} matmul)"
    )


def versions(*packages: str) -> dict[str, str | None]:
    """The installed version of each package (None where it is not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def results_path(results_dir: str, model: str, date: datetime.date | None = None) -> str:
    """``<results_dir>/<YYYY-MM-DD>-<model>.jsonl``."""
    date = date or now().date()
    return os.path.join(results_dir, f"{date.isoformat()}-{model}.jsonl")


def append(record: Mapping[str, Any], results_dir: str) -> str:
    """Appends ``record`` as one JSON line to its model's results file; returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = results_path(results_dir, record["args"]["model"])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def write(record: Mapping[str, Any], path: str) -> None:
    """Writes ``record`` alone to ``path`` (what benchmarks.compare reads back)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def publish(record: Mapping[str, Any], results_dir: str, record_path: str = "") -> str:
    """Prints a run's header and table, appends it to the results file (returned), and also
    writes it alone to ``record_path`` if given."""
    print(header(record))
    print(table(record["modes"]))
    path = append(record, results_dir)
    if record_path:
        write(record, record_path)
    print(f"appended to {path}")
    return path

"""What a benchmark window runs on: the device, the software, and a measured bf16 matmul peak.

``python -m benchmarks.probe --record=FILE [--smoke]``: the run-book's first step. The peak is
:func:`benchmarks.step.matmul_tflops` (8 chained n×n×n bf16 products, median of 5), n = 8192 on
a GPU; ``--smoke`` (a CPU) uses n = 256.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from benchmarks import records

# The packages a run-book window uses: a stock CUDA image's, then those it brings as wheels.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "peft",
            "torch", "numpy", "safetensors", "tokenizers", "absl-py", "tqdm", "matplotlib",
            "ml-collections", "gguf")  # fmt: skip


def nvidia_smi() -> list[dict[str, str]]:
    """One dict per GPU from ``nvidia-smi`` (name, memory, driver, clocks), [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    fields = ("name", "memory.total", "driver_version", "clocks.max.sm", "clocks.max.mem",
              "power.limit")  # fmt: skip
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return [{"error": str(e)}]
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]  # fmt: skip


def probe(smoke: bool) -> dict[str, Any]:
    """The record: date, host, devices, versions, peaks."""
    import jax
    import jax.numpy as jnp

    from benchmarks import step

    devices = jax.devices()
    kind = devices[0].device_kind
    n = 256 if smoke else 8192
    return {
        "date": records.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "devices": {"count": len(devices), "kind": kind, "platform": devices[0].platform},
        "nvidia_smi": nvidia_smi(),
        "versions": records.versions(*PACKAGES),
        "peaks": {
            "datasheet_tflops": records.datasheet_tflops(kind),
            "measured_tflops": step.matmul_tflops(n, jnp.bfloat16),
            "measured_size": n,
            "measured_dtype": "bfloat16",
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__)
    p.add_argument("--record", required=True, help="where the JSON record goes")
    p.add_argument("--smoke", action="store_true", help="a small peak (CPU)")
    args = p.parse_args(argv)
    record = probe(args.smoke)
    records.write(record, args.record)
    print(f"{record['devices']}; measured bf16 peak "
          f"{record['peaks']['measured_tflops']:.3g} TFLOP/s")  # fmt: skip
    return record


if __name__ == "__main__":
    main()

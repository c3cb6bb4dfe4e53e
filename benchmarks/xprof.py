"""Where a compiled step's time goes: a JAX profiler trace of a few steps, summed per XLA op.

``benchmarks.step --profile=N`` traces N more steps of each mode after timing them
(``jax.profiler.trace``), reads the trace back with ``jax.profiler.ProfileData`` (no
TensorBoard needed: a stock CUDA image has it) and keeps a small summary in the record:

- the device's busy time per step (the kernels' summed durations) beside the wall-clock step,
- that time by kind of work: matrix products, the fused attention kernel, copies and
  transposes, everything else (elementwise and reduction fusions),
- by part of the model and pass: each op's JAX ``op_name`` (from the compiled HLO's metadata)
  gives the module path (``layers_*/attn/q``, layer numbers folded) and the pass (forward,
  backward, or the optimizer update), so a row says e.g. "backward layers_*/mlp/mlp_in",
- the heaviest ops themselves.

On a GPU the kernels are the device planes' events; on a CPU (the tests) the host's XLA-op
events. An op whose name the HLO text does not hold (a cuBLAS or cuDNN kernel launched by a
custom call has its own name) is grouped by its kernel name.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from benchmarks import hlo

_LAYER = re.compile(r"(layers?)_\d+")


def trace(run_step: Callable[[], Any], steps: int, directory: str) -> tuple[str, float]:
    """Runs ``run_step()`` (one synchronised step) ``steps`` times under the profiler, its
    trace written under ``directory``; returns the trace file and the wall-clock seconds per
    step."""
    with jax.profiler.trace(directory):
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = (time.perf_counter() - start) / steps
    files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"the profiler wrote no trace under {directory}")
    return files[-1], wall


# Lines a profiler may derive from the kernels themselves (their events would count twice).
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Framework Ops", "Framework Name Scope", "Steps",
                 "Source code", "XLA TraceMe", "Launch Stats")  # fmt: skip


def kernel_times(path: str) -> tuple[str, dict[str, list]]:
    """(where the events came from, {op: [summed ns, count, a kernel name]}) of a trace: the
    device planes' kernels where there are any (their CUDA streams' lines; keyed by their
    ``hlo_op`` stat, else their kernel name), else the host's events that carry an ``hlo_op``
    stat (XLA:CPU)."""
    data = jax.profiler.ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:") and "CPU" not in p.name]
    source = "device" if planes else "host"
    times: dict[str, list] = {}
    for plane in planes or [p for p in data.planes if p.name.startswith("/host:")]:
        lines = list(plane.lines)
        if planes:
            streams = [ln for ln in lines if ln.name.startswith("Stream")]
            lines = streams or [ln for ln in lines if ln.name not in DERIVED_LINES]
        for line in lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is None and source == "host":
                    continue
                entry = times.setdefault(str(op or event.name), [0.0, 0, event.name])
                entry[0] += event.duration_ns
                entry[1] += 1
    return source, times


def kind(op: str, op_name: str, kernel: str = "") -> str:
    """What sort of work an op is, from its HLO instruction and kernel names and its JAX
    op_name."""
    low, primitive = f"{op} {kernel}".lower(), op_name.rsplit("/", 1)[-1]
    if any(s in low for s in ("cudnn", "fmha", "flash")) or "dot_product_attention" in op_name:
        return "attention kernel"
    if low.startswith(("copy", "transpose", "memcpy")) or primitive in ("transpose", "copy"):
        return "copy / transpose"
    if primitive == "dot_general" or any(s in low for s in ("gemm", "cublas", "xmma", "cutlass")):
        return "matmul"
    return "other (elementwise, reductions)"


def part(op_name: str) -> tuple[str, str]:
    """(pass, model part) of a JAX op_name: backward under ``transpose(``, forward under
    ``jvp(``, the optimizer update under the step's ``cond``; the part is the module path
    (layer numbers folded to ``*``, transformation wrappers to their name: XLA's attention
    core is ``layers_*/attn/vmap``), "(outside the model)" for the loss and the LoRA wrap."""
    if not op_name:  # XLA's own instructions, and kernels that no HLO instruction names
        return "?", "(no op_name)"
    path = op_name.split("/")[1:]  # drop jit(<step>)
    if path and path[0] == "cond":
        return "update", "optimizer"
    if any("transpose(" in c for c in path):  # also vmap(transpose(...)): K adapters
        pass_ = "backward"
    elif any("jvp(" in c for c in path):
        pass_ = "forward"
    else:
        pass_ = "other"
    inside = path[:-1]  # less the primitive, and the transformations around the model
    while inside and inside[0].startswith(("transpose(", "jvp(", "jit(", "vmap(")):
        inside = inside[1:]
    inside = [_LAYER.sub(r"\1_*", c.split("(", 1)[0]) for c in inside]  # inner ones by name
    return pass_, "/".join(c for c in inside if c) or "(outside the model)"


def summarize(
    times: Mapping[str, list],
    names: Mapping[str, tuple[str, bool]],
    *,
    steps: int,
    wall_s: float,
    source: str,
    top: int = 25,
) -> dict[str, Any]:
    """The record's summary: busy ms per step (kernels' summed durations: streams that overlap
    can make it exceed the wall clock), by kind, by (pass, part), and the top ops."""
    total = sum(entry[0] for entry in times.values())
    by_kind: dict[str, float] = collections.Counter()
    by_part: dict[tuple[str, str], float] = collections.Counter()
    ops = []
    for op, (ns, count, kernel) in times.items():
        name, inherited = names.get(op, ("", False))
        k = kind(op, "" if inherited else name, kernel)  # an added copy is not its reader
        by_kind[k] += ns
        by_part[part(name)] += ns
        ops.append((ns, op, k, name, count, kernel))
    ms = 1e-6 / steps

    def share(ns: float) -> float:
        return round(ns / total, 4) if total else 0.0

    return {
        "source": source,
        "steps": steps,
        "wall_ms": round(wall_s * 1e3, 3),
        "busy_ms": round(total * ms, 3),
        "busy_fraction": round(total * 1e-9 / steps / wall_s, 4) if wall_s else None,
        "by_kind": {k: {"ms": round(v * ms, 3), "share": share(v)}
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_part": [{"pass": p, "part": q, "ms": round(v * ms, 3), "share": share(v)}
                    for (p, q), v in sorted(by_part.items(), key=lambda kv: -kv[1])[:top]],
        "top_ops": [{"op": op, "kind": k, "op_name": name[-160:], "kernel": kernel[:100],
                     "ms": round(ns * ms, 3), "calls": count / steps, "share": share(ns)}
                    for ns, op, k, name, count, kernel in sorted(ops, reverse=True)[:top]],
    }  # fmt: skip


def profile(compiled, run_step: Callable[[], Any], steps: int, top: int = 25) -> dict[str, Any]:
    """Traces ``steps`` calls of ``run_step`` (running ``compiled``) and summarizes them (the
    trace itself is deleted)."""
    with tempfile.TemporaryDirectory(prefix="lorax-xprof-") as directory:
        path, wall = trace(run_step, steps, directory)
        source, times = kernel_times(path)
    return summarize(times, hlo.op_names(compiled.as_text()), steps=steps, wall_s=wall,
                     source=source, top=top)  # fmt: skip

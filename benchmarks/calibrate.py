"""The step-time estimate (:mod:`lorax.roofline`) beside every lorax step a GPU measured:
``python -m benchmarks.calibrate`` (no GPU; the CUDA plugin wheels, ``pip install -e '.[plan]'``).

For each lorax row of ``benchmarks/results/runbook-gpu`` it rebuilds the same step with
:func:`benchmarks.step.build_step` and the run's arguments (model, batch, sequence, mode, K,
scan, remat, and the attention kernel and loss chunk its "auto" resolved to; the H200 run of
2026-11-27 predates "auto": XLA attention on dense logits), compiles it for the described GPU
with no GPU present (:func:`lorax.targets.gpu_devices`), runs the roofline on the optimized
HLO, and fits ONE efficiency factor to all rows (the geometric mean of roofline / measured
time). It prints the markdown table of benchmarks/README.md "Step-time estimate" and writes
the rows as JSON (``--out``). PEFT rows ran in PyTorch: there is no XLA program of theirs to
estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from typing import Any
from unittest import mock

from benchmarks import records

# What makes two rows the same compiled step.
STEP_KEYS = ("model", "batch", "seq", "mode", "multi", "scan", "remat", "attention",
             "loss_chunk", "loss_grad")  # fmt: skip
RUNBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "runbook-gpu")


def measured_rows(runbook: str = RUNBOOK) -> list[dict[str, Any]]:
    """Every lorax step a GPU timed, from the run-book's records: the step's arguments as it
    ran (model, batch, seq, mode, K, scan, remat, attention kernel, loss chunk), its measured
    step seconds and tokens/s, and the record it came from."""
    rows = []
    with open(os.path.join(runbook, "records.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for rec in records:
        result = rec.get("result") or {}
        if rec.get("status") != "ok":
            continue
        if "record" in result and result["record"].startswith("lorax-"):
            with open(os.path.join(runbook, result["record"])) as g:
                run = json.load(g)
            for mode, fig in run["modes"].items():
                rows.append(_row(rec["step"], run["args"], mode, fig))
        for side in ("on", "off"):  # A/B pairs: lorax on both sides
            if side in result:
                args = _argv_args(result["model"], result[side])
                for mode, fig in result[side]["modes"].items():
                    rows.append(_row(f"{rec['step']} ({side})", args, mode, fig))
    return rows


def _argv_args(model: str, side: dict) -> dict[str, Any]:
    """An A/B side's step arguments: its argv over benchmarks.step's defaults, then what the
    record kept of them resolved on the device (older records kept only the argv)."""
    from benchmarks import step as bench_step

    args = vars(bench_step.parse_args([f"--model={model}", *side["argv"]]))
    if "args" not in side:  # before "auto" existed: what the argv did not name was the old path
        args = {k: v for k, v in args.items() if v not in ("auto", -1)}
    return {**args, **{k: v for k, v in side.get("args", {}).items() if v is not None}}


def _row(source: str, args: dict, mode: str, fig: dict) -> dict[str, Any]:
    from benchmarks import models

    bench = models.get(args["model"])
    # A run records the kernels its "auto" resolved to; runs before lorax had a choice (the
    # 2026-11-27 H200 run) record none and ran XLA attention on dense logits, the only path.
    attention = args.get("attention_kernel") or args.get("attention", "xla")
    chunk = args.get("loss_chunk_positions", args.get("loss_chunk", 0))
    if attention == "auto" or chunk < 0:
        raise ValueError(f"{source}: the record does not say what 'auto' resolved to")
    return {
        "source": source,
        "model": args["model"],
        "batch": args.get("batch") or bench.batch,
        "seq": args.get("seq") or bench.seq,
        "mode": mode.split()[0],
        "multi": args.get("multi") or 1 if mode.startswith("multi") else 1,
        "scan": bool(args.get("scan")),
        "remat": bool(args.get("remat")),
        "attention": attention,
        "loss_chunk": chunk,
        "loss_grad": args.get("loss_grad") or "forward",
        "measured_step_s": fig["step_s"],
        "measured_tokens_per_s": fig["tokens_per_s"],
        "measured_xla_bytes": fig.get("xla_bytes"),
    }


def compile_row(row: dict[str, Any], devices) -> tuple[str, int | None, int]:
    """The optimized HLO text of the row's step compiled for ``devices``, its footprint
    (``step.compiled_memory_bytes``) and tokens per step."""
    import jax
    import jax.numpy as jnp

    from benchmarks import models
    from benchmarks import step as bench_step
    from lorax import sharding
    from lorax import step as step_lib
    from lorax.models import decoder

    bench = models.get(row["model"])
    b, t = row["batch"], row["seq"]
    config = bench.decoder_config()
    model = decoder.Decoder(config, jnp.bfloat16, scan=row["scan"], remat=row["remat"],
                            attention=row["attention"])  # fmt: skip
    mesh = sharding.make_mesh(1, devices=devices[:1])
    batch = bench_step.random_batch(config.vocab_size, b, t)
    built = {}

    def build():
        step = bench_step.build_step(row["mode"], bench, model, batch, mesh=mesh,
                                     adapters=row["multi"], loss_chunk=row["loss_chunk"],
                                     loss_grad=row["loss_grad"])  # fmt: skip
        built["fn"] = step.fn
        return step.args

    # Placing a batch copies host rows onto devices, which a deviceless topology does not
    # have; under eval_shape only the batch's shape matters (the step's jit gives it its
    # sharding), so it enters as a traced constant.
    def traced_batch(batch, mesh, leading=0):
        return {k: jnp.asarray(v) for k, v in batch.items()}

    with mock.patch.object(sharding, "put_batch", traced_batch):
        args = jax.eval_shape(build)
    compiled = built["fn"].lower(*args).compile()
    return compiled.as_text(), step_lib.compiled_memory_bytes(compiled), b * t


def calibrate(rows: list[dict[str, Any]], gpu: str, log=print) -> dict:
    """Estimates every row (one compile per distinct step), fits the efficiency, returns
    ``{"efficiency", "rows", "error"}``; each row gains roofline and estimate figures.
    ``gpu`` names both the card compiled for (:mod:`lorax.targets`) and its datasheet figures
    (:data:`lorax.roofline.SPECS`)."""
    from lorax import roofline, targets

    devices, cache = targets.gpu_devices(gpu), {}
    for row in rows:
        key = tuple(row[k] for k in STEP_KEYS)
        if key not in cache:
            start = time.perf_counter()
            text, footprint, tokens = compile_row(row, devices)
            est = roofline.estimate(text, gpu, tokens, efficiency=1.0)
            cache[key] = (est, footprint, time.perf_counter() - start)
            log(f"{key}: roofline {est.roofline_seconds * 1e3:.1f} ms, compiled in "
                f"{cache[key][2]:.0f} s")  # fmt: skip
        est, footprint, _ = cache[key]
        row.update(roofline_s=est.roofline_seconds, tokens_per_step=est.tokens_per_step,
                   xla_bytes=footprint, kinds=est.kinds, flops=est.flops,
                   bytes=est.bytes)  # fmt: skip
    efficiency = fit(rows)
    for i, row in enumerate(rows):
        row["estimate_step_s"] = row["roofline_s"] / efficiency
        row["estimate_tokens_per_s"] = row["tokens_per_step"] / row["estimate_step_s"]
        row["error"] = row["estimate_step_s"] / row["measured_step_s"] - 1
        held_out = fit(rows[:i] + rows[i + 1 :])  # fitted without this row
        row["error_held_out"] = row["roofline_s"] / held_out / row["measured_step_s"] - 1
    return {"efficiency": efficiency, "rows": rows, "error": {
        "mean_abs": _mean([abs(r["error"]) for r in rows]),
        "max_abs": max(abs(r["error"]) for r in rows),
        "rms": math.sqrt(_mean([r["error"] ** 2 for r in rows])),
        "held_out_max_abs": max(abs(r["error_held_out"]) for r in rows),
    }}  # fmt: skip


def fit(rows: list[dict[str, Any]]) -> float:
    """The one efficiency for all rows: the geometric mean of roofline / measured time (so an
    estimate 10 % high weighs as much as one 10 % low)."""
    return math.exp(_mean([math.log(r["roofline_s"] / r["measured_step_s"]) for r in rows]))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(result: dict) -> str:
    """The markdown table of benchmarks/README.md."""
    lines = [
        "| run-book row | model | mode | measured ms | roofline ms | estimate ms | error "
        "| error, factor fitted without the row | measured tokens/s | estimate tokens/s "
        "| XLA GiB (H200 / here) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        mode = r["mode"] + (f" x{r['multi']}" if r["mode"] == "multi" else "")
        mode += " scan" if r["scan"] else ""
        gib = f"{(r['measured_xla_bytes'] or 0) / 2**30:.2f} / {(r['xla_bytes'] or 0) / 2**30:.2f}"
        lines.append(
            f"| {r['source']} | {r['model']} | {mode} | {r['measured_step_s'] * 1e3:.1f} "
            f"| {r['roofline_s'] * 1e3:.1f} | {r['estimate_step_s'] * 1e3:.1f} "
            f"| {r['error']:+.0%} | {r['error_held_out']:+.0%} | {r['measured_tokens_per_s']:,.0f} "
            f"| {r['estimate_tokens_per_s']:,.0f} | {gib} |"
        )
    err = result["error"]
    lines.append(
        f"\nOne efficiency for every row: {result['efficiency']:.3f} (estimate = roofline / "
        f"{result['efficiency']:.3f}); |error| mean {err['mean_abs']:.0%}, max "
        f"{err['max_abs']:.0%}, RMS {err['rms']:.0%}; each row estimated with the factor "
        f"fitted to the others: max |error| {err['held_out_max_abs']:.0%}."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runbook", default=RUNBOOK, help="a run-book results folder")
    p.add_argument("--gpu", default="h200", help="the GPU the runs were timed on (lorax.targets)")
    p.add_argument("--only", default="", help="comma-separated models to keep (a quick run)")
    p.add_argument("--out", default="", help="also write the rows and the fit here (JSON)")
    args = p.parse_args(argv)
    rows = measured_rows(args.runbook)
    if args.only:
        models = sorted({r["model"] for r in rows})
        rows = [r for r in rows if r["model"] in args.only.split(",")]
        if not rows:
            raise SystemExit(f"--only={args.only} keeps no row; the run-book timed {models}")
    start = time.perf_counter()
    result = calibrate(rows, args.gpu)
    result.update(
        date=records.now().isoformat(timespec="seconds"),
        minutes=(time.perf_counter() - start) / 60,
        host={"cpus": os.cpu_count(), "platform": platform.platform()},
        gpu=args.gpu,
        command="python -m benchmarks.calibrate",
        versions=records.versions("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"),
    )
    print(table(result))
    print(f"{result['date']}, {os.cpu_count()} CPUs, {result['minutes']:.1f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

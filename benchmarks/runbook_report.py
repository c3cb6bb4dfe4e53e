"""The run-book's report: every step's records in DIR as Markdown, the goals met or not.

``python -m benchmarks.runbook --render --out=DIR`` prints it; a run-book run writes it to
``DIR/report.md``. The performance table and ratios are :func:`benchmarks.compare.markdown`
over the ``lorax-<model>.json`` / ``peer-<model>.json`` records (what ``python -m
benchmarks.compare --from=DIR`` shows); then the A/B pairs, the many-adapters grid and Table 5.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping
from typing import Any

from benchmarks import compare, runbook_steps

REPORT = "report.md"


def _lines(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "records.jsonl")
    if not os.path.exists(path):
        return []
    lines = []
    with open(path) as f:
        for text in f:
            try:
                lines.append(json.loads(text))
            except ValueError:  # cut off mid-write (benchmarks.runbook.Store says so)
                continue
    return lines


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(out: str) -> str:
    """The report of the records in ``out`` (a note where there are none)."""
    lines = _lines(out)
    if not lines:
        return f"no run-book records in {out}"
    profile = runbook_steps.PROFILES[lines[0]["profile"]]
    latest = {}  # step -> its last attempt, ok ones preferred, until a redo marker
    for line in lines:
        if line["status"] in ("ok", "redo") or latest.get(line["step"], {}).get("status") != "ok":
            latest[line["step"]] = line
    ok = {k: v["result"] for k, v in latest.items() if v["status"] == "ok"}
    first = ok.get("1/device")
    fallback = first["devices"]["kind"] if first else "not recorded"
    devices = {k: v.get("device") or fallback for k, v in latest.items() if v["status"] == "ok"}
    parts = [_device(profile, first), _steps(profile, latest, devices)]
    parts.append(_performance(out, profile))
    parts.append(_ab(latest))
    parts.append(_profiles({k: v for k, v in ok.items() if k.startswith("4/profile/")}))
    parts.append(_grid(ok.get("5/grid")))
    parts.append(_table5({k: v for k, v in ok.items() if k.startswith("6/")}))
    return "\n\n".join(p for p in parts if p) + "\n"


def _device(profile, device: Mapping | None) -> str:
    head = f"### Run-book ({profile.name} profile)"
    if device is None:
        return head + "\n\nStep 1 (device) not recorded."
    versions = ", ".join(f"{k} {v}" for k, v in device["versions"].items() if v)
    d, p = device["devices"], device["peaks"]
    return (
        f"{head}\n\n- device: {d['count']} × {d['kind']} ({d['platform']}), {device['date']}\n"
        f"- bf16 matmul peak: {_f(p['measured_tflops'], '.4g')} TFLOP/s measured "
        f"({p['measured_size']}³), {_f(p['datasheet_tflops'], '.0f')} datasheet\n"
        f"- versions: {versions}"
    )


def _steps(profile, latest: Mapping[str, Mapping], devices: Mapping[str, str]) -> str:
    """The status of every step, with the device of each ok one (lines written before the
    run-book stamped devices take step 1's) and a warning where they ran on several."""
    rows = ["| step | status | device | seconds | estimate s |", "|---|---|---|---:|---:|"]
    for step in runbook_steps.plan(profile):
        line = latest.get(step.key)
        if line is None:
            rows.append(f"| {step.key} | not run | | | {step.estimate_s:.0f} |")
            continue
        if line["status"] == "redo":
            rows.append(f"| {step.key} | recorded, to be run again (--redo) | | | |")
            continue
        status = line["status"] + (f": {line['reason']}" if line.get("reason") else "")
        rows.append(f"| {step.key} | {status} | {devices.get(step.key, '')} | "
                    f"{line['seconds']:.0f} | {line['estimate_s']:.0f} |")  # fmt: skip
    if len(set(devices.values())) > 1:
        rows.append(
            f"\n**The steps ran on {len(set(devices.values()))} devices** "
            f"({', '.join(sorted(set(devices.values())))}): compare tokens/s only between steps "
            "on one device; an A/B pair's on/off ratio is measured within its step."
        )
    return "\n".join(rows)


def _performance(out: str, profile) -> str:
    results = {}
    for model in profile.models:
        pair = tuple(_load(os.path.join(out, f"{s}-{model}.json")) for s in ("lorax", "peer"))
        if any(pair):
            results[model] = pair
    if not results:
        return ""
    roles = dict(zip(("gpt2-124m", "llama-1b"), profile.models, strict=True))
    return (
        "#### Steps 2-3: one training step, lorax beside PEFT\n\n"
        + compare.environment(results) + "\n\n" + compare.markdown(results, roles)
    )  # fmt: skip


def _ab(latest: Mapping[str, Mapping]) -> str:
    lines = [v for k, v in latest.items() if k.startswith("4/ab")]
    if not lines:
        return ""
    rows = ["#### Step 4: speed paths against their fallbacks", "",
            "| path | model | mode | on tokens/s | off tokens/s | on/off | status |",
            "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for line in lines:
        if line["status"] != "ok":
            reason = line.get("reason") or line.get("error", "")[:120] or "to be run again"
            rows.append(f"| {line['step']} | | | | | | {line['status']}: {reason} |")
            continue
        r = line["result"]
        for mode, ratio in r["on/off tokens_per_s"].items():
            on, off = r["on"]["modes"][mode], r["off"]["modes"][mode]
            rows.append(f"| {r['pair']} | {r['model']} | {mode} | "
                        f"{_f(on['tokens_per_s'], ',.0f')} | {_f(off['tokens_per_s'], ',.0f')}"
                        f" | {_f(ratio, '.2f')} | ok |")  # fmt: skip
    return "\n".join(rows)


def _profiles(profiles: Mapping[str, Mapping], parts: int = 12) -> str:
    """Step 4's profiles: the device's busy time against the wall clock, by kind of work,
    and the heaviest (pass, part of the model) groups."""
    if not profiles:
        return ""
    rows = ["#### Step 4: where the LoRA step's time goes (default kernels, traced steps)", "",
            "| model | attention | loss chunk / gradient | tokens/s | wall ms | device busy ms "
            "| busy | by kind |", "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in profiles.values():
        p, a = r["profile"], r["args"]
        if "error" in p:
            rows.append(
                f"| {r['model']} | {a.get('attention_kernel')} | | "
                f"{r['tokens_per_s']:,.0f} | | | | no profile: {p['error'][:150]} |"
            )
            continue
        kinds = "; ".join(f"{k} {v['share']:.0%}" for k, v in p["by_kind"].items())
        rows.append(
            f"| {r['model']} | {a.get('attention_kernel')} | "
            f"{a.get('loss_chunk_positions')} / {a.get('loss_grad')} | "
            f"{r['tokens_per_s']:,.0f} | {p['wall_ms']:.1f} | {p['busy_ms']:.1f} | "
            f"{_f(p['busy_fraction'], '.0%')} | {kinds} ({p['source']} events) |"
        )
    rows += ["", "| model | pass | part | ms per step | share of busy |", "|---|---|---|---:|---:|"]
    for r in profiles.values():
        for g in r["profile"].get("by_part", [])[:parts]:
            rows.append(f"| {r['model']} | {g['pass']} | {g['part']} | {g['ms']:.2f} | "
                        f"{g['share']:.1%} |")  # fmt: skip
    return "\n".join(rows)


def _grid(grid: Mapping | None) -> str:
    if grid is None:
        return ""
    met = "n/a" if grid["met"] is None else ("yes" if grid["met"] else "**no**")
    return (
        "#### Step 5: the Table-5 grid as multi-adapter jobs against one by one\n\n"
        f"{grid['runs']} runs ({grid['adapters_per_job']} adapters per job), "
        f"{grid['steps']} steps of {grid['batch']}, encoder "
        f"{grid['shape']['num_hidden_layers']} layers × d {grid['shape']['hidden_size']}, "
        f"{grid['device']}; wall-clock including load, compile and evaluation.\n\n"
        "| jobs s | one by one s | one-by-one runs measured | speed-up | goal | met |\n"
        "|---:|---:|---|---:|---:|---|\n"
        f"| {grid['multi_seconds']:.1f} | {_f(grid['single_projected_seconds'], '.1f')} | "
        f"{grid['single_measured_runs']} ({grid['single_projection']}) | "
        f"{_f(grid['speedup'], '.2f')} | >= {grid['goal']} | {met} |"
    )


def _table5(studies: Mapping[str, Mapping]) -> str:
    if not studies:
        return ""
    rows = ["#### Step 6: Table 5 on MiniLM-L6 (asset bundle)", "",
            "| task | targets | seeds | steps | validation acc | test acc (mean ± sd) |",
            "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for study in studies.values():
        by_targets: dict[str, list[dict]] = {}
        for run in study["runs"]:
            by_targets.setdefault(run["name"].rsplit("_s", 1)[0], []).append(run)
        for targets, runs in by_targets.items():
            test = [r["test_accuracy"] for r in runs]
            val = statistics.mean(r["validation_accuracy"] for r in runs)
            sd = statistics.stdev(test) if len(test) > 1 else 0.0
            rows.append(f"| {study['task']} | {targets} | {len(runs)} | {study['steps']} | "
                        f"{val:.3f} | {statistics.mean(test):.3f} ± {sd:.3f} |")  # fmt: skip
    return "\n".join(rows)

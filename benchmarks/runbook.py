"""One command that spends a short GPU window well: a time-boxed, resumable benchmark run-book.

``python -m benchmarks.runbook --out=DIR --budget=SECONDS [--smoke] [--with-wheels=WHEELS]``

Runs the steps of :func:`benchmarks.runbook_steps.plan` in priority order (device and peak;
GPT-2 124M; the ~1B Llama; A/B of the speed paths; the many-adapters grid; Table 5 from an
asset bundle), each only if its estimated cost fits the budget left, each in its own process
(so each framework has the device to itself, and a crash or a hang costs one step). Every
attempt appends one line to ``DIR/records.jsonl`` (status, measured seconds, the estimate, the
result); a step with an ``ok`` line is not run again, so a second window with the same DIR goes
on where the first stopped, and an attempt that failed or ran out of time teaches the next
window its cost. Finally the report (``DIR/report.md``: the performance table, ratios to the
peers, the goals met or not) is rendered from everything in DIR (:mod:`benchmarks.runbook_report`).

DIR holds at most 8 small files: ``records.jsonl``, ``report.md``, ``log.txt`` (the steps'
output) and the four ``lorax-<model>.json`` / ``peer-<model>.json`` records that
``python -m benchmarks.compare --from=DIR`` also reads. Bulky by-products (the benchmark
scripts' own JSONL, the grid's and the studies' workdirs) go to ``--scratch``.

``--smoke`` is the same sequence on tiny models, on a CPU, in about two minutes: the test suite
runs it, so the command has run end to end before it meets a GPU. ``--wheels=DIR`` downloads
the pure-Python wheels a stock CUDA image lacks (:data:`WHEELS`); ``--with-wheels=DIR`` installs
them at the start of a window (``pip install --no-index --target``, offline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import probe, runbook_report, runbook_steps
from benchmarks import records as bench_records

# What a stock CUDA image holds (the GPU windows' machines; their full list is longer).
STOCK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "peft", "torch",
         "numpy", "safetensors", "tokenizers", "absl-py", "tqdm", "matplotlib")  # fmt: skip
# lorax's dependencies (pyproject.toml) that STOCK lacks, pinned to the versions tested here.
# Both are pure Python; their own requirements (absl-py, PyYAML, numpy, requests, tqdm) are on
# such an image. Not brought: ``datasets`` (only lorax.assets' Hub path, online, uses it) and
# ``tensorboardX`` (imported only by a run with log.tensorboard=True; no step of the run-book is).
WHEELS = ("ml-collections==1.1.0", "gguf==0.19.0")
NOT_BROUGHT = ("datasets", "tensorboardx")

RECORDS = "records.jsonl"
LOG = "log.txt"
DONE = "ok"
REDO = "redo"  # a marker line: the step's earlier 'ok' records no longer count as done


class Store:
    """The run-book's records in DIR: one JSON line per attempt at a step."""

    def __init__(self, out: str, profile: str, device: str = ""):
        self.out, self.profile = out, profile
        self.device = device  # what this window runs on (window_device), stamped on each line
        self.path = os.path.join(out, RECORDS)
        os.makedirs(out, exist_ok=True)
        self.lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for number, text in enumerate(f, 1):
                    try:
                        self.lines.append(json.loads(text))
                    except ValueError:  # a line cut off when a window ended mid-write
                        print(f"{self.path}:{number}: not a whole record, ignored", flush=True)
        other = {r["profile"] for r in self.lines} - {profile}
        if other:
            raise SystemExit(
                f"{self.path} holds records of the {sorted(other)} profile; this is the "
                f"{profile!r} profile: give another --out"
            )

    def done(self, key: str) -> bool:
        """An 'ok' record of ``key`` after its last :data:`REDO` marker."""
        ok = False
        for r in self.lines:
            if r["step"] == key:
                ok = r["status"] == DONE or (ok and r["status"] != REDO)
        return ok

    def last(self, key: str) -> dict | None:
        tries = [r for r in self.lines if r["step"] == key]
        return tries[-1] if tries else None

    def append(self, line: dict) -> None:
        """Appends one attempt (flushed and synced: a window can end at any moment)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines.append(line)


def estimate(step: runbook_steps.Step, store: Store) -> float:
    """The seconds a step is expected to take: its plan's estimate, or more where an earlier
    attempt that failed or ran out of time measured more (a timed-out attempt counts 1.5×)."""
    last = store.last(step.key)
    if last is None or last.get("seconds") is None:
        return step.estimate_s
    factor = 1.5 if last["status"] == "timeout" else 1.0
    return max(step.estimate_s, factor * last["seconds"])


class Runner:
    """Runs a step's commands as subprocesses against a deadline, their output teed to the
    log; what :class:`runbook_steps.Context` calls."""

    def __init__(self, out: str, env: dict[str, str], deadline: float):
        self.log_path = os.path.join(out, LOG)
        self.env, self.deadline = env, deadline

    def __call__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
        """Runs ``argv`` until it ends or the deadline passes; returns its output's tail.

        Raises:
          runbook_steps.StepTimeout: the deadline passed (the process group is killed).
          runbook_steps.StepFailed: a nonzero exit, with the output's tail.
        """
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise runbook_steps.StepTimeout("no time left")
        print("$ " + " ".join(argv), flush=True)
        tail: list[str] = []
        with open(self.log_path, "a") as log:
            log.write("$ " + " ".join(argv) + "\n")
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**self.env, **(env or {})}, start_new_session=True,
            )  # fmt: skip
            reader = threading.Thread(target=_tee, args=(proc.stdout, log, tail), daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                reader.join(5)
                raise runbook_steps.StepTimeout(
                    f"killed after {timeout:.0f} s: " + "".join(tail[-20:])
                ) from None
            reader.join(30)
        text = "".join(tail[-40:])
        if rc:
            raise runbook_steps.StepFailed(f"{' '.join(argv[1:4])} exited {rc}: {text}")
        return text


def _tee(stream, log, tail: list[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        tail.append(line)
        del tail[:-200]


def window_device(profile: runbook_steps.Profile) -> str:
    """What this window runs on, without importing JAX: the GPUs' ``nvidia-smi`` names on a
    GPU profile ("2 × NVIDIA H100 80GB HBM3" where several), "cpu" on the smoke profile."""
    if not profile.gpu:
        return "cpu"
    names = [g.get("name") or g.get("error", "?") for g in probe.nvidia_smi()]
    if not names:
        return "unknown (no nvidia-smi)"
    return names[0] if len(names) == 1 else f"{len(names)} × {names[0]}"


def redo(store: Store, profile: runbook_steps.Profile, prefixes: Sequence[str]):
    """Marks every recorded step whose key starts with one of ``prefixes`` to be run again
    (one :data:`REDO` line each, so a later window without ``--redo`` does not repeat it);
    an unknown prefix is an error naming the step keys."""
    keys = [s.key for s in runbook_steps.plan(profile)]
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in keys):
            raise SystemExit(f"--redo={prefix}: no step key starts with it; keys: {keys}")
    date = bench_records.now().isoformat(timespec="seconds")
    for key in keys:
        if store.done(key) and any(key.startswith(p) for p in prefixes):
            store.append({"step": key, "profile": store.profile, "status": REDO, "date": date,
                          "device": store.device})  # fmt: skip
            print(f"== {key}: recorded, to be run again (--redo)", flush=True)


def run_step(step: runbook_steps.Step, ctx: runbook_steps.Context, store: Store, est: float):
    """Runs one step (``ctx`` None: only its check) and appends its attempt to the store,
    except a 'not available' that repeats the last one; returns the status."""
    start, date = time.monotonic(), bench_records.now().isoformat(timespec="seconds")
    line: dict[str, Any] = {"step": step.key, "title": step.title, "profile": store.profile,
                            "date": date, "device": store.device,
                            "estimate_s": round(est, 1)}  # fmt: skip
    try:
        step.check()
        if ctx is None:
            return "available"
        line["result"] = step.run(ctx)
        line["status"] = DONE
    except runbook_steps.Unavailable as e:
        line.update(status="not available", reason=str(e))
    except runbook_steps.StepTimeout as e:
        line.update(status="timeout", error=str(e)[-2000:])
    except Exception as e:  # noqa: BLE001 -- one step's failure must not end the window
        line.update(status="failed", error=f"{type(e).__name__}: {e}"[-2000:])
    line["seconds"] = round(time.monotonic() - start, 2)
    last = store.last(step.key)
    repeat = last and last["status"] == line["status"] == "not available"
    if not (repeat and last.get("reason") == line.get("reason")):
        store.append(line)
    print(f"== {step.key}: {line['status']} in {line['seconds']:.0f} s", flush=True)
    return line["status"]


def run(args: argparse.Namespace) -> str:
    """Runs every step that is not yet recorded and fits the budget; renders and returns the
    report."""
    start = time.monotonic()
    profile = runbook_steps.PROFILES["smoke" if args.smoke else "gpu"]
    store = Store(args.out, profile.name, window_device(profile))
    print(f"== this window's device: {store.device}", flush=True)
    if args.redo:
        redo(store, profile, args.redo)
    scratch = args.scratch or os.path.join(tempfile.gettempdir(), "lorax-runbook")
    deadline = start + args.budget
    env = _environment(profile, scratch, args.with_wheels)
    ctx = runbook_steps.Context(
        out=os.path.abspath(args.out), scratch=scratch, profile=profile,
        call=Runner(args.out, env, deadline), env=env,
    )  # fmt: skip
    for step in runbook_steps.plan(profile):
        if store.done(step.key):
            print(f"== {step.key}: recorded, skipped", flush=True)
            continue
        if run_step(step, None, store, 0.0) != "available":
            continue
        est, left = estimate(step, store), deadline - time.monotonic()
        if est > left:
            print(f"== {step.key}: needs ~{est:.0f} s, {left:.0f} s left: not run", flush=True)
            continue
        print(f"== {step.key}: {step.title} (~{est:.0f} s, {left:.0f} s left)", flush=True)
        run_step(step, ctx, store, est)
    report = runbook_report.render(args.out)
    with open(os.path.join(args.out, runbook_report.REPORT), "w") as f:
        f.write(report)
    left = [s.key for s in runbook_steps.plan(profile) if not store.done(s.key)]
    print(f"\n{report}\nsteps not done: {left or 'none'}; records in {args.out}", flush=True)
    return report


def _environment(profile, scratch: str, wheel_dir: str) -> dict[str, str]:
    """The steps' environment: the profile's variables, and the carried wheels installed."""
    env = {**os.environ, **profile.env, "PYTHONUNBUFFERED": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [repo]
    if wheel_dir:
        site = os.path.join(scratch, "site")
        wheels = sorted(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--upgrade", "--target", site, *wheels]  # fmt: skip
        subprocess.run(cmd, check=True)
        paths.insert(0, site)  # for the steps' processes; this one needs none of them
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def download_wheels(directory: str) -> list[str]:
    """``pip download --no-deps`` each of :data:`WHEELS` into ``directory``; returns the files."""
    os.makedirs(directory, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", directory, *WHEELS]  # fmt: skip
    subprocess.run(cmd, check=True)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".whl"))
    print(f"{len(files)} wheels in {directory}: {', '.join(files)}")
    return files


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runbook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="", help="the records' directory (a second run continues)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds this run may spend")
    p.add_argument("--smoke", action="store_true", help="tiny models on a CPU (the tests)")
    p.add_argument("--scratch", default="", help="by-products (default: $TMPDIR/lorax-runbook)")
    p.add_argument("--with-wheels", default="", help="install these wheels first (offline)")
    p.add_argument("--wheels", default="", help="only download WHEELS into this directory")
    p.add_argument("--render", action="store_true", help="only render DIR/report.md")
    p.add_argument("--redo", default="", type=lambda v: [k for k in v.split(",") if k],
                   help="run these recorded steps again (step-key prefixes: 2/,3/)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.wheels and not args.out:
        p.error("--out=DIR is required (or --wheels=DIR)")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.wheels:
        return "\n".join(download_wheels(args.wheels))
    if args.render:  # what a run writes at its end, from the records alone
        report = runbook_report.render(args.out)
        with open(os.path.join(args.out, runbook_report.REPORT), "w") as f:
            f.write(report)
        print(report)
        return report
    return run(args)


if __name__ == "__main__":
    main()

"""The GPU run-book (benchmarks/runbook.py): the whole --smoke sequence runs end to end on a CPU
and a second run skips what is recorded; the budget decides what runs; failures and timeouts
are recorded and teach the next estimate; the wheels cover what a stock image lacks."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from benchmarks import runbook, runbook_report, runbook_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(out) -> list[dict]:
    with open(os.path.join(out, runbook.RECORDS)) as f:
        return [json.loads(line) for line in f]


def _runbook(out, scratch, *argv, env=None):
    cmd = [sys.executable, "-m", "benchmarks.runbook", f"--out={out}", f"--scratch={scratch}",
           *argv]  # fmt: skip
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "LORAX_CACHE"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_smoke_runs_every_step_then_a_second_run_skips_them(tmp_path):
    """``--smoke`` runs steps 1-5 on tiny models, each recorded 'ok' with its
    result; step 6 (no bundle) is 'not available'. DIR stays small (<= 8 files), its report has
    the performance table, ratios, goals, A/B rows and the grid, and ``benchmarks.compare
    --from=DIR`` renders the same records. A second run skips every recorded step at once."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    _runbook(out, scratch, "--smoke", "--budget=900")  # how long it takes: records' seconds
    lines = _records(out)
    status = {r["step"]: r["status"] for r in lines}
    keys = [s.key for s in runbook_steps.plan(runbook_steps.PROFILES["smoke"])]
    assert list(status) == keys
    gpu_pairs = tuple(
        f"4/ab/{'-'.join(p.name.split())}/" for p in runbook_steps.AB_PAIRS if p.gpu_only
    )
    # cuDNN attention, the chunked loss, its gradient in the forward pass
    assert len(gpu_pairs) == 3
    gpu_only = [k for k in keys if k.startswith(gpu_pairs)]
    assert gpu_only and all(status[k] == "not available" for k in gpu_only)
    assert {k: v for k, v in status.items() if not k.startswith("6/") and k not in gpu_only} == (
        dict.fromkeys([k for k in keys if not k.startswith("6/") and k not in gpu_only], "ok")
    )
    assert status["6/table5/snli"] == "not available"
    assert all(r["seconds"] >= 0 and r["estimate_s"] > 0 for r in lines if r["status"] == "ok")
    files = sorted(os.listdir(out))
    sides = [f"{side}-{m}.json" for side in ("lorax", "peer") for m in ("tiny-gpt2", "tiny")]
    assert files == sorted(["records.jsonl", "report.md", "log.txt", *sides])
    assert sum(os.path.getsize(out / f) for f in files) < 1_000_000
    device = lines[0]["result"]
    assert device["peaks"]["measured_tflops"] > 0 and device["versions"]["jax"]
    grid = next(r["result"] for r in lines if r["step"] == "5/grid")
    assert grid["runs"] == 7 and grid["single_measured_runs"] == 2
    assert grid["multi_seconds"] > 0 and grid["speedup"] > 0
    report = (out / "report.md").read_text()
    needles = ("| tiny-gpt2 | lorax | lora |", "| tiny | peft | eager |",
               "| 4. LoRA tokens/s vs full fine-tuning | tiny-gpt2 |",
               "| scan over layers | tiny | lora |", "#### Step 5", "not available",
               "where the LoRA step's time goes", "| tiny | backward | layers_*/")  # fmt: skip
    for needle in needles:
        assert needle in report, needle
    compare = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", f"--from={out}", "--models=tiny-gpt2,tiny"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "| tiny | lorax | multi x2 |" in compare

    again = _runbook(out, scratch, "--smoke", "--budget=900")
    assert _records(out) == lines  # nothing ran, not even a repeated 'not available'
    for key in keys[:-2]:  # 'not available' steps are asked again (at no cost)
        done = "not available in 0 s" if key in gpu_only else "recorded, skipped"
        assert f"== {key}: {done}" in again


# --------------------------------------------------------------------------- the scheduler


def _fake_plan(monkeypatch, steps):
    monkeypatch.setattr(runbook_steps, "plan", lambda profile: steps)


def _sleep(seconds: float):
    def run(ctx):
        ctx.call([sys.executable, "-c", f"import time; time.sleep({seconds}); print('slept')"])
        return {"slept": seconds}

    return run


def _run(out, budget, monkeypatch, tmp_path):
    return runbook.run(runbook.parse_args(
        [f"--out={out}", f"--scratch={tmp_path / 'scratch'}", f"--budget={budget}", "--smoke"]
    ))  # fmt: skip


def test_budget_decides_what_runs_and_failures_teach_the_next_estimate(
    tmp_path, monkeypatch, capsys
):
    """A step whose estimate exceeds the budget left is not run (a cheaper later one is); a
    failing step is recorded 'failed' with its error and runs again next time; a step that
    outlives the budget is killed, recorded 'timeout', and next time needs 1.5x its time."""
    out = tmp_path / "out"

    def fail(ctx):
        ctx.call([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])

    _fake_plan(monkeypatch, [
        runbook_steps.Step("a/too-big", "costs more than the budget", 1000, _sleep(0)),
        runbook_steps.Step("b/fails", "exits 3", 1, fail),
        runbook_steps.Step("c/fits", "sleeps 0.1 s", 1, _sleep(0.1)),
        runbook_steps.Step("d/hangs", "sleeps past the budget", 1, _sleep(60)),
    ])  # fmt: skip
    report = _run(out, 8, monkeypatch, tmp_path)
    stdout = capsys.readouterr().out
    assert "== a/too-big: needs ~1000 s" in stdout
    lines = {r["step"]: r for r in _records(out)}
    assert list(lines) == ["b/fails", "c/fits", "d/hangs"]
    assert lines["b/fails"]["status"] == "failed" and "exited 3" in lines["b/fails"]["error"]
    assert "boom" in lines["b/fails"]["error"]
    assert lines["c/fits"]["status"] == "ok" and lines["c/fits"]["result"] == {"slept": 0.1}
    assert lines["d/hangs"]["status"] == "timeout"  # killed, not slept out
    assert "| d/hangs | timeout |" in report
    store = runbook.Store(str(out), "smoke")
    hang = runbook_steps.Step("d/hangs", "", 1, _sleep(60))
    assert runbook.estimate(hang, store) == pytest.approx(1.5 * lines["d/hangs"]["seconds"])
    assert store.done("c/fits") and not store.done("b/fails")


def test_empty_ab_registry_is_recorded_as_not_available_once(tmp_path, monkeypatch):
    """With no speed path registered, step 4 is one 'not available' line naming the registry,
    written once however often the run-book runs; the report shows it."""
    monkeypatch.setattr(runbook_steps, "AB_PAIRS", ())
    steps = [s for s in runbook_steps.plan(runbook_steps.PROFILES["smoke"]) if s.key == "4/ab"]
    assert len(steps) == 1
    _fake_plan(monkeypatch, steps)
    for _ in range(2):
        report = _run(tmp_path / "out", 5, monkeypatch, tmp_path)
    (line,) = _records(tmp_path / "out")
    assert line["status"] == "not available" and "AB_PAIRS is empty" in line["reason"]
    assert "4/ab | not available: no speed path" in report


def test_table5_step_needs_a_bundle(tmp_path, monkeypatch):
    """Step 6 is available only where LORAX_CACHE holds MiniLM-L6 and both data sets."""
    monkeypatch.delenv("LORAX_CACHE", raising=False)
    with pytest.raises(runbook_steps.Unavailable, match="LORAX_CACHE is not set"):
        runbook_steps.bundle_root()
    for name in ("minilm-l6", "snli"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".lorax-complete").write_text("x")
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path))
    with pytest.raises(runbook_steps.Unavailable, match=r"lacks the assets \['rotten-tomatoes'\]"):
        runbook_steps.bundle_root()
    (tmp_path / "rotten-tomatoes").mkdir()
    (tmp_path / "rotten-tomatoes" / ".lorax-complete").write_text("x")
    assert runbook_steps.bundle_root() == str(tmp_path)


def test_a_record_cut_off_mid_write_is_ignored(tmp_path, capsys):
    """A last line cut off when a window ended is skipped with a note; whole lines count."""
    out = tmp_path / "out"
    out.mkdir()
    whole = {"step": "1/device", "profile": "smoke", "status": "ok", "seconds": 3}
    (out / runbook.RECORDS).write_text(json.dumps(whole) + '\n{"step": "2/tiny')
    store = runbook.Store(str(out), "smoke")
    assert store.done("1/device") and len(store.lines) == 1
    assert f"{out / runbook.RECORDS}:2: not a whole record, ignored" in capsys.readouterr().out


def test_records_of_another_profile_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / runbook.RECORDS).write_text(json.dumps({"step": "1/device", "profile": "gpu",
                                                   "status": "ok"}) + "\n")  # fmt: skip
    with pytest.raises(SystemExit, match="'gpu'.*profile"):
        runbook.Store(str(out), "smoke")
    assert runbook_report.render(str(tmp_path / "empty")).startswith("no run-book records")


def test_a_profile_that_could_not_be_read_is_reported_not_fatal(tmp_path, monkeypatch):
    """A trace that cannot be read (no profiler support on the device, say) leaves the step's
    timings standing, its error in the record, and the report names it; ``--render`` writes
    DIR/report.md from the records alone."""
    from benchmarks import models, xprof
    from benchmarks import step as bench_step
    from lorax.models import decoder

    def broken(*args, **kwargs):
        raise RuntimeError("the profiler wrote no trace")

    monkeypatch.setattr(xprof, "profile", broken)
    bench = models.get("tiny")
    model = decoder.Decoder(bench.decoder_config())
    batch = bench_step.random_batch(bench.decoder_config().vocab_size, 2, 16)
    built = bench_step.build_step("lora", bench, model, batch, mesh=bench_step.one_device_mesh())
    timed = bench_step.time_step(built, 1, 1, profile=2)
    assert timed["times"] and timed["profile"] == {
        "error": "RuntimeError: the profiler wrote no trace"
    }

    out = tmp_path / "out"
    store = runbook.Store(str(out), "smoke")
    store.append({"step": "4/profile/tiny", "profile": "smoke", "status": "ok", "seconds": 1,
                  "estimate_s": 1, "result": {"model": "tiny", "args": {"attention_kernel": "xla"},
                                              "tokens_per_s": 100.0, "step_s": 1.0,
                                              "profile": timed["profile"]}})  # fmt: skip
    runbook.main([f"--out={out}", "--render"])
    assert (
        "| tiny | xla | | 100 | | | | no profile: RuntimeError" in (out / "report.md").read_text()
    )


# --------------------------------------------------------------------------- what it imports


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_wheels_are_what_a_stock_image_lacks_pinned_to_the_tested_versions():
    """WHEELS names exactly lorax's dependencies that a stock CUDA image lacks (less the
    documented NOT_BROUGHT), each pinned to the version installed here."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = {_name(d) for d in tomllib.load(f)["project"]["dependencies"]}
    lacking = deps - set(runbook.STOCK) - set(runbook.NOT_BROUGHT)
    assert {_name(w) for w in runbook.WHEELS} == lacking
    for wheel in runbook.WHEELS:
        name, version = wheel.split("==")
        assert importlib.metadata.version(name) == version, wheel


def test_runbook_imports_neither_jax_nor_torch():
    """The run-book's own process leaves the device to its steps' processes."""
    heavy = "{'jax', 'torch', 'lorax', 'ml_collections'}"
    code = f"import sys, benchmarks.runbook; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_carried_wheels_are_installed_offline_for_the_steps(tmp_path, monkeypatch):
    """``--with-wheels=DIR`` installs DIR's wheels with no index and the steps' processes
    import them (a step that imports a package only the wheel has succeeds)."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "carried_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("carried_probe/__init__.py", "VALUE = 17\n")
        info = "carried_probe-1.0.dist-info/"
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n")
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")  # fmt: skip
        z.writestr(info + "RECORD", "")

    def imports(ctx):
        out = ctx.call([sys.executable, "-c", "import carried_probe; print(carried_probe.VALUE)"])
        return {"value": int(out.split()[-1])}

    _fake_plan(monkeypatch, [runbook_steps.Step("w/imports", "imports the wheel", 1, imports)])
    runbook.run(runbook.parse_args([
        f"--out={tmp_path / 'out'}", f"--scratch={tmp_path / 'scratch'}", "--budget=60",
        "--smoke", f"--with-wheels={wheels}",
    ]))  # fmt: skip
    (line,) = _records(tmp_path / "out")
    assert line["status"] == "ok" and line["result"] == {"value": 17}


def test_each_record_names_its_device_and_redo_runs_recorded_steps_again(
    tmp_path, monkeypatch, capsys
):
    """Every attempt records the window's device; ``--redo=PREFIX`` runs recorded steps again
    once (a marker line, so the next window does not repeat them) and the report shows each
    step's device, warning when the steps ran on more than one; an unknown prefix is named."""
    out = tmp_path / "out"
    _fake_plan(monkeypatch, [
        runbook_steps.Step("a/kept", "sleeps 0 s", 1, _sleep(0)),
        runbook_steps.Step("b/redone", "sleeps 0 s", 1, _sleep(0)),
    ])  # fmt: skip
    monkeypatch.setattr(runbook, "window_device", lambda profile: "GPU-A")
    _run(out, 30, monkeypatch, tmp_path)
    assert [(r["step"], r["device"]) for r in _records(out)] == [("a/kept", "GPU-A"),
                                                                 ("b/redone", "GPU-A")]  # fmt: skip

    monkeypatch.setattr(runbook, "window_device", lambda profile: "GPU-B")
    args = [f"--out={out}", f"--scratch={tmp_path / 'scratch'}", "--budget=30", "--smoke"]
    report = runbook.run(runbook.parse_args([*args, "--redo=b/"]))
    lines = _records(out)
    assert [(r["step"], r["status"], r["device"]) for r in lines[2:]] == [
        ("b/redone", "redo", "GPU-B"), ("b/redone", "ok", "GPU-B")]  # fmt: skip
    assert "| a/kept | ok | GPU-A |" in report and "| b/redone | ok | GPU-B |" in report
    assert "ran on 2 devices" in report
    runbook.run(runbook.parse_args(args))  # a later window without --redo: nothing to do
    assert _records(out) == lines

    store = runbook.Store(str(out), "smoke")
    store.append({"step": "a/kept", "profile": "smoke", "status": runbook.REDO})
    assert not store.done("a/kept") and "recorded, to be run again" in runbook_report.render(
        str(out)
    )
    store.append({"step": "a/kept", "profile": "smoke", "status": "failed", "seconds": 1})
    assert not store.done("a/kept") and store.done("b/redone")
    with pytest.raises(SystemExit, match=r"--redo=c/: no step key starts with it.*a/kept"):
        runbook.run(runbook.parse_args([*args, "--redo=c/"]))

"""Reliability: kill -9 at random points and resume, corrupt checkpoints, NaN handling, bad data.

The kill tests run the real commands in subprocesses and SIGKILL them while they train,
checkpoint, evaluate or write their results, several times, then rerun the same command to the
end; the final adapters must equal those of a run that was never interrupted, bit for bit.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, poison_losses, tiny_config, train_until_interrupted

from lorax import checkpoints, loop, paths
from lorax import data as data_lib
from lorax import train as train_lib
from lorax.checkpoints.state import Checkpointer, CorruptCheckpointError

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _train_rows(metrics_path) -> list[dict]:
    """The train rows of a metrics.jsonl (a half-written last line is ignored)."""
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("split") == "train":
                    rows.append(row)
    return rows


def _progress(pattern: str) -> int:
    """Train rows logged so far in every metrics.jsonl matching ``pattern``."""
    return sum(len(_train_rows(p)) for p in glob.glob(pattern))


def _kill_when(cmd, progress, at: int, rng: random.Random, cwd=REPO) -> bool:
    """Starts ``cmd``; SIGKILLs it a random moment after ``progress() >= at``.

    Returns True if it was killed, False if it finished first (then it must have succeeded).
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600
    while proc.poll() is None and progress() < at and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))  # lands in a step, a save, an eval or a write
    if proc.poll() is not None:
        err = proc.stderr.read().decode()[-3000:]
        assert proc.returncode == 0, err
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return True


def _assert_json_files_whole(root) -> None:
    """Every .json result under ``root`` parses: no half-written summary, config or results."""
    for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
        if "/checkpoints" in path or "/job/" in path:
            continue  # Orbax's own files (it commits by renaming a finished directory)
        with open(path) as f:
            json.load(f)


def _final_trainable(workdir) -> dict[str, np.ndarray]:
    ckpt = Checkpointer(workdir)
    state = ckpt.restore(None)
    ckpt.close()
    return {k: np.asarray(v) for k, v in paths.flatten(state["trainable"]).items()}


def _assert_same_adapter(a_dir, b_dir) -> None:
    a, b = _final_trainable(a_dir), _final_trainable(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _train_cmd(model_dir, data_dir, workdir, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "lorax.train", "--config=configs/wq_wv_r4.py",
        f"--config.model.name={model_dir}", f"--config.task.data={data_dir}",
        "--config.task.max_length=64", "--config.task.buckets=(32,64)",
        "--config.task.validation_size=64", "--config.train.batch_size=16",
        f"--config.train.num_steps={steps}", "--config.train.learning_rate=0.01",
        "--config.model.dropout=0.1", "--config.lora.dropout=0.1",  # rng must resume too
        "--config.log_every=1", "--config.eval_every=10", "--config.checkpoint_every=4",
        "--config.eval_batch_size=32", f"--workdir={workdir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_kill9_training_at_random_points_then_resume_is_bitwise(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """`python -m lorax.train` SIGKILLed three times at random points (in steps, checkpoint
    saves and evals) and rerun each time with the same command ends with the same adapter, bit
    for bit, as an uninterrupted run; its JSON files are never half-written and its
    metrics.jsonl has each train step exactly once."""
    steps = 40
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    subprocess.run(
        _train_cmd(tiny_model_dir, tiny_snli_dir, straight, steps),
        cwd=REPO, env=ENV, check=True, capture_output=True,
    )  # fmt: skip
    rng = random.Random(7)
    cmd = _train_cmd(tiny_model_dir, tiny_snli_dir, cut, steps)
    kills, at = 0, 0
    for _ in range(3):
        at = rng.randint(at + 3, at + 12)  # a later point each time: progress between kills
        kills += _kill_when(cmd, lambda: _progress(str(cut / "metrics.jsonl")), at, rng)
        _assert_json_files_whole(cut)
    assert kills >= 2, "the run finished before it could be killed"
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_adapter(straight, cut)
    assert [r["step"] for r in _train_rows(cut / "metrics.jsonl")] == list(range(1, steps + 1))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from"] > 0
    expected = json.loads((straight / "summary.json").read_text())
    assert summary["test_accuracy"] == expected["test_accuracy"]


SWEEP_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from helpers import tiny_config
from experiments import sweep, table5
base = tiny_config({model!r}, {data!r}, **{{"train.num_steps": 24, "checkpoint_every": 4,
                   "model.dropout": 0.1}})
names = ("q_r8_s0", "v_r8_s0", "qv_r4_s0", "qkvo_r2_s0")
runs = [r for r in table5.grid(seeds=1) if r.name in names]
sweep.run_study("kill", runs, base, root={root!r}, max_adapters=2)
"""


@pytest.mark.slow
def test_kill9_sweep_job_then_resume_redoes_only_unfinished_runs(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """A sweep of two 2-adapter jobs SIGKILLed during its first job, then during its second,
    then rerun: every run's adapter equals the uninterrupted sweep's bit for bit, the first
    job's finished runs are not written again, and results.json is whole and complete."""

    def script(root):
        return [sys.executable, "-c", SWEEP_SCRIPT.format(
            repo=REPO, tests=os.path.dirname(__file__), model=str(tiny_model_dir),
            data=str(tiny_snli_dir), root=str(root),
        )]  # fmt: skip

    subprocess.run(script(tmp_path / "straight"), cwd=REPO, env=ENV, check=True,
                   capture_output=True)  # fmt: skip
    cut = tmp_path / "cut"
    study = cut / "kill"
    progress = lambda: _progress(str(study / "*" / "metrics.jsonl"))
    rng = random.Random(3)
    # Each adapter logs one train row per step: 24 steps x 2 adapters per job.
    assert _kill_when(script(cut), progress, rng.randint(10, 30), rng)
    _assert_json_files_whole(cut)
    first_job = ("q_r8_s0", "v_r8_s0")
    assert _kill_when(script(cut), progress, rng.randint(60, 80), rng)  # in the second job
    _assert_json_files_whole(cut)
    assert all((study / name / "summary.json").exists() for name in first_job)
    written = {n: (study / n / "summary.json").stat().st_mtime_ns for n in first_job}

    done = subprocess.run(script(cut), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {n: (study / n / "summary.json").stat().st_mtime_ns for n in first_job} == written
    for name in ("q_r8_s0", "v_r8_s0", "qv_r4_s0", "qkvo_r2_s0"):
        _assert_same_adapter(tmp_path / "straight" / "kill" / name, study / name)
    assert json.loads((study / "qv_r4_s0" / "summary.json").read_text())["resumed_from"] > 0
    results = json.loads((study / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["q_r8_s0", "v_r8_s0", "qv_r4_s0", "qkvo_r2_s0"]


# --------------------------------------------------------------------------- checkpoints


def _corrupt(step_dir, how: str) -> None:
    """Damages every array data file of one Orbax checkpoint directory (OCDBT keeps some
    files a restore never reads, so damaging one may not be noticed, or matter)."""
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files, f"no array data under {step_dir}"
    for path in files:
        data = bytearray(open(path, "rb").read())
        if how == "truncate":
            data = data[: len(data) // 2]
        elif how == "flip":
            data[len(data) // 2] ^= 0x5A
        else:
            raise ValueError(how)
        open(path, "wb").write(data)


CORRUPT_OVERRIDES = {"checkpoint_every": 2, "keep_checkpoints": 3}
RESUME_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from helpers import tiny_config
from test_reliability import CORRUPT_OVERRIDES
from lorax import train
train.train_and_evaluate(tiny_config({model!r}, {data!r}, **CORRUPT_OVERRIDES), {workdir!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch, how
):
    """A run cut off after its step-4 checkpoint, whose step-4 files are then truncated or
    bit-flipped, resumes from step 2, says so, keeps the bad copy aside, and still ends with
    the uninterrupted run's adapter."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **CORRUPT_OVERRIDES)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train_lib.train_and_evaluate(config, str(straight))

    train_until_interrupted(config, cut, 5, monkeypatch)
    _corrupt(cut / "checkpoints" / "4", how)
    # Resumed in a new process, as after a crash: this one's TensorStore cache still holds the
    # step-4 arrays it wrote and would serve them without reading the damaged files.
    script = RESUME_SCRIPT.format(
        repo=REPO, tests=os.path.dirname(__file__), model=str(tiny_model_dir),
        data=str(tiny_snli_dir), workdir=str(cut),
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint at step 4 is corrupt" in done.stdout
    assert "resuming from the checkpoint at step 2 (the newest intact one)" in done.stdout
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] == 2
    assert len(glob.glob(str(cut / "checkpoints-corrupt" / "4-*"))) == 1  # kept, not deleted
    _assert_same_adapter(straight, cut)


def _save_steps(workdir, steps, value=1.0):
    ckpt = Checkpointer(workdir, keep=5)
    for s in steps:
        ckpt.save(s, {"step": np.int32(s), "trainable": {"w": np.full((4, 3), value * s)}})
    ckpt.wait()
    ckpt.close()


def test_checkpoint_damage_is_told_apart_from_a_config_mismatch(tmp_path):
    """A damaged checkpoint raises CorruptCheckpointError; one that is whole but shaped for
    another config raises the mismatch naming the leaf and both shapes, and nothing is moved;
    when every checkpoint is damaged, none is restored and each is reported."""
    _save_steps(tmp_path, [1, 2])
    like = {"step": np.int32(0), "trainable": {"w": np.zeros((4, 3))}}
    other = {"step": np.int32(0), "trainable": {"w": np.zeros((4, 5))}}
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match=r"leaf trainable/w is float64\[4, 3\]; the run needs "
                       r"float64\[4, 5\]"):  # fmt: skip
        ckpt.restore_latest_good(other)
    assert ckpt.all_steps() == [1, 2]
    os.remove(tmp_path / "checkpoints" / "2" / "integrity" / "metadata")
    with pytest.raises(CorruptCheckpointError, match="integrity record is unreadable"):
        ckpt.restore(like, 2)
    _corrupt(tmp_path / "checkpoints" / "1", "flip")
    state, notes = ckpt.restore_latest_good(like)
    assert state is None and len(notes) == 2
    assert "step 2 is corrupt" in notes[0] and "step 1 is corrupt" in notes[1]
    assert ckpt.all_steps() == []
    ckpt.close()


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.slow
def test_nonfinite_batches_can_be_skipped_instead(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """With train.skip_nonfinite, the batches whose loss is NaN (steps 2 and 4 here) are
    skipped and logged, the others train, and the adapter stays finite; without it the same
    run stops at step 2, naming the last good checkpoint."""
    # logged as steps 2 and 4 (the step count after each)
    poison_losses(monkeypatch, lambda batcher, step: step in (1, 3))
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.skip_nonfinite": True})
    train_lib.train_and_evaluate(config, str(tmp_path / "skip"))
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [2, 4]
    trained = [r["step"] for r in rows if r["split"] == "train" and "loss" in r]
    assert trained == [1, 2, 3, 4, 5, 6]  # every step logs; 2 and 4 averaged over no batch
    assert all(np.isfinite(v).all() for v in _final_trainable(tmp_path / "skip").values())

    config.train.skip_nonfinite = False
    with pytest.raises(
        loop.NonFiniteLossError, match=r"NaN/Inf at step 2; .* Last good checkpoint: none"
    ):
        train_lib.train_and_evaluate(config, str(tmp_path / "stop"))


# --------------------------------------------------------------------------- bad data


def test_bad_rows_are_counted_in_summary_json(tiny_model_dir, tiny_snli_dir, tmp_path):
    """A train file with non-UTF-8 bytes, broken JSON, missing fields, no gold label, empty
    and overlong texts trains to the end; summary.json counts each case."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "test.jsonl").write_bytes((tiny_snli_dir / "test.jsonl").read_bytes())
    good = (tiny_snli_dir / "train.jsonl").read_bytes()
    bad = [
        b'{"sentence1": "caf\xe9 \xff", "sentence2": "a place", "gold_label": "neutral"}',
        b'{"sentence1": "no end", ',
        b'{"sentence2": "no premise", "gold_label": "neutral"}',
        b'{"sentence1": "a", "sentence2": "b", "gold_label": "-"}',
        b'{"sentence1": " ", "sentence2": "b", "gold_label": "neutral"}',
        json.dumps(
            {"sentence1": "long " * 3000, "sentence2": "b", "gold_label": "neutral"}
        ).encode(),
    ]
    (data_dir / "train.jsonl").write_bytes(good + b"\n".join(bad) + b"\n")
    config = tiny_config(tiny_model_dir, data_dir, **{"train.num_steps": 2})
    summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    c = json.loads((tmp_path / "run" / "summary.json").read_text())["data_counts"]
    assert c == summary["data_counts"]
    assert c["train/bad_utf8"] == 1
    assert c["train/skipped_bad_json"] == 1
    assert c["train/skipped_missing_field"] == 1
    assert c["train/skipped_empty_text"] == 1
    assert c["train/skipped_no_gold_label"] >= 1
    tokenizer = checkpoints.load_tokenizer(tiny_model_dir)
    clean = data_lib.load_task(
        "snli", tiny_snli_dir, tokenizer, max_length=64, validation_size=64
    ).counts
    cut = lambda counts: counts["train/truncated"] + counts["validation/truncated"]
    assert cut(c) == cut(clean) + 1  # the overlong premise, cut to max_length

"""The host loop (lorax/loop.py) that single runs and multi-adapter jobs share: the logged
training loss is its window's mean, and the NaN/Inf policy applies on every step, log step or
not, alone and in a job."""

import json

import numpy as np
import pytest
from helpers import poison_losses, tiny_config

from lorax import loop, multi
from lorax import train as train_lib


def _train_rows(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train" and "loss" in r}


def _configs(model_dir, data_dir, log_every, seeds):
    out = []
    for seed in seeds:
        c = tiny_config(model_dir, data_dir, **{"train.num_steps": 6, "checkpoint_every": 0})
        c.seed, c.log_every = seed, log_every
        out.append(c)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", [False, True], ids=["single", "job"])
def test_logged_training_loss_is_the_mean_over_its_window(
    tiny_model_dir, tiny_snli_dir, tmp_path, job
):
    """With log_every = 3 the row at steps 3 and 6 holds the mean loss and accuracy of the
    three steps before it, as logged one by one (log_every = 1) by the same run; for a run
    alone and for each adapter of a two-adapter job (every training batch is full, so the
    window's mean is the plain mean of its steps)."""
    names = ("a", "b") if job else ("a",)
    for log_every in (1, 3):
        configs = _configs(tiny_model_dir, tiny_snli_dir, log_every, range(len(names)))
        dirs = [str(tmp_path / f"{n}{log_every}") for n in names]
        if job:
            multi.train_many(configs, dirs)
        else:
            train_lib.train_and_evaluate(configs[0], dirs[0])
    for n in names:
        each, windows = _train_rows(tmp_path / f"{n}1"), _train_rows(tmp_path / f"{n}3")
        assert sorted(each) == [1, 2, 3, 4, 5, 6] and sorted(windows) == [3, 6]
        for end in (3, 6):
            for key in ("loss", "accuracy"):
                mean = np.mean([each[s][key] for s in range(end - 2, end + 1)])
                np.testing.assert_allclose(windows[end][key], mean, rtol=1e-5, err_msg=key)
        assert len({each[s]["loss"] for s in (1, 2, 3)}) == 3  # the steps differ: a real mean


@pytest.fixture
def nan_at_step_2_for_seed_1(monkeypatch):
    """Makes the loss NaN on the batch of step index 1 (logged as step 2) of seed 1's data."""
    poison_losses(monkeypatch, lambda batcher, step: step == 1 and batcher.seed == 1)


def test_a_nan_between_log_steps_stops_a_job_naming_the_step_and_adapter(
    tiny_model_dir, tiny_snli_dir, tmp_path, nan_at_step_2_for_seed_1
):
    """log_every = 3, the NaN on step 2 (not a log step) of the second adapter: the job
    stops there, naming the step and that adapter's workdir."""
    configs = _configs(tiny_model_dir, tiny_snli_dir, 3, (0, 1))
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step 2 in \[.*/b'\]"):
        multi.train_many(configs, dirs)


def test_a_nan_between_log_steps_is_skipped_and_logged_in_a_job(
    tiny_model_dir, tiny_snli_dir, tmp_path, nan_at_step_2_for_seed_1
):
    """With train.skip_nonfinite the same job finishes: the second adapter logs the skipped
    step 2 and its window mean (steps 1 and 3) stays finite; the first adapter skips nothing."""
    configs = _configs(tiny_model_dir, tiny_snli_dir, 3, (0, 1))
    for c in configs:
        c.train.skip_nonfinite = True
    dirs = [tmp_path / "a", tmp_path / "b"]
    multi.train_many(configs, [str(d) for d in dirs])
    for d, skipped in zip(dirs, ([], [2]), strict=True):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == skipped
        assert all(np.isfinite(r["loss"]) for r in _train_rows(d).values())
        assert json.loads((d / "summary.json").read_text())["test_accuracy"] >= 0

"""A workdir has one writer and one config (lorax/runlock.py, runfiles.write_config_once),
bad numbers and bad rows are caught early, skipping NaN batches has limits, and every JSON
file is strict JSON."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from helpers import REPO, poison_losses, tiny_config

from lorax import data, loop, runfiles, runlock
from lorax import train as train_lib

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from lorax import runlock
with runlock.hold({workdir!r}):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
    tiny_model_dir, tiny_snli_dir, tmp_path, capsys
):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=REPO, workdir=workdir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2})
        with pytest.raises(runlock.WorkdirBusyError, match=rf"in use by .* pid {holder.pid}\b"):
            train_lib.train_and_evaluate(config, workdir)
        assert sorted(os.listdir(workdir)) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock
        holder.wait()
        holder.stdout.close()
    summary = train_lib.train_and_evaluate(config, workdir)
    assert f"pid {holder.pid}" in capsys.readouterr().out  # "taking over the lock ... left by"
    assert summary["steps"] == 2


def test_a_rerun_with_another_config_is_refused_and_config_json_is_kept(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """A finished run rerun with another alpha is refused before anything is written, naming
    the field and both values; logging and evaluation cadence may change (the result does
    not); an unfinished job's workdir refuses the same way."""
    workdir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2})
    first = train_lib.train_and_evaluate(config, str(workdir))
    written = (workdir / "config.json").read_bytes()
    changed = tiny_config(
        tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2, "lora.alpha": 16.0}
    )
    with pytest.raises(ValueError, match=r"lora\.alpha: 8\.0 -> 16\.0.*new --workdir"):
        train_lib.train_and_evaluate(changed, str(workdir))
    assert (workdir / "config.json").read_bytes() == written
    cadence = tiny_config(
        tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2, "log_every": 2, "eval_every": 1}
    )
    assert train_lib.train_and_evaluate(cadence, str(workdir)) == first
    from lorax import multi

    with pytest.raises(ValueError, match=r"lora\.alpha: 8\.0 -> 16\.0"):
        multi.train_many([changed], [str(workdir)])


@pytest.mark.parametrize(
    "field, value",
    [("train.num_steps", 0), ("train.num_steps", -3), ("train.batch_size", 0),
     ("eval_batch_size", 0), ("log_every", 0), ("seed", -1), ("train.warmup_fraction", 1.5),
     ("lora.dropout", -0.1), ("keep_checkpoints", 0)],
)  # fmt: skip
def test_numbers_out_of_range_stop_before_any_compute_and_leave_no_workdir(
    tiny_model_dir, tiny_snli_dir, tmp_path, field, value
):
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{field: value})
    with pytest.raises(ValueError, match=rf"^{field} = {value!r} is not valid; it must be"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_named(tiny_model_dir, tiny_snli_dir, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    config = tiny_config(tiny_model_dir, tiny_snli_dir)
    with pytest.raises(NotADirectoryError, match=r"run exists and is not a directory"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_run_that_keeps_skipping_nan_batches_is_stopped(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """skip_nonfinite with every batch from step 3 on NaN (a diverging run) stops after
    train.max_skipped_consecutive skips in a row, naming them, instead of exiting 0."""
    poison_losses(monkeypatch, lambda batcher, step: step >= 2)
    config = tiny_config(
        tiny_model_dir, tiny_snli_dir,
        **{"train.num_steps": 12, "train.skip_nonfinite": True,
           "train.max_skipped_consecutive": 3},
    )  # fmt: skip
    with pytest.raises(loop.NonFiniteLossError, match=r"4 in a row; steps \[3, 4, 5, 6\]"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_json_files_are_strict_with_nonfinite_numbers_recorded(tmp_path):
    path = tmp_path / "summary.json"
    runfiles.write_json_atomic(path, {"loss": math.nan, "acc": 0.5, "by": {"x": -math.inf}})

    def refuse(name):
        raise AssertionError(f"bare {name} in {path}")

    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got == {"loss": None, "acc": 0.5, "by": {"x": None},
                   "nonfinite": {"loss": "nan", "by.x": "-inf"}}  # fmt: skip
    log = runfiles.MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1, split="train", loss=math.inf)
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row["loss"] is None and row["nonfinite"] == {"loss": "inf"}


def test_a_lone_surrogate_escape_is_a_counted_bad_row_not_a_crash(
    tiny_snli_dir, tokenizer, tmp_path
):
    """A JSON line whose text holds "\\ud800" (valid JSON, not Unicode text) is kept with the
    surrogate replaced and counted under bad_utf8; a proper surrogate pair (an emoji) is not."""
    d = tmp_path / "snli"
    d.mkdir()
    (d / "test.jsonl").write_bytes((tiny_snli_dir / "test.jsonl").read_bytes())
    rows = (tiny_snli_dir / "train.jsonl").read_text().splitlines()[:100]
    rows.append('{"sentence1": "a \\ud800 b", "sentence2": "c", "gold_label": "neutral"}')
    rows.append('{"sentence1": "a \\ud83d\\ude00 b", "sentence2": "c", "gold_label": "neutral"}')
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    task = data.load_task("snli", d, tokenizer, max_length=64, validation_size=10)
    assert task.counts["train/bad_utf8"] == 1


def test_a_damaged_summary_json_is_named(tiny_model_dir, tiny_snli_dir, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2})
    train_lib.train_and_evaluate(config, str(workdir))
    (workdir / "summary.json").write_text('{"validation_accuracy": 0.5, ')
    with pytest.raises(ValueError, match=r"summary.json is damaged .*delete it and rerun"):
        train_lib.train_and_evaluate(config, str(workdir))
    (workdir / "summary.json").unlink()  # as the message says: the end is redone
    assert train_lib.train_and_evaluate(config, str(workdir))["steps"] == 2


def test_export_refuses_a_non_empty_out_and_overwrite_leaves_no_stale_files(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """An export into a used directory is refused naming what is there; with overwrite the
    directory ends holding only the new export, every file mode 0644 (umask 022)."""
    from lorax import export, runs

    workdir, out = tmp_path / "run", tmp_path / "adapter"
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2})
    train_lib.train_and_evaluate(config, str(workdir))
    out.mkdir()
    (out / "stale.bin").write_text("from an older export")
    with pytest.raises(ValueError, match=r"adapter is not empty \(stale.bin\); pass --overwrite"):
        export.check_out_dir(out, overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file"):
        export.check_out_dir(tmp_path / "file", overwrite=True)
    config, setup, trainable = runs.load_run(str(workdir))
    previous = os.umask(0o022)
    try:
        export.write_replacing(
            export.check_out_dir(out, overwrite=True),
            lambda tmp: export.export_adapter(config, setup, trainable, tmp),
        )
    finally:
        os.umask(previous)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "lorax_head.safetensors"]
    assert {oct(os.stat(out / n).st_mode & 0o777) for n in names} == {"0o644"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "file", "run"]

    def failing(tmp):
        (tmp / "half").mkdir(parents=True)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export.write_replacing(out, failing)
    assert sorted(p.name for p in out.iterdir()) == names  # the old export is untouched


@pytest.mark.slow
def test_command_lines_print_a_user_error_as_one_line_not_a_traceback(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    for module, args in (
        ("lorax.train", ["--config=configs/wq_wv_r4.py", f"--workdir={tmp_path / 'run'}"]),
        ("lorax.export", [f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'run'}"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert f"{module}: error: " in done.stderr
        assert "run" in done.stderr.splitlines()[-2]


def test_checkpoints_that_cannot_be_written_are_named_before_any_step(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """Not at the first save: the run stops before step 1 (no metrics row) naming the path."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 2})
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("")
    with pytest.raises(NotADirectoryError, match=r"run/checkpoints exists and is not a directory"):
        train_lib.train_and_evaluate(config, str(workdir))
    assert not (workdir / "metrics.jsonl").exists()
    (workdir / "checkpoints").unlink()
    if os.geteuid() != 0:  # root writes through permission bits; a read-only mount stops it too
        (workdir / "checkpoints").mkdir(mode=0o555)
        with pytest.raises(PermissionError, match=r"run/checkpoints is not writable"):
            train_lib.train_and_evaluate(config, str(workdir))
        assert not (workdir / "metrics.jsonl").exists()


def test_closed_event_loop_noise_from_a_damaged_checkpoint_is_dropped(tmp_path):
    """The hook drops exactly 'Event loop is closed' RuntimeErrors; others still print."""
    import sys

    from lorax.checkpoints import state

    state.Checkpointer(tmp_path)
    seen = []
    previous = sys.unraisablehook
    try:
        sys.unraisablehook = lambda u: seen.append(str(u.exc_value))
        state._drop_closed_loop_noise()

        class Unraisable:
            def __init__(self, e):
                self.exc_type, self.exc_value, self.exc_traceback = type(e), e, None
                self.err_msg, self.object = None, None

        sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(Unraisable(RuntimeError("something else")))
    finally:
        sys.unraisablehook = previous
    assert seen == ["something else"]


def test_summaries_account_for_every_session_of_a_resumed_run(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """Cut off mid-way (after the step-2 checkpoint) and again after the final checkpoint
    (in the final evaluation), the run's summary still counts every token once (the same
    number as an uninterrupted run), a positive throughput, a step time, and three sessions."""
    from helpers import train_until_interrupted

    overrides = {"train.num_steps": 6, "checkpoint_every": 2, "eval_every": 0}
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **overrides)
    straight = train_lib.train_and_evaluate(config, str(tmp_path / "straight"))
    cut = tmp_path / "cut"
    train_until_interrupted(config, cut, 3, monkeypatch)  # steps 0-2 ran; kept: step 2
    with monkeypatch.context() as m:

        def dying(self, *args, **kwargs):
            raise KeyboardInterrupt("killed in the final evaluation")

        m.setattr(loop.Stepper, "evaluate", dying)
        with pytest.raises(KeyboardInterrupt):
            train_lib.train_and_evaluate(config, str(cut))
    summary = train_lib.train_and_evaluate(config, str(cut))  # resumes at step 6 of 6
    assert summary["resumed_from"] == 6
    assert summary["sessions"] == 3
    assert summary["train_tokens"] == straight["train_tokens"] > 0
    assert summary["tokens_per_second"] > 0
    assert summary["step_seconds_median"] is not None
    assert summary["wall_seconds"] > summary["train_seconds"] > 0
    timing = json.loads((cut / "timing.json").read_text())["sessions"]
    assert [s["first_step"] for s in timing] == [0, 2]  # the third ran no step
    assert [r["step"] for r in timing[0]["records"]] == [2]  # its step-3 work was redone


def test_print_config_gives_every_field_its_value_and_comment_and_a_typo_lists_the_section():
    sys.path.insert(0, REPO)
    from configs import base, wq_wv_r4
    from lorax import cli, configdoc, paths

    config = wq_wv_r4.get_config()
    text = configdoc.describe(config)
    lines = {line.split(" = ")[0].strip(): line for line in text.splitlines()}
    assert set(lines) == {k.replace("/", ".") for k in paths.flatten(config.to_dict())}
    assert lines["lora.rank"].endswith("= 4  # rank r for every target")
    assert (
        "wrapped onto" not in text
        and "causal-LM tasks only the scored-choice" in (lines["task.buckets"])
    )
    documented = configdoc.base_comments(os.path.join(REPO, "configs", "base.py"))
    undocumented = [k for k in paths.flatten(base.get_config().to_dict())
                    if not documented.get(k.replace("/", "."))]  # fmt: skip
    assert not undocumented, f"configs/base.py fields without a comment: {undocumented}"
    message = cli._unknown_override(["--config=configs/wq_wv_r4.py", "--config.lora.rnak=3"])
    assert message.startswith("--config.lora.rnak: section 'lora' has no field 'rnak'; its")
    assert "rank, rank_pattern" in message
    assert cli._unknown_override(["--config=configs/wq_wv_r4.py", "--config.lora.rank=3"]) is None


def test_command_lines_drop_only_jaxs_no_cuda_traceback(monkeypatch):
    """With the [plan] extra on a machine with no GPU, JAX logs its CUDA plugin's 'Unable to
    load CUDA' as a traceback at the first backend use: the command lines drop that record,
    and pass any other plugin error, and this one where an NVIDIA device exists."""
    import logging

    from lorax import cli

    def record(message, error):
        try:
            raise RuntimeError(error)
        except RuntimeError:
            import sys as _sys

            return logging.LogRecord(
                "jax._src.xla_bridge", logging.ERROR, __file__, 1, message, (), _sys.exc_info()
            )

    no_cuda = record("Jax plugin configuration error: Exception when calling %s.initialize()",
                     "Unable to load CUDA. Is it installed?")  # fmt: skip
    other = record("Jax plugin configuration error: Exception when calling %s.initialize()",
                   "Found cuDNN version 8, but JAX was built against 9")  # fmt: skip
    logger = logging.getLogger("jax._src.xla_bridge")
    monkeypatch.setattr(cli, "_has_nvidia_device", lambda: False)
    assert not logger.filter(no_cuda)
    assert logger.filter(other)
    assert logger.filter(record("Platform 'tpu' is experimental", "no"))
    monkeypatch.setattr(cli, "_has_nvidia_device", lambda: True)
    assert logger.filter(no_cuda)

"""What a new user or an attacker hits: runs that would be silently meaningless are refused,
late or unclear failures come early and as one line naming the thing (issue 29)."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, poison_losses, tiny_config, train_until_interrupted

from lorax import cli, loop, runs, stops
from lorax import setup as setup_lib
from lorax import train as train_lib
from lorax.checkpoints import hf

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _csv(path, rows, header=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header or list(rows[0]))
        w.writerows([list(r.values()) for r in rows] if isinstance(rows[0], dict) else rows)
    return path


def _file_config(model_dir, data, **overrides):
    return tiny_config(model_dir, data, **{"task.name": "text_classification",
                                           "task.validation_size": 0.2, **overrides})  # fmt: skip


def _rows(labels, n=40):
    return [{"text": f"text number {i} about {labels[i % len(labels)]}",
             "label": labels[i % len(labels)]} for i in range(n)]  # fmt: skip


# --------------------------------------------------------------------------- refused configs


def test_a_model_dir_without_tokenizer_files_is_refused(tiny_model_dir, tmp_path):
    """Without tokenizer files transformers builds a 5-token tokenizer (every word [UNK]);
    lorax refuses, naming the directory and the files it looked for."""
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    data = _csv(tmp_path / "d.csv", _rows(["neg", "pos"]))
    with pytest.raises(FileNotFoundError, match=rf"{bare} has no tokenizer files.*tokenizer\.json"):
        setup_lib.build(_file_config(bare, data))


def test_a_model_config_that_is_not_json_is_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{broken / 'config.json'} is not a JSON model config"):
        hf.read_config(broken)


def test_training_rows_of_one_class_are_refused(tiny_model_dir, tmp_path):
    data = _csv(tmp_path / "d.csv", _rows(["pos"]))
    with pytest.raises(ValueError, match=r"label = 'pos', the only class seen.*at least 2"):
        setup_lib.build(_file_config(tiny_model_dir, data))


def test_the_text_column_cannot_be_the_label_column(tiny_model_dir, tmp_path):
    data = _csv(tmp_path / "d.csv", _rows(["neg", "pos"]))
    config = _file_config(tiny_model_dir, data, **{"task.label_field": "text"})
    with pytest.raises(
        ValueError, match=r"task.text_field and task.label_field both name the column .text."
    ):
        setup_lib.build(config)


def test_labels_mixing_integers_and_names_are_refused(tiny_model_dir, tmp_path):
    """0/1 beside neg/pos would silently make 4 classes; set task.labels if they are."""
    data = _csv(tmp_path / "d.csv", _rows(["0", "1", "neg", "pos"]))
    with pytest.raises(
        ValueError,
        match=r"mixes integer labels \['0', '1'\] with named ones "
        r"\['neg', 'pos'\], which would make 4 classes",
    ):
        setup_lib.build(_file_config(tiny_model_dir, data))
    config = _file_config(tiny_model_dir, data, **{"task.labels": ("0", "1", "neg", "pos")})
    assert setup_lib.build(config, with_task=True).task.label_names == ("0", "1", "neg", "pos")


def test_a_header_naming_a_column_twice_is_refused(tiny_model_dir, tmp_path):
    rows = [[f"first {i}", f"second {i}", ["neg", "pos"][i % 2]] for i in range(20)]
    data = _csv(tmp_path / "d.csv", rows, header=["text", "text", "label"])
    with pytest.raises(ValueError, match=r"names the column\(s\) \['text'\] more than once"):
        setup_lib.build(_file_config(tiny_model_dir, data))


@pytest.mark.parametrize("value", [1.0, 1])
def test_a_hold_out_of_one_is_ambiguous(tiny_model_dir, tmp_path, value):
    """1.0 reads as 'all rows' as well as 'one row' (the field is a float, so 1 is 1.0)."""
    data = _csv(tmp_path / "d.csv", _rows(["neg", "pos"]))
    config = _file_config(tiny_model_dir, data, **{"task.validation_size": value})
    with pytest.raises(ValueError, match=r"task.validation_size = 1.0 is ambiguous"):
        setup_lib.build(config)


@pytest.mark.parametrize("field,value", [("train.b2", 1.5), ("train.eps", -1.0),
                                         ("train.b1", 1.0), ("train.eps", 0.0),
                                         ("train.b1", float("nan"))])  # fmt: skip
def test_adam_fields_are_range_checked(field, value):
    config = tiny_config("unused", "unused", **{field: value})
    with pytest.raises(ValueError, match=rf"{re.escape(field)} = {value!r} is not valid"):
        setup_lib.check_numbers(config)


# Every numeric field of configs/base.py, a value it must refuse, the config it is read in, and
# the words of the error. setup.NUMBERS checks most; the rest are checked where they are read.
BAD_VALUES = {
    "adalora.beta1": (1.0, {"method": "adalora"}),
    "adalora.beta2": (0.0, {"method": "adalora"}),
    "adalora.delta_t": (0, {"method": "adalora"}),
    "adalora.orth_reg_weight": (-1.0, {"method": "adalora"}),
    "adalora.target_r": (0, {"method": "adalora"}),
    "adalora.tfinal": (-1, {"method": "adalora"}),
    "adalora.tinit": (-1, {"method": "adalora"}),
    "adapter.size": (0, {"method": "adapter_houlsby"}),
    "checkpoint_every": (-1, {}),
    "dpo.beta": (0.0, {}),
    "dpo.label_smoothing": (0.5, {"dpo.loss": "robust"}),
    "eval_batch_size": (0, {}),
    "eval_every": (-1, {}),
    "keep_checkpoints": (0, {}),
    "log_every": (0, {}),
    "lora.alpha": (0.0, {}),
    "lora.dropout": (1.5, {}),
    "lora.lr_ratio_b": (0.0, {}),
    "lora.rank": (0, {}),
    "mesh.data": (0, {}),
    "mesh.fsdp": (0, {}),
    "mesh.tensor": (0, {}),
    "model.dropout": (-0.1, {}),
    "model.head_dropout": (1.1, {}),
    "model.loss_chunk": (-2, {}),
    "model.quant_block": (3, {"model.quantize": "nf4"}),
    "prefix.hidden": (0, {"method": "prefix"}),
    "prefix.length": (0, {"method": "prefix"}),
    "prompt.length": (0, {"method": "prompt"}),
    "ptuning.hidden": (0, {"method": "ptuning"}),
    "ptuning.length": (0, {"method": "ptuning"}),
    "seed": (-1, {}),
    "task.max_eval_examples": (-1, {}),
    "task.max_length": (1, {}),
    "task.max_test_examples": (-1, {}),
    "task.test_size": (0.0, {"task.name": "text_classification"}),
    "task.validation_size": (0.0, {}),
    "top_k_layers.k": (0, {"method": "top_k_layers"}),
    "train.b1": (-0.1, {}),
    "train.b2": (1.0, {}),
    "train.batch_size": (0, {}),
    "train.eps": (-1e-8, {}),
    "train.grad_clip": (-1.0, {}),
    "train.head_learning_rate": (-1.0, {}),
    "train.learning_rate": (-1.0, {}),
    "train.max_skipped_consecutive": (0, {}),
    "train.max_skipped_fraction": (1.5, {}),
    "train.num_steps": (0, {}),
    "train.warmup_fraction": (1.5, {}),
    "train.weight_decay": (-1.0, {}),
}
# Read only by a multi-host run (lorax.sharding.initialize_distributed checks them there).
DISTRIBUTED_ONLY = ("mesh.num_processes", "mesh.process_id")


def test_every_numeric_field_of_the_base_config_has_a_refused_value():
    """The README's 'every numeric field is range-checked' is held to the config itself: a
    new numeric field in configs/base.py fails here until it has a check and a case above."""
    sys.path.insert(0, REPO)
    from configs import base
    from lorax import paths

    numeric = {
        k.replace("/", ".") for k, v in paths.flatten(base.get_config().to_dict()).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }  # fmt: skip
    assert numeric - set(DISTRIBUTED_ONLY) == set(BAD_VALUES)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_each_numeric_field_refuses_a_bad_value_naming_it(tiny_model_dir, tmp_path, field):
    value, context = BAD_VALUES[field]
    data = _csv(tmp_path / "d.csv", _rows(["neg", "pos"]))
    config = _file_config(tiny_model_dir, data, **{"task.validation_size": 0.2, **context,
                                                   field: value})  # fmt: skip
    if field == "task.validation_size":
        config.task.name = "snli"  # a built-in task: a count
    with pytest.raises(ValueError, match=re.escape(field)):
        if field.startswith("dpo."):  # read by train.objective = "dpo" runs, checked there
            from lorax import objectives

            config.train.objective, config.task.name = "dpo", "preferences"
            objectives.check_objective(config)
        setup_lib.build(config, with_task=False)


# --------------------------------------------------------------------------- NaN stop


class _Kept:
    """The part of a Checkpointer the NaN message reads."""

    def __init__(self, steps):
        self.steps, self.directory = steps, "/w/checkpoints"

    def all_steps(self):
        return self.steps


def test_the_last_good_checkpoint_is_one_saved_before_the_loss_climbed():
    """Good: the training loss last logged at or before it is finite and at most twice the
    first logged. A checkpoint of a run whose loss had climbed to 1e29 is not offered."""
    losses = [(1, 0.70), (2, 0.66), (3, 1.39), (4, 1.5), (5, 1e29), (6, None)]
    assert stops.good_checkpoint([2, 3], losses) == 3
    assert stops.good_checkpoint([2, 4], losses) == 2
    assert stops.good_checkpoint([4, 5], losses) is None
    assert stops.good_checkpoint([], losses) is None
    assert stops.good_checkpoint([3], []) is None  # nothing logged: cannot be judged
    message = stops.nonfinite_advice(_Kept([2, 4]), losses)
    assert message.startswith("Last good checkpoint: step 2 in /w/checkpoints (kept checkpoint")
    assert "step(s) [4] were saved after the training loss had climbed past twice" in message
    assert "Last good checkpoint: none" in stops.nonfinite_advice(_Kept([4, 5]), losses)


def test_a_nan_stop_names_a_checkpoint_from_before_the_divergence(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """The issue's case: the loss climbs (finite) from step 4 and turns NaN at step 7; the
    checkpoints at 4 and 6 were saved after it climbed, so step 2's is named, in a message the
    command line prints as one line (a cli.UserError)."""
    import jax.numpy as jnp
    import numpy as np

    from lorax import data, evaluate

    real_batch, real_sums = data.Batcher.train_batch, evaluate.classification_sums

    def batch(self, step):  # labels say how the loss goes: 98 huge, 99 NaN
        b = real_batch(self, step)
        marker = 99 if step == 6 else 98 if step >= 3 else None
        return b if marker is None else {**b, "labels": np.full_like(b["labels"], marker)}

    def sums(logits, b):
        out = real_sums(logits, b)
        loss = jnp.where(b["labels"][0] == 98, 1e29, out["loss_sum"])
        return {**out, "loss_sum": jnp.where(b["labels"][0] == 99, jnp.nan, loss)}

    monkeypatch.setattr(data.Batcher, "train_batch", batch)
    monkeypatch.setattr(evaluate, "classification_sums", sums)
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{
        "train.num_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 5})  # fmt: skip
    with pytest.raises(loop.NonFiniteLossError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "w"))
    message = str(e.value)
    assert isinstance(e.value, cli.UserError) and "\n" not in message
    assert "NaN/Inf at step 7" in message
    assert re.search(
        r"Last good checkpoint: step 2 in .*\(kept checkpoint\(s\) at step\(s\) "
        r"\[4, 6\] were saved after the training loss had climbed",
        message,
    )


def test_a_run_stopped_before_its_first_checkpoint_reruns_with_a_fixed_config(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """A NaN at step 1 leaves no checkpoint: the corrected rerun in the same workdir (another
    learning rate) starts afresh; the old config.json (and metrics.jsonl) are kept aside. A
    workdir with a checkpoint still refuses a changed config."""
    workdir = tmp_path / "w"
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **{"train.num_steps": 3})
    with monkeypatch.context() as m:
        poison_losses(m, lambda batcher, step: True)
        with pytest.raises(loop.NonFiniteLossError, match="Last good checkpoint: none"):
            train_lib.train_and_evaluate(config, str(workdir))
    fixed = tiny_config(tiny_model_dir, tiny_snli_dir,
                        **{"train.num_steps": 3, "train.learning_rate": 1e-3})  # fmt: skip
    summary = train_lib.train_and_evaluate(fixed, str(workdir))
    assert summary["config"]["train"]["learning_rate"] == 1e-3
    (aside,) = [p for p in workdir.iterdir() if p.name.startswith("unsaved-")]
    old = json.loads((aside / "config.json").read_text())
    assert old["train"]["learning_rate"] == config.train.learning_rate
    (workdir / "summary.json").unlink()  # unfinished again, but with checkpoints now
    with pytest.raises(ValueError, match="was started with another config"):
        train_lib.train_and_evaluate(config, str(workdir))


# --------------------------------------------------------------------------- Ctrl-C, exports


@pytest.fixture(scope="module")
def interrupted_run(tiny_model_dir, tiny_snli_dir, tmp_path_factory):
    """A run cut off by Ctrl-C at step 4 of 6: its only checkpoint is step 3."""
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    config = tiny_config(tiny_model_dir, tiny_snli_dir)
    with pytest.MonkeyPatch.context() as m:
        try:
            train_until_interrupted(config, workdir, 4, m)
        except BaseException as e:  # pragma: no cover -- the helper asserts the interrupt
            raise AssertionError(e) from e
    return workdir


def test_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(
    interrupted_run, tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    config = tiny_config(tiny_model_dir, tiny_snli_dir)
    workdir = tmp_path / "run"
    shutil.copytree(interrupted_run, workdir)
    with monkeypatch.context() as m:
        from lorax import data

        real = data.Batcher.train_batch

        def dying(self, i):
            if i == 5:
                raise KeyboardInterrupt
            return real(self, i)

        m.setattr(data.Batcher, "train_batch", dying)
        with pytest.raises(stops.Interrupted) as e:
            train_lib.train_and_evaluate(config, str(workdir))
    assert str(e.value) == (
        f"interrupted; last checkpoint step 3 in {workdir / 'checkpoints'}: rerun the same "
        "command to resume from it"
    )


@pytest.mark.parametrize("raised,code,line", [
    (loop.NonFiniteLossError("loss is NaN/Inf at step 7; Last good checkpoint: step 2"), 2,
     "prog: error: loss is NaN/Inf at step 7; Last good checkpoint: step 2"),
    (stops.Interrupted("interrupted; last checkpoint step 3 in /w: rerun"), 130,
     "prog: interrupted; last checkpoint step 3 in /w: rerun"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
])  # fmt: skip
def test_command_lines_end_user_errors_and_ctrl_c_in_one_line(
    monkeypatch, capsys, raised, code, line
):
    def main(argv):
        raise raised

    def exit_(code):  # cli ends the process with os._exit: here, as SystemExit
        raise SystemExit(code)

    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.delenv("LORAX_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run(main, "prog")
    assert e.value.code == code
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err


def test_reading_an_unfinished_run_warns_with_its_step(interrupted_run, capsys):
    runs.load_run(interrupted_run)
    err = capsys.readouterr().err
    assert f"warning: {interrupted_run} is unfinished: its latest checkpoint is step 3 of 6" in err


def test_a_run_whose_only_checkpoint_is_corrupt_is_a_clear_error(interrupted_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(interrupted_run, workdir)
    for p in (workdir / "checkpoints" / "3").rglob("*"):
        if p.is_file() and "integrity" not in str(p) and p.stat().st_size > 64:
            p.write_bytes(b"\0" * p.stat().st_size)
    with pytest.raises(ValueError, match=rf"{workdir}: no intact checkpoint to read \(.*/3"):
        runs.restore_latest(workdir)


# --------------------------------------------------------------------------- process level


def _command(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_pytorch_notice_is_dropped_but_other_transformers_warnings_pass():
    """transformers' 'PyTorch was not found' line (printed on a machine without torch) read
    like an error at the top of every command; importing lorax.cli drops only it."""
    script = (
        "import sys; sys.modules['torch'] = None\n"  # as on a machine without torch
        "import lorax.cli, transformers\n"
        "transformers.utils.logging.get_logger('transformers').warning('another warning')\n"
    )
    done = _command("-c", script)
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" not in done.stderr and "another warning" in done.stderr


@pytest.mark.parametrize("args,message", [
    (["--seeds=0"], "--seeds=0: a study needs at least one seed"),
    (["--steps=-1"], "--steps=-1 is not valid"),
    (["--task=mnli"], "no base config for --model=minilm-l6 --task=mnli"),
])  # fmt: skip
def test_experiment_command_lines_end_user_errors_in_one_line(tmp_path, args, message):
    done = _command("-m", "experiments.table5", f"--root={tmp_path}", *args)
    assert done.returncode == 2, done.stderr
    assert f"experiments.table5: error: {message}" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_experiment_errors_name_a_damaged_summary_and_a_busy_study(tmp_path):
    from experiments import table5
    from lorax import runlock

    study = tmp_path / "table5_minilm-l6_snli"
    for run in table5.grid(1):  # every run finished: nothing trains
        (study / run.name).mkdir(parents=True)
        (study / run.name / "summary.json").write_text("{}")
    damaged = study / "q_r8_s0" / "summary.json"
    damaged.write_text('{"validation_accuracy": 0.5')
    done = _command("-m", "experiments.table5", f"--root={tmp_path}", "--seeds=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"experiments.table5: error: {damaged} is damaged" in done.stderr
    with runlock.hold(str(study)):
        done = _command("-m", "experiments.methods", f"--root={tmp_path}", "--methods=nope")
        assert "experiments.methods: error: unknown methods ['nope']" in done.stderr
        done = _command("-m", "experiments.table5", f"--root={tmp_path}", "--seeds=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"experiments.table5: error: workdir {study} is in use by" in done.stderr


def test_collect_names_a_damaged_summary(tmp_path):
    from experiments import collect

    (tmp_path / "summary.json").write_text('{"test_accuracy": ')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'summary.json'} is damaged"):
        collect.row(str(tmp_path))


# --------------------------------------------------------------------------- the suite itself


def test_no_test_asserts_on_wall_clock_time():
    """Speed belongs in benchmarks: an assertion on elapsed time fails on a loaded machine."""
    clock = re.compile(r"assert .*(time\.(monotonic|time|perf_counter)\(\)|elapsed|seconds\b.*<)")
    found = []
    for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
        if name.endswith(".py") and name != "test_user_errors.py":
            with open(os.path.join(REPO, "tests", name)) as f:
                found += [f"{name}:{i}" for i, line in enumerate(f, 1) if clock.search(line)]
    assert not found


# --------------------------------------------------------------------------- lorax.predict


def test_predict_refuses_a_bad_out_before_loading_anything(tmp_path, monkeypatch):
    from lorax import predict

    with pytest.raises(FileNotFoundError, match=rf"the folder {tmp_path / 'missing'} does not"):
        predict.check_out(str(tmp_path / "missing" / "out.csv"))
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match=r"is a directory"):
        predict.check_out(str(tmp_path / "dir.csv"))
    with pytest.raises(ValueError, match=r"write a .csv, .tsv or .jsonl file"):
        predict.check_out(str(tmp_path / "out.parquet"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere)
    with pytest.raises(PermissionError, match=rf"{tmp_path} is not writable"):
        predict.check_out(str(tmp_path / "out.csv"))


def test_predict_command_fails_on_a_missing_out_folder_at_once(tmp_path):
    """Before: every row was scored, then the write failed naming a temporary file."""
    src = _csv(tmp_path / "in.csv", _rows(["neg", "pos"], n=4))
    out = tmp_path / "missing" / "out.csv"
    done = _command("-m", "lorax.predict", f"--workdir={tmp_path / 'no_run'}", f"--input={src}",
                    f"--out={out}")  # fmt: skip
    assert done.returncode == 2
    assert f"lorax.predict: error: --out={out}: the folder {out.parent} does not exist" in (
        done.stderr
    )


def test_export_never_replaces_the_run_it_exports(tmp_path):
    """--out=<the workdir> (or a folder holding it) with --overwrite, as the refusal of a
    non-empty --out suggests, replaced that folder whole with the export: the run's
    checkpoints were deleted. Refused before anything is read."""
    from lorax import export

    run = tmp_path / "runs" / "news"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for out in (run, tmp_path / "runs", tmp_path / "runs" / ".." / "runs" / "news"):
        with pytest.raises(ValueError, match=r"is or holds the run's workdir .*deleting it"):
            export.check_out_dir(out, overwrite=True, workdir=str(run))
    assert export.check_out_dir(run / "export", True, str(run)) == run / "export"
    done = _command("-m", "lorax.export", f"--workdir={run}", f"--out={tmp_path / 'runs'}",
                    "--overwrite")  # fmt: skip
    assert done.returncode == 2 and "is or holds the run's workdir" in done.stderr
    assert (run / "config.json").exists()
    model = tmp_path / "models" / "bert"  # the run's local base model: deleted likewise
    model.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"name": str(model)}}))
    done = _command("-m", "lorax.export", f"--workdir={run}", f"--out={model.parent}",
                    "--overwrite")  # fmt: skip
    assert done.returncode == 2 and "is or holds the run's base model" in done.stderr


def test_predict_command_fails_on_a_missing_metrics_out_folder_at_once(tmp_path):
    """Before: every row was scored and evaluated, then the write failed naming a temporary
    file (the run here does not exist: nothing is loaded before the refusal)."""
    src = _csv(tmp_path / "in.csv", _rows(["neg", "pos"], n=4))
    out = tmp_path / "missing" / "m.json"
    done = _command("-m", "lorax.predict", f"--workdir={tmp_path / 'no_run'}", f"--input={src}",
                    "--gold=label", f"--metrics_out={out}")  # fmt: skip
    assert done.returncode == 2
    assert f"error: --metrics_out={out}: the folder {out.parent} does not exist" in done.stderr


def test_predict_input_that_is_not_utf8_is_refused_unless_its_encoding_is_given(tmp_path, capsys):
    """Latin-1 text read as UTF-8 would be rewritten with U+FFFD without a word."""
    from lorax import predict

    src = tmp_path / "latin1.csv"
    src.write_bytes("text\nplain row\nun café crème\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"1 row\(s\) are not valid UTF-8 \(the first at row 3\)"
                                         r".*--encoding=latin-1"):  # fmt: skip
        predict.read_input(str(src))
    rows = predict.read_input(str(src), "latin-1")
    assert [r["text"] for _, r in rows] == ["plain row", "un café crème"]
    assert "read " in capsys.readouterr().err


def test_predict_input_rows_the_output_would_lose_are_refused(tmp_path):
    """A JSONL line that is not a JSON object, a CSV row with more cells than the header: the
    readers skip the line or drop the cells (counted), so lorax.predict's --out had fewer rows
    than the input (no longer lined up with it) or lost cells, with exit 0."""
    from lorax import predict

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "broken",}\n[1, 2]\n{"text": "also fine"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl: 2 line\(s\) are not JSON objects"):
        predict.read_input(str(src))
    src = tmp_path / "in.csv"
    src.write_text("text,id\nfine,1\nnot, quoted,2\n")
    with pytest.raises(ValueError, match=r"in.csv: 1 row\(s\) have more cells than the header"):
        predict.read_input(str(src))
    src.write_text('text,id\nfine,1\n"quoted, fine",2\n')
    assert [r["text"] for _, r in predict.read_input(str(src))] == ["fine", "quoted, fine"]


@pytest.mark.slow
def test_ctrl_c_on_the_real_command_is_one_line(tiny_model_dir, tiny_snli_dir, tmp_path):
    """SIGINT to a training process after its first checkpoint: one line naming it, exit
    130, no traceback (was 19 frames)."""
    import signal
    import time

    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorax.train", "--config=configs/wq_wv_r4.py",
           f"--config.model.name={tiny_model_dir}", f"--config.task.data={tiny_snli_dir}",
           "--config.task.max_length=64", "--config.task.buckets=(32,64)",
           "--config.task.validation_size=64", "--config.train.batch_size=16",
           "--config.train.num_steps=100000", "--config.log_every=1",
           "--config.checkpoint_every=2", "--config.eval_every=0",
           f"--workdir={workdir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300  # a guard against a hung child, not a timing assertion
    while proc.poll() is None and time.time() < deadline:
        steps = [p.name for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("lorax.train: ")][-1]
    assert re.fullmatch(rf"lorax.train: interrupted; last checkpoint step \d+ in "
                        rf"{workdir / 'checkpoints'}: rerun the same command to resume from it",
                        last)  # fmt: skip

"""Sweeps (experiments/): a study trains as multi-adapter jobs, skips finished runs on resume,
and the report renders its table and plot."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, tiny_config

from experiments import report, sweep, table5, table6
from lorax import multi


def test_grids_are_the_papers():
    t5 = table5.grid(seeds=2)
    assert len(t5) == 7 * 2
    budget = {(r.overrides["lora.targets"], r.overrides["lora.rank"]) for r in t5}
    assert budget == {
        ("q", 8),
        ("k", 8),
        ("v", 8),
        ("o", 8),
        ("q,k", 4),
        ("q,v", 4),
        ("q,k,v,o", 2),
    }
    # Seed-major: a job of 7 is one seed's whole table.
    assert [r.name.rsplit("_s", 1)[1] for r in t5] == ["0"] * 7 + ["1"] * 7
    t6 = table6.grid(seeds=1)
    assert len(t6) == 3 * 5 and {r.overrides["lora.rank"] for r in t6} == {1, 2, 4, 8, 64}
    # One alpha for every rank (the paper's convention: the base config's), or the 2r ablation.
    assert all("lora.alpha" not in r.overrides for r in t5 + t6)
    assert {r.overrides["lora.alpha"] / r.overrides["lora.rank"] for r in table5.grid(1, True)} == {
        2.0
    }
    # Extending Table 6 by a target set appends whole jobs of 5: the earlier jobs stay as they were.
    some, every = table6.grid(2, target_sets=("q", "q,v")), table6.grid(2)
    assert every[: len(some)] == some and len(some) % len(table6.RANKS) == 0


@pytest.mark.slow
def test_study_runs_as_jobs_resumes_and_reports(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    base = tiny_config(tiny_model_dir, tiny_snli_dir)
    base.train.num_steps = 2
    base.checkpoint_every = 0
    runs = [r for r in table5.grid(seeds=1) if r.name in ("q_r8_s0", "qv_r4_s0", "qkvo_r2_s0")]
    jobs = []
    real = multi.train_many

    def spy(configs, workdirs):
        jobs.append([os.path.basename(w) for w in workdirs])
        return real(configs, workdirs)

    monkeypatch.setattr(multi, "train_many", spy)
    rows = sweep.run_study("table5_tiny", runs, base, root=str(tmp_path), max_adapters=2)
    assert jobs == [["q_r8_s0", "qv_r4_s0"], ["qkvo_r2_s0"]]
    assert [r["name"] for r in rows] == ["q_r8_s0", "qv_r4_s0", "qkvo_r2_s0"]
    # Budget-matched: every set has 2 layers x 8 rank units x (64 + 64) on the tiny d=64 BERT.
    assert {r["lora_params"] for r in rows} == {2 * 8 * 128}
    results = json.loads((tmp_path / "table5_tiny" / "results.json").read_text())
    assert len(results["runs"]) == 3

    study = tmp_path / "table5_tiny"
    os.remove(study / "qv_r4_s0" / "summary.json")  # as if cut off while writing the job's runs
    kept = (study / "q_r8_s0" / "summary.json").stat().st_mtime_ns
    sweep.run_study("table5_tiny", runs, base, root=str(tmp_path), max_adapters=2)
    assert jobs[2:] == [["q_r8_s0", "qv_r4_s0"]]  # the same job again; the done one is skipped
    assert (study / "q_r8_s0" / "summary.json").stat().st_mtime_ns == kept
    redone = json.loads((study / "qv_r4_s0" / "summary.json").read_text())
    assert redone["resumed_from"] == 2  # from the job's final checkpoint: no step retrained

    # §7 analysis between two runs of the study that share the q kernels (r = 8 vs r = 4).
    cmd = [sys.executable, "-m", "lorax.analysis", f"--run={study / 'q_r8_s0'}",
           f"--run={study / 'qv_r4_s0'}", f"--out={tmp_path / 'analysis'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "analysis" / "subspace_similarity_layer0.png").stat().st_size > 1000
    table = (tmp_path / "analysis" / "amplification.md").read_text()
    assert "| q_r8_s0 | encoder/layers_0/attn/q/kernel | 8 |" in table

    text = report.report(str(tmp_path))
    assert "| Wq,Wv | 4 | 2,048 |" in text and "| 91.3 |" in text
    assert (tmp_path / "table5_tiny.png").stat().st_size > 1000
    assert (tmp_path / "table5_tiny_curves.png").stat().st_size > 1000  # training-loss curves

    # The copy kept in the repository: report, plots and each study's results.json.
    kept = tmp_path / "kept"
    assert report.report(str(tmp_path), str(kept)) == text
    copied = (kept / "table5_tiny" / "results.json").read_text()
    assert copied == (tmp_path / "table5_tiny" / "results.json").read_text()
    assert (kept / "table5_tiny.png").exists() and (kept / "report.md").read_text() == text
    # No study under a root: nothing written, and the command says so.
    assert report.report(str(tmp_path / "nothing")) == ""
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_a_study_runs_on_any_config_file_such_as_a_users_own_task(tiny_model_dir, tmp_path):
    """--config=FILE: the study's base is the user's config (here a text_classification on
    their CSV), named after the file; a missing file or one without get_config is named."""
    rows = [{"text": f"{['good', 'bad'][i % 2]} film number {i}", "y": ["pos", "neg"][i % 2]}
            for i in range(80)]  # fmt: skip
    with open(tmp_path / "reviews.csv", "w") as f:
        f.write("text,y\n" + "".join(f"{r['text']},{r['y']}\n" for r in rows))
    config_path = tmp_path / "my_reviews.py"
    config_path.write_text(
        "from configs import wq_wv_r4\n\n\ndef get_config():\n"
        "    c = wq_wv_r4.get_config()\n"
        f"    c.model.name = {str(tiny_model_dir)!r}\n"
        "    c.task.name = 'text_classification'\n"
        f"    c.task.data = {str(tmp_path / 'reviews.csv')!r}\n"
        "    c.task.label_field = 'y'\n"
        "    c.task.validation_size, c.task.test_size = 8, 8\n"
        "    c.task.max_length, c.task.buckets = 32, (32,)\n"
        "    c.train.num_steps, c.train.batch_size, c.eval_batch_size = 2, 8, 16\n"
        "    return c\n"
    )
    name, base = sweep.study_base("table5", str(config_path), "minilm-l6", "snli", {})
    assert name == "table5_my_reviews" and base.task.name == "text_classification"
    runs = [r for r in table5.grid(seeds=1) if r.name in ("q_r8_s0", "qv_r4_s0")]
    done = sweep.run_study(name, runs, base, root=str(tmp_path / "sweeps"), max_adapters=2)
    assert [r["name"] for r in done] == ["q_r8_s0", "qv_r4_s0"]
    summary = json.loads((tmp_path / "sweeps" / name / "q_r8_s0" / "summary.json").read_text())
    assert summary["label_names"] == ["neg", "pos"] and "test_macro_f1" in summary
    with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
        sweep.study_base("table5", str(tmp_path / "nope.py"), "", "", {})
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        sweep.study_base("table5", str(tmp_path / "empty.py"), "", "", {})

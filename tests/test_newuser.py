"""A new user's path with a CSV of their own (issue 29): evaluate a run on a labelled file,
predict without losing the file's columns, export onto a base named as a local directory, and
load the export outside lorax (PEFT for a cls-pooled run, the README's lines for a mean-pooled
one) with no network."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, tiny_config

from lorax import export, runs
from lorax import predict as predict_lib
from lorax import train as train_lib

WORDS = {
    "pos": ["great", "lovely", "superb", "happy", "wonderful"],
    "neg": ["awful", "boring", "terrible", "sad", "dreadful"],
}


def _tweets(n: int, start: int = 0) -> list[dict]:
    """Tweet-like rows: a text, a label and an id (a column lorax does not read)."""
    rows = []
    for i in range(start, start + n):
        label = "pos" if i % 3 else "neg"
        words = WORDS[label]
        rows.append({"id": f"t{i}", "text": f"a {words[i % 5]} day, {words[(i + 2) % 5]} {i}",
                     "label": label})  # fmt: skip
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mean_run(tiny_model_dir, tmp_path_factory):
    """A mean-pooled (the default) run on a CSV with its own test file."""
    d = tmp_path_factory.mktemp("mean_run")
    _write_csv(d / "train.csv", _tweets(96))
    _write_csv(d / "test.csv", _tweets(40, start=1000))
    overrides = {
        "task.name": "text_classification", "task.data": str(d / "train.csv"),
        "task.test_file": str(d / "test.csv"), "task.validation_size": 16,
        "train.num_steps": 12,
    }  # fmt: skip
    config = tiny_config(tiny_model_dir, "", **overrides)
    summary = train_lib.train_and_evaluate(config, str(d / "run"))
    return d, summary


def test_gold_evaluation_gives_the_summarys_test_metrics(mean_run):
    """Evaluating a run on its own test file through lorax.predict's --gold path gives the
    accuracy, macro-F1, per-class figures, confusion matrix and loss that training wrote in
    summary.json for that split."""
    d, summary = mean_run
    predictor = predict_lib.Predictor(str(d / "run"))
    src = str(d / "test.csv")
    rows, numbers, usable = predict_lib.read_scorable(predictor, src, "text", "")
    kept, gold, skipped = predict_lib.gold_labels(predictor, src, rows, numbers, usable, "label")
    logits = predict_lib.score_rows(predictor, rows, usable, "text", "")
    m = predict_lib.gold_metrics(predictor.labels, logits[kept], gold)
    assert skipped == {"no_gold_label": 0, "no_text": 0}
    assert 0.5 < summary["test_macro_f1"]  # a model that learnt, not one class everywhere
    assert m["examples"] == summary["test_examples"] == 40
    assert m["confusion"] == summary["test_confusion"]
    assert m["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert m["macro_f1"] == pytest.approx(summary["test_macro_f1"])
    for name, figures in summary["test_per_class"].items():
        assert m["per_class"][name] == pytest.approx(figures)
    assert m["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
    text = predict_lib.format_metrics(m)
    assert "confusion (rows gold, columns predicted)" in text and "macro-F1" in text


def test_gold_evaluation_names_bad_labels_and_skips_missing_ones(mean_run, tmp_path):
    d, _ = mean_run
    predictor = predict_lib.Predictor(str(d / "run"))
    rows = [*_tweets(3), {"id": "x", "text": "no gold here", "label": ""},
            {"id": "y", "text": "a great day", "label": "meh"}]  # fmt: skip
    src = str(_write_csv(tmp_path / "bad.csv", rows))
    read = predict_lib.read_scorable(predictor, src, "text", "")
    with pytest.raises(ValueError, match=r"bad.csv row 6: label = 'meh' is not one of .*neg"):
        predict_lib.gold_labels(predictor, src, *read, "label")
    src = str(_write_csv(tmp_path / "ok.csv", rows[:-1]))
    read = predict_lib.read_scorable(predictor, src, "text", "")
    _, gold, skipped = predict_lib.gold_labels(predictor, src, *read, "label")
    assert len(gold) == 3 and skipped["no_gold_label"] == 1
    with pytest.raises(ValueError, match=r"no row has the column --gold=category"):
        predict_lib.gold_labels(predictor, src, *read, "category")


def test_predict_keeps_the_input_columns_and_refuses_to_overwrite_one(mean_run, tmp_path):
    """A file with a gold `label` column: predicting into the default column is refused,
    naming it, before any scoring; --column writes beside it, keeping every input column;
    --overwrite replaces it."""
    d, _ = mean_run
    predictor = predict_lib.Predictor(str(d / "run"))
    rows = _tweets(5)
    src = str(_write_csv(tmp_path / "in.csv", rows))
    dst = str(tmp_path / "out.csv")
    with pytest.raises(ValueError, match=r"already has the column\(s\) \['label'\].*--column="):
        predict_lib.predict_file(predictor, src, dst, "text", "")
    assert not os.path.exists(dst)
    with pytest.raises(ValueError, match=r"--column=text is the text column"):
        predict_lib.predict_file(predictor, src, dst, "text", "", column="text", overwrite=True)
    # the label under a probability's name would be overwritten by it: no class in the file
    with pytest.raises(ValueError, match=r"--column=prob_pos is where .* probability"):
        predict_lib.predict_file(predictor, src, dst, "text", "", column="prob_pos")
    assert not os.path.exists(dst)
    predict_lib.predict_file(predictor, src, dst, "text", "", column="predicted")
    out = _read_csv(dst)
    assert [(r["id"], r["text"], r["label"]) for r in out] == [
        (r["id"], r["text"], r["label"]) for r in rows
    ]
    assert all(r["predicted"] in ("neg", "pos") for r in out)
    assert set(out[0]) == {"id", "text", "label", "predicted", "prob_neg", "prob_pos"}
    predict_lib.predict_file(predictor, src, dst, "text", "", overwrite=True)
    assert [r["label"] for r in _read_csv(dst)] == [r["predicted"] for r in out]


def test_export_names_the_base_as_given_and_checks_base(tiny_model_dir, tmp_path, monkeypatch):
    """base_model_name_or_path: a local model directory stays a directory (made absolute), an
    asset becomes its hub id, hf:ORG/NAME its hub id; --base is checked before any work."""
    config = tiny_config(tiny_model_dir, "")
    monkeypatch.chdir(tiny_model_dir.parent)
    config.model.name = tiny_model_dir.name  # relative, as a user may type it
    assert export.base_name(config) == str(tiny_model_dir)
    config.model.name = "minilm-l6"
    assert export.base_name(config) == "sentence-transformers/all-MiniLM-L6-v2"
    config.model.name = "hf:org/some-bert"
    assert export.base_name(config) == "org/some-bert"
    config.model.name = str(tiny_model_dir)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert export.check_base(str(copy), config) == str(copy)
    assert export.check_base("org/some-bert", config) == "org/some-bert"
    with pytest.raises(FileNotFoundError, match=r"--base=/no/such/dir does not exist"):
        export.check_base("/no/such/dir", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json"):
        export.check_base(str(tmp_path / "empty"), config)
    other = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**other, "hidden_size": 32}))
    with pytest.raises(
        ValueError, match=r"not the run's base model: hidden_size 32 \(the run's 64\)"
    ):
        export.check_base(str(copy), config)


def test_export_base_is_checked_against_a_gguf_runs_shapes(tiny_model_dir, tmp_path):
    """A run on the GGUF asset (smollm2-135m: no config.json to compare with) checks --base
    by the weight shapes of the GGUF header: SmolLM2-135M's Hugging Face config.json passes,
    a BERT directory and a smaller Llama are refused (both were accepted, and named as the
    base of a Llama adapter)."""
    sys.path.insert(0, REPO)
    from configs import smollm2_text_r8

    config = smollm2_text_r8.get_config()
    smol = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "tie_word_embeddings": True}  # fmt: skip
    hf_copy = tmp_path / "smollm2-hf"
    hf_copy.mkdir()
    (hf_copy / "config.json").write_text(json.dumps(smol))
    assert export.check_base(str(hf_copy), config) == str(hf_copy)
    with pytest.raises(ValueError, match=r"--base=.*tiny_bert.* is not the run's base model"):
        export.check_base(str(tiny_model_dir), config)
    (hf_copy / "config.json").write_text(json.dumps({**smol, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"is not the run's base model: \d+ of its weights"):
        export.check_base(str(hf_copy), config)


def test_export_of_a_random_architecture_run_names_no_false_base(tmp_path):
    """A run on random weights of model.architecture (model.name gives the tokenizer only):
    its adapter export named model.name's SmolLM2-135M as the base it does not fit (and said
    it was trained on its GGUF dequantization). Now refused without --base, named in one line
    before the run loads; --base is checked against the described shapes."""
    sys.path.insert(0, REPO)
    from configs import smollm2_text_r8

    arch = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip
    config = smollm2_text_r8.get_config()
    config.model.architecture = json.dumps(arch)
    run = tmp_path / "run"  # config.json alone: nothing is loaded before the refusal
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "lorax.export", f"--workdir={run}",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "random weights of model.architecture" in done.stderr
    assert "Traceback" not in done.stderr.split("lorax.export: error")[-1]
    shaped = tmp_path / "shaped"
    shaped.mkdir()
    (shaped / "config.json").write_text(json.dumps(arch))
    assert export.check_base(str(shaped), config) == str(shaped)
    (shaped / "config.json").write_text(json.dumps({**arch, "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"is not the run's base model: \d+ of its weights"):
        export.check_base(str(shaped), config)


def _readme_snippet() -> str:
    """The README's block that loads a mean-pooled export in plain transformers + peft."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = [b for b in blocks if "lorax_head.safetensors" in b]
    assert len(found) == 1, "the README has one block loading lorax_head.safetensors"
    return found[0]


def _offline_python(code: str, cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_snippet_loads_a_mean_pooled_export_as_lorax_predicts(mean_run, tmp_path):
    """The README's few lines (run as written, the export's path put in, offline) give
    lorax.predict's logits within 1e-4 from the adapter export, whose folder holds the
    tokenizer, the head and the classes."""
    pytest.importorskip("peft")
    d, _ = mean_run
    config, setup, trainable = runs.load_run(str(d / "run"))
    out = export.write_export(config, setup, trainable, tmp_path / "news")
    for name in ("tokenizer.json", "tokenizer_config.json", "lorax_head.safetensors",
                 "lorax_labels.json", "adapter_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        config.model.name
    )
    snippet = _readme_snippet()
    assert 'out = "export/news"' in snippet
    code = snippet.replace('out = "export/news"', f"out = {str(out)!r}")
    code += "\nprint(json.dumps(logits.tolist()))\n"
    lines = _offline_python(code, tmp_path).strip().splitlines()
    theirs = np.array(json.loads(lines[-1]))
    texts = ["the senate passed the budget", "the team won the final"]
    ours = predict_lib.Predictor(str(d / "run")).logits(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.abs(ours).max() > 1e-3
    assert lines[-2] == str([list(config.task.labels)[i] for i in ours.argmax(1)])


def _cli(*args, expect: int = 0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_new_user_path_csv_to_peft_with_no_network(tiny_model_dir, tmp_path):
    """The tweets-sized path, each step a fresh command: train a cls-pooled classifier from a
    CSV (base: a local directory) → evaluate it on a labelled file → predict that file (its
    gold column kept) → export with --base=<another local directory> → PEFT's
    AutoPeftModelForSequenceClassification loads the export with the Hub off and the first base
    deleted, and gives lorax.predict's probabilities within 1e-4."""
    pytest.importorskip("peft")
    base_a = shutil.copytree(tiny_model_dir, tmp_path / "base_a")
    train_csv = _write_csv(tmp_path / "tweets.csv", _tweets(120))
    test_csv = _write_csv(tmp_path / "labelled.csv", _tweets(30, start=500))
    run = tmp_path / "run"
    _cli("lorax.train", "--config=configs/wq_wv_r4.py", f"--workdir={run}",
         f"--config.model.name={base_a}", "--config.model.pooling=cls",
         "--config.task.name=text_classification", f"--config.task.data={train_csv}",
         "--config.task.validation_size=0.1", "--config.task.test_size=0.2",
         "--config.task.max_length=32", "--config.task.buckets=(32,)",
         "--config.train.num_steps=8", "--config.train.batch_size=16",
         "--config.train.learning_rate=0.01", "--config.eval_batch_size=32")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())

    metrics_json = tmp_path / "metrics.json"
    done = _cli("lorax.predict", f"--workdir={run}", f"--input={test_csv}", "--gold=label",
                f"--metrics_out={metrics_json}")  # fmt: skip
    metrics = json.loads(metrics_json.read_text())
    assert metrics["examples"] == 30 and metrics["label_names"] == summary["label_names"]
    assert sum(map(sum, metrics["confusion"])) == 30
    assert f"accuracy {metrics['accuracy']:.4f}" in done.stdout and "confusion" in done.stdout

    pred_csv = tmp_path / "predicted.csv"
    done = _cli("lorax.predict", f"--workdir={run}", f"--input={test_csv}", f"--out={pred_csv}",
                expect=2)  # fmt: skip
    assert "already has the column(s) ['label']" in done.stderr and not pred_csv.exists()
    _cli("lorax.predict", f"--workdir={run}", f"--input={test_csv}", f"--out={pred_csv}",
         "--column=predicted")  # fmt: skip
    predicted = _read_csv(pred_csv)
    assert [r["label"] for r in predicted] == [r["label"] for r in _read_csv(test_csv)]
    accuracy = np.mean([r["label"] == r["predicted"] for r in predicted])
    assert accuracy == pytest.approx(metrics["accuracy"])

    base_b = shutil.copytree(base_a, tmp_path / "elsewhere" / "base_b")
    out = tmp_path / "export"
    _cli("lorax.export", f"--workdir={run}", f"--out={out}", "--task_type=seq_cls",
         f"--base={base_b}")  # fmt: skip
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_b)
    shutil.rmtree(base_a)  # only --base's copy is left to load
    texts = [r["text"] for r in predicted]
    code = f"""
import json, torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
out = {str(out)!r}
model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=2).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
batch = tokenizer({texts!r}, padding=True, truncation=True, max_length=32, return_tensors="pt")
with torch.no_grad():
    print(json.dumps(model(**batch).logits.softmax(-1).tolist()))
"""
    theirs = np.array(json.loads(_offline_python(code, tmp_path).strip().splitlines()[-1]))
    ours = np.array([[float(r[f"prob_{n}"]) for n in summary["label_names"]] for r in predicted])
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert ours.std() > 1e-3  # a trained classifier, not a constant


def test_final_evaluation_shows_progress(tiny_model_dir, tmp_path, capsys):
    """After the training bar, the final evaluation says what it evaluates and counts its
    batches to the end (it looked hung for minutes on a real run); a periodic evaluation's
    bar is gone when it ends."""
    _write_csv(tmp_path / "train.csv", _tweets(96))
    overrides = {
        "task.name": "text_classification", "task.data": str(tmp_path / "train.csv"),
        "task.validation_size": 40, "task.test_size": 24, "train.num_steps": 2,
        "eval_every": 1, "eval_batch_size": 16,
    }  # fmt: skip
    train_lib.train_and_evaluate(tiny_config(tiny_model_dir, "", **overrides), str(tmp_path / "r"))
    captured = capsys.readouterr()
    err = captured.out + captured.err  # messages on stdout (tqdm.write), bars on stderr
    assert f"loading {tiny_model_dir} and the text_classification data" in err
    assert "final evaluation: 40 validation and 24 test examples" in err
    done = re.findall(r"final eval (validation|test): 100%\|[^|]*\| (\d+)/(\d+)", err)
    assert {split for split, _, _ in done} == {"validation", "test"}
    assert all(n == total and int(n) >= 2 for _, n, total in done)  # every batch counted
    assert "eval validation:" in err  # the periodic evaluation at step 1


def test_xla_cache_folder_follows_lorax_cache_and_lorax_xla_cache(tmp_path, monkeypatch):
    from lorax import cli

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("LORAX_XLA_CACHE", raising=False)
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    assert cli.xla_cache_dir() == str(tmp_path / "cache" / "xla")
    monkeypatch.setenv("LORAX_XLA_CACHE", str(tmp_path / "elsewhere"))
    assert cli.xla_cache_dir() == str(tmp_path / "elsewhere")
    for off in ("0", ""):
        monkeypatch.setenv("LORAX_XLA_CACHE", off)
        assert cli.xla_cache_dir() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # the tests' own
    monkeypatch.delenv("LORAX_XLA_CACHE")
    assert cli.xla_cache_dir() is None  # JAX's variable is left to JAX


def test_a_second_command_reads_the_compiled_programs_from_the_cache(tmp_path):
    """A command line's compiles land in the lorax cache folder; a second process finds them
    there (no new entry written) and LORAX_XLA_CACHE=0 writes none."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from lorax import cli\n"
        "print(cli.use_xla_cache())\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))\n"
        "print(f(jnp.ones((96, 96))).block_until_ready()[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(LORAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip

    def run(**extra):
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, env={**env, **extra})  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.splitlines()[0]

    xla = tmp_path / "cache" / "xla"

    def entries():  # compiled executables (the -atime files beside them mark their last use)
        return {p.name: p.stat().st_mtime_ns for p in xla.glob("*-cache")}

    assert run() == str(xla)
    first = entries()
    assert any(name.startswith("jit__lambda") for name in first)  # the jitted function
    run()
    assert entries() == first  # read back, none compiled and written again
    assert run(LORAX_XLA_CACHE="0", LORAX_CACHE=str(tmp_path / "off")) == "None"
    assert not (tmp_path / "off").exists()


def test_the_capped_cache_keeps_writing_beside_entries_written_without_a_cap(tmp_path):
    """A compiled program written into the cache folder with no size cap has no -atime mark
    (an older lorax, JAX_COMPILATION_CACHE_MAX_SIZE=-1, another JAX tool sharing the folder).
    JAX's capped cache reads every entry's mark before writing one, so one unmarked entry
    made every later command's writes fail (a warning per compile, nothing cached): the
    command line marks such entries when it turns the cache on."""
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from lorax import cli\n"
        "cli.use_xla_cache()\n"
        "n = int(sys.argv[1])\n"
        "print(jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((n, n)))[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(LORAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip

    def run(n, **extra):
        done = subprocess.run([sys.executable, "-c", code, str(n)], cwd=REPO,
                              capture_output=True, text=True, env={**env, **extra})  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    xla = tmp_path / "cache" / "xla"
    run(64, JAX_COMPILATION_CACHE_MAX_SIZE="-1")  # uncapped: no marks
    (unmarked,) = [p.name for p in xla.glob("jit__lambda*-cache")]
    assert not list(xla.glob("*-atime"))
    err = run(80)  # capped (the command lines' default)
    assert "Error writing persistent compilation cache" not in err
    assert len(list(xla.glob("jit__lambda*-cache"))) == 2  # the new program was written
    assert (xla / unmarked.replace("-cache", "-atime")).exists()

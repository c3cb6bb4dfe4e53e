"""Your own data by config alone: text_classification / pair_classification from csv, tsv,
jsonl, json and parquet files (lorax/data/filetasks.py, tables.py)."""

import csv
import json

import numpy as np
import pytest
from helpers import tiny_config

from lorax import data, runs
from lorax import train as train_lib
from lorax.data import filetasks

TOPICS = {
    "sports": "the team won the match in the final minute",
    "politics": "the senate passed the new budget bill today",
    "tech": "the company released a faster phone chip",
}


def _news_rows(n=90):
    names = sorted(TOPICS)
    return [
        {"text": f"{TOPICS[names[i % 3]]} story {i}", "category": names[i % 3], "id": i}
        for i in range(n)
    ]


def _write(path, rows, fmt):
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _task_config(**fields):
    c = tiny_config("unused", "", **{"task.name": "text_classification"}).task
    c.text_field, c.label_field = "text", "category"
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "json", "parquet"])
def test_every_format_gives_the_same_task_as_csv(tmp_path, tokenizer, fmt):
    rows = _news_rows()
    csv_task = filetasks.TEXT_CLASSIFICATION.load(
        _task_config(data=str(_write(tmp_path / "news.csv", rows, "csv")), validation_size=0.2,
                     test_size=15),
        tokenizer, max_length=32,
    )  # fmt: skip
    other = filetasks.TEXT_CLASSIFICATION.load(
        _task_config(data=str(_write(tmp_path / f"news.{fmt}", rows, fmt)), validation_size=0.2,
                     test_size=15),
        tokenizer, max_length=32,
    )  # fmt: skip
    assert csv_task.label_names == other.label_names == ("politics", "sports", "tech")
    for split in ("train", "validation", "test"):
        a, b = csv_task.splits[split], other.splits[split]
        assert [x.tolist() for x in a.input_ids] == [x.tolist() for x in b.input_ids]
        np.testing.assert_array_equal(a.labels, b.labels)
    # 90 rows: 18 (20%) validation, 15 test, 57 train; the same rows whatever the format
    assert [csv_task.counts[f"{s}/rows"] for s in ("train", "validation", "test")] == [57, 18, 15]


def test_labels_are_sorted_numerically_or_fixed_by_config(tmp_path, tokenizer):
    rows = [{"text": f"review number {i}", "stars": [1, 2, 10][i % 3]} for i in range(30)]
    path = _write(tmp_path / "stars.jsonl", rows, "jsonl")
    config = _task_config(data=str(path), label_field="stars", validation_size=3, test_size=3)
    task = filetasks.TEXT_CLASSIFICATION.load(config, tokenizer, max_length=32)
    assert task.label_names == ("1", "2", "10")  # not "1", "10", "2"
    config.labels = ("10", "2", "1")
    task = filetasks.TEXT_CLASSIFICATION.load(config, tokenizer, max_length=32)
    assert task.label_names == ("10", "2", "1")
    all_labels = np.concatenate([task.splits[s].labels for s in ("train", "validation", "test")])
    assert sorted(np.bincount(all_labels).tolist()) == [10, 10, 10]


def test_pair_task_from_a_folder_with_split_files_and_bad_rows_counted(tmp_path, tokenizer):
    folder = tmp_path / "pairs"
    folder.mkdir()
    good = [{"q": f"is it {i}", "a": f"it is {i}", "y": ["yes", "no"][i % 2]} for i in range(40)]
    bad = [{"q": "no answer field", "y": "yes"}, {"q": "", "a": "empty", "y": "no"},
           {"q": "no label", "a": "x", "y": ""}, {"q": 5, "a": "number", "y": "yes"},
           {"q": "unsure", "a": "x", "y": "-"}]  # fmt: skip
    _write(folder / "train.jsonl", good + bad, "jsonl")
    _write(folder / "dev.csv", good[:6], "csv")
    _write(folder / "test.parquet", good[6:16], "parquet")
    config = _task_config(
        data=str(folder),
        text_field="q",
        text_pair_field="a",
        label_field="y",
        validation_size=1,
        skip_labels=("-",),
    )
    config.name = "pair_classification"
    task = data.load_task(
        "pair_classification", None, tokenizer, max_length=32, validation_size=1,
        task_config=config,
    )  # fmt: skip
    assert [task.counts[f"{s}/rows"] for s in ("train", "validation", "test")] == [40, 6, 10]
    for reason, n in (("missing_field", 1), ("empty_text", 1), ("no_gold_label", 2),
                      ("bad_type", 1)):  # fmt: skip
        assert task.counts[f"train/skipped_{reason}"] == n, reason
    first = task.splits["validation"].input_ids[0].tolist()
    assert tokenizer.decode(first) == "[CLS] is it 0 [SEP] it is 0 [SEP]"


def test_errors_name_the_field_file_and_row(tmp_path, tokenizer):
    rows = _news_rows(30)
    train = _write(tmp_path / "train.csv", rows, "csv")
    test = _write(tmp_path / "test.csv", [*rows[:3], {**rows[3], "category": "weather"}], "csv")
    load = filetasks.TEXT_CLASSIFICATION.load
    config = _task_config(train_file=str(train), test_file=str(test), validation_size=3)
    with pytest.raises(ValueError, match=r"test.csv row 5: category = 'weather' is not one of"):
        load(config, tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"no row has the field\(s\) \['topic'\]"):
        load(_task_config(data=str(train), label_field="topic"), tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"task.test_size = 1.5 must be a count >= 2 or a fr"):
        load(_task_config(data=str(train), test_size=1.5), tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"leaves none of the 30 usable training rows"):
        load(_task_config(data=str(train), validation_size=20, test_size=10), tokenizer,
             max_length=32)  # fmt: skip
    with pytest.raises(ValueError, match=r"task.data = '.*nothing' names no training file"):
        load(_task_config(data=str(tmp_path / "nothing")), tokenizer, max_length=32)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt: cannot tell its format"):
        load(_task_config(train_file=str(tmp_path / "notes.txt")), tokenizer, max_length=32)


def test_a_run_on_a_csv_records_its_labels_metrics_and_confusion_matrix(tiny_model_dir, tmp_path):
    """Trained by config alone; config.json and summary.json name the classes, the summary
    has macro-F1, per-class figures and the confusion matrix, the workdir its PNG, and the
    run reads back in a fresh setup from the workdir alone (the data file removed)."""
    path = _write(tmp_path / "news.csv", _news_rows(120), "csv")
    overrides = {
        "task.name": "text_classification", "task.data": str(path), "task.label_field":
        "category", "task.validation_size": 0.1, "task.test_size": 0.2, "train.num_steps": 4,
    }  # fmt: skip
    config = tiny_config(tiny_model_dir, "", **overrides)
    summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    names = ["politics", "sports", "tech"]
    assert summary["label_names"] == names
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"]["labels"] == names
    assert sum(map(sum, summary["test_confusion"])) == summary["test_examples"] == 24
    assert set(summary["test_per_class"]) == set(names)
    per_class = summary["test_per_class"]
    assert sum(c["support"] for c in per_class.values()) == 24
    f1 = [c["f1"] for c in per_class.values()]
    assert summary["test_macro_f1"] == pytest.approx(sum(f1) / 3)
    assert (tmp_path / "run" / "confusion_test.png").stat().st_size > 1000
    path.unlink()
    config, setup, _ = runs.load_run(str(tmp_path / "run"))
    assert setup.model.num_classes == 3 and list(config.task.labels) == names


def test_class_metrics_match_a_hand_computed_example():
    from lorax import evaluate

    # true 0: 3 right, 1 called 1; true 1: 2 right; true 2: never predicted (1 called 0)
    m = evaluate.class_metrics(np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]]))
    assert m["per_class"][0] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    )
    assert m["per_class"][1]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"][1]["f1"] == pytest.approx(0.8)
    assert m["per_class"][2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.75 + 0.8 + 0) / 3)


@pytest.mark.slow
def test_csv_to_train_predict_export_from_the_command_line_alone(tiny_model_dir, tmp_path):
    """The whole path with no Python written, each step a fresh process: train from a CSV
    (with a parquet test file), predict a text and a JSONL file, export the adapter and the
    merged model; the labels travel into every artifact."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    rows = _news_rows(150)
    _write(tmp_path / "news.csv", rows[:120], "csv")
    _write(tmp_path / "test.parquet", rows[120:], "parquet")
    _write(tmp_path / "new.jsonl", [{"text": r["text"], "id": r["id"]} for r in rows[:7]]
           + [{"text": "", "id": -1}], "jsonl")  # fmt: skip
    run = tmp_path / "run"

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def cli(*args):
        cmd = [sys.executable, "-m", *args]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    cli("lorax.train", "--config=configs/wq_wv_r4.py", f"--workdir={run}",
        f"--config.model.name={tiny_model_dir}", "--config.task.name=text_classification",
        f"--config.task.data={tmp_path / 'news.csv'}",
        f"--config.task.test_file={tmp_path / 'test.parquet'}",
        "--config.task.label_field=category", "--config.task.validation_size=0.1",
        "--config.task.max_length=32", "--config.task.buckets=(32,)",
        "--config.train.num_steps=3", "--config.train.batch_size=8",
        "--config.eval_batch_size=16", "--config.log_every=1")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["label_names"] == ["politics", "sports", "tech"]
    assert summary["test_examples"] == 30
    out = cli("lorax.predict", f"--workdir={run}", "--text=the senate passed the budget")
    assert json.loads(out.splitlines()[0].split("  (")[0])["label"] in summary["label_names"]
    cli("lorax.predict", f"--workdir={run}", f"--input={tmp_path / 'new.jsonl'}",
        f"--out={tmp_path / 'predicted.csv'}")  # fmt: skip
    with open(tmp_path / "predicted.csv") as f:
        predicted = list(csv.DictReader(f))
    assert [r["id"] for r in predicted] == [str(r["id"]) for r in rows[:7]] + ["-1"]
    assert predicted[-1]["label"] == "" and all(r["label"] for r in predicted[:7])
    probs = np.array(
        [[float(r[f"prob_{n}"]) for n in summary["label_names"]] for r in predicted[:7]]
    )
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    out = cli("lorax.export", f"--workdir={run}", f"--out={tmp_path / 'adapter'}")
    assert "pooled by mean" in out and "--task_type=seq_cls" in out  # what it loads as
    cli("lorax.export", f"--workdir={run}", f"--out={tmp_path / 'merged'}", "--merged")
    labels = json.loads((tmp_path / "adapter" / "lorax_labels.json").read_text())
    assert labels["id2label"] == {"0": "politics", "1": "sports", "2": "tech"}
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["label2id"] == {"politics": 0, "sports": 1, "tech": 2}


@pytest.mark.slow
def test_seq_cls_export_predicts_in_peft_what_lorax_predicts(tiny_model_dir, tmp_path):
    """A cls-pooled run exported with task_type=seq_cls loads with
    AutoPeftModelForSequenceClassification (the base from disk) and gives lorax.predict's
    logits within 1e-4 and the same labels; a mean-pooled run is refused, saying why."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from lorax import export
    from lorax.predict import Predictor

    path = _write(tmp_path / "news.csv", _news_rows(90), "csv")
    overrides = {
        "task.name": "text_classification", "task.data": str(path), "task.label_field":
        "category", "task.validation_size": 9, "task.test_size": 9, "train.num_steps": 4,
        "model.pooling": "cls", "lora.targets": "q,k,v,o",
    }  # fmt: skip
    train_lib.train_and_evaluate(tiny_config(tiny_model_dir, "", **overrides), str(tmp_path / "r"))
    config, setup, trainable = runs.load_run(str(tmp_path / "r"))
    out = export.export_adapter(config, setup, trainable, tmp_path / "seq_cls", "seq_cls")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert adapter_config["modules_to_save"] == ["classifier"]
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(out), num_labels=3
    ).eval()
    texts = [r["text"] for r in _news_rows(12)] + ["a much longer text " * 6]
    enc = setup.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**enc).logits.numpy()
    ours = Predictor(str(tmp_path / "r")).logits(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert np.abs(ours).max() > 1e-3  # a trained head, not zeros
    config.model.pooling = "mean"
    with pytest.raises(ValueError, match=r"pooling = 'mean'.*only a model.pooling = 'cls' run"):
        export.export_adapter(config, setup, trainable, tmp_path / "no", "seq_cls")

"""Predicts with a trained classifier or reward model: ``python -m lorax.predict --workdir=W
--text=...``.

Reads everything from the workdir (config.json with the class names, the latest checkpoint,
the base model the run names), so it works in a fresh process with no data files::

  python -m lorax.predict --workdir=runs/news --text="the senate passed the budget"
  python -m lorax.predict --workdir=runs/snli --text="A man sleeps." --text_pair="A person rests."
  python -m lorax.predict --workdir=runs/news --input=new.csv --out=predicted.csv

A file (csv, tsv, jsonl, json or parquet) comes back with its rows in order, each with the
predicted class in ``--column`` (default ``label``) and one ``prob_<class>`` column per class
(csv, tsv or jsonl, by ``--out``'s name); the input's own columns are kept, and one that the
prediction would write is refused unless ``--overwrite`` (a gold ``label`` column is not lost).
A row without usable text keeps its columns with an empty label and is counted. ``--gold=COLUMN``
evaluates the run on a labelled file (the metrics of ``summary.json`` and the confusion
matrix)::

  python -m lorax.predict --workdir=runs/news --input=labelled.csv --gold=category

Texts are tokenized as in training (cut to the run's ``task.max_length``), batched by length
bucket and scored by one jitted forward per bucket.

A reward model (``train.objective = "reward"``) gives each text its scalar reward instead:
``--text`` is a whole text (a prompt and its response), or ``--text`` a prompt and
``--text_pair`` its response, tokenized as its training rows were (the chat template on the
prompt if the run used one, the eos after the response); a file's rows get a ``reward``
column (``--column``)::

  python -m lorax.predict --workdir=runs/rm --text="Instruction: ..." --text_pair="Paris."
  python -m lorax.predict --workdir=runs/rm --input=answers.jsonl --out=scored.jsonl \
      --text_field=prompt --text_pair_field=response
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import app, flags
from absl import logging as absl_logging

from lorax import cli, evaluate, runfiles, runs, sharding
from lorax import data as data_lib
from lorax import setup as setup_lib
from lorax.data import filetasks, preferences, tables, tasks


def is_pair(task_config) -> bool:
    """Whether the run's task reads text pairs (its model was trained on [CLS] a [SEP] b)."""
    if task_config.name in data_lib.FILE_TASKS:
        return data_lib.FILE_TASKS[task_config.name].pair
    return isinstance(data_lib.TASKS.get(task_config.name), data_lib.PairClassification)


class Predictor:
    """A finished classification run, ready to score texts: ``probabilities(texts, pairs)``;
    or a reward model's: ``rewards(texts, responses)``."""

    def __init__(self, workdir: str, batch_size: int = 64):
        self.config, self.setup, trainable = runs.load_run(workdir)
        self.reward = self.setup.kind == "reward"
        if self.setup.kind == "lm":
            raise ValueError(
                f"{workdir} is a causal-LM run ({self.config.task.name}); lorax.predict scores "
                "classifiers and reward models: use lorax.generate for it"
            )
        self.labels = ("reward",) if self.reward else data_lib.label_names(self.config.task)
        self.pair = not self.reward and is_pair(self.config.task)
        mesh = self.setup.mesh
        self.batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
        self.trainable = sharding.put(trainable, mesh)
        forward = setup_lib.make_forward(self.setup, logits=True)
        self._logits = jax.jit(lambda t, f, b: forward(t, f, b, None, False))

    def rewards(
        self, texts: Sequence[str], responses: Sequence[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """[N] a reward model's fp32 reward of each text (``texts[i]`` a whole text, or with
        ``responses`` a prompt followed by ``responses[i]``), in order. A row longer than
        ``task.max_length`` keeps its first tokens (:func:`preferences.encode_scored`)."""
        if not self.reward:
            raise ValueError("this run is a classifier: use probabilities() / logits()")
        task = self.config.task
        rows = preferences.encode_scored(
            self.setup.tokenizer, list(texts), None if responses is None else list(responses),
            max_length=task.max_length, chat_template=bool(task.get("chat_template", False)),
        )  # fmt: skip
        batches = preferences.scoring_batches(
            rows, self.batch_size, task.buckets, pad_id=self.setup.pad_id
        )
        if progress:
            total = -(-len(rows) // self.batch_size)
            batches = tqdm.tqdm(batches, total=total, unit="batch", desc="predict")
        out = np.zeros(len(rows), np.float32)
        for index, batch in batches:
            rewards = self._logits(
                self.trainable, self.setup.frozen, sharding.put_batch(batch, self.setup.mesh)
            )
            out[index] = np.asarray(rewards, np.float32)[: len(index)]
        return out

    def probabilities(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """[N, C] class probabilities, in the order of ``texts`` (and ``pairs``)."""
        logits = self.logits(texts, pairs, progress)
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def logits(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """[N, C] fp32 logits, in the order of ``texts`` (and ``pairs``)."""
        if self.pair != (pairs is not None):
            need = "--text_pair (the run's task reads pairs)" if self.pair else "no --text_pair"
            raise ValueError(f"this run takes {need}")
        task = self.config.task
        examples = tasks.encode_pairs(
            self.setup.tokenizer,
            list(texts),
            None if pairs is None else list(pairs),
            list(range(len(texts))),
            max_length=task.max_length,
            counts={},
            split="predict",
        )  # fmt: skip  (labels carry each example's index through the bucketed batches)
        batcher = data_lib.Batcher(examples, self.batch_size, task.buckets, seed=0)
        out = np.zeros((len(texts), len(self.labels)), np.float32)
        batches = batcher.eval_batches()
        if progress:
            total = batcher.num_eval_batches
            batches = tqdm.tqdm(batches, total=total, unit="batch", desc="predict")
        for batch in batches:
            logits = self._logits(
                self.trainable, self.setup.frozen, sharding.put_batch(batch, self.setup.mesh)
            )
            real = batch["weights"] > 0
            out[batch["labels"][real]] = np.asarray(logits, np.float32)[real]
        return out


def read_input(src: str, encoding: str = "utf-8") -> list[tuple[int, dict]]:
    """``(row number, row)`` of an input file, decoded as ``encoding``.

    Read as UTF-8 (the default), a file with bytes that are not UTF-8 (latin-1, cp1252) is
    refused, naming its first such row: scoring it would replace those bytes by U+FFFD and
    write the damaged text to ``--out``. ``--encoding`` reads it as what it is; its text is
    written out as UTF-8, and a note says so.
    """
    counts: dict[str, int] = {}
    numbered = list(tables.read_rows(src, "predict", counts, encoding))
    bad = counts.get("predict/bad_utf8", 0)
    utf8 = tables.codecs_name(encoding) == "utf-8"
    if bad and utf8:
        damaged = (n for n, r in numbered
                   if any(isinstance(v, str) and "\ufffd" in v for v in r.values()))  # fmt: skip
        first = next(damaged, "?")
        raise ValueError(
            f"{src}: {bad} row(s) are not valid UTF-8 (the first at row {first}); predicting "
            "would replace their undecodable bytes with U+FFFD and write the damaged text out. "
            "Pass --encoding=latin-1 (or the file's own encoding) to read it as such"
        )
    dropped = counts.get("predict/skipped_bad_json", 0)
    if dropped:
        raise ValueError(
            f"{src}: {dropped} line(s) are not JSON objects (the first are named above); "
            "lorax.predict would leave them out, so its rows would no longer line up with "
            "the input's: fix or remove them"
        )
    extra = counts.get("predict/rows_with_extra_cells", 0)
    if extra:
        raise ValueError(
            f"{src}: {extra} row(s) have more cells than the header names columns (an unquoted "
            "comma in a text?); lorax.predict would drop those cells: quote or fix the rows"
        )
    if not utf8:
        runs.warn(f"read {src} as {encoding} (--encoding); rows are written out as UTF-8")
    return numbered


def check_out(path: str) -> None:
    """Refuses ``--out`` before any work (not after every prediction): a format lorax.predict
    cannot write, a directory, a folder that does not exist, or a place it cannot write."""
    if tables.file_format(path) not in ("csv", "tsv", "jsonl") or path.endswith((".gz", ".bz2")):
        raise ValueError(f"--out={path}: write a .csv, .tsv or .jsonl file")
    if os.path.isdir(path):
        raise ValueError(f"--out={path} is a directory; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out={path}: the folder {folder} does not exist; create it")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"--out={path}: {folder} is not writable; name a file elsewhere")


def check_metrics_out(path: str) -> None:
    """Refuses ``--metrics_out`` before any work: a directory, a folder that does not exist or
    one it cannot write in (it was found only after every row was scored)."""
    if os.path.isdir(path):
        raise ValueError(f"--metrics_out={path} is a directory; name a .json file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--metrics_out={path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--metrics_out={path}: {folder} is not writable")


def read_scorable(
    predictor: Predictor, src: str, text_field: str, pair_field: str, encoding: str = "utf-8"
):
    """``(rows, row numbers, indices of the rows with usable text)`` of an input file
    (:func:`read_input`); an error when no row has text in the fields the run reads."""
    numbered = read_input(src, encoding)
    rows = [row for _, row in numbered]
    fields = [text_field, *([pair_field] if _reads_pairs(predictor, pair_field) else [])]
    usable = [
        i for i, r in enumerate(rows)
        if all(isinstance(r.get(f), str) and r[f].strip() for f in fields)
    ]  # fmt: skip
    if rows and not usable:
        raise ValueError(
            f"{src}: no row has text in {fields}; its fields: {sorted(rows[0])} (set "
            "--text_field / --text_pair_field)"
        )
    return rows, [n for n, _ in numbered], usable


def _reads_pairs(predictor: Predictor, pair_field: str) -> bool:
    """Whether rows are read as two texts: a pair task's, or a reward model's prompt and
    response (when ``pair_field`` names the responses)."""
    return predictor.pair or (predictor.reward and bool(pair_field))


def score_rows(predictor: Predictor, rows, usable, text_field: str, pair_field: str):
    """[len(usable), C] logits of ``rows[usable]`` (a reward model's rewards as [N, 1]), with a
    progress bar."""
    texts = [rows[i][text_field] for i in usable]
    seconds = [rows[i][pair_field] for i in usable] if _reads_pairs(predictor, pair_field) else None
    if predictor.reward:
        return predictor.rewards(texts, seconds, progress=True)[:, None]
    return predictor.logits(texts, seconds, progress=True)


def output_column(predictor: Predictor, column: str) -> str:
    """``--column`` as the run writes it: a reward model's default is ``reward``."""
    return "reward" if predictor.reward and column == "label" else column


def new_columns(predictor: Predictor, column: str) -> list[str]:
    """The columns a prediction adds: ``column`` (the label) and ``prob_<class>`` per class; a
    reward model's: ``column`` (the reward) alone."""
    if predictor.reward:
        return [column]
    return [column, *(f"prob_{name}" for name in predictor.labels)]


def check_columns(src: str, rows, created: list[str], reads: list[str], overwrite: bool) -> None:
    """Refuses, before any scoring, to write a column the input already has (unless
    ``overwrite``) or one it reads its text from (ever)."""
    present = set().union(*rows) if rows else set()
    if created[0] in reads:
        raise ValueError(
            f"--column={created[0]} is the text column lorax.predict reads; name another"
        )
    if created[0] in created[1:]:  # the label would be overwritten by a class's probability
        raise ValueError(
            f"--column={created[0]} is where lorax.predict writes a class's probability "
            f"(it writes {created[1:]}); name another"
        )
    clash = [c for c in created if c in present]
    if clash and not overwrite:
        raise ValueError(
            f"{src} already has the column(s) {clash}, which lorax.predict writes; pass "
            f"--column=NAME to write the predicted label under another name (e.g. "
            f"--column=predicted), or --overwrite to replace them"
        )


def predictions(predictor: Predictor, rows, usable, logits, column: str) -> list[dict]:
    """``rows`` in order, each with ``column`` (the predicted class) and ``prob_<class>``; a
    row without usable text keeps its columns with an empty label. Input columns the
    prediction does not write are kept as they are. A reward model's rows get their reward in
    ``column`` (empty where the row had no usable text)."""
    if predictor.reward:
        rewards = dict(zip(usable, np.asarray(logits)[:, 0].tolist(), strict=True))
        return [{**row, column: rewards.get(i, "")} for i, row in enumerate(rows)]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1)) if len(usable) else logits
    columns = new_columns(predictor, column)
    scored = {i: p for i, p in zip(usable, probs, strict=True)}
    out_rows = []
    for i, row in enumerate(rows):
        p = scored.get(i)
        if p is None:  # no usable text: the row goes out as it came, unlabelled
            extra: dict[str, Any] = {column: "", **dict.fromkeys(columns[1:])}
        else:
            extra = {column: predictor.labels[int(p.argmax())]}
            extra.update({c: float(x) for c, x in zip(columns[1:], p, strict=True)})
        out_rows.append({**row, **extra})
    return out_rows


def predict_file(
    predictor: Predictor,
    src: str,
    dst: str,
    text_field: str,
    pair_field: str,
    column: str = "label",
    overwrite: bool = False,
    encoding: str = "utf-8",
):
    """Writes ``src``'s rows to ``dst`` with ``column`` and ``prob_<class>`` (see
    :func:`predictions`); returns the number of rows scored and of rows left without a label
    (no usable text). A column the input has already is refused unless ``overwrite``."""
    column = output_column(predictor, column)
    rows, _, usable = read_scorable(predictor, src, text_field, pair_field, encoding)
    reads = [text_field, *([pair_field] if _reads_pairs(predictor, pair_field) else [])]
    check_columns(src, rows, new_columns(predictor, column), reads, overwrite)
    logits = score_rows(predictor, rows, usable, text_field, pair_field)
    _write_rows(dst, predictions(predictor, rows, usable, logits, column))
    return len(usable), len(rows) - len(usable)


def gold_labels(predictor: Predictor, src: str, rows, numbers, usable, gold: str):
    """``(indices into usable, class indices)`` of the usable rows that have a gold label in
    column ``gold``, and counts of the rows skipped (no gold label: empty, missing or one of
    the run's ``task.skip_labels``). A label that is not one of the run's classes is an error
    naming the file, row and classes."""
    if rows and not any(gold in r for r in rows):
        raise ValueError(f"{src}: no row has the column --gold={gold}; its fields: "
                         f"{sorted(set().union(*rows))}")  # fmt: skip
    index = {name: k for k, name in enumerate(predictor.labels)}
    skip = {filetasks.label_key(x) for x in predictor.config.task.get("skip_labels") or ()}
    kept, classes, skipped = [], [], {"no_gold_label": 0, "no_text": len(rows) - len(usable)}
    for j, i in enumerate(usable):
        label = filetasks.label_key(rows[i].get(gold))
        if label is None or label in skip:
            skipped["no_gold_label"] += 1
            continue
        if label not in index:
            raise ValueError(
                f"{src} row {numbers[i]}: {gold} = {rows[i][gold]!r} is not one of the run's "
                f"classes {list(predictor.labels)}; fix the row, or name the gold column with "
                "--gold"
            )
        kept.append(j)
        classes.append(index[label])
    return np.asarray(kept, int), np.asarray(classes, int), skipped


def gold_metrics(labels: Sequence[str], logits, gold) -> dict[str, Any]:
    """The metrics ``summary.json`` gives a split, for ``logits`` [N, C] against class indices
    ``gold`` [N]: accuracy, mean cross-entropy loss, macro-F1, per-class precision / recall /
    F1 / support by class name and the confusion matrix (rows gold, columns predicted)."""
    logits = np.asarray(logits, np.float64)
    n, c = len(gold), len(labels)
    if not n:
        raise ValueError("no row has both usable text and a gold label to evaluate on")
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    predicted = logits.argmax(1)
    confusion = np.zeros((c, c))
    np.add.at(confusion, (gold, predicted), 1)
    m = evaluate.class_metrics(confusion)
    return {
        "accuracy": float((predicted == gold).mean()),
        "loss": float(-log_p[np.arange(n), gold].mean()),
        "macro_f1": m["macro_f1"],
        "examples": n,
        "label_names": list(labels),
        "per_class": dict(zip(labels, m["per_class"], strict=True)),
        "confusion": m["confusion"],
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as a few lines: the headline numbers, per class, the confusion matrix."""
    names = metrics["label_names"]
    width = max(8, *(len(n) for n in names))
    lines = [
        f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
        f"loss {metrics['loss']:.4f}  ({metrics['examples']} rows)",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for name in names:
        c = metrics["per_class"][name]
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  "
                     f"{c['f1']:6.4f}  {c['support']:7d}")  # fmt: skip
    lines.append("confusion (rows gold, columns predicted):")
    lines.append(" " * width + "  " + " ".join(f"{n[:width]:>{width}}" for n in names))
    for name, row in zip(names, metrics["confusion"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{x:>{width}d}" for x in row))
    return "\n".join(lines)


def _write_rows(path: str, rows: list[dict]) -> None:
    fmt = tables.file_format(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if fmt in ("csv", "tsv"):
            names = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=names, delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
        elif fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        else:
            raise ValueError(f"--out={path}: write csv, tsv or jsonl")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A finished classification or reward-model run.")
    flags.DEFINE_multi_string("text", [], "A text to classify or score (repeatable).")
    flags.DEFINE_multi_string(
        "text_pair", [], "Its second text, for pair tasks; for a reward model, its response."
    )
    flags.DEFINE_string("input", "", "A csv, tsv, jsonl, json or parquet file of rows.")
    flags.DEFINE_string(
        "out", "", "Where --input's rows go with label and prob_<class> (a reward model: reward)."
    )
    flags.DEFINE_string("text_field", "", "--input's text column (default: the run's).")
    flags.DEFINE_string(
        "text_pair_field", "", "--input's second text column (pair tasks; a reward model's "
        "responses, after the prompts in --text_field)."
    )  # fmt: skip
    flags.DEFINE_string(
        "gold", "",
        "Evaluate the run on --input: the column holding its gold labels. Prints accuracy, "
        "loss, macro-F1, per-class figures and the confusion matrix (the metrics of "
        "summary.json); --metrics_out writes them as JSON. With --out, the rows are written too.",
    )  # fmt: skip
    flags.DEFINE_string("metrics_out", "", "With --gold: a JSON file for the metrics.")
    flags.DEFINE_string(
        "column", "label", "The column --out's rows get the predicted label in (prob_<class> "
        "beside it); a reward model's default is 'reward'."
    )  # fmt: skip
    flags.DEFINE_bool(
        "overwrite", False, "Replace --input's columns that a prediction writes (refused else)."
    )
    flags.DEFINE_string(
        "encoding", "utf-8", "--input's text encoding (a file that is not UTF-8 is refused "
        "unless named here, e.g. latin-1); --out is written as UTF-8."
    )  # fmt: skip
    flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")
    flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it reads at INFO
    f = flags.FLAGS
    if bool(f.text) == bool(f.input) or (f.input and not (f.out or f.gold)):
        raise app.UsageError(
            "give --text (and --text_pair), or --input with --out (predict) and/or --gold "
            "(evaluate)"
        )
    if (f.gold or f.out or f.metrics_out) and not f.input:
        raise app.UsageError("--out, --gold and --metrics_out go with --input")
    if f.metrics_out and not f.gold:
        raise app.UsageError("--metrics_out goes with --gold")
    if f.out:
        check_out(f.out)  # before the model loads, not after every prediction
    if f.metrics_out:
        check_metrics_out(f.metrics_out)
    which = "best (train.keep_best)" if runs.kept_best(f.workdir) else "latest"
    cli.note(f"loading the run in {f.workdir} (its base model and {which} checkpoint) ...")
    predictor = Predictor(f.workdir, f.batch_size)
    if predictor.reward and f.gold:
        raise app.UsageError("--gold evaluates classifiers; this run is a reward model")
    if f.input:
        return _file(predictor, f)
    pairs = list(f.text_pair) or None
    if pairs is not None and len(pairs) != len(f.text):
        raise app.UsageError(f"{len(f.text)} --text but {len(pairs)} --text_pair")
    if predictor.reward:
        rewards = predictor.rewards(f.text, pairs)
        for i, (text, reward) in enumerate(zip(f.text, rewards, strict=True)):
            shown = {"reward": float(reward), "text": text}
            shown.update({"text_pair": pairs[i]} if pairs else {})
            print(json.dumps(shown, ensure_ascii=False))
        return
    probs = predictor.probabilities(f.text, pairs)
    for i, p in enumerate(probs):
        shown = ", ".join(f"{n} {x:.4f}" for n, x in zip(predictor.labels, p, strict=True))
        print(json.dumps({"label": predictor.labels[int(p.argmax())], "text": f.text[i]},
                         ensure_ascii=False) + f"  ({shown})")  # fmt: skip


def _file(predictor: Predictor, f) -> None:
    """--input: checks everything (columns, gold labels) before scoring, scores once, then
    writes the rows (--out) and evaluates them (--gold)."""
    task = predictor.config.task
    text_field = f.text_field or task.get("text_field") or "text"
    pair_field = f.text_pair_field or ("" if predictor.reward else task.get("text_pair_field"))
    pair_field = pair_field or ""
    column = output_column(predictor, f.column)
    rows, numbers, usable = read_scorable(predictor, f.input, text_field, pair_field, f.encoding)
    if f.out:
        reads = [text_field, *([pair_field] if _reads_pairs(predictor, pair_field) else [])]
        check_columns(f.input, rows, new_columns(predictor, column), reads, f.overwrite)
    if f.gold:
        kept, gold, skipped = gold_labels(predictor, f.input, rows, numbers, usable, f.gold)
        if not len(kept):
            raise ValueError(f"{f.input}: no row has both usable text and a gold {f.gold}")
    cli.note(f"scoring {len(usable):,} rows of {f.input} (each new length bucket compiles once; "
             "the XLA cache keeps them for the next run)")  # fmt: skip
    logits = score_rows(predictor, rows, usable, text_field, pair_field)
    if f.out:
        _write_rows(f.out, predictions(predictor, rows, usable, logits, column))
        what = "scored" if predictor.reward else "labelled"
        print(f"wrote {f.out}: {len(usable)} rows {what} in column {column!r}, "
              f"{len(rows) - len(usable)} without usable text")  # fmt: skip
    if f.gold:
        metrics = gold_metrics(predictor.labels, logits[kept], gold)
        metrics.update(input=os.path.abspath(f.input), gold=f.gold, skipped=skipped,
                       workdir=os.path.abspath(f.workdir))  # fmt: skip
        shown = ", ".join(f"{n} {k}" for k, n in skipped.items() if n) or "none"
        print(f"{f.input} against its column {f.gold!r}: {len(kept)} rows evaluated "
              f"(skipped: {shown})")  # fmt: skip
        print(format_metrics(metrics))
        if f.metrics_out:
            runfiles.write_json_atomic(f.metrics_out, metrics)
            print(f"wrote {f.metrics_out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.predict")

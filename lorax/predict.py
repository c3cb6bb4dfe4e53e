"""Predicts with a trained classifier: ``python -m lorax.predict --workdir=W --text=...``.

Reads everything from the workdir (config.json with the class names, the latest checkpoint,
the base model the run names), so it works in a fresh process with no data files::

  python -m lorax.predict --workdir=runs/news --text="the senate passed the budget"
  python -m lorax.predict --workdir=runs/snli --text="A man sleeps." --text_pair="A person rests."
  python -m lorax.predict --workdir=runs/news --input=new.csv --out=predicted.csv

A file (csv, tsv, jsonl, json or parquet) comes back with its rows in order, each with
``label`` and one ``prob_<class>`` column per class (csv, tsv or jsonl, by ``--out``'s name); a
row without usable text keeps its columns with an empty label and is counted. Texts are
tokenized as in training (cut to the run's ``task.max_length``), batched by length bucket and
scored by one jitted forward per bucket.
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

from lorax import cli, runs, sharding
from lorax import data as data_lib
from lorax import setup as setup_lib
from lorax.data import tables, tasks


def is_pair(task_config) -> bool:
    """Whether the run's task reads text pairs (its model was trained on [CLS] a [SEP] b)."""
    if task_config.name in data_lib.FILE_TASKS:
        return data_lib.FILE_TASKS[task_config.name].pair
    return isinstance(data_lib.TASKS.get(task_config.name), data_lib.PairClassification)


class Predictor:
    """A finished classification run, ready to score texts: ``probabilities(texts, pairs)``."""

    def __init__(self, workdir: str, batch_size: int = 64):
        self.config, self.setup, trainable = runs.load_run(workdir)
        if self.setup.kind != "classify":
            raise ValueError(
                f"{workdir} is a causal-LM run ({self.config.task.name}); lorax.predict scores "
                "classifiers: use lorax.generate for it"
            )
        self.labels = data_lib.label_names(self.config.task)
        self.pair = is_pair(self.config.task)
        mesh = self.setup.mesh
        self.batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
        self.trainable = sharding.put(trainable, mesh)
        forward = setup_lib.make_forward(self.setup, logits=True)
        self._logits = jax.jit(lambda t, f, b: forward(t, f, b, None, False))

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


def predict_file(predictor: Predictor, src: str, dst: str, text_field: str, pair_field: str):
    """Writes ``src``'s rows to ``dst`` with ``label`` and ``prob_<class>``; returns the number
    of rows scored and of rows left without a label (no usable text)."""
    rows = [row for _, row in tables.read_rows(src, "predict", {})]
    fields = [text_field, *([pair_field] if predictor.pair else [])]
    usable = [
        i for i, r in enumerate(rows)
        if all(isinstance(r.get(f), str) and r[f].strip() for f in fields)
    ]  # fmt: skip
    if rows and not usable:
        raise ValueError(
            f"{src}: no row has text in {fields}; its fields: {sorted(rows[0])} (set "
            "--text_field / --text_pair_field)"
        )
    probs = predictor.probabilities(
        [rows[i][text_field] for i in usable],
        [rows[i][pair_field] for i in usable] if predictor.pair else None,
        progress=True,
    )
    columns = [f"prob_{name}" for name in predictor.labels]
    scored = {i: p for i, p in zip(usable, probs, strict=True)}
    out_rows = []
    for i, row in enumerate(rows):
        p = scored.get(i)
        if p is None:  # no usable text: the row goes out as it came, unlabelled
            extra: dict[str, Any] = {"label": "", **dict.fromkeys(columns)}
        else:
            extra = {"label": predictor.labels[int(p.argmax())]}
            extra.update({c: float(x) for c, x in zip(columns, p, strict=True)})
        out_rows.append({**row, **extra})
    _write_rows(dst, out_rows)
    return len(usable), len(rows) - len(usable)


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
    flags.DEFINE_string("workdir", None, "A finished lorax.train classification run.")
    flags.DEFINE_multi_string("text", [], "A text to classify (repeatable).")
    flags.DEFINE_multi_string("text_pair", [], "Its second text, for pair tasks (repeatable).")
    flags.DEFINE_string("input", "", "A csv, tsv, jsonl, json or parquet file of rows.")
    flags.DEFINE_string("out", "", "Where --input's rows go with label and prob_<class>.")
    flags.DEFINE_string("text_field", "", "--input's text column (default: the run's).")
    flags.DEFINE_string("text_pair_field", "", "--input's second text column (pair tasks).")
    flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")
    flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it reads at INFO
    f = flags.FLAGS
    if bool(f.text) == bool(f.input) or bool(f.input) != bool(f.out):
        raise app.UsageError("give --text (and --text_pair), or --input with --out")
    predictor = Predictor(f.workdir, f.batch_size)
    if f.input:
        task = predictor.config.task
        text_field = f.text_field or task.get("text_field") or "text"
        pair_field = f.text_pair_field or task.get("text_pair_field") or ""
        scored, unlabeled = predict_file(predictor, f.input, f.out, text_field, pair_field)
        print(f"wrote {f.out}: {scored} rows labelled, {unlabeled} without usable text")
        return
    pairs = list(f.text_pair) or None
    if pairs is not None and len(pairs) != len(f.text):
        raise app.UsageError(f"{len(f.text)} --text but {len(pairs)} --text_pair")
    probs = predictor.probabilities(f.text, pairs)
    for i, p in enumerate(probs):
        shown = ", ".join(f"{n} {x:.4f}" for n, x in zip(predictor.labels, p, strict=True))
        print(json.dumps({"label": predictor.labels[int(p.argmax())], "text": f.text[i]},
                         ensure_ascii=False) + f"  ({shown})")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    cli.run(main, "lorax.predict")

"""Tasks: rows of a local data set -> tokenized examples with labels, bad rows skipped and counted."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class Examples:
    """One split: variable-length token sequences and their labels."""

    input_ids: list[np.ndarray]  # int32 each
    token_type_ids: list[np.ndarray]  # int32 each, same lengths as input_ids
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> Examples:
        """The examples at ``indices``, in that order."""
        return Examples([self.input_ids[i] for i in indices],
                        [self.token_type_ids[i] for i in indices],
                        self.labels[np.asarray(indices, dtype=np.int64)])


@dataclasses.dataclass
class TaskData:
    """Every split of a task, its label names, and counts of what was skipped or truncated."""

    splits: dict[str, Examples]  # "train", "validation", "test"
    label_names: tuple[str, ...]
    counts: dict[str, int]


@dataclasses.dataclass(frozen=True)
class PairClassification:
    """A sentence-pair classification task read from JSONL files.

    Attributes:
      files: split -> file name inside the data directory ("train", "test").
      text_fields: the two text fields of a row.
      label_field: the field holding the label name.
      label_names: valid labels, in class-index order.
      skip_labels: label values meaning "no gold label": such rows are skipped and counted.
    """

    files: dict[str, str]
    text_fields: tuple[str, str]
    label_field: str
    label_names: tuple[str, ...]
    skip_labels: tuple[str, ...] = ()

    def load(self, data_dir, tokenizer, *, max_length: int, validation_size: int) -> TaskData:
        counts: dict[str, int] = {}
        raw = {split: self._read(os.path.join(os.fspath(data_dir), file), split, counts)
               for split, file in self.files.items()}
        train_rows = raw["train"]
        if not 0 <= validation_size < len(train_rows[2]):
            raise ValueError(f"task.validation_size = {validation_size} must be in "
                             f"0..{len(train_rows[2]) - 1} (usable train rows)")
        # A fixed permutation (seed 0, not the run's seed): every run and every seed holds out
        # the same validation rows, so validation numbers are comparable across a sweep.
        order = np.random.default_rng(0).permutation(len(train_rows[2]))
        held, kept = np.sort(order[:validation_size]), np.sort(order[validation_size:])
        pick = lambda rows, idx: tuple([r[i] for i in idx] for r in rows)  # noqa: E731
        raw = {"train": pick(train_rows, kept), "validation": pick(train_rows, held),
               "test": raw["test"]}
        splits = {}
        for split, (first, second, labels) in raw.items():
            splits[split] = encode_pairs(tokenizer, first, second, labels, max_length,
                                         counts, split)
            counts[f"{split}/examples"] = len(splits[split])
        return TaskData(splits, self.label_names, counts)

    def _read(self, path: str, split: str, counts: dict[str, int]):
        """Rows of one JSONL file as (first texts, second texts, label ids)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; the task needs {sorted(self.files.values())}")
        import datasets  # heavy; loads JSONL into Arrow

        table = datasets.load_dataset("json", data_files=path, split="train",
                                      keep_in_memory=True)
        for field in (*self.text_fields, self.label_field):
            if field not in table.column_names:
                raise ValueError(f"{path} has no field {field!r}; fields: {table.column_names}")
        index = {name: i for i, name in enumerate(self.label_names)}
        a_texts, b_texts, labels = [], [], []
        skipped = {"no_gold_label": 0, "missing_field": 0, "empty_text": 0}
        columns = [table[f] for f in (*self.text_fields, self.label_field)]
        for row, (a, b, label) in enumerate(zip(*columns), start=1):
            if label is None or a is None or b is None:
                skipped["missing_field"] += 1
            elif label in self.skip_labels:
                skipped["no_gold_label"] += 1
            elif not str(a).strip() or not str(b).strip():
                skipped["empty_text"] += 1
            elif label not in index:
                raise ValueError(f"{path} row {row}: {self.label_field} = {label!r} is not a "
                                 f"valid label; valid: {list(self.label_names)} or "
                                 f"{list(self.skip_labels)} (skipped)")
            else:
                a_texts.append(str(a))
                b_texts.append(str(b))
                labels.append(index[label])
        counts[f"{split}/rows"] = len(table)
        for reason, n in skipped.items():
            counts[f"{split}/skipped_{reason}"] = n
        return a_texts, b_texts, labels


def encode_pairs(tokenizer: Any, first: list[str], second: list[str], labels: list[int],
                 max_length: int, counts: dict[str, int], split: str) -> Examples:
    """Tokenizes pairs with the tokenizer's own pair template; truncates to ``max_length``.

    The tokenizer is asked for no padding and no truncation (the bundled MiniLM tokenizer
    would otherwise pad and cut at 128); the few over-long pairs are then re-encoded with
    longest-first truncation and counted under ``<split>/truncated``.
    """
    kw = dict(padding=False, return_token_type_ids=True, return_attention_mask=False)
    enc = tokenizer(first, second, truncation=False, **kw) if first else {
        "input_ids": [], "token_type_ids": []}
    ids, types = list(enc["input_ids"]), list(enc["token_type_ids"])
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long:
        cut = tokenizer([first[i] for i in long], [second[i] for i in long],
                        truncation="longest_first", max_length=max_length, **kw)
        for j, i in enumerate(long):
            ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
    counts[f"{split}/truncated"] = len(long)
    return Examples([np.asarray(x, np.int32) for x in ids],
                    [np.asarray(x, np.int32) for x in types], np.asarray(labels, np.int32))


SNLI = PairClassification(
    files={"train": "train.jsonl", "test": "test.jsonl"},
    text_fields=("sentence1", "sentence2"), label_field="gold_label",
    label_names=("entailment", "neutral", "contradiction"), skip_labels=("-",))

TASKS: dict[str, PairClassification] = {"snli": SNLI}


def load_task(name: str, data_dir, tokenizer, *, max_length: int,
              validation_size: int) -> TaskData:
    """Loads task ``name`` from ``data_dir`` with ``tokenizer``.

    Args:
      name: a key of :data:`TASKS`.
      data_dir: directory with the task's files (see :func:`lorax.assets.resolve`).
      tokenizer: a Hugging Face (fast) tokenizer.
      max_length: longest example in tokens; longer ones are truncated and counted.
      validation_size: rows held out of train as the validation split.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    return TASKS[name].load(data_dir, tokenizer, max_length=max_length,
                            validation_size=validation_size)


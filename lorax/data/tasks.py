"""Tasks: rows of a local data set -> tokenized, labelled examples; bad rows skipped, counted."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lorax.data.tables import read_jsonl

# The validation hold-out is drawn with this fixed seed, never the run's seed, so every run of
# every seed in a sweep is validated on the same rows.
VALIDATION_SEED = 0


@dataclasses.dataclass
class Examples:
    """One split: variable-length token sequences and their labels."""

    input_ids: list[np.ndarray]  # int32 each
    token_type_ids: list[np.ndarray]  # int32 each, same lengths as input_ids
    labels: np.ndarray  # int32 [N]

    def __post_init__(self):
        if not len(self.input_ids) == len(self.token_type_ids) == len(self.labels):
            raise ValueError(
                f"Examples: {len(self.input_ids)} input_ids, {len(self.token_type_ids)} "
                f"token_type_ids and {len(self.labels)} labels; they must be equal"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> Examples:
        """Returns the examples at ``indices``, in that order."""
        return Examples(
            [self.input_ids[i] for i in indices],
            [self.token_type_ids[i] for i in indices],
            self.labels[np.asarray(indices, dtype=np.int64)],
        )


@dataclasses.dataclass
class TaskData:
    """Every split of a task, its label names, and counts of what was read, skipped, cut.

    ``counts`` keys: ``<file>/file_rows`` (records read from the train or test file),
    ``<file>/skipped_<reason>`` (reason: bad_json, missing_field, bad_type, empty_text, and
    no_gold_label for SNLI; the train file's skips happen before the validation hold-out),
    ``<file>/bad_utf8`` (rows kept with undecodable bytes replaced), ``<split>/rows``
    (examples in each of train/validation/test) and ``<split>/truncated`` (examples cut to
    max_length).
    """

    splits: dict[str, Any]  # "train", "validation", "test": Examples (or causal.py's kinds)
    label_names: tuple[str, ...]
    counts: dict[str, int]


@dataclasses.dataclass(frozen=True)
class PairClassification:
    """A sentence-pair classification task read from JSONL files.

    Attributes:
      files: split -> file name inside the data directory; needs "train" and "test".
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
        """See :func:`lorax.data.registry.load_task`."""
        counts: dict[str, int] = {}
        raw = {
            split: self.read(os.path.join(os.fspath(data_dir), file), split, counts)
            for split, file in self.files.items()
        }
        train_rows = raw["train"]
        usable = len(train_rows[2])
        if not 0 <= validation_size < usable:
            raise ValueError(
                f"task.validation_size = {validation_size} must be in 0..{usable - 1} "
                f"(the train file has {usable} usable rows)"
            )
        held, kept = hold_out(usable, [validation_size])
        pick = lambda rows, idx: tuple([r[i] for i in idx] for r in rows)
        raw = {
            "train": pick(train_rows, kept),
            "validation": pick(train_rows, held),
            "test": raw["test"],
        }
        splits = {}
        for split, (first, second, labels) in raw.items():
            splits[split] = encode_pairs(
                tokenizer, first, second, labels, max_length=max_length, counts=counts, split=split
            )
            counts[f"{split}/rows"] = len(splits[split])
        return TaskData(splits, self.label_names, counts)

    def read(self, path: str, split: str, counts: dict[str, int]):
        """Rows of one JSONL file as (first texts, second texts, label ids); counts skips.

        Also used by the causal ``snli_text`` task (lorax/data/causal.py), so both read, skip
        and count the same rows.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist; the task needs the files {sorted(self.files.values())} "
                "in its data directory"
            )
        fields = (*self.text_fields, self.label_field)
        index = {name: i for i, name in enumerate(self.label_names)}
        a_texts, b_texts, labels = [], [], []
        skipped = {"no_gold_label": 0, "missing_field": 0, "bad_type": 0, "empty_text": 0}
        seen: set[str] = set()
        for line_no, row in read_jsonl(path, split, counts):
            seen.update(row)
            a, b, label = (row.get(f) for f in fields)
            if label is None or a is None or b is None:
                skipped["missing_field"] += 1
            elif label in self.skip_labels:
                skipped["no_gold_label"] += 1
            elif not isinstance(a, str) or not isinstance(b, str):
                skipped["bad_type"] += 1
            elif not a.strip() or not b.strip():
                skipped["empty_text"] += 1
            elif not isinstance(label, str) or label not in index:
                # Not skipped: a label outside the task's set means the file does not match
                # the task (e.g. integer labels), which no amount of skipping would fix.
                raise ValueError(
                    f"{path} line {line_no}: {self.label_field} = {label!r} is not a valid "
                    f"label; valid: {list(self.label_names)}, or {list(self.skip_labels)} "
                    "for rows to skip"
                )
            else:
                a_texts.append(a)
                b_texts.append(b)
                labels.append(index[label])
        absent = [f for f in fields if f not in seen]
        if absent and counts[f"{split}/file_rows"]:
            raise ValueError(f"{path}: no row has the field(s) {absent}; fields: {sorted(seen)}")
        for reason, n in skipped.items():
            counts[f"{split}/skipped_{reason}"] = n
        return a_texts, b_texts, labels


def hold_out(usable: int, sizes: Sequence[int]) -> list[np.ndarray]:
    """Splits row indices 0..usable-1 into hold-outs of ``sizes`` rows and the rest.

    Drawn with :data:`VALIDATION_SEED`, so the same rows on every call; each hold-out is the
    next slice of one permutation, so the first (validation) does not depend on later ones.

    Returns:
      ``len(sizes) + 1`` index arrays (the hold-outs, then the remaining rows), each sorted so
      every split keeps file order (the training order comes from the batcher).
    """
    order = np.random.default_rng(VALIDATION_SEED).permutation(usable)
    bounds = np.cumsum([0, *sizes])
    if bounds[-1] > usable:
        raise ValueError(f"hold-outs of {list(sizes)} rows exceed the {usable} usable rows")
    parts = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [np.sort(p) for p in [*parts, order[bounds[-1] :]]]


def encode_pairs(
    tokenizer: Any,
    first: list[str],
    second: list[str] | None,
    labels: list[int],
    *,
    max_length: int,
    counts: dict[str, int],
    split: str,
) -> Examples:
    """Tokenizes pairs as ``[CLS] a [SEP] b [SEP]`` (segment ids 0/1) without padding; with
    ``second=None``, single texts as ``[CLS] a [SEP]``.

    The tokenizer is told explicitly not to pad or truncate: the bundled MiniLM tokenizer.json
    would otherwise pad and cut every pair to 128. Pairs longer than ``max_length`` are then
    re-encoded with longest-first truncation and counted under ``<split>/truncated``.

    Args:
      tokenizer: a Hugging Face tokenizer (fast: batched encoding runs in Rust).
      first, second: the pair texts (``second`` None for single-text tasks).
      labels: class ids, one per pair.
      max_length: the longest encoding kept, special tokens included.
      counts: updated with ``<split>/truncated``.
      split: the split name used in ``counts``.

    Returns:
      The encoded split.
    """
    pair = second is not None
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= specials:
        raise ValueError(
            f"task.max_length = {max_length} leaves no room for text beside the {specials} "
            f"special tokens of {'a pair' if pair else 'a text'}; use a larger max_length"
        )
    kw = dict(padding=False, return_token_type_ids=True, return_attention_mask=False)
    if first:
        enc = tokenizer(first, second, truncation=False, **kw)
        ids, types = list(enc["input_ids"]), list(enc["token_type_ids"])
    else:
        ids, types = [], []
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long:
        cut = tokenizer(
            [first[i] for i in long],
            [second[i] for i in long] if pair else None,
            truncation="longest_first",
            max_length=max_length,
            **kw,
        )
        for j, i in enumerate(long):
            ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
    counts[f"{split}/truncated"] = len(long)
    return Examples(
        [np.asarray(x, np.int32) for x in ids],
        [np.asarray(x, np.int32) for x in types],
        np.asarray(labels, np.int32),
    )


SNLI = PairClassification(
    files={"train": "train.jsonl", "test": "test.jsonl"},
    text_fields=("sentence1", "sentence2"),
    label_field="gold_label",
    label_names=("entailment", "neutral", "contradiction"),
    skip_labels=("-",),
)


@dataclasses.dataclass(frozen=True)
class SentenceClassification:
    """Single-text classification from one CSV (bz2 allowed) without official splits.

    Validation and test are held out of the file with :func:`hold_out` (fixed seed): the
    validation rows first, then ``test_size`` test rows, the rest for training.

    Attributes:
      file: CSV file name in the data directory (``.bz2`` is decompressed on the fly).
      text_field, label_field: CSV columns.
      labels: label value in the file -> class name; classes are in ``label_names`` order.
      label_names: class names, in class-index order.
      skip_labels: label values whose rows are not examples (skipped and counted).
      test_size: rows held out as the test split.
    """

    file: str
    text_field: str
    label_field: str
    labels: dict[str, str]
    label_names: tuple[str, ...]
    skip_labels: tuple[str, ...] = ()
    test_size: int = 1000

    def load(self, data_dir, tokenizer, *, max_length: int, validation_size: int) -> TaskData:
        """See :func:`lorax.data.registry.load_task`."""
        path = os.path.join(os.fspath(data_dir), self.file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; the task needs {self.file}")
        counts = {"file_rows": 0, "skipped_label": 0, "skipped_empty_text": 0}
        counts.update({"skipped_missing_field": 0, "bad_utf8": 0})
        try:
            texts, labels = self.read(path, counts)
        except (OSError, EOFError, csv.Error) as e:  # a damaged .bz2 stream, a broken CSV
            kind = "bzip2-compressed CSV" if path.endswith(".bz2") else "CSV"
            raise ValueError(f"{path} cannot be read as {kind}: {e}") from None
        counts = {f"all/{k}": v for k, v in counts.items()}
        if validation_size < 0 or validation_size + self.test_size >= len(texts):
            raise ValueError(
                f"task.validation_size = {validation_size} must be in 0.."
                f"{len(texts) - self.test_size - 1} ({len(texts)} usable rows, "
                f"{self.test_size} held out for test)"
            )
        held, test, rest = hold_out(len(texts), [validation_size, self.test_size])
        splits = {}
        for split, idx in (("train", rest), ("validation", held), ("test", test)):
            splits[split] = encode_pairs(
                tokenizer,
                [texts[i] for i in idx],
                None,
                [labels[i] for i in idx],
                max_length=max_length,
                counts=counts,
                split=split,
            )
            counts[f"{split}/rows"] = len(splits[split])
        return TaskData(splits, self.label_names, counts)

    def read(self, path: str, counts: dict[str, int]) -> tuple[list[str], list[int]]:
        """The texts and label ids of the CSV at ``path``; counts skipped and odd rows."""
        opener = bz2.open if path.endswith(".bz2") else open
        texts, labels = [], []
        index = {name: i for i, name in enumerate(self.label_names)}
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)  # quoted fields may hold newlines
            for field in (self.text_field, self.label_field):
                if field not in (reader.fieldnames or []):
                    raise ValueError(
                        f"{path} has no column {field!r}; columns: {reader.fieldnames}"
                    )
            for row in reader:
                counts["file_rows"] += 1
                text, label = row.get(self.text_field), row.get(self.label_field)
                if text is None or label is None:
                    counts["skipped_missing_field"] += 1
                elif label in self.skip_labels:
                    counts["skipped_label"] += 1
                elif label not in self.labels:
                    raise ValueError(
                        f"{path} line {reader.line_num}: {self.label_field} = {label!r} is not "
                        f"valid; valid: {sorted(self.labels)}, or {list(self.skip_labels)} to skip"
                    )
                elif not text.strip():
                    counts["skipped_empty_text"] += 1
                else:
                    counts["bad_utf8"] += "\ufffd" in text
                    texts.append(text.strip())
                    labels.append(index[self.labels[label]])
        return texts, labels


ROTTEN_TOMATOES = SentenceClassification(
    file="rotten_tomatoes.csv.bz2",
    text_field="text",
    label_field="category",
    labels={"rotten": "negative", "fresh": "positive"},
    label_names=("negative", "positive"),
    skip_labels=("plot",),  # plot summaries, not reviews
    test_size=1280,  # 10% of the 12,808 reviews
)

TASKS: dict[str, PairClassification | SentenceClassification] = {
    "snli": SNLI,
    "rotten_tomatoes": ROTTEN_TOMATOES,
}

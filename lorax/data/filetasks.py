"""A user's own classification data, by config alone: ``task.name = text_classification`` (one
text field) or ``pair_classification`` (two), from csv, tsv, jsonl, json or parquet files.

Where the splits come from (``task`` fields):

- ``train_file`` / ``validation_file`` / ``test_file``, each a file; or
- ``data``: one file (the training rows) or a folder holding ``train.<ext>`` and optionally
  ``validation.<ext>`` (or ``valid``, ``dev``) and ``test.<ext>``; a folder with a single data
  file uses it as the training rows. An asset name (e.g. ``rotten-tomatoes``) is its folder.
- A split without a file is held out of the training rows: ``validation_size`` and
  ``test_size`` rows (a count >= 2, or a fraction in (0, 1) of the usable training rows; 1 is
  refused as ambiguous), drawn
  with a fixed seed (:func:`lorax.data.tasks.hold_out`), so every run of a sweep sees the same
  rows whatever its own seed.

Labels: ``task.labels`` fixes the classes and their order; empty, they are the distinct labels
of the usable training rows, sorted (numerically when every label is an integer). Labels may be
strings, integers or booleans; a row of another split whose label is not among them is an error
naming the file and row. Refused as meaningless: training rows of fewer than two classes,
labels mixing integers with names (``0``/``1`` beside ``neg``/``pos``: four classes, most
likely two spelt two ways; set ``task.labels`` if they truly are distinct), and a text column
that is also the label column. Rows are skipped and counted like the built-in tasks'
(``data_counts``): ``missing_field``, ``no_gold_label`` (a null or empty label, or one of
``task.skip_labels``, e.g. SNLI's "-"), ``bad_type`` (a text that is not a string),
``empty_text``; undecodable bytes are replaced and counted under ``bad_utf8``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from lorax.data.tables import file_format, read_rows
from lorax.data.tasks import TaskData, encode_pairs, hold_out

SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"),
               "test": ("test",)}  # fmt: skip


def label_key(value: Any) -> str | None:
    """A label value as the class name it stands for; None for a missing or empty label."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def sort_labels(names) -> tuple[str, ...]:
    """Distinct class names, sorted; numerically when every one is an integer."""
    names = set(names)
    try:
        return tuple(sorted(names, key=int))
    except ValueError:
        return tuple(sorted(names))


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _resolve_data(data: str) -> str:
    if data and not os.path.exists(data):
        from lorax import assets

        if data in assets.KNOWN:
            return os.fspath(assets.resolve(data))
    return data


def split_files(task_config) -> dict[str, str | None]:
    """``{"train": path, "validation": path or None, "test": path or None}`` (see the module
    doc); raises naming the field when the training file cannot be found."""
    files = {s: task_config.get(f"{s}_file") or None for s in SPLIT_NAMES}
    data = _resolve_data(task_config.get("data") or "")
    if files["train"] is None:
        if data and os.path.isfile(data):
            files["train"] = data
        elif data and os.path.isdir(data):
            found = _folder_files(data)
            files = {s: files[s] or found.get(s) for s in SPLIT_NAMES}
        if files["train"] is None:
            raise ValueError(
                f"task.data = {task_config.get('data')!r} names no training file: give "
                "task.data=FILE (the training rows), task.data=FOLDER (with train.csv, "
                "train.jsonl, ...) or task.train_file=FILE"
            )
    for split, path in files.items():
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"task.{split}_file = {path!r} does not exist")
            file_format(path)  # a name whose format is unknown fails here, before any work
    return files


def _folder_files(folder: str) -> dict[str, str]:
    data_files = sorted(
        p for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p) and _is_data(p)
    )
    found = {}
    for split, stems in SPLIT_NAMES.items():
        for p in data_files:
            if os.path.basename(p).lower().split(".")[0] in stems:
                found.setdefault(split, p)
    if "train" not in found and len(data_files) == 1:
        found["train"] = data_files[0]
    return found


def _is_data(path: str) -> bool:
    try:
        file_format(path)
    except ValueError:
        return False
    return True


def check_size(value, field: str) -> None:
    """Raises naming ``field`` unless ``value`` is a count >= 2 or a fraction in (0, 1).

    1 is refused: the field is a float in the config (so 1 and 1.0 are the same value) and
    1.0 reads as "all of them" as well as "one row"; neither is a useful hold-out.
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 1:
        raise ValueError(
            f"{field} = {value!r} is ambiguous (one row, or every row?); give a count >= 2 "
            "(rows) or a fraction in (0, 1) such as 0.1"
        )
    count = isinstance(value, int | float) and float(value).is_integer() and value >= 2
    fraction = isinstance(value, float) and 0 < value < 1
    if isinstance(value, bool) or not (count or fraction):
        raise ValueError(f"{field} = {value!r} must be a count >= 2 or a fraction in (0, 1)")


def hold_out_size(value, usable: int, field: str) -> int:
    """A count (>= 1) or a fraction in (0, 1) of ``usable`` rows, as a row count."""
    check_size(value, field)
    return max(1, round(value * usable)) if value < 1 else int(value)


@dataclasses.dataclass(frozen=True)
class FileClassification:
    """Classification rows from files named by the config (see the module doc)."""

    pair: bool

    @property
    def name(self) -> str:
        return "pair_classification" if self.pair else "text_classification"

    def fields(self, task_config) -> tuple[str, ...]:
        """(text field[, pair field], label field), checked to be given."""
        names = ["text_field", *(["text_pair_field"] if self.pair else []), "label_field"]
        values = [task_config.get(n) or "" for n in names]
        missing = [f"task.{n}" for n, v in zip(names, values, strict=True) if not v]
        if missing:
            raise ValueError(f"task.name = {self.name!r} needs {missing} (the column names)")
        for i, (name, value) in enumerate(zip(names, values, strict=True)):
            for other, same in zip(names[i + 1 :], values[i + 1 :], strict=True):
                if value == same:
                    raise ValueError(
                        f"task.{name} and task.{other} both name the column {value!r}; "
                        "each must name its own column (a model that reads its labels as "
                        "its text learns nothing)"
                    )
        return tuple(values)

    def read(self, path: str, split: str, task_config, counts: dict[str, int]):
        """``(texts, pair texts or None, label names, row numbers)`` of one file's usable
        rows; skips counted under ``<split>/skipped_<reason>``."""
        fields = self.fields(task_config)
        *text_fields, label_field = fields
        texts: list[list[str]] = [[] for _ in text_fields]
        labels, rows = [], []
        skipped = {"missing_field": 0, "no_gold_label": 0, "bad_type": 0, "empty_text": 0}
        seen: set[str] = set()
        skip = {label_key(x) for x in task_config.get("skip_labels") or ()}
        for row_no, row in read_rows(path, split, counts):
            seen.update(row)
            values = [row.get(f) for f in text_fields]
            label = label_key(row.get(label_field))
            if label_field not in row or any(v is None for v in values):
                skipped["missing_field"] += 1
            elif label is None or label in skip:
                skipped["no_gold_label"] += 1
            elif not all(isinstance(v, str) for v in values):
                skipped["bad_type"] += 1
            elif not all(v.strip() for v in values):
                skipped["empty_text"] += 1
            else:
                for column, v in zip(texts, values, strict=True):
                    column.append(v.strip())
                labels.append(label)
                rows.append(row_no)
        absent = [f for f in fields if f not in seen]
        if absent and counts.get(f"{split}/file_rows"):
            raise ValueError(
                f"{path}: no row has the field(s) {absent}; its fields: {sorted(seen)}. "
                f"Set {[f'task.{n}' for n in ('text_field', 'text_pair_field', 'label_field')]}"
            )
        for reason, n in skipped.items():
            counts[f"{split}/skipped_{reason}"] = n
        return texts[0], (texts[1] if self.pair else None), labels, rows

    def label_names(self, task_config, train_labels=None) -> tuple[str, ...]:
        """``task.labels`` if given, else the sorted distinct labels of the training rows
        (``train_labels`` when the caller has read them already, else read here)."""
        fixed = tuple(label_key(x) for x in task_config.get("labels") or ())
        if fixed:
            return fixed
        train = split_files(task_config)["train"]
        if train_labels is None:
            _, _, train_labels, _ = self.read(train, "train", task_config, {})
        if not train_labels:
            raise ValueError(f"{train} has no usable rows to take the labels from")
        names = sort_labels(train_labels)
        numeric = [n for n in names if _is_int(n)]
        if numeric and len(numeric) < len(names):
            raise ValueError(
                f"{train}: {task_config.label_field} mixes integer labels {numeric} with named "
                f"ones {[n for n in names if not _is_int(n)]}, which would make "
                f"{len(names)} classes; write each class one way, or set task.labels to the "
                "full label set if they truly are distinct classes"
            )
        return names

    def load(self, task_config, tokenizer, *, max_length: int) -> TaskData:
        """The three splits, encoded; see :func:`lorax.data.registry.load_task`."""
        files = split_files(task_config)
        counts: dict[str, int] = {}
        raw = {s: self.read(p, s, task_config, counts) for s, p in files.items() if p}
        names = self.label_names(task_config, raw["train"][2])
        seen = sort_labels(raw["train"][2])  # not empty: label_names refuses that
        if len(seen) < 2:
            raise ValueError(
                f"{files['train']}: every usable training row has {task_config.label_field} = "
                f"{seen[0]!r}, the only class seen; a classifier needs rows of at least 2 "
                f"classes (is task.label_field = {task_config.label_field!r} the right column?)"
            )
        index = {name: i for i, name in enumerate(names)}
        for split, (_, _, labels, rows) in raw.items():
            for label, row in zip(labels, rows, strict=True):
                if label not in index:
                    raise ValueError(
                        f"{files[split]} row {row}: {task_config.label_field} = {label!r} is "
                        f"not one of the labels {list(names)} (from "
                        f"{'task.labels' if task_config.get('labels') else 'the training rows'})"
                        "; fix the row, or set task.labels to the full label set"
                    )
        raw = self._hold_out(raw, files, task_config)
        splits = {}
        for split in SPLIT_NAMES:
            first, second, labels, _ = raw[split]
            splits[split] = encode_pairs(
                tokenizer, first, second, [index[x] for x in labels],
                max_length=max_length, counts=counts, split=split,
            )  # fmt: skip
            counts[f"{split}/rows"] = len(splits[split])
        return TaskData(splits, names, counts)

    def _hold_out(self, raw, files, task_config):
        """The validation and test splits without a file, held out of the training rows."""
        missing = [s for s in ("validation", "test") if not files[s]]
        if not missing:
            return raw
        usable = len(raw["train"][2])
        sizes = [hold_out_size(task_config.get(f"{s}_size"), usable, f"task.{s}_size")
                 for s in missing]  # fmt: skip
        if sum(sizes) >= usable:
            raise ValueError(
                f"holding out {dict(zip(missing, sizes, strict=True))} rows leaves none of the "
                f"{usable} usable training rows in {files['train']} to train on; lower "
                f"{[f'task.{s}_size' for s in missing]} or give split files"
            )
        parts = hold_out(usable, sizes)
        train = raw["train"]

        def pick(idx):
            return tuple(None if col is None else [col[i] for i in idx] for col in train)

        out = dict(raw)
        for split, idx in zip(missing, parts[:-1], strict=True):
            out[split] = pick(idx)
        out["train"] = pick(parts[-1])
        return out


TEXT_CLASSIFICATION = FileClassification(pair=False)
PAIR_CLASSIFICATION = FileClassification(pair=True)
FILE_TASKS = {t.name: t for t in (TEXT_CLASSIFICATION, PAIR_CLASSIFICATION)}

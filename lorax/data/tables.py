"""Rows of a data file, whatever its format: csv, tsv, jsonl, json or parquet.

Text formats may be compressed (``.gz``, ``.bz2``). Every reader yields ``(row number, dict)``
and counts what it read under ``<split>/file_rows``, rows kept with undecodable bytes under
``<split>/bad_utf8`` and rows that are not objects under ``<split>/skipped_bad_json``; what
a row's fields mean is the task's business (lorax/data/tasks.py, filetasks.py, causal.py). A
file that cannot be read at all (a damaged archive, a broken CSV) is a ValueError naming it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO

log = logging.getLogger(__name__)

# Bad rows named in a warning each, per file; the rest only counted.
MAX_ROW_WARNINGS = 10

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "json", ".parquet": "parquet"}  # fmt: skip
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open}


def file_format(path: str) -> str:
    """The format a file's name says ("csv", "tsv", "jsonl", "json" or "parquet")."""
    stem, ext = os.path.splitext(os.fspath(path).lower())
    if ext in _COMPRESSED:
        stem, ext = os.path.splitext(stem)
    if ext not in FORMATS:
        raise ValueError(
            f"{path}: cannot tell its format from the name; use one of "
            f"{sorted(FORMATS)} (csv, tsv, jsonl may end in .gz or .bz2)"
        )
    return FORMATS[ext]


def codecs_name(encoding: str) -> str:
    """An encoding's canonical name ("utf8", "UTF-8" -> "utf-8")."""
    import codecs

    return codecs.lookup(encoding).name


def open_binary(path: str) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed on the fly if it ends in .gz/.bz2."""
    opener = _COMPRESSED.get(os.path.splitext(path.lower())[1], open)
    return opener(path, "rb")


def read_rows(
    path: str, split: str, counts: dict[str, int], encoding: str = "utf-8"
) -> Iterator[tuple[int, dict]]:
    """Yields ``(row number, row)`` for each row of ``path`` (see the module doc).

    Row numbers are file lines for csv/tsv/jsonl (a CSV header is line 1) and 1-based record
    numbers for json and parquet, so an error can name the row a user would look at. Text
    formats are decoded as ``encoding`` (UTF-8 by default, a byte order mark allowed).
    """
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"{encoding!r} is not a text encoding Python knows") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    fmt = file_format(path)
    reader = {"csv": _csv_rows, "tsv": _csv_rows, "jsonl": read_jsonl, "json": _json_rows,
              "parquet": _parquet_rows}[fmt]  # fmt: skip
    try:
        yield from reader(path, split, counts, encoding)
    except (OSError, EOFError, csv.Error, UnicodeError) as e:
        raise ValueError(f"{path} cannot be read as {fmt}: {e}") from None


def _csv_rows(path: str, split: str, counts: dict[str, int], encoding: str = "utf-8"):
    delimiter = "\t" if file_format(path) == "tsv" else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are fine
    file_rows = bad_utf8 = extra = 0
    with open_binary(path) as raw:
        encoding = "utf-8-sig" if codecs_name(encoding) == "utf-8" else encoding
        text = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        if not reader.fieldnames:
            raise ValueError(f"{path} has no header row; the first line must name the columns")
        repeated = sorted({c for c in reader.fieldnames if reader.fieldnames.count(c) > 1})
        if repeated:  # DictReader would keep the last such column and drop the others
            raise ValueError(
                f"{path}: the header names the column(s) {repeated} more than once "
                f"({reader.fieldnames}); rename them so each column has its own name"
            )
        for row in reader:
            extra += row.pop(None, None) is not None  # cells past the header's columns
            file_rows += 1
            if any(isinstance(v, str) and "\ufffd" in v for v in row.values()):
                bad_utf8 += 1
            yield reader.line_num, row
    counts[f"{split}/file_rows"] = file_rows
    counts[f"{split}/bad_utf8"] = bad_utf8
    if extra:  # dropped: lorax.predict refuses a file whose output would lose them
        counts[f"{split}/rows_with_extra_cells"] = extra


def _json_rows(path: str, split: str, counts: dict[str, int], encoding: str = "utf-8"):
    """A JSON file holding a list of objects, an object with one such list (``{"data":
    [...]}``), or columns (an object of equal-length lists)."""
    with open_binary(path) as f:
        try:
            data = json.loads(f.read().decode(encoding, errors="replace"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        lengths = {len(v) for v in lists.values()}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            data = next(iter(lists.values()))
        elif lists and len(lists) == len(data) and len(lengths) == 1:
            columns = list(lists.values())
            data = [dict(zip(lists, vals, strict=True)) for vals in zip(*columns, strict=True)]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of row objects, an object holding one such list, or "
            "columns of equal length; for one object per line, name the file .jsonl"
        )
    bad = 0
    for i, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield i, row
        else:
            bad += 1
    counts[f"{split}/file_rows"] = len(data)
    counts[f"{split}/skipped_bad_json"] = bad


def _parquet_rows(path: str, split: str, counts: dict[str, int], encoding: str = "utf-8"):
    del encoding  # parquet stores its strings as UTF-8
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises its own types for bad files
        raise ValueError(f"{path} cannot be read as parquet: {e}") from None
    n = 0
    for batch in table.iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            n += 1
            yield n, row
    counts[f"{split}/file_rows"] = n


def _lone_surrogates(value) -> bool:
    """True for a string holding an unpaired surrogate (from a valid JSON escape such as
    "\\ud800", but not Unicode text: no tokenizer or UTF-8 writer takes it)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replace_surrogates(value):
    """A string with each unpaired surrogate replaced by U+FFFD, as undecodable bytes are."""
    if not _lone_surrogates(value):
        return value
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def read_jsonl(
    path: str, split: str, counts: dict[str, int], encoding: str = "utf-8"
) -> Iterator[tuple[int, dict]]:
    """Yields ``(line number, object)`` for each JSON object line of ``path``.

    Read line by line with plain ``json``, so one bad line is counted, never fatal: blank
    lines are ignored; bytes that are not UTF-8, and unpaired surrogate escapes such as
    ``"\\ud800"``, are replaced (U+FFFD) and the row kept and counted under
    ``<split>/bad_utf8``; a line that is not a JSON object is skipped, counted
    under ``<split>/skipped_bad_json`` and named in a warning (the first few per file).
    ``<split>/file_rows`` counts the non-blank lines.
    """
    file_rows = bad_utf8 = bad_json = 0
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            if not raw.strip():
                continue
            file_rows += 1
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                line = raw.decode(encoding, errors="replace")
                bad_utf8 += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, why = None, f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                why = f"a JSON {type(row).__name__}, not an object"
            if not isinstance(row, dict):
                bad_json += 1
                if bad_json <= MAX_ROW_WARNINGS:
                    log.warning("%s line %d: skipped: %s", path, line_no, why)
                continue
            if any(_lone_surrogates(v) for v in row.values()):
                row = {k: _replace_surrogates(v) for k, v in row.items()}
                bad_utf8 += 1
            yield line_no, row
    counts[f"{split}/file_rows"] = file_rows
    counts[f"{split}/bad_utf8"] = bad_utf8
    counts[f"{split}/skipped_bad_json"] = bad_json
    if bad_json > MAX_ROW_WARNINGS:
        log.warning("%s: %d lines skipped as bad JSON in all", path, bad_json)

"""Raw text for continued pretraining (``task.name = text``): documents → chunks → packed rows.

Where the documents come from (``task.data``, or an asset name such as ``political-speeches``):

- a ``.txt`` file (or ``.txt.gz`` / ``.txt.bz2``): documents are separated by one or more blank
  lines (a line holding only whitespace counts as blank), so a file of paragraphs is a file of
  documents; a text with no blank line is one document;
- a folder: every ``*.txt`` file directly in it (sorted by name) is one document, blank lines
  and all;
- a csv, tsv, jsonl, json or parquet file (:mod:`lorax.data.tables`): each row's
  ``task.text_field`` is one document. Rows without the field, with a non-string or blank one
  are skipped and counted (``train/skipped_<reason>``), as the other tasks count them.

Each document is tokenized as the tokenizer's leading special tokens (a BOS, if it adds one),
its text, and eos (the model learns where a document ends). A document longer than
``task.max_length`` tokens is cut into chunks of ``max_length`` tokens that overlap by one
token: chunk k starts at token k·(max_length − 1), so every token of the document but its first
is a training target exactly once, each predicted from the (up to max_length − 1) tokens before
it in its chunk. Chunks are the examples :class:`lorax.data.PackedBatcher` packs into rows of
``max_length`` tokens; each chunk is its own segment, so attention never crosses a document (or
chunk) boundary and positions restart at 0 in each.

Validation and test are held out by document, before chunking: ``task.validation_size`` and
``task.test_size`` documents (a count >= 2 or a fraction in (0, 1) of the usable documents),
drawn with a fixed seed (:func:`lorax.data.tasks.hold_out`), so every run and seed holds out
the same documents and no document has chunks on both sides. Every target token of a split
counts in its loss, next-token accuracy and perplexity (exp of the mean token loss).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import Any

import numpy as np

from lorax.data.causal import CausalExamples, _eos_id, _leading_specials, _tokenize
from lorax.data.filetasks import hold_out_size
from lorax.data.tables import file_format, open_binary, read_rows
from lorax.data.tasks import TaskData, hold_out

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.bz2")
# One or more blank (or whitespace-only) lines: the boundary between two documents of a .txt.
_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")


def _read_text(path: str, not_utf8: list[str] | None = None) -> str:
    """A text file's contents (decompressed if .gz/.bz2), undecodable bytes replaced (U+FFFD;
    the file's path appended to ``not_utf8``)."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        if not_utf8 is not None:
            not_utf8.append(path)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _count_not_utf8(not_utf8: list[str], counts: dict[str, int]) -> None:
    """Counts (``train/bad_utf8_files``) and names the text files that were not UTF-8: their
    undecodable bytes train as U+FFFD, which the run should not do without a word."""
    if not_utf8:
        counts["train/bad_utf8_files"] = len(not_utf8)
        log.warning(
            "%d text file(s) are not valid UTF-8, e.g. %s: their undecodable bytes were replaced "
            "by U+FFFD and train as such; convert them to UTF-8 (iconv -f latin1 -t utf-8)",
            len(not_utf8), not_utf8[0],
        )  # fmt: skip


def split_documents(text: str) -> list[str]:
    """The documents of a ``.txt`` file's text: separated by blank lines, each stripped of
    surrounding whitespace, empty ones dropped."""
    return [d.strip() for d in _BLANK_LINES.split(text.replace("\r\n", "\n")) if d.strip()]


def read_documents(path: str, text_field: str, counts: dict[str, int]) -> list[str]:
    """The documents at ``path`` (see the module doc), in file order.

    Counts ``all/documents`` (usable documents) and, for a table, the rows read and skipped.
    Raises naming the path (and the field) when there is nothing to train on.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "*.txt")) if os.path.isfile(p))
        if not files:
            raise ValueError(
                f"task.data = {path!r} is a folder with no .txt file; task 'text' reads every "
                "*.txt directly in it as one document (or give a .txt, csv, jsonl or parquet file)"
            )
        not_utf8: list[str] = []
        docs = [_read_text(p, not_utf8).strip() for p in files]
        _count_not_utf8(not_utf8, counts)
        counts["train/files"] = len(files)
        counts["train/skipped_empty_text"] = sum(not d for d in docs)
        docs = [d for d in docs if d]
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"task.data = {path!r} does not exist; task 'text' takes a .txt file, a folder of "
            ".txt files, or a csv/tsv/jsonl/json/parquet file with task.text_field"
        )
    elif path.lower().endswith(TEXT_SUFFIXES):
        not_utf8 = []
        docs = split_documents(_read_text(path, not_utf8))
        _count_not_utf8(not_utf8, counts)
    else:
        file_format(path)  # an unknown extension is an error naming the valid ones
        docs = _table_documents(path, text_field, counts)
    if not docs:
        table = os.path.isfile(path) and not path.lower().endswith(TEXT_SUFFIXES)
        where = f" in task.text_field = {text_field!r}" if table else ""
        raise ValueError(
            f"task.data = {path!r} holds no text to train on (no non-blank document{where})"
        )
    counts["all/documents"] = len(docs)
    return docs


def _table_documents(path: str, text_field: str, counts: dict[str, int]) -> list[str]:
    """Each row's ``text_field`` of a data file; bad rows skipped and counted."""
    if not text_field:
        raise ValueError(f"task.data = {path!r} is a table: set task.text_field to its text column")
    docs, seen = [], set()
    skipped = {"missing_field": 0, "bad_type": 0, "empty_text": 0}
    for _, row in read_rows(path, "train", counts):
        seen.update(row)
        value = row.get(text_field)
        if value is None:
            skipped["missing_field"] += 1
        elif not isinstance(value, str):
            skipped["bad_type"] += 1
        elif not value.strip():
            skipped["empty_text"] += 1
        else:
            docs.append(value.strip())
    if text_field not in seen and counts.get("train/file_rows"):
        raise ValueError(
            f"{path}: no row has the field {text_field!r}; its fields: {sorted(seen)}. Set "
            "task.text_field to the column holding the text"
        )
    for reason, n in skipped.items():
        counts[f"train/skipped_{reason}"] = n
    return docs


def chunk(ids: list[int], max_length: int) -> list[np.ndarray]:
    """A document's tokens as chunks of at most ``max_length`` tokens overlapping by one (see
    the module doc): every token but the first is a next-token target in exactly one chunk."""
    if max_length < 2:
        raise ValueError(f"task.max_length = {max_length}: a chunk needs two or more tokens")
    out, start = [], 0
    while True:
        out.append(np.asarray(ids[start : start + max_length], np.int32))
        if start + max_length >= len(ids):
            return out
        start += max_length - 1


def encode_documents(
    tokenizer: Any, docs: list[str], *, max_length: int, counts: dict[str, int], split: str
) -> CausalExamples:
    """Tokenizes documents (leading specials + text + eos) and chunks them; every token of a
    chunk is in its loss mask (the batcher makes token t + 1 the target of token t). Counts
    ``<split>/documents``, ``<split>/tokens`` (document tokens) and ``<split>/rows`` (chunks)."""
    prefix, eos = _leading_specials(tokenizer), _eos_id(tokenizer)
    ids, tokens = [], 0
    for body in _tokenize(tokenizer, docs):
        doc = prefix + body + [eos]
        tokens += len(doc)
        ids.extend(chunk(doc, max_length))
    counts[f"{split}/documents"] = len(docs)
    counts[f"{split}/tokens"] = tokens
    counts[f"{split}/rows"] = len(ids)
    return CausalExamples(ids, [np.ones(len(x), np.int32) for x in ids])


@dataclasses.dataclass(frozen=True)
class TextTask:
    """Causal-LM training on raw text: see the module doc."""

    name: str = "text"

    def check(self, task_config) -> None:
        """Raises, before any model loads, unless ``task.data`` names a path that exists or an
        asset (a table also needs ``task.text_field``)."""
        from lorax import assets

        data = task_config.get("data") or ""
        if not data:
            raise ValueError(
                "task.name = 'text' needs task.data: a .txt file, a folder of .txt files, or a "
                "csv/jsonl/parquet file (with task.text_field)"
            )
        if not os.path.exists(data) and data not in assets.KNOWN:
            raise FileNotFoundError(
                f"task.data = {data!r} does not exist; task 'text' takes a .txt file, a folder "
                "of .txt files, or a csv/tsv/jsonl/json/parquet file with task.text_field"
            )
        table = os.path.isfile(data) and not data.lower().endswith(TEXT_SUFFIXES)
        if table and not task_config.get("text_field"):
            raise ValueError(
                f"task.data = {data!r} is a table: set task.text_field to its text column"
            )

    def load(self, task_config, tokenizer, *, max_length: int) -> TaskData:
        """The three splits as chunked :class:`CausalExamples`; see the module doc."""
        counts: dict[str, int] = {}
        self.check(task_config)
        data = task_config.data
        if not os.path.exists(data):
            from lorax import assets

            data = _asset_file(assets.resolve(data))
        docs = read_documents(data, task_config.get("text_field") or "", counts)
        sizes = {
            s: hold_out_size(task_config.get(f"{s}_size"), len(docs), f"task.{s}_size")
            for s in ("validation", "test")
        }
        if sum(sizes.values()) >= len(docs):
            raise ValueError(
                f"holding out {sizes} documents leaves none of the {len(docs)} documents in "
                f"{data} to train on; lower task.validation_size / task.test_size (counts or "
                "fractions of the documents)"
            )
        val, test, train = hold_out(len(docs), [sizes["validation"], sizes["test"]])
        splits = {
            split: encode_documents(
                tokenizer,
                [docs[i] for i in idx],
                max_length=max_length,
                counts=counts,
                split=split,
            )  # fmt: skip
            for split, idx in (("train", train), ("validation", val), ("test", test))
        }
        return TaskData(splits, (), counts)


def _asset_file(folder) -> str:
    """The one data file of an asset's folder (the text assets hold one)."""
    folder = os.fspath(folder)
    files = sorted(
        p for p in glob.glob(os.path.join(folder, "*"))
        if os.path.isfile(p) and not os.path.basename(p).startswith(".")
    )  # fmt: skip
    if len(files) != 1:
        return folder  # a folder of .txt documents
    return files[0]


TEXT = TextTask()
TEXT_TASKS = {TEXT.name: TEXT}

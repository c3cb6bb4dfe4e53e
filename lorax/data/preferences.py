"""Preference pairs (a prompt, a chosen and a rejected response) as tokenized examples and
fixed-shape batches: what DPO and reward models train on (``task.name = "preferences"``).

A batch of B pairs is 2B rows, **chosen and rejected interleaved**: row ``2i`` is pair i's
prompt + chosen response + eos, row ``2i + 1`` its prompt + rejected response + eos, each row
right-padded alone (no packing) to T, one of ``task.buckets``. Interleaving keeps both rows of a
pair on the same device when the rows are split over the mesh's data axis, so a pair's loss
needs no communication; ``x.reshape(B, 2, ...)`` gives ``[:, 0]`` chosen and ``[:, 1]``
rejected. See :class:`PairBatcher` for the keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lorax.data.batching import Batcher
from lorax.data.causal import _eos_id, _leading_specials, _tokenize
from lorax.data.filetasks import split_files
from lorax.data.tables import read_rows
from lorax.data.tasks import TaskData, hold_out

PAIR_FIELDS = ("prompt", "chosen", "rejected")  # task.pair_fields' default


@dataclasses.dataclass
class PreferenceExamples:
    """One split of preference pairs, tokenized.

    Pair i is ``prompts[i]`` (with the tokenizer's leading specials, a BOS if it adds one)
    followed by ``chosen[i]`` or by ``rejected[i]`` (each response's tokens and the eos).
    """

    prompts: list[np.ndarray]  # int32 each, one or more tokens
    chosen: list[np.ndarray]  # int32 each, one or more tokens (the last is the eos)
    rejected: list[np.ndarray]  # int32 each, likewise
    # float32 [N]: how clearly each pair is decided (task.margin_field; a reward model's loss
    # is -log σ(r_chosen - r_rejected - margin)), or None when the data gives none
    margins: np.ndarray | None = None

    def __post_init__(self):
        n = {len(self.prompts), len(self.chosen), len(self.rejected)}
        if len(n) != 1:
            raise ValueError(
                f"PreferenceExamples: {len(self.prompts)} prompts, {len(self.chosen)} chosen and "
                f"{len(self.rejected)} rejected; they must be equal"
            )
        for i, parts in enumerate(zip(self.prompts, self.chosen, self.rejected, strict=True)):
            if min(len(p) for p in parts) == 0:
                raise ValueError(f"PreferenceExamples: pair {i} has an empty part")
        if self.margins is not None and len(self.margins) != len(self.prompts):
            raise ValueError(
                f"PreferenceExamples: {len(self.margins)} margins for {len(self.prompts)} pairs"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: Sequence[int]) -> PreferenceExamples:
        """Returns the pairs at ``indices``, in that order."""
        return PreferenceExamples(
            [self.prompts[i] for i in indices],
            [self.chosen[i] for i in indices],
            [self.rejected[i] for i in indices],
            None if self.margins is None else self.margins[np.asarray(indices, np.int64)],
        )

    def lengths(self) -> np.ndarray:
        """int64 [N]: the longer of each pair's two rows, in tokens."""
        return np.fromiter(
            (len(p) + max(len(c), len(r))
             for p, c, r in zip(self.prompts, self.chosen, self.rejected, strict=True)),
            np.int64, len(self),
        )  # fmt: skip


def _number(value) -> float | None:
    """A margin cell as a finite float (a number, or numeric text as a CSV gives), else None."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_preference_rows(
    path: str,
    split: str,
    counts: dict[str, int],
    fields: Sequence[str] = PAIR_FIELDS,
    margin_field: str = "",
) -> list[tuple]:
    """Reads (prompt, chosen, rejected) rows of a data file, skipping and counting bad ones.

    Any format :func:`lorax.data.tables.read_rows` reads (bad JSON and bad UTF-8 counted);
    ``fields`` names the prompt, chosen and rejected columns. Skip reasons
    (``<split>/skipped_<reason>``): ``missing_field`` (a field absent or null), ``bad_type``
    (not a string), ``empty_text`` (a blank prompt or response), ``same_response`` (chosen ==
    rejected: the pair prefers nothing). With ``margin_field`` each row also has its margin, a
    finite number (or numeric text), as a fourth element; a row without one is
    ``missing_field``, one that is not a number ``bad_type``.
    """
    if len(fields) != 3 or not all(isinstance(f, str) and f for f in fields):
        raise ValueError(
            f"task.pair_fields = {tuple(fields)!r}: give three column names (prompt, chosen, "
            "rejected)"
        )
    rows = []
    skipped = dict.fromkeys(("missing_field", "bad_type", "empty_text", "same_response"), 0)
    seen: set[str] = set()
    for _, row in read_rows(path, split, counts):
        seen.update(row)
        values = [row.get(f) for f in fields]
        margin = row.get(margin_field) if margin_field else 0.0
        if any(v is None for v in values) or margin is None:
            skipped["missing_field"] += 1
        elif not all(isinstance(v, str) for v in values) or _number(margin) is None:
            skipped["bad_type"] += 1
        elif not all(v.strip() for v in values):
            skipped["empty_text"] += 1
        elif values[1] == values[2]:
            skipped["same_response"] += 1
        else:
            rows.append((*values, _number(margin)) if margin_field else tuple(values))
    absent = [f for f in (*fields, *([margin_field] if margin_field else [])) if f not in seen]
    if absent and counts.get(f"{split}/file_rows"):
        raise ValueError(
            f"{path}: no row has the field(s) {absent}; its fields: {sorted(seen)}. Set "
            "task.pair_fields = (prompt, chosen, rejected) column names (and "
            "task.margin_field, when set)"
        )
    for reason, n in skipped.items():
        counts[f"{split}/skipped_{reason}"] = n
    return rows


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn in the tokenizer's chat template, up to where the
    assistant's reply begins; an error naming ``task.chat_template`` if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "task.chat_template = True but the tokenizer has no chat template (a GGUF file's "
            "tokenizer.chat_template, or tokenizer_config.json's chat_template); set "
            "task.chat_template = False to use the prompts as they are"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_preferences(
    tokenizer: Any,
    rows: list[tuple],
    *,
    max_length: int,
    counts: dict[str, int],
    split: str,
    chat_template: bool = False,
) -> PreferenceExamples:
    """Tokenizes (prompt, chosen, rejected) rows; prompt and responses separately, so the
    response boundary (what the loss sums over) is exact.

    The prompt starts with the tokenizer's leading special tokens, or, with ``chat_template``,
    is the chat template's user turn (which writes its own special tokens). Each response ends
    with the eos. A pair whose prompt leaves no room for a response token in ``max_length`` is
    skipped (``<split>/skipped_prompt_too_long``); a longer response loses tokens from the
    right (the eos first) and the pair is counted under ``<split>/truncated``; a pair whose
    two responses are equal once cut is skipped as ``<split>/skipped_same_response``. Rows
    with a fourth element (their margin, :func:`read_preference_rows`) give the examples'
    ``margins``.
    """
    prefix, eos = ([] if chat_template else _leading_specials(tokenizer)), _eos_id(tokenizer)
    texts = [chat_prompt(tokenizer, row[0]) if chat_template else row[0] for row in rows]
    prompts = _tokenize(tokenizer, texts)
    chosen = _tokenize(tokenizer, [row[1] for row in rows])
    rejected = _tokenize(tokenizer, [row[2] for row in rows])
    with_margins = bool(rows) and len(rows[0]) > 3
    out: tuple[list, list, list] = ([], [], [])
    margins: list[float] = []
    too_long = truncated = same = 0
    for row, p, c, r in zip(rows, prompts, chosen, rejected, strict=True):
        p, c, r = prefix + p, c + [eos], r + [eos]
        room = max_length - len(p)
        if room < 1:
            too_long += 1
            continue
        if max(len(c), len(r)) > room:
            truncated += 1
            c, r = c[:room], r[:room]
            if c == r:
                same += 1
                continue
        for part, x in zip(out, (p, c, r), strict=True):
            part.append(np.asarray(x, np.int32))
        if with_margins:
            margins.append(row[3])
    counts[f"{split}/skipped_prompt_too_long"] = too_long
    counts[f"{split}/skipped_same_response"] = (
        counts.get(f"{split}/skipped_same_response", 0) + same
    )
    counts[f"{split}/truncated"] = truncated - same
    return PreferenceExamples(*out, np.asarray(margins, np.float32) if with_margins else None)


@dataclasses.dataclass(frozen=True)
class PreferenceTask:
    """Preference pairs from the user's files: rows with a prompt, a chosen and a rejected
    response (columns ``task.pair_fields``), from any file or folder
    :func:`lorax.data.filetasks.split_files` finds (``task.data``, or ``task.train_file`` /
    ``validation_file`` / ``test_file``; csv, tsv, jsonl, json, parquet); without a task
    config, ``train.jsonl`` (and optionally ``test.jsonl``) in the data directory. A split
    without a file is held out of the training pairs, ``validation_size`` each (a fixed
    draw, the same pairs every run). ``task.chat_template`` wraps each prompt in the
    tokenizer's chat template; otherwise the prompt text is used as it is.
    """

    def load(
        self, data_dir, tokenizer, *, max_length: int, validation_size: int, task_config=None
    ) -> TaskData:
        """See :func:`lorax.data.registry.load_task`."""
        if task_config is not None:
            files = split_files(task_config)
            fields = tuple(task_config.get("pair_fields") or PAIR_FIELDS)
            chat = bool(task_config.get("chat_template", False))
            margin_field = task_config.get("margin_field") or ""
        else:
            train = os.path.join(os.fspath(data_dir), "train.jsonl")
            if not os.path.isfile(train):
                raise FileNotFoundError(f"{train} does not exist; the task needs train.jsonl")
            test = os.path.join(os.fspath(data_dir), "test.jsonl")
            files = {"train": train, "validation": None,
                     "test": test if os.path.isfile(test) else None}  # fmt: skip
            fields, chat, margin_field = PAIR_FIELDS, False, ""
        counts: dict[str, int] = {}
        train = read_preference_rows(files["train"], "train", counts, fields, margin_field)
        missing = [s for s in ("validation", "test") if files[s] is None]
        if missing and not 0 <= validation_size * len(missing) < len(train):
            top = (len(train) - 1) // len(missing)
            raise ValueError(
                f"task.validation_size = {validation_size} must be in 0..{top} (the train file "
                f"has {len(train)} usable pairs; held out for {' and '.join(missing)})"
            )
        parts = hold_out(len(train), [validation_size] * len(missing))
        rows = {"train": [train[i] for i in parts[-1]]}
        rows.update({s: [train[i] for i in idx] for s, idx in zip(missing, parts, strict=False)})
        for split in ("validation", "test"):
            if files[split] is not None:
                rows[split] = read_preference_rows(
                    files[split], split, counts, fields, margin_field
                )
        splits = {}
        for split in ("train", "validation", "test"):
            splits[split] = encode_preferences(
                tokenizer, rows[split], max_length=max_length, counts=counts, split=split,
                chat_template=chat,
            )  # fmt: skip
            counts[f"{split}/rows"] = len(splits[split])
        return TaskData(splits, (), counts)


PREFERENCES = PreferenceTask()


class PairBatcher(Batcher):
    """Fixed-shape batches of preference pairs: B pairs as 2B rows, chosen and rejected
    interleaved (row ``2i`` chosen, ``2i + 1`` rejected, of pair i).

    Keys (R = 2B rows, T the shortest of ``buckets`` that fits the batch's longest pair):
      ``input_ids`` [R, T] int32: prompt, response, eos; ``pad_id`` after;
      ``targets`` [R, T] int32: ``input_ids[r, t + 1]``, 0 at the row's last token and after;
      ``loss_mask`` [R, T] float32: 1 exactly where the target is a response token (the eos
        included), so ``sum(log p(targets) * loss_mask, -1)`` is the response's log-prob;
      ``segment_ids`` [R, T] int32: 1 on real tokens, 0 on padding;
      ``positions`` [R, T] int32: 0..len-1, 0 on padding;
      ``last_index`` [R] int32: the position of the row's last real token (its eos, unless cut;
        where a reward model reads its score);
      ``margin`` [B] float32: each pair's margin, when the examples have ``margins`` (0 for a
        padding pair);
      ``weights`` [B] float32: 1 for a real pair, 0 for a padding pair (all-padding rows, the
        last evaluation batch's filler).
    Training order is that of :class:`lorax.data.Batcher` (pairs grouped by bucket, shuffled
    by (seed, epoch), full batches only): a function of (seed, step) alone.
    """

    def __init__(self, examples: PreferenceExamples, batch_size: int, buckets, *, seed: int,
                 pad_id: int = 0):  # fmt: skip
        super().__init__(examples, batch_size, buckets, seed=seed, pad_id=pad_id)

    def example_lengths(self, examples) -> np.ndarray:
        return examples.lengths()

    def _assemble(self, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
        shape = (2 * self.batch_size, length)
        ids = np.full(shape, self.pad_id, np.int32)
        targets, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        loss_mask = np.zeros(shape, np.float32)
        last = np.zeros((shape[0],), np.int32)
        weights = np.zeros((self.batch_size,), np.float32)
        ex = self.examples
        for b, i in enumerate(indices):
            prompt = ex.prompts[i]
            for row, response in ((2 * b, ex.chosen[i]), (2 * b + 1, ex.rejected[i])):
                x = np.concatenate([prompt, response])
                ids[row, : len(x)] = x
                targets[row, : len(x) - 1] = x[1:]
                # position t predicts token t + 1: the response from len(prompt) - 1 on
                loss_mask[row, len(prompt) - 1 : len(x) - 1] = 1.0
                segments[row, : len(x)] = 1
                positions[row, : len(x)] = np.arange(len(x))
                last[row] = len(x) - 1
            weights[b] = 1.0
        batch = {
            "input_ids": ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segments,
            "positions": positions,
            "last_index": last,
            "weights": weights,
        }
        if ex.margins is not None:
            batch["margin"] = np.zeros((self.batch_size,), np.float32)
            batch["margin"][: len(indices)] = ex.margins[indices]
        return batch


def encode_scored(
    tokenizer: Any,
    texts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    max_length: int,
    chat_template: bool = False,
) -> list[np.ndarray]:
    """Token rows for a reward model to score, built as its training rows are: ``texts[i]``
    whole (the tokenizer's leading specials, its tokens, the eos), or with ``responses`` the
    prompt ``texts[i]`` (its chat-template user turn with ``chat_template``) then
    ``responses[i]`` and the eos, prompt and response tokenized apart. A row longer than
    ``max_length`` keeps its first ``max_length`` tokens (a response loses its end, the eos
    first, as in training)."""
    eos = _eos_id(tokenizer)
    if responses is None:
        prefix = _leading_specials(tokenizer)
        rows = [prefix + ids + [eos] for ids in _tokenize(tokenizer, list(texts))]
    else:
        if len(responses) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(responses)} responses")
        prefix = [] if chat_template else _leading_specials(tokenizer)
        prompts = [chat_prompt(tokenizer, p) if chat_template else p for p in texts]
        rows = [
            prefix + p + r + [eos]
            for p, r in zip(
                _tokenize(tokenizer, prompts), _tokenize(tokenizer, list(responses)), strict=True
            )
        ]
    return [np.asarray(row[:max_length], np.int32) for row in rows]


def scoring_batches(
    rows: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int], *, pad_id: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``(indices, batch)`` over ``rows`` in length order, ``batch_size`` rows a batch (the
    last filled with padding rows), each padded to the shortest of ``buckets`` that fits (the
    longest row, past the last bucket): ``input_ids`` (``pad_id`` after each row),
    ``segment_ids`` (1 on real tokens) and ``positions`` [B, T] int32, as
    :class:`PairBatcher` lays out a row; ``indices`` are the real rows' places in ``rows``."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    sizes = sorted(int(b) for b in buckets)
    for start in range(0, len(rows), batch_size):
        index = order[start : start + batch_size]
        longest = max(len(rows[i]) for i in index)
        t = next((b for b in sizes if b >= longest), longest)
        ids = np.full((batch_size, t), pad_id, np.int32)
        segments, positions = np.zeros_like(ids), np.zeros_like(ids)
        for b, i in enumerate(index):
            n = len(rows[i])
            ids[b, :n], segments[b, :n], positions[b, :n] = rows[i], 1, np.arange(n)
        yield index, {"input_ids": ids, "segment_ids": segments, "positions": positions}

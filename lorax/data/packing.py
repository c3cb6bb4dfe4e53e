"""Fixed-shape causal-LM batches: examples packed into rows, and scored-choice rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lorax.data.causal import CausalExamples, ChoiceExamples

# Mixed into the packing seed so it is a different stream from the per-epoch shuffles.
_PACKING_STREAM = 0x7061636B


def _best_fit(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Packs examples, taken in ``order``, into rows of ``seq_len`` tokens by best fit.

    Each example goes into the open row with the least room that still fits it (else a new
    row), so rows come out nearly full whatever the order. Returns example indices per row.
    """
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]  # room left -> open rows
    n_room = np.zeros(seq_len + 1, np.int64)
    for i in order:
        length = int(lengths[i])
        fits = n_room[length:] > 0
        k = int(fits.argmax())
        if fits[k]:
            room = length + k
            r = by_room[room].pop()
            n_room[room] -= 1
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room - length > 0:
            by_room[room - length].append(r)
            n_room[room - length] += 1
    return [np.asarray(r, np.int64) for r in rows]


class PackedBatcher:
    """Packs a causal split into fixed [B, T] batches of several examples per row.

    Every batch has, all [B, T]:
      ``input_ids`` int32 (``pad_id`` on padding);
      ``targets`` int32: ``input_ids[b, t + 1]`` when t + 1 is in the same segment, else 0;
      ``loss_mask`` float32: the example's ``loss_mask`` at token t + 1, i.e. on the token
        being predicted; 0 at each segment's last token and on padding;
      ``segment_ids`` int32: 1, 2, 3, ... for the examples of a row, 0 on padding;
      ``positions`` int32: 0..len-1 within each segment, 0 on padding.
    Attention must not cross segments (mask by ``segment_ids``) for packing to be exact.

    Packing is best-fit (:func:`_best_fit`) over the examples in an order shuffled by
    ``seed``, done once: rows are fixed for the batcher's lifetime, and each epoch shuffles
    the rows by (seed, epoch) and cuts ``steps_per_epoch = rows // B`` full batches (the
    leftover rows, different ones each epoch, wait for the next). Which examples share a row
    does not change what the model computes, since attention stays within a segment.

    Args:
      examples: the split; every example at most ``seq_len`` tokens, none empty.
      batch_size: B, rows per batch.
      seq_len: T.
      seed: the training batches are a function of (seed, step) alone.
      pad_id: token id used for padding.
    """

    def __init__(
        self, examples: CausalExamples, batch_size: int, seq_len: int, *, seed: int, pad_id: int
    ):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(
                f"batch size and seq_len must be positive, got {batch_size} and {seq_len}"
            )
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed, self.pad_id = seed, pad_id
        self.lengths = np.fromiter((len(x) for x in examples.input_ids), np.int64, len(examples))
        if len(self.lengths) and (self.lengths.max() > seq_len or self.lengths.min() == 0):
            bad = int(np.flatnonzero((self.lengths > seq_len) | (self.lengths == 0))[0])
            raise ValueError(
                f"example {bad} has {self.lengths[bad]} tokens; packing into seq_len = "
                f"{seq_len} needs 1..{seq_len} (set task.max_length <= seq_len)"
            )
        order = np.random.default_rng([_PACKING_STREAM, seed]).permutation(len(examples))
        self._train_rows = _best_fit(self.lengths, order, seq_len)
        self.steps_per_epoch = len(self._train_rows) // batch_size
        self._plan_epoch, self._plan = None, None

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns the batch of training step ``step`` (0-based), a function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.examples)} examples pack into {len(self._train_rows)} rows of "
                f"{self.seq_len} tokens, no full training batch of {self.batch_size} rows; use "
                "a smaller batch size or seq_len"
            )
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._plan_epoch != epoch:
            self._plan_epoch = epoch
            self._plan = np.random.default_rng([self.seed, epoch]).permutation(
                len(self._train_rows)
            )
        rows = self._plan[i * self.batch_size : (i + 1) * self.batch_size]
        return self._assemble([self._train_rows[r] for r in rows])

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields every example exactly once: best-fit packed in split order (no shuffling);
        the last batch is filled with all-padding rows (loss_mask 0)."""
        rows = _best_fit(self.lengths, np.arange(len(self.examples)), self.seq_len)
        for start in range(0, len(rows), self.batch_size):
            yield self._assemble(rows[start : start + self.batch_size])

    def _assemble(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        shape = (self.batch_size, self.seq_len)
        ids = np.full(shape, self.pad_id, np.int32)
        targets, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        loss_mask = np.zeros(shape, np.float32)
        for b, members in enumerate(rows):
            start = 0
            for s, i in enumerate(members, start=1):
                x, m = self.examples.input_ids[i], self.examples.loss_mask[i]
                end = start + len(x)
                ids[b, start:end] = x
                targets[b, start : end - 1] = x[1:]
                loss_mask[b, start : end - 1] = m[1:]
                segments[b, start:end] = s
                positions[b, start:end] = np.arange(len(x))
                start = end
        return {
            "input_ids": ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segments,
            "positions": positions,
        }


def count_lm_tokens(batch: dict[str, np.ndarray]) -> int:
    """Returns the number of real (non-pad) tokens in a packed or choice batch."""
    return int((batch["segment_ids"] > 0).sum())


class ChoiceBatcher:
    """Evaluation batches that score each example's choices as continuations of its prompt.

    A batch holds ``batch_size`` examples as ``batch_size * C`` rows (C choices): row
    ``b * C + c`` is prompt b followed by choice c, right-padded to T, the shortest of
    ``buckets`` that fits prompt + longest choice. Keys ([R, T] with R = batch_size * C):
    ``input_ids``, ``targets`` (next token, 0 at the row's last real token and on padding),
    ``loss_mask`` float32 (1 exactly where the target is a choice token), ``segment_ids``
    (1 on real tokens, 0 on padding), ``positions`` (0..len-1, 0 on padding); and
    ``labels`` int32 [batch_size], ``weights`` float32 [batch_size] (0 for padding examples).
    A scorer sums log p(targets) over loss_mask per row, reshapes to [batch_size, C] and takes
    the argmax. Examples are grouped by bucket (shortest first) and keep split order within.

    Args:
      examples: the split.
      batch_size: examples per batch.
      buckets: padded lengths; the longest must cover the longest prompt + choice.
      pad_id: token id used for padding.
    """

    def __init__(
        self, examples: ChoiceExamples, batch_size: int, buckets: Sequence[int], *, pad_id: int
    ):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not self.buckets or self.buckets[0] <= 0:
            raise ValueError(f"task.buckets = {tuple(buckets)}: need one or more positive lengths")
        longest_choice = max(len(c) for c in examples.choices)
        lengths = np.fromiter((len(p) for p in examples.prompts), np.int64, len(examples))
        lengths += longest_choice
        if len(lengths) and lengths.max() > self.buckets[-1]:
            raise ValueError(
                f"task.buckets = {self.buckets} do not cover the longest prompt + choice "
                f"({lengths.max()} tokens); make the last bucket >= task.max_length"
            )
        bucket_of = np.searchsorted(np.asarray(self.buckets), lengths)
        self._members = [np.flatnonzero(bucket_of == b) for b in range(len(self.buckets))]

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields every example exactly once, bucket by bucket from the shortest."""
        for b, members in enumerate(self._members):
            for start in range(0, len(members), self.batch_size):
                yield self._assemble(members[start : start + self.batch_size], self.buckets[b])

    def _assemble(self, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
        n_choices = len(self.examples.choices)
        shape = (self.batch_size * n_choices, length)
        ids = np.full(shape, self.pad_id, np.int32)
        targets, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        loss_mask = np.zeros(shape, np.float32)
        labels = np.zeros((self.batch_size,), np.int32)
        weights = np.zeros((self.batch_size,), np.float32)
        for b, i in enumerate(indices):
            prompt = self.examples.prompts[i]
            for c, choice in enumerate(self.examples.choices):
                row, x = b * n_choices + c, np.concatenate([prompt, choice])
                ids[row, : len(x)] = x
                targets[row, : len(x) - 1] = x[1:]
                # Position t predicts token t + 1: the choice tokens are predicted from
                # positions len(prompt) - 1 .. len(x) - 2.
                loss_mask[row, len(prompt) - 1 : len(x) - 1] = 1.0
                segments[row, : len(x)] = 1
                positions[row, : len(x)] = np.arange(len(x))
            labels[b] = self.examples.labels[i]
            weights[b] = 1.0
        return {
            "input_ids": ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segments,
            "positions": positions,
            "labels": labels,
            "weights": weights,
        }

"""Fixed-shape batches from variable-length examples: length buckets, deterministic order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lorax.data.tasks import Examples


class Batcher:
    """Cuts a split into batches whose shapes come from a small set of bucket lengths.

    Every batch is ``{"input_ids", "token_type_ids", "attention_mask"}`` [B, T] int32,
    ``"labels"`` [B] int32 and ``"weights"`` [B] float32 (0 for padding rows), with T one of
    ``buckets``, so a jitted step compiles at most ``len(buckets)`` times.

    Args:
      examples: the split.
      batch_size: B.
      buckets: increasing padded lengths; the last must cover the longest example.
      seed: the training order is a function of (seed, step) alone.
      pad_id: token id used for padding.
    """

    def __init__(self, examples: Examples, batch_size: int, buckets: Sequence[int], *,
                 seed: int, pad_id: int = 0):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        lengths = np.fromiter((len(x) for x in examples.input_ids), np.int64, len(examples))
        if len(lengths) and lengths.max() > self.buckets[-1]:
            raise ValueError(f"task.buckets = {self.buckets} do not cover the longest example "
                             f"({lengths.max()} tokens); make the last bucket >= task.max_length")
        self.bucket_of = np.searchsorted(np.asarray(self.buckets), lengths)
        members = [np.flatnonzero(self.bucket_of == b) for b in range(len(self.buckets))]
        self.steps_per_epoch = sum(len(m) // batch_size for m in members)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples make no full batch of {batch_size} in "
                             f"any bucket of {self.buckets}")
        self._members = members
        self._plan_epoch, self._plan = None, None

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, example indices) per batch of one epoch, shuffled by (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for b, members in enumerate(self._members):
            shuffled = rng.permutation(members)
            n = len(shuffled) // self.batch_size
            plan += [(b, shuffled[i * self.batch_size:(i + 1) * self.batch_size])
                     for i in range(n)]
        return [plan[i] for i in rng.permutation(len(plan))]

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step`` (0-based), the same on every call and resume."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._plan_epoch != epoch:
            self._plan_epoch, self._plan = epoch, self._epoch_plan(epoch)
        bucket, indices = self._plan[i]
        return self._assemble(indices, self.buckets[bucket])

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every example exactly once, bucket by bucket; short batches padded with weight 0."""
        for b, members in enumerate(self._members):
            for start in range(0, len(members), self.batch_size):
                yield self._assemble(members[start:start + self.batch_size], self.buckets[b])

    def _assemble(self, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
        bsz = self.batch_size
        ids = np.full((bsz, length), self.pad_id, np.int32)
        types = np.zeros((bsz, length), np.int32)
        mask = np.zeros((bsz, length), np.int32)
        labels = np.zeros((bsz,), np.int32)
        weights = np.zeros((bsz,), np.float32)
        for row, i in enumerate(indices):
            x = self.examples.input_ids[i]
            ids[row, :len(x)] = x
            types[row, :len(x)] = self.examples.token_type_ids[i]
            mask[row, :len(x)] = 1
            labels[row] = self.examples.labels[i]
            weights[row] = 1.0
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "labels": labels, "weights": weights}

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

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        buckets: Sequence[int],
        *,
        seed: int,
        pad_id: int = 0,
    ):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not self.buckets or self.buckets[0] <= 0:
            raise ValueError(f"task.buckets = {tuple(buckets)}: need one or more positive lengths")
        lengths = self.example_lengths(examples)
        if len(lengths) and lengths.max() > self.buckets[-1]:
            raise ValueError(
                f"task.buckets = {self.buckets} do not cover the longest example "
                f"({lengths.max()} tokens); make the last bucket >= task.max_length"
            )
        self.bucket_of = np.searchsorted(np.asarray(self.buckets), lengths)
        members = [np.flatnonzero(self.bucket_of == b) for b in range(len(self.buckets))]
        # Leftovers of each bucket are dropped per epoch (different ones each epoch), so an
        # epoch is the full batches only. Zero is legal for a Batcher used just for evaluation.
        self.steps_per_epoch = sum(len(m) // batch_size for m in members)
        self._members = members
        self._plan_epoch, self._plan = None, None

    def example_lengths(self, examples) -> np.ndarray:
        """int64 [N]: each example's length in tokens (what picks its bucket)."""
        return np.fromiter((len(x) for x in examples.input_ids), np.int64, len(examples))

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, example indices) per batch of one epoch, shuffled by (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for b, members in enumerate(self._members):
            shuffled = rng.permutation(members)
            n = len(shuffled) // self.batch_size
            plan += [
                (b, shuffled[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(n)
            ]
        return [plan[i] for i in rng.permutation(len(plan))]

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns the batch of training step ``step`` (0-based).

        A function of (seed, step) alone, so a resumed run sees exactly the batches an
        uninterrupted one would. Epoch ``step // steps_per_epoch`` puts each example in the
        shortest bucket that fits it, shuffles within buckets, cuts full batches (dropping
        the leftovers) and shuffles the batch order, all keyed by (seed, epoch).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.steps_per_epoch == 0:
            sizes = {b: len(m) for b, m in zip(self.buckets, self._members, strict=True)}
            raise ValueError(
                f"{len(self.examples)} examples make no full training batch of "
                f"{self.batch_size} in any bucket (examples per bucket length: {sizes}); "
                "use a smaller batch size or fewer buckets"
            )
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._plan_epoch != epoch:
            self._plan_epoch, self._plan = epoch, self._epoch_plan(epoch)
        bucket, indices = self._plan[i]
        return self._assemble(indices, self.buckets[bucket])

    @property
    def num_eval_batches(self) -> int:
        """How many batches :meth:`eval_batches` yields."""
        return sum(-(-len(m) // self.batch_size) for m in self._members)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields every example exactly once, bucket by bucket from the shortest.

        Within a bucket examples keep their order; the last batch of a bucket is filled with
        padding rows of weight 0 (all-pad tokens, attention_mask 0), so the batch size is fixed.
        """
        for b, members in enumerate(self._members):
            for start in range(0, len(members), self.batch_size):
                yield self._assemble(members[start : start + self.batch_size], self.buckets[b])

    def _assemble(self, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
        bsz = self.batch_size
        ids = np.full((bsz, length), self.pad_id, np.int32)
        types = np.zeros((bsz, length), np.int32)
        mask = np.zeros((bsz, length), np.int32)
        labels = np.zeros((bsz,), np.int32)
        weights = np.zeros((bsz,), np.float32)
        for row, i in enumerate(indices):
            x = self.examples.input_ids[i]
            ids[row, : len(x)] = x
            types[row, : len(x)] = self.examples.token_type_ids[i]
            mask[row, : len(x)] = 1
            labels[row] = self.examples.labels[i]
            weights[row] = 1.0
        return {
            "input_ids": ids,
            "token_type_ids": types,
            "attention_mask": mask,
            "labels": labels,
            "weights": weights,
        }


def count_tokens(batch: dict[str, np.ndarray]) -> int:
    """Returns the number of real (non-pad) tokens in ``batch``: its attention mask summed.

    Padding rows have an all-zero mask, so they count nothing.
    """
    return int(batch["attention_mask"].sum())

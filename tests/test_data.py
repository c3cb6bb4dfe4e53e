"""Tests of the SNLI task and fixed-shape batching (lorax/data/)."""

import json

import numpy as np
import pytest

from lorax import data


@pytest.fixture(scope="module")
def snli(snli_dir, tokenizer):
    return data.load_task("snli", snli_dir, tokenizer, max_length=128, validation_size=5000)


def test_real_snli_counts(snli):
    """110 train and 176 test rows without a gold label are skipped and counted; the rest
    split into train, a 5000-row validation hold-out, and the 9824-row official test set."""
    c = snli.counts
    assert c["train/skipped_no_gold_label"] == 110
    assert c["test/skipped_no_gold_label"] == 176
    assert len(snli.splits["validation"]) == 5000
    assert len(snli.splits["train"]) == 100_000 - 110 - 5000
    assert len(snli.splits["test"]) == 10_000 - 176
    assert snli.label_names == ("entailment", "neutral", "contradiction")


def test_first_test_rows_are_encoded_as_pairs(snli, snli_dir, tokenizer):
    """Test rows keep file order: row 1's label and [CLS] s1 [SEP] s2 [SEP] with segment ids."""
    with open(snli_dir / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    rows = [r for r in rows if r["gold_label"] != "-"]
    test = snli.splits["test"]
    for i, row in enumerate(rows):
        assert test.labels[i] == snli.label_names.index(row["gold_label"])
        text = tokenizer.decode(test.input_ids[i])
        assert text.startswith("[CLS] " + row["sentence1"].lower()[:20])
        assert text.count("[SEP]") == 2
        n_first = list(test.input_ids[i]).index(tokenizer.sep_token_id) + 1
        assert not test.token_type_ids[i][:n_first].any()
        assert test.token_type_ids[i][n_first:].all()


def _write(tmp_path, rows, name):
    with open(tmp_path / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _row(s1, s2, label):
    return {"sentence1": s1, "sentence2": s2, "gold_label": label}


@pytest.fixture
def small_dir(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    train = [_row(f"a man number {i} walks " * (1 + i % 3), f"someone moves {i}", labels[i % 3])
             for i in range(60)]
    train += [_row("x", "y", "-"), _row("", "y", "neutral"), {"sentence1": "no second"}]
    test = [_row("a dog runs", "an animal moves", "entailment"), _row("p", "q", "-")]
    _write(tmp_path, train, "train.jsonl")
    _write(tmp_path, test, "test.jsonl")
    return tmp_path


def test_bad_rows_are_skipped_and_counted(small_dir, tokenizer):
    """No gold label, empty text and missing fields are each skipped under their own count."""
    t = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    assert t.counts["train/skipped_no_gold_label"] == 1
    assert t.counts["train/skipped_empty_text"] == 1
    assert t.counts["train/skipped_missing_field"] == 1
    assert len(t.splits["train"]) + len(t.splits["validation"]) == 60
    assert len(t.splits["test"]) == 1


def test_unknown_label_names_row_and_valid_labels(small_dir, tokenizer):
    """An unexpected label value is an error naming the row and the valid labels."""
    _write(small_dir, [_row("a", "b", "entailment"), _row("a", "b", "maybe")], "test.jsonl")
    with pytest.raises(ValueError, match=r"row 2: gold_label = 'maybe' .* valid: \['entailment'"):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)


def test_validation_split_is_fixed_and_disjoint(small_dir, tokenizer):
    """The held-out rows are the same on every load (seed-independent) and not in train."""
    a = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    b = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    key = lambda ex: {tuple(x) for x in ex.input_ids}  # noqa: E731
    assert key(a.splits["validation"]) == key(b.splits["validation"])
    assert not key(a.splits["validation"]) & key(a.splits["train"])


def test_no_implicit_padding_or_truncation_at_128(tmp_path, tokenizer):
    """The bundled tokenizer pads/truncates to 128 by default; our encoding does neither:
    a 200-token pair keeps its length with max_length=256 and is cut (and counted) at 64."""
    long = "word " * 190
    _write(tmp_path, [_row(long, "short one", "neutral")] * 3, "train.jsonl")
    _write(tmp_path, [_row("a", "b", "neutral")], "test.jsonl")
    t = data.load_task("snli", tmp_path, tokenizer, max_length=256, validation_size=1)
    assert len(t.splits["train"].input_ids[0]) == 190 + 2 + 3
    assert len(t.splits["test"].input_ids[0]) == 5  # no padding
    assert t.counts["train/truncated"] == 0
    t = data.load_task("snli", tmp_path, tokenizer, max_length=64, validation_size=1)
    assert len(t.splits["train"].input_ids[0]) == 64
    assert t.counts["train/truncated"] == 2 and t.counts["validation/truncated"] == 1


def _examples(n=100, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, n)
    return data.Examples([np.arange(1, L + 1, dtype=np.int32) for L in lengths],
                         [np.zeros(L, np.int32) for L in lengths],
                         rng.integers(0, 3, n).astype(np.int32))


def test_train_batches_are_deterministic_per_seed_and_bucket_shaped():
    """train_batch(step) depends on (seed, step) only, differs across seeds, and has only
    bucket shapes with every row real."""
    ex = _examples()
    a, b = data.Batcher(ex, 8, (16, 32, 64), seed=1), data.Batcher(ex, 8, (16, 32, 64), seed=1)
    other = data.Batcher(ex, 8, (16, 32, 64), seed=2)
    for step in (0, 5, 3, 17, 40):  # out of order and across epochs
        x, y = a.train_batch(step), b.train_batch(step)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert x["input_ids"].shape[1] in (16, 32, 64)
        assert x["weights"].sum() == 8
        np.testing.assert_array_equal(x["attention_mask"].sum(1),
                                      (x["input_ids"] != 0).sum(1))
    assert any(not np.array_equal(a.train_batch(s)["labels"], other.train_batch(s)["labels"])
               for s in range(5))


def test_eval_batches_cover_every_example_once():
    """Eval batches hold each example exactly once; padding rows have weight 0."""
    ex = _examples(53)
    seen = []
    total = 0.0
    for batch in data.Batcher(ex, 8, (16, 32, 64), seed=0).eval_batches():
        assert batch["input_ids"].shape[0] == 8
        total += batch["weights"].sum()
        for row in range(8):
            n = int(batch["attention_mask"][row].sum())
            if batch["weights"][row]:
                seen.append(n)
            else:
                assert n == 0
    assert total == 53
    assert sorted(seen) == sorted(len(x) for x in ex.input_ids)


def test_buckets_must_cover_the_longest_example():
    """A bucket set shorter than the longest example is refused with the fix in the message."""
    with pytest.raises(ValueError, match="do not cover the longest example"):
        data.Batcher(_examples(), 8, (16, 32), seed=0)

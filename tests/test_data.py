"""Tests of the SNLI task and fixed-shape batching (lorax/data/)."""

import dataclasses
import json

import numpy as np
import pytest

from lorax import data


@pytest.fixture(scope="module")
def snli(snli_dir, tokenizer):
    return data.load_task("snli", snli_dir, tokenizer, max_length=128, validation_size=5000)


@pytest.mark.slow
def test_real_snli_counts(snli):
    """110 train and 176 test rows without a gold label are skipped and counted; the rest
    split into train, a 5000-row validation hold-out, and the 9824-row official test set."""
    c = snli.counts
    assert c["train/file_rows"] == 100_000 and c["test/file_rows"] == 10_000
    assert c["train/skipped_no_gold_label"] == 110
    assert c["test/skipped_no_gold_label"] == 176
    assert c["train/skipped_empty_text"] == c["train/skipped_missing_field"] == 0
    assert (c["train/rows"], c["validation/rows"]) == (100_000 - 110 - 5000, 5000)
    assert c["test/truncated"] == 0  # SNLI pairs are short: the longest is ~110 tokens
    assert len(snli.splits["validation"]) == 5000
    assert len(snli.splits["train"]) == 100_000 - 110 - 5000
    assert len(snli.splits["test"]) == 10_000 - 176
    assert snli.label_names == ("entailment", "neutral", "contradiction")


def test_known_test_rows_have_their_labels_and_pair_encoding(snli, tokenizer):
    """The official test file's first three rows (one premise, three hypotheses) keep file
    order, get labels neutral=1 / entailment=0 / contradiction=2, and are encoded as
    [CLS] premise [SEP] hypothesis [SEP] with segment ids 0 then 1."""
    premise = (
        "this church choir sings to the masses as they sing joyous songs from the book at a church."
    )
    known = [
        ("the church has cracks in the ceiling.", 1),
        ("the church is filled with song.", 0),
        ("a choir singing at a baseball game.", 2),
    ]
    test = snli.splits["test"]
    for i, (hypothesis, label) in enumerate(known):
        assert test.labels[i] == label
        assert tokenizer.decode(test.input_ids[i]) == f"[CLS] {premise} [SEP] {hypothesis} [SEP]"
        n_first = list(test.input_ids[i]).index(tokenizer.sep_token_id) + 1
        assert not test.token_type_ids[i][:n_first].any()
        assert test.token_type_ids[i][n_first:].all()
        assert test.input_ids[i].dtype == test.token_type_ids[i].dtype == np.int32


def _write(tmp_path, rows, name):
    with open(tmp_path / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _row(s1, s2, label):
    return {"sentence1": s1, "sentence2": s2, "gold_label": label}


@pytest.fixture
def small_dir(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    train = [
        _row(f"a man number {i} walks " * (1 + i % 3), f"someone moves {i}", labels[i % 3])
        for i in range(60)
    ]
    train += [_row("x", "y", "-"), _row("", "y", "neutral"), {"sentence1": "no second"}]
    test = [_row("a dog runs", "an animal moves", "entailment"), _row("p", "q", "-")]
    _write(tmp_path, train, "train.jsonl")
    _write(tmp_path, test, "test.jsonl")
    return tmp_path


def test_bad_rows_are_skipped_and_counted(small_dir, tokenizer):
    """No gold label, empty text and missing fields are each skipped under their own count;
    every usable row lands in exactly one of train/validation."""
    t = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    c = t.counts
    assert c["train/file_rows"] == 63 and c["test/file_rows"] == 2
    assert c["train/skipped_no_gold_label"] == 1
    assert c["train/skipped_empty_text"] == 1
    assert c["train/skipped_missing_field"] == 1
    assert c["test/skipped_no_gold_label"] == 1
    assert (c["train/rows"], c["validation/rows"], c["test/rows"]) == (50, 10, 1)
    assert (len(t.splits["train"]), len(t.splits["validation"]), len(t.splits["test"])) == (
        50,
        10,
        1,
    )


def test_broken_lines_are_counted_not_fatal(small_dir, tokenizer):
    """Non-UTF-8 bytes (row kept, counted), bad JSON, a JSON list, a non-string text and a
    text far past max_length (kept, truncated, counted) in the test file: the load succeeds
    and every case is in the counts."""
    lines = [
        b'{"sentence1": "a dog runs", "sentence2": "an animal moves", "gold_label": "entailment"}',
        b'{"sentence1": "caf\xe9 \xff noir", "sentence2": "a drink", "gold_label": "neutral"}',
        b'{"sentence1": "cut off", "sentence2": ',
        b"[1, 2, 3]",
        b"",
        b'{"sentence1": 17, "sentence2": "a number", "gold_label": "neutral"}',
        json.dumps(_row("word " * 5000, "short", "contradiction")).encode(),
    ]
    (small_dir / "test.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    t = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    c = t.counts
    assert c["test/file_rows"] == 6  # the blank line is not a row
    assert c["test/bad_utf8"] == 1
    assert c["test/skipped_bad_json"] == 2
    assert c["test/skipped_bad_type"] == 1
    assert c["test/rows"] == 3 and c["test/truncated"] == 1
    assert max(len(x) for x in t.splits["test"].input_ids) == 64


def test_a_field_no_row_has_is_an_error_naming_it(small_dir, tokenizer):
    """A file whose rows all lack a field (another data set's layout) names the field and the
    fields it has, instead of skipping every row."""
    _write(small_dir, [{"premise": "a", "hypothesis": "b", "label": 0}] * 3, "test.jsonl")
    with pytest.raises(ValueError, match=r"no row has the field\(s\) \['sentence1', 'sentence2'"):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)


def test_unknown_label_names_row_and_valid_labels(small_dir, tokenizer):
    """An unexpected label value is an error naming the file row and the valid labels."""
    _write(small_dir, [_row("a", "b", "entailment"), _row("a", "b", "maybe")], "test.jsonl")
    with pytest.raises(
        ValueError,
        match=r"test.jsonl line 2: gold_label = 'maybe' .* valid: \['entailment'",
    ):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)


def test_validation_size_out_of_range_is_an_error(small_dir, tokenizer):
    """A hold-out as large as the usable train rows is refused, naming the valid range."""
    with pytest.raises(ValueError, match=r"validation_size = 60 must be in 0..59"):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=60)


def test_validation_split_is_fixed_and_disjoint(small_dir, tokenizer):
    """The held-out rows are the same on every load (load_task takes no seed, so every run
    seed sees them), are not simply the first rows, and never appear in train."""
    a = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    b = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    key = lambda ex: [tuple(x) for x in ex.input_ids]
    assert key(a.splits["validation"]) == key(b.splits["validation"])
    np.testing.assert_array_equal(a.splits["validation"].labels, b.splits["validation"].labels)
    val, train = set(key(a.splits["validation"])), set(key(a.splits["train"]))
    assert len(val) == 10 and len(train) == 50 and not val & train
    first_rows = set(key(a.splits["train"])[:10])
    assert val != first_rows


def test_no_implicit_padding_or_truncation_at_128(tmp_path, minilm_dir):
    """A freshly loaded MiniLM tokenizer carries pad/truncate-to-128 settings in its backend;
    our encoding does neither: a 195-token pair keeps its length with max_length=256, a 5-token
    pair stays 5 tokens, and at max_length=64 long pairs are cut to 64 and counted per split."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    # The settings we must not inherit:
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 128
    assert tokenizer.backend_tokenizer.padding["length"] == 128
    long = "word " * 190
    _write(tmp_path, [_row(long, "short one", "neutral")] * 3, "train.jsonl")
    _write(tmp_path, [_row("a", "b", "neutral")], "test.jsonl")
    t = data.load_task("snli", tmp_path, tokenizer, max_length=256, validation_size=1)
    assert len(t.splits["train"].input_ids[0]) == 190 + 2 + 3
    assert len(t.splits["test"].input_ids[0]) == 5
    assert t.counts["train/truncated"] == 0
    t = data.load_task("snli", tmp_path, tokenizer, max_length=64, validation_size=1)
    assert len(t.splits["train"].input_ids[0]) == 64
    assert t.splits["train"].input_ids[0][-1] == tokenizer.sep_token_id
    assert t.counts["train/truncated"] == 2 and t.counts["validation/truncated"] == 1
    assert t.counts["test/truncated"] == 0


def test_loading_local_files_never_touches_the_network(small_dir, tokenizer, monkeypatch):
    """load_task on local JSONL works with every socket connection and DNS lookup refused."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    t = data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=10)
    assert len(t.splits["train"]) == 50


def _examples(n=100, seed=0):
    """Synthetic examples; example i's first token is 1000 + i, so rows are identifiable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, n)
    return data.Examples(
        [np.r_[1000 + i, np.arange(1, L)].astype(np.int32) for i, L in enumerate(lengths)],
        [np.r_[np.zeros(L // 2), np.ones(L - L // 2)].astype(np.int32) for L in lengths],
        rng.integers(0, 3, n).astype(np.int32),
    )


BUCKETS = (16, 32, 64)


def _check_batch(batch, ex, batch_size, pad_id=0):
    """Asserts fixed shapes/dtypes, the shortest fitting bucket, and real rows copied intact;
    returns the example indices of the real rows."""
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "weights"}
    B, T = batch["input_ids"].shape
    assert B == batch_size and T in BUCKETS
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert batch[k].shape == (B, T) and batch[k].dtype == np.int32, k
    assert batch["labels"].shape == (B,) and batch["labels"].dtype == np.int32
    assert batch["weights"].shape == (B,) and batch["weights"].dtype == np.float32
    rows = []
    for r in range(B):
        n = int(batch["attention_mask"][r].sum())
        assert (batch["attention_mask"][r, :n] == 1).all() and not batch["attention_mask"][
            r, n:
        ].any()
        assert (batch["input_ids"][r, n:] == pad_id).all() and not batch["token_type_ids"][
            r, n:
        ].any()
        if batch["weights"][r] == 0:
            assert n == 0 and batch["labels"][r] == 0  # padding rows are inert
            continue
        assert batch["weights"][r] == 1
        i = int(batch["input_ids"][r, 0]) - 1000
        np.testing.assert_array_equal(batch["input_ids"][r, :n], ex.input_ids[i])
        np.testing.assert_array_equal(batch["token_type_ids"][r, :n], ex.token_type_ids[i])
        assert batch["labels"][r] == ex.labels[i]
        shortest = min(b for b in BUCKETS if b >= len(ex.input_ids[i]))
        assert T == shortest, (T, len(ex.input_ids[i]))
        rows.append(i)
    return rows


def test_train_batch_is_a_function_of_seed_and_step():
    """train_batch(step) gives the same batch on fresh Batchers in any call order (so a
    resumed run sees the uninterrupted run's batches) and differs across seeds."""
    ex = _examples()
    a, b = data.Batcher(ex, 8, BUCKETS, seed=1), data.Batcher(ex, 8, BUCKETS, seed=1)
    other = data.Batcher(ex, 8, BUCKETS, seed=2)
    steps = range(3 * a.steps_per_epoch)
    sequential = [a.train_batch(s) for s in steps]
    last = 3 * a.steps_per_epoch - 1
    for s in (17, 0, 5, last, 3, 2 * a.steps_per_epoch + 1):  # out of order, across epochs
        for k, v in b.train_batch(s).items():
            np.testing.assert_array_equal(v, sequential[s][k])
    assert any(
        not np.array_equal(
            sequential[s]["input_ids"][:, 0], other.train_batch(s)["input_ids"][:, 0]
        )
        for s in range(3)
    )


def test_train_epochs_use_full_bucket_shaped_batches_without_repeats():
    """Within an epoch every batch is full (weights all 1), bucket-shaped, and no example
    repeats; each epoch has steps_per_epoch batches and a different order; the leftovers
    dropped differ between epochs."""
    ex = _examples(100)
    batcher = data.Batcher(ex, 8, BUCKETS, seed=0)
    per_bucket = np.bincount(
        [min(i for i, b in enumerate(BUCKETS) if b >= len(x)) for x in ex.input_ids]
    )
    assert batcher.steps_per_epoch == sum(n // 8 for n in per_bucket)
    epochs = []
    for e in range(2):
        seen = []
        for s in range(e * batcher.steps_per_epoch, (e + 1) * batcher.steps_per_epoch):
            batch = batcher.train_batch(s)
            assert batch["weights"].sum() == 8
            seen += _check_batch(batch, ex, 8)
        assert len(seen) == len(set(seen)) == 8 * batcher.steps_per_epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])


def test_eval_batches_cover_every_example_once():
    """Eval batches hold each example exactly once, grouped by bucket from the shortest; the
    weights sum to N; padding rows (pad_id tokens) have weight 0 and an all-zero mask."""
    ex = _examples(53)
    batcher = data.Batcher(ex, 8, BUCKETS, seed=0, pad_id=7)
    seen, total, shapes = [], 0.0, []
    for batch in batcher.eval_batches():
        total += batch["weights"].sum()
        shapes.append(batch["input_ids"].shape[1])
        seen += _check_batch(batch, ex, 8, pad_id=7)
    assert total == 53
    assert sorted(seen) == list(range(53))
    assert shapes == sorted(shapes)
    padded = next(b for b in batcher.eval_batches() if b["weights"].min() == 0)
    assert (padded["input_ids"][padded["weights"] == 0] == 7).all()


def test_count_tokens_counts_only_real_tokens():
    """count_tokens is the attention mask summed: real tokens of real rows, nothing for pads."""
    ex = _examples(53)
    batches = list(data.Batcher(ex, 8, BUCKETS, seed=0).eval_batches())
    assert sum(data.count_tokens(b) for b in batches) == sum(len(x) for x in ex.input_ids)


def test_small_eval_split_works_but_cannot_train():
    """A split too small for one full batch can still be evaluated; asking it for a training
    batch is an error that shows the examples per bucket."""
    ex = _examples(5)
    batcher = data.Batcher(ex, 8, BUCKETS, seed=0)
    assert batcher.steps_per_epoch == 0
    assert sum(b["weights"].sum() for b in batcher.eval_batches()) == 5
    with pytest.raises(ValueError, match=r"no full training batch of 8 .* per bucket length"):
        batcher.train_batch(0)


def test_buckets_must_cover_the_longest_example():
    """A bucket set shorter than the longest example is refused with the fix in the message."""
    with pytest.raises(
        ValueError, match="do not cover the longest example.*last bucket >= task.max_length"
    ):
        data.Batcher(_examples(), 8, (16, 32), seed=0)
    with pytest.raises(ValueError, match="positive lengths"):
        data.Batcher(_examples(), 8, (), seed=0)


def test_real_rotten_tomatoes_counts_and_splits(tokenizer):
    """12,808 reviews (7,403 fresh, 5,405 rotten), 1,097 plot summaries skipped; validation and
    test held out of the one file, disjoint and the same on every call."""
    from lorax import assets

    d = assets.resolve("rotten-tomatoes")
    task = data.load_task("rotten_tomatoes", d, tokenizer, max_length=128, validation_size=500)
    c = task.counts
    assert c["all/file_rows"] == 13905 and c["all/skipped_label"] == 1097
    assert (c["train/rows"], c["validation/rows"], c["test/rows"]) == (12808 - 1780, 500, 1280)
    labels = np.concatenate([task.splits[s].labels for s in ("train", "validation", "test")])
    assert np.bincount(labels).tolist() == [5405, 7403]  # negative (rotten), positive (fresh)
    assert task.label_names == ("negative", "positive")
    again = data.load_task("rotten_tomatoes", d, tokenizer, max_length=128, validation_size=500)
    for split in ("validation", "test"):
        assert [x.tolist() for x in again.splits[split].input_ids] == [
            x.tolist() for x in task.splits[split].input_ids
        ]
    assert set(task.splits["test"].token_type_ids[0].tolist()) == {0}  # single texts


def test_sentence_csv_bad_rows(tmp_path, tokenizer):
    """Multi-line quoted text is one row; empty text is skipped and counted; an unknown label
    names its line and the valid labels."""
    import bz2

    rows = ["category,text,movie_name,has_plot_and_reviews\n"]
    rows += [f'fresh,"good film\nnumber {i}",m,True\n' for i in range(30)]
    rows += ['rotten,"",m,True\n', 'plot,"a plot",m,True\n']
    (tmp_path / "rotten_tomatoes.csv.bz2").write_bytes(bz2.compress("".join(rows).encode()))
    task = data.tasks.ROTTEN_TOMATOES
    small = dataclasses.replace(task, test_size=5)
    loaded = small.load(tmp_path, tokenizer, max_length=32, validation_size=5)
    assert loaded.counts["all/file_rows"] == 32
    assert loaded.counts["all/skipped_empty_text"] == 1
    assert loaded.counts["all/skipped_label"] == 1
    assert loaded.counts["train/rows"] == 20
    rows.append('meh,"odd",m,True\n')
    (tmp_path / "rotten_tomatoes.csv.bz2").write_bytes(bz2.compress("".join(rows).encode()))
    with pytest.raises(
        ValueError, match=r"line 64: category = 'meh' is not valid; valid: \['fresh'"
    ):
        small.load(tmp_path, tokenizer, max_length=32, validation_size=5)


def test_an_empty_test_split_or_validation_size_0_is_refused_before_training(small_dir, tokenizer):
    """A test file whose every row lacks a gold label leaves nothing to evaluate: refused when
    the task loads (before any step), naming the split and what its rows were counted as."""
    _write(small_dir, [_row("p", "q", "-"), _row("r", "s", "-")], "test.jsonl")
    with pytest.raises(
        ValueError, match=r"the test split has no examples.*'test/skipped_no_gold_label': 2"
    ):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=5)
    (small_dir / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"the test split has no examples.*none"):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=5)
    with pytest.raises(ValueError, match=r"validation_size = 0 leaves no validation rows"):
        data.load_task("snli", small_dir, tokenizer, max_length=64, validation_size=0)


def test_a_damaged_csv_bz2_is_named(tmp_path, tokenizer):
    import bz2

    good = bz2.compress(b"category,text\n" + b"fresh,a good film\n" * 50)
    task = dataclasses.replace(data.tasks.ROTTEN_TOMATOES, test_size=5)
    path = tmp_path / "rotten_tomatoes.csv.bz2"
    for damaged in (good[: len(good) // 2], b"BZh9" + b"\x00" * 64, b"not bzip2 at all"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"rotten_tomatoes\.csv\.bz2 cannot be read as bzip2"):
            task.load(tmp_path, tokenizer, max_length=32, validation_size=5)

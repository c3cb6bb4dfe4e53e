"""Causal-LM tasks (lorax/data/causal.py) and their batchers (lorax/data/packing.py)."""

import json
import logging
import re

import numpy as np
import pytest

from lorax import data
from lorax.data import causal

CORPUS = [
    "Instruction:\nReverse the letters of the word: planet\n\nResponse:\ntenalp",
    "Instruction:\nCount the words in the input.\n\nInput:\nthe cat sat\n\nResponse:\n3",
    "What is 17 plus 25? 42. Sort these numbers: 5, 2, 9. Capitalize: hello world",
    "A man walks a dog.\nQuestion: A person is outside. True, False, or Neither?\nAnswer: True",
    "Neither False True the a an of to is in on with people children playing",
]


def _tokenizer(bos=False):
    """A tiny byte-level BPE (any text encodes) with <pad>=0, <eos>=1 and, if ``bos``, a
    post-processor that puts <bos>=2 before every text, as Llama tokenizers do."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 2)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


EOS, PAD, BOS = 1, 0, 2


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _instruction_rows(n, offset=0):
    return [
        {"instruction": f"Reverse the letters of the word: w{i}", "response": f"{i}w"}
        if i % 2
        else {"instruction": "Count the words.", "context": "a " * (i % 5 + 1), "response": str(i)}
        for i in range(offset, offset + n)
    ]


# ------------------------------------------------------------------------------------------
# The instructions task


def test_loss_mask_covers_exactly_the_response_and_eos(tmp_path, tok):
    """Each example is exactly the templated prompt's tokens (mask 0) followed by the
    separately tokenized response and eos (mask 1); context rows use the Input: template."""
    rows = _instruction_rows(30)
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows[:4])
    t = data.load_task("instructions", tmp_path, tok, max_length=128, validation_size=1)
    test = t.splits["test"]
    assert isinstance(test, data.CausalExamples) and len(test) == 4 and t.label_names == ()
    for row, ids, mask in zip(rows[:4], test.input_ids, test.loss_mask, strict=True):
        if row.get("context"):
            prompt = (
                f"Instruction:\n{row['instruction']}\n\nInput:\n{row['context']}\n\nResponse:\n"
            )
        else:
            prompt = f"Instruction:\n{row['instruction']}\n\nResponse:\n"
        expected = _ids(tok, prompt) + _ids(tok, row["response"]) + [EOS]
        assert ids.dtype == mask.dtype == np.int32
        assert ids.tolist() == expected
        n_prompt = len(_ids(tok, prompt))
        assert mask.tolist() == [0] * n_prompt + [1] * (len(expected) - n_prompt)
        assert tok.decode(ids[mask == 1]) == row["response"] + "<eos>"


def test_bad_rows_are_skipped_and_counted(tmp_path, tok, caplog):
    """Missing fields, blank text, non-string fields, bad JSON and non-objects are skipped,
    each under its own count, the bad JSON line named in a warning; non-UTF-8 bytes are
    replaced and counted, the row kept; blank lines are not rows; a long row is truncated."""
    good = _instruction_rows(10)
    lines = [json.dumps(r).encode() for r in good]
    lines += [
        json.dumps({"instruction": "no response"}).encode(),  # missing_field
        json.dumps({"instruction": "null", "response": None}).encode(),  # missing_field
        json.dumps({"instruction": "  ", "response": "x"}).encode(),  # empty_text
        json.dumps({"instruction": "i", "response": ""}).encode(),  # empty_text
        json.dumps({"instruction": "i", "response": 7}).encode(),  # bad_type
        json.dumps({"instruction": "i", "context": ["x"], "response": "r"}).encode(),  # bad_type
        b'{"instruction": "broken", "response": ',  # bad_json (line 17)
        b"[1, 2, 3]",  # bad_json: not an object
        b"",  # blank: not a row
        b'{"instruction": "caf\xe9 \xff", "response": "ok"}',  # bad_utf8, kept
        json.dumps({"instruction": "long", "response": "word " * 300}).encode(),  # truncated
    ]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="lorax.data.causal"):
        t = data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=2)
    c = t.counts
    assert c["train/file_rows"] == 20
    assert c["train/skipped_missing_field"] == 2
    assert c["train/skipped_empty_text"] == 2
    assert c["train/skipped_bad_type"] == 2
    assert c["train/skipped_bad_json"] == 2
    assert c["train/bad_utf8"] == 1
    usable = 10 + 2  # the good rows, the bad-UTF-8 row and the long row
    assert c["train/rows"] + c["validation/rows"] + c["test/rows"] == usable
    assert (c["validation/rows"], c["test/rows"]) == (2, 2)  # no test.jsonl: held out too
    assert sum(c[f"{s}/truncated"] for s in ("train", "validation", "test")) == 1
    assert re.search(r"train.jsonl line 17: skipped: invalid JSON", caplog.text)
    assert "train.jsonl line 18: skipped: a JSON list, not an object" in caplog.text
    texts = [
        tok.decode(x) for s in t.splits.values() for x in s.input_ids if "caf" in tok.decode(x)
    ]
    assert len(texts) == 1 and "caf\ufffd \ufffd" in texts[0]


def test_truncation_cuts_response_then_prompt_and_keeps_bos(tmp_path):
    """A long response is cut from the right (no eos, prompt intact); a prompt that leaves
    no room is cut from its left (after the BOS) down to max_length - 1, keeping one response
    token; each counts as truncated; nothing exceeds max_length."""
    tok = _tokenizer(bos=True)
    rows = [
        {"instruction": "short", "response": "tenalp " * 100},
        {"instruction": "planet " * 100, "response": "ok fine"},
        {"instruction": "short", "response": "ok"},
    ]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows)
    t = data.load_task("instructions", tmp_path, tok, max_length=40, validation_size=1)
    assert t.counts["test/truncated"] == 2
    assert t.counts["train/truncated"] + t.counts["validation/truncated"] == 2
    (long_resp, long_prompt, short), masks = t.splits["test"].input_ids, t.splits["test"].loss_mask
    prompt0 = [BOS] + _ids(tok, "Instruction:\nshort\n\nResponse:\n")
    assert len(long_resp) == 40 and long_resp[: len(prompt0)].tolist() == prompt0
    assert EOS not in long_resp.tolist() and masks[0].sum() == 40 - len(prompt0)
    assert len(long_prompt) == 40 and long_prompt[0] == BOS and masks[1].sum() == 1
    full = _ids(tok, "Instruction:\n" + "planet " * 100 + "\n\nResponse:\n")
    assert long_prompt[1:-1].tolist() == full[-38:]
    assert long_prompt[-1] == _ids(tok, "ok fine")[0]
    assert short.tolist() == prompt0 + _ids(tok, "ok") + [EOS]


def test_validation_and_test_hold_outs_are_fixed_and_disjoint(tmp_path, tok):
    """Without test.jsonl the test split is a second fixed hold-out; the validation rows are
    the same with or without a test file, and no row is in two splits."""
    _write_jsonl(tmp_path / "train.jsonl", _instruction_rows(40))
    key = lambda ex: [tuple(x) for x in ex.input_ids]
    a = data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=5)
    b = data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=5)
    for s in ("train", "validation", "test"):
        assert key(a.splits[s]) == key(b.splits[s])
    val, test, train = (set(key(a.splits[s])) for s in ("validation", "test", "train"))
    assert (len(val), len(test), len(train)) == (5, 5, 30)
    assert not val & test and not val & train and not test & train
    assert "test/file_rows" not in a.counts
    _write_jsonl(tmp_path / "test.jsonl", _instruction_rows(3, offset=100))
    c = data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=5)
    assert key(c.splits["validation"]) == key(a.splits["validation"])
    assert len(c.splits["train"]) == 35 and c.counts["test/file_rows"] == 3


def test_hold_out_sizes_and_missing_files_are_errors(tmp_path, tok):
    """validation_size must leave training rows (twice held out without a test file), and a
    missing train.jsonl names the file and what the task needs."""
    with pytest.raises(FileNotFoundError, match=r"train.jsonl does not exist"):
        data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=1)
    _write_jsonl(tmp_path / "train.jsonl", _instruction_rows(10))
    with pytest.raises(ValueError, match=r"validation_size = 5 must be in 0..4 .*no test file"):
        data.load_task("instructions", tmp_path, tok, max_length=64, validation_size=5)
    with pytest.raises(ValueError, match=r"max_length = 1 leaves no room"):
        data.load_task("instructions", tmp_path, tok, max_length=1, validation_size=1)


def test_unknown_task_lists_every_task(tok, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"task.name = 'nope' .*\['instructions', 'pair_classification', 'preferences', "
        r"'rotten_tomatoes', 'snli', 'snli_text', 'text', 'text_classification'\]",
    ):
        data.load_task("nope", tmp_path, tok, max_length=64, validation_size=1)


# ------------------------------------------------------------------------------------------
# The shipped instruction set


def test_shipped_instructions_load_cleanly(tok):
    """The packaged set has 600 train and 100 test rows, none skipped or cut at 128 tokens."""
    t = data.load_task(
        "instructions", data.INSTRUCTIONS_TINY_DIR, tok, max_length=128, validation_size=50
    )
    c = t.counts
    assert (c["train/file_rows"], c["test/file_rows"]) == (600, 100)
    assert (c["train/rows"], c["validation/rows"], c["test/rows"]) == (550, 50, 100)
    assert not any(v for k, v in c.items() if "skipped" in k or "truncated" in k or "utf8" in k)


def test_shipped_instructions_are_correct_and_test_inputs_disjoint():
    """Every row's answer checks out, and no test input (instruction + context) is in train."""
    from experiments.make_instructions import plural

    splits = {}
    for name in ("train", "test"):
        path = data.INSTRUCTIONS_TINY_DIR / f"{name}.jsonl"
        splits[name] = [json.loads(line) for line in path.read_text().splitlines()]
    for row in splits["train"] + splits["test"]:
        ins, resp, ctx = row["instruction"], row["response"], row.get("context", "")
        arg = ins.split(": ", 1)[-1]
        if ins.startswith("Reverse"):
            assert resp == arg[::-1]
        elif ins.startswith("Write the plural"):
            assert resp == plural(arg)
        elif ins.startswith("Capitalize"):
            assert resp == arg.title()
        elif ins.startswith("Sort"):
            assert resp == ", ".join(map(str, sorted(int(x) for x in arg.split(", "))))
        elif ins.startswith("What is"):
            a, b = re.fullmatch(r"What is (\d+) plus (\d+)\?", ins).groups()
            assert resp == str(int(a) + int(b))
        else:
            assert ins == "Count the words in the input." and resp == str(len(ctx.split()))
    key = lambda r: (r["instruction"], r.get("context", ""))
    assert not {key(r) for r in splits["train"]} & {key(r) for r in splits["test"]}


def test_generator_reproduces_the_shipped_files(tmp_path):
    """experiments/make_instructions.py writes the shipped files byte for byte."""
    from experiments import make_instructions

    make_instructions.write(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (data.INSTRUCTIONS_TINY_DIR / name).read_bytes()


# ------------------------------------------------------------------------------------------
# snli_text


def _snli_row(s1, s2, label):
    return {"sentence1": s1, "sentence2": s2, "gold_label": label}


@pytest.fixture
def snli_dir(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    train = [
        _snli_row(f"A man {i} walks.", f"A person {i} moves.", labels[i % 3]) for i in range(20)
    ]
    train.insert(7, _snli_row("x", "y", "-"))
    test = [
        _snli_row("A dog runs.", "An animal moves.", "entailment"),
        _snli_row("p", "q", "-"),
        _snli_row("long " * 200, "short.", "neutral"),
    ]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    return tmp_path


CHOICES = (" True", " Neither", " False")


def test_snli_text_prompts_choices_and_splits(snli_dir, tok):
    """Rows without a gold label are skipped as in the snli task; test and validation are
    ChoiceExamples with the GPT-3 NLI prompt and the choices ' True'/' Neither'/' False' in
    label order; validation holds the rows tasks.hold_out picks (as the snli task does); train
    is each prompt + its correct choice, the loss on the choice tokens only."""
    t = data.load_task("snli_text", snli_dir, tok, max_length=48, validation_size=4)
    c = t.counts
    assert c["train/skipped_no_gold_label"] == 1 and c["test/skipped_no_gold_label"] == 1
    assert (c["train/rows"], c["validation/rows"], c["test/rows"]) == (16, 4, 2)
    assert t.label_names == ("entailment", "neutral", "contradiction")
    test, val, train = (t.splits[s] for s in ("test", "validation", "train"))
    assert isinstance(test, data.ChoiceExamples) and isinstance(val, data.ChoiceExamples)
    assert test.labels.tolist() == [0, 1]
    expected = "A dog runs.\nQuestion: An animal moves. True, False, or Neither?\nAnswer:"
    assert test.prompts[0].tolist() == _ids(tok, expected)
    assert [x.tolist() for x in test.choices] == [_ids(tok, x) for x in CHOICES]
    held, kept = data.tasks.hold_out(20, [4])
    for i, prompt, label in zip(held, val.prompts, val.labels, strict=True):
        assert tok.decode(prompt).startswith(f"A man {i} walks.\nQuestion: A person {i} moves.")
        assert label == i % 3
    assert isinstance(train, data.CausalExamples) and len(train) == len(kept)
    for i, ids, mask in zip(kept, train.input_ids, train.loss_mask, strict=True):
        text = f"A man {i} walks.\nQuestion: A person {i} moves. True, False, or Neither?\nAnswer:"
        prompt, choice = _ids(tok, text), _ids(tok, CHOICES[i % 3])
        assert ids[: len(prompt)].tolist() == prompt
        assert len(ids) == len(prompt) + len(choice)
        assert ids[len(prompt) :].tolist() == choice  # no eos after the choice
        assert mask.tolist() == [0] * (len(ids) - len(choice)) + [1] * len(choice)


def test_snli_text_cuts_long_premises_from_the_left(snli_dir, tok):
    """A prompt that would not fit max_length with the longest choice keeps its last
    max_length - longest-choice tokens (the premise loses its start) and is counted."""
    t = data.load_task("snli_text", snli_dir, tok, max_length=48, validation_size=4)
    assert (t.counts["test/truncated"], t.counts["train/truncated"]) == (1, 0)
    test = t.splits["test"]
    room = 48 - max(len(x) for x in test.choices)
    full = _ids(tok, "long " * 200 + "\nQuestion: short. True, False, or Neither?\nAnswer:")
    assert test.prompts[1].tolist() == full[-room:]


# ------------------------------------------------------------------------------------------
# PackedBatcher


def _causal_examples(n=60, seed=0, low=2, high=20):
    """Example i starts with token 1000 + i (identifiable); its mask is 1 on the second half."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, n)
    ids = [
        np.r_[1000 + i, rng.integers(3, 900, L - 1)].astype(np.int32) for i, L in enumerate(lengths)
    ]
    masks = [np.r_[np.zeros(L // 2), np.ones(L - L // 2)].astype(np.int32) for L in lengths]
    return data.CausalExamples(ids, masks)


def _check_packed(batch, ex, B, T, pad_id):
    """Asserts the packed-batch contract; returns the example indices of its segments."""
    assert set(batch) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
    for k, v in batch.items():
        assert v.shape == (B, T), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    seen = []
    for b in range(B):
        seg = batch["segment_ids"][b]
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and not seg[n:].any()  # real tokens first, then padding
        assert (batch["input_ids"][b, n:] == pad_id).all()
        for k in ("targets", "loss_mask", "positions"):
            assert not batch[k][b, n:].any(), k
        if n == 0:
            continue  # an all-padding row
        ids_at = np.flatnonzero(np.diff(np.r_[0, seg[:n]]))  # segment starts
        assert seg[:n][ids_at].tolist() == list(range(1, len(ids_at) + 1))
        for s, (start, end) in enumerate(zip(ids_at, [*ids_at[1:], n], strict=True), start=1):
            assert (seg[start:end] == s).all()
            i = int(batch["input_ids"][b, start]) - 1000
            x, m = ex.input_ids[i], ex.loss_mask[i]
            assert end - start == len(x)
            np.testing.assert_array_equal(batch["input_ids"][b, start:end], x)
            np.testing.assert_array_equal(batch["positions"][b, start:end], np.arange(len(x)))
            np.testing.assert_array_equal(batch["targets"][b, start : end - 1], x[1:])
            np.testing.assert_array_equal(batch["loss_mask"][b, start : end - 1], m[1:])
            assert batch["targets"][b, end - 1] == 0 and batch["loss_mask"][b, end - 1] == 0
            seen.append(i)
    return seen


def test_packed_eval_batches_hold_every_example_once():
    """Eval batches have fixed shapes, segments that never cross, targets and loss_mask
    shifted by one within each segment (0 at its end), positions restarting per segment,
    and every token of every example exactly once; count_lm_tokens counts real tokens."""
    ex = _causal_examples(53)
    batcher = data.PackedBatcher(ex, 4, 32, seed=0, pad_id=7)
    seen, tokens = [], 0
    for batch in batcher.eval_batches():
        seen += _check_packed(batch, ex, 4, 32, pad_id=7)
        tokens += data.count_lm_tokens(batch)
    assert sorted(seen) == list(range(53))
    assert tokens == sum(len(x) for x in ex.input_ids)


def test_packed_train_batch_is_a_function_of_seed_and_step():
    """train_batch(step) is the same on a fresh batcher in any call order; epochs hold
    steps_per_epoch full batches without repeats, in a different order each epoch; another
    seed gives other batches."""
    ex = _causal_examples(80)
    a = data.PackedBatcher(ex, 4, 32, seed=1, pad_id=0)
    b = data.PackedBatcher(ex, 4, 32, seed=1, pad_id=0)
    other = data.PackedBatcher(ex, 4, 32, seed=2, pad_id=0)
    spe = a.steps_per_epoch
    assert spe >= 3
    sequential = [a.train_batch(s) for s in range(3 * spe)]
    for s in (5, 0, 3 * spe - 1, 2, spe + 1):
        for k, v in b.train_batch(s).items():
            np.testing.assert_array_equal(v, sequential[s][k])
    epochs = []
    for e in range(2):
        seen = []
        for s in range(e * spe, (e + 1) * spe):
            seen += _check_packed(sequential[s], ex, 4, 32, pad_id=0)
        assert len(seen) == len(set(seen)) and len(seen) > 0.8 * len(ex)
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert any(
        not np.array_equal(sequential[s]["input_ids"], other.train_batch(s)["input_ids"])
        for s in range(spe)
    )


def test_packing_is_dense():
    """Best-fit packing of 1000 examples of 5..40 tokens into rows of 64 needs at most 5% more
    rows than the tokens strictly need, and fewer than next-fit (start a row when full)."""
    ex = _causal_examples(1000, low=5, high=40)
    lengths = [len(x) for x in ex.input_ids]
    rows = len(list(data.PackedBatcher(ex, 1, 64, seed=0, pad_id=0).eval_batches()))
    next_fit, room = 1, 64
    for n in lengths:
        next_fit, room = (next_fit + 1, 64 - n) if n > room else (next_fit, room - n)
    assert rows <= 1.05 * sum(lengths) / 64 and rows < next_fit, (rows, sum(lengths) / 64)


def test_packed_batcher_errors():
    """An example longer than seq_len, and training with fewer rows than one batch, are
    errors naming the fix."""
    ex = _causal_examples(10, high=40)
    with pytest.raises(
        ValueError, match=r"example \d+ has \d+ tokens; .*task.max_length <= seq_len"
    ):
        data.PackedBatcher(ex, 2, 16, seed=0, pad_id=0)
    small = data.PackedBatcher(_causal_examples(3), 8, 64, seed=0, pad_id=0)
    assert small.steps_per_epoch == 0 and len(list(small.eval_batches())) == 1
    with pytest.raises(ValueError, match=r"no full training batch of 8 rows"):
        small.train_batch(0)


# ------------------------------------------------------------------------------------------
# ChoiceBatcher and train_examples


def _choice_examples(n=7):
    rng = np.random.default_rng(0)
    prompts = [
        np.r_[1000 + i, rng.integers(3, 900, rng.integers(1, 12))].astype(np.int32)
        for i in range(n)
    ]
    choices = (
        np.array([11], np.int32),
        np.array([12, 13, 14], np.int32),
        np.array([15, 16], np.int32),
    )
    return data.ChoiceExamples(prompts, choices, (np.arange(n) % 3).astype(np.int32))


def test_choice_batcher_rows_and_mask():
    """Row b*C+c is prompt b + choice c, padded to the shortest fitting bucket; loss_mask is 1
    exactly where the target is a choice token, so masked targets spell the choice; padding
    examples have weight 0 and all-pad rows; each example appears once."""
    ex = _choice_examples(7)
    batcher = data.ChoiceBatcher(ex, 2, (8, 16), pad_id=9)
    seen = []
    for batch in batcher.eval_batches():
        R, T = batch["input_ids"].shape
        assert R == 2 * 3 and T in (8, 16)
        assert batch["labels"].shape == batch["weights"].shape == (2,)
        assert batch["loss_mask"].dtype == batch["weights"].dtype == np.float32
        for b in range(2):
            if batch["weights"][b] == 0:
                assert (batch["input_ids"][3 * b : 3 * b + 3] == 9).all()
                assert not batch["loss_mask"][3 * b : 3 * b + 3].any()
                assert not batch["segment_ids"][3 * b : 3 * b + 3].any()
                continue
            i = int(batch["input_ids"][3 * b, 0]) - 1000
            seen.append(i)
            assert batch["labels"][b] == ex.labels[i]
            prompt = ex.prompts[i]
            assert T == min(t for t in (8, 16) if t >= len(prompt) + 3)
            for c, choice in enumerate(ex.choices):
                row = 3 * b + c
                x = np.r_[prompt, choice]
                n = len(x)
                np.testing.assert_array_equal(batch["input_ids"][row, :n], x)
                assert (batch["input_ids"][row, n:] == 9).all()
                np.testing.assert_array_equal(batch["targets"][row, : n - 1], x[1:])
                assert not batch["targets"][row, n - 1 :].any()
                mask = batch["loss_mask"][row]
                assert np.flatnonzero(mask).tolist() == list(range(len(prompt) - 1, n - 1))
                np.testing.assert_array_equal(batch["targets"][row][mask == 1], choice)
                assert batch["segment_ids"][row].tolist() == [1] * n + [0] * (T - n)
                np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
                assert not batch["positions"][row, n:].any()
    assert sorted(seen) == list(range(7))


def test_choice_batcher_buckets_must_cover_prompt_plus_choice():
    with pytest.raises(ValueError, match=r"do not cover the longest prompt \+ choice"):
        data.ChoiceBatcher(_choice_examples(), 2, (8,), pad_id=0)


def test_train_examples_append_the_correct_choice_without_eos():
    """train_examples trains on prompt + correct choice with the mask exactly on the choice:
    the same tokens the ChoiceBatcher scores."""
    ex = _choice_examples(6)
    train = data.train_examples(ex)
    for i in range(6):
        choice = ex.choices[ex.labels[i]]
        assert train.input_ids[i].tolist() == ex.prompts[i].tolist() + choice.tolist()
        assert train.loss_mask[i].tolist() == [0] * len(ex.prompts[i]) + [1] * len(choice)
    sub = ex.take([4, 1])
    assert sub.labels.tolist() == [1, 1] and sub.prompts[0][0] == 1004


def test_examples_check_their_shapes():
    with pytest.raises(ValueError, match="example 0 has 3 tokens but 2 mask entries"):
        data.CausalExamples([np.zeros(3, np.int32)], [np.zeros(2, np.int32)])
    with pytest.raises(ValueError, match=r"labels must be in 0..1"):
        data.ChoiceExamples([np.ones(2, np.int32)], (np.ones(1), np.ones(1)), np.array([2]))


def test_task_registry_names_each_task_once():
    """lorax.data.registry dispatches to the classification and the causal tasks alike."""
    assert set(causal.CAUSAL_TASKS) == {"instructions", "snli_text"}
    assert not set(causal.CAUSAL_TASKS) & set(data.TASKS)


def test_instructions_from_any_file_with_the_configs_field_names(tmp_path, tok):
    """task.prompt_field / context_field / response_field name the columns of a CSV (or any
    format); the rows encode exactly as the same rows in the default JSONL layout."""
    import csv

    from helpers import tiny_config

    rows = _instruction_rows(20)
    _write_jsonl(tmp_path / "train.jsonl", rows)
    with open(tmp_path / "chat.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "extra", "answer"])
        w.writeheader()
        w.writerows({"question": r["instruction"], "extra": r.get("context") or "",
                     "answer": r["response"]} for r in rows)  # fmt: skip
    config = tiny_config("unused", str(tmp_path / "chat.csv")).task
    config.name = "instructions"
    config.prompt_field, config.context_field, config.response_field = "question", "extra", "answer"
    ours = data.load_task("instructions", None, tok, max_length=128, validation_size=2,
                          task_config=config)  # fmt: skip
    reference = data.load_task("instructions", tmp_path, tok, max_length=128, validation_size=2)
    for split in ("train", "validation", "test"):
        a, b = ours.splits[split], reference.splits[split]
        assert [x.tolist() for x in a.input_ids] == [x.tolist() for x in b.input_ids], split
    config.response_field = "reply"
    with pytest.raises(ValueError, match=r"no row has the field\(s\) \['reply'\]"):
        data.load_task("instructions", None, tok, max_length=128, validation_size=2,
                       task_config=config)  # fmt: skip

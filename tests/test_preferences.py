"""Preference pairs (lorax/data/preferences.py): reading, skipping, tokenizing, batching."""

import json

import numpy as np
import pytest

from lorax import data
from tests.test_causal_data import _tokenizer

EOS, PAD, BOS = 1, 0, 2


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pairs(n, offset=0):
    return [
        {"prompt": f"What is {i} plus {i}?", "chosen": str(2 * i), "rejected": f"{2 * i + 1} ok"}
        for i in range(offset, offset + n)
    ]


def _task_config(**fields):
    import ml_collections

    from configs import base

    c = base.get_config().task
    c.name = "preferences"
    c.update(fields)
    return ml_collections.ConfigDict(c.to_dict())


def _load(tok, path, max_length=64, validation_size=2, **fields):
    return data.load_task(
        "preferences", None, tok, max_length=max_length, validation_size=validation_size,
        task_config=_task_config(data=str(path), **fields),
    )  # fmt: skip


def test_pairs_are_prompt_then_each_response_and_eos(tmp_path, tok):
    """Each pair's rows are exactly the prompt's tokens followed by the separately tokenized
    chosen (or rejected) response and the eos; validation and test are held out of train."""
    rows = _pairs(20)
    _write_jsonl(tmp_path / "train.jsonl", rows)
    t = _load(tok, tmp_path / "train.jsonl", validation_size=3)
    assert [t.counts[f"{s}/rows"] for s in ("train", "validation", "test")] == [14, 3, 3]
    by_prompt = {r["prompt"]: r for r in rows}
    seen = []
    for split in ("train", "validation", "test"):
        ex = t.splits[split]
        for p, c, r in zip(ex.prompts, ex.chosen, ex.rejected, strict=True):
            text = tok.decode(p)
            seen.append(text)
            assert list(c) == _ids(tok, by_prompt[text]["chosen"]) + [EOS]
            assert list(r) == _ids(tok, by_prompt[text]["rejected"]) + [EOS]
            assert list(p) == _ids(tok, text)
    assert sorted(seen) == sorted(by_prompt)  # every pair in exactly one split


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    rows = _pairs(10) + [
        {"prompt": "a", "chosen": "b"},  # missing rejected
        {"prompt": "a", "chosen": "b", "rejected": None},  # null
        {"prompt": "a", "chosen": 3, "rejected": "b"},  # not a string
        {"prompt": " ", "chosen": "b", "rejected": "c"},  # blank
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "word " * 80, "chosen": "b", "rejected": "c"},  # prompt too long
        {
            "prompt": "short",
            "chosen": "x " * 40 + "y",
            "rejected": "x " * 40 + "z",
        },  # equal once cut
        {"prompt": "short", "chosen": "long " * 40, "rejected": "no"},  # cut, kept
    ]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    t = _load(tok, tmp_path / "train.jsonl", max_length=32, validation_size=3)
    c = t.counts
    assert c["train/skipped_missing_field"] == 2
    assert c["train/skipped_bad_type"] == 1
    assert c["train/skipped_empty_text"] == 1
    assert sum(c[f"{s}/skipped_same_response"] for s in ("train", "validation", "test")) == 2
    assert sum(c[f"{s}/skipped_prompt_too_long"] for s in ("train", "validation", "test")) == 1
    assert sum(c[f"{s}/truncated"] for s in ("train", "validation", "test")) == 1
    assert sum(c[f"{s}/rows"] for s in ("train", "validation", "test")) == 11, c
    for split in ("train", "validation", "test"):
        ex = t.splits[split]
        for p, ch, rj in zip(ex.prompts, ex.chosen, ex.rejected, strict=True):
            assert len(p) + max(len(ch), len(rj)) <= 32 and list(ch) != list(rj)


def test_field_names_chat_template_and_errors(tmp_path, tok):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in _pairs(10)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"no row has the field\(s\) \['prompt', 'chosen', "
                                         r"'rejected'\].*task.pair_fields"):  # fmt: skip
        _load(tok, tmp_path / "train.jsonl")
    fields = {"pair_fields": ("q", "good", "bad")}
    t = _load(tok, tmp_path / "train.jsonl", **fields)
    assert t.counts["train/rows"] == 6
    with pytest.raises(ValueError, match="task.chat_template = True but the tokenizer has no"):
        _load(tok, tmp_path / "train.jsonl", chat_template=True, **fields)
    tok.chat_template = "{% for m in messages %}<bos>U: {{ m['content'] }}\n{% endfor %}A:"
    try:
        t = _load(tok, tmp_path / "train.jsonl", chat_template=True, **fields)
    finally:
        tok.chat_template = None
    ex = t.splits["train"]
    assert tok.decode(ex.prompts[0]).startswith("<bos>U: What is ")
    assert tok.decode(ex.prompts[0]).endswith("?\nA:")
    with pytest.raises(ValueError, match=r"task.validation_size = 9 must be in 0..4"):
        _load(tok, tmp_path / "train.jsonl", validation_size=9, **fields)


def test_batches_interleave_chosen_and_rejected_with_response_masks(tmp_path, tok):
    """Row 2i is pair i's chosen row, 2i+1 its rejected row; the loss mask picks exactly the
    positions whose target is a response token; last_index is each row's eos; an eval batch
    is filled with zero-weight all-padding pairs."""
    _write_jsonl(tmp_path / "train.jsonl", _pairs(11))
    t = _load(tok, tmp_path / "train.jsonl", validation_size=1)
    ex = t.splits["train"]
    batcher = data.make_batcher(ex, 4, _task_config(buckets=(8, 16, 64)), seed=0, pad_id=PAD)
    assert isinstance(batcher, data.PairBatcher) and batcher.steps_per_epoch == 2
    batches = list(batcher.eval_batches())
    assert len(batches) == 3 and [b["weights"].sum() for b in batches] == [4, 4, 1]
    seen = 0
    for b in batches:
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in (8, 16, 64)
        for i in range(int(b["weights"].sum())):
            k = seen + i
            for row, response in ((2 * i, ex.chosen[k]), (2 * i + 1, ex.rejected[k])):
                x = np.concatenate([ex.prompts[k], response])
                n = len(x)
                np.testing.assert_array_equal(b["input_ids"][row, :n], x)
                assert (b["input_ids"][row, n:] == PAD).all()
                np.testing.assert_array_equal(b["targets"][row, : n - 1], x[1:])
                masked = b["targets"][row][b["loss_mask"][row] > 0]
                np.testing.assert_array_equal(masked, response)
                assert b["last_index"][row] == n - 1 and b["input_ids"][row, n - 1] == EOS
                np.testing.assert_array_equal(
                    b["segment_ids"][row], np.arange(b["input_ids"].shape[1]) < n
                )
                np.testing.assert_array_equal(b["positions"][row, :n], np.arange(n))
        seen += int(b["weights"].sum())
    padding = batches[-1]
    assert padding["loss_mask"][2:].sum() == 0 and padding["segment_ids"][2:].sum() == 0
    # training batches: a function of (seed, step) alone, every pair once per epoch
    again = data.make_batcher(ex, 4, _task_config(buckets=(8, 16, 64)), seed=0, pad_id=PAD)
    for step in range(5):
        a, b = batcher.train_batch(step), again.train_batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a) and a["weights"].all()


def test_objective_and_task_must_agree():
    from configs import base
    from lorax import setup as setup_lib

    c = base.get_config()
    c.task.name = "preferences"
    match = r"'preferences' holds preference pairs, which train.objective = 'lm' cannot train"
    with pytest.raises(ValueError, match=match):
        setup_lib.check_objective(c)
    c.train.objective = "ppo"
    with pytest.raises(ValueError, match=r"train.objective = 'ppo' is not valid; choose one of"):
        setup_lib.check_objective(c)


def test_shipped_preference_pairs_are_the_instruction_sets_answers_against_wrong_ones():
    """lorax/data/files/preferences_tiny (experiments/make_preferences.py): every prompt is an
    instruction set prompt, chosen is its reference answer, rejected a different (wrong) one;
    train pairs come from the instruction train rows, test pairs from its test rows; the
    config of the README's DPO run loads them without skips or cuts."""
    from configs import smollm2_dpo_r8
    from lorax import assets, checkpoints

    for split in ("train", "test"):
        answers = {}
        with open(data.INSTRUCTIONS_TINY_DIR / f"{split}.jsonl") as f:
            for row in map(json.loads, f):
                prompt = data.format_prompt(row["instruction"], row.get("context") or "")
                answers[prompt] = row["response"]
        with open(data.PREFERENCES_TINY_DIR / f"{split}.jsonl") as f:
            pairs = [json.loads(line) for line in f]
        assert len(pairs) == {"train": 300, "test": 100}[split]
        for pair in pairs:
            assert pair["chosen"] == answers[pair["prompt"]]
            assert pair["rejected"].strip() != pair["chosen"].strip()
    c = smollm2_dpo_r8.get_config()
    tok = checkpoints.load_tokenizer(assets.resolve(c.model.name))
    t = data.load_task(c.task.name, None, tok, max_length=c.task.max_length,
                       validation_size=c.task.validation_size, task_config=c.task)  # fmt: skip
    assert [t.counts[f"{s}/rows"] for s in ("train", "validation", "test")] == [270, 30, 100]
    assert not any(v for k, v in t.counts.items() if "skipped" in k or "truncated" in k)

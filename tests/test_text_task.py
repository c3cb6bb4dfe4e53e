"""Raw-text continued pretraining (task.name = text, lorax/data/text.py): where documents come
from, chunks, documents held out, packing that never attends across documents, and held-out
perplexity checked by hand on a tiny random Llama."""

import csv
import gzip
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import REPO
from test_causal_data import _tokenizer
from test_train_lm import lm_config, smol_tokenizer, tiny_llama_dir  # noqa: F401

from lorax import data, generate
from lorax import setup as setup_lib
from lorax import train as train_lib
from lorax.data import text
from lorax.models import decoder

EOS = 1  # the test tokenizer's <eos>

SPEECHES = [
    "Thank you. Thank you so much. It is an honor to stand here tonight with all of you.",
    "My father worked in a factory for thirty years.\nHe never missed a day of work.",
    "We believe in a country where everyone gets a fair shot and plays by the same rules.",
    "Four years ago we were promised hope and change. Tonight I ask: are you better off?",
    "Small businesses are the backbone of this economy, and they create most of the new jobs.",
    "Good evening. My name is Maria, and I am a teacher from a small town in Ohio.",
]


def _task(path, **fields):
    c = ml_collections.ConfigDict(
        {
            "name": "text",
            "data": str(path),
            "text_field": "text",
            "validation_size": 1.0,
            "test_size": 1.0,
            "max_length": 64,
        }  # fmt: skip
    )
    c.update(fields)
    return c


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    """A .txt file: blank (or whitespace-only) lines separate documents, single newlines do
    not; \\r\\n endings and a compressed file read the same."""
    body = "First doc line one.\nline two.\n\n\nSecond doc.\n  \t\nThird\n\n"
    (tmp_path / "a.txt").write_text(body)
    (tmp_path / "b.txt").write_bytes(body.replace("\n", "\r\n").encode())
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write(body)
    want = ["First doc line one.\nline two.", "Second doc.", "Third"]
    for name in ("a.txt", "b.txt", "c.txt.gz"):
        assert text.read_documents(tmp_path / name, "", {}) == want, name


def test_folder_is_one_document_per_txt_file_and_tables_use_text_field(tmp_path):
    """A folder: each *.txt directly in it is one document, in name order, blank lines kept
    (other files ignored). A csv/jsonl: each row's text_field; bad rows skipped and counted."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("Two paragraphs.\n\nOne document.\n")
    (folder / "a.txt").write_text("First by name.")
    (folder / "notes.md").write_text("not a document")
    counts = {}
    assert text.read_documents(folder, "", counts) == [
        "First by name.",
        "Two paragraphs.\n\nOne document.",
    ]
    assert counts["all/documents"] == 2

    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["speaker", "text"])
        w.writerows([["a", "Hello there.\n\nStill the same speech."], ["b", "  "], ["c", "Bye."]])
    counts = {}
    docs = text.read_documents(tmp_path / "t.csv", "text", counts)
    assert docs == ["Hello there.\n\nStill the same speech.", "Bye."]
    assert counts["train/skipped_empty_text"] == 1 and counts["all/documents"] == 2
    rows = [{"body": "x y"}, {"other": 1}, {"body": 3}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {}
    assert text.read_documents(tmp_path / "t.jsonl", "body", counts) == ["x y"]
    assert counts["train/skipped_missing_field"] == 1 and counts["train/skipped_bad_type"] == 1


def test_text_files_that_are_not_utf8_are_counted_and_named(tmp_path, caplog):
    """A latin-1 .txt trains on U+FFFD where its accents were: counted in data_counts and named
    in a warning (it was silent), as the other tasks count undecodable rows."""
    (tmp_path / "latin1.txt").write_bytes("Un café.\n\nUne crème.\n".encode("latin-1"))
    counts = {}
    with caplog.at_level("WARNING"):
        docs = text.read_documents(tmp_path / "latin1.txt", "", counts)
    assert docs == ["Un caf\ufffd.", "Une cr\ufffdme."]
    assert counts["train/bad_utf8_files"] == 1
    assert "latin1.txt" in caplog.text and "not valid UTF-8" in caplog.text
    (tmp_path / "ok.txt").write_text("Un café.\n", encoding="utf-8")
    counts = {}
    assert text.read_documents(tmp_path / "ok.txt", "", counts) == ["Un café."]
    assert "train/bad_utf8_files" not in counts


def _write(name, content):
    """A maker of ``tmp_path / name`` holding ``content`` (a folder when content is None)."""

    def make(tmp_path):
        path = tmp_path / name
        path.mkdir() if content is None else path.write_text(content)
        return path

    return make


@pytest.mark.parametrize(
    "make, field, message",
    [
        (_write("empty.txt", "\n  \n\n"), "", r"empty\.txt' holds no text"),
        (_write("d", None), "", r"'.*/d' is a folder with no \.txt file"),
        (_write("t.csv", "speaker,body\na,hi\n"), "text",
         r"t\.csv: no row has the field 'text'; its fields: \['body', 'speaker'\]"),
        (_write("t.csv", "text\n \n"), "text", r"t\.csv' holds no text.*task\.text_field = 'text'"),
        (_write("t.csv", "text\nhi\n"), "", r"t\.csv' is a table: set task\.text_field"),
        (_write("t.xml", "<a/>"), "text", r"t\.xml: cannot tell its format"),
        (lambda tmp_path: tmp_path / "missing.txt", "", r"'.*/missing\.txt' does not exist"),
    ],
)  # fmt: skip
def test_bad_inputs_are_early_errors_naming_the_path_or_field(tmp_path, tok, make, field, message):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.load_task("text", None, tok, max_length=32, validation_size=1,
                       task_config=_task(path, text_field=field))  # fmt: skip


def test_a_missing_text_source_is_named_before_the_model_loads(tmp_path):
    """The README says a missing path stops the run before any compute; the data were read
    only after the base model loaded (seconds at 135M, minutes at 8B). setup.build now names
    it first: the model here does not exist either."""
    sys.path.insert(0, REPO)
    from configs import smollm2_text_r8
    from lorax import setup as setup_lib

    config = smollm2_text_r8.get_config()
    config.model.name = str(tmp_path / "no-model")
    for source, field, message in [
        (tmp_path / "missing.txt", "text", r"missing\.txt' does not"),
        (_write("t.csv", "text\nhi\n")(tmp_path), "", r"is a table"),
    ]:
        config.task.data, config.task.text_field = str(source), field
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            setup_lib.build(config)
    config.task.data = "political-speeches"  # an asset's name: checked, not resolved
    with pytest.raises(ValueError, match=r"no-model' is neither an existing path"):
        setup_lib.build(config)


def test_long_documents_are_chunks_overlapping_by_one_token():
    """Chunks of at most max_length tokens, chunk k starting at k·(max_length − 1): each token
    but the document's first is a next-token target in exactly one chunk."""
    for n, length in [(1, 4), (2, 4), (4, 4), (5, 4), (7, 4), (10, 4), (11, 2), (100, 16)]:
        doc = list(range(1000, 1000 + n))
        chunks = text.chunk(doc, length)
        assert all(1 <= len(c) <= length for c in chunks)
        assert len(chunks) == 1 or all(len(c) >= 2 for c in chunks)
        targets = [int(t) for c in chunks for t in c[1:]]  # what the batcher trains on
        assert targets == doc[1:], (n, length, chunks)
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert a[-1] == b[0]


def test_splits_hold_out_whole_documents_with_eos_and_every_token_trained(tmp_path, tok):
    """Validation and test are whole documents (the same ones every load, none shared); each
    document is its tokens + eos, and packed batches train on every token but each document's
    first, once (counting through PackedBatcher's loss mask)."""
    (tmp_path / "s.txt").write_text("\n\n".join(SPEECHES * 2))
    config = _task(tmp_path / "s.txt", validation_size=2.0, test_size=0.25, max_length=8)
    loaded = [data.load_task("text", None, tok, max_length=8, validation_size=2,
                             task_config=config) for _ in range(2)]  # fmt: skip
    first = loaded[0]
    assert first.counts["validation/documents"] == 2 and first.counts["test/documents"] == 3
    assert first.counts["train/documents"] == 7
    docs = text.split_documents((tmp_path / "s.txt").read_text())
    tokens = {s: first.counts[f"{s}/tokens"] for s in ("train", "validation", "test")}
    assert sum(tokens.values()) == sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1
                                       for d in docs)  # fmt: skip
    for split, examples in first.splits.items():
        again = loaded[1].splits[split]
        assert all(np.array_equal(a, b) for a, b in zip(examples.input_ids, again.input_ids,
                                                        strict=True))  # fmt: skip
        assert max(len(x) for x in examples.input_ids) == 8  # long documents were chunked
        ends = sum(int(x[-1] == EOS) for x in examples.input_ids)
        assert ends == first.counts[f"{split}/documents"]  # one eos per document, at its end
        batcher = data.PackedBatcher(examples, 4, 8, seed=0, pad_id=0)
        trained = sum(float(b["loss_mask"].sum()) for b in batcher.eval_batches())
        assert trained == tokens[split] - first.counts[f"{split}/documents"]
    with pytest.raises(ValueError, match=r"holding out .* leaves none of the 12 documents"):
        data.load_task("text", None, tok, max_length=8, validation_size=6,
                       task_config=_task(tmp_path / "s.txt", validation_size=6.0,
                                         test_size=6.0))  # fmt: skip


def _text_setup(tmp_path, model_dir, **overrides):
    (tmp_path / "corpus.txt").write_text("\n\n".join(SPEECHES * 3))
    over = {"task.name": "text", "task.data": str(tmp_path / "corpus.txt"),
            "task.validation_size": 3.0, "task.test_size": 2.0, "task.max_length": 48,
            "train.batch_size": 4, "eval_batch_size": 4, "task.max_eval_examples": 0,
            **overrides}  # fmt: skip
    return lm_config(model_dir, **over)


def _alone_gap(setup, batch, segment_ids):
    """Max |logit difference| between each document of a packed row and that document run
    alone, the packed row masked by ``segment_ids`` (through the run's own forward)."""
    forward = setup_lib.make_forward(setup, logits=True)
    trainable = {"head": setup.head, "delta": setup.delta}
    packed = {k: jnp.asarray(v) for k, v in {**batch, "segment_ids": segment_ids}.items()}
    logits = forward(trainable, setup.frozen, packed, None, False)
    gap, docs = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for s in range(1, int(batch["segment_ids"][b].max()) + 1):
            where = np.flatnonzero(batch["segment_ids"][b] == s)
            ids = jnp.asarray(batch["input_ids"][b, where])[None]
            alone = {"input_ids": ids, "positions": jnp.arange(len(where))[None],
                     "segment_ids": jnp.ones_like(ids)}  # fmt: skip
            own = forward(trainable, setup.frozen, alone, None, False)[0]
            gap = max(gap, float(jnp.abs(logits[b, where] - own).max()))
            docs += 1
    return gap, docs


@pytest.mark.slow
def test_packed_documents_never_attend_to_each_other(tiny_llama_dir, tmp_path):  # noqa: F811
    """Each document of a packed text batch gets the logits it gets alone (the run's forward,
    its mask from segment ids). The check has teeth: with the segment ids dropped (one segment
    per row, as packing without them would be) later documents' logits move."""
    setup = setup_lib.build(_text_setup(tmp_path, tiny_llama_dir))
    examples = setup.task.splits["train"]
    batcher = data.PackedBatcher(examples, 2, 96, seed=0, pad_id=setup.pad_id)  # 2 rows of 96
    batch = next(batcher.eval_batches())
    assert batch["segment_ids"].max() >= 3  # rows hold several documents
    gap, docs = _alone_gap(setup, batch, batch["segment_ids"])
    assert docs >= 6 and gap < 1e-5, gap
    dropped, _ = _alone_gap(setup, batch, (batch["segment_ids"] > 0).astype(np.int32))
    assert dropped > 1e-2, dropped


@pytest.mark.slow
def test_held_out_perplexity_is_exp_of_the_mean_token_loss_by_hand(
    tiny_llama_dir,  # noqa: F811
    tmp_path,
):
    """A short text run's summary: validation/test loss, next-token accuracy and perplexity
    equal what numpy computes from the trained model run on each held-out chunk alone
    (log-softmax, mean over every next token, exp); lorax.generate decodes with the adapter."""
    config = _text_setup(tmp_path, tiny_llama_dir, **{"train.num_steps": 4, "checkpoint_every": 0})
    workdir = str(tmp_path / "run")
    summary = train_lib.train_and_evaluate(config, workdir)
    setup, params = generate.load_for_generation(config, workdir)
    held_out = data.load_task("text", None, setup.tokenizer, max_length=48, validation_size=3,
                              task_config=config.task).splits  # fmt: skip
    for split in ("validation", "test"):
        nll, hits = [], []
        for ids in held_out[split].input_ids:
            x = jnp.asarray(ids)[None]
            mask = decoder.causal_mask(jnp.ones_like(x))
            logits, _ = setup.model.apply({"params": params}, x, jnp.arange(len(ids))[None], mask)
            z = np.asarray(logits[0, :-1], np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll.extend(-logp[np.arange(len(ids) - 1), ids[1:]])
            hits.extend(z.argmax(-1) == ids[1:])
        assert summary[f"{split}_examples"] == len(nll)
        np.testing.assert_allclose(summary[f"{split}_loss"], np.mean(nll), rtol=1e-5)
        np.testing.assert_allclose(summary[f"{split}_perplexity"], np.exp(np.mean(nll)), rtol=1e-5)
        assert summary[f"{split}_accuracy"] == pytest.approx(np.mean(hits), abs=1e-9)
    assert summary["data_counts"]["validation/documents"] == 3
    prompt = setup.tokenizer("Thank you. Thank you so")["input_ids"]
    kw = dict(max_new_tokens=5, pad_id=setup.pad_id, eos_id=setup.tokenizer.eos_token_id)
    out = generate.generate(setup.model, params, [prompt], **kw)
    assert 1 <= len(out[0]) <= 5


def test_readme_continued_pretraining_numbers_are_the_committed_runs():
    """The README's before/after table and generations are the committed runs' (summary.json of
    the base at learning rate 0 and of the trained adapter; generate.txt)."""
    results = os.path.join(REPO, "experiments", "results", "smollm2_text_r8")
    summaries = {}
    for name in ("base", "trained"):
        with open(os.path.join(results, name, "summary.json")) as f:
            summaries[name] = json.load(f)
    assert summaries["base"]["config"]["train"]["learning_rate"] == 0
    assert summaries["trained"]["config"]["task"]["name"] == "text"
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Continued pretraining on your own text") :]
    rows = {}
    for line in section.splitlines()[:80]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3:
            rows[cells[0]] = cells[1:]
    for split in ("validation", "test"):
        for metric, digits in (("perplexity", 2), ("next-token accuracy", 3)):
            key = f"{split}_{metric.split()[-1]}"
            want = [f"{summaries[n][key]:.{digits}f}" for n in ("base", "trained")]
            assert rows[f"{split} {metric}"] == want, (split, metric)
    with open(os.path.join(results, "generate.txt")) as f:
        generated = " ".join(f.read().split())
    prompts = [(k, *v) for k, v in rows.items() if k.startswith("Good evening")]
    assert len(prompts) == 2
    for prompt, *continuations in prompts:
        for cell in continuations:
            shown = cell.split("…")[0]  # a long repetition is cut short with "…"
            assert " ".join(f"{prompt} {shown}".split()) in generated, (prompt, cell)

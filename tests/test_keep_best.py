"""Training options a user expects (issue 29): train.keep_best keeps, reports and exports the
best checkpoint (through a kill and a resume), task.class_weights weights the loss as
PyTorch's weighted cross-entropy, and log.tensorboard writes the metrics as TensorBoard events
that TensorBoard's own reader reads back."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, train_until_interrupted

from experiments.sweep import apply_overrides
from lorax import evaluate, loop, runs
from lorax import setup as setup_lib
from lorax import train as train_lib
from lorax.checkpoints import best as best_lib
from lorax.checkpoints.state import Checkpointer

WORDS = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "boring", "dull"]}


def _csv(path, n=96, neg_every=3):
    """Rows of two classes, one of them rarer (every ``neg_every``-th row is neg)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        for i in range(n):
            label = "neg" if i % neg_every == 0 else "pos"
            w.writerow({"text": f"a {WORDS[label][i % 3]} film {i}", "label": label})
    return path


def _config(model_dir, data, **overrides):
    base = {"task.name": "text_classification", "task.data": str(data),
            "task.validation_size": 16, "task.test_size": 16}  # fmt: skip
    return tiny_config(model_dir, "", **{**base, **overrides})


# --------------------------------------------------------------------------- keep_best


def test_keep_best_names_a_bad_metric_and_needs_periodic_evaluations():
    best_lib.check("", "classify", 0)  # off: nothing to check
    best_lib.check("validation_macro_f1", "classify", 10)
    with pytest.raises(
        ValueError,
        match=r"keep_best = 'validation_f1' is not valid.*"
        r"'validation_accuracy', 'validation_loss', 'validation_macro_f1'",
    ):
        best_lib.check("validation_f1", "classify", 10)  # fmt: skip
    with pytest.raises(ValueError, match=r"'validation_perplexity' is not valid"):
        best_lib.check("validation_perplexity", "classify", 10)
    with pytest.raises(ValueError, match=r"periodic validation evaluations; set eval_every > 0"):
        best_lib.check("validation_accuracy", "classify", 0)


def test_keep_best_is_checked_against_what_the_tasks_validation_reports(tmp_path):
    """snli_text's validation is scored by its choices' likelihoods: no perplexity (this used
    to train until the first evaluation, then raise KeyError 'perplexity'), but a confusion
    matrix, hence macro-F1. Refused by setup.build before the model loads or any data is
    read (neither exists here)."""
    from configs import smollm2_instructions_r8

    config = apply_overrides(smollm2_instructions_r8.get_config(), {
        "model.name": str(tmp_path / "no-model-read"), "task.name": "snli_text",
        "task.data": str(tmp_path / "no-data-read"), "eval_every": 2,
        "train.keep_best": "validation_perplexity",
    })  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"keep_best = 'validation_perplexity' is not valid: the validation of task "
        r"'snli_text' \(scored by its choices' likelihoods.*\['validation_accuracy', "
        r"'validation_loss', 'validation_macro_f1'\]",
    ):
        setup_lib.build(config)
    best_lib.check("validation_macro_f1", "lm", 2, "snli_text")
    best_lib.check("validation_perplexity", "lm", 2, "text")
    best_lib.check("validation_perplexity", "lm", 2, "instructions")
    with pytest.raises(ValueError, match=r"'validation_macro_f1' is not valid.* task 'text'"):
        best_lib.check("validation_macro_f1", "lm", 2, "text")
    with pytest.raises(ValueError, match=r"'validation_perplexity' is not valid"):
        best_lib.check("validation_perplexity", "reward", 2, "preferences")
    # a DPO run is of kind "lm" on pairs: its validation reports no perplexity either
    config.task.name, config.train.objective = "preferences", "dpo"
    with pytest.raises(ValueError, match=r"'validation_perplexity' is not valid.*preference pa"):
        setup_lib.build(config)
    best_lib.check("validation_accuracy", "lm", 2, "preferences")


def test_keep_best_keeps_reports_and_exports_the_best_through_a_kill(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The validation loss is scripted low at step 4 (real elsewhere, so the final state's is
    offered too and loses): a run killed after step 5 and resumed keeps step 4's checkpoint,
    reports its validation and test metrics, and load_run (export, predict) reads it; its
    metrics also land in TensorBoard, each step once despite the resume."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scripted = {2: 0.5, 4: 0.01}
    real = loop.Stepper.evaluate

    def evaluate_(self, state, examples, desc=""):
        results = real(self, state, examples, desc)
        step = int(jax.device_get(state["step"])) if "step" in state else None
        if desc == "eval validation" and step in scripted:
            results = [{**results[0], "loss": scripted[step]}]
        return results

    monkeypatch.setattr(loop.Stepper, "evaluate", evaluate_)
    config = _config(tiny_model_dir, _csv(tmp_path / "d.csv"), **{
        "train.keep_best": "validation_loss", "eval_every": 2, "checkpoint_every": 2,
        "keep_checkpoints": 5, "log.tensorboard": True,
    })  # fmt: skip
    workdir = tmp_path / "run"
    train_until_interrupted(config, workdir, 5, monkeypatch)
    assert runs.kept_best(workdir)
    # the line of a kept evaluation shows the kept metric (it showed the accuracy alone)
    assert "(validation_loss 0.0100: kept)" in capsys.readouterr().out
    summary = train_lib.train_and_evaluate(config, str(workdir))
    assert summary["kept_checkpoint"]["step"] == 4
    assert summary["kept_checkpoint"]["value"] == pytest.approx(0.01)
    assert summary["resumed_from"] == 4

    with Checkpointer(workdir, writable=False) as ckpt:
        at = {s: ckpt.restore(None, s)["trainable"] for s in (4, 6)}
    _, _, kept = runs.load_run(workdir)  # what lorax.export and lorax.predict read
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, dict(at[4]))
    differ = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), at[4], at[6])
    )
    assert max(differ) > 0  # step 6 is another model: the kept one is not the last

    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    final_val = [r for r in rows if r["split"] == "validation" and r["step"] == 6]
    assert [r.get("checkpoint_step") for r in final_val] == [None, 4]  # final state, kept one
    assert summary["validation_loss"] == pytest.approx(final_val[1]["loss"])
    assert summary["validation_loss"] != pytest.approx(final_val[0]["loss"])

    acc = EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/accuracy", "validation/loss", "test/accuracy"} <= set(
        acc.Tags()["scalars"]
    )
    train_rows = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == sorted(train_rows) == [1, 2, 3, 4, 5, 6]
    logged = [train_rows[s] for s in sorted(train_rows)]
    np.testing.assert_allclose([e.value for e in events], logged, rtol=1e-6)
    # each session's events open by purging what an earlier one logged past the checkpoint it
    # starts from: a START marker at step 1 (the first), 5 (the resumed one, from step 4)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    starts = [e.step for f in sorted((workdir / "tensorboard").iterdir())
              for e in EventFileLoader(str(f)).Load()
              if e.HasField("session_log") and e.session_log.status == 1]  # fmt: skip
    assert starts == [1, 5]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [e.value for e in acc.Scalars("test/accuracy")] == pytest.approx(
        [r["accuracy"] for r in test_rows]
    )


def test_a_kept_best_checkpoint_holds_the_workdirs_config(tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped after its first kept-best checkpoint (step 2) but before its first regular
    one (step 4) has something trained: a rerun with another config is refused, not started
    afresh beside the old config's best, which it would report and export as its own."""
    config = _config(tiny_model_dir, _csv(tmp_path / "d.csv"), **{
        "train.keep_best": "validation_loss", "eval_every": 2, "checkpoint_every": 4,
    })  # fmt: skip
    workdir = tmp_path / "run"
    train_until_interrupted(config, workdir, 3, monkeypatch)
    assert runs.kept_best(workdir) and not (workdir / "checkpoints" / "2").exists()
    config.train.learning_rate = 1e-3
    with pytest.raises(ValueError, match=r"was started with another config.*learning_rate"):
        train_lib.train_and_evaluate(config, str(workdir))


def test_keep_best_keeps_a_checkpoint_when_evaluations_are_not_finite(tmp_path):
    """A non-finite value (an infinite perplexity) is kept only while nothing else is: the
    run's end, which evaluates and names the kept checkpoint, then always has one (it had
    none, and the end of a run whose every evaluation was non-finite raised a TypeError)."""
    state = {"trainable": {"delta": {"a": np.ones((2, 2), np.float32)}}}
    with best_lib.Best(str(tmp_path), "validation_perplexity") as best:
        assert best.offer(2, {"perplexity": float("inf")}, state)
        assert not best.offer(3, {"perplexity": float("nan")}, state)
        assert best.offer(4, {"perplexity": 7.0}, state)  # any finite value beats it
        assert not best.offer(5, {"perplexity": float("inf")}, state)
        assert not best.offer(6, {"perplexity": 7.0}, state)  # a tie keeps the earlier
        assert best.offer(8, {"perplexity": 6.5}, state)
        assert (best.step, best.value) == (8, 6.5)


def test_a_keep_best_run_resumes_only_on_the_same_periodic_eval_subset():
    """task.max_eval_examples may change on a rerun (it changes no result), except with
    train.keep_best: the kept value was measured on the old subset and the resumed run would
    compare its own on another (e.g. 500 rows against 50)."""
    from lorax import runfiles

    old = {"train": {"keep_best": "validation_loss"}, "task": {"max_eval_examples": 500}}
    new = {"train": {"keep_best": "validation_loss"}, "task": {"max_eval_examples": 50}}
    assert runfiles.config_changes(old, new) == ["task.max_eval_examples: 500 -> 50"]
    old["train"]["keep_best"] = new["train"]["keep_best"] = ""
    assert runfiles.config_changes(old, new) == []


def test_a_multi_adapter_job_refuses_keep_best_before_the_base_loads(tmp_path):
    """The job's refusal came from its host loop, after the base, the data and the stack were
    built; check_compatible (the job's first check) now names it: the model here does not
    exist, so nothing was loaded before."""
    from lorax import multi

    config = _config(tmp_path / "no-model", tmp_path / "no-data", **{
        "train.keep_best": "validation_loss", "eval_every": 2,
    })  # fmt: skip
    with pytest.raises(ValueError, match=r"train.keep_best is for single runs"):
        multi.MultiStepper([config, config], ["a", "b"])


# --------------------------------------------------------------------------- class weights


def test_class_weighted_loss_is_pytorchs_weighted_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=12)
    weights = np.ones(12, np.float32)
    weights[-2:] = 0  # padding rows count for nothing
    cw = np.array([0.5, 2.0, 3.0], np.float32)
    batch = {"labels": jnp.asarray(labels), "weights": jnp.asarray(weights)}
    sums = evaluate.classification_sums(jnp.asarray(logits), batch, class_weights_C=cw)
    theirs = torch.nn.CrossEntropyLoss(weight=torch.tensor(cw))(
        torch.tensor(logits[:10]), torch.tensor(labels[:10])
    )
    assert float(evaluate.train_loss(sums)) == pytest.approx(float(theirs), rel=1e-6)
    plain = torch.nn.CrossEntropyLoss()(torch.tensor(logits[:10]), torch.tensor(labels[:10]))
    assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(float(plain), rel=1e-6)
    unweighted = evaluate.classification_sums(jnp.asarray(logits), batch)
    assert float(evaluate.train_loss(unweighted)) == pytest.approx(float(plain), rel=1e-6)


def test_class_weights_parse_and_errors_name_the_field():
    from ml_collections import ConfigDict

    names = ("neg", "pos")

    def weights(value, labels=None):
        return setup_lib.class_weights(ConfigDict({"class_weights": value}), names, labels)

    assert weights("") is None
    np.testing.assert_allclose(weights("balanced", [0, 1, 1, 1]), [2.0, 2 / 3])
    np.testing.assert_allclose(weights("neg=3"), [3.0, 1.0])
    np.testing.assert_allclose(weights("{'pos': 0.5, 'neg': 2}"), [2.0, 0.5])
    with pytest.raises(ValueError, match=r"'meh' is not one of the classes \['neg', 'pos'\]"):
        weights("meh=2")
    with pytest.raises(ValueError, match=r"weight of 'neg' must be a positive number"):
        weights("neg=-1")
    with pytest.raises(ValueError, match=r"class_weights = 'heavy' is not valid; give 'balanced'"):
        weights("heavy")
    with pytest.raises(ValueError, match=r"classes \['pos'\] have no training row to balance"):
        weights("balanced", [0, 0])
    with pytest.raises(ValueError, match=r"is for classification tasks"):
        setup_lib.class_weights(ConfigDict({"class_weights": "balanced"}), ())


def test_class_weights_reach_the_train_step_from_the_config(tiny_model_dir, tmp_path):
    """A run's setup carries the balanced weights of its training rows, and the train sums
    weight the loss with them; a bad label is refused before the data is read."""
    data = _csv(tmp_path / "d.csv", n=60, neg_every=3)
    setup = setup_lib.build(_config(tiny_model_dir, data, **{"task.class_weights": "balanced"}))
    labels = np.asarray(setup.task.splits["train"].labels)
    counts = np.bincount(labels, minlength=2)
    np.testing.assert_allclose(setup.class_weights, len(labels) / (2 * counts), rtol=1e-6)
    assert setup.class_weights[0] > setup.class_weights[1]  # neg is the rarer class
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)
    batch = {"labels": jnp.asarray(labels[:8]), "weights": jnp.ones(8)}
    sums = setup_lib.train_sums(setup)(logits, batch)
    assert "weighted_loss_sum" in sums
    with pytest.raises(ValueError, match=r"'maybe' is not one of the classes"):
        setup_lib.build(_config(tiny_model_dir, data, **{"task.class_weights": "maybe=2"}))


def test_the_train_step_descends_the_class_weighted_loss():
    """One SGD step of lorax's train step on a linear classifier with class-weighted sums moves
    the weights by PyTorch's gradient of its weighted CrossEntropyLoss."""
    import functools

    import optax

    from lorax import step as step_lib

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, w0 = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=8)
    cw = np.array([4.0, 1.0, 0.25], np.float32)

    def forward(trainable, frozen, batch, key, train):
        return batch["x"] @ trainable["head"]["w"]

    sums_fn = functools.partial(evaluate.classification_sums, class_weights_C=cw)
    train_step = step_lib.make_train_step(forward, optax.sgd(1.0), sums_fn)
    trainable = {"delta": {}, "head": {"w": jnp.asarray(w0)}}
    state = step_lib.fresh_state(trainable, optax.sgd(1.0))
    batch = {"x": jnp.asarray(x), "labels": jnp.asarray(labels), "weights": jnp.ones(8)}
    new, _ = train_step(state, {}, batch, jax.random.key(0))

    w = torch.tensor(w0, requires_grad=True)
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(cw))(torch.tensor(x) @ w,
                                                              torch.tensor(labels))  # fmt: skip
    loss.backward()
    np.testing.assert_allclose(np.asarray(new["trainable"]["head"]["w"]),
                               w0 - w.grad.numpy(), rtol=1e-5, atol=1e-6)  # fmt: skip

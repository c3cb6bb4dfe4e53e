"""DPO (train.objective = "dpo"): TRL's loss on the same log-probs, the reference as the base
with the delta off, step memory, β sweeps as one job, resume, export, config errors."""

import json
import os
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax import evaluate, paths
from tests import test_train_lm
from tests.test_train_lm import lm_config

smol_tokenizer, tiny_llama_dir = (
    test_train_lm.smol_tokenizer,
    test_train_lm.tiny_llama_dir,
)  # fixtures

# ------------------------------------------------------------------------------------------
# The loss against TRL's DPOTrainer


def _trl_loss(loss_type, beta, eps, logits_RTV, targets_RT, mask_RT, ref_R):
    """TRL's own ``DPOTrainer._compute_loss`` on the same per-token log-probs: the trainer's
    loss, its gradient with respect to the logits, and the metrics it logs.

    TRL's batch is [chosen..., rejected...]; ours interleaves, so rows are reordered. Its
    model is a stand-in returning the per-token log-probs (zero off the completion, as its
    fused LM head gives for labels of -100) computed by torch from the same logits.
    """
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    order = np.concatenate([np.arange(0, len(ref_R), 2), np.arange(1, len(ref_R), 2)])
    logits = torch.tensor(np.asarray(logits_RTV)[order], requires_grad=True)
    targets = torch.tensor(np.asarray(targets_RT)[order], dtype=torch.long)
    shift_mask = torch.tensor(np.asarray(mask_RT)[order])[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0][:, :-1]
    r, t = targets.shape
    completion_mask = torch.cat([torch.zeros(r, 1), shift_mask], 1).long()

    def model(**kwargs):
        zeros = torch.zeros(r, t - 1)
        return types.SimpleNamespace(
            log_probs=logp * shift_mask, entropy=zeros, mean_logits=zeros,
            is_top1=zeros.bool(),
        )  # fmt: skip

    accelerator = types.SimpleNamespace(
        device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator,
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ref = torch.tensor(np.asarray(ref_R)[order])
    inputs = {
        "input_ids": targets, "attention_mask": torch.ones(r, t, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": ref[: r // 2],
        "ref_rejected_logps": ref[r // 2 :],
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    grad = np.empty_like(np.asarray(logits_RTV))
    grad[order] = logits.grad.numpy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), grad, metrics


TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")  # fmt: skip


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0), ("ipo", 0.3, 0.0), ("hinge", 0.5, 0.0),
     ("robust", 0.2, 0.15)],
)  # fmt: skip
def test_loss_gradient_and_metrics_equal_trls(loss_type, beta, eps):
    """dpo_sums' loss (loss_sum / count), its gradient with respect to the policy's logits,
    and its metric means equal TRL's DPOTrainer on the same log-probs to 1e-6 (fp32)."""
    pairs, t, v = 6, 9, 13
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2 * pairs, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (2 * pairs, t)).astype(np.int32)
    mask = np.zeros((2 * pairs, t), np.float32)
    for row in range(2 * pairs):  # a prompt of 1-4 tokens, then a response up to the end
        start, end = rng.integers(1, 5), rng.integers(6, t)
        mask[row, start:end] = 1.0
    ref = (rng.normal(0, 3, 2 * pairs) - 12).astype(np.float32)
    batch = {"targets": targets, "loss_mask": mask, "weights": np.ones(pairs, np.float32)}

    def ours(logits):
        sums = evaluate.dpo_sums(
            evaluate.Preferred(logits, jnp.asarray(ref)), batch, beta=beta, loss=loss_type,
            label_smoothing=eps,
        )  # fmt: skip
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits))
    trl_loss, trl_grad, trl_metrics = _trl_loss(loss_type, beta, eps, logits, targets, mask, ref)
    np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=1e-5, atol=1e-6)
    assert np.abs(trl_grad).max() > 1e-3  # a gradient that is there to compare
    for name in TRL_METRICS:
        ours_mean = float(sums[f"{name}_sum"] / sums["count"])
        np.testing.assert_allclose(ours_mean, trl_metrics[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert float(sums["correct"]) == float(sums["rewards/accuracies_sum"])


def test_padding_pairs_count_nothing():
    """A zero-weight pair (the eval batch's filler, all padding) adds nothing, whatever its
    logits hold (NaN included)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 5, 7)).astype(np.float32)
    batch = {"targets": np.ones((4, 5), np.int32), "loss_mask": np.ones((4, 5), np.float32),
             "weights": np.asarray([1.0, 0.0], np.float32)}  # fmt: skip
    ref = jnp.zeros(4)
    one = evaluate.dpo_sums(evaluate.Preferred(jnp.asarray(logits[:2]), ref[:2]),
                            {k: v[:2] if k != "weights" else v[:1] for k, v in batch.items()},
                            beta=0.1)  # fmt: skip
    logits[2:] = np.nan
    both = evaluate.dpo_sums(evaluate.Preferred(jnp.asarray(logits), ref), batch, beta=0.1)
    for k in one:
        np.testing.assert_allclose(float(both[k]), float(one[k]), rtol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------
# DPO runs on a tiny random Llama


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Preference pairs in the instruction layout: the right sum, or a wrong sentence."""
    d = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for name, n in (("train.jsonl", 48), ("test.jsonl", 8)):
        rows = []
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(10, 60, 2))
            rows.append({
                "prompt": f"Instruction:\nWhat is {a} plus {b}?\n\nResponse:\n",
                "chosen": str(a + b),
                "rejected": f"The answer is {a + b + int(rng.integers(1, 9))}.",
            })  # fmt: skip
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def dpo_config(model_dir, pairs_dir, **overrides):
    """configs/smollm2_dpo_r8.py shrunk to seconds on a tiny model."""
    base = {
        "task.name": "preferences", "task.data": str(pairs_dir), "task.max_length": 48,
        "task.buckets": (32, 48), "task.validation_size": 8, "train.objective": "dpo",
        "train.batch_size": 4, "train.num_steps": 6, "train.learning_rate": 1e-2,
        "eval_batch_size": 4, "checkpoint_every": 3, "task.max_eval_examples": 0,
        "dpo.beta": 0.5,
    }  # fmt: skip
    return lm_config(model_dir, **{**base, **overrides})


def _rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def test_dpo_run_starts_at_the_base_learns_and_reports_trls_metrics(
    tiny_llama_dir, pairs_dir, tmp_path
):
    """The reference is the base with the delta off: at step 0 (LoRA's B = 0) policy and
    reference agree, so the first loss is log 2 and every reward 0; training then raises the
    implicit reward's accuracy and margin. The summary holds TRL's metric names for
    validation and test, and the step's memory within 1.1x an SFT step on the same rows."""
    from lorax import train as train_lib

    summary = train_lib.train_and_evaluate(
        dpo_config(tiny_llama_dir, pairs_dir, log_every=1, **{"train.num_steps": 12}),
        str(tmp_path / "run"),
    )
    rows = _rows(tmp_path / "run")
    first = rows[0]
    # equal up to float rounding: the policy's LoRA (B = 0) and the plain base round alike
    np.testing.assert_allclose(first["loss"], np.log(2.0), atol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[name]) < 1e-5, name
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.log(2.0) - 0.05
    assert np.mean([r["rewards/margins"] for r in rows[-3:]]) > 0
    for split in ("validation", "test"):
        for name in TRL_METRICS:
            assert np.isfinite(summary[f"{split}_{name}"]), (split, name)
        assert summary[f"{split}_accuracy"] == summary[f"{split}_rewards/accuracies"]
    assert summary["validation_rewards/margins"] > 0
    ratio = summary["dpo_step_memory_ratio"]
    assert summary["step_memory_bytes"] and summary["sft_step_memory_bytes"]
    assert ratio == summary["step_memory_bytes"] / summary["sft_step_memory_bytes"]
    assert ratio <= 1.1, ratio


def _delta(workdir):
    from lorax import runs

    return paths.flatten(runs.restore_trainable(workdir)["delta"])


@pytest.mark.slow
def test_beta_sweep_as_one_multi_adapter_job_equals_the_single_runs(
    tiny_llama_dir, pairs_dir, tmp_path
):
    """Two DPO adapters of different β trained as one job over one base end where two
    single runs end (adapters and metrics within 1e-5): each adapter's loss used its own β."""
    from lorax import multi
    from lorax import train as train_lib

    betas = (0.1, 2.0)
    # a learning rate at which Adam's normalised steps do not blow float rounding up past 1e-5
    configs = [dpo_config(tiny_llama_dir, pairs_dir, **{"dpo.beta": b, "train.num_steps": 4,
                                                         "train.learning_rate": 2e-3,
                                                         "checkpoint_every": 0})
               for b in betas]  # fmt: skip
    jobs = [str(tmp_path / f"job_{b}") for b in betas]
    together = multi.train_many(configs, jobs)
    for config, job, summary in zip(configs, jobs, together, strict=True):
        alone_dir = str(tmp_path / f"alone_{config.dpo.beta}")
        alone = train_lib.train_and_evaluate(config, alone_dir)
        a, b = _delta(job), _delta(alone_dir)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
        for name in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
            key = f"validation_{name}"
            np.testing.assert_allclose(summary[key], alone[key], atol=1e-5, err_msg=name)
        assert summary["multi_adapter_job"] == 2
    # β changes the result: the two adapters differ
    first, second = (_delta(j) for j in jobs)
    assert max(np.abs(first[k] - second[k]).max() for k in first) > 1e-4


def test_dpo_from_an_sft_adapter_export_and_config_errors(tiny_llama_dir, pairs_dir, tmp_path):
    """dpo.reference = an SFT run: the policy starts from its adapter and the reference is the
    base + that adapter (first loss log 2, not the base's); the DPO adapter exports as PEFT
    and LlamaForCausalLM + PeftModel gives lorax's logits; bad configs fail by name."""
    import peft
    import torch
    import transformers

    from lorax import export, runs
    from lorax import setup as setup_lib
    from lorax import train as train_lib

    sft_dir = str(tmp_path / "sft")
    sft_config = lm_config(tiny_llama_dir, **{"train.num_steps": 3, "checkpoint_every": 0})
    train_lib.train_and_evaluate(sft_config, sft_dir)
    sft = _delta(sft_dir)
    over = {"dpo.reference": sft_dir, "train.num_steps": 3, "log_every": 1}
    config = dpo_config(tiny_llama_dir, pairs_dir, **over)
    setup = setup_lib.build(config)
    start = paths.flatten(jax.tree_util.tree_map(np.asarray, setup.delta))
    for k in sft:
        np.testing.assert_array_equal(start[k], sft[k], err_msg=k)
    dpo_dir = str(tmp_path / "dpo")
    summary = train_lib.train_and_evaluate(config, dpo_dir)
    np.testing.assert_allclose(_rows(dpo_dir)[0]["loss"], np.log(2.0), atol=1e-5)
    assert summary["dpo_step_memory_ratio"] <= 1.1

    # export: PEFT on the transformers model gives our logits
    run_config, run_setup, trainable = runs.load_run(dpo_dir)
    out = export.export_adapter(run_config, run_setup, trainable, tmp_path / "peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = peft.PeftModel.from_pretrained(model, str(out)).eval()
    ids = np.random.default_rng(0).integers(1, 1000, (2, 12)).astype(np.int32)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    from lorax import lora, methods
    from lorax.models import decoder

    params = lora.wrap(run_setup.frozen, trainable["delta"], methods.lora_spec(run_config.lora))
    positions = np.broadcast_to(np.arange(12), ids.shape)
    ours, _ = run_setup.model.apply({"params": params}, ids, positions,
                                    decoder.causal_mask(np.ones_like(ids)))  # fmt: skip
    plain = model.get_base_model()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
    with model.disable_adapter(), torch.no_grad():
        base_logits = plain(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(base_logits - theirs).max() > 1e-3  # the adapter is there

    # errors, each naming its field
    bad = [
        ({"dpo.beta": 0.0}, r"dpo.beta = 0.0 is not valid; it must be a number > 0"),
        ({"dpo.beta": -1.0}, r"dpo.beta = -1.0 is not valid"),
        ({"dpo.loss": "kto"}, r"dpo.loss = 'kto' is not valid; choose one of"),
        ({"dpo.label_smoothing": 0.1}, r"dpo.label_smoothing = 0.1 applies to dpo.loss = 'robust'"),
        ({"task.name": "instructions"}, r"train.objective = 'dpo' trains on preference pairs, "
                                        r"which task.name = 'instructions' does not have"),
        ({"train.objective": "lm"}, r"task.name = 'preferences' holds preference pairs"),
        ({"method": "top_k_layers", "top_k_layers.k": 1}, r"but method = 'top_k_layers' trains"),
        ({"dpo.reference": str(tmp_path)}, r"is not a lorax.train workdir \(no config.json\)"),
        ({"dpo.reference": sft_dir, "lora.rank": 4}, r"has lora = .* this run .*must be equal"),
    ]  # fmt: skip
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            setup_lib.build(dpo_config(tiny_llama_dir, pairs_dir, **overrides))
    other = tmp_path / "other_base"
    other.mkdir()
    cfg = json.loads((tmp_path / "sft" / "config.json").read_text())
    cfg["model"]["name"] = "smollm2-135m"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"was trained on model.name = 'smollm2-135m', not this "
                                         r"run's base"):  # fmt: skip
        setup_lib.build(dpo_config(tiny_llama_dir, pairs_dir, **{"dpo.reference": str(other)}))


@pytest.mark.slow
def test_kill9_dpo_training_then_resume_is_bitwise(tiny_llama_dir, pairs_dir, tmp_path):
    """`python -m lorax.train` of a DPO run (dropout on, so the rng must resume too) SIGKILLed
    twice at random points and rerun ends with the adapter of an uninterrupted run, bit for
    bit, and logs each step once."""
    import random
    import subprocess
    import sys

    from tests.test_reliability import (
        ENV,
        _assert_json_files_whole,
        _assert_same_adapter,
        _kill_when,
        _progress,
        _train_rows,
    )
    from tests.test_train_lm import REPO

    steps = 16

    def cmd(workdir):
        return [
            sys.executable, "-m", "lorax.train", "--config=configs/smollm2_dpo_r8.py",
            f"--config.model.name={tiny_llama_dir}", f"--config.task.data={pairs_dir}",
            "--config.dpo.reference=", "--config.task.max_length=48",
            "--config.task.buckets=(32,48)", "--config.task.validation_size=8",
            f"--config.train.num_steps={steps}", "--config.train.learning_rate=0.01",
            "--config.model.dropout=0.1", "--config.log_every=1", "--config.checkpoint_every=4",
            "--config.eval_batch_size=4", f"--workdir={workdir}",
        ]  # fmt: skip

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    subprocess.run(cmd(straight), cwd=REPO, env=ENV, check=True, capture_output=True)
    rng = random.Random(3)
    kills, at = 0, 0
    for _ in range(2):
        at = rng.randint(at + 3, at + 6)
        kills += _kill_when(cmd(cut), lambda: _progress(str(cut / "metrics.jsonl")), at, rng)
        _assert_json_files_whole(cut)
    assert kills >= 1, "the run finished before it could be killed"
    done = subprocess.run(cmd(cut), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_adapter(straight, cut)
    assert [r["step"] for r in _train_rows(cut / "metrics.jsonl")] == list(range(1, steps + 1))
    summary = json.loads((cut / "summary.json").read_text())
    expected = json.loads((straight / "summary.json").read_text())
    assert summary["resumed_from"] > 0
    assert summary["test_rewards/margins"] == expected["test_rewards/margins"]

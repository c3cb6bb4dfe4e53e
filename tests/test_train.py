"""Tests of the trainer (lorax/train.py) on a tiny random BERT with the real tokenizer and a
slice of real SNLI, so each run takes seconds on a CPU."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, train_until_interrupted

from lorax import data as data_lib
from lorax import loop, paths, runs, sharding
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax import train as train_lib
from lorax.checkpoints.state import Checkpointer
from lorax.models import encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_end_to_end_writes_summary_metrics_and_checkpoints(tiny_model_dir, tiny_snli_dir, tmp_path):
    """A run writes summary.json with the promised keys, metrics.jsonl rows with step and
    split, and adapter-only checkpoints much smaller than the base."""
    summary = train_lib.train_and_evaluate(
        tiny_config(tiny_model_dir, tiny_snli_dir), str(tmp_path)
    )
    for key in (
        "validation_accuracy",
        "test_accuracy",
        "lora_params",
        "head_params",
        "base_params",
        "wall_seconds",
        "tokens_per_second",
        "config",
    ):
        assert key in summary, key
    assert summary["lora_params"] == 2 * 2 * 2 * 64 * 4  # 2 layers x (q, v) x 2·d·r
    assert summary["head_params"] == 64 * 3 + 3
    assert summary["test_examples"] == 200 - summary["data_counts"]["test/skipped_no_gold_label"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    rows = read_metrics(tmp_path)
    assert all("step" in r and "split" in r for r in rows)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    ckpt_bytes = sum(
        os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(tmp_path / "checkpoints")
        for f in fs
    )
    base_bytes = os.path.getsize(tiny_model_dir / "model.safetensors")
    assert ckpt_bytes < base_bytes / 4


def test_steps_leave_the_base_bit_identical_and_keep_no_base_state(tiny_model_dir, tiny_snli_dir):
    """After training steps every frozen base leaf is bit-identical, the delta and head have
    moved, and no optimizer-state leaf has the size of a base leaf."""
    setup, step, state = _jitted_step(tiny_config(tiny_model_dir, tiny_snli_dir))
    before = jax.tree_util.tree_map(np.array, setup.frozen)
    start = jax.tree_util.tree_map(np.array, state["trainable"])
    batcher = data_lib.Batcher(setup.task.splits["train"], 16, (32, 64), seed=0)
    for i in range(3):
        state, _ = step(state, setup.frozen, batcher.train_batch(i), jax.random.key(0))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, setup.frozen)
    )
    moved = jax.tree_util.tree_map(
        lambda a, b: not np.array_equal(a, b),
        start,
        jax.tree_util.tree_map(np.array, state["trainable"]),
    )
    assert all(jax.tree_util.tree_leaves(moved))
    base_sizes = {x.size for x in jax.tree_util.tree_leaves(setup.frozen) if x.size > 64 * 8}
    for leaf in jax.tree_util.tree_leaves(state["opt_state"]):
        assert leaf.size not in base_sizes, leaf.shape
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(start))
    assert n_state <= 2 * n_trainable + 16


def test_bf16_base_with_fp32_adapter_and_optimizer_state(tiny_model_dir, tiny_snli_dir):
    """With model.base_dtype=bfloat16 the frozen base is stored in bf16 while the delta, the
    head and every Adam moment stay fp32, and training steps run and lower the loss."""
    config = tiny_config(
        tiny_model_dir, tiny_snli_dir, **{"model.base_dtype": "bfloat16", "train.num_steps": 20}
    )
    setup, step, state = _jitted_step(config)
    assert {x.dtype for x in jax.tree_util.tree_leaves(setup.frozen)} == {jnp.dtype("bfloat16")}
    batcher = data_lib.Batcher(setup.task.splits["train"], 16, (32, 64), seed=0)
    batch = batcher.train_batch(0)
    losses = []
    for _ in range(8):  # the same batch: its loss must fall
        state, sums = step(state, setup.frozen, batch, jax.random.key(0))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    floats = [x for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype("float32")}
    assert losses[-1] < losses[0], losses


def _jitted_step(config):
    """The trainer's own jitted step and initial state for ``config``."""
    setup = setup_lib.build(config)
    tx = step_lib.make_optimizer(config.train)
    forward = setup_lib.make_forward(setup)
    state = step_lib.initial_state({"delta": setup.delta, "head": setup.head}, tx, setup.mesh)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(forward, tx), setup.mesh, state, setup.frozen
    )
    return setup, step, state


def _step_flops(config, batch):
    setup, step, state = _jitted_step(config)
    compiled = step.lower(state, setup.frozen, batch, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@pytest.mark.slow
def test_lora_step_flops_are_at_most_three_quarters_of_full_finetuning(
    tiny_model_dir, tiny_snli_dir
):
    """XLA's cost analysis of the compiled LoRA step is <= 0.75x the full fine-tuning step on
    the same model and batch: the base's weight gradient is never computed."""
    rng = np.random.default_rng(0)
    b, t = 32, 64
    batch = {
        "input_ids": rng.integers(1000, 2000, (b, t)).astype(np.int32),
        "token_type_ids": np.zeros((b, t), np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "labels": rng.integers(0, 3, b).astype(np.int32),
        "weights": np.ones(b, np.float32),
    }
    lora_flops = _step_flops(tiny_config(tiny_model_dir, tiny_snli_dir), batch)
    full_flops = _step_flops(
        tiny_config(tiny_model_dir, tiny_snli_dir, method="full", **{"train.trainable": (".*",)}),
        batch,
    )
    print(
        f"LoRA step {lora_flops:.3e} FLOPs, full step {full_flops:.3e}: "
        f"{lora_flops / full_flops:.3f}x"
    )
    assert lora_flops <= 0.75 * full_flops, (lora_flops, full_flops)


@pytest.mark.slow
def test_resume_after_kill_ends_with_the_same_adapter(
    tiny_model_dir, tiny_snli_dir, tmp_path, monkeypatch
):
    """A run that dies after its step-3 checkpoint (mid step 5) and is rerun with the same
    workdir resumes from step 3 and ends with the same adapter, bit for bit, as a run that was
    never interrupted; its metrics.jsonl has each train step exactly once."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_lib.train_and_evaluate(config, str(straight))

    train_until_interrupted(config, resumed, 4, monkeypatch)
    summary = train_lib.train_and_evaluate(config, str(resumed))
    assert summary["resumed_from"] == 3

    a, b = Checkpointer(straight).restore(None), Checkpointer(resumed).restore(None)
    assert int(a["step"]) == int(b["step"]) == 6
    fa, fb = paths.flatten(a["trainable"]), paths.flatten(b["trainable"])
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    steps = [r["step"] for r in read_metrics(resumed) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nonfinite_loss_stops_with_step_and_checkpoint(tiny_model_dir, tiny_snli_dir, tmp_path):
    """An infinite learning rate makes the loss NaN; the run stops naming the step and the
    last good checkpoint."""
    config = tiny_config(
        tiny_model_dir,
        tiny_snli_dir,
        **{"train.learning_rate": float("inf"), "train.warmup_fraction": 0.0},
    )
    with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step \d+.*checkpoint"):
        train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lora.targets": "q,qq"}, "unknown LoRA target 'qq'; valid names are"),
        ({"lora.rank": 0}, "must be a positive integer"),
        ({"lora.rank": 65}, r"larger than min\(d_in, d_out\) = 64"),
        ({"lora.targets": r"attn/query/kernel$"}, "matches no kernel"),
        ({"lora.layers": "7"}, "matches no kernel in layers"),
        ({"train.batch_size": 12, "mesh.data": -1}, None),  # valid on one device
        ({"train.trainable": ("^nohead/",)}, "train.trainable pattern '\\^nohead/' matches no"),
        ({"task.name": "mnli"}, "task.name = 'mnli' is not a known task"),
        ({"method": "prefix_tuning"}, "method = 'prefix_tuning' is not valid"),
        ({"model.dtype": "float16"}, "model.dtype = 'float16' is not valid"),
        ({"model.loss_grad": "fused"}, "model.loss_grad = .fused. is not valid; choose one of"),
        ({"model.name": "no-such-model"}, "no-such-model"),
    ],
)
def test_bad_configs_fail_before_training_with_clear_errors(
    tiny_model_dir, tiny_snli_dir, overrides, message
):
    """Each bad config raises before any training, naming the field and what is valid."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, **overrides)
    if message is None:
        setup_lib.build(config)
        return
    with pytest.raises(ValueError, match=message):
        setup_lib.build(config)


def test_batch_not_divisible_over_devices_is_refused():
    """A batch that does not split evenly over the data axis names the field and valid sizes."""
    mesh = sharding.make_mesh(1)
    sharding.check_batch_size(7, mesh, "train.batch_size")  # 1 device: anything goes

    class EightWay:  # the check only reads the mesh's axis sizes
        shape = {"data": 8}

    with pytest.raises(ValueError, match=r"train.batch_size = 12 .* multiple of 8 \(e.g. 8 or 16"):
        sharding.check_batch_size(12, EightWay(), "train.batch_size")


@pytest.mark.slow
def test_command_line_runs_and_rejects_unknown_override(tiny_model_dir, tiny_snli_dir, tmp_path):
    """`python -m lorax.train --config=configs/wq_wv_r4.py` with overrides trains and prints
    the summary; a misspelt override key fails (lock_config)."""
    common = [
        sys.executable,
        "-m",
        "lorax.train",
        "--config=configs/wq_wv_r4.py",
        f"--config.model.name={tiny_model_dir}",
        f"--config.task.data={tiny_snli_dir}",
        "--config.task.max_length=64",
        "--config.task.buckets=(32,64)",
        "--config.task.validation_size=64",
        "--config.train.batch_size=16",
        "--config.train.num_steps=2",
        "--config.eval_every=0",
        "--config.eval_batch_size=32",
        f"--workdir={tmp_path / 'cli'}",
    ]
    out = subprocess.run(common, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test_accuracy" in out.stdout
    assert (tmp_path / "cli" / "summary.json").exists()
    bad = subprocess.run(
        common + ["--config.lora.rnak=8"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "rnak" in bad.stderr


@pytest.mark.slow
def test_merged_encoder_export_loads_as_a_plain_bert_model(tiny_model_dir, tiny_snli_dir, tmp_path):
    """`python -m lorax.export --merged` on an encoder run: transformers' BertModel loads the
    checkpoint and its last hidden state equals the wrapped lorax encoder's; the classifier
    head is written beside it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lorax import lora

    workdir, out = str(tmp_path / "run"), tmp_path / "merged"
    train_lib.train_and_evaluate(tiny_config(tiny_model_dir, tiny_snli_dir), workdir)
    cmd = [sys.executable, "-m", "lorax.export", f"--workdir={workdir}", f"--out={out}", "--merged"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "lorax_head.safetensors").exists()

    bert = transformers.BertModel.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(1000, 2000, (2, 9))
    types, mask = np.zeros_like(ids), np.ones_like(ids)
    with torch.no_grad():
        reference = bert(torch.tensor(ids), torch.tensor(mask), torch.tensor(types))
    _, setup, trainable = runs.load_run(workdir)
    params = lora.wrap(setup.frozen, trainable["delta"], setup.method.spec)
    ours, _ = encoder.Encoder(setup.model.config).apply(
        {"params": params["encoder"]}, ids, types, mask
    )
    err = float(np.abs(np.asarray(ours) - reference.last_hidden_state.numpy()).max())
    assert err <= 1e-4


def test_rotten_tomatoes_trains_a_two_class_head(tiny_model_dir, tmp_path):
    """The single-text task runs through the same trainer: a 2-class head, summary written."""
    import bz2
    import csv
    import io

    from lorax import assets

    src = assets.resolve("rotten-tomatoes") / "rotten_tomatoes.csv.bz2"
    with bz2.open(src, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = [next(reader)] + [r for r in reader][1000:1700]  # the file opens with plots
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    head = text.getvalue()
    data_dir = tmp_path / "rt"
    data_dir.mkdir()
    (data_dir / "rotten_tomatoes.csv.bz2").write_bytes(bz2.compress(head.encode()))
    c = tiny_config(tiny_model_dir, data_dir, **{"task.name": "rotten_tomatoes"})
    c.train.num_steps = 3
    from lorax.data import tasks

    tasks.TASKS["rotten_tomatoes"] = dataclasses.replace(tasks.ROTTEN_TOMATOES, test_size=64)
    try:
        summary = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    finally:
        tasks.TASKS["rotten_tomatoes"] = tasks.ROTTEN_TOMATOES
    assert summary["head_params"] == 64 * 2 + 2
    assert summary["test_examples"] == 64

"""Every fine-tuning method (lorax.methods) through the trainer: init leaves the base model's
outputs alone where the method promises it, training moves the method's parameters and nothing
else, and bad settings fail before any compute, naming the field."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from test_train_lm import lm_config, smol_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401

from lorax import checkpoints, methods, paths, runs
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax import train as train_lib
from lorax.checkpoints.state import Checkpointer
from lorax.models import decoder, encoder

# The methods whose untrained delta leaves the model's function as it was.
IDENTITY_AT_INIT = (
    "lora",
    "adalora",
    "full",
    "top_k_layers",
    "bitfit",
    "adapter_houlsby",
    "adapter_lin",
)
SMALL = {"top_k_layers.k": 1, "adapter.size": 4, "prefix.length": 3, "prefix.hidden": 16,
         "prompt.length": 3, "ptuning.length": 3, "ptuning.hidden": 16}  # fmt: skip


def _batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[:, t - 3 :] = 0  # some padding, which every method must keep masked
    return {
        "input_ids": rng.integers(1000, 2000, (b, t)).astype(np.int32),
        "token_type_ids": np.zeros((b, t), np.int32),
        "attention_mask": mask,
        "labels": rng.integers(0, 3, b).astype(np.int32),
        "weights": np.ones(b, np.float32),
    }


def _pretrained_logits(config, setup, batch):
    """The classifier on its pretrained weights and step-0 head, with no method at all."""
    _, base = checkpoints.load_pretrained(config.model.name)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    params = encoder.init_params(setup.model, base, key)
    return setup.model.apply(
        {"params": params},
        batch["input_ids"],
        batch["token_type_ids"],
        batch["attention_mask"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.METHODS)
def test_untrained_method_and_the_base_model(method, tiny_model_dir, tiny_snli_dir):
    """At step 0, LoRA (B = 0), full / top-k / BitFit (the pretrained leaves themselves) and
    both adapters (up-projection = 0) compute exactly the base model; prefix and prompt methods
    add positions, which change the output, so for them only shape and finiteness hold."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, method=method, **SMALL)
    setup = setup_lib.build(config)
    batch = _batch()
    trainable = {"delta": setup.delta, "head": setup.head}
    ours = setup_lib.make_forward(setup)(trainable, setup.frozen, batch, None, False)
    want = _pretrained_logits(config, setup, batch)
    assert ours.shape == want.shape == (4, 3)
    assert np.all(np.isfinite(ours))
    if method in IDENTITY_AT_INIT:
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)
    else:
        assert np.abs(np.asarray(ours) - np.asarray(want)).max() > 1e-6


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_fits_a_batch(method, tiny_model_dir, tiny_snli_dir):
    """The trainer's own jitted step, eight times on one batch: the loss falls for every
    method (its delta alone can move the output; the head is frozen here)."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, method=method, **SMALL)
    config.train.warmup_fraction, config.train.schedule = 0.0, "constant"
    config.train.head_learning_rate = 1e-12  # frozen head: only the method's delta learns
    if method in ("full", "top_k_layers"):  # whole layers want a smaller step
        config.train.learning_rate = 1e-3
    setup = setup_lib.build(config)
    tx = step_lib.make_optimizer(config.train)
    state = step_lib.initial_state({"delta": setup.delta, "head": setup.head}, tx, setup.mesh)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(setup_lib.make_forward(setup), tx),
        setup.mesh,
        state,
        setup.frozen,
    )
    batch = _batch(b=8, t=16, seed=1)
    losses = []
    for _ in range(8):
        state, sums = step(state, setup.frozen, batch, jax.random.key(0))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    assert losses[-1] < losses[0] - 0.01, losses


def _restored_trainable(workdir):
    with Checkpointer(workdir) as ckpt:
        state = ckpt.restore(None)
    return state


def _size(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.METHODS)
def test_training_moves_only_the_methods_parameters(
    method, tiny_model_dir, tiny_snli_dir, tmp_path
):
    """Three steps through lorax.train: the method's delta moves; the optimizer holds state for
    the delta and head alone (two Adam moments each); and the params the model runs on equal
    the pretrained ones at every path the method does not train."""
    config = tiny_config(tiny_model_dir, tiny_snli_dir, method=method, **SMALL)
    config.train.num_steps = 3
    setup = setup_lib.build(config)
    summary = train_lib.train_and_evaluate(config, str(tmp_path))
    state = _restored_trainable(str(tmp_path))
    delta, head = state["trainable"]["delta"], state["trainable"]["head"]

    assert summary["method"] == method
    assert summary["delta_params"] == methods.Method.count(delta) == _size(setup.delta) > 0
    assert summary["step_memory_bytes"] > 0
    # Adam's mu and nu: one of each per trained leaf (scalar step counts aside), none for the base
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(state["opt_state"]) if np.ndim(x))
    assert moments == 2 * (_size(delta) + _size(head))

    before, after = paths.flatten(setup.delta), paths.flatten(delta)
    assert sorted(before) == sorted(after)
    assert any(not np.array_equal(before[p], after[p]) for p in before), "the delta never moved"

    # The params the model runs on, against the pretrained tree, path by path.
    method_obj = setup.method
    ran = paths.flatten(method_obj.apply(paths.overlay(setup.frozen, head), delta))
    _, base = checkpoints.load_pretrained(config.model.name)
    pretrained = {"encoder/" + p: v for p, v in paths.flatten(base).items()}
    changed = {
        p for p, v in ran.items()
        if p in pretrained and not isinstance(v, methods.Bottleneck | methods.lora.LoraWeight)
        and not np.array_equal(np.asarray(v), pretrained[p])
    }  # fmt: skip
    allowed = {
        "full": {p for p in pretrained if not p.startswith("encoder/pooler/")},
        "top_k_layers": {p for p in pretrained if p.startswith("encoder/layers_1/")},
        "bitfit": {p for p in pretrained if p.endswith("/bias")},
    }.get(method, set())
    assert changed <= allowed, sorted(changed - allowed)[:5]
    if method in ("full", "top_k_layers", "bitfit"):
        assert set(before) <= allowed and changed, "a partial method trains base leaves"
    if method == "bitfit":
        assert all(p.endswith("/bias") for p in before)
    # A wrapped kernel's frozen part is the pretrained kernel, untouched.
    for p, v in ran.items():
        if isinstance(v, methods.Bottleneck | methods.lora.LoraWeight):
            np.testing.assert_array_equal(np.asarray(v.w), pretrained[p])


def test_ptuning_starts_from_the_prompt_tuning_prompt(tiny_model_dir, tiny_snli_dir):
    """P-tuning's encoder is a residual whose last layer starts at zero: with the same seed
    it begins from exactly the prompt that prompt tuning begins from."""
    setups = {
        m: setup_lib.build(tiny_config(tiny_model_dir, tiny_snli_dir, method=m, **SMALL))
        for m in ("prompt", "ptuning")
    }
    p0 = setups["prompt"].method.prompt(setups["prompt"].delta)
    p1 = setups["ptuning"].method.prompt(setups["ptuning"].delta)
    assert p0.shape == (3, 64)
    np.testing.assert_array_equal(p0, p1)


@pytest.mark.parametrize(
    ("method", "scan"),
    [
        ("bitfit", True),
        ("adapter_houlsby", True),
        ("adapter_lin", False),
        ("prefix", True),
        ("prompt", False),
        ("ptuning", True),
        ("top_k_layers", False),
        ("full", True),
    ],
)
@pytest.mark.slow
def test_methods_train_a_decoder(method, scan, tiny_gpt2_dir, tmp_path):  # noqa: F811
    """On a causal LM (tiny GPT-2: it has biases), looped or scanned: each method trains, its
    loss is finite and falls on the instruction set."""
    config = lm_config(
        tiny_gpt2_dir, method=method, **{**SMALL, "model.scan": scan, "train.num_steps": 8}
    )
    summary = train_lib.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["test_loss"])
    assert summary["delta_params"] > 0


@pytest.mark.slow
def test_adapters_are_the_identity_on_a_scanned_decoder(tiny_llama_dir):  # noqa: F811
    """Houlsby adapters over a scanned Llama stack (leaves [L, ...]) start as the identity."""
    config = lm_config(tiny_llama_dir, method="adapter_houlsby", **{"model.scan": True})
    setup = setup_lib.build(config, with_task=False)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 100
    batch = {"input_ids": ids, "positions": jnp.tile(jnp.arange(6), (2, 1)),
             "segment_ids": jnp.ones_like(ids)}  # fmt: skip
    trainable = {"delta": setup.delta, "head": setup.head}
    with_adapters = setup_lib.make_forward(setup)(trainable, setup.frozen, batch, None, False)
    params = paths.overlay(setup.frozen, setup.head)
    want, _ = setup.model.apply(
        {"params": params}, ids, batch["positions"], decoder.causal_mask(batch["segment_ids"])
    )
    np.testing.assert_allclose(with_adapters, want, rtol=0, atol=1e-5)
    down = paths.flatten(setup.delta)["layers/attn/o/kernel/down"]
    assert down.shape == (2, 32, 16)  # [L, D, adapter.size]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"method": "adapters"}, "method = 'adapters' is not valid; choose one of"),
        ({"method": "top_k_layers", "top_k_layers.k": 5}, "top_k_layers.k = 5 is not valid"),
        ({"method": "adapter_houlsby", "adapter.size": 0}, "adapter.size must be a positive"),
        ({"method": "adapter_lin", "adapter.activation": "swish"}, "adapter.activation = 'swish'"),
        ({"method": "prefix", "prefix.length": 0}, "prefix.length must be a positive"),
        ({"method": "prompt", "prompt.init": "zeros"}, "prompt.init = 'zeros' is not valid"),
        ({"method": "bitfit", "model.quantize": "nf4"}, "needs method = 'lora'"),
    ],
)
def test_bad_method_settings_fail_before_training(overrides, needle, tiny_model_dir, tiny_snli_dir):
    with pytest.raises(ValueError) as e:
        setup_lib.build(tiny_config(tiny_model_dir, tiny_snli_dir, **overrides))
    assert needle in str(e.value), str(e.value)


def test_method_limits_on_decoders_are_named(tiny_llama_dir):  # noqa: F811
    with pytest.raises(ValueError, match="has none"):  # Llama has no bias terms
        setup_lib.build(lm_config(tiny_llama_dir, method="bitfit"), with_task=False)
    with pytest.raises(ValueError, match="set model.scan = False"):
        setup_lib.build(
            lm_config(tiny_llama_dir, method="top_k_layers", **{"model.scan": True}),
            with_task=False,
        )


def test_merge_is_offered_only_where_the_method_allows(tiny_model_dir, tiny_snli_dir):
    """Partial methods merge to plain base-shaped arrays (their trained leaves); adapters and
    prompts cannot be merged, and say which methods can."""
    for method in ("bitfit", "adapter_houlsby", "prompt"):
        setup = setup_lib.build(tiny_config(tiny_model_dir, tiny_snli_dir, method=method, **SMALL))
        params = paths.overlay(setup.frozen, setup.head)
        if method == "bitfit":
            merged = paths.flatten(setup.method.merge(params, setup.delta))
            assert all(isinstance(v, jax.Array | np.ndarray) for v in merged.values())
            assert set(paths.flatten(setup.delta)) <= set(merged)
        else:
            with pytest.raises(ValueError, match="cannot be merged"):
                setup.method.merge(params, setup.delta)


@pytest.mark.slow
def test_method_study_trains_each_method_and_reports_the_table(
    tiny_model_dir, tiny_snli_dir, tmp_path
):
    """experiments.methods on the tiny model: one run per (method, seed), results.json rows with
    the table's columns, a rerun trains nothing, and the report renders a row per method."""
    from experiments import methods as study
    from experiments import report

    base = tiny_config(tiny_model_dir, tiny_snli_dir, **SMALL, **{"train.num_steps": 2})
    grid = study.runs(["bitfit", "qlora"], seeds=2)
    assert [r.name for r in grid] == ["bitfit_s0", "qlora_s0", "bitfit_s1", "qlora_s1"]
    rows = study.run_study("methods_tiny", grid, base, str(tmp_path))
    assert len(rows) == 4
    for row in rows:
        assert row["step_memory_bytes"] > 0 and row["step_seconds_median"] > 0
    by = {r["name"]: r for r in rows}
    assert by["qlora_s0"]["base_bytes"] < by["bitfit_s0"]["base_bytes"]  # packed NF4 kernels
    stamp = os.path.getmtime(tmp_path / "methods_tiny" / "bitfit_s0" / "summary.json")
    study.run_study("methods_tiny", grid, base, str(tmp_path))  # all done: trains nothing
    assert os.path.getmtime(tmp_path / "methods_tiny" / "bitfit_s0" / "summary.json") == stamp
    # A later command over fewer methods keeps the earlier runs in results.json.
    assert len(study.run_study("methods_tiny", study.runs(["qlora"], 1), base, str(tmp_path))) == 4
    text = report.report(str(tmp_path))
    assert "| bitfit |" in text and "| qlora |" in text and "(n=2)" in text
    with pytest.raises(ValueError, match="unknown methods"):
        study.runs(["lora", "adapters"], seeds=1)


@pytest.mark.slow
def test_partial_method_exports_merged_and_adapters_refuse(tiny_model_dir, tiny_snli_dir, tmp_path):
    """`lorax.export --merged` of a BitFit run writes a Hugging Face directory whose biases are
    the trained ones and whose other weights are the pretrained ones; an adapter run is
    refused with the reason."""
    from lorax import export

    for method in ("bitfit", "adapter_lin"):
        config = tiny_config(tiny_model_dir, tiny_snli_dir, method=method, **SMALL)
        config.train.num_steps = 2
        train_lib.train_and_evaluate(config, str(tmp_path / method))
    config, setup, trainable = runs.load_run(str(tmp_path / "bitfit"))
    out = export.export_merged(config, setup, trainable, tmp_path / "merged")
    _, exported = checkpoints.load_pretrained(out)
    _, pretrained = checkpoints.load_pretrained(tiny_model_dir)
    trained = {p.removeprefix("encoder/"): v for p, v in paths.flatten(trainable["delta"]).items()}
    for path, value in paths.flatten(exported).items():
        want = trained.get(path, paths.flatten(pretrained)[path])
        np.testing.assert_allclose(value, want, atol=1e-7, err_msg=path)
    assert any(not np.array_equal(v, paths.flatten(pretrained)[p]) for p, v in trained.items())
    config, setup, trainable = runs.load_run(str(tmp_path / "adapter_lin"))
    with pytest.raises(ValueError, match="cannot be merged"):
        export.export_merged(config, setup, trainable, tmp_path / "merged_adapter")

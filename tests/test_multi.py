"""Many adapters trained at once (lorax/multi.py): each ends exactly where training it alone
ends, and padded rank slots stay zero."""

import jax
import numpy as np
import pytest
from helpers import tiny_config

from lorax import multi, paths
from lorax import setup as setup_lib
from lorax import train as train_lib
from lorax.checkpoints.state import Checkpointer

VARIANTS = (  # targets, rank, alpha, rslora, seed, learning rate
    ("q,v", 4, 8.0, False, 0, 1e-2),
    ("q", 8, 16.0, False, 1, 5e-3),
    ("v,o", 2, 4.0, True, 2, 2e-2),
)


def _configs(model_dir, data_dir, num_steps=4, **lora_fields):
    out = []
    for targets, rank, alpha, rslora, seed, lr in VARIANTS:
        c = tiny_config(model_dir, data_dir)
        c.lora.update(lora_fields)
        c.train.num_steps = num_steps
        c.checkpoint_every = 0
        c.model.head_dropout = 0.1  # dropout on: each adapter must draw its own masks
        c.lora.targets, c.lora.rank, c.lora.alpha, c.lora.rslora = targets, rank, alpha, rslora
        c.seed, c.train.learning_rate = seed, lr
        out.append(c)
    return out


def _final(workdir):
    ckpt = Checkpointer(workdir)
    trainable = ckpt.restore(None)["trainable"]
    ckpt.close()
    return paths.flatten(trainable)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "dora+lora_plus"])
def test_each_adapter_of_a_job_equals_its_single_run(
    tiny_model_dir, tiny_snli_dir, tmp_path, variant
):
    """Three adapters with different targets, ranks, scales (one rsLoRA), seeds and learning
    rates, trained as one job: each final delta and head equals its single run's (1e-5). Also
    with DoRA (a kernel an adapter does not adapt keeps m = ‖w‖ in the padded union) and
    LoRA+ (B at 4 times the rate)."""
    fields = {"dora": True, "lr_ratio_b": 4.0} if variant != "lora" else {}
    configs = _configs(tiny_model_dir, tiny_snli_dir, **fields)
    singles = [str(tmp_path / f"single{k}") for k in range(len(configs))]
    for c, w in zip(configs, singles, strict=True):
        train_lib.train_and_evaluate(c, w)
    jobs = [str(tmp_path / f"job{k}") for k in range(len(configs))]
    summaries = multi.train_many(configs, jobs)
    for k, (single, job) in enumerate(zip(singles, jobs, strict=True)):
        want, got = _final(single), _final(job)
        assert want.keys() == got.keys(), k
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{k} {key}")
        assert summaries[k]["multi_adapter_job"] == 3
        # The single-run command on a job's workdir finds it finished and reports it.
        assert train_lib.train_and_evaluate(configs[k], job) == summaries[k]
        assert summaries[k]["lora_params"] == sum(
            np.size(v) for p, v in want.items() if p.startswith("delta/")
        )


@pytest.mark.slow
def test_padded_slots_and_their_adam_moments_stay_exactly_zero(tiny_model_dir, tiny_snli_dir):
    configs = _configs(tiny_model_dir, tiny_snli_dir)
    stepper = multi.MultiStepper(configs, ["a", "b", "c"])
    state = stepper.init_state()
    setup, stack = stepper.setup, stepper.stack
    step = jax.jit(
        multi.make_multi_train_step(stepper.forward, stepper.tx, setup_lib.train_sums(setup))
    )
    masks, scales = stack.masks_and_scales()
    batchers = [setup_lib.make_batcher(setup, setup.task.splits["train"], 16, c) for c in configs]
    keys = jax.numpy.stack([jax.random.key(k) for k in range(3)])
    lrs = jax.numpy.asarray([c.train.learning_rate for c in configs])
    for i in range(3):
        batch = multi.pad_and_stack_batches([b.train_batch(i) for b in batchers])
        state, _ = step(state, setup.frozen, batch, keys, lrs, lrs, masks, scales, {})

    def check(tree, what):
        checked = 0
        for key, leaf in paths.flatten(tree).items():
            path, _, part = key.rpartition("/")
            mask = np.asarray(masks[path])  # [K, R]
            leaf = np.asarray(leaf)
            off = mask == 0
            slots = leaf.transpose(0, 2, 1)[off] if part == "a" else leaf[off]  # [n, D or F]
            assert not np.any(slots), f"{what} {key} has non-zero padded entries"
            assert part != "b" or np.any(leaf[mask == 1]), f"{what} {key} did not train"
            checked += 1
        assert checked

    check(state["trainable"]["delta"], "delta")
    adam = state["opt_state"][1].inner_states["delta"].inner_state[0]
    check(adam.mu["delta"], "mu")
    check(adam.nu["delta"], "nu")


def test_incompatible_configs_are_refused(tiny_model_dir, tiny_snli_dir):
    configs = _configs(tiny_model_dir, tiny_snli_dir)
    configs[1].train.batch_size = 32
    with pytest.raises(ValueError, match=r"config 1 differs from config 0 at train.batch_size"):
        multi.check_compatible(configs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bitfit", "adapter_houlsby", "prompt"])
def test_a_job_of_another_method_equals_its_single_runs(
    method, tiny_model_dir, tiny_snli_dir, tmp_path
):
    """Two adapters of one method other than LoRA (same delta shapes; different seeds and
    learning rates) trained as one job end where their single runs end (1e-5)."""
    configs = []
    for seed, lr in ((0, 1e-2), (1, 3e-3)):
        c = tiny_config(tiny_model_dir, tiny_snli_dir, method=method)
        c.train.num_steps, c.checkpoint_every = 3, 0
        c.adapter.size, c.prompt.length = 4, 3
        c.seed, c.train.learning_rate = seed, lr
        configs.append(c)
    singles = [str(tmp_path / f"single{k}") for k in range(2)]
    for c, w in zip(configs, singles, strict=True):
        train_lib.train_and_evaluate(c, w)
    jobs = [str(tmp_path / f"job{k}") for k in range(2)]
    summaries = multi.train_many(configs, jobs)
    for k, (single, job) in enumerate(zip(singles, jobs, strict=True)):
        want, got = _final(single), _final(job)
        assert want.keys() == got.keys(), k
        for key in want:
            if key.endswith("attn/k/bias"):
                # softmax ignores a key bias (it adds q·b to every score of a row), so its
                # gradient is rounding noise, which Adam scales up to full-size steps: the
                # padding of a job's batches changes that noise. Its gradient is ~0 in both.
                continue
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{k} {key}")
        assert summaries[k]["method"] == method and summaries[k]["delta_params"] > 0
    other = tiny_config(tiny_model_dir, tiny_snli_dir, **configs[0].to_dict())
    other.method = "lora"
    with pytest.raises(ValueError, match="differs from config 0 at method"):
        multi.check_compatible([configs[0], other])

"""Helpers shared by test modules (fixtures live in conftest.py)."""

import os
import sys

from experiments.sweep import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model_dir, data_dir, **overrides):
    """configs/wq_wv_r4.py shrunk to seconds: tiny model, tiny data, a few steps."""
    sys.path.insert(0, REPO)
    from configs import wq_wv_r4

    c = wq_wv_r4.get_config()
    c.model.name = str(model_dir)
    c.task.data = str(data_dir)
    c.task.max_length = 64
    c.task.buckets = (32, 64)
    c.task.validation_size = 64
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.learning_rate = 1e-2
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 3
    c.eval_batch_size = 32
    return apply_overrides(c, overrides)


def train_until_interrupted(config, workdir, step: int, monkeypatch) -> None:
    """Runs ``train_and_evaluate`` as if Ctrl-C arrived when batch ``step`` is fetched, i.e.
    after steps 0..step-1 ran and their checkpoints were written."""
    import pytest

    from lorax import data, train

    real = data.Batcher.train_batch

    def dying(self, i):
        if i == step:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i)

    with monkeypatch.context() as m:
        m.setattr(data.Batcher, "train_batch", dying)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, str(workdir))


def poison_losses(monkeypatch, poisoned) -> None:
    """Makes the training loss NaN on the batches ``poisoned(batcher, step)`` picks (step is
    the batch index; metrics.jsonl labels it step + 1), by marking their labels with a class
    no task has and turning the loss of a marked batch into NaN inside the step."""
    import jax.numpy as jnp
    import numpy as np

    from lorax import data, evaluate

    real_batch, real_sums = data.Batcher.train_batch, evaluate.classification_sums
    marker = 99

    def batch(self, step):
        b = real_batch(self, step)
        if poisoned(self, step):
            b = {**b, "labels": np.full_like(b["labels"], marker)}
        return b

    def sums(logits, b):
        out = real_sums(logits, b)
        bad = jnp.any(b["labels"] == marker)
        return {**out, "loss_sum": jnp.where(bad, jnp.nan, out["loss_sum"])}

    monkeypatch.setattr(data.Batcher, "train_batch", batch)
    monkeypatch.setattr(evaluate, "classification_sums", sums)


def random_delta(base, spec, seed=0):
    """A LoRA delta with random non-zero a AND b (lora.init leaves b at zero), for parity tests
    whose adapter must change the model's outputs."""
    import jax

    from lorax import lora

    delta = lora.init(base, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x,
        delta,
    )


def save_random_decoder(hf_config, directory, seed=0):
    """A tiny transformers decoder with random non-trivial weights, saved as safetensors in
    ``directory`` (returned)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so they matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return directory

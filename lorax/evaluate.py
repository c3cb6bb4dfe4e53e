"""Evaluation: a jitted step that returns metric sums and counts, divided once on the host."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax import sharding

Forward = Callable[..., jax.Array]  # (trainable, frozen, batch, rng, train) -> logits_BC


def classification_sums(logits_BC: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    """Loss and accuracy as sums over real rows (weight 1), with the row count."""
    w_B = batch["weights"].astype(jnp.float32)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(
        logits_BC.astype(jnp.float32), batch["labels"]
    )
    correct_B = (jnp.argmax(logits_BC, -1) == batch["labels"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(ce_B * w_B),
        "correct": jnp.sum(correct_B * w_B),
        "count": jnp.sum(w_B),
    }


def make_eval_step(forward: Forward, mesh) -> Callable:
    """``eval_step(trainable, frozen, batch) -> sums``, jitted once per batch shape."""

    def eval_step(trainable, frozen, batch):
        logits = forward(trainable, frozen, batch, None, False)
        return classification_sums(logits, batch)

    return jax.jit(eval_step, out_shardings=sharding.replicated(mesh))


def evaluate(
    eval_step: Callable,
    trainable: Any,
    frozen: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh,
) -> dict[str, float]:
    """Runs ``eval_step`` over ``batches``; returns mean loss, accuracy and the row count.

    Sums stay on the device until the end, so batches are dispatched back to back.
    """
    total = None
    for batch in batches:
        sums = eval_step(trainable, frozen, sharding.put_batch(batch, mesh))
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    if total is None:
        raise ValueError("evaluation got no batches: the split is empty")
    total = jax.device_get(total)
    count = float(total["count"])
    return {
        "loss": float(total["loss_sum"]) / count,
        "accuracy": float(total["correct"]) / count,
        "count": int(count),
    }

"""DPO (``train.objective = "dpo"``): its config checks, its reference model and its forward.

The policy is the frozen base + the trained delta. The reference is the same base with the delta
switched off (the method applied to no delta), or with ``dpo.reference``'s trained adapter in its
place; then the policy starts from that adapter too. Either way no second model is held: the
reference's response log-probs are computed in the same step, deterministically and under
``stop_gradient``, and dropped after the loss (:func:`forward`). The loss and TRL's metrics are
:func:`lorax.evaluate.dpo_sums`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lorax import evaluate, methods, paths


def check(dpo) -> None:
    """Raises naming the first ``dpo`` field that is out of range."""
    beta, eps = dpo.beta, dpo.label_smoothing
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta > 0:
        raise ValueError(
            f"dpo.beta = {beta!r} is not valid; it must be a number > 0 (the implicit reward's "
            "scale; TRL's default is 0.1)"
        )
    if dpo.loss not in evaluate.DPO_LOSSES:
        raise ValueError(
            f"dpo.loss = {dpo.loss!r} is not valid; choose one of {list(evaluate.DPO_LOSSES)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < 0.5:
        raise ValueError(f"dpo.label_smoothing = {eps!r} is not valid; it must be in [0, 0.5)")
    if eps and dpo.loss != "robust":
        raise ValueError(
            f"dpo.label_smoothing = {eps} applies to dpo.loss = 'robust' (the assumed fraction "
            f"of flipped pairs); dpo.loss = {dpo.loss!r} has none (as in TRL): set "
            "dpo.loss = 'robust' or dpo.label_smoothing = 0"
        )


def check_method(config, method: methods.Method, head) -> None:
    """The delta-off reference needs the pretrained base: a method that trains base leaves
    (whose pretrained values the run no longer holds) or a trained head cannot give it."""
    if method.replaces_base or head:
        what = f"method = {config.method!r}" if method.replaces_base else "train.trainable"
        raise ValueError(
            f"train.objective = 'dpo' takes the base with the delta switched off as its "
            f"reference, but {what} trains base leaves; use a method that adds a delta "
            "(lora, adapter_*, prefix, prompt, ...) and train.trainable = ()"
        )


def sums(config) -> Callable:
    """The run's :func:`lorax.evaluate.dpo_sums` (one function per run: each jitted step
    compiles once)."""
    d = config.dpo
    return functools.partial(
        evaluate.dpo_sums, beta=float(d.beta), loss=d.loss, label_smoothing=float(d.label_smoothing)
    )


def reference_delta(config, delta_like) -> dict:
    """``dpo.reference``'s trained delta (host arrays in ``delta_like``'s layout), checked to
    be a run of the same base and the same method settings as ``config``."""
    from lorax.checkpoints.state import Checkpointer

    workdir = config.dpo.reference
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"dpo.reference = {workdir!r} is not a lorax.train workdir (no config.json)"
        )
    with open(path) as f:
        ref = json.load(f)
    if ref["model"]["name"] != config.model.name:
        raise ValueError(
            f"dpo.reference = {workdir!r} was trained on model.name = {ref['model']['name']!r}, "
            f"not this run's base {config.model.name!r}; the reference must be the same base "
            "with its adapter"
        )
    mine = json.loads(config.to_json_best_effort())
    for field in (config.method, "method"):
        if field in mine and ref.get(field) != mine[field]:
            raise ValueError(
                f"dpo.reference = {workdir!r} has {field} = {ref.get(field)!r}, this run "
                f"{mine[field]!r}; the policy starts from the reference adapter, so they must "
                "be equal"
            )
    ckpt = Checkpointer(workdir, writable=False)
    try:
        if ckpt.latest_step() is None:
            raise ValueError(f"dpo.reference = {workdir!r} holds no checkpoint")
        trained = ckpt.restore(None)["trainable"]["delta"]
    finally:
        ckpt.close()
    trained = jax.tree_util.tree_map(np.asarray, trained)
    stacked = any(paths.is_stacked(p) for p in paths.flatten(delta_like))
    trained = paths.stack_layers(trained) if stacked else paths.unstack_layers(trained)
    want = {p: np.shape(x) for p, x in paths.flatten(delta_like).items()}
    got = {p: np.shape(x) for p, x in paths.flatten(trained).items()}
    if want != got:
        raise ValueError(
            f"dpo.reference = {workdir!r}: its delta does not fit this run's "
            f"({sorted(set(want) ^ set(got))[:3] or 'shapes differ'})"
        )
    return trained


class Off(methods.Method):
    """The base as it is: a method's delta switched off (DPO's default reference)."""

    name = "off"

    def apply(self, base, delta):
        return base


class Fixed(methods.Method):
    """``method`` with a fixed delta in place of the trained one (``dpo.reference``'s)."""

    name = "fixed"

    def __init__(self, method: methods.Method, delta: Any):
        self.method, self.delta = method, delta

    def apply(self, base, delta):
        return self.method.apply(base, self.delta)


def reference_method(method: methods.Method, reference: Any | None) -> methods.Method:
    """How the reference model sees the base: the delta off, or ``reference`` in its place."""
    return Off() if reference is None else Fixed(method, reference)


def forward(policy: Callable, reference: Callable) -> Callable:
    """The DPO forward: ``policy``'s output and, beside it, the reference's summed response
    log-probs per row (``reference`` is the same model pass over :func:`reference_method`),
    computed without dropout and outside the gradient, as an :class:`evaluate.Preferred`."""

    def dpo_forward(trainable, frozen, batch, rng, train: bool):
        out = reference(jax.lax.stop_gradient(trainable), frozen, batch, None, False)
        reference_logps_R = jax.lax.stop_gradient(evaluate.response_logps(out, batch)[0])
        return evaluate.Preferred(policy(trainable, frozen, batch, rng, train), reference_logps_R)

    return dpo_forward


def memory_compared(setup, stepper, state, first_step: int, dpo_bytes, sft: Callable) -> dict:
    """What a DPO run's summary adds: the memory of a LoRA SFT step (the next-token loss of
    the policy, whose pass is ``sft``) on the batch of chosen + rejected rows whose DPO step
    gave ``dpo_bytes`` (the run's first step), and DPO's ratio to it: the reference costs no
    second model (XLA's accounting, one more compile)."""
    from lorax import step as step_lib

    fn = step_lib.make_train_step(sft, stepper.tx, evaluate.lm_sums, setup.method)
    jitted = step_lib.jit_train_step(fn, setup.mesh, state, setup.frozen)
    args = stepper.args(state, stepper.batch(first_step)[0])
    sft_bytes = step_lib.step_memory_bytes(jitted, *args)
    ratio = dpo_bytes / sft_bytes if dpo_bytes and sft_bytes else None
    return {"sft_step_memory_bytes": sft_bytes, "dpo_step_memory_ratio": ratio}


def prepare(config, method: methods.Method, head, delta, mesh) -> tuple[Any, Any]:
    """``(delta, reference)`` of a DPO run, checked: with ``dpo.reference`` both are that run's
    adapter, placed on ``mesh`` (the policy starts from it), else the fresh delta and None
    (the reference is the delta switched off)."""
    from lorax import sharding

    check_method(config, method, head)
    if not config.dpo.reference:
        return delta, None
    trained = reference_delta(config, delta)
    # two copies: the policy's delta is donated to the train step, the reference is not
    put = lambda: sharding.put(jax.tree_util.tree_map(np.asarray, trained), mesh)  # noqa: E731
    return put(), put()

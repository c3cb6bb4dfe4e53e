"""The training step: the optimizer, the pure step, its state, and its jit with shardings.

The step differentiates the trainable tree ``{"delta", "head"}`` alone; the frozen base is an
argument that is never donated and never differentiated. Every array lives on a (data, fsdp,
tensor) device mesh in the shardings :mod:`lorax.sharding`'s rules give it, and the step is
jitted with those shardings in and out.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax import evaluate, paths, sharding


def head_learning_rate(train_config) -> float:
    """The head's peak learning rate (``train.head_learning_rate``, 0 = the delta's)."""
    return train_config.head_learning_rate or train_config.learning_rate


def make_optimizer(
    train_config, unit_peaks: bool = False, lr_ratio_b: float = 1.0
) -> optax.GradientTransformation:
    """AdamW with linear warmup then decay, over the trainable tree ``{"delta", "head"}``.

    ``train_config`` is the config's ``train`` section. The clip's global norm is taken over
    the trainable tree only: a norm over the whole base would make XLA compute the base's
    gradient and lose LoRA's speed-up. ``unit_peaks`` sets both peak learning rates to 1, for
    a caller that scales the updates by its own rates (the multi-adapter step, whose adapters
    each have theirs). ``lr_ratio_b`` is LoRA+ (Hayou et al. 2024): the delta's ``b`` leaves
    (LoRA's B factors) train at that multiple of the delta's rate.
    """
    t = train_config

    def schedule(peak):
        warmup = int(round(t.warmup_fraction * t.num_steps))
        decay_steps = max(1, t.num_steps - warmup)
        decays = {
            "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
            "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
            "constant": lambda: optax.constant_schedule(peak),
        }
        if t.schedule not in decays:
            raise ValueError(
                f"train.schedule = {t.schedule!r} is not valid; choose one of {sorted(decays)}"
            )
        decay = decays[t.schedule]()
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])

    def adamw(peak):
        return optax.adamw(
            schedule(peak),
            t.b1,
            t.b2,
            t.eps,
            weight_decay=t.weight_decay,
            mask=lambda tree: jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree),
        )

    lr, head_lr = (1.0, 1.0) if unit_peaks else (t.learning_rate, head_learning_rate(t))
    transforms = {"delta": adamw(lr), "head": adamw(head_lr)}
    labels: Any = {"delta": "delta", "head": "head"}
    if lr_ratio_b != 1.0:
        transforms["delta_b"] = adamw(lr * lr_ratio_b)

        def labels(tree):
            def label(path, _):
                return "delta_b" if getattr(path[-1], "key", None) == "b" else "delta"

            delta = jax.tree_util.tree_map_with_path(label, tree["delta"])
            return {"delta": delta, "head": jax.tree_util.tree_map(lambda _: "head", tree["head"])}

    tx = optax.multi_transform(transforms, labels)
    if t.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return tx


def make_train_step(
    forward: Callable,
    tx: optax.GradientTransformation,
    sums_fn=evaluate.classification_sums,
    method=None,
) -> Callable:
    """``train_step(state, frozen, batch, key) -> (state, metric sums)``, pure.

    ``state`` is ``{"step", "trainable", "opt_state"}`` (and ``"method"``, the state of a
    ``method`` that steers its own training: AdaLoRA's rank allocator, see
    :class:`lorax.methods.Method`). The loss differentiated is the task's plus the method's
    ``penalty``; the metrics report the task's. A step whose loss is not finite leaves the
    state unchanged and reports ``nonfinite = 1``; the host decides whether to stop.
    """

    def loss_fn(trainable, frozen, batch, rng):
        logits = forward(trainable, frozen, batch, rng, True)
        sums = sums_fn(logits, batch)
        loss = evaluate.train_loss(sums)
        if method is not None:
            loss = loss + method.penalty(trainable["delta"])
        return loss, sums

    def train_step(state, frozen, batch, key):
        rng = jax.random.fold_in(key, state["step"])
        grads, sums = jax.grad(loss_fn, has_aux=True)(state["trainable"], frozen, batch, rng)

        def update(trainable, opt_state, *method_state):
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            if not method_state:
                return trainable, opt_state
            delta, m = method.after_update(
                method_state[0], trainable["delta"], grads["delta"], state["step"] + 1
            )
            return {**trainable, "delta": delta}, opt_state, m

        return next_state(state, update, sums)

    return train_step


def next_state(state, update: Callable, sums) -> tuple[dict, dict]:
    """The step's new state and metrics: ``update(trainable, opt_state[, method]) ->
    (trainable, opt_state[, method])`` applied where the loss is finite (``method`` where the
    state has one); a non-finite loss keeps the old state (only the step count advances) and
    reports ``nonfinite = 1``.

    The guard is a ``lax.cond``, not a ``jnp.where`` of the new and the old state: the select
    reads both copies of every parameter and optimizer moment once more after the update (a
    second full pass, ~16% more bytes in XLA's cost analysis of a full fine-tuning step), while
    the skipped branch costs nothing and the update writes the donated buffers in place
    (``tests/test_step_paths.py``). Under ``vmap`` (multi-adapter jobs) JAX turns the cond
    into that select, over the adapters' small trees.
    """
    finite = jnp.isfinite(sums["loss_sum"])
    keys = ("trainable", "opt_state", "method") if "method" in state else ("trainable", "opt_state")
    carried = jax.lax.cond(
        finite, lambda a: tuple(update(*a)), lambda a: a, tuple(state[k] for k in keys)
    )
    new_state = {"step": state["step"] + 1, **dict(zip(keys, carried, strict=True))}
    return new_state, {**sums, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def jit_train_step(
    train_step: Callable, mesh, state: Any, frozen: Any, *, leading: int = 0, extra: int = 0
) -> Callable:
    """Jits ``train_step(state, frozen, batch, key, *extra)`` with explicit shardings and the
    state donated.

    Args:
      train_step: from :func:`make_train_step` (or the multi-adapter step).
      mesh: the device mesh.
      state, frozen: trees of arrays or ``jax.ShapeDtypeStruct`` s shaped like the step's
        state and base; their shardings come from :data:`lorax.sharding.RULES` (the rules
        never split a leading adapter axis), and the state comes back in them.
      leading: axes before the batch axis in every batch array (1 for [K, B, ...]).
      extra: arguments after ``key`` (per-adapter rates, masks, scales), replicated like it.
    """
    state_sh = sharding.tree_shardings(state, mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(
            state_sh,
            sharding.tree_shardings(frozen, mesh),
            sharding.batch_sharding(mesh, leading=leading),
            rep,
            *[rep] * extra,
        ),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def fresh_state(trainable: Any, tx: optax.GradientTransformation, method=None) -> dict[str, Any]:
    """``{"step": 0, "trainable": trainable, "opt_state": tx.init(trainable)}``, and
    ``"method"``: the method's own state, for a ``method`` that has one."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
    }
    own = None if method is None else method.init_state(trainable["delta"])
    return state if own is None else {**state, "method": own}


def initial_state(
    trainable: Any, tx: optax.GradientTransformation, mesh, method=None
) -> dict[str, Any]:
    """Step 0's ``{"step", "trainable", "opt_state"[, "method"]}`` for ``{"delta", "head"}``.

    Built by one jitted call straight into the shardings the rules give each leaf (Adam's
    moments beside the leaf they belong to), never whole on one device first.
    """
    init = functools.partial(fresh_state, tx=tx, method=method)
    shardings = sharding.tree_shardings(jax.eval_shape(init, trainable), mesh)
    return jax.jit(init, out_shardings=shardings)(trainable)


def state_shapes(
    trainable: Any, tx: optax.GradientTransformation, mesh, method=None
) -> dict[str, Any]:
    """:func:`initial_state`'s shapes and shardings as ``jax.ShapeDtypeStruct`` s, nothing
    computed: for compiling the step without its arrays (``lorax.plan``)."""
    init = functools.partial(fresh_state, tx=tx, method=method)
    return sharding.shaped(jax.eval_shape(init, trainable), mesh)


def compiled_memory_bytes(compiled) -> int | None:
    """A compiled step's own device footprint: arguments + outputs − donated (aliased) +
    temporaries, the frozen base included; None if the backend cannot say."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def step_memory_bytes(jitted: Callable, *args) -> int | None:
    """Memory one step needs on a device, in bytes, for these arguments' shapes.

    XLA's accounting of the compiled step (:func:`compiled_memory_bytes`; the same on CPU, GPU
    and TPU, so methods compare alike on any machine). Costs one extra compile.
    """
    try:
        return compiled_memory_bytes(jitted.lower(*args).compile())
    except Exception:  # noqa: BLE001 -- a backend without the analysis: nothing to report
        return None


def memory_bound(
    model_config, frozen: Any, trainable: Any, mesh, rows: int, length: int, remat: str, dtype
) -> dict[str, int]:
    """An analytic lower bound of a decoder LM train step's bytes per device, by part.

    What any schedule must hold at its peak at the least, not a model of XLA's allocator:
    "base", the frozen base as stored (each leaf's bytes over the devices that split it);
    "gathered", two layers' weights all-gathered over fsdp (the layer computing and the next
    one arriving; 0 without fsdp); "trainable", the trainable leaves, their gradients and
    Adam's two moments; "activations", what ``remat`` (:data:`lorax.nn.REMAT`) keeps of every
    layer ("block_inputs": its input; "dots", and "none" which keeps more: the weight matmuls'
    outputs); "temporaries", the largest per-layer ones, the MLP's two [rows, length, F]
    matmul outputs alive together. ``rows`` are one device's rows of ``length`` tokens;
    ``dtype`` is the compute dtype; ``frozen`` and ``trainable`` may be abstract.
    """

    def nbytes(leaf):
        return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize

    def per_device(tree, drop=()):  # bytes of each leaf over the mesh axes that split it
        def one(leaf, spec):
            axes = [a for dim in spec for a in ((dim,) if isinstance(dim, str) else dim or ())]
            return nbytes(leaf) / math.prod(mesh.shape[a] for a in axes if a not in drop)

        leaves = jax.tree_util.tree_leaves(tree)
        specs = jax.tree_util.tree_leaves(
            sharding.tree_specs(tree, mesh),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        return sum(one(x, s) for x, s in zip(leaves, specs, strict=True))

    c = model_config
    layer = {
        path: leaf
        for path, leaf in paths.flatten({"f": frozen, "t": trainable}).items()
        if re.match(r"[ft]/(layers/|layers_0/)", path)
    }
    stacked = any(p.split("/")[1] == "layers" for p in layer)
    one_layer = per_device(paths.unflatten(layer), drop=(sharding.FSDP,))
    one_layer /= c.num_layers if stacked else 1
    width = jnp.dtype(dtype).itemsize * rows * length
    kv = c.num_kv_heads * c.head_dim
    kept = c.hidden_size  # block_inputs: the layer's input
    if remat != "block_inputs":  # q, k, v, o, mlp_in, mlp_gate, mlp_out outputs
        kept = c.num_heads * c.head_dim + 2 * kv + 2 * c.hidden_size + 2 * c.intermediate_size
    parts = {
        "base": per_device(frozen),
        "gathered": 2 * one_layer if mesh.shape.get(sharding.FSDP, 1) > 1 else 0,
        "trainable": 4 * per_device(trainable),
        "activations": c.num_layers * width * kept,
        "temporaries": 2 * width * c.intermediate_size,
    }
    parts = {k: int(v) for k, v in parts.items()}
    return {**parts, "total": sum(parts.values())}

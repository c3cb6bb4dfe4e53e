"""Fine-tunes a pretrained model with LoRA: ``python -m lorax.train --config=configs/FILE.py``.

The core is :func:`train_and_evaluate`, which tests and notebooks call directly; ``main`` only
parses flags (and joins a multi-host run when ``mesh.distributed``). The step differentiates
the delta and the trainable head alone; the frozen base is an argument that is never donated
and never differentiated. Every array lives on a (data, fsdp, tensor) device mesh in the
shardings :mod:`lorax.sharding`'s rules give it: the base is placed straight into them, and
the step is jitted with those shardings in and out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lorax import assets, checkpoints, evaluate, lora, methods, paths, quant, sharding
from lorax import data as data_lib
from lorax.checkpoints.state import Checkpointer, IncompatibleCheckpointError
from lorax.models import decoder, encoder
from lorax.runfiles import MetricsLog, write_json_atomic, write_text_atomic

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METHODS = methods.METHODS


# --------------------------------------------------------------------------- config parsing


def _choice(value: str, valid, field: str):
    if value not in valid:
        raise ValueError(f"{field} = {value!r} is not valid; choose one of {sorted(valid)}")
    return valid[value] if isinstance(valid, Mapping) else value


def _parse_overrides(text: str, field: str, cast) -> dict[str, Any]:
    """Parses "v=8,q=2" into {"v": 8, "q": 2}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = cast(value)
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"{field} item {item!r} is not NAME=VALUE (e.g. 'v=8,q=2')")
    return out


def _parse_layers(text: str) -> tuple[int, ...]:
    """Parses "0,2,4-5" into (0, 2, 4, 5)."""
    layers = []
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        lo, dash, hi = item.partition("-")
        try:
            layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise ValueError(
                f"lora.layers item {item!r} is not a layer index or range (e.g. '0,1,2' or '3-5')"
            ) from None
    return tuple(layers)


def lora_spec(config: ml_collections.ConfigDict) -> lora.LoraSpec | None:
    """The LoRA spec a config describes (None for every other method)."""
    if config.method != "lora":
        return None
    c = config.lora
    return lora.make_spec(
        c.targets,
        rank=c.rank,
        alpha=c.alpha,
        rank_pattern=_parse_overrides(c.rank_pattern, "lora.rank_pattern", int),
        alpha_pattern=_parse_overrides(c.alpha_pattern, "lora.alpha_pattern", float),
        layers=_parse_layers(c.layers),
        init=c.init,
        dropout=c.dropout,
        rslora=c.rslora,
    )


# --------------------------------------------------------------------------- model and data


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built once from a config."""

    model: Any  # encoder.EncoderClassifier or decoder.Decoder
    kind: str  # "classify" (encoder + head) or "lm" (causal LM)
    spec: lora.LoraSpec | None  # the LoRA spec (method = "lora"), else None
    frozen: dict  # base leaves that are never trained (nested)
    head: dict  # base leaves trained beside the delta (train.trainable): the task head
    delta: dict  # the method's trainable tree (lorax.methods), e.g. the LoRA delta
    task: data_lib.TaskData | None
    mesh: jax.sharding.Mesh  # frozen, head and delta are already placed on it (sharding.RULES)
    base_params: int  # parameters of the pretrained base model
    tokenizer: Any = None
    method: methods.Method | None = None  # a method other than LoRA (None: LoRA by ``spec``)

    @property
    def transform(self) -> methods.Method | None:
        """The method that turns ``(frozen + head, delta)`` into the model's params; None when
        there is no delta (``spec`` None and no other method: every trained leaf is head)."""
        if self.method is not None:
            return self.method
        return None if self.spec is None else methods.LoRA(self.spec)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        return int(pad or 0)


def _check_task_name(config) -> None:
    if config.task.name not in {*data_lib.TASKS, *data_lib.CAUSAL_TASKS}:
        raise ValueError(
            f"task.name = {config.task.name!r} is not a known task; choose one of "
            f"{sorted([*data_lib.TASKS, *data_lib.CAUSAL_TASKS])}"
        )


def _check_task_fits_model(config, kind: str) -> None:
    name = config.task.name
    lm_task = name in data_lib.CAUSAL_TASKS
    if lm_task != (kind == "lm"):
        model_kind = "a causal LM" if kind == "lm" else "an encoder"
        valid = sorted(data_lib.CAUSAL_TASKS if kind == "lm" else data_lib.TASKS)
        raise ValueError(
            f"task.name = {name!r} does not fit model.name = {config.model.name!r}, which is "
            f"{model_kind}; tasks for it: {valid}"
        )


def build(config: ml_collections.ConfigDict, *, with_task: bool = True) -> Setup:
    """Loads the model, checks the LoRA spec against it, then loads and tokenizes the task.

    Everything that can be wrong in a config is checked here, before any training compute.
    The frozen base goes from the host straight into its shardings on the mesh, each device
    receiving only its share (with ``model.scan``, :func:`paths.stack_layers` still stacks
    the layers on the default device first); the head and the new delta are placed beside it.
    ``with_task=False`` skips the data (for generation from a trained adapter).
    """
    _choice(config.method, METHODS, "method")
    compute_dtype = _choice(config.model.dtype, DTYPES, "model.dtype")
    base_dtype = _choice(config.model.base_dtype, DTYPES, "model.base_dtype")
    mesh = sharding.mesh_from_config(config.mesh)
    if with_task:  # no batches otherwise (export, generation)
        sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
        sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    method = methods.from_config(config)
    spec = method.spec if isinstance(method, methods.LoRA) else None
    if config.model.get("quantize"):
        quant.check_kind_block(config.model.quantize, config.model.quant_block)
        if spec is None:
            raise ValueError(
                f"model.quantize = {config.model.quantize!r} needs method = 'lora' (a quantized "
                f"base is frozen; method = {config.method!r} trains it); or set model.quantize = ''"
            )
    if with_task:
        _check_task_name(config)

    model_dir = assets.resolve(config.model.name)
    model_config, base = checkpoints.load_pretrained(model_dir)
    kind = "lm" if isinstance(model_config, decoder.DecoderConfig) else "classify"
    if with_task:
        _check_task_fits_model(config, kind)
    key = jax.random.key(config.seed)
    base_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(base))
    if kind == "classify":
        model_config = dataclasses.replace(model_config, hidden_dropout=config.model.dropout)
        label_names = data_lib.TASKS[config.task.name].label_names
        model = encoder.EncoderClassifier(
            config=model_config,
            num_classes=len(label_names),
            pooling=config.model.pooling,
            dtype=compute_dtype,
            head_dropout=config.model.head_dropout,
        )
        params = encoder.init_params(model, base, jax.random.fold_in(key, 1))
    else:
        model_config = dataclasses.replace(model_config, dropout=config.model.dropout)
        model = decoder.Decoder(
            model_config, compute_dtype, scan=config.model.scan, remat=config.model.remat
        )
        params = paths.stack_layers(base) if config.model.scan else base

    head_flat, frozen_flat = paths.select(
        paths.flatten(params), tuple(config.train.trainable), what="train.trainable pattern"
    )
    frozen = paths.unflatten(frozen_flat)
    if config.model.get("quantize"):  # QLoRA: from the fp32 weights, standing for base_dtype ones
        frozen = quant.quantize_tree(
            frozen, config.model.quantize, config.model.quant_block, dtype=base_dtype
        )
    # Cast on the host, then each device receives only its slice.
    frozen = sharding.put(
        jax.tree_util.tree_map(
            lambda x: x if quant.is_quantized(x) else np.asarray(x, base_dtype),
            frozen,
            is_leaf=quant.is_quantized,
        ),
        mesh,
    )
    head = sharding.put(jax.tree_util.tree_map(np.asarray, paths.unflatten(head_flat)), mesh)
    delta = method.init(frozen, jax.random.fold_in(key, 2))
    if method.replaces_base:  # the delta holds those base leaves now (fp32 copies)
        frozen = methods.drop_replaced(frozen, delta)
    delta = sharding.put(jax.tree_util.tree_map(np.asarray, delta), mesh)

    tokenizer = checkpoints.load_tokenizer(model_dir)
    task = None
    if with_task:
        task = data_lib.load_task(
            config.task.name,
            assets.resolve(config.task.data),
            tokenizer,
            max_length=config.task.max_length,
            validation_size=config.task.validation_size,
        )
    return Setup(
        model,
        kind,
        spec,
        frozen,
        head,
        delta,
        task,
        mesh,
        base_params,
        tokenizer,
        None if spec is not None else method,
    )


def make_forward(setup: Setup) -> Callable:
    """``forward(trainable, frozen, batch, rng, train) -> logits``.

    The params the model sees are the frozen leaves, the trainable head leaves and the
    method's delta applied to them (for LoRA: wrapped around its kernels as LoraWeight nodes,
    never merged; see :mod:`lorax.methods` for the others). Logits
    are [B, C] for a classifier and [B, T, V] for a causal LM. On a mesh with an fsdp axis
    the params are first gathered to their compute layout (:func:`sharding.gather_fsdp`).
    """
    model, method, kind, mesh = setup.model, setup.transform, setup.kind, setup.mesh

    def forward(trainable, frozen, batch, rng, train: bool):
        frozen = sharding.gather_fsdp(frozen, mesh)
        trainable = sharding.gather_fsdp(trainable, mesh)
        params = paths.overlay(frozen, trainable["head"])
        if method is not None:
            params = method.apply(params, trainable["delta"])
        rngs = {"dropout": rng} if train else {}
        if kind == "lm":
            logits, _ = model.apply(
                {"params": params},
                batch["input_ids"],
                batch["positions"],
                decoder.causal_mask(batch["segment_ids"]),
                deterministic=not train,
                rngs=rngs,
            )
            return logits
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            deterministic=not train,
            rngs=rngs,
        )

    return forward


def train_sums(setup: Setup) -> Callable:
    """The metric sums the train step's loss comes from."""
    return evaluate.lm_sums if setup.kind == "lm" else evaluate.classification_sums


def make_batcher(setup: Setup, examples, batch_size: int, config) -> Any:
    """The batcher for a split: length buckets, packed LM rows, or scored choices."""
    if isinstance(examples, data_lib.ChoiceExamples):
        return data_lib.ChoiceBatcher(
            examples, batch_size, config.task.buckets, pad_id=setup.pad_id
        )
    if isinstance(examples, data_lib.CausalExamples):
        return data_lib.PackedBatcher(
            examples, batch_size, config.task.max_length, seed=config.seed, pad_id=setup.pad_id
        )
    return data_lib.Batcher(examples, batch_size, config.task.buckets, seed=config.seed)


def eval_sums(examples) -> Callable:
    """The metric sums of an eval split: choice scoring, LM tokens or classes."""
    if isinstance(examples, data_lib.ChoiceExamples):
        return evaluate.choice_sums
    if isinstance(examples, data_lib.CausalExamples):
        return evaluate.lm_sums
    return evaluate.classification_sums


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-pad) tokens in a batch of either kind."""
    if "segment_ids" in batch:
        return data_lib.count_lm_tokens(batch)
    return data_lib.count_tokens(batch)


def make_optimizer(
    config: ml_collections.ConfigDict, unit_peaks: bool = False
) -> optax.GradientTransformation:
    """AdamW with linear warmup then decay, over the trainable tree ``{"delta", "head"}``.

    The clip's global norm is taken over that tree only: a norm over the whole base would
    make XLA compute the base's gradient and lose LoRA's speed-up. ``unit_peaks`` sets both
    peak learning rates to 1, for a caller that scales the updates by its own rates (the
    multi-adapter step, whose adapters each have theirs).
    """
    t = config.train

    def schedule(peak):
        warmup = int(round(t.warmup_fraction * t.num_steps))
        decay_steps = max(1, t.num_steps - warmup)
        decay = _choice(
            t.schedule,
            {
                "linear": optax.linear_schedule(peak, 0.0, decay_steps),
                "cosine": optax.cosine_decay_schedule(peak, decay_steps),
                "constant": optax.constant_schedule(peak),
            },
            "train.schedule",
        )
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

    lr, head_lr = (1.0, 1.0) if unit_peaks else (t.learning_rate, head_learning_rate(config))
    tx = optax.multi_transform(
        {"lora": adamw(lr), "head": adamw(head_lr)}, {"delta": "lora", "head": "head"}
    )
    if t.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return tx


def head_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The head's peak learning rate (``train.head_learning_rate``, 0 = the delta's)."""
    return config.train.head_learning_rate or config.train.learning_rate


def make_train_step(
    forward: Callable, tx: optax.GradientTransformation, sums_fn=evaluate.classification_sums
) -> Callable:
    """``train_step(state, frozen, batch, key) -> (state, metric sums)``, pure.

    ``state`` is ``{"step", "trainable", "opt_state"}``. A step whose loss is not finite leaves
    the state unchanged and reports ``nonfinite = 1``; the host decides whether to stop.
    """

    def loss_fn(trainable, frozen, batch, rng):
        logits = forward(trainable, frozen, batch, rng, True)
        sums = sums_fn(logits, batch)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    def train_step(state, frozen, batch, key):
        rng = jax.random.fold_in(key, state["step"])
        grads, sums = jax.grad(loss_fn, has_aux=True)(state["trainable"], frozen, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return next_state(state, trainable, opt_state, sums)

    return train_step


def next_state(state, trainable, opt_state, sums) -> tuple[dict, dict]:
    """The step's new state and metrics; a non-finite loss keeps the old trainable tree and
    optimizer state (only the step count advances) and reports ``nonfinite = 1``."""
    finite = jnp.isfinite(sums["loss_sum"])

    def keep(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = {
        "step": state["step"] + 1,
        "trainable": keep(trainable, state["trainable"]),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    return new_state, {**sums, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def jit_train_step(train_step: Callable, mesh, state: Any = None, frozen: Any = None) -> Callable:
    """Jits ``train_step(state, frozen, batch, key)`` with explicit shardings; donates the state.

    Args:
      train_step: from :func:`make_train_step`.
      mesh: the device mesh.
      state, frozen: trees of arrays or ``jax.ShapeDtypeStruct`` s shaped like the step's
        state and base; their shardings come from :data:`lorax.sharding.RULES`, the batch is
        split over data × fsdp and the state comes back in the shardings it went in. Left
        out (both), jit takes the shardings of the arguments it is called with.
    """
    rep = sharding.replicated(mesh)
    if state is None and frozen is None:
        return jax.jit(train_step, donate_argnums=(0,), out_shardings=(None, rep))
    state_sh = sharding.tree_shardings(state, mesh)
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh), rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def fresh_state(trainable: Any, tx: optax.GradientTransformation) -> dict[str, Any]:
    """``{"step": 0, "trainable": trainable, "opt_state": tx.init(trainable)}``."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
    }


def initial_state(setup: Setup, tx: optax.GradientTransformation) -> dict[str, Any]:
    """Step 0's ``{"step", "trainable", "opt_state"}``: the new delta, the head, fresh moments.

    Built by one jitted call straight into the shardings the rules give each leaf (Adam's
    moments beside the leaf they belong to), never whole on one device first.
    """
    trainable = {"delta": setup.delta, "head": setup.head}
    init = functools.partial(fresh_state, tx=tx)
    shardings = sharding.tree_shardings(jax.eval_shape(init, trainable), setup.mesh)
    return jax.jit(init, out_shardings=shardings)(trainable)


# --------------------------------------------------------------------------- the run


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf and the config says to stop."""


def nonfinite_advice(ckpt: Checkpointer) -> str:
    """The end of a NaN/Inf message: where the last good checkpoint is, and the way to skip."""
    last = ckpt.latest_step()
    return (
        f"Last good checkpoint: {'none' if last is None else f'step {last}'} in "
        f"{ckpt.directory}. Set train.skip_nonfinite=True to skip such batches."
    )


def make_summary(
    config,
    setup: Setup,
    trainable,
    val,
    test,
    *,
    first_step,
    start,
    train_seconds,
    train_tokens,
    step_stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` of a run (alone or one adapter of a multi-adapter job)."""
    return {
        "validation_accuracy": val["accuracy"],
        "validation_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": test["count"],
        "validation_examples": val["count"],
        "model_kind": setup.kind,
        "method": config.method,
        # lora_params: the LoRA delta's size (0 for other methods); delta_params: the
        # trained tree of whichever method ran; head_params: train.trainable's leaves.
        "lora_params": lora.count(trainable["delta"]) if setup.spec is not None else 0,
        "delta_params": lora.count(trainable["delta"]),
        "head_params": lora.count(trainable["head"]),
        "base_params": setup.base_params,
        # What an adapter checkpoint weighs beside the base it needs (the paper's 350 GB ->
        # 35 MB point): delta + trained head in fp32, and the frozen base as stored.
        "adapter_bytes": _nbytes(trainable["delta"]) + _nbytes(trainable["head"]),
        # Quantized kernels count at their packed size (codes + scales); base_bytes_dense is
        # what the same frozen leaves weigh unquantized in model.base_dtype.
        "base_bytes": _nbytes(setup.frozen),
        "base_bytes_dense": quant.dense_nbytes(setup.frozen),
        "base_quantize": config.model.get("quantize") or "none",
        "steps": config.train.num_steps,
        "resumed_from": first_step,
        "wall_seconds": time.time() - start,
        "train_seconds": train_seconds,
        "tokens_per_second": train_tokens / max(train_seconds, 1e-9),
        **(step_stats or {}),
        "devices": setup.mesh.devices.size,
        "mesh": {axis: int(n) for axis, n in setup.mesh.shape.items()},
        # What one device holds of the frozen base: shrinks as mesh.fsdp and mesh.tensor grow.
        "base_bytes_per_device": sharding.bytes_per_device(setup.frozen),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "data_counts": dict(setup.task.counts),
        "config": json.loads(config.to_json_best_effort()),
    }


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def resume(ckpt: Checkpointer, state: dict, logs: list[MetricsLog], num_steps: int) -> dict:
    """The state of the newest intact checkpoint in ``ckpt`` (corrupt ones are moved aside and
    reported), or ``state`` itself when there is none; trims each of ``logs`` to match, so
    rows a cut-off run logged after its last checkpoint (or before its first) are not kept
    twice. Serves single runs and multi-adapter jobs (whose ``step`` has a K axis)."""
    restored, notes = None, []
    if ckpt.latest_step() is not None:
        try:
            restored, notes = ckpt.restore_latest_good(state)
        except IncompatibleCheckpointError as e:
            raise ValueError(
                f"{ckpt.directory} holds a checkpoint that does not fit this config ({e}); "
                "rerun with the config that started it, or pass a new --workdir"
            ) from e
    for note in notes:
        tqdm.tqdm.write(note)
    if restored is None:
        if notes:
            tqdm.tqdm.write(f"no intact checkpoint is left in {ckpt.directory}; starting at 0")
        step = 0
    else:
        step = int(np.asarray(jax.device_get(restored["step"])).flat[0])
        fallback = " (the newest intact one)" if notes else ""
        tqdm.tqdm.write(
            f"resuming from the checkpoint at step {step}{fallback} in {ckpt.directory}"
        )
    for log in logs:
        log.truncate_after(step, num_steps)
    return state if restored is None else restored


def _subset(examples, n: int):
    if not n or n >= len(examples):
        return examples
    return examples.take(range(n))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config``, evaluates on validation and test, and returns the summary.

    Writes ``metrics.jsonl``, ``summary.json``, ``config.json`` and adapter-only checkpoints
    into ``workdir``; rerunning on the same workdir resumes from its last checkpoint.
    """
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    setup = build(config)
    mesh, t = setup.mesh, config.train
    primary = jax.process_index() == 0  # on several hosts, one writes the run's files
    if primary:
        write_text_atomic(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )

    forward = make_forward(setup)
    tx = make_optimizer(config)
    state = initial_state(setup, tx)
    frozen = setup.frozen  # placed in its shardings by build()
    train_step = jit_train_step(
        make_train_step(forward, tx, train_sums(setup)), mesh, state, frozen
    )
    eval_steps = {}  # one jitted eval step per kind of split

    def eval_step_for(examples):
        fn = eval_sums(examples)
        if fn not in eval_steps:
            eval_steps[fn] = evaluate.make_eval_step(forward, mesh, fn)
        return eval_steps[fn]

    key = jax.random.fold_in(jax.random.key(config.seed), 3)

    log = MetricsLog(os.path.join(workdir, "metrics.jsonl")) if primary else _NoLog()
    # Closed on every way out, a Ctrl-C included: close() waits for the save in flight.
    with Checkpointer(workdir, keep=config.keep_checkpoints) as ckpt:
        summary_path = os.path.join(workdir, "summary.json")
        restored_step = ckpt.latest_step()
        if (
            restored_step is not None
            and restored_step >= t.num_steps
            and os.path.exists(summary_path)
        ):
            # finished (alone or in a multi-adapter job): report, train nothing
            with open(summary_path) as f:
                return json.load(f)
        state = resume(ckpt, state, [log], t.num_steps)
        first_step = int(jax.device_get(state["step"]))

        task = setup.task
        batcher = make_batcher(setup, task.splits["train"], t.batch_size, config)
        val_subset = _subset(task.splits["validation"], config.task.max_eval_examples)

        def run_eval(split, examples, step):
            batches = make_batcher(setup, examples, config.eval_batch_size, config).eval_batches()
            step_fn = eval_step_for(examples)
            result = evaluate.evaluate(step_fn, state["trainable"], frozen, batches, mesh)
            log.write(step=step, split=split, **result)
            return result

        tqdm.tqdm.write(
            f"trainable parameters: {config.method} {lora.count(setup.delta):,}, "
            f"head {lora.count(setup.head):,} "
            f"(frozen base {setup.base_params:,}); {mesh.devices.size} "
            f"{jax.devices()[0].platform} device(s), mesh {sharding.describe(mesh)}, frozen base "
            f"{sharding.bytes_per_device(frozen) / 2**20:.1f} MiB per device of "
            f"{_nbytes(frozen) / 2**20:.1f} MiB"
        )

        bar = tqdm.tqdm(
            total=t.num_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True
        )
        pending = None  # step N-1's metrics, fetched while step N runs
        window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "tokens": 0, "since": time.time()}
        train_tokens = 0
        step_times, step_memory = [], None  # wall time of each step after the first
        loop_start = time.time()

        def drain(item):
            nonlocal train_tokens
            step, sums, tokens = item
            sums = jax.device_get(sums)
            if sums["nonfinite"]:
                msg = (
                    f"loss is NaN/Inf at step {step}; the state from step {step - 1} was kept. "
                    + nonfinite_advice(ckpt)
                )
                if not t.skip_nonfinite:
                    raise NonFiniteLossError(msg)
                tqdm.tqdm.write(f"skipping batch: {msg}")
                log.write(step=step, split="train", skipped_nonfinite=1)
                return
            for k in ("loss_sum", "correct", "count"):
                window[k] += float(sums[k])
            window["tokens"] += tokens
            train_tokens += tokens

        for step in range(first_step, t.num_steps):
            batch = batcher.train_batch(step)
            tokens = count_tokens(batch)
            step_start = time.time()
            batch = sharding.put_batch(batch, mesh)
            if step == first_step:
                step_memory = step_memory_bytes(train_step, state, frozen, batch, key)
            state, sums = train_step(state, frozen, batch, key)
            if pending is not None:
                drain(pending)
            pending = (step + 1, sums, tokens)  # metrics are labelled by the step count after it
            done = step + 1
            if done % config.log_every == 0 or done == t.num_steps:
                drain(pending)
                pending = None
                elapsed = time.time() - window["since"]
                row = {
                    "loss": window["loss_sum"] / max(window["count"], 1),
                    "accuracy": window["correct"] / max(window["count"], 1),
                    "tokens_per_second": window["tokens"] / max(elapsed, 1e-9),
                }
                log.write(step=done, split="train", **row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                window.update(loss_sum=0.0, correct=0.0, count=0.0, tokens=0, since=time.time())
            bar.update(1)
            if step > first_step:  # each iteration waits for one step's metrics: one step
                step_times.append(time.time() - step_start)
            if config.eval_every and done % config.eval_every == 0 and done != t.num_steps:
                eval_start = time.time()
                result = run_eval("validation", val_subset, done)
                bar.write(f"step {done}: validation accuracy {result['accuracy']:.4f}")
                paused = time.time() - eval_start  # evals do not count against train throughput
                window["since"] += paused
                loop_start += paused
            if (
                config.checkpoint_every and done % config.checkpoint_every == 0
            ) or done == t.num_steps:
                if pending is not None:
                    drain(pending)
                    pending = None
                ckpt.save(done, state)
        if pending is not None:
            drain(pending)
        bar.close()
        train_seconds = time.time() - loop_start
        ckpt.wait()

        val_result = run_eval("validation", task.splits["validation"], t.num_steps)
        test_split = _subset(task.splits["test"], config.task.max_test_examples)
        test_result = run_eval("test", test_split, t.num_steps)

        summary = make_summary(
            config,
            setup,
            {"delta": setup.delta, "head": setup.head},
            val_result,
            test_result,
            first_step=first_step,
            start=start,
            train_seconds=train_seconds,
            train_tokens=train_tokens,
            step_stats={
                # median wall time of a step (fetching the previous step's metrics included)
                "step_seconds_median": float(np.median(step_times)) if step_times else None,
                "step_memory_bytes": step_memory,
            },
        )
        if primary:
            write_json_atomic(summary_path, summary)
        return summary


def step_memory_bytes(jitted: Callable, *args) -> int | None:
    """Memory one train step needs on a device, in bytes, for these arguments' shapes.

    XLA's accounting of the compiled step (the same on CPU, GPU and TPU, so methods compare
    alike on any machine): arguments + outputs - donated (aliased) buffers + temporaries,
    the frozen base included. Costs one extra compile; None if the backend cannot say.
    """
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 -- a backend without the analysis: nothing to report
        return None
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


class _NoLog:
    """The metrics log of a process other than the first in a multi-host run: writes nothing."""

    def write(self, **event) -> None:
        pass

    def truncate_after(self, step: int, final_step: int | None = None) -> None:
        pass


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Defines --config and --workdir; only when run as a program, so importing this module
    (e.g. from lorax.generate) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_string(
        "workdir", None, "Run directory (default: runs/<config file name without .py>)."
    )
    flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    if flags.FLAGS.config.mesh.distributed:  # before anything touches a device
        sharding.initialize_distributed(flags.FLAGS.config.mesh)
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = flags.FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_path))[0]
    )
    summary = train_and_evaluate(flags.FLAGS.config, workdir)
    print(f"\nworkdir: {workdir}")
    for k in (
        "validation_accuracy",
        "test_accuracy",
        "lora_params",
        "head_params",
        "base_params",
        "wall_seconds",
        "tokens_per_second",
    ):
        v = summary[k]
        print(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

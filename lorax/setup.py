"""What a run is made of, built once from its config: model, method, frozen base, head, delta,
task and mesh (:func:`build`), and the forward pass over them (:func:`make_forward`).

Every config check that can fail does so in :func:`build`, before any training compute. The
frozen base goes from the host straight into its shardings on the mesh; the head and the new
delta are placed beside it (:mod:`lorax.sharding`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lorax import (
    assets,
    attention,
    checkpoints,
    evaluate,
    methods,
    nn,
    paths,
    quant,
    sharding,
    weights,
)
from lorax import data as data_lib
from lorax import dpo as dpo_lib
from lorax.checkpoints import best as best_lib
from lorax.data import filetasks
from lorax.models import decoder, encoder, reward
from lorax.objectives import OBJECTIVES, PAIR_OBJECTIVES, check_objective  # noqa: F401

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def choice(value: str, valid, field: str):
    """``valid[value]`` (or ``value``, for a set); an error naming ``field`` and the choices."""
    if value not in valid:
        raise ValueError(f"{field} = {value!r} is not valid; choose one of {sorted(valid)}")
    return valid[value] if isinstance(valid, Mapping) else value


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built once from a config."""

    model: Any  # encoder.EncoderClassifier or decoder.Decoder
    # "classify" (encoder + head), "lm" (causal LM) or "reward" (a decoder scoring each row by
    # its score head, train.objective = "reward")
    kind: str
    method: methods.Method  # what is trained beside the head and how the model sees it
    frozen: dict  # base leaves that are never trained (nested)
    head: dict  # base leaves trained beside the delta (train.trainable): the task head
    delta: dict  # the method's trainable tree, e.g. the LoRA delta
    task: data_lib.TaskData | None
    mesh: jax.sharding.Mesh  # frozen, head and delta are already placed on it (sharding.RULES)
    base_params: int  # parameters of the pretrained base model
    tokenizer: Any = None
    loss_chunk: int = 0  # causal LMs: positions per chunk of the LM loss (0: dense logits)
    loss_grad: str = "forward"  # how the chunks give the hidden states' gradient (evaluate.Hidden)
    class_weights: np.ndarray | None = None  # [C] task.class_weights (None: unweighted loss)
    objective: str = "lm"  # train.objective
    reference: dict | None = None  # DPO's reference adapter (dpo.reference); None: delta off
    pair_sums: Callable | None = None  # DPO's sums (dpo.sums), one function per run

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        return int(pad or 0)


# (dotted field, lowest valid value, highest valid value or None, integer?[, open]): ``open``
# names the bounds that are themselves invalid ("lo", "hi" or "lo,hi"). Numeric fields missing
# here are checked where they are read (their method, the mesh, the quantizer, file tasks);
# tests/test_user_errors.py holds every numeric field of configs/base.py to one or the other.
NUMBERS = (
    ("seed", 0, None, True),
    ("train.num_steps", 1, None, True),
    ("train.batch_size", 1, None, True),
    ("model.loss_chunk", -1, None, True),
    ("train.learning_rate", 0.0, None, False),
    ("train.head_learning_rate", 0.0, None, False),
    ("train.warmup_fraction", 0.0, 1.0, False),
    ("train.weight_decay", 0.0, None, False),
    ("train.grad_clip", 0.0, None, False),
    ("train.b1", 0.0, 1.0, False, "hi"),
    ("train.b2", 0.0, 1.0, False, "hi"),
    ("train.eps", 0.0, None, False, "lo"),  # 0: A's gradient is 0 at LoRA's init, 0/0 = NaN
    ("lora.alpha", 0.0, None, False, "lo"),
    ("prefix.hidden", 1, None, True),
    ("ptuning.hidden", 1, None, True),
    ("train.max_skipped_consecutive", 1, None, True),
    ("train.max_skipped_fraction", 0.0, 1.0, False),
    ("eval_batch_size", 1, None, True),
    ("log_every", 1, None, True),
    ("eval_every", 0, None, True),
    ("checkpoint_every", 0, None, True),
    ("keep_checkpoints", 1, None, True),
    ("task.max_length", 2, None, True),
    ("task.validation_size", 1, None, True),  # file tasks: a count or a fraction (below)
    ("task.max_eval_examples", 0, None, True),
    ("task.max_test_examples", 0, None, True),
    ("model.dropout", 0.0, 1.0, False),
    ("model.head_dropout", 0.0, 1.0, False),
    ("lora.dropout", 0.0, 1.0, False),
)


def check_numbers(config) -> None:
    """Raises naming the first numeric field (of :data:`NUMBERS`) outside its valid range, or
    not a number; fields a config lacks are skipped. A learning rate of 0 is allowed (it
    evaluates the untrained model through the same path)."""
    file_task = config.get("task") and config.task.get("name") in data_lib.CONFIG_TASKS
    if file_task:  # hold-outs as a count or a fraction of the training rows
        for field in ("validation_size", "test_size"):
            filetasks.check_size(config.task.get(field), f"task.{field}")
    for field, lo, hi, integer, *open_ in NUMBERS:
        if file_task and field == "task.validation_size":
            continue
        open_lo, open_hi = ("lo" in open_[0], "hi" in open_[0]) if open_ else (False, False)
        node = config
        for part in field.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            continue
        ok = isinstance(node, int | float) and not isinstance(node, bool)
        if integer:
            ok = ok and float(node).is_integer()
        ok = ok and node == node  # NaN is no value
        below = ok and (node <= lo if open_lo else node < lo)
        above = ok and hi is not None and (node >= hi if open_hi else node > hi)
        if not ok or below or above:
            kind = "an integer" if integer else "a number"
            low = f"{'(' if open_lo else '['}{lo}"
            span = (f"{'>' if open_lo else '>='} {lo}" if hi is None
                    else f"in {low}, {hi}{')' if open_hi else ']'}")  # fmt: skip
            raise ValueError(f"{field} = {node!r} is not valid; it must be {kind} {span}")


def _check_quantize(config, method: methods.Method) -> None:
    if not config.model.get("quantize"):
        return
    quant.check_kind_block(config.model.quantize, config.model.quant_block)
    if not isinstance(method, methods.LoRA):
        raise ValueError(
            f"model.quantize = {config.model.quantize!r} needs method = 'lora' (a quantized "
            f"base is frozen; method = {config.method!r} trains it); or set model.quantize = ''"
        )


def _model_and_params(config, model_config, base, key, mesh, abstract: bool = False):
    """The Flax model for the checkpoint's family and the params tree it runs on (random
    weights in ``model.base_dtype``, already on ``mesh``, when ``base`` is None; with
    ``abstract`` ``ShapeDtypeStruct`` s); attention chosen for the mesh's platform."""
    compute_dtype = choice(config.model.dtype, DTYPES, "model.dtype")
    base_dtype = choice(config.model.base_dtype, DTYPES, "model.base_dtype")
    requested = config.model.get("attention", "auto")
    kernel = functools.partial(
        attention.choose, requested, compute_dtype, platform=mesh.devices.flat[0].platform
    )
    gather_mode = fsdp_gather_mode(config)
    gather = None if gather_mode == "tree" else sharding.layer_gather(mesh, dtype=compute_dtype)
    if isinstance(model_config, decoder.DecoderConfig):
        c = dataclasses.replace(model_config, dropout=config.model.dropout)
        shape = (c.num_heads, c.num_kv_heads, c.head_dim)
        model = decoder.Decoder(
            c,
            compute_dtype,
            scan=config.model.scan,
            remat=nn.remat_name(config.model.remat),
            attention=kernel(*shape),
            gather=gather,
            regather=gather_mode == "layer",
        )
        if base is None:  # random weights (model.architecture), made on the mesh
            init = functools.partial(random_params, model_config, config.model.scan, base_dtype)
            shapes = jax.eval_shape(init, key)
            if abstract:
                return model, sharding.shaped(shapes, mesh)
            shardings = sharding.tree_shardings(shapes, mesh)
            return model, jax.jit(init, out_shardings=shardings)(jax.random.fold_in(key, 3))
        if not config.model.scan:
            return model, base
        return model, jax.eval_shape(paths.stack_layers, base) if abstract else paths.stack_layers(
            base
        )
    c = dataclasses.replace(model_config, hidden_dropout=config.model.dropout)
    heads = c.num_heads
    model = encoder.EncoderClassifier(
        config=c,
        num_classes=len(data_lib.label_names(config.task)),
        pooling=config.model.pooling,
        dtype=compute_dtype,
        head_dropout=config.model.head_dropout,
        attention=kernel(heads, heads, c.hidden_size // heads),
        gather=gather,
    )
    if abstract:
        return model, jax.eval_shape(lambda b: encoder.init_params(model, b, key), base)
    return model, encoder.init_params(model, base, key)


def _kind(config, model_config, with_task: bool) -> str:
    """The run's :attr:`Setup.kind` for its model and ``train.objective``, checked against
    its task (``with_task``)."""
    objective = choice(config.train.get("objective", "lm"), set(OBJECTIVES), "train.objective")
    kind = "lm" if isinstance(model_config, decoder.DecoderConfig) else "classify"
    if with_task:
        data_lib.check_task(config.task.name, kind, config.model.name)
    if objective != "reward":
        return kind
    if kind != "lm":
        raise ValueError(
            f"train.objective = 'reward' puts a score head on a decoder's last token; "
            f"model.name = {config.model.name!r} is an encoder (use a Llama-family or GPT-2 "
            "model)"
        )
    return "reward"


def _load_base(config, with_task: bool, abstract: bool = False) -> tuple[Any, dict | None, Any]:
    """``(model config, pretrained params or None, model dir or None)``: a checkpoint's (with
    ``abstract`` its shapes alone, :func:`lorax.checkpoints.pretrained_shapes`), or with
    ``model.architecture`` the described shape (random weights, made later on the mesh) and
    ``model.name``'s directory for the tokenizer alone."""
    architecture = config.model.get("architecture", "")
    if not architecture:
        model_dir = assets.resolve(config.model.name)
        load = checkpoints.pretrained_shapes if abstract else checkpoints.load_pretrained
        return *load(model_dir), model_dir
    if not config.model.name:
        if with_task:
            raise ValueError(
                "model.architecture gives random weights but no tokenizer: set model.name to a "
                "model whose tokenizer the task should use (e.g. 'smollm2-135m')"
            )
        return read_architecture(architecture), None, None
    return read_architecture(architecture), None, assets.resolve(config.model.name)


def read_architecture(architecture: str) -> decoder.DecoderConfig:
    """``model.architecture``: a Hugging Face ``config.json`` of a decoder (Llama, Qwen2, GPT-2)
    as JSON text or a path to one; an error names the field and what it holds."""
    text = architecture
    if not architecture.lstrip().startswith("{"):
        if not os.path.isfile(architecture):
            raise ValueError(
                f"model.architecture = {architecture!r} is neither JSON text nor a config.json "
                "file; give a Hugging Face config.json dict (e.g. configs/plan_llama8b_lora.py)"
            )
        with open(architecture) as f:
            text = f.read()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"model.architecture is not valid JSON: {e}") from None
    if fields.get("model_type") == "bert":
        raise ValueError(
            "model.architecture: random weights are made for decoders (llama, qwen2, gpt2); "
            "an encoder needs model.name"
        )
    return decoder.DecoderConfig.from_hf(fields)


def random_params(model_config: decoder.DecoderConfig, scan: bool, dtype, key) -> dict:
    """Random weights of ``model_config``'s decoder (Flax's initialisers) in ``dtype``, in the
    scanned layout with ``scan``; jittable, so :func:`build` makes them straight into their
    shardings and ``jax.eval_shape`` gives their shapes without allocating them."""
    ids = jnp.zeros((1, 2), jnp.int32)
    mask = decoder.causal_mask(jnp.ones_like(ids))
    params = decoder.Decoder(model_config).init(key, ids, ids, mask)["params"]
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return paths.stack_layers(params) if scan else params


def fsdp_gather_mode(config) -> str:
    """``mesh.fsdp_gather`` checked (:data:`lorax.sharding.GATHER_MODES`); "layer" if unset."""
    mode = config.mesh.get("fsdp_gather", "layer")
    return choice(mode, set(sharding.GATHER_MODES), "mesh.fsdp_gather")


def build(
    config: ml_collections.ConfigDict, *, with_task: bool = True, devices=None, abstract=False
) -> Setup:
    """Loads the model, checks the method against it, then loads and tokenizes the task.

    With ``model.scan`` :func:`paths.stack_layers` still stacks the layers on the default
    device first. With ``model.architecture`` no weights are read: random ones
    (:func:`random_params`) are made by one jitted call straight into their shardings.
    ``with_task=False`` skips the data (export, generation). ``devices``: the mesh's (default:
    all visible); the ``auto`` choices are made for their platform (a plan's GPUs chooses
    what the GPU run would). ``abstract`` (with ``with_task=False``): no weights read, no
    tokenizer; frozen, head and delta are ``ShapeDtypeStruct`` s (:func:`weights.abstract`).
    """
    if abstract and with_task:
        raise ValueError("an abstract setup has no data: build it with with_task=False")
    check_numbers(config)
    loss_grad = choice(config.model.get("loss_grad", "forward"), set(evaluate.LOSS_GRADS),
                       "model.loss_grad")  # fmt: skip
    choice(config.model.dtype, DTYPES, "model.dtype")
    base_dtype = choice(config.model.base_dtype, DTYPES, "model.base_dtype")
    mesh = sharding.mesh_from_config(config.mesh, devices)
    objective, reference = "lm", None
    if with_task:  # no batches otherwise
        sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
        sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
        data_lib.check_task(config.task.name)
        data_lib.check_sources(config.task)  # a missing file named before the model loads
        objective = check_objective(config)
        task_kind = "reward" if objective == "reward" else data_lib.registry.KINDS[config.task.name]
        _check_training_options(config, task_kind)  # before the model loads (minutes at 8B)
    method = methods.from_config(config)
    methods.lr_ratio_b(config)  # checked before any compute
    _check_quantize(config, method)

    key = jax.random.key(config.seed)
    model_config, base, model_dir = _load_base(config, with_task, abstract)
    kind = _kind(config, model_config, with_task)
    model, params = _model_and_params(
        config, model_config, base, jax.random.fold_in(key, 1), mesh, abstract
    )
    counted = params if base is None else base  # the pretrained base, without a new head
    base_params = sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(counted))
    extra_head = {"score": score_head(model_config, config.seed)} if kind == "reward" else {}
    trees = weights.abstract if abstract else weights.placed
    frozen, head, delta = trees(config, params, method, base_dtype, mesh, key, extra_head)
    if objective == "dpo" and not abstract:  # dpo.reference's adapter: the policy starts there
        delta, reference = dpo_lib.prepare(config, method, head, delta, mesh)
    chunk = loss_chunk(config, kind, model_config, mesh)
    tokenizer = None if model_dir is None or abstract else checkpoints.load_tokenizer(model_dir)
    task = None
    if with_task:
        file_task = config.task.name in data_lib.CONFIG_TASKS  # it finds its own files
        task = data_lib.load_task(
            config.task.name,
            None if file_task else assets.resolve(config.task.data),
            tokenizer,
            max_length=config.task.max_length,
            validation_size=config.task.validation_size,
            task_config=config.task,
        )
    return Setup(
        model, kind, method, frozen, head, delta, task, mesh, base_params, tokenizer, chunk,
        loss_grad, _class_weights_of(config, task, kind), objective, reference,
        dpo_lib.sums(config) if objective == "dpo" else None,
    )  # fmt: skip


def loss_chunk(config, kind: str, model_config, mesh, adapters: int = 1) -> int:
    """``model.loss_chunk`` resolved for the rows one device of ``mesh`` holds (``adapters`` ×
    ``train.batch_size`` over the data-parallel devices), on the mesh's platform."""
    if kind != "lm":
        return 0
    rows = adapters * config.train.batch_size // sharding.data_parallel_size(mesh)
    return evaluate.choose_loss_chunk(
        config.model.get("loss_chunk", -1),
        max(rows, 1),
        config.task.max_length,
        model_config.vocab_size,
        mesh.devices.flat[0].platform,
    )


def score_head(model_config: decoder.DecoderConfig, seed: int) -> dict:
    """A reward run's fresh ``score`` head for ``seed`` (the same in a single run and as one
    adapter of a multi-adapter job)."""
    key = jax.random.fold_in(jax.random.key(seed), 4)
    return reward.init_score(model_config, key)


def make_forward(
    setup: Setup, method: methods.Method | None = None, *, logits: bool = False
) -> Callable:
    """``forward(trainable, frozen, batch, rng, train) -> logits`` (a reward model's: its
    reward per row [R], :func:`lorax.models.reward.rewards`).

    The params the model sees are the frozen leaves, the trainable head leaves and the
    method's delta applied to them (``method``, default the setup's: for LoRA, wrapped around
    its kernels as LoraWeight nodes, never merged). Logits are [B, C] for a classifier and
    [B, T, V] for a causal LM; with ``setup.loss_chunk`` a causal LM returns an
    :class:`evaluate.Hidden` instead (which the LM sums take in place of logits), unless
    ``logits``. On a mesh with an fsdp axis each layer of the model gathers its own weights
    (``setup.model.gather``, :func:`sharding.layer_gather`); with ``mesh.fsdp_gather = "tree"``
    the model has no ``gather`` and the whole tree is gathered here first instead
    (:func:`sharding.gather_fsdp`). A DPO run's forward gives the policy's output with the
    reference's response log-probs beside it (:func:`lorax.dpo.forward`).
    """
    forward = _model_forward(setup, setup.method if method is None else method, logits)
    if setup.objective != "dpo":
        return forward
    reference = dpo_lib.reference_method(setup.method, setup.reference)
    return dpo_lib.forward(forward, _model_forward(setup, reference, logits))


def _model_forward(setup: Setup, method: methods.Method, logits: bool) -> Callable:
    """:func:`make_forward`'s pass of the model with ``method``'s view of the params."""
    model, kind, mesh = setup.model, setup.kind, setup.mesh
    pad_id = setup.pad_id
    whole_tree = model.gather is None
    chunk = 0 if logits else setup.loss_chunk

    def forward(trainable, frozen, batch, rng, train: bool):
        if whole_tree:
            frozen = sharding.gather_fsdp(frozen, mesh)
            trainable = sharding.gather_fsdp(trainable, mesh)
        params = method.apply(paths.overlay(frozen, trainable["head"]), trainable["delta"])
        rngs = {"dropout": rng} if train else {}
        if kind == "reward":  # [R] one scalar per row
            return model.apply(
                {"params": params},
                batch["input_ids"],
                batch["positions"],
                _lm_mask(batch),
                pad_id,
                not train,
                rngs=rngs,
                method=reward.rewards,
            )
        if kind == "lm":
            out, _ = model.apply(
                {"params": params},
                batch["input_ids"],
                batch["positions"],
                _lm_mask(batch),
                deterministic=not train,
                logits=not chunk,
                rngs=rngs,
            )
            if not chunk:
                return out

            head_model, head_params = _output_layer(model, params)

            def project(x_BCD, i):
                r = {"dropout": jax.random.fold_in(rng, i)} if train else {}
                variables = {"params": head_params}
                return head_model.apply(variables, x_BCD, not train, method="project", rngs=r)

            return evaluate.Hidden(out, project, chunk, setup.loss_grad)
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            deterministic=not train,
            rngs=rngs,
        )

    return forward


def _output_layer(model, params: dict) -> tuple[Any, dict]:
    """The model and params the chunks of the LM loss project with: under per-layer FSDP
    gathering, the output layer's weights gathered here once for all the chunks (planned for 8
    H100s, the 8B-shaped LoRA's chunks each gathered its 1 GiB output layer again inside the
    chunks' loop: 256 gathers, 260 GB over the links a step)."""
    if model.gather is None:
        return model, params
    scope = "embed" if model.config.tie_embeddings else "lm_head"
    return model.clone(gather=None), {**params, scope: model.gather({scope: params[scope]})[scope]}


def _lm_mask(batch: Mapping[str, Any]) -> jax.Array | None:
    """A causal-LM batch's attention mask: from its ``segment_ids`` (packing, padding), or
    None for a batch without them, every row one whole sequence (plain causal attention)."""
    return decoder.causal_mask(batch["segment_ids"]) if "segment_ids" in batch else None


def train_sums(setup: Setup) -> Callable:
    """The metric sums the train step's loss comes from (class-weighted with
    ``task.class_weights``)."""
    if setup.kind == "reward":
        return evaluate.reward_sums
    if setup.objective == "dpo":
        return setup.pair_sums
    if setup.kind == "lm":
        return evaluate.lm_sums
    if setup.class_weights is not None:
        return functools.partial(evaluate.classification_sums, class_weights_C=setup.class_weights)
    return evaluate.classification_sums


def _check_training_options(config, kind: str) -> None:
    """``train.keep_best`` and ``task.class_weights``, checked before the data is read."""
    best_lib.check(config.train.get("keep_best") or "", kind, config.eval_every, config.task.name)
    if config.task.get("class_weights"):
        class_weights(config.task, data_lib.label_names(config.task) if kind == "classify" else ())


def _class_weights_of(config, task, kind: str) -> np.ndarray | None:
    """A classification run's ``task.class_weights`` from its training rows (None if none)."""
    if task is None or kind != "classify":
        return None
    return class_weights(config.task, task.label_names, task.splits["train"].labels)


def class_weights(task_config, names, train_labels=None) -> np.ndarray | None:
    """``task.class_weights`` as [C] weights in class order, or None when it is empty.

    ``"balanced"``: n / (C · n_c) from the training rows' labels ``train_labels`` (scikit-
    learn's rule; None to check the value only); ``"name=w,name=w"`` or ``"{name: w}"``:
    those classes' weights, the others 1. Raises naming the field, a class the task lacks, a
    weight that is not a positive number, or a class with no training row under "balanced".
    """
    value = task_config.get("class_weights") or ""
    if not isinstance(value, str):
        raise ValueError(f"task.class_weights = {value!r} must be a string (see its comment)")
    value = value.strip()
    if not value:
        return None
    field = f"task.class_weights = {value!r}"
    if not names:
        raise ValueError(f"{field} is for classification tasks; this task has no classes")
    if value == "balanced":
        if train_labels is None:
            return np.ones(len(names), np.float32)
        counts = np.bincount(np.asarray(train_labels, int), minlength=len(names))
        if (counts == 0).any():
            empty = [n for n, c in zip(names, counts, strict=True) if c == 0]
            raise ValueError(f"{field}: the classes {empty} have no training row to balance")
        return (counts.sum() / (len(names) * counts)).astype(np.float32)
    if value.startswith("{"):
        try:
            given = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{field} is not a {{label: weight}} mapping ({e})") from None
        if not isinstance(given, dict):
            raise ValueError(f"{field} is not a {{label: weight}} mapping")
        pairs = [(str(k), w) for k, w in given.items()]
    else:
        pairs = []
        for part in value.split(","):
            name, eq, w = part.partition("=")
            if not eq:
                raise ValueError(
                    f"{field} is not valid; give 'balanced', 'label=weight,label=weight' or "
                    "'{label: weight}'"
                )
            pairs.append((name.strip(), w.strip()))
    weights = np.ones(len(names), np.float32)
    index = {n: i for i, n in enumerate(names)}
    for name, w in pairs:
        if name not in index:
            raise ValueError(f"{field}: {name!r} is not one of the classes {list(names)}")
        try:
            w = float(w)
        except (TypeError, ValueError):
            w = float("nan")
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"{field}: the weight of {name!r} must be a positive number")
        weights[index[name]] = w
    return weights


def eval_sums(examples, setup: Setup | None = None) -> Callable:
    """The metric sums of an eval split: preference pairs (a reward model's or a DPO run's),
    choice scoring, LM tokens or classes."""
    if isinstance(examples, data_lib.PreferenceExamples):
        return setup.pair_sums if setup and setup.pair_sums else evaluate.reward_sums
    if isinstance(examples, data_lib.ChoiceExamples):
        return evaluate.choice_sums
    if isinstance(examples, data_lib.CausalExamples):
        return evaluate.lm_sums
    return evaluate.classification_sums


def make_batcher(setup: Setup, examples, batch_size: int, config) -> Any:
    """The batcher of a split for this run (:func:`lorax.data.make_batcher`)."""
    return data_lib.make_batcher(
        examples, batch_size, config.task, seed=config.seed, pad_id=setup.pad_id
    )


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-pad) tokens in a batch of either kind."""
    if "segment_ids" in batch:
        return data_lib.count_lm_tokens(batch)
    return data_lib.count_tokens(batch)


def subset(examples, n: int):
    """The first ``n`` examples of a split (all of them when ``n`` is 0 or more than it has)."""
    if not n or n >= len(examples):
        return examples
    return examples.take(range(n))

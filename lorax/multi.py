"""K adapters trained at once over one frozen base: stacked deltas, rank masks, a vmapped step.

Shape letters: K adapters, D / F a kernel's input / output width, R the stack's rank.

Adapters with different targets and ranks are padded to the union of their targets and the
largest rank: at every union kernel the stack holds ``a`` [K, D, R] and ``b`` [K, R, F], and a
mask [K, R] that is 1 on adapter k's own rank slots. Padded slots start at zero, their
gradients are zero (a zero row of ``b`` and a zero column of ``a`` see no gradient) and the
step multiplies gradients and parameters by the mask anyway, so they stay exactly zero, as do
their Adam moments. Each adapter's scale (alpha/r) multiplies its ``b`` inside the step, so one
compiled step serves every scale. The step is ``jax.vmap`` over (state, batch, rng, learning
rates, mask, scales) with the base broadcast: one copy of the base for all K.

On a device mesh the base is sharded as in a single run (:mod:`lorax.sharding`), each stacked
factor and Adam moment beside its kernel with the K axis whole (the rules never split leading
axes), and each adapter's batch split over data × fsdp.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lorax import (
    attention,
    evaluate,
    loop,
    lora,
    methods,
    paths,
    runfiles,
    runlock,
    sharding,
    stops,
)
from lorax import data as data_lib
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax.checkpoints.state import Checkpointer
from lorax.models import encoder

# Fields that may differ between the adapters of one job; everything else must be equal.
PER_ADAPTER_FIELDS = (
    "seed",
    "lora.targets",
    "lora.rank",
    "lora.alpha",
    "lora.rank_pattern",
    "lora.alpha_pattern",
    "lora.layers",
    "lora.init",
    "lora.rslora",
    "train.learning_rate",
    "train.head_learning_rate",
    "dpo.beta",  # a β sweep of DPO adapters (each adapter's own, passed as batch["dpo_beta"])
)


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return paths.flatten(json.loads(config.to_json_best_effort()))


def check_compatible(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises unless the configs differ only in :data:`PER_ADAPTER_FIELDS` (so they share one
    method, and for a method other than LoRA, one delta shape)."""
    if not configs:
        raise ValueError("a multi-adapter job needs at least one config")
    if configs[0].method == "adalora":
        raise ValueError(
            "method = 'adalora' cannot run in a multi-adapter job (its rank allocator's state "
            "is not carried by the job's step); train its runs one by one (lorax.train, or "
            "experiments.methods, which does)"
        )
    if configs[0].train.get("keep_best"):  # refused before the base loads, not after
        raise ValueError(
            "train.keep_best is for single runs (lorax.train), not multi-adapter jobs; set "
            "train.keep_best = '' or train the runs one by one"
        )
    first = _flat_config(configs[0])
    allowed = {f.replace(".", "/") for f in PER_ADAPTER_FIELDS}
    for i, config in enumerate(configs):
        other = _flat_config(config)
        for key in sorted(set(first) | set(other)):
            if key not in allowed and first.get(key) != other.get(key):
                raise ValueError(
                    f"config {i} differs from config 0 at {key.replace('/', '.')} "
                    f"({other.get(key)!r} vs {first.get(key)!r}); adapters of one job may "
                    f"differ only in {list(PER_ADAPTER_FIELDS)}"
                )


@dataclasses.dataclass(frozen=True)
class Stack:
    """How K adapters sit in one stacked delta.

    Attributes:
      specs: each adapter's own spec.
      sites: each adapter's resolved kernels.
      rank: R, the largest rank.
      paths: the union of adapted kernel paths, sorted.
    """

    specs: tuple[lora.LoraSpec, ...]
    sites: tuple[dict[str, lora.Site], ...]
    rank: int
    paths: tuple[str, ...]

    @classmethod
    def build(cls, base: Any, specs: Sequence[lora.LoraSpec]) -> Stack:
        sites = tuple(lora.resolve(base, spec) for spec in specs)
        union = sorted({p for s in sites for p in s})
        rank = max(site.rank for s in sites for site in s.values())
        return cls(tuple(specs), sites, rank, tuple(union))

    @property
    def size(self) -> int:
        return len(self.specs)

    def union_spec(self, dropout: float) -> lora.LoraSpec:
        """One target per union kernel at rank R with scale 1 (scales are applied to ``b``)."""
        targets = tuple(
            lora.Target(f"^{re.escape(p)}$", self.rank, float(self.rank)) for p in self.paths
        )
        return lora.LoraSpec(targets, dropout=dropout, dora=self.specs[0].dora)

    def masks_and_scales(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """``{path: mask [K, R]}`` (1 on adapter k's rank slots) and ``{path: scale [K]}``."""
        masks, scales = {}, {}
        for path in self.paths:
            mask = np.zeros((self.size, self.rank), np.float32)
            scale = np.zeros((self.size,), np.float32)
            for k, sites in enumerate(self.sites):
                if path in sites:
                    mask[k, : sites[path].rank] = 1.0
                    scale[k] = sites[path].scale
            masks[path], scales[path] = jnp.asarray(mask), jnp.asarray(scale)
        return masks, scales

    def unstack(self, stacked: Any, k: int) -> dict[str, Any]:
        """Adapter k's delta in its own spec's shapes (its targets, its rank)."""
        flat = paths.flatten(stacked)
        out = {}
        for path, site in self.sites[k].items():
            a, b = flat[path + "/a"][k], flat[path + "/b"][k]
            out[path] = {"a": a[..., : site.rank], "b": b[..., : site.rank, :]}
            if path + "/m" in flat:  # DoRA's magnitudes
                out[path]["m"] = flat[path + "/m"][k]
        return paths.unflatten(out)


def _padded_shapes(stack: Stack, path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for sites in stack.sites:
        if path in sites:
            site = sites[path]
            return (
                (*site.stack, site.d_in, stack.rank),
                (*site.stack, stack.rank, site.d_out),
            )
    raise KeyError(path)


def _per_kernel(delta: Any, per_path: dict[str, jax.Array], fn) -> Any:
    """Applies ``fn(a_or_b_leaf, name, value_for_path)`` at every adapted kernel (leaves of
    paths without a value, e.g. every leaf of a method other than LoRA, pass unchanged)."""
    flat = paths.flatten(delta)
    out = {}
    for key, leaf in flat.items():
        path, _, part = key.rpartition("/")
        out[key] = fn(leaf, part, per_path[path]) if path in per_path else leaf
    return paths.unflatten(out)


def apply_mask(delta: Any, masks: dict[str, jax.Array], grads: bool = False) -> Any:
    """Zeroes the padded rank slots of one adapter's (unstacked-K) padded delta, or of its
    gradients. DoRA's magnitudes have no rank slots: their gradient is zeroed at the kernels
    this adapter does not adapt (so they keep ``m = ‖w‖`` and the kernel stays the base's)."""

    def fn(leaf, part, mask_R):
        if part == "m":
            return leaf * jnp.max(mask_R) if grads else leaf
        return leaf * (mask_R[None, :] if part == "a" else mask_R[:, None])

    return _per_kernel(delta, masks, fn)


def apply_scales(delta: Any, scales: dict[str, jax.Array]) -> Any:
    """Multiplies each kernel's ``b`` by this adapter's scale there."""
    return _per_kernel(delta, scales, lambda leaf, part, s: leaf * s if part == "b" else leaf)


def pad_and_stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """K batches -> one with a leading K axis; [B, T] arrays are right-padded with zeros to
    the longest T (pad tokens are masked out, so each adapter's result is unchanged)."""
    out = {}
    for key in batches[0]:
        arrays = [b[key] for b in batches]
        if arrays[0].ndim == 2:
            t = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, [(0, 0), (0, t - a.shape[1])]) for a in arrays]
        out[key] = np.stack(arrays)
    return out


def make_multi_train_step(forward, tx, sums_fn):
    """``step(state, frozen, batch_K, key_K, lr_K, head_lr_K, masks_K, scales_K, hyper_K)``,
    vmapped.

    ``state`` is a single run's state with a leading K axis on every leaf; each adapter's
    slice is updated exactly as :func:`lorax.step.make_train_step` would update it alone
    (the optimizer runs at unit peak rates and its updates are scaled by the adapter's own).
    ``hyper`` holds each adapter's own settings of the objective ([K] each, e.g. DPO's
    ``dpo_beta``), which the sums read from the batch.
    """

    def one(state, frozen, batch, key, lr, head_lr, masks, scales, hyper):
        with attention.vmapped():  # masked fused attention, batched over the K adapters
            return one_traced(state, frozen, batch, key, lr, head_lr, masks, scales, hyper)

    def one_traced(state, frozen, batch, key, lr, head_lr, masks, scales, hyper):
        rng = jax.random.fold_in(key, state["step"])
        batch = {**batch, **hyper}

        def loss_fn(trainable):
            scaled = {"delta": apply_scales(trainable["delta"], scales), "head": trainable["head"]}
            logits = forward(scaled, frozen, batch, rng, True)
            sums = sums_fn(logits, batch)
            return evaluate.train_loss(sums), sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(state["trainable"])
        grads = {"delta": apply_mask(grads["delta"], masks, grads=True), "head": grads["head"]}

        def update(trainable, opt_state):
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = {
                "delta": jax.tree_util.tree_map(lambda u: u * lr, updates["delta"]),
                "head": jax.tree_util.tree_map(lambda u: u * head_lr, updates["head"]),
            }
            trainable = jax.tree_util.tree_map(jnp.add, trainable, updates)
            delta = apply_mask(trainable["delta"], masks)
            return {"delta": delta, "head": trainable["head"]}, opt_state

        return step_lib.next_state(state, update, sums)

    return jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0, 0, 0, 0))


def make_multi_eval_step(forward, sums_fn, mesh):
    """``eval(trainable_K, frozen, batch, scales_K, hyper_K) -> sums_K``: every adapter on
    one batch."""

    def one(trainable, frozen, batch, scales, hyper):
        scaled = {"delta": apply_scales(trainable["delta"], scales), "head": trainable["head"]}
        with attention.vmapped():
            return sums_fn(forward(scaled, frozen, batch, None, False), {**batch, **hyper})

    return jax.jit(
        jax.vmap(one, in_axes=(0, None, None, 0, 0)), out_shardings=sharding.replicated(mesh)
    )


def jit_multi_train_step(step, mesh, state: Any, frozen: Any):
    """Jits a :func:`make_multi_train_step` step: the state and base follow the rules, the
    [K, B, ...] batch is split along B, the per-adapter keys, rates, masks and scales are
    replicated, and the state is donated (:func:`lorax.step.jit_train_step`)."""
    return step_lib.jit_train_step(step, mesh, state, frozen, leading=1, extra=5)


def union_method(stack: Stack | None, setup: setup_lib.Setup, dropout: float) -> methods.Method:
    """The method every adapter's slice runs: LoRA over the padded union of the stack, or
    (for a method other than LoRA, whose deltas share one shape) the setup's own."""
    return setup.method if stack is None else methods.LoRA(stack.union_spec(dropout))


class MultiStepper(loop.Stepper):
    """The device side of a job of K compatible configs over one base: a stacked state, the
    vmapped step, K batchers, and evaluation of every adapter on the same batches."""

    def __init__(
        self,
        configs: Sequence[ml_collections.ConfigDict],
        names: Sequence[str],
        setup: setup_lib.Setup | None = None,
    ):
        """``setup``: the job's, already built from ``configs[0]`` (a plan's abstract one);
        default :func:`lorax.setup.build` of it."""
        configs = list(configs)
        check_compatible(configs)
        c0 = configs[0]
        setup = setup or setup_lib.build(c0)
        # the auto LM-loss chunk for all K adapters' rows: the vmapped step holds them together
        chunk = setup_lib.loss_chunk(c0, setup.kind, setup.model.config, setup.mesh, len(configs))
        setup = dataclasses.replace(setup, loss_chunk=chunk)
        self.setup, self.config, self.configs, self.names = setup, c0, configs, list(names)
        self.stack = None
        if isinstance(setup.method, methods.LoRA):
            specs = [methods.lora_spec(c.lora) for c in configs]
            self.stack = Stack.build(setup.frozen, specs)
        self.forward = setup_lib.make_forward(
            setup, union_method(self.stack, setup, c0.lora.dropout)
        )
        self.tx = step_lib.make_optimizer(c0.train, True, methods.lr_ratio_b(c0))
        self.masks, self.scales = ({}, {}) if self.stack is None else self.stack.masks_and_scales()
        self.hyper = {}
        if setup.objective == "dpo":
            if c0.dpo.reference:
                raise ValueError(
                    f"dpo.reference = {c0.dpo.reference!r}: a multi-adapter DPO job starts "
                    "every adapter from a fresh delta against the base; train runs from a "
                    "reference adapter one by one (lorax.train)"
                )
            self.hyper["dpo_beta"] = jnp.asarray([c.dpo.beta for c in configs], jnp.float32)
        self.eval_args = (self.scales, self.hyper)
        self.rates = (
            jnp.asarray([c.train.learning_rate for c in configs], jnp.float32),
            jnp.asarray([step_lib.head_learning_rate(c.train) for c in configs], jnp.float32),
        )
        self._keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 3) for c in configs])
        self._eval_steps = {}

    @functools.cached_property
    def _batchers(self) -> list:
        """Each adapter's train batcher, made at the first batch (a plan has no task)."""
        train, c0 = self.setup.task.splits["train"], self.config
        return [
            setup_lib.make_batcher(self.setup, train, c0.train.batch_size, c) for c in self.configs
        ]

    def _adapter_state(self, config, frozen, pretrained) -> dict:
        """Adapter ``config``'s step-0 state, exactly as its single run would start, over the
        job's ``frozen`` base (``pretrained``: the setup's delta, a partial method's leaves)."""
        setup = self.setup
        key = jax.random.fold_in(jax.random.key(config.seed), 2)
        if self.stack is not None:
            spec = methods.lora_spec(config.lora)
            delta = _pad_one(self.stack, methods.LoRA(spec).init(frozen, key), frozen)
        elif setup.method.replaces_base:  # the pretrained leaves, for every seed
            delta = pretrained
        else:
            delta = setup.method.init(frozen, key)
        head = _head_for_seed(setup, config)
        return step_lib.fresh_state({"delta": delta, "head": head}, self.tx)

    def init_state(self) -> dict:
        """The stacked step-0 state, each adapter initialised exactly as its single run would
        be, placed on the job's mesh (the rules never split the leading K axis)."""
        states = [
            jax.tree_util.tree_map(
                np.asarray, self._adapter_state(c, self.setup.frozen, self.setup.delta)
            )
            for c in self.configs
        ]
        state = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *states)
        return sharding.put(state, self.setup.mesh)

    def state_shapes(self) -> dict:
        """:meth:`init_state`'s shapes and shardings, nothing computed (``lorax.plan``): the
        stacked states of :meth:`_adapter_state`, each ``jax.ShapeDtypeStruct`` given a
        leading K axis."""
        one = jax.eval_shape(
            lambda f, d: self._adapter_state(self.config, f, d), self.setup.frozen, self.setup.delta
        )
        k = self.size
        stacked = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), one
        )
        return sharding.shaped(stacked, self.setup.mesh)

    def jit(self, state):
        fn = make_multi_train_step(self.forward, self.tx, setup_lib.train_sums(self.setup))
        self._step = jit_multi_train_step(fn, self.setup.mesh, state, self.setup.frozen)
        return self._step

    def batch(self, step: int):
        batches = [b.train_batch(step) for b in self._batchers]
        tokens = np.array([setup_lib.count_tokens(b) for b in batches])
        batch = sharding.put_batch(pad_and_stack_batches(batches), self.setup.mesh, leading=1)
        return batch, tokens

    def args(self, state, batch) -> tuple:
        return (state, self.setup.frozen, batch, self._keys, *self.rates, self.masks, self.scales,
                self.hyper)  # fmt: skip

    def memory_compared(self, state, batch, step_bytes):
        return {}  # measured on single runs (the job's step holds K adapters' batches)

    def make_eval_step(self, sums_fn):
        return make_multi_eval_step(self.forward, sums_fn, self.setup.mesh)

    def adapter(self, state, k: int) -> dict[str, Any]:
        """Adapter k's ``{"delta", "head"}`` in its own shapes (its targets, its rank)."""
        delta = state["trainable"]["delta"]
        if self.stack is None:
            delta = jax.tree_util.tree_map(lambda x: x[k], delta)
        else:
            delta = self.stack.unstack(delta, k)
        return {
            "delta": delta,
            "head": jax.tree_util.tree_map(lambda x: x[k], state["trainable"]["head"]),
        }


def _pad_one(stack: Stack, delta: Any, frozen: Any) -> Any:
    """One adapter's delta padded to the union and rank R (no K axis). With DoRA a kernel the
    adapter does not adapt gets ``m = ‖w‖`` per column, so it stays the base kernel."""
    flat, base = paths.flatten(delta), paths.flatten(frozen)
    out = {}
    for path in stack.paths:
        shape_a, shape_b = _padded_shapes(stack, path)
        if path + "/a" in flat:
            r = flat[path + "/a"].shape[-1]
            lead = [(0, 0)] * (len(shape_a) - 2)
            out[path] = {
                "a": jnp.pad(flat[path + "/a"], [*lead, (0, 0), (0, stack.rank - r)]),
                "b": jnp.pad(flat[path + "/b"], [*lead, (0, stack.rank - r), (0, 0)]),
            }
        else:
            out[path] = {"a": jnp.zeros(shape_a), "b": jnp.zeros(shape_b)}
        if stack.specs[0].dora:
            m = flat.get(path + "/m")
            if m is None:
                m = jnp.linalg.norm(jnp.asarray(base[path], jnp.float32), axis=-2)
            out[path]["m"] = m
    return paths.unflatten(out)


def _head_for_seed(setup: setup_lib.Setup, config) -> dict:
    """The trained head a single run with this config's seed starts from."""
    if not setup.head:
        return {}
    if setup.kind == "reward":  # the score head drawn from the seed; other leaves as loaded
        return {**setup.head, "score": setup_lib.score_head(setup.model.config, config.seed)}
    if setup.kind == "classify":
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        head_flat = paths.flatten({"head": encoder.init_head(setup.model, key)})
        return paths.unflatten(
            {p: head_flat.get(p, v) for p, v in paths.flatten(setup.head).items()}
        )
    return setup.head


def train_many(
    configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]
) -> list[dict[str, Any]]:
    """Trains K compatible configs at once; writes each workdir as a single run would.

    Each workdir gets ``metrics.jsonl``, ``summary.json`` (the single-run keys, plus
    ``multi_adapter_job`` = K) and an adapter checkpoint at the final step; the job's stacked
    state is checkpointed under ``<workdirs[0]>/job`` so an interrupted job resumes. A workdir
    that already has its ``summary.json`` (finished before the job was cut off) is not written
    again; its summary is read back. Run the same configs and workdirs again to resume.
    """
    if len(configs) != len(workdirs):
        raise ValueError(f"{len(configs)} configs for {len(workdirs)} workdirs")
    with runlock.hold_all(workdirs):
        for config, workdir in zip(configs, workdirs, strict=True):
            data_lib.resolve_labels(config)  # config.json names the classes
            runfiles.write_config_once(workdir, config)  # refuses a changed config, up front
        return _train_many(configs, workdirs)


def _train_many(configs, workdirs) -> list[dict[str, Any]]:
    summaries = [loop.finished(w) for w in workdirs]  # None for each run still to train
    if all(s is not None for s in summaries):
        return summaries
    start = time.time()
    stepper = MultiStepper(configs, workdirs)
    c0, num_steps = configs[0], configs[0].train.num_steps
    logs = [
        None
        if s is not None
        else runfiles.MetricsLog(os.path.join(w, "metrics.jsonl"), runfiles.tensorboard_dir(w, c))
        for w, s, c in zip(workdirs, summaries, configs, strict=True)
    ]
    with Checkpointer(os.path.join(workdirs[0], "job"), keep=c0.keep_checkpoints) as job_ckpt:
        try:
            result = loop.run(stepper, stepper.init_state(), job_ckpt, logs)
        except KeyboardInterrupt:
            job_ckpt.wait()  # the save in flight lands: the message names it
            raise stops.interrupted(job_ckpt) from None

    for k, (config, workdir) in enumerate(zip(configs, workdirs, strict=True)):
        if summaries[k] is not None:  # finished before the job was cut off: left as it is
            continue
        adapter = stepper.adapter(result.state, k)
        with Checkpointer(workdir, keep=config.keep_checkpoints) as ckpt:
            if ckpt.latest_step() != num_steps:  # else saved before a cut: the same adapter
                step = jnp.asarray(num_steps, jnp.int32)
                ckpt.save(num_steps, {"step": step, "trainable": adapter})
            ckpt.wait()
        summary = loop.make_summary(config, stepper.setup, adapter, result, k, start)
        summary["multi_adapter_job"] = stepper.size
        # Written last: a workdir with summary.json is finished (sweeps skip it).
        loop.write_summary(workdir, summary)
        summaries[k] = summary
    return summaries

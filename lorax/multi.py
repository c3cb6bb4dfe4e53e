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
import tqdm

from lorax import lora, paths, runfiles, sharding
from lorax import train as train_lib
from lorax.checkpoints.state import Checkpointer

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
)


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return paths.flatten(json.loads(config.to_json_best_effort()))


def check_compatible(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises unless the configs differ only in :data:`PER_ADAPTER_FIELDS` (so they share one
    method, and for a method other than LoRA, one delta shape)."""
    if not configs:
        raise ValueError("a multi-adapter job needs at least one config")
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
        return lora.LoraSpec(targets, dropout=dropout)

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


def apply_mask(delta: Any, masks: dict[str, jax.Array]) -> Any:
    """Zeroes the padded rank slots of one adapter's (unstacked-K) padded delta."""

    def fn(leaf, part, mask_R):
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
    """``step(state, frozen, batch_K, key_K, lr_K, head_lr_K, masks_K, scales_K)``, vmapped.

    ``state`` is a single run's state with a leading K axis on every leaf; each adapter's
    slice is updated exactly as :func:`lorax.train.make_train_step` would update it alone
    (the optimizer runs at unit peak rates and its updates are scaled by the adapter's own).
    """

    def one(state, frozen, batch, key, lr, head_lr, masks, scales):
        rng = jax.random.fold_in(key, state["step"])

        def loss_fn(trainable):
            scaled = {"delta": apply_scales(trainable["delta"], scales), "head": trainable["head"]}
            logits = forward(scaled, frozen, batch, rng, True)
            sums = sums_fn(logits, batch)
            return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(state["trainable"])
        grads = {"delta": apply_mask(grads["delta"], masks), "head": grads["head"]}
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        updates = {
            "delta": jax.tree_util.tree_map(lambda u: u * lr, updates["delta"]),
            "head": jax.tree_util.tree_map(lambda u: u * head_lr, updates["head"]),
        }
        trainable = jax.tree_util.tree_map(jnp.add, state["trainable"], updates)
        trainable = {"delta": apply_mask(trainable["delta"], masks), "head": trainable["head"]}
        return train_lib.next_state(state, trainable, opt_state, sums)

    return jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0, 0, 0))


def make_multi_eval_step(forward, sums_fn, mesh):
    """``eval(trainable_K, frozen, batch, scales_K) -> sums_K``: every adapter on one batch."""

    def one(trainable, frozen, batch, scales):
        scaled = {"delta": apply_scales(trainable["delta"], scales), "head": trainable["head"]}
        return sums_fn(forward(scaled, frozen, batch, None, False), batch)

    return jax.jit(
        jax.vmap(one, in_axes=(0, None, None, 0)), out_shardings=sharding.replicated(mesh)
    )


@dataclasses.dataclass
class Job:
    """A multi-adapter job built from K compatible configs."""

    configs: list[ml_collections.ConfigDict]
    setup: train_lib.Setup  # the base, task and model, shared (its delta/spec: adapter 0's)
    stack: Stack | None  # None for a method other than LoRA: its deltas share one shape
    heads: list[dict]

    def forward(self):
        """The forward pass every adapter's slice runs (LoRA: over the padded union)."""
        if self.stack is None:
            return train_lib.make_forward(self.setup)
        union = self.stack.union_spec(self.configs[0].lora.dropout)
        return train_lib.make_forward(dataclasses.replace(self.setup, spec=union))

    def masks_and_scales(self):
        return ({}, {}) if self.stack is None else self.stack.masks_and_scales()

    def unstack(self, stacked_delta, k: int):
        """Adapter k's delta in its own shapes."""
        if self.stack is None:
            return jax.tree_util.tree_map(lambda x: x[k], stacked_delta)
        return self.stack.unstack(stacked_delta, k)


def build(configs: Sequence[ml_collections.ConfigDict]) -> tuple[Job, dict]:
    """Checks the configs, loads the base and task once, and returns the job and the stacked
    initial state (each adapter initialised exactly as its single run would be), placed on
    the job's mesh."""
    configs = list(configs)
    check_compatible(configs)
    setup = train_lib.build(configs[0])
    method = setup.transform
    stack = None
    if setup.spec is not None:
        stack = Stack.build(setup.frozen, [train_lib.lora_spec(c) for c in configs])
    deltas, heads = [], []
    for config in configs:
        key = jax.random.fold_in(jax.random.key(config.seed), 2)
        if stack is not None:
            deltas.append(lora.init(setup.frozen, train_lib.lora_spec(config), key))
        elif method is None or method.replaces_base:  # the pretrained leaves, for every seed
            deltas.append(setup.delta)
        else:
            deltas.append(method.init(setup.frozen, key))
        heads.append(jax.tree_util.tree_map(np.asarray, _head_for_seed(setup, config)))
    job = Job(configs, setup, stack, heads)
    tx = train_lib.make_optimizer(configs[0], unit_peaks=True)
    states = []
    for k in range(len(configs)):
        delta = deltas[k] if stack is None else _pad_one(stack, deltas[k])
        trainable = {"delta": delta, "head": heads[k]}
        states.append({
            "step": jnp.zeros((), jnp.int32), "trainable": trainable,
            "opt_state": tx.init(trainable),
        })  # fmt: skip
    state = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *states)
    # each leaf sharded as its single-run leaf; the rules never split the leading K axis
    return job, sharding.put(state, setup.mesh)


def jit_multi_train_step(step, mesh, state: Any, frozen: Any):
    """Jits a :func:`make_multi_train_step` step with explicit shardings; donates the state.

    The state and base follow the rules, the [K, B, ...] batch is split along B, and the
    per-adapter keys, rates, masks and scales are replicated.
    """
    state_sh = sharding.tree_shardings(state, mesh)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, frozen_sh, batch_sh, rep, rep, rep, rep, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def _pad_one(stack: Stack, delta: Any) -> Any:
    """One adapter's delta padded to the union and rank R (no K axis)."""
    flat = paths.flatten(delta)
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
    return paths.unflatten(out)


def _head_for_seed(setup: train_lib.Setup, config) -> dict:
    """The trained head a single run with this config's seed starts from."""
    if not setup.head:
        return {}
    if setup.kind == "classify":
        from lorax.models import encoder

        d = setup.head["head"]["kernel"].shape[0]
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        init = encoder._head(setup.model.num_classes, setup.model.dtype).init(
            key, jnp.zeros((1, d), jnp.float32)
        )
        head_flat = paths.flatten({"head": init["params"]})
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
    summary_paths = [os.path.join(w, "summary.json") for w in workdirs]
    finished = [os.path.exists(p) for p in summary_paths]
    if all(finished):
        return [_read_json(p) for p in summary_paths]
    start = time.time()
    job, state = build(configs)
    setup, c0 = job.setup, configs[0]
    k_adapters, t, mesh = len(configs), c0.train, setup.mesh
    for w in workdirs:
        os.makedirs(w, exist_ok=True)
    forward = job.forward()
    tx = train_lib.make_optimizer(c0, unit_peaks=True)
    frozen = setup.frozen  # placed in its shardings by train.build()
    step_fn = jit_multi_train_step(
        make_multi_train_step(forward, tx, train_lib.train_sums(setup)), mesh, state, frozen
    )
    masks, scales = job.masks_and_scales()
    lrs = jnp.asarray([c.train.learning_rate for c in configs], jnp.float32)
    head_lrs = jnp.asarray([train_lib.head_learning_rate(c) for c in configs], jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 3) for c in configs])

    job_ckpt = Checkpointer(os.path.join(workdirs[0], "job"), keep=c0.keep_checkpoints)
    logs = [runfiles.MetricsLog(os.path.join(w, "metrics.jsonl")) for w in workdirs]
    unfinished = [log for log, done in zip(logs, finished, strict=True) if not done]
    state = train_lib.resume(job_ckpt, state, unfinished, t.num_steps)
    first = _step(state)
    task = setup.task
    batchers = [
        train_lib.make_batcher(setup, task.splits["train"], t.batch_size, c) for c in configs
    ]
    train_tokens, loop_start = 0, time.time()
    window = None  # the metric sums of the steps since the last log row, kept on the device
    bar = tqdm.tqdm(total=t.num_steps, initial=first, desc=f"train x{k_adapters}", unit="step")
    for step in range(first, t.num_steps):
        batches = [b.train_batch(step) for b in batchers]
        train_tokens += sum(train_lib.count_tokens(b) for b in batches)
        batch = sharding.put_batch(pad_and_stack_batches(batches), mesh, leading=1)
        state, sums = step_fn(state, frozen, batch, keys, lrs, head_lrs, masks, scales)
        # a skipped (non-finite) step adds nothing to the window's mean
        kept = {k: jnp.where(sums["nonfinite"] > 0, 0.0, sums[k]) for k in _WINDOW}
        kept["nonfinite"] = sums["nonfinite"]
        window = kept if window is None else jax.tree_util.tree_map(jnp.add, window, kept)
        done = step + 1
        if done % c0.log_every == 0 or done == t.num_steps:
            sums, window = jax.device_get(window), None
            if np.any(sums["nonfinite"]) and not t.skip_nonfinite:
                bad = [workdirs[i] for i in np.flatnonzero(sums["nonfinite"])]
                raise train_lib.NonFiniteLossError(
                    f"loss is NaN/Inf at or before step {done} in {bad}. "
                    + train_lib.nonfinite_advice(job_ckpt)
                )
            for k, log in enumerate(logs):
                if finished[k]:
                    continue
                loss, correct, count = (float(sums[key][k]) for key in _WINDOW)
                log.write(step=done, split="train", loss=loss / max(count, 1),
                          accuracy=correct / max(count, 1))  # fmt: skip
            total = sums["loss_sum"].sum() / max(sums["count"].sum(), 1)
            bar.set_postfix(loss=f"{total:.4f}")
        bar.update(1)
        if (c0.checkpoint_every and done % c0.checkpoint_every == 0) or done == t.num_steps:
            job_ckpt.save(done, state)
    bar.close()
    train_seconds = time.time() - loop_start
    job_ckpt.wait()
    job_ckpt.close()

    summaries = []
    results = {}
    for split in ("validation", "test"):
        examples = task.splits[split]
        if split == "test":
            examples = train_lib._subset(examples, c0.task.max_test_examples)
        results[split] = _evaluate_all(setup, forward, state, frozen, scales, examples, c0)
    for k, (config, workdir) in enumerate(zip(configs, workdirs, strict=True)):
        if finished[k]:
            summaries.append(_read_json(summary_paths[k]))
            continue
        trainable_k = jax.tree_util.tree_map(lambda x, k=k: x[k], state["trainable"])
        delta_k = job.unstack(state["trainable"]["delta"], k)
        adapter = {"delta": delta_k, "head": trainable_k["head"]}
        ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
        if ckpt.latest_step() != t.num_steps:  # else saved before a cut: the same adapter
            ckpt.save(
                t.num_steps, {"step": jnp.asarray(t.num_steps, jnp.int32), "trainable": adapter}
            )
        ckpt.wait()
        ckpt.close()
        runfiles.write_text_atomic(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
        val, test = results["validation"][k], results["test"][k]
        for split, r in (("validation", val), ("test", test)):
            logs[k].write(step=t.num_steps, split=split, **r)
        summary = train_lib.make_summary(
            config, setup, adapter, val, test, first_step=first, start=start,
            train_seconds=train_seconds, train_tokens=train_tokens,
        )  # fmt: skip
        summary["multi_adapter_job"] = k_adapters
        # Written last: a workdir with summary.json is finished (sweeps skip it).
        runfiles.write_json_atomic(summary_paths[k], summary)
        summaries.append(summary)
    return summaries


_WINDOW = ("loss_sum", "correct", "count")


def _step(state) -> int:
    return int(jax.device_get(state["step"][0]))


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _evaluate_all(setup, forward, state, frozen, scales, examples, config) -> list[dict]:
    """Every adapter's loss and accuracy on one split (the same batches for all)."""
    sums_fn = train_lib.eval_sums(examples)
    step = make_multi_eval_step(forward, sums_fn, setup.mesh)
    batcher = train_lib.make_batcher(setup, examples, config.eval_batch_size, config)
    total = None
    for batch in batcher.eval_batches():
        sums = step(state["trainable"], frozen, sharding.put_batch(batch, setup.mesh), scales)
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    total = jax.device_get(total)
    return [
        {
            "loss": float(total["loss_sum"][k]) / float(total["count"][k]),
            "accuracy": float(total["correct"][k]) / float(total["count"][k]),
            "count": int(total["count"][k]),
        }
        for k in range(len(total["count"]))
    ]

"""The host loop every training run goes through, alone or as K adapters of one job.

A :class:`Stepper` is the device side (its jitted step, batches, evaluation); :func:`run` is
the host side, the same for both: resume from the newest intact checkpoint, step through the
data, read step N−1's metric sums while step N runs, apply the NaN/Inf policy on every step,
log each adapter's window mean every ``log_every`` steps, evaluate every ``eval_every``,
checkpoint every ``checkpoint_every``, and end with the validation and test evaluations.
:func:`make_summary` turns a finished adapter into its ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from lorax import adalora, evaluate, lora, methods, paths, quant, runfiles, sharding, stops
from lorax import setup as setup_lib
from lorax import step as step_lib
from lorax.checkpoints import best as best_lib
from lorax.checkpoints.state import Checkpointer, IncompatibleCheckpointError
from lorax.runfiles import MetricsLog
from lorax.stops import NonFiniteLossError

_WINDOW = ("loss_sum", "correct", "count")
_SUMMARY_ONLY = ("per_class", "confusion")


class Stepper:
    """The device side of one run: a single adapter (this class) or K of them (the
    multi-adapter job's subclass). Metric sums and token counts come per adapter, [K]."""

    def __init__(self, setup: setup_lib.Setup, config, name: str):
        self.setup, self.config, self.names = setup, config, [name]
        self.configs = [config]
        self.forward = setup_lib.make_forward(setup)
        self.tx = step_lib.make_optimizer(config.train, lr_ratio_b=methods.lr_ratio_b(config))
        self._key = jax.random.fold_in(jax.random.key(config.seed), 3)
        self._batcher = setup.task and setup_lib.make_batcher(  # a plan's setup has no task
            setup, setup.task.splits["train"], config.train.batch_size, config
        )
        self._eval_steps: dict[Any, Any] = {}  # one jitted eval step per kind of split

    @property
    def size(self) -> int:
        return len(self.names)

    def init_state(self) -> dict:
        trainable = {"delta": self.setup.delta, "head": self.setup.head}
        return step_lib.initial_state(trainable, self.tx, self.setup.mesh, self.setup.method)

    def state_shapes(self) -> dict:
        """:meth:`init_state`'s shapes and shardings, nothing computed (``lorax.plan``)."""
        s = self.setup
        return step_lib.state_shapes({"delta": s.delta, "head": s.head}, self.tx, s.mesh, s.method)

    def jit(self, state):
        """Jits (and returns) the step for ``state``'s shapes and shardings, before step 0."""
        sums = setup_lib.train_sums(self.setup)
        fn = step_lib.make_train_step(self.forward, self.tx, sums, self.setup.method)
        self._step = step_lib.jit_train_step(fn, self.setup.mesh, state, self.setup.frozen)
        return self._step

    def batch(self, step: int) -> tuple[Any, np.ndarray]:
        """Step ``step``'s batch on the mesh and each adapter's real tokens in it."""
        batch = self._batcher.train_batch(step)
        tokens = setup_lib.count_tokens(batch)
        return sharding.put_batch(batch, self.setup.mesh), np.array([tokens])

    def args(self, state, batch) -> tuple:
        return (state, self.setup.frozen, batch, self._key)

    def step(self, state, batch):
        return self._step(*self.args(state, batch))

    def memory_bytes(self, state, batch) -> int | None:
        return step_lib.step_memory_bytes(self._step, *self.args(state, batch))

    def evaluate(self, state, examples, desc: str = "") -> list[dict[str, float]]:
        """Each adapter's mean loss, accuracy and row count on ``examples`` (all adapters on
        the same batches); for a split of LM tokens also its perplexity. With ``desc``, a
        progress bar of that name counts the batches."""
        fn = setup_lib.eval_sums(examples, self.setup)
        if fn not in self._eval_steps:
            self._eval_steps[fn] = self.make_eval_step(fn)
        batcher = setup_lib.make_batcher(
            self.setup, examples, self.config.eval_batch_size, self.config
        )
        step, trainable, frozen = self._eval_steps[fn], state["trainable"], self.setup.frozen
        with _eval_bar(desc, getattr(batcher, "num_eval_batches", None)) as bar:
            results = evaluate.evaluate(
                lambda b: step(trainable, frozen, b, *self.eval_args),
                batcher.eval_batches(),
                self.setup.mesh,
                progress=bar,
            )
        if fn is evaluate.lm_sums:  # a split of LM tokens: its loss is the mean token loss
            for r in results:
                r["perplexity"] = evaluate.perplexity(r["loss"])
        return results

    eval_args: tuple = ()  # what the eval step takes after (trainable, frozen, batch)

    def make_eval_step(self, sums_fn):
        """The jitted ``(trainable, frozen, batch, *eval_args) -> sums`` for a kind of split."""
        return evaluate.make_eval_step(self.forward, self.setup.mesh, sums_fn)

    def adapter(self, state, k: int) -> dict[str, Any]:
        """Adapter k's trained ``{"delta", "head"}`` in its own shapes."""
        del k
        return state["trainable"]


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _eval_bar(desc: str, total: int | None):
    """A progress bar of an evaluation's batches (none without ``desc``): it stays on screen
    for a final evaluation, and goes when a periodic one ends."""
    if not desc:
        return _NoBar()
    return tqdm.tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True,
                     leave=desc.startswith("final"))  # fmt: skip


def finished(workdir: str) -> dict[str, Any] | None:
    """The summary of a finished run (written last, so its presence means finished: alone or
    as one adapter of a multi-adapter job), or None. A summary.json that is not JSON is an
    error naming it (the run's checkpoints are intact: delete the file to redo the end)."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(
            f"{path} is damaged ({e}); delete it and rerun to evaluate the final checkpoint "
            "again and rewrite it"
        ) from None


def resume(ckpt: Checkpointer, state: dict, logs: Sequence[MetricsLog], num_steps: int) -> dict:
    """The state of the newest intact checkpoint in ``ckpt`` (corrupt ones are moved aside and
    reported), or ``state`` itself when there is none; trims each of ``logs`` to match, so
    rows a cut-off run logged after its last checkpoint (or before its first) are not kept
    twice."""
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
        step = step_of(restored)
        fallback = " (the newest intact one)" if notes else ""
        tqdm.tqdm.write(
            f"resuming from the checkpoint at step {step}{fallback} in {ckpt.directory}"
        )
    for log in logs:
        log.truncate_after(step, num_steps)
    return state if restored is None else restored


def step_of(state) -> int:
    """The step count of a state (of one adapter or of K)."""
    return int(np.asarray(jax.device_get(state["step"])).flat[0])


@dataclasses.dataclass
class Result:
    """What :func:`run` hands back: the final state and what the summaries need."""

    state: Any
    first_step: int
    validation: list[dict[str, float]]  # per adapter
    test: list[dict[str, float]]
    train_seconds: float  # every session of the run (see _Timing), this one included
    train_tokens: int  # all adapters together, every session
    step_seconds_median: float | None
    step_memory_bytes: int | None
    earlier_wall_seconds: float = 0.0  # the earlier sessions' time up to their kept checkpoint
    sessions: int = 1  # processes that trained this run (resumes + 1)
    kept: dict | None = None  # train.keep_best: the kept checkpoint's metric, step and value


class _Window:
    """Per-adapter metric sums since the last training log row: loss, accuracy and every
    other ``<name>_sum`` the objective reports (DPO's ``rewards/chosen``, ...), as means."""

    def __init__(self, k: int):
        self.sums, self.tokens, self.since = np.zeros((len(_WINDOW), k)), np.zeros(k), time.time()
        self.extra: dict[str, np.ndarray] = {}

    def add(self, sums, tokens, kept) -> None:
        self.sums += np.stack([np.where(kept, np.atleast_1d(sums[k]), 0.0) for k in _WINDOW])
        for key in (k for k in sums if k.endswith("_sum") and k != "loss_sum"):
            self.extra[key] = self.extra.get(key, 0.0) + np.where(kept, np.atleast_1d(sums[key]), 0)
        self.tokens += np.where(kept, tokens, 0)

    def rows(self) -> list[dict[str, float]]:
        elapsed = max(time.time() - self.since, 1e-9)
        loss, correct, count = self.sums
        count = np.maximum(count, 1)
        return [
            {"loss": float(loss[k] / count[k]), "accuracy": float(correct[k] / count[k]),
             **{key.removesuffix("_sum"): float(v[k] / count[k]) for key, v in self.extra.items()},
             "tokens_per_second": float(self.tokens[k] / elapsed)}
            for k in range(len(count))
        ]  # fmt: skip


class _Timing:
    """Training time and tokens summed over the processes (sessions) a run took.

    Each checkpoint save appends this session's totals so far to ``timing.json`` beside the
    checkpoints. A session resuming from step S counts every earlier session up to its last
    record at or before S (the work past S is redone, so counted once), so a run resumed at
    its final checkpoint still reports its throughput. ``step_seconds_median`` combines the
    sessions' medians weighted by their step counts. A damaged file only loses the history.
    """

    def __init__(self, directory: str, first_step: int, primary: bool):
        self.path, self.primary = os.path.join(directory, "timing.json"), primary
        try:
            with open(self.path) as f:
                sessions = json.load(f)["sessions"]
        except FileNotFoundError:
            sessions = []
        except (ValueError, KeyError, TypeError) as e:
            tqdm.tqdm.write(f"{self.path} is damaged ({e}); earlier sessions' time is not counted")
            sessions = []
        self.earlier = []
        for session in sessions:
            kept = [r for r in session["records"] if r["step"] <= first_step]
            if session["first_step"] < first_step and kept:
                self.earlier.append({"first_step": session["first_step"], "records": kept})
        self.current = {"first_step": first_step, "records": []}

    def record(self, step: int, seconds: float, tokens: int, wall: float, times) -> None:
        median = float(np.median(times)) if times else None
        self.current["records"].append(
            {"step": step, "train_seconds": seconds, "tokens": tokens, "wall_seconds": wall,
             "step_seconds_median": median, "steps_timed": len(times)}
        )  # fmt: skip
        if self.primary:
            runfiles.write_json_atomic(self.path, {"sessions": [*self.earlier, self.current]})

    def totals(self, seconds: float, tokens: int, times) -> dict[str, Any]:
        """Result fields for the whole run: this session's figures plus the earlier ones'."""
        last = [s["records"][-1] for s in self.earlier]
        medians = [(r["step_seconds_median"], r["steps_timed"]) for r in last]
        if times:
            medians.append((float(np.median(times)), len(times)))
        medians = sorted((m, n) for m, n in medians if m is not None and n)
        median, seen = None, 0
        for m, n in medians:  # the weighted median of the sessions' medians
            seen += n
            if seen * 2 >= sum(n for _, n in medians):
                median = m
                break
        return {
            "train_seconds": seconds + sum(r["train_seconds"] for r in last),
            "train_tokens": tokens + sum(r["tokens"] for r in last),
            "step_seconds_median": median,
            "earlier_wall_seconds": sum(r["wall_seconds"] for r in last),
            "sessions": len(last) + 1,
        }


class _Skips:
    """Skipped (non-finite) steps per adapter; stops a run that skips more than
    ``train.max_skipped_consecutive`` steps in a row, or (from step 20 on) more than
    ``train.max_skipped_fraction`` of its steps: a diverging run, not a few bad batches."""

    MIN_STEPS = 20

    def __init__(self, names: Sequence[str], train_config, first_step: int):
        self.names, self.first = list(names), first_step
        self.limit = int(train_config.get("max_skipped_consecutive", 10))
        self.fraction = float(train_config.get("max_skipped_fraction", 0.25))
        self.in_a_row, self.total = np.zeros(len(names), int), np.zeros(len(names), int)
        self.steps: list[list[int]] = [[] for _ in names]

    def update(self, step: int, bad: np.ndarray, advice) -> None:
        self.in_a_row = np.where(bad, self.in_a_row + 1, 0)
        self.total += bad
        for k in np.flatnonzero(bad):
            self.steps[k].append(step)
        done = step - self.first
        over = (self.in_a_row > self.limit) | (
            (done >= self.MIN_STEPS) & (self.total > self.fraction * done)
        )
        for k in np.flatnonzero(over):
            shown = self.steps[k][-12:]
            raise NonFiniteLossError(
                f"{self.names[k]}: {self.total[k]} of the {done} steps so far had a NaN/Inf "
                f"loss and were skipped ({self.in_a_row[k]} in a row; steps "
                f"{'..., ' if len(self.steps[k]) > len(shown) else ''}{shown}): past "
                f"train.max_skipped_consecutive = {self.limit} or train.max_skipped_fraction "
                f"= {self.fraction}, the run is diverging, not meeting a few bad batches; "
                f"lower train.learning_rate or check the data. {advice(k)}"
            )


def run(
    stepper: Stepper,
    state: Any,
    ckpt: Checkpointer,
    logs: Sequence[MetricsLog | None],
    best: best_lib.Best | None = None,
) -> Result:
    """Trains ``stepper``'s adapters from ``state`` (or the newest checkpoint) to
    ``train.num_steps`` and evaluates them. ``logs[k]`` is adapter k's metrics log (None:
    nothing is logged for it, e.g. an adapter whose run had already finished); ``best``
    keeps the best checkpoint (``train.keep_best``, a single run)."""
    config = stepper.configs[0]
    t = config.train
    state = resume(ckpt, state, [log for log in logs if log is not None], t.num_steps)
    first_step = step_of(state)
    stepper.jit(state)
    task = stepper.setup.task
    val_subset = setup_lib.subset(task.splits["validation"], config.task.max_eval_examples)

    losses = [stops.logged_losses(log) for log in logs]  # each adapter's (step, training loss)

    def write(k_rows, **fields):
        for log, row, seen in zip(logs, k_rows, losses, strict=True):
            if log is not None and row is not None:
                log.write(**fields, **row)
                if fields.get("split") == "train" and "loss" in row:
                    seen.append((fields["step"], row["loss"]))

    def advice(k: int) -> str:
        return stops.nonfinite_advice(ckpt, losses[k])

    def run_eval(split, examples, step, final=False, of=None, **fields):
        desc = f"{'final ' if final else ''}eval {split}"
        results = stepper.evaluate(state if of is None else of, examples, desc)
        # metrics.jsonl keeps the scalars; per-class figures and the confusion matrix go to
        # the summary only
        write([{k: v for k, v in r.items() if k not in _SUMMARY_ONLY} for r in results],
              step=step, split=split, **fields)  # fmt: skip
        return results

    if t.get("keep_best") and best is None:
        raise ValueError("train.keep_best is for single runs (lorax.train), not multi-adapter jobs")
    for note in best.notes if best is not None else ():
        tqdm.tqdm.write(note)

    bar = tqdm.tqdm(
        total=t.num_steps, initial=first_step, unit="step", dynamic_ncols=True,
        desc="train" if stepper.size == 1 else f"train x{stepper.size}",
    )  # fmt: skip
    window, pending, train_tokens = _Window(stepper.size), None, 0
    skips = _Skips(stepper.names, t, first_step)
    step_times, step_memory, loop_start = [], None, time.time()
    timing, session_start = _Timing(ckpt.workdir, first_step, jax.process_index() == 0), time.time()

    def drain(item):
        """Adds step ``step``'s sums to the window, or applies the NaN/Inf policy."""
        nonlocal train_tokens
        step, sums, tokens = item
        sums = jax.device_get(sums)
        bad = np.atleast_1d(sums["nonfinite"]) > 0
        if bad.any():
            names = [n for n, b in zip(stepper.names, bad, strict=True) if b]
            where = "" if stepper.size == 1 else f" in {names}"
            msg = (
                f"loss is NaN/Inf at step {step}{where}; the state from step {step - 1} was "
                "kept. " + advice(int(np.flatnonzero(bad)[0]))
            )
            if not t.skip_nonfinite:
                raise NonFiniteLossError(msg)
            tqdm.tqdm.write(f"skipping batch: {msg}")
            write([{"skipped_nonfinite": 1} if b else None for b in bad], step=step, split="train")
        skips.update(step, bad, advice)
        window.add(sums, tokens, ~bad)
        train_tokens += int(tokens[~bad].sum())

    for step in range(first_step, t.num_steps):
        batch, tokens = stepper.batch(step)
        step_start = time.time()
        if step == first_step:
            step_memory = stepper.memory_bytes(state, batch)
        state, sums = stepper.step(state, batch)
        if pending is not None:
            drain(pending)
        pending = (step + 1, sums, tokens)  # metrics are labelled by the step count after it
        done = step + 1
        if done % config.log_every == 0 or done == t.num_steps:
            drain(pending)
            pending = None
            rows = window.rows()
            write(rows, step=done, split="train")
            total = window.sums[0].sum() / max(window.sums[2].sum(), 1)
            bar.set_postfix(
                loss=f"{total:.4f}", tok_s=f"{sum(r['tokens_per_second'] for r in rows):.0f}"
            )
            window = _Window(stepper.size)
        bar.update(1)
        if step > first_step:  # each iteration waits for one step's metrics: one step
            step_times.append(time.time() - step_start)
        if config.eval_every and done % config.eval_every == 0 and done != t.num_steps:
            eval_start = time.time()
            results = run_eval("validation", val_subset, done)
            accuracies = ", ".join(f"{r['accuracy']:.4f}" for r in results)
            kept = best is not None and best.offer(done, results[0], state)
            bar.write(f"step {done}: validation accuracy {accuracies}"
                      + (f" ({best.metric} {best.value:.4f}: kept)" if kept else ""))  # fmt: skip
            paused = time.time() - eval_start  # evals do not count against train throughput
            window.since += paused
            loop_start += paused
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == t.num_steps:
            if pending is not None:
                drain(pending)
                pending = None
            ckpt.save(done, state)
            now = time.time()
            timing.record(done, now - loop_start, train_tokens, now - session_start, step_times)
    if pending is not None:
        drain(pending)
    bar.close()
    train_seconds = time.time() - loop_start
    ckpt.wait()

    test_examples = setup_lib.subset(task.splits["test"], config.task.max_test_examples)
    tqdm.tqdm.write(
        f"final evaluation: {len(task.splits['validation']):,} validation and "
        f"{len(test_examples):,} test examples"
        + ("" if stepper.size == 1 else f", {stepper.size} adapters on each batch")
    )
    validation = run_eval("validation", task.splits["validation"], t.num_steps, final=True)
    evaluated, kept = state, None
    if best is not None:
        evaluated, validation, kept = _final_best(
            best, state, stepper, validation, val_subset, task, t.num_steps, run_eval
        )
    test = run_eval("test", test_examples, t.num_steps, final=True, of=evaluated)
    return Result(
        state, first_step, validation, test, step_memory_bytes=step_memory, kept=kept,
        **timing.totals(train_seconds, train_tokens, step_times),
    )  # fmt: skip


def _final_best(best, state, stepper, validation, val_subset, task, num_steps, run_eval):
    """``train.keep_best`` at the end: the final state is offered too (on the periodic
    evaluations' rows); if an earlier checkpoint stays best, it is what the run reports and
    exports, so its validation is evaluated in full. Returns ``(state evaluated, its
    validation, the summary's keep_best record)``."""
    final = validation
    if val_subset is not task.splits["validation"]:
        final = stepper.evaluate(state, val_subset)
    best.offer(num_steps, final[0], state)
    evaluated = state
    if best.step != num_steps:
        tqdm.tqdm.write(
            f"train.keep_best: the checkpoint of step {best.step} ({best.metric} "
            f"{best.value:.4f}) is kept and evaluated; the final state's was "
            f"{final[0][best.key]:.4f}"
        )
        evaluated = {"trainable": sharding.put(best.trainable(), stepper.setup.mesh)}
        validation = run_eval("validation", task.splits["validation"], num_steps,
                              final=True, of=evaluated, checkpoint_step=best.step)  # fmt: skip
    best.ckpt.wait()
    return evaluated, validation, best.describe()


def make_summary(
    config, setup: setup_lib.Setup, adapter: Mapping[str, Any], result: Result, k: int, start
) -> dict[str, Any]:
    """The ``summary.json`` of adapter ``k`` of a finished :func:`run` (a single run: k = 0),
    whose trained ``{"delta", "head"}`` is ``adapter``."""
    val, test = result.validation[k], result.test[k]
    names = list(setup.task.label_names)
    return {
        "validation_accuracy": val["accuracy"],
        "validation_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": test["count"],
        # LM token splits (instructions, text): exp(mean token loss); absent for the others
        **{
            f"{split}_perplexity": m["perplexity"]
            for split, m in (("validation", val), ("test", test))
            if "perplexity" in m
        },
        "validation_examples": val["count"],
        "label_names": names,  # class index -> name (empty for causal-LM tasks)
        **_class_metrics("validation", val, names),
        **_class_metrics("test", test, names),
        # the other means an objective reports (a reward model's mean margin r_chosen −
        # r_rejected, beside its preference accuracy as *_accuracy)
        **_extra_metrics("validation", val),
        **_extra_metrics("test", test),
        "model_kind": setup.kind,
        "method": config.method,
        # lora_params: the LoRA delta's size (0 for other methods); delta_params: the
        # trained tree of whichever method ran; head_params: train.trainable's leaves.
        "lora_params": lora.count(adapter["delta"]) if config.method == "lora" else 0,
        # a method with its own state reports on it (AdaLoRA: the rank each kernel kept)
        **(setup.method.summary(result.state["method"]) if "method" in result.state else {}),
        "delta_params": lora.count(adapter["delta"]),
        "head_params": lora.count(adapter["head"]),
        "base_params": setup.base_params,
        # What an adapter checkpoint weighs beside the base it needs (the paper's 350 GB ->
        # 35 MB point): delta + trained head in fp32, and the frozen base as stored.
        "adapter_bytes": paths.nbytes(adapter["delta"]) + paths.nbytes(adapter["head"]),
        # Quantized kernels count at their packed size (codes + scales); base_bytes_dense is
        # what the same frozen leaves weigh unquantized in model.base_dtype.
        "base_bytes": paths.nbytes(setup.frozen),
        "base_bytes_dense": quant.dense_nbytes(setup.frozen),
        "base_quantize": config.model.get("quantize") or "none",
        "steps": config.train.num_steps,
        # train.keep_best: the checkpoint reported, exported and predicted with (else None:
        # the final one)
        "kept_checkpoint": result.kept,
        "resumed_from": result.first_step,
        # every session's: this process's wall time plus the earlier ones' (to their kept
        # checkpoint); train_seconds, tokens_per_second and step_seconds_median likewise
        "wall_seconds": time.time() - start + result.earlier_wall_seconds,
        "sessions": result.sessions,
        "train_seconds": result.train_seconds,
        "train_tokens": result.train_tokens,
        "tokens_per_second": result.train_tokens / max(result.train_seconds, 1e-9),
        # median wall time of a step (fetching the previous step's metrics included)
        "step_seconds_median": result.step_seconds_median,
        "step_memory_bytes": result.step_memory_bytes,
        "devices": setup.mesh.devices.size,
        "mesh": {axis: int(n) for axis, n in setup.mesh.shape.items()},
        # What one device holds of the frozen base: shrinks as mesh.fsdp and mesh.tensor grow.
        "base_bytes_per_device": sharding.bytes_per_device(setup.frozen),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        # the kernels model.attention and model.loss_chunk resolved to on this backend
        "attention_kernel": getattr(setup.model, "attention", "xla"),
        "loss_chunk": setup.loss_chunk,
        "loss_grad": setup.loss_grad if setup.loss_chunk else None,
        "data_counts": dict(setup.task.counts),
        "config": json.loads(config.to_json_best_effort()),
    }


_PLAIN = ("loss", "accuracy", "count", "macro_f1", "per_class", "confusion")


def _extra_metrics(split: str, metrics: Mapping[str, Any]) -> dict:
    """``{split}_{name}`` for each metric of a split beyond loss, accuracy and class metrics."""
    return {f"{split}_{k}": v for k, v in metrics.items() if k not in _PLAIN}


def _class_metrics(split: str, metrics: Mapping[str, Any], names: Sequence[str]) -> dict:
    """A split's macro-F1, per-class precision/recall/F1/support by class name, and its
    confusion matrix (rows true, columns predicted, in ``label_names`` order)."""
    if "confusion" not in metrics:
        return {}
    return {
        f"{split}_macro_f1": metrics["macro_f1"],
        f"{split}_per_class": dict(zip(names, metrics["per_class"], strict=True)),
        f"{split}_confusion": metrics["confusion"],
    }


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """Writes ``summary.json`` (last: a workdir holding one is finished) after, for a
    classification run, ``confusion_test.png``."""
    if summary.get("test_confusion"):
        evaluate.plot_confusion(
            summary["test_confusion"], summary["label_names"],
            os.path.join(workdir, "confusion_test.png"),
            f"test: accuracy {summary['test_accuracy']:.4f}, "
            f"macro-F1 {summary['test_macro_f1']:.4f}",
        )  # fmt: skip
    if summary.get("adalora_ranks"):
        adalora.plot_ranks(
            summary["adalora_ranks"], os.path.join(workdir, "adalora_ranks.png"),
            f"AdaLoRA: final rank per kernel ({sum(summary['adalora_ranks'].values())} in all)",
        )  # fmt: skip
    runfiles.write_json_atomic(os.path.join(workdir, "summary.json"), summary)

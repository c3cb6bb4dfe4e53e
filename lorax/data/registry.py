"""Task names: which exist, which kind of model each fits, loading one, and its batcher."""

from __future__ import annotations

from typing import Any

from lorax.data.batching import Batcher
from lorax.data.causal import CAUSAL_TASKS, CausalExamples, ChoiceExamples, InstructionTask
from lorax.data.filetasks import FILE_TASKS
from lorax.data.packing import ChoiceBatcher, PackedBatcher
from lorax.data.preferences import PREFERENCES, PairBatcher, PreferenceExamples, PreferenceTask
from lorax.data.tasks import TASKS, TaskData
from lorax.data.text import TEXT_TASKS

# The kind of model a task's examples fit: "classify" (an encoder with a head) or "lm".
KINDS = {
    **{name: "classify" for name in (*TASKS, *FILE_TASKS)},
    **{name: "lm" for name in (*CAUSAL_TASKS, *TEXT_TASKS)},
    "preferences": "lm",
}
# Tasks that read their files and fields from the config's task section (task.data names a
# file or folder, not a built-in data directory) and hold out validation_size / test_size as a
# count or a fraction.
CONFIG_TASKS = (*FILE_TASKS, *TEXT_TASKS)


def check_task(name: str, model_kind: str | None = None, model_name: str = "") -> None:
    """Raises unless ``name`` is a task (and, given ``model_kind``, one that fits it), listing
    the valid names."""
    if name not in KINDS:
        raise ValueError(f"task.name = {name!r} is not a known task; choose one of {sorted(KINDS)}")
    if model_kind is not None and KINDS[name] != model_kind:
        what = "a causal LM" if model_kind == "lm" else "an encoder"
        valid = sorted(n for n, k in KINDS.items() if k == model_kind)
        raise ValueError(
            f"task.name = {name!r} does not fit model.name = {model_name!r}, which is {what}; "
            f"tasks for it: {valid}"
        )


def check_sources(task_config) -> None:
    """Raises naming ``task.data`` when a task that reads the config's files names none it can
    read; cheap, so the command lines call it before the model loads."""
    if task_config.name in TEXT_TASKS:
        TEXT_TASKS[task_config.name].check(task_config)


def label_names(task_config) -> tuple[str, ...]:
    """The class names of a config's classification task, in class-index order: its
    ``task.labels`` when set (a run's config.json records them, so a finished run needs no
    data to know them), else the built-in task's. () for a causal-LM task."""
    fixed = tuple(str(x) for x in task_config.get("labels") or ())
    if fixed:
        return fixed
    name = task_config.name
    if name in FILE_TASKS:
        return FILE_TASKS[name].label_names(task_config)
    return tuple(TASKS[name].label_names) if name in TASKS else ()


def resolve_labels(config) -> None:
    """Sets ``config.task.labels`` to the run's class names (for a file task, discovered from
    its training rows) before the config is written, so config.json names the classes."""
    if KINDS.get(config.task.name) == "classify" and not config.task.get("labels"):
        config.task.labels = label_names(config.task)


def load_task(
    name: str, data_dir, tokenizer, *, max_length: int, validation_size, task_config=None
) -> TaskData:
    """Loads task ``name`` from the files in ``data_dir``, tokenized with ``tokenizer``.

    Args:
      name: a key of :data:`lorax.data.tasks.TASKS` (classification) or of
        :data:`lorax.data.causal.CAUSAL_TASKS` (causal LM).
      data_dir: directory with the task's files (see :func:`lorax.assets.resolve`).
      tokenizer: a Hugging Face (fast) tokenizer.
      max_length: longest example in tokens; longer ones are truncated and counted.
      validation_size: rows held out of the train file as the validation split; the same rows
        on every call, whatever the run's seed (file tasks: a count or a fraction).
      task_config: the config's ``task`` section; file tasks (``text_classification``,
        ``pair_classification``, :mod:`lorax.data.filetasks`) read their files, fields and
        labels from it, and raw text (``text``, :mod:`lorax.data.text`) its file or folder,
        text field and held-out document counts; ``data_dir`` is then unused.

    Returns:
      The splits "train", "validation" and "test" (the task's test file), with counts. For
      causal tasks the splits are :class:`lorax.data.causal.CausalExamples` or
      :class:`lorax.data.causal.ChoiceExamples` instead of :class:`lorax.data.tasks.Examples`.
    """
    check_task(name)
    if name in FILE_TASKS:
        if task_config is None:
            raise ValueError(f"task {name!r} reads its files and fields from task_config")
        data = FILE_TASKS[name].load(task_config, tokenizer, max_length=max_length)
        check_splits(name, task_config.get("train_file") or task_config.get("data"), data)
        return data
    if name in TEXT_TASKS:
        if task_config is None:
            raise ValueError(f"task {name!r} reads its files from task_config")
        data = TEXT_TASKS[name].load(task_config, tokenizer, max_length=max_length)
        check_splits(name, task_config.get("data"), data)
        return data
    if validation_size < 1:
        raise ValueError(
            f"task.validation_size = {validation_size} leaves no validation rows; it must be "
            "at least 1 (rows held out of the train file)"
        )
    if not float(validation_size).is_integer():
        raise ValueError(
            f"task.validation_size = {validation_size}: task {name!r} takes a row count "
            "(fractions are for text_classification / pair_classification)"
        )
    validation_size = int(validation_size)
    task = PREFERENCES if name == "preferences" else CAUSAL_TASKS.get(name) or TASKS[name]
    # instruction and preference rows come from any file, with the config's field names
    own_files = isinstance(task, InstructionTask | PreferenceTask)
    kw = {"task_config": task_config} if own_files and task_config else {}
    data = task.load(
        data_dir, tokenizer, max_length=max_length, validation_size=validation_size, **kw
    )
    if data_dir is None and task_config is not None:  # the task read its own files
        data_dir = task_config.get("train_file") or task_config.get("data")
    check_splits(name, data_dir, data)
    return data


def check_splits(name: str, data_dir, data: TaskData) -> None:
    """Raises, before any training, if a split has no examples (a test file with no rows, or
    none with a gold label), saying what its file's rows were counted as."""
    for split in ("train", "validation", "test"):
        if data.counts.get(f"{split}/rows", 1):
            continue
        source = "train" if split == "validation" else split
        seen = {k: v for k, v in sorted(data.counts.items()) if k.startswith(f"{source}/") and v}
        seen |= {k: v for k, v in sorted(data.counts.items()) if k.startswith("all/") and v}
        raise ValueError(
            f"task {name!r} in {data_dir}: the {split} split has no examples, so it could not "
            f"be evaluated after training; rows counted: {seen or 'none'}"
        )


def make_batcher(examples, batch_size: int, task_config, *, seed: int, pad_id: int) -> Any:
    """The batcher for a split, by its kind of examples: preference pairs, scored choices,
    packed LM rows, or length buckets. ``task_config`` is the config's ``task`` section
    (buckets, max_length)."""
    if isinstance(examples, PreferenceExamples):
        return PairBatcher(examples, batch_size, task_config.buckets, seed=seed, pad_id=pad_id)
    if isinstance(examples, ChoiceExamples):
        return ChoiceBatcher(examples, batch_size, task_config.buckets, pad_id=pad_id)
    if isinstance(examples, CausalExamples):
        return PackedBatcher(examples, batch_size, task_config.max_length, seed=seed, pad_id=pad_id)
    return Batcher(examples, batch_size, task_config.buckets, seed=seed)


def train_batch_shapes(kind: str, batch_size: int, task_config) -> dict[str, Any]:
    """The largest training batch of a run, as ``jax.ShapeDtypeStruct`` s (``lorax.plan``).

    ``kind`` "lm": the :class:`PackedBatcher`'s rows of ``task.max_length`` tokens; "classify":
    the :class:`Batcher`'s batch in its longest bucket (``max(task.buckets)``), the one whose
    step needs the most memory.
    """
    import jax
    import numpy as np

    def shapes(length: int, fields: dict[str, Any], per_row: dict[str, Any]) -> dict[str, Any]:
        out = {k: jax.ShapeDtypeStruct((batch_size, length), d) for k, d in fields.items()}
        return {**out, **{k: jax.ShapeDtypeStruct((batch_size,), d) for k, d in per_row.items()}}

    if kind not in ("lm", "classify"):
        raise ValueError(
            f"a plan knows the training batches of causal-LM and classifier runs, not of a "
            f"{kind!r} run (train.objective); plan it with train.objective = 'lm'"
        )
    if kind == "lm":
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        fields = {"input_ids": i32, "targets": i32, "loss_mask": f32, "segment_ids": i32,
                  "positions": i32}  # fmt: skip
        return shapes(int(task_config.max_length), fields, {})
    i32 = np.dtype(np.int32)
    fields = {"input_ids": i32, "token_type_ids": i32, "attention_mask": i32}
    per_row = {"labels": i32, "weights": np.dtype(np.float32)}
    return shapes(max(int(b) for b in task_config.buckets), fields, per_row)

"""Data: tasks that turn local data sets into tokenized examples, and fixed-shape batching."""

from lorax.data.batching import Batcher, count_tokens
from lorax.data.causal import (
    CAUSAL_TASKS,
    INSTRUCTIONS_TINY_DIR,
    PREFERENCES_TINY_DIR,
    CausalExamples,
    ChoiceExamples,
    format_prompt,
    train_examples,
)
from lorax.data.filetasks import FILE_TASKS
from lorax.data.packing import ChoiceBatcher, PackedBatcher, count_lm_tokens
from lorax.data.preferences import PairBatcher, PreferenceExamples
from lorax.data.registry import (
    CONFIG_TASKS,
    check_sources,
    check_task,
    label_names,
    load_task,
    make_batcher,
    resolve_labels,
    train_batch_shapes,
)
from lorax.data.tasks import TASKS, Examples, PairClassification, TaskData
from lorax.data.text import TEXT_TASKS

__all__ = [
    "CAUSAL_TASKS",
    "CONFIG_TASKS",
    "FILE_TASKS",
    "INSTRUCTIONS_TINY_DIR",
    "PREFERENCES_TINY_DIR",
    "TASKS",
    "TEXT_TASKS",
    "Batcher",
    "CausalExamples",
    "ChoiceBatcher",
    "ChoiceExamples",
    "count_lm_tokens",
    "count_tokens",
    "Examples",
    "format_prompt",
    "PackedBatcher",
    "PairBatcher",
    "PreferenceExamples",
    "PairClassification",
    "TaskData",
    "check_sources",
    "check_task",
    "label_names",
    "load_task",
    "make_batcher",
    "resolve_labels",
    "train_batch_shapes",
    "train_examples",
]

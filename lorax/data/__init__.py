"""Data: tasks that turn local data sets into tokenized examples, and fixed-shape batching."""

from lorax.data.batching import Batcher, count_tokens
from lorax.data.tasks import TASKS, Examples, PairClassification, TaskData, load_task

__all__ = [
    "TASKS",
    "Batcher",
    "count_tokens",
    "Examples",
    "PairClassification",
    "TaskData",
    "load_task",
]

"""Files a run writes, written so that a kill at any instant leaves them whole.

JSON and text files are written to a temporary file beside the target, flushed to disk, then
renamed over it (``os.replace`` is atomic on POSIX), so a reader sees the old or the new file,
never half of one. ``metrics.jsonl`` is appended to; a resumed run first drops the rows logged
after its checkpoint (and a half-written last line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; trims events past a resume point."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrites the log (atomically) with the rows ``predicate`` accepts; a line that is not
        JSON (the half-written last line of a killed run) is dropped."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if line.strip() and predicate(json.loads(line)):
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue
        write_text_atomic(self.path, "".join(kept))

    def truncate_after(self, step: int, final_step: int | None = None) -> None:
        """Drops rows logged after ``step`` by a run that was cut off before its next
        checkpoint, and the end-of-run evaluations at ``final_step`` (they are written again)."""
        self.keep(
            lambda row: row.get("step", 0) <= step
            and not (final_step is not None and row.get("split") != "train"
                     and row.get("step", 0) >= final_step)
        )  # fmt: skip

    def write(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")

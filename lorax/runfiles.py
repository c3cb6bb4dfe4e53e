"""Files a run writes, written so that a kill at any instant leaves them whole.

JSON and text files are written to a temporary file beside the target, flushed to disk, then
renamed over it (``os.replace`` is atomic on POSIX), so a reader sees the old or the new file,
never half of one. ``metrics.jsonl`` is appended to; a resumed run first drops the rows logged
after its checkpoint (and a half-written last line).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from lorax import paths


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.numpy.save_file`` through a temporary file and a rename, with the mode an
    ordinary file gets (``safetensors`` itself creates 0600 files, unlike every other file an
    export writes)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG through a temporary file and a rename; closes the figure."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON has no such
    numbers); a dict gains ``"nonfinite": {dotted path: "nan" | "inf" | "-inf"}`` saying which
    values were replaced and what they were."""
    found: dict[str, str] = {}

    def clean(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            found[where] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    out = clean(obj, "")
    if found and isinstance(out, dict):
        out["nonfinite"] = found
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented, strict JSON to ``path`` atomically (:func:`strict_json`)."""
    write_text_atomic(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False))


def tensorboard_dir(workdir: str, config) -> str | None:
    """``<workdir>/tensorboard`` for a config with ``log.tensorboard``, else None."""
    log = config.get("log")
    return os.path.join(workdir, "tensorboard") if log and log.get("tensorboard") else None


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; trims events past a resume point.

    With ``tensorboard`` (a folder: ``log.tensorboard``) each row's numbers are also written
    as TensorBoard scalars ``<split>/<name>`` at the row's step (tensorboardX event files);
    after a resume the first event purges what an earlier session logged past its checkpoint.
    """

    def __init__(self, path: str | os.PathLike, tensorboard: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        self.tensorboard = None if tensorboard is None else os.fspath(tensorboard)
        self._writer = None
        self._purge_step: int | None = None

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
        self._purge_step = step + 1
        self.keep(
            lambda row: row.get("step", 0) <= step
            and not (final_step is not None and row.get("split") != "train"
                     and row.get("step", 0) >= final_step)
        )  # fmt: skip

    def write(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(event), sort_keys=True, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            self._scalars(event)

    def _scalars(self, event: dict) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard, purge_step=self._purge_step)
        step, split = int(event.get("step", 0)), event.get("split", "")
        for name, value in sorted(event.items()):
            if name in ("step", "split") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(f"{split}/{name}" if split else name, value, step)
        self._writer.flush()  # on disk with the row: a killed run loses nothing logged

    def close(self) -> None:
        """Closes the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# Config fields a rerun may change without changing what the run computes: how often it logs,
# evaluates and checkpoints, how it batches evaluation, the periodic-eval subset, the devices,
# and the kernels of the same math (attention, the chunked LM loss: equal to float rounding).
RESULT_NEUTRAL = (
    "model/attention",
    "model/loss_chunk",
    "model/loss_grad",
    "log_every",
    "eval_every",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "task/max_eval_examples",
    "log/",
    "mesh/",
)


def config_changes(old: dict, new: dict) -> list[str]:
    """The fields (dotted, with both values) where ``new`` differs from ``old`` in anything
    that changes a run's result; both are configs as JSON objects. A field ``old`` lacks (a
    workdir written before the field existed) counts as unchanged: new fields default to the
    old behaviour."""
    a, b = paths.flatten(old), paths.flatten(new)
    neutral = RESULT_NEUTRAL
    if a.get("train/keep_best"):  # the kept best compares values over the periodic-eval subset
        neutral = tuple(k for k in RESULT_NEUTRAL if k != "task/max_eval_examples")
    changed = []
    for key in sorted(a):
        if key.startswith(neutral) or a[key] == b.get(key):
            continue
        changed.append(f"{key.replace('/', '.')}: {a[key]!r} -> {b.get(key)!r}")
    return changed


def write_config_once(workdir: str, config) -> None:
    """Writes ``config.json`` into a new workdir; on a workdir that has one, checks that the
    config is the same in everything that changes the result, and raises (writing nothing)
    otherwise, listing the fields."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path} is unreadable ({e}); it records the config this workdir was started "
                "with: restore it, or pass a new --workdir"
            ) from None
        changes = config_changes(old, new)
        if changes:
            raise ValueError(
                f"workdir {workdir} was started with another config; a run's config does not "
                f"change (it would mislabel its checkpoints and exports). Differing: "
                f"{'; '.join(changes)}. Rerun with the config in {path}, or pass a new --workdir"
            )
        return
    write_text_atomic(path, config.to_json_best_effort(indent=2))

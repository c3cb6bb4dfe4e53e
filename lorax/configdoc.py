"""Every config field with its value and the comment ``configs/base.py`` gives it:
``python -m lorax.train --config=FILE --print_config``."""

from __future__ import annotations

import os
import re

from lorax import paths

_ASSIGN = re.compile(r"^\s*c\.(?P<field>[\w.]+)\s*=\s*(?P<value>.*?)\s*(?:#\s*(?P<comment>.*))?$")
_COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")


def base_comments(path: str) -> dict[str, str]:
    """``{dotted field: its comment}`` from ``configs/base.py``.

    A field's comment is the one on its line; comment lines between two assignments go to the
    next field when it has no comment of its own (a note above it), else to the previous one
    (its comment wrapped onto the following lines).
    """
    comments: dict[str, str] = {}
    pending: list[str] = []
    last = None
    with open(path) as f:
        for line in f:
            m, c = _ASSIGN.match(line), _COMMENT.match(line)
            if m and "ConfigDict(" not in m["value"]:
                own = (m["comment"] or "").strip()
                if pending and not own:
                    own = " ".join(pending)
                elif pending and last is not None:
                    comments[last] = f"{comments[last]} {' '.join(pending)}".strip()
                comments[m["field"]], last, pending = own, m["field"], []
            elif c and not c["text"].lstrip().startswith("---"):
                pending.append(c["text"].strip())
            elif not line.strip() or m:
                if pending and last is not None:
                    comments[last] = f"{comments[last]} {' '.join(pending)}".strip()
                pending, last = [], None
    return comments


# The repository root: config files import ``configs.base`` from there.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_file(path: str):
    """``get_config()`` of a config file anywhere (a user's own task, e.g. a
    ``text_classification`` on their CSV); an error names a file that is not one."""
    import runpy
    import sys

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={path} does not exist")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    get_config = runpy.run_path(path).get("get_config")
    if get_config is None:
        raise ValueError(f"--config={path} defines no get_config()")
    return get_config()


def describe(config, base_path: str | None = None) -> str:
    """Every field of ``config``: ``name = value  # comment`` (the comment from base.py)."""
    if base_path is None:
        base_path = os.path.join(REPO, "configs", "base.py")
    comments = base_comments(base_path) if os.path.exists(base_path) else {}
    flat = paths.flatten(config.to_dict())
    width = max(len(k) for k in flat)
    lines = []
    for key in sorted(flat, key=lambda k: (k.count("/"), k)):
        dotted = key.replace("/", ".")
        value = f"{dotted:<{width}} = {flat[key]!r}"
        note = comments.get(dotted)
        lines.append(f"{value}  # {note}" if note else value)
    return "\n".join(lines)
